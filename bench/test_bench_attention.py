"""pytest-benchmark: our flash attention vs SDPA vs the naive materialised twin, fwd and fwd+bwd.

    pytest bench/test_bench_attention.py --benchmark-only --benchmark-group-by=param:shape,func
    TRITON_INTERPRET=1 pytest bench/test_bench_attention.py --benchmark-only   # CPU: ours via interpreter

On CUDA the shapes are model sized in bf16 and each row carries its TFLOP/s (``extra_info``), so a
figure reads as a fraction of the card's peak. On CPU the shapes are tiny and "ours" runs only
under the Triton interpreter (its times measure Python, not the kernel); without it the row skips.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import attention_flops, attention_reference, flash_attention
from kernels.dispatch import triton_usable

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (B, H, N, D, causal)
SHAPES = (
    [(8, 16, 1024, 64, True), (4, 16, 2048, 128, True), (4, 16, 2048, 64, False)]
    if CUDA
    else [(1, 2, 64, 32, True), (1, 2, 128, 64, False)]
)
VARIANTS = {
    "ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, backend="triton"),
    "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "naive": lambda q, k, v, causal: attention_reference(q, k, v, causal=causal),
}


def _shape_id(s) -> str:
    return "B{}-H{}-N{}-D{}-{}".format(*s[:4], "causal" if s[4] else "full")


def _inputs(B: int, H: int, N: int, D: int):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g).to(DEVICE, DTYPE) for _ in range(4))  # [B, H, N, D]
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _skip_unless_runnable(variant: str) -> None:
    if variant == "ours" and not triton_usable(DEVICE):
        pytest.skip("Triton cannot run here: needs CUDA, or TRITON_INTERPRET=1 set before the run on CPU")


def _record(benchmark, shape, mode: str) -> None:
    B, H, N, D, causal = shape
    flops = attention_flops(B, H, N, D, causal, mode)
    benchmark.extra_info["flops"] = flops
    if benchmark.stats is not None and benchmark.stats.stats.median > 0:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_attention_forward(benchmark, shape, variant):
    _skip_unless_runnable(variant)
    q, k, v, _ = _inputs(*shape[:4])
    fn = VARIANTS[variant]

    def run():
        with torch.no_grad():
            out = fn(q, k, v, shape[4])
        _sync()
        return out

    out = benchmark.pedantic(run, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=1)
    _record(benchmark, shape, "fwd")
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_attention_forward_backward(benchmark, shape, variant):
    _skip_unless_runnable(variant)
    q, k, v, do = _inputs(*shape[:4])
    fn = VARIANTS[variant]

    def run():
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v, shape[4])
        out.backward(do)
        _sync()
        return out

    out = benchmark.pedantic(run, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=1)
    _record(benchmark, shape, "fwd_bwd")
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
