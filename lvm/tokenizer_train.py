"""Train the visual tokenizer, then measure it on held-out images and save it.

``train_tokenizer(TokenizerTrainConfig(...))`` is the whole pipeline: load images, train the
autoencoder with L1 + L2 reconstruction loss on the shared runtime (``lvm.runtime``: AdamW groups,
warmup + cosine, epoch sampler, JSONL metrics, checkpoints with exact resume, an optional time
budget), evaluate (PSNR, codebook usage, perplexity, encode throughput), write ``eval.json``,
``recon.png``, ``train_config.json`` and the tokenizer files into ``out_dir``. It lives beside the
other trainers so that the tokenizer package (model, images, shards) never imports upwards.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from tqdm import tqdm

from lvm.runtime import (
    Checkpointer, ConfigError, EpochSampler, MetricsLog, StepBudget, mixed_precision, param_groups, pick_device,
    set_lr, warmup_cosine,
)
from tokenizer.atomic import write_json_atomic
from tokenizer.metrics import code_perplexity, codebook_usage, psnr, psnr_per_image
from tokenizer.model import Tokenizer, TokenizerConfig, auto_layout
from tokenizer.splits import DEFAULT_TEST_FRACTION

STATE_NAME = "state.pt"  # model + optimizer inside each checkpoint folder

if TYPE_CHECKING:
    from tokenizer.images import ImageSet


@dataclass
class TokenizerTrainConfig:
    """Everything a tokenizer run needs; fields map 1:1 to ``lvm tokenizer-train`` flags."""

    data: str = "fashion-mnist"  # "fashion-mnist" | "skimage-crops" | image folder | labels CSV | .npy/.npz | IDX file
    split: str = "train"  # train, test or all; sources without a named split are split by path hash
    test_fraction: float = DEFAULT_TEST_FRACTION  # share of a source without a named split held out as test
    test_source: str = ""  # an explicit test set: then 'train' is all of --data
    unlabeled: list[str] = field(default_factory=list)  # more sources trained on whole (their labels unused)
    on_error: str = "fail"  # unreadable image files: 'fail' or 'skip'
    eval_data: str = ""  # "" = same source as `data`
    eval_split: str = "test"  # "" = hold out `eval_holdout` images of the training set instead
    eval_holdout: int = 1000
    limit: int = 0  # use at most this many training images, spread over the source (0 = all that fit max_memory_gib)
    max_memory_gib: float = 1.0  # training images kept in memory: a larger source is subsampled evenly to fit
    max_eval_images: int = 10_000  # held-out images measured at the end (spread evenly)
    out_dir: str = "runs/tokenizer"
    # model (see TokenizerConfig); 0 / "" = chosen from the data
    image_size: int = 0  # 0 = the data's size (a folder of mixed sizes: the most common)
    channels: int = 0  # 0 = the data's (grey if every image is grey, else RGB)
    grid: int = 0  # tokens per side; 0 = the finest grid of at most 8 per side (7x7 for 28 px)
    patch_size: int = 0  # 0 = from the image size and grid (see tokenizer.model.auto_layout)
    widths: str = ""  # channels per resolution, e.g. "64,64"; "" = `width` at every level auto_layout needs
    width: int = 64
    blocks_per_level: int = 1
    quantizer: str = "fsq"
    fsq_levels: str = "8,5,5,5"
    codebook_size: int = 1024
    code_dim: int = 16
    # optimisation
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    precision: str = "auto"  # training autocast: auto (bf16 on CUDA and AMX CPUs, else fp32), bf16, fp32
    # torch.set_num_threads on CPU (0 = leave torch's default). 2 threads: 0.15 s/step on an idle
    # 2-core box vs 0.29 s with 1; but on a CPU busy with other jobs, use 1 (2 threads were 4-8x slower).
    threads: int = 2
    # logging / evaluation
    log_every: int = 25
    eval_every: int = 250  # periodic eval on the first `periodic_eval_images` held-out images (0 = off)
    periodic_eval_images: int = 1000
    recon_examples: int = 16
    progress: bool = True
    checkpoint_every: int = 200  # write a resumable checkpoint (out_dir/ckpt-*/) every this many steps (0 = never)
    resume: bool = True  # continue from out_dir/latest when it exists
    time_budget: float = 0.0  # minutes; > 0: the step count (<= steps) that fits, decided during warmup

    def model_config(self, image_size: int, channels: int) -> TokenizerConfig:
        """The TokenizerConfig this run trains, with the data's size/channels and the layout filled in."""
        size = self.image_size or image_size
        patch, downsamplings = auto_layout(size, self.grid)
        if self.patch_size or self.widths:
            patch = self.patch_size or patch
            widths = _int_list(self.widths, "widths") if self.widths else (self.width,) * (downsamplings + 1)
        else:
            widths = (self.width,) * (downsamplings + 1)
        return TokenizerConfig(
            image_size=size,
            channels=self.channels or channels,
            patch_size=patch,
            widths=widths,
            blocks_per_level=self.blocks_per_level,
            quantizer=self.quantizer,
            fsq_levels=_int_list(self.fsq_levels, "fsq_levels"),
            codebook_size=self.codebook_size,
            code_dim=self.code_dim,
        )


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    train_set: "ImageSet | None" = None,
    eval_set: "ImageSet | None" = None,
) -> Tokenizer:
    """Train, evaluate and save a tokenizer; pass already-loaded ImageSets to skip loading ``cfg.data``."""
    threads_before = torch.get_num_threads()
    try:
        return _train(cfg, train_set, eval_set)
    finally:  # the thread count is process-wide; give the caller theirs back
        torch.set_num_threads(threads_before)


def _train(cfg: TokenizerTrainConfig, train_set, eval_set) -> Tokenizer:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    train_u8, eval_u8 = _load_data(cfg, train_set, eval_set)  # uint8 [N, C, H, W] each
    mcfg = cfg.model_config(image_size=train_u8.shape[-1], channels=train_u8.shape[1])
    try:
        model = Tokenizer(mcfg).to(device)
    except ValueError as err:  # the model's own shape checks: a configuration the user chose
        raise ConfigError(f"tokenizer settings: {err}") from None
    write_json_atomic(out / "train_config.json", {"train": asdict(cfg), "model": mcfg.to_dict(), "device": str(device)})
    eval_u8 = _check_images(eval_u8, mcfg, "eval")
    train_u8 = _check_images(train_u8, mcfg, "train")

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=(0.9, 0.99))
    autocast = mixed_precision(device, cfg.precision)
    sampler = EpochSampler(len(train_u8), cfg.batch_size, cfg.seed)
    ckpt = Checkpointer(out, max(cfg.checkpoint_every, 1), keep=1, enabled=cfg.checkpoint_every > 0)
    start, prior_s, planned = _resume(cfg, ckpt, model, opt)
    budget = StepBudget(cfg.time_budget * 60, cfg.steps, cfg.warmup_steps, planned=planned)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start)
    bar = tqdm(total=budget.steps, initial=start, desc="tokenizer", disable=not cfg.progress, dynamic_ncols=True)
    step_times: list[float] = []
    t_start = time.perf_counter() - prior_s
    model.train()
    step = start
    while step < budget.steps:
        t0 = time.perf_counter()
        lr = set_lr(opt, warmup_cosine(step, budget.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        x = train_u8[sampler.at(step)].to(device, torch.float32) / 255.0  # [B, C, H, W] in [0, 1]
        with autocast:  # FSQ quantizes in fp32 whatever the autocast (force_quantization_f32)
            recon, _, aux = model(x)  # recon in [-1, 1] space
        err = recon.float() - (x * 2 - 1)
        l1, l2 = err.abs().mean(), err.pow(2).mean()
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        step += 1
        step_times.append(time.perf_counter() - t0)
        if budget.observe(step, prior_s):
            bar.total = budget.steps
        out_of_time = budget.out_of_time(prior_s)

        if step % cfg.log_every == 0 or step == 1 or step == budget.steps or out_of_time:
            rec = {
                "step": step, "loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "aux": aux.item(), "lr": lr,
                "grad_norm": None if gnorm is None else gnorm.item(),
                "step_time_s": step_times[-1], "elapsed_s": time.perf_counter() - t_start,
            }
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != budget.steps:
            ev = evaluate(model, eval_u8[: cfg.periodic_eval_images])
            log.write({"step": step, **{f"eval_{k}": v for k, v in ev.items()}})
            model.train()
        bar.update(1)
        if ckpt.due(step, budget.steps) or out_of_time:
            _save(ckpt, cfg, model, opt, step, time.perf_counter() - t_start, budget)
        if out_of_time:
            break
    train_wall = time.perf_counter() - t_start
    bar.close()

    model.eval()
    result = evaluate(model, eval_u8)
    result.update(
        n_eval=len(eval_u8), n_train=len(train_u8), vocab_size=model.vocab_size, grid=list(model.grid),
        tokens_per_image=model.grid[0] * model.grid[1], steps=step, planned_steps=budget.steps,
        batch_size=cfg.batch_size, train_wall_s=train_wall,
        step_time_s_median=float(np.median(step_times)) if step_times else None,
        encode_images_per_s=encode_throughput(model, eval_u8), encode_device=str(device),
        threads=torch.get_num_threads(), torch_version=torch.__version__,
    )
    log.write({"step": step, **{f"eval_{k}": result[k] for k in ("psnr_db", "codebook_usage", "perplexity")}})
    log.close()
    save_recon_grid(model, eval_u8[: cfg.recon_examples], out / "recon.png")
    model.save_pretrained(out)
    result["fingerprint"] = model.fingerprint
    write_json_atomic(out / "eval.json", result)
    return model


@torch.no_grad()
def evaluate(model: Tokenizer, images_u8: torch.Tensor, batch_size: int = 500) -> dict:
    """Reconstruct ``uint8 [N, C, H, W]`` through the tokens: PSNR (dB), usage (0..1), perplexity."""
    if len(images_u8) == 0:
        raise ValueError("evaluate: no held-out images; give eval data or a nonzero eval_holdout.")
    ids, recons = [], []
    for chunk in images_u8.split(batch_size):
        x = chunk.float() / 255.0
        t = model.encode(x)  # [b, h, w]
        ids.append(t)
        recons.append(model.decode(t))
    ids_all, rec = torch.cat(ids), torch.cat(recons)
    target = images_u8.float() / 255.0
    return {
        "psnr_db": psnr(rec, target),
        "psnr_per_image_mean_db": psnr_per_image(rec, target).mean().item(),
        "codebook_usage": codebook_usage(ids_all, model.vocab_size),
        "perplexity": code_perplexity(ids_all, model.vocab_size),
    }


@torch.no_grad()
def encode_throughput(model: Tokenizer, images_u8: torch.Tensor, batch_size: int = 256, repeats: int = 5) -> float:
    """Images per second through ``encode`` at ``batch_size`` (median of ``repeats`` timed batches)."""
    x = images_u8[:batch_size].float() / 255.0
    if len(x) < batch_size:  # tile small eval sets so the batch size is what the figure says
        x = x.repeat(math.ceil(batch_size / max(len(x), 1)), 1, 1, 1)[:batch_size]
    model.encode(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.encode(x)
        times.append(time.perf_counter() - t0)
    return batch_size / float(np.median(times))


def save_recon_grid(model: Tokenizer, images_u8: torch.Tensor, path: str | Path, min_tile: int = 96) -> Path:
    """PNG with originals on the top row and their reconstructions (through the tokens) below."""
    recon = model.decode(model.encode(images_u8.float() / 255.0))  # [n, C, H, W] in [0, 1]
    orig = images_u8.float() / 255.0
    rows = torch.stack([orig, recon])  # [2, n, C, H, W]
    grid = (rows.clamp(0, 1) * 255).round().to(torch.uint8)
    grid = rearrange(grid, "r n c h w -> (r h) (n w) c").numpy()
    scale = max(1, math.ceil(min_tile / images_u8.shape[-1]))
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return Path(path)


# ---- helpers ------------------------------------------------------------------------------------


def _load_data(cfg: TokenizerTrainConfig, train_set, eval_set) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out images as ``uint8 [N, C, H, W]`` tensors. A source larger than
    ``max_memory_gib`` is subsampled evenly (the tokenizer sees at most steps x batch images anyway)."""
    size, ch = cfg.image_size or None, cfg.channels or None
    if train_set is None:
        from tokenizer.shards import open_source

        source = open_source(cfg.data, cfg.split, size, ch, cfg.on_error, cfg.limit or None, cfg.test_fraction,
                             cfg.test_source or None, cfg.unlabeled)
        size, ch = source.shape[0], source.channels
        fit = max(1, int(cfg.max_memory_gib * 2**30 // max(1, int(np.prod(source.shape)))))
        if len(source) > fit:
            print(f"tokenizer: {len(source)} training images exceed --max-memory-gib {cfg.max_memory_gib}; "
                  f"training on {fit} spread evenly over them")
            source = source.select(np.unique(np.linspace(0, len(source) - 1, fit).round().astype(np.int64)))
        train_set = source.load(cfg.progress)
    train = _to_nchw(train_set.images, "train")
    if cfg.limit:
        train = train[: cfg.limit]
    if eval_set is None and cfg.eval_split:
        from tokenizer.images import load_images

        eval_set = load_images(
            cfg.eval_data or cfg.data, split=cfg.eval_split, size=size, channels=ch, on_error=cfg.on_error,
            progress=cfg.progress,
            limit=cfg.max_eval_images or None, test_fraction=cfg.test_fraction,
            test_source=(cfg.test_source or None) if not cfg.eval_data else None,
        )
    if eval_set is not None:
        return train, _to_nchw(eval_set.images, "eval")
    n_hold = min(cfg.eval_holdout, len(train) // 2)
    if n_hold <= 0:
        raise ConfigError(f"eval_holdout={cfg.eval_holdout} with {len(train)} training images leaves nothing to evaluate.")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))
    return train[perm[n_hold:]], train[perm[:n_hold]]


def _to_nchw(images: np.ndarray, which: str) -> torch.Tensor:
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"{which} images must be uint8 [N, H, W, C]; got {arr.dtype} {arr.shape}.")
    # own copy: the source may be a read-only memmap/buffer, and training must not alias it
    return torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).contiguous()  # [N, C, H, W]


def _check_images(x: torch.Tensor, mcfg: TokenizerConfig, which: str) -> torch.Tensor:
    want = (mcfg.channels, mcfg.image_size, mcfg.image_size)
    if tuple(x.shape[1:]) != want:
        raise ConfigError(
            f"{which} images are {tuple(x.shape[1:])} (C, H, W) but the tokenizer expects {want}; "
            "set image_size/channels so load_images resizes them, or leave them 0 to follow the data."
        )
    if len(x) == 0:
        raise ConfigError(f"no {which} images were loaded; check the data source and split.")
    return x


def _save(ckpt: Checkpointer, cfg: TokenizerTrainConfig, model: Tokenizer, opt, step: int, elapsed_s: float,
          budget: StepBudget) -> None:
    def write(folder: Path) -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, folder / STATE_NAME)

    ckpt.save(step, write, {"elapsed_s": elapsed_s, "config": _run_identity(cfg),
                            "planned_steps": budget.steps if budget.fitted else None})


def _resume(cfg: TokenizerTrainConfig, ckpt: Checkpointer, model: Tokenizer, opt) -> tuple[int, float, int | None]:
    """(steps done, seconds already spent, planned step count) of the run in ``out_dir``; zeros when fresh."""
    found = ckpt.resume(required=(STATE_NAME,)) if cfg.resume else None
    if found is None:
        return 0, 0.0, None
    folder, state = found
    if state["config"] != _run_identity(cfg):
        changed = sorted(k for k in state["config"] if state["config"][k] != _run_identity(cfg).get(k))
        raise ConfigError(
            f"{folder} was written by a run with other settings ({', '.join(changed)} differ); "
            "use another out_dir, or pass resume=False (CLI: --no-resume) to start over."
        )
    saved = torch.load(folder / STATE_NAME, map_location=model.device, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    return int(state["step"]), float(state["elapsed_s"]), state.get("planned_steps")


def _run_identity(cfg: TokenizerTrainConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the state."""
    skip = {"out_dir", "progress", "resume", "checkpoint_every", "log_every", "eval_every", "recon_examples",
            "time_budget"}
    return {k: v for k, v in asdict(cfg).items() if k not in skip}


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: give comma-separated integers, e.g. '32,64,64'.") from None
