"""The visual tokenizer: a small conv autoencoder whose bottleneck is a discrete code grid.

Images ``[B, C, H, W]`` in ``[0, 1]`` go through a conv encoder (residual blocks, GroupNorm,
SiLU, stride-2 downsamplings) to a latent grid ``[B, D, h, w]``; a quantizer from
vector-quantize-pytorch turns each cell into one of ``vocab_size`` ids. FSQ is the default
because its implicit codebook cannot collapse; VQ (k-means init, dead-code replacement) is
there for comparison. The ids are the LVM's vocabulary, so ``encode``/``decode`` are the API.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from safetensors.torch import load_file, save_file
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from tokenizer.atomic import atomic_path, write_json_atomic

WEIGHTS_NAME = "tokenizer.safetensors"
CONFIG_NAME = "tokenizer.json"
FORMAT_VERSION = 1
QUANTIZERS = ("fsq", "vq")


class TokenizerError(ValueError):
    """A tokenizer config or folder that cannot be used; the message names it and the fix."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """A tokenizer folder without its files; also a FileNotFoundError for callers that catch that."""


@dataclass
class TokenizerConfig:
    """Architecture of the tokenizer; the defaults turn 28x28 grey images into 7x7 ids of 1000 codes."""

    image_size: int = 28
    channels: int = 1
    # Pixels are first folded patch x patch into channels (space-to-depth): a cheap first 2x that
    # keeps every pixel, so no conv ever runs at full resolution (the costliest place on CPU).
    patch_size: int = 2
    # Channel width at each resolution after patching, finest first; len(widths) - 1 stride-2 downsamplings.
    widths: tuple[int, ...] = (64, 64)
    blocks_per_level: int = 1  # residual blocks at each resolution, in encoder and decoder
    quantizer: str = "fsq"  # "fsq" | "vq"
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ: vocab = prod(levels)
    codebook_size: int = 1024  # VQ only
    code_dim: int = 16  # VQ only: latent channels per grid cell
    vq_dead_code_threshold: float = 2.0  # VQ: codes with EMA usage below this are re-seeded
    vq_commitment_weight: float = 0.25  # VQ: weight of the commitment loss

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.fsq_levels = tuple(int(x) for x in self.fsq_levels)
        if self.quantizer not in QUANTIZERS:
            raise TokenizerError(f"TokenizerConfig.quantizer={self.quantizer!r}; pick one of {QUANTIZERS}.")
        if self.channels not in (1, 3):
            raise TokenizerError(f"TokenizerConfig.channels={self.channels}; use 1 (grey) or 3 (RGB).")
        if not self.widths or any(w <= 0 for w in self.widths):
            raise TokenizerError(f"TokenizerConfig.widths={self.widths}; give one positive width per resolution.")
        if self.patch_size < 1:
            raise TokenizerError(f"TokenizerConfig.patch_size={self.patch_size}; use 1 (no patching) or more.")
        factor = self.patch_size * 2**self.downsamplings
        if self.image_size % factor:
            raise TokenizerError(
                f"TokenizerConfig.image_size={self.image_size} is not divisible by patch_size * 2**downsamplings = "
                f"{self.patch_size} * 2**{self.downsamplings} = {factor}; change image_size, patch_size or the "
                "number of widths."
            )
        if self.quantizer == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 2):
            raise TokenizerError(f"TokenizerConfig.fsq_levels={self.fsq_levels}; each level must be >= 2.")

    @property
    def downsamplings(self) -> int:
        return len(self.widths) - 1

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // (self.patch_size * 2**self.downsamplings)
        return side, side

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.code_dim

    @property
    def vocab_size(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["fsq_levels"] = list(self.widths), list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TokenizerError(f"unknown TokenizerConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**d)


MAX_AUTO_GRID = 8  # tokens per side chosen by default: 7x7 for 28 px, 8x8 from 32 to 256 px


def auto_layout(image_size: int, grid: int = 0) -> tuple[int, int]:
    """``(patch_size, downsamplings)`` giving a ``grid x grid`` token grid (``grid=0``: the finest grid
    of at most MAX_AUTO_GRID per side). Patching takes the first 2-4x (cheap on CPU: no conv at full
    resolution), stride-2 levels the rest."""
    if grid:
        factor = image_size // grid
        if grid < 1 or image_size % grid or factor & (factor - 1):
            raise TokenizerError(
                f"a {grid}x{grid} token grid needs image_size / grid to be a power of two; {image_size} px "
                f"/ {grid} is not. Pick another --grid or --image-size."
            )
    else:
        fits = [f for f in (2, 4, 8, 16, 32, 64) if image_size % f == 0 and image_size // f <= MAX_AUTO_GRID]
        powers = [f for f in (1, 2, 4, 8, 16, 32) if image_size % f == 0]
        factor = fits[0] if fits else powers[-1]
    patch = factor if factor < 4 else min(factor // 2, 4)
    return patch, int(math.log2(factor // patch))


class Tokenizer(nn.Module):
    """Conv autoencoder with a discrete bottleneck; ``encode``/``decode`` map images <-> id grids."""

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TokenizerConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "fsq":
            self.quantizer = FSQ(levels=list(config.fsq_levels), dim=config.latent_dim)
        else:
            self.quantizer = VectorQuantize(
                dim=config.latent_dim,
                codebook_size=config.codebook_size,
                kmeans_init=True,
                threshold_ema_dead_code=config.vq_dead_code_threshold,
                commitment_weight=config.vq_commitment_weight,
            )

    # ---- public API -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on ``[B, C, H, W]`` in [0, 1]: (reconstruction in [-1, 1] space, ids, aux loss)."""
        z = self.encoder(x * 2 - 1)  # [B, D, h, w]
        zq, ids, aux = self._quantize(z)
        return self.decoder(zq), ids, aux

    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Images -> token ids ``LongTensor[B, h, w]`` (on CPU), deterministic (eval mode, no grad)."""
        x = self._as_input(images)
        was_training = self.training
        self.eval()
        try:
            out = []
            for chunk in x.split(batch_size):
                out.append(self.encode_pixels(chunk.to(self.device, torch.float32)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, *self.grid, dtype=torch.long)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """float ``[B, C, H, W]`` in [0, 1], on the tokenizer's device -> ids ``long [B, h, w]``: ``encode``'s
        core without its batching, device moves, mode switch or no-grad, so that it traces into an exported
        graph (``lvm.classifier.Classifier.forward``) as the very step ``encode`` runs."""
        return self._quantize(self.encoder(pixels.float() * 2 - 1))[1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Token ids ``[B, h, w]`` -> images ``float32 [B, C, H, W]`` in [0, 1] (on CPU)."""
        ids = self._as_ids(ids)
        was_training = self.training
        self.eval()
        try:
            out = [self._decode_ids(chunk.to(self.device)).cpu() for chunk in ids.split(batch_size)]
        finally:
            self.train(was_training)
        c, s = self.config.channels, self.config.image_size
        return torch.cat(out) if out else torch.empty(0, c, s, s)

    @property
    def fingerprint(self) -> str:
        """Short sha256 of config + weights, so token shards can be checked against their tokenizer."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.safetensors`` + ``tokenizer.json``, each atomically (a crash leaves no half file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "vocab_size": self.vocab_size,
            "image_size": self.config.image_size,
            "channels": self.config.channels,
            "grid": list(self.grid),
            # encode() takes [0, 1] floats (or uint8 / 255); the network sees (x - mean) / std.
            "normalisation": {"input_range": [0.0, 1.0], "mean": 0.5, "std": 0.5},
            "fingerprint": self.fingerprint,
        }
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": meta["fingerprint"]})
        write_json_atomic(directory / CONFIG_NAME, meta)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Tokenizer":
        """Load a tokenizer written by ``save_pretrained``; checks the stored fingerprint."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise TokenizerNotFound(
                    f"{directory / name} not found; point to a directory written by Tokenizer.save_pretrained "
                    f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME}), e.g. the --out-dir of 'lvm tokenizer-train'."
                )
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text())
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{directory / CONFIG_NAME} is not valid JSON ({err}); re-save the tokenizer.") from err
        if not isinstance(meta, dict) or "config" not in meta:
            raise TokenizerError(f"{directory / CONFIG_NAME} has no 'config' entry; re-save the tokenizer.")
        try:
            config = TokenizerConfig.from_dict(meta["config"])
        except TokenizerError as err:
            raise TokenizerError(f"{directory / CONFIG_NAME}: {err}") from err
        model = cls(config)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TokenizerError(
                f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: missing {missing}, "
                f"unexpected {unexpected}; the two files come from different tokenizers."
            )
        model.to(map_location).eval()
        stored = meta.get("fingerprint")
        if stored is not None and stored != model.fingerprint:
            raise TokenizerError(
                f"fingerprint in {directory / CONFIG_NAME} ({stored}) does not match the weights "
                f"({model.fingerprint}); the files were modified or mixed up. Re-save the tokenizer."
            )
        return model

    # ---- helpers ----------------------------------------------------------------------------

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z [B, D, h, w]`` -> (quantised ``[B, D, h, w]``, ids ``long [B, h, w]``, aux loss)."""
        h, w = z.shape[-2:]
        seq = rearrange(z, "b d h w -> b (h w) d")
        if self.config.quantizer == "fsq":
            q, ids = self.quantizer(seq)
            aux = seq.new_zeros(())
        else:
            q, ids, aux = self.quantizer(seq)
        q = rearrange(q, "b (h w) d -> b d h w", h=h, w=w)
        ids = rearrange(ids.long(), "b (h w) -> b h w", h=h, w=w)
        return q, ids, aux.sum()

    def _decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        h, w = ids.shape[-2:]
        flat = rearrange(ids, "b h w -> b (h w)")
        if self.config.quantizer == "fsq":
            q = self.quantizer.indices_to_codes(flat)
        else:
            q = self.quantizer.get_output_from_indices(flat)
        q = rearrange(q, "b (h w) d -> b d h w", h=h, w=w)  # [B, D, h, w]
        return ((self.decoder(q) + 1) / 2).clamp(0, 1)

    def _as_input(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Accept float ``[B, C, H, W]`` in [0, 1] or uint8 numpy ``[B, H, W, C]`` (``[B, H, W]`` if grey)."""
        c, s = self.config.channels, self.config.image_size
        if isinstance(images, np.ndarray):
            if images.ndim == 3 and c == 1:
                images = images[..., None]
            if images.ndim != 4:
                raise ValueError(f"encode: numpy images must be [B, H, W, C]; got shape {images.shape}.")
            if images.dtype != np.uint8:
                raise ValueError(
                    f"encode: numpy images must be uint8 [B, H, W, C]; got dtype {images.dtype}. "
                    "Pass a float torch tensor [B, C, H, W] in [0, 1] instead for float data."
                )
            got = (images.shape[3], images.shape[1], images.shape[2])
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        elif isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"encode: tensor images must be [B, C, H, W]; got shape {tuple(images.shape)}.")
            if images.dtype == torch.uint8:
                x = images.float() / 255.0
            elif images.is_floating_point():
                x = images
            else:
                raise ValueError(f"encode: tensor images must be float in [0, 1] or uint8; got {images.dtype}.")
            got = (images.shape[1], images.shape[2], images.shape[3])
        else:
            raise TypeError(f"encode: expected a torch.Tensor or numpy array, got {type(images).__name__}.")
        if got != (c, s, s):
            raise ValueError(
                f"encode: this tokenizer expects {c} channel(s) at {s}x{s}; got {got[0]} channel(s) at "
                f"{got[1]}x{got[2]}. Resize/convert the images first (e.g. load_images(..., size={s}, channels={c}))."
            )
        return x

    def _as_ids(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"decode: ids must be an integer tensor [B, h, w]; got dtype {ids.dtype}.")
        if ids.ndim != 3 or tuple(ids.shape[1:]) != self.grid:
            raise ValueError(f"decode: ids must be [B, {self.grid[0]}, {self.grid[1]}]; got shape {tuple(ids.shape)}.")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"decode: ids must lie in [0, {self.vocab_size}) (vocab_size); got range "
                f"[{int(ids.min())}, {int(ids.max())}]. Strip special tokens (BOS/SEP/EOS) before decoding."
            )
        return ids


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


class ResBlock(nn.Module):
    """Pre-norm residual conv block; keeps resolution and width."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """``[B, C, H, W]`` in [-1, 1] -> latent ``[B, D, h, w]``, h = H / (patch_size * 2**downsamplings)."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        w, p = cfg.widths, cfg.patch_size
        layers: list[nn.Module] = [
            Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p),  # [B, C*p*p, H/p, W/p]
            nn.Conv2d(cfg.channels * p * p, w[0], 3, padding=1),
        ]
        for i, ch in enumerate(w):
            layers += [ResBlock(ch) for _ in range(cfg.blocks_per_level)]
            if i + 1 < len(w):
                layers.append(nn.Conv2d(ch, w[i + 1], 3, stride=2, padding=1))  # halves H, W
        layers += [_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv: no checkerboard artefacts from transposed convs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Quantised latent ``[B, D, h, w]`` -> image ``[B, C, H, W]`` in (roughly) [-1, 1]."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        w = cfg.widths[::-1]  # coarsest first
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, w[0], 3, padding=1)]
        for i, ch in enumerate(w):
            layers += [ResBlock(ch) for _ in range(cfg.blocks_per_level)]
            if i + 1 < len(w):
                layers.append(Upsample(ch, w[i + 1]))  # doubles H, W
        p = cfg.patch_size
        layers += [
            _norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.channels * p * p, 3, padding=1),
            Rearrange("b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p),  # [B, C, H, W]
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
