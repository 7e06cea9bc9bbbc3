"""Fused linear + cross-entropy against an fp64 truth written out from the definition.

Rule for every value (loss, d_hidden, d_weight, d_bias): our error is at most twice the error of
the naive same-dtype torch op (``linear_cross_entropy_reference``) plus a small tolerance, so the
fused paths are never worse than what they replace. Both paths run here: the chunked torch path
and the Triton kernel (under ``TRITON_INTERPRET=1`` on CPU, set by conftest).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import fused_linear_cross_entropy, linear_cross_entropy_reference
from kernels.cross_entropy import default_chunk_size, plain_linear_cross_entropy
from kernels.dispatch import triton_usable

IGNORE = -100
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_usable(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="Triton cannot run here (no CUDA and no TRITON_INTERPRET=1)"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


def truth(h, w, t, b=None, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """fp64 loss from the textbook formula, independent of the code under test."""
    logits = h.double() @ w.double().T + (0 if b is None else b.double())  # [N, V]
    logp = logits.log_softmax(dim=-1)
    valid = t != IGNORE
    nll = -logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = (1 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
    loss = (loss + z_loss * torch.logsumexp(logits, dim=-1) ** 2) * valid
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def make_inputs(n, d, v, dtype, bias, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d**0.5 * 3  # logits with std ~3: a peaked softmax
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    if ignore_frac < 1:
        t[0] = 1  # at least one valid token
    cast = lambda x: None if x is None else x.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return cast(h), cast(w), t.to(DEVICE), cast(b)


def loss_and_grads(fn, h, w, t, b, **kw):
    """Loss and (d_hidden, d_weight, d_bias) under a fixed random upstream gradient."""
    loss = fn(h, w, t, b, **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(loss, params, upstream.to(loss.device, loss.dtype))
    return loss, grads


def assert_no_worse_than_naive(h, w, t, b, backend, chunk_size=None, fn=fused_linear_cross_entropy, **kw):
    ours, g_ours = loss_and_grads(fn, h, w, t, b, backend=backend, chunk_size=chunk_size, **kw)
    naive, g_naive = loss_and_grads(linear_cross_entropy_reference, h, w, t, b, **kw)
    hd, wd, bd = (None if x is None else x.detach().double().requires_grad_() for x in (h, w, b))
    exact, g_exact = loss_and_grads(truth, hd, wd, t, bd, **kw)
    assert ours.dtype == torch.float32
    for name, a, n, e in zip(["loss", "d_hidden", "d_weight", "d_bias"], [ours, *g_ours], [naive, *g_naive],
                             [exact, *g_exact]):
        assert a.dtype == n.dtype, f"{name}: dtype {a.dtype} != input dtype {n.dtype}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err_ours = (a.double() - e).abs().max().item()
        err_naive = (n.double() - e).abs().max().item()
        atol = 1e-5 * (1 + e.abs().max().item())
        assert err_ours <= 2 * err_naive + atol, f"{name}: err {err_ours:.3g} vs naive {err_naive:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "n,v,bias,chunk",
    [(257, 1003, True, 100), (257, 8193, False, None), (1, 8193, True, None)],
    ids=["N257-V1003-bias-chunk100", "N257-V8193", "N1-V8193-bias"],
)
def test_matches_reference(backend, dtype, reduction, n, v, bias, chunk):
    h, w, t, b = make_inputs(n, 32 if v > 2000 else 64, v, dtype, bias)
    assert_no_worse_than_naive(h, w, t, b, backend, reduction=reduction, chunk_size=chunk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_and_z_loss(backend, reduction):
    h, w, t, b = make_inputs(130, 32, 1003, torch.float32, bias=True)
    assert_no_worse_than_naive(h, w, t, b, backend, reduction=reduction, chunk_size=64,
                               label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_grads(backend, reduction):
    h, w, t, b = make_inputs(37, 16, 1003, torch.float32, bias=True, ignore_frac=1.0)
    t[:] = IGNORE
    loss = fused_linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend, chunk_size=16)
    loss.sum().backward()
    assert torch.count_nonzero(loss) == 0 and torch.isfinite(loss).all()
    for x in (h, w, b):
        assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_get_no_gradient_and_do_not_count_in_mean(backend):
    h, w, t, b = make_inputs(40, 16, 1003, torch.float32, bias=False, ignore_frac=0.5)
    loss = fused_linear_cross_entropy(h, w, t, reduction="mean", backend=backend, chunk_size=7)
    loss.backward()
    ignored = t == IGNORE
    assert ignored.any() and (~ignored).any()
    assert torch.count_nonzero(h.grad[ignored]) == 0
    assert torch.count_nonzero(h.grad[~ignored].abs().sum(-1)) == (~ignored).sum()
    valid_only = truth(h[~ignored].detach(), w.detach(), t[~ignored])  # mean over valid tokens only
    torch.testing.assert_close(loss.double(), valid_only, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_for_hidden_only_and_no_grad_mode(backend):
    h, w, t, b = make_inputs(20, 16, 1003, torch.float32, bias=True)
    w, b = w.detach(), b.detach()
    fused_linear_cross_entropy(h, w, t, b, backend=backend).backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, t, b, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), truth(h.detach(), w, t, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [1003, 5000, -1])
def test_out_of_range_target_is_a_clear_error(bad):
    h, w, t, _ = make_inputs(8, 16, 1003, torch.float32, bias=False)
    t[3] = bad
    with pytest.raises(ValueError, match=rf"class id {bad} outside \[0, 1003\)"):
        fused_linear_cross_entropy(h, w, t, backend="torch")


def test_bad_shapes_and_arguments_name_the_argument():
    h, w, t, b = make_inputs(8, 16, 50, torch.float32, bias=True)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(h, w[:, :8], t)
    with pytest.raises(ValueError, match="target must be"):
        fused_linear_cross_entropy(h, w, t[:4])
    with pytest.raises(ValueError, match="integer class ids"):
        fused_linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear_cross_entropy(h, w, t, b[:10])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, t, backend="cuda")


def test_default_chunk_keeps_logits_buffer_near_64mb():
    assert default_chunk_size(4096, 65536) == 256  # 256 * 65536 * 4 B = 64 MiB
    assert default_chunk_size(10, 65536) == 10
    assert default_chunk_size(10**6, 10**9) == 1
    assert default_chunk_size(4096, 65536, on_gpu=True) == 1024  # GPU: 256 MiB chunks (the H200 sweep's pick)


def _plain(h, w, t, b=None, backend=None, chunk_size=None, **kw):
    return plain_linear_cross_entropy(h, w, t, b, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_path_for_small_vocabularies_meets_the_same_rule(reduction):
    """What backend="auto" runs on a GPU when the whole logits fit in one small chunk: as exact as naive, and
    every target ignored gives 0 (not NaN, as F.cross_entropy's mean would), like the fused paths."""
    h, w, t, b = make_inputs(37, 16, 1003, torch.float32, bias=True)
    assert_no_worse_than_naive(h, w, t, b, None, fn=_plain, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    h, w, t, b = make_inputs(37, 16, 1003, torch.float32, bias=True, ignore_frac=1.0)
    loss = plain_linear_cross_entropy(h, w, t, b, reduction=reduction)
    loss.sum().backward()
    assert torch.count_nonzero(loss) == 0 and torch.isfinite(loss).all()
    assert all(torch.count_nonzero(x.grad) == 0 for x in (h, w, b))


@pytest.mark.gpu
def test_gpu_auto_takes_the_plain_path_only_for_small_logits():
    h, w, t, b = make_inputs(512, 64, 1004, torch.bfloat16, bias=False)  # 2 MiB of fp32 logits
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, t), plain_linear_cross_entropy(h, w, t), rtol=0, atol=0)
    assert_no_worse_than_naive(h, w, t, b, "auto")
    assert_no_worse_than_naive(h, w, t, b, "triton")  # named outright: the kernel itself
    h, w, t, b = make_inputs(1024, 64, 32000, torch.bfloat16, bias=False)  # 125 MiB: the fused path
    assert_no_worse_than_naive(h, w, t, b, "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_matches_reference(dtype):
    h, w, t, b = make_inputs(1024, 256, 32000, dtype, bias=False)
    assert_no_worse_than_naive(h, w, t, b, "triton", reduction="mean")


@pytest.mark.slow
def test_peak_memory_is_an_eighth_of_naive():
    """Acceptance figure from the brief: N=4096, D=256, V=65536, forward + backward, peak RSS."""
    def peak(variant):
        out = subprocess.run(
            [sys.executable, "-m", "bench.ce_memory", "--variant", variant],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "LVM_KERNELS": "torch"},
        )
        assert out.returncode == 0, out.stderr
        return float(out.stdout.strip().splitlines()[-1].split()[-1])

    fused, naive = peak("fused"), peak("naive")
    assert naive > 1e9, f"naive peak {naive / 2**20:.0f} MiB looks too small to be the naive path"
    assert fused <= naive / 8, f"fused peak {fused / 2**20:.0f} MiB vs naive {naive / 2**20:.0f} MiB"
