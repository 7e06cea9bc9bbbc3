"""Sentence-aware attention (``segment_ids``): the Triton kernel and the torch path against each sentence alone.

The truth is attention computed on every sentence separately (sliced out, in fp64), so a test fails
if a token sees another sentence, misses part of its own, or the kernel skips a tile it needed.
Accuracy rule as in test_attention.py: max-abs error vs the fp64 truth at most twice what plain
torch makes in the same dtype (also per sentence), plus a small floor.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.dispatch as dispatch
from kernels.attention import attention_reference, attention_with_lse, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}
needs_triton = pytest.mark.skipif(not dispatch.triton_usable(torch.device(DEVICE)),
                                  reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")

# Interpreter tiles are 16 and 32 rows: lengths cover a 1-token sentence (first, inside, last),
# sentences longer than a tile (whole tiles without any mask), boundaries inside tiles, a ragged N,
# and a row that is one sentence. Each case gives the sentence lengths of its two rows.
CASES = [
    # (row lengths, D, causal, dtype)
    (([1, 20, 3, 40], [64]), 32, True, torch.float32),
    (([1, 20, 3, 40], [33, 31]), 32, False, torch.float32),
    (([5, 1, 50, 11], [16, 16, 34, 1]), 64, True, torch.float16),
    (([5, 1, 50, 11], [67]), 32, False, torch.float16),
    (([70, 1, 30], [2, 3, 96]), 16, True, torch.float32),
]


def _segment_ids(rows: tuple[list[int], ...], first_id: int = 0) -> torch.Tensor:
    """[B, N] ids from per-row sentence lengths; ids start at ``first_id + row`` and skip numbers (any increasing ids work)."""
    return torch.stack([
        torch.repeat_interleave(torch.arange(len(r)) * 3 + first_id + b, torch.tensor(r)) for b, r in enumerate(rows)
    ]).to(DEVICE)


def _per_sentence(fn, rows):
    """Run ``fn(q, k, v)`` on each sentence of each row on its own and put the outputs back in place."""
    def run(q, k, v):
        out_rows = []
        for b, lengths in enumerate(rows):
            starts = [sum(lengths[:i]) for i in range(len(lengths))]
            parts = [fn(*(z[b : b + 1, :, s : s + n] for z in (q, k, v))) for s, n in zip(starts, lengths)]
            out_rows.append(torch.cat(parts, dim=2))
        return torch.cat(out_rows, dim=0)
    return run


def _inputs(B, H, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype) for _ in range(4)]


def _fwd_bwd(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _check(rows, D, causal, dtype, backend):
    N = sum(rows[0])
    q, k, v, do = _inputs(len(rows), 2, N, D, dtype, seed=N + D)
    seg = _segment_ids(rows)
    ours = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend=backend, segment_ids=seg),
                    q, k, v, do)
    truth = _fwd_bwd(_per_sentence(lambda a, b, c: attention_reference(a, b, c, causal=causal), rows),
                     q.double(), k.double(), v.double(), do.double())
    plain = (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal)) if dtype == torch.float32 \
        else (lambda a, b, c: attention_reference(a, b, c, causal=causal))
    base = _fwd_bwd(_per_sentence(plain, rows), q, k, v, do)
    for name, mine, ref, same in zip(("out", "dq", "dk", "dv"), ours, truth, base):
        assert mine.dtype == dtype and mine.shape == q.shape, name
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        err, base_err = _max_err(mine, ref), _max_err(same, ref)
        assert err <= 2 * base_err + ATOL[dtype], f"{name}: err {err:.3e} vs torch {base_err:.3e}"


@needs_triton
@pytest.mark.parametrize("rows,D,causal,dtype", CASES)
def test_triton_equals_each_sentence_alone(rows, D, causal, dtype):
    _check(rows, D, causal, dtype, "triton")


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_equals_each_sentence_alone(causal):
    _check(([1, 20, 3, 40], [5, 59]), 48, causal, torch.float32, "torch")  # D=48: any head dim on the torch path


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_path_bf16_training_on_cpu(autocast):
    """The bf16 CPU training route (computed in fp32) keeps the sentence mask and the dtype."""
    rows = ([3, 30], [33])
    q, k, v, do = (x.cpu().bfloat16() for x in _inputs(2, 2, 33, 32, torch.float32, seed=4))
    seg = _segment_ids(rows).cpu()

    def ours(a, b, c):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return flash_attention(a, b, c, causal=True, backend="torch", segment_ids=seg)

    mine = _fwd_bwd(ours, q, k, v, do)
    truth = _fwd_bwd(_per_sentence(lambda a, b, c: attention_reference(a, b, c), rows),
                     q.double(), k.double(), v.double(), do.double())
    for name, m, ref in zip(("out", "dq", "dk", "dv"), mine, truth):
        assert m.dtype == torch.bfloat16, name
        assert _max_err(m, ref) < 3e-2, name  # bf16 rounding of the output (8 bits of mantissa)


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned sentence's own rows, not checked
@pytest.mark.parametrize("causal", [True, False])
def test_key_tiles_of_other_sentences_are_never_read(causal):
    """Sentences on 64-token (whole tile) boundaries: NaN keys/values in one sentence cannot reach another.

    A tile that were merely masked would still multiply 0 * NaN = NaN into the output, so this
    fails unless the kernels skip other sentences' tiles in the forward and both backward kernels.
    """
    q, k, v, do = _inputs(1, 2, 128, 32, torch.float32, seed=7)
    seg = _segment_ids(([64, 64],))
    poisoned, clean = (slice(0, 64), slice(64, 128)) if causal else (slice(64, 128), slice(0, 64))
    k, v = k.clone(), v.clone()
    k[:, :, poisoned], v[:, :, poisoned] = float("nan"), float("nan")
    out, dq, dk, dv = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="triton",
                                                                segment_ids=seg), q, k, v, do)
    alone = _fwd_bwd(lambda a, b, c: attention_reference(a, b, c, causal=causal),
                     *(z[:, :, clean] for z in (q, k, v, do)))
    for name, mine, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), alone):
        torch.testing.assert_close(mine[:, :, clean], ref, atol=1e-5, rtol=1e-5, msg=name)


@needs_triton
def test_lse_with_segments_is_each_sentence_logsumexp():
    rows = ([7, 26], [1, 32])
    q, k, v, _ = _inputs(2, 1, 33, 32, torch.float32, seed=5)
    _, lse = attention_with_lse(q, k, v, causal=True, segment_ids=_segment_ids(rows))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 32 ** 0.5
    same = _segment_ids(rows)[:, None, :, None] == _segment_ids(rows)[:, None, None, :]
    scores = scores.masked_fill(~(same & torch.ones(33, 33, dtype=torch.bool, device=q.device).tril()), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bad_segment_ids_are_rejected_by_name(backend):
    q = torch.randn(2, 1, 8, 32, device=DEVICE)
    good = torch.zeros(2, 8, dtype=torch.long, device=DEVICE)
    for bad, why in [
        (good[:, :7], r"\[B, N\] = \[2, 8\]"),
        (good[0], r"\[B, N\]"),
        (good.float(), "integers"),
    ] + ([(torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]] * 2), "non-decreasing")] if DEVICE == "cpu" else []):
        # the order check reads values, a host sync per call on a GPU: it runs on CPU only (see the docstring)
        with pytest.raises(ValueError, match="segment_ids") as info:
            flash_attention(q, q, q, backend=backend, segment_ids=bad)
        assert info.match(why)
    flash_attention(q, q, q, backend=backend, segment_ids=good)  # the good one passes
