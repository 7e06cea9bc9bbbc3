"""Flash attention: Triton forward/backward (to come), pure-PyTorch reference, and dispatch.

Shapes: q, k, v are ``[B, H, N, D]``; the output has the same shape as q.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention without materialising the [N, N] matrix on the Triton path."""
    path = resolve_backend(backend, q.device, "flash_attention")
    if path == "triton":
        raise NotImplementedError("Triton attention path not written yet")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Plain materialised attention, computed in the inputs' dtype: the twin tests compare against."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # [B, H, N, N]
    if causal:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)
