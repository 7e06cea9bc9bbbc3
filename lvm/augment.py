"""Image augmentation shared by the supervised baseline and fine-tuning: flips and small translations.

Fine-tuning reads token ids, not pixels, so its augmented images are drawn once and tokenized
(``augmented_views``): a few views per image cost one tokenizer pass each (~2k images/s on 2 cores),
far less than re-encoding every batch, and the same views serve every epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tokenizer.model import Tokenizer


def default_pad(side: int) -> int:
    """Translation range in pixels: about 1/8 of the side, within 2..4 (4 px at 28 px, as for CIFAR's 32)."""
    return min(4, max(2, round(side / 8)))


def augment(x: torch.Tensor, flip: bool, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and translations of ``x`` [B, C, H, W]: edge-replicate ``pad`` px, crop back."""
    b, _, h, w = x.shape
    if flip:
        x = torch.where((torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1), x.flip(3), x)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # [B, C, H + 2p, W + 2p]
        dy, dx = (torch.randint(0, 2 * pad + 1, (b,), generator=gen) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
        x = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    return x


def augmented_views(tok: "Tokenizer", images: np.ndarray, views: int, flip: bool = True, pad: int | None = None,
                    seed: int = 0, batch_size: int = 1024) -> torch.Tensor:
    """Token ids ``[V, N, h*w]`` of ``views`` randomly flipped / translated copies of uint8 ``images [N, H, W, C]``."""
    if views < 1:
        raise ValueError(f"augmented_views: views={views} must be >= 1.")
    pad = default_pad(max(images.shape[1:3])) if pad is None else pad
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(views):
        ids = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
            x = augment(x.float() / 255, flip, pad, gen)
            pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            ids.append(tok.encode(pixels).reshape(len(pixels), -1).long())
        out.append(torch.cat(ids))
    return torch.stack(out)  # [V, N, h*w]


def mirror_images(images: np.ndarray) -> np.ndarray:
    """Every image of ``[N, H, W, C]`` mirrored left-right, contiguous (tokenizers and pixel readers take it as is)."""
    return np.ascontiguousarray(images[:, :, ::-1])


def mirrored_view(tok: "Tokenizer", images: np.ndarray) -> torch.Tensor:
    """Token ids ``[1, N, h*w]`` of every image mirrored left-right."""
    return tok.encode(mirror_images(images)).reshape(len(images), -1).long()[None]


def token_views(tok: "Tokenizer", images: np.ndarray, views: int = 0, flip: bool = True, seed: int = 0
                ) -> torch.Tensor | None:
    """Fine-tuning's extra views of ``images`` as token ids ``[V, N, h*w]``: ``views`` random flips and
    translations when ``views > 0``, else the mirror image alone when ``flip``, else None (no augmentation)."""
    if views:
        return augmented_views(tok, images, views, flip=flip, seed=seed)
    return mirrored_view(tok, images) if flip else None
