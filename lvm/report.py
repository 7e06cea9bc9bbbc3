"""Pictures and tables a person looks at: image grids, loss curves, label-efficiency plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_image_grid(
    rows: torch.Tensor, path: str | os.PathLike, separator_after: int | None = None, scale: int = 3, pad: int = 2
) -> Path:
    """Write ``rows`` ``[R, K, C, H, W]`` in [0, 1] as one PNG, upscaled so 28-pixel images are visible.

    ``separator_after`` draws a red bar after that many columns (e.g. prompt | continuations).
    """
    if rows.dim() != 5:
        raise ValueError(f"save_image_grid expects [R, K, C, H, W], got shape {tuple(rows.shape)}.")
    R, K, C, H, W = rows.shape
    cell_h, cell_w = H * scale + pad, W * scale + pad
    gap = 3 * pad if separator_after else 0
    canvas = np.full((R * cell_h + pad, K * cell_w + pad + gap, 3), 255, dtype=np.uint8)
    pixels = (rows.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for r in range(R):
        for k in range(K):
            img = pixels[r, k].transpose(1, 2, 0)  # [H, W, C]
            img = np.repeat(img, 3, axis=2) if C == 1 else img
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y = pad + r * cell_h
            x = pad + k * cell_w + (gap if separator_after and k >= separator_after else 0)
            canvas[y : y + H * scale, x : x + W * scale] = img
    if separator_after:
        x = pad + separator_after * cell_w + pad // 2
        canvas[:, x : x + gap - pad, :] = (200, 40, 40)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def plot_loss_curve(metrics_jsonl: str | os.PathLike, path: str | os.PathLike, unigram_entropy: float | None = None) -> Path:
    """Train and eval loss against step from a metrics.jsonl, with the unigram entropy as a floor line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", ls="--", label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
