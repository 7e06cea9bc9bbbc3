"""Image continuations: prompt images (a visual sentence) -> the model's next image, as PNG + ids.

Two modes: *continue* a sentence of ``prompt_images`` images with the next image (with
``transform`` set, the prompt is the in-context pattern ``A1 t(A1) ... Ak`` and the model should
answer ``t(Ak)``), and *complete* an image from its top ``complete_rows`` token rows. Sampling
uses the model's KV cache and never emits special tokens inside an image.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lvm.checkpoint import CheckpointMismatch, load_model_and_tokenizer  # noqa: F401  (re-exported)
from lvm.data import SpecialTokens, visual_sentence
from lvm.model import LVM
from lvm.report import save_image_grid
from lvm.runtime import ConfigError
from tokenizer.images import ImageSourceError, open_images, transform_images
from tokenizer.splits import DEFAULT_TEST_FRACTION


@dataclass
class GenerateConfig:
    """``lvm generate``: continue or complete images from a source with a trained LVM."""

    checkpoint: str = "runs/lvm"  # training output folder (uses its 'latest') or a checkpoint folder
    tokenizer: str = ""  # tokenizer folder; empty -> the one the checkpoint's training data was made with
    source: str = "fashion-mnist"  # where prompt images come from
    split: str = "test"
    test_fraction: float = DEFAULT_TEST_FRACTION  # sources without a named split: share held out as test (by path hash)
    test_source: str = ""  # an explicit test set to draw prompts from (with split 'test')
    on_error: str = "fail"  # unreadable image files: 'fail' or 'skip'
    first: int = 0  # index of the first prompt image in the source
    prompts: int = 4  # number of prompt sentences
    prompt_images: int = 1  # images per prompt sentence
    transform: str = "none"  # build in-context pairs A, t(A) in the prompt and ask for t(A_last)
    complete_rows: int = 0  # > 0: complete the last prompt image from its top N token rows instead
    samples: int = 4  # continuations per prompt
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    seed: int = 0
    out: str = "runs/generate"  # writes grid.png, tokens.npy, generate.json


def generate(cfg: GenerateConfig) -> dict:
    """The ``lvm generate`` entry point: writes a PNG grid (prompt | samples) and the token ids."""
    _check_config(cfg)
    model, tok, ckpt = load_model_and_tokenizer(cfg.checkpoint, cfg.tokenizer)
    need = cfg.prompts * cfg.prompt_images
    source = open_images(cfg.source, cfg.split, size=tok.config.image_size, channels=tok.config.channels,
                         on_error=cfg.on_error, test_fraction=cfg.test_fraction, test_source=cfg.test_source or None)
    if len(source) - cfg.first < need:
        raise ImageSourceError(
            f"{cfg.source}: {max(len(source) - cfg.first, 0)} {cfg.split} images after --first {cfg.first}, need "
            f"{need} (--prompts x --prompt-images); lower --first, --prompts or --prompt-images, or use a larger source."
        )
    images = source.select(np.arange(cfg.first, cfg.first + need)).load(progress=False).images
    prompts = images[:need].reshape(cfg.prompts, cfg.prompt_images, *images.shape[1:])
    result = continue_images(
        model, tok, prompts, cfg.samples, cfg.temperature, cfg.top_k or None,
        cfg.top_p if cfg.top_p < 1.0 else None, cfg.seed, cfg.complete_rows, cfg.transform,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = result["prompt_images"]  # [P, k', C, H, W]
    rows = torch.cat([shown, result["images"]], dim=1)  # [P, k' + S, C, H, W]
    save_image_grid(rows, out / "grid.png", separator_after=shown.shape[1])
    np.save(out / "tokens.npy", result["tokens"].numpy())
    summary = {"checkpoint": str(ckpt), "grid": str(out / "grid.png"), "tokens": str(out / "tokens.npy"),
               "config": asdict(cfg)}
    (out / "generate.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_config(cfg: GenerateConfig) -> None:
    """Flag values checked before the model loads, so a typo fails at once and names its flag."""
    for name in ("prompts", "prompt_images", "samples"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1.")
    if cfg.first < 0 or cfg.complete_rows < 0 or cfg.top_k < 0:
        raise ConfigError("--first, --complete-rows and --top-k must be >= 0.")
    if cfg.temperature < 0:
        raise ConfigError(f"--temperature {cfg.temperature} must be >= 0 (0 = greedy).")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"--top-p {cfg.top_p} must be in (0, 1] (1 = off).")


@torch.no_grad()
def continue_images(
    model: LVM,
    tok,
    prompt_images: np.ndarray,
    samples: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    complete_rows: int = 0,
    transform: str = "none",
) -> dict:
    """Sample ``samples`` next images for each prompt sentence ``uint8 [P, k, H, W, C]``.

    Returns ``tokens`` [P, S, h, w], decoded ``images`` [P, S, C, H, W] in [0, 1], and the
    ``prompt_images`` to show beside them [P, k', C, H, W] (with transforms interleaved).
    """
    special = SpecialTokens(tok.vocab_size)
    h, w = tok.grid
    per_image = h * w
    P, k = prompt_images.shape[:2]
    flat = prompt_images.reshape(P * k, *prompt_images.shape[2:])
    ids = tok.encode(flat).reshape(P, k, per_image)  # [P, k, h*w]
    show = prompt_images  # what the grid shows left of the bar: [P, k', H, W, C]
    if transform != "none":
        flat_t = transform_images(flat, transform)
        t_ids = tok.encode(flat_t).reshape(P, k, per_image)
        # In-context pattern A1 t(A1) ... A_k; the model must write t(A_k), so it is left out.
        ids = torch.stack([ids, t_ids], dim=2).reshape(P, 2 * k, per_image)[:, :-1]
        show = np.stack([flat, flat_t], axis=1).reshape(P, 2 * k, *flat.shape[1:])[:, :-1]
    if not 0 <= complete_rows < h:
        raise ConfigError(
            f"complete_rows={complete_rows} (--complete-rows) must be in [0, {h - 1}] for a {h}x{w} token grid."
        )

    # [BOS] img1 [SEP] ... img_k [SEP] and the model writes the next image; or, completing, the
    # last image's top rows with nothing after them and the model writes the rest.
    end, keep = ("open", complete_rows * w) if complete_rows else ("sep", None)
    seqs = [visual_sentence(list(ids[p]), special, end=end, last_tokens=keep) for p in range(P)]
    prompt = torch.from_numpy(np.stack(seqs))  # [P, T0]: all prompts have equal length
    prompt = prompt.repeat_interleave(samples, dim=0).to(next(model.parameters()).device)  # [P*S, T0]
    new = per_image - complete_rows * w
    total, limit = prompt.shape[1] + new, model.config.max_seq_len
    if total > limit:
        raise ConfigError(
            f"prompt of {prompt.shape[1]} tokens + {new} new tokens = {total} exceeds max_seq_len {limit} of the "
            "checkpoint; use fewer --prompt-images (a --transform doubles them)."
        )
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    out = model.generate(prompt, new, temperature, top_k, top_p, generator=gen, token_limit=special.codebook_size)
    tokens = out[:, -per_image:].reshape(P, samples, h, w).cpu()
    images = tok.decode(tokens.reshape(P * samples, h, w)).reshape(P, samples, *_chw(tok)).cpu()

    shown_t = torch.from_numpy(np.ascontiguousarray(show)).permute(0, 1, 4, 2, 3).float() / 255.0
    if complete_rows:  # show the last prompt image with its missing rows blanked out
        cut = complete_rows * tok.config.image_size // h
        shown_t[:, -1, :, cut:] = 0.5
    return {"tokens": tokens, "images": images, "prompt_images": shown_t}


def _chw(tok) -> tuple[int, int, int]:
    return tok.config.channels, tok.config.image_size, tok.config.image_size
