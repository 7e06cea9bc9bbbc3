"""pytest-benchmark: fused linear + cross-entropy vs naive logits + F.cross_entropy, same run.

    pytest bench/test_bench_cross_entropy.py --benchmark-group-by=param:shape

Shapes are small on CPU (absolute CPU times mean little; compare the two rows of a group) and
LM-head sized in bf16 on CUDA. The fused row uses whatever ``backend="auto"`` picks here.
"""
from __future__ import annotations

import pytest
import torch

from kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (N tokens, D hidden, V vocab)
SHAPES = [(4096, 1024, 16384), (4096, 2048, 65536)] if CUDA else [(512, 128, 8192), (1024, 256, 16384)]
VARIANTS = {"fused": fused_linear_cross_entropy, "naive": linear_cross_entropy_reference}


def _inputs(n: int, d: int, v: int):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(DEVICE, DTYPE).requires_grad_()  # [N, D]
    w = (torch.randn(v, d, generator=g) / d**0.5).to(DEVICE, DTYPE).requires_grad_()  # [V, D]
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)  # [N]
    return h, w, t


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}".format(*s))
def test_ce_forward(benchmark, shape, variant):
    h, w, t = _inputs(*shape)
    fn = VARIANTS[variant]

    def run():
        with torch.no_grad():
            out = fn(h, w, t)
        _sync()
        return out

    loss = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}".format(*s))
def test_ce_forward_backward(benchmark, shape, variant):
    h, w, t = _inputs(*shape)
    fn = VARIANTS[variant]

    def run():
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        _sync()
        return loss

    loss = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
