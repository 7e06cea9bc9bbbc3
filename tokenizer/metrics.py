"""How good a tokenizer is: reconstruction fidelity (PSNR) and how much of its vocabulary it uses.

A tokenizer that reconstructs well but uses a handful of codes gives the LVM a poor vocabulary,
so we always report usage and perplexity next to PSNR.
"""
from __future__ import annotations

import math

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Dataset-level PSNR in dB from the mean squared error over all pixels of all images."""
    _check_same_shape(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of each image ``[B, ...] -> [B]`` (dB); its mean is the figure many papers quote."""
    _check_same_shape(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def code_histogram(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Count of each id ``[vocab_size]``; ids outside ``[0, vocab_size)`` are an error."""
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"ids range [{int(flat.min())}, {int(flat.max())}] is outside [0, {vocab_size}) (vocab_size).")
    return torch.bincount(flat, minlength=vocab_size)


def codebook_usage(ids: torch.Tensor, vocab_size: int) -> float:
    """Fraction of the vocabulary that occurs at least once in ``ids`` (0..1)."""
    return (code_histogram(ids, vocab_size) > 0).sum().item() / vocab_size


def code_perplexity(ids: torch.Tensor, vocab_size: int) -> float:
    """exp(entropy) of the code distribution: the effective number of codes in use (1..vocab_size)."""
    counts = code_histogram(ids, vocab_size).double()
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"pred shape {tuple(a.shape)} != target shape {tuple(b.shape)}.")
