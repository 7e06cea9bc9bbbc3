"""Flash attention: Triton forward/backward kernels, their autograd wiring, a PyTorch twin, dispatch.

Shapes: q, k, v are ``[B, H, N, D]``; the output has the same shape as q. The Triton path is
FlashAttention-2: one program per (query tile, batch*head) streams over K/V tiles with an online
softmax, so the ``[N, N]`` score matrix never exists in memory; it saves the row log-sum-exp
(fp32, ``[B, H, N]``) so the backward can recompute probabilities instead of storing them.

FLOP model (what benchmarks divide by): the forward is two matmuls of ``2*N*N*D`` each per head,
``4*B*H*N^2*D`` in all, half of it when causal; the backward does five such matmuls (recomputed
QK^T, dV, dP, dQ, dK), i.e. 2.5x the forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.dispatch import HAS_TRITON, resolve_backend

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634  # log2(e): folded into the scale so the kernels can use exp2


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention without materialising the [N, N] matrix on the Triton path.

    ``segment_ids`` [B, N] (integers, non-decreasing along N) packs several sentences into one
    row: a token attends only to tokens of its own sentence, so packed rows need no padding.
    Shape, dtype and device are always checked; the order only on CPU (reading values would cost a
    host sync per call on a GPU), so GPU callers must build the ids in order, as the model does.
    """
    path = resolve_backend(backend, q.device, "flash_attention")
    if segment_ids is not None:
        _check_segment_ids(segment_ids, q)
    if path == "triton":
        _check_inputs(q, k, v)
        scale = _check_scale(q, scale)
        seg_start, seg_end = segment_bounds(segment_ids) if segment_ids is not None else (None, None)
        # contiguous here, not inside the op, so the forward and the saved tensors share one copy
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, _ = torch.ops.lvm.flash_attn_fwd(q, k, v, seg_start, seg_end, bool(causal), scale)
        return o
    return _torch_attention(q, k, v, causal, scale, segment_ids)


def segment_bounds(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the first index of its sentence and one past the last: ``[B, N]`` int32 each.

    The kernels use the start index as the sentence's id (equal starts = same sentence) and the
    two bounds of a tile's first and last rows as the only tiles worth visiting. Built with
    searchsorted on the sorted rows, so there is no host sync and torch.compile can trace it.
    """
    s = segment_ids.contiguous()
    start = torch.searchsorted(s, s, right=False)  # [B, N]
    end = torch.searchsorted(s, s, right=True)  # [B, N]
    return start.to(torch.int32), end.to(torch.int32)


def _torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA (with a boolean sentence mask for ``segment_ids``), except bf16 training on CPU, which runs in fp32.

    PyTorch's CPU flash-attention backward is ~3x slower in bf16 than in fp32 (torch 2.13, 51-token
    rows: 66 vs 22 ms fwd+bwd for 8k tokens x 4 heads), while its bf16 forward is the faster one;
    so only the differentiable CPU case is upcast, and the result comes back in the input dtype.
    """
    mask = None if segment_ids is None else segment_mask(segment_ids, causal, q.shape[-2], k.shape[-2])
    is_causal = causal and mask is None
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
    ):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal,
                                               scale=scale)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def segment_mask(segment_ids: torch.Tensor, causal: bool, n_q: int, n_k: int) -> torch.Tensor:
    """Boolean ``[B, 1, N, N]`` "may attend" mask: same sentence (and, if causal, not a later key)."""
    same = rearrange(segment_ids, "b q -> b 1 q 1") == rearrange(segment_ids, "b k -> b 1 1 k")
    if causal:
        same = same & torch.ones(n_q, n_k, dtype=torch.bool, device=segment_ids.device).tril(n_k - n_q)
    return same


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain materialised attention, computed in the inputs' dtype: the twin tests compare against."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # [B, H, N, N]
    n_q, n_k = scores.shape[-2:]
    if segment_ids is not None:
        scores = scores.masked_fill(~segment_mask(segment_ids, causal, n_q, n_k), float("-inf"))
    elif causal:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)


def attention_flops(B: int, H: int, N: int, D: int, causal: bool, mode: str = "fwd") -> float:
    """Useful FLOPs of one attention call, so timings can be read as a fraction of peak."""
    fwd = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
    factors = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factors:
        raise ValueError(f"attention_flops: mode={mode!r} is not one of {tuple(factors)}.")
    return fwd * factors[mode]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward that also returns the natural-log LSE ``[B, H, N]`` (fp32); no autograd."""
    _check_inputs(q, k, v)
    scale = _check_scale(q, scale)
    bounds = (None, None)
    if segment_ids is not None:
        _check_segment_ids(segment_ids, q)
        bounds = segment_bounds(segment_ids)
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), *bounds, causal, scale)


# --------------------------------------------------------------------------------------------
# Input checks and tile choice
# --------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Reject what the kernels cannot do, where it enters, with the fix named."""
    if q.dim() != 4:
        raise ValueError(f"flash_attention: q must be [B, H, N, D], got shape {tuple(q.shape)}.")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "flash_attention (triton): q, k, v must have the same [B, H, N, D] shape (self-attention, "
            f"N_q == N_k); got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}. "
            "Use backend='torch' for cross-attention or differing value dims."
        )
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash_attention (triton): head dim D={D} is not supported; use one of "
            f"{SUPPORTED_HEAD_DIMS} (e.g. change n_embd / n_head) or pass backend='torch'."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one.")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention (triton): dtype {q.dtype} unsupported; use float32, float16 or bfloat16.")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise ValueError(
            "flash_attention (triton): bfloat16 is wrong under the Triton CPU interpreter (its bf16 dot "
            "is broken); use float32/float16 on CPU, or backend='torch'."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v live on different devices ({q.device}, {k.device}, {v.device}).")


def _check_scale(q: torch.Tensor, scale: float | None) -> float:
    """The kernels take the row max of unscaled scores, which is only the max of scaled ones if scale > 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"flash_attention (triton): scale={scale} must be > 0; use backend='torch' otherwise.")
    return scale


def _check_segment_ids(segment_ids: torch.Tensor, q: torch.Tensor) -> None:
    """segment_ids must be integer [B, N] on q's device and non-decreasing (each sentence contiguous)."""
    B, N = q.shape[0], q.shape[-2]
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != (B, N):
        shape = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        raise ValueError(f"flash_attention: segment_ids must be a [B, N] = [{B}, {N}] tensor (one sentence id per "
                         f"token), got {shape}.")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise ValueError(f"flash_attention: segment_ids must hold integers, got dtype {segment_ids.dtype}; use .long().")
    if segment_ids.device != q.device:
        raise ValueError(f"flash_attention: segment_ids is on {segment_ids.device} but q is on {q.device}; move it.")
    if torch.compiler.is_compiling() or segment_ids.device.type != "cpu":
        return  # the value check below is data-dependent: a host sync on GPU, a graph break under compile
    if N > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
        raise ValueError(
            "flash_attention: segment_ids must be non-decreasing along N (each sentence one contiguous run of "
            "tokens); number the sentences of a row 0, 0, 1, 1, 1, 2, ... in order."
        )


@dataclass(frozen=True)
class _Tiles:
    """Tile sizes and launch knobs for one kernel; BLOCK_M rows of queries, BLOCK_N rows of keys."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# GPU tiles for half types are the winners of bench.kernel_tiles on an H200 (bench/results/
# tiles-nvidia-h200.md, causal, N = 512 and 4096): where two candidates were within noise, the
# one that also won at the model's own N = 512 was kept.


def _fwd_tiles(D: int, dtype: torch.dtype, on_gpu: bool) -> _Tiles:
    """Forward tiles: a query tile at least as wide as the K/V tile (BLOCK_M % BLOCK_N == 0)."""
    if not on_gpu:  # interpreter: few, mid-sized programs are what runs fastest under numpy
        return _Tiles(32, 16)
    if dtype == torch.float32:  # 4-byte tiles: halve them to stay inside shared memory
        return _Tiles(64, 32, num_warps=4, num_stages=2)
    if D <= 64:
        return _Tiles(128, 64, num_warps=4, num_stages=4)
    return _Tiles(64, 64, num_warps=4, num_stages=3)


def _dq_tiles(D: int, dtype: torch.dtype, on_gpu: bool) -> _Tiles:
    """dQ kernel tiles: a query tile held in registers, K/V streamed (BLOCK_M % BLOCK_N == 0)."""
    if not on_gpu:
        return _Tiles(32, 16)
    if dtype == torch.float32:
        return _Tiles(64, 32, num_warps=4, num_stages=2)
    if D <= 64:
        return _Tiles(128, 32, num_warps=4, num_stages=3)
    return _Tiles(128, 64, num_warps=8, num_stages=3)


def _dkdv_tiles(D: int, dtype: torch.dtype, on_gpu: bool) -> _Tiles:
    """dK/dV kernel tiles: a K/V tile held, queries streamed (BLOCK_N % BLOCK_M == 0)."""
    if not on_gpu:
        return _Tiles(16, 32)
    if dtype == torch.float32:
        return _Tiles(16, 64, num_warps=4, num_stages=2)
    if D <= 64:
        return _Tiles(64, 64, num_warps=4, num_stages=3)
    return _Tiles(64, 128, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 dots (SDPA's fp32 is not TF32 either); half types use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# Autograd wiring
# --------------------------------------------------------------------------------------------


# Custom operators (torch.library): torch.compile sees one opaque node per kernel call instead of
# tracing into Python launch code, so a compiled model runs through our kernels without graph
# breaks. The fake (meta) functions give output shapes; register_autograd wires the backward op.


@torch.library.custom_op("lvm::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor | None, seg_end: torch.Tensor | None,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, N, D], lse [B, H, N] fp32) from the Triton forward; q, k, v arrive contiguous."""
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), seg_start, seg_end, causal, scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, seg_start, seg_end, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lvm::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    seg_start: torch.Tensor | None, seg_end: torch.Tensor | None, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the Triton backward; P is recomputed tile by tile from the saved LSE."""
    return _backward(do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), o, lse, seg_start, seg_end,
                     causal, scale)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, seg_start, seg_end, causal, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _flash_attn_setup(ctx, inputs, output) -> None:
    q, k, v, seg_start, seg_end, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seg_start, seg_end)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero [B, H, N] gradient for the lse output


def _flash_attn_backward(ctx, do, dlse):
    q, k, v, o, lse, seg_start, seg_end = ctx.saved_tensors
    dq, dk, dv = torch.ops.lvm.flash_attn_bwd(do, q, k, v, o, lse, seg_start, seg_end, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


_flash_attn_fwd.register_autograd(_flash_attn_backward, setup_context=_flash_attn_setup)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor | None,
             seg_end: torch.Tensor | None, causal: bool, scale: float):
    """Launch the forward kernel on contiguous ``[B, H, N, D]`` inputs; returns (o, lse[B, H, N])."""
    _require_triton()
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return o, lse
    t = _fwd_tiles(D, q.dtype, q.device.type == "cuda")
    grid = (triton.cdiv(N, t.block_m), B * H)
    has_seg = seg_start is not None
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, seg_start if has_seg else lse, seg_end if has_seg else lse, H, N, scale * LOG2E,
        CAUSAL=causal, HAS_SEG=has_seg, EVEN_N=N % t.block_m == 0, HEAD_DIM=D, BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, PRECISION=_dot_precision(q.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, seg_start, seg_end, causal: bool, scale: float):
    """Launch delta preprocess, dK/dV and dQ kernels; no atomics, each output written once."""
    B, H, N, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    on_gpu = q.device.type == "cuda"
    precision = _dot_precision(q.dtype)
    delta = torch.empty_like(lse)  # [B, H, N] fp32: rowsum(dO * O)
    pre_block = 64 if on_gpu else 32
    _attn_bwd_preprocess_kernel[(triton.cdiv(N, pre_block), B * H)](
        o, do, delta, N, HEAD_DIM=D, BLOCK_M=pre_block,
    )
    t = _dkdv_tiles(D, q.dtype, on_gpu)
    has_seg = seg_start is not None
    seg = (seg_start, seg_end) if has_seg else (lse, lse)  # dummy pointers when unused
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, t.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, *seg, H, N, scale, scale * LOG2E,
        CAUSAL=causal, HAS_SEG=has_seg, EVEN_N=N % t.block_n == 0, HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        PRECISION=precision, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    t = _dq_tiles(D, q.dtype, on_gpu)
    _attn_bwd_dq_kernel[(triton.cdiv(N, t.block_m), B * H)](
        q, k, v, do, lse, delta, dq, *seg, H, N, scale, scale * LOG2E,
        CAUSAL=causal, HAS_SEG=has_seg, EVEN_N=N % t.block_m == 0, HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        PRECISION=precision, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return dq, dk, dv


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("flash_attention: triton is not installed; pass backend='torch'.")


# --------------------------------------------------------------------------------------------
# Triton kernels. All tensors are contiguous [B*H, N, D] (or [B*H, N] for lse/delta), so one
# program finds its head at ``bh * N * D``. Tiles are powers of two and the larger of each
# kernel's two tile sizes is a multiple of the smaller, which makes the causal split exact:
# tiles strictly below the diagonal need no mask, tiles on it get the causal (and ragged) mask,
# tiles above it are never visited. EVEN_N=True (N a multiple of every tile) drops bounds masks.
#
# Sentences (HAS_SEG): SEG_START/SEG_END [B, N] int32 hold, per token, the first index of its
# sentence (which doubles as the sentence's id) and one past its last. A query tile visits only
# the key tiles from the first key of its first query's sentence to the last key of its last
# query's sentence (clipped at the diagonal when causal); the backward's key tiles do the same
# over query tiles. A visited tile is masked only if it is not wholly inside the query tile's
# one sentence (or straddles the diagonal or the end of the row); that test is a few scalar loads.
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_rows(ptr, offs_rows, N, EVEN_N: tl.constexpr):
        """A [rows, D] tile; rows at or past N read as zeros unless every tile is full (EVEN_N)."""
        if EVEN_N:
            tile = tl.load(ptr)
        else:
            tile = tl.load(ptr, mask=offs_rows[:, None] < N, other=0.0)
        return tile

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, N, lo, hi, qk_scale,
        DIAG: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Online softmax over K/V tiles [lo, hi): running max m_i, running sum l_i (base 2)."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_off = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_N, D]
            k = _load_rows(k_base + kv_off, offs_n, N, EVEN_N)
            v = _load_rows(v_base + kv_off, offs_n, N, EVEN_N)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
            if DIAG:  # a padded key (n >= N) is visible only to padded queries (m >= n), never stored
                qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
            elif not EVEN_N:
                qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units; needs qk_scale > 0
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            # one FMA per score on GPU: the product is not rounded before the shift, so large
            # logits keep their precision
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_seg_inner(
        acc, l_i, m_i, q, seg_q, k_base, v_base, seg_base, offs_m, start_m, q_first, q_last, N, lo, hi, qk_scale,
        CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """_fwd_inner for packed sentences: the mask goes only on tiles that cross a sentence/diagonal/row end."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_off = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_N, D]
            k = _load_rows(k_base + kv_off, offs_n, N, EVEN_N)
            v = _load_rows(v_base + kv_off, offs_n, N, EVEN_N)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
            k_first = tl.load(seg_base + start_n)
            k_last = tl.load(seg_base + tl.minimum(start_n + BLOCK_N, N) - 1)
            needs_mask = (q_first != q_last) | (k_first != q_first) | (k_last != q_first) | (start_n + BLOCK_N > N)
            if CAUSAL:
                needs_mask = needs_mask | (start_n + BLOCK_N > start_m + 1)
            if needs_mask:  # padded keys (id -1) and padded queries (id -2) match nothing
                seg_k = tl.load(seg_base + offs_n, mask=offs_n < N, other=-1)
                keep = seg_q[:, None] == seg_k[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= offs_n[None, :])
                qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row whose first tiles are all other sentences
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, SEG_START, SEG_END, H, N, qk_scale,
        CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        head = bh * N * HEAD_DIM
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_off = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_M, D]
        q = _load_rows(Q + head + q_off, offs_m, N, EVEN_N)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if HAS_SEG:
            seg_base = SEG_START + (bh // H) * N
            last_m = tl.minimum(start_m + BLOCK_M, N) - 1
            q_first = tl.load(seg_base + start_m)  # = first key of the first query's sentence
            q_last = tl.load(seg_base + last_m)
            seg_q = tl.load(seg_base + offs_m, mask=offs_m < N, other=-2)
            hi = tl.load(SEG_END + (bh // H) * N + last_m)
            if CAUSAL:
                hi = tl.minimum(hi, last_m + 1)
            acc, l_i, m_i = _fwd_seg_inner(acc, l_i, m_i, q, seg_q, K + head, V + head, seg_base, offs_m, start_m,
                                           q_first, q_last, N, (q_first // BLOCK_N) * BLOCK_N, hi, qk_scale,
                                           CAUSAL, EVEN_N, HEAD_DIM, BLOCK_N, PRECISION)
        elif CAUSAL:
            # below the diagonal: whole tiles, never ragged because start_m < N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + head, V + head, offs_m, N, 0, start_m, qk_scale,
                                       False, True, HEAD_DIM, BLOCK_N, PRECISION)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + head, V + head, offs_m, N, start_m,
                                       tl.minimum(start_m + BLOCK_M, N), qk_scale,
                                       True, EVEN_N, HEAD_DIM, BLOCK_N, PRECISION)
        else:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + head, V + head, offs_m, N, 0, N, qk_scale,
                                       False, EVEN_N, HEAD_DIM, BLOCK_N, PRECISION)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows can have l == 0
        acc = acc / l_safe[:, None]
        lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634  # back to natural log
        if EVEN_N:
            tl.store(O + head + q_off, acc.to(O.dtype.element_ty))
            tl.store(LSE + bh * N + offs_m, lse)
        else:
            tl.store(O + head + q_off, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
            tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta_i = sum_d dO_id * O_id: the softmax-Jacobian term shared by dQ and dK."""
        bh = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        off = bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        o = tl.load(O + off, mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
        do = tl.load(DO + off, mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)

    @triton.jit
    def _dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, N, lo, hi, qk_scale,
        DIAG: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Accumulate dK, dV for one K/V tile over query tiles [lo, hi), in transposed form."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_off = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_M, D]
            if EVEN_N:
                q = tl.load(q_base + q_off)
                do = tl.load(do_base + q_off)
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            else:
                q = tl.load(q_base + q_off, mask=offs_m[:, None] < N, other=0.0)
                do = tl.load(do_base + q_off, mask=offs_m[:, None] < N, other=0.0)
                lse = tl.load(lse_base + offs_m, mask=offs_m < N, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
            # P^T [BLOCK_N, BLOCK_M] recomputed from the saved LSE (log2 units)
            # masks go on the exponent: exp2(-inf) = 0 where exp2(score - lse) of a padded key could overflow
            logit = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :] * 1.4426950408889634
            if DIAG:  # padded keys are visible only to padded queries, whose dO and delta are zero
                logit = tl.where(offs_m[None, :] >= offs_n[:, None], logit, float("-inf"))
            elif not EVEN_N:
                logit = tl.where(offs_n[:, None] < N, logit, float("-inf"))
            pT = tl.math.exp2(logit)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _dkdv_seg_inner(
        dk, dv, k, v, seg_k, q_base, do_base, lse_base, delta_base, seg_base, offs_n, start_n, k_first, k_last,
        N, lo, hi, qk_scale,
        CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """_dkdv_inner for packed sentences: query tiles [lo, hi) of the key tile's sentences, masked where mixed."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_off = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_M, D]
            if EVEN_N:
                q = tl.load(q_base + q_off)
                do = tl.load(do_base + q_off)
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            else:
                q = tl.load(q_base + q_off, mask=offs_m[:, None] < N, other=0.0)
                do = tl.load(do_base + q_off, mask=offs_m[:, None] < N, other=0.0)
                lse = tl.load(lse_base + offs_m, mask=offs_m < N, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
            logit = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :] * 1.4426950408889634
            q_first = tl.load(seg_base + start_m)
            q_last = tl.load(seg_base + tl.minimum(start_m + BLOCK_M, N) - 1)
            needs_mask = (k_first != k_last) | (q_first != k_first) | (q_last != k_first) | (start_m + BLOCK_M > N)
            if CAUSAL:
                needs_mask = needs_mask | (start_m + 1 < start_n + BLOCK_N)
            if needs_mask:  # [BLOCK_N, BLOCK_M]; padded keys (-1) and queries (-2) match nothing
                seg_q = tl.load(seg_base + offs_m, mask=offs_m < N, other=-2)
                keep = seg_k[:, None] == seg_q[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[None, :] >= offs_n[:, None])
                logit = tl.where(keep, logit, float("-inf"))
            pT = tl.math.exp2(logit)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, SEG_START, SEG_END, H, N, scale, qk_scale,
        CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1).to(tl.int64)
        head = bh * N * HEAD_DIM
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_off = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_N, D]
        k = _load_rows(K + head + kv_off, offs_n, N, EVEN_N)
        v = _load_rows(V + head + kv_off, offs_n, N, EVEN_N)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        if HAS_SEG:
            seg_base = SEG_START + (bh // H) * N
            last_n = tl.minimum(start_n + BLOCK_N, N) - 1
            k_first = tl.load(seg_base + start_n)  # = first query of the first key's sentence
            k_last = tl.load(seg_base + last_n)
            seg_k = tl.load(seg_base + offs_n, mask=offs_n < N, other=-1)
            lo = start_n if CAUSAL else k_first  # causal: no earlier query sees these keys
            hi = tl.load(SEG_END + (bh // H) * N + last_n)
            dk, dv = _dkdv_seg_inner(dk, dv, k, v, seg_k, Q + head, DO + head, LSE + bh * N, DELTA + bh * N,
                                     seg_base, offs_n, start_n, k_first, k_last, N, (lo // BLOCK_M) * BLOCK_M, hi,
                                     qk_scale, CAUSAL, EVEN_N, HEAD_DIM, BLOCK_M, BLOCK_N, PRECISION)
        elif CAUSAL:
            # queries on the diagonal band, then every query below it (no causal mask needed)
            diag_end = tl.minimum(start_n + BLOCK_N, N)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q + head, DO + head, LSE + bh * N, DELTA + bh * N, offs_n, N,
                                 start_n, diag_end, qk_scale, True, EVEN_N, HEAD_DIM, BLOCK_M, PRECISION)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q + head, DO + head, LSE + bh * N, DELTA + bh * N, offs_n, N,
                                 start_n + BLOCK_N, N, qk_scale, False, EVEN_N, HEAD_DIM, BLOCK_M, PRECISION)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, Q + head, DO + head, LSE + bh * N, DELTA + bh * N, offs_n, N,
                                 0, N, qk_scale, False, EVEN_N, HEAD_DIM, BLOCK_M, PRECISION)
        dk = dk * scale  # dS was taken w.r.t. the scaled scores
        if EVEN_N:
            tl.store(DK + head + kv_off, dk.to(DK.dtype.element_ty))
            tl.store(DV + head + kv_off, dv.to(DV.dtype.element_ty))
        else:
            tl.store(DK + head + kv_off, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < N)
            tl.store(DV + head + kv_off, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < N)

    @triton.jit
    def _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, N, lo, hi, qk_scale,
        DIAG: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Accumulate dQ for one query tile over K/V tiles [lo, hi)."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_off = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_N, D]
            k = _load_rows(k_base + kv_off, offs_n, N, EVEN_N)
            v = _load_rows(v_base + kv_off, offs_n, N, EVEN_N)
            logit = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]  # [BLOCK_M, BLOCK_N]
            if DIAG:  # as in the forward, the causal mask alone hides padded keys from real queries
                logit = tl.where(offs_m[:, None] >= offs_n[None, :], logit, float("-inf"))
            elif not EVEN_N:  # masked on the exponent: exp2(-lse) of a zero-padded key can overflow
                logit = tl.where(offs_n[None, :] < N, logit, float("-inf"))
            p = tl.math.exp2(logit)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _dq_seg_inner(
        dq, q, do, lse2, delta, seg_q, k_base, v_base, seg_base, offs_m, start_m, q_first, q_last, N, lo, hi,
        qk_scale, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """_dq_inner for packed sentences, with the forward's tile range and mask test."""
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_off = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_N, D]
            k = _load_rows(k_base + kv_off, offs_n, N, EVEN_N)
            v = _load_rows(v_base + kv_off, offs_n, N, EVEN_N)
            logit = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]  # [BLOCK_M, BLOCK_N]
            k_first = tl.load(seg_base + start_n)
            k_last = tl.load(seg_base + tl.minimum(start_n + BLOCK_N, N) - 1)
            needs_mask = (q_first != q_last) | (k_first != q_first) | (k_last != q_first) | (start_n + BLOCK_N > N)
            if CAUSAL:
                needs_mask = needs_mask | (start_n + BLOCK_N > start_m + 1)
            if needs_mask:
                seg_k = tl.load(seg_base + offs_n, mask=offs_n < N, other=-1)
                keep = seg_q[:, None] == seg_k[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= offs_n[None, :])
                logit = tl.where(keep, logit, float("-inf"))
            p = tl.math.exp2(logit)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, SEG_START, SEG_END, H, N, scale, qk_scale,
        CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        head = bh * N * HEAD_DIM
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_off = offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_M, D]
        if EVEN_N:
            q = tl.load(Q + head + q_off)
            do = tl.load(DO + head + q_off)
            lse = tl.load(LSE + bh * N + offs_m)
            delta = tl.load(DELTA + bh * N + offs_m)
        else:
            q = tl.load(Q + head + q_off, mask=offs_m[:, None] < N, other=0.0)
            do = tl.load(DO + head + q_off, mask=offs_m[:, None] < N, other=0.0)
            lse = tl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=offs_m < N, other=0.0)
        lse2 = lse * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if HAS_SEG:
            seg_base = SEG_START + (bh // H) * N
            last_m = tl.minimum(start_m + BLOCK_M, N) - 1
            q_first = tl.load(seg_base + start_m)
            q_last = tl.load(seg_base + last_m)
            seg_q = tl.load(seg_base + offs_m, mask=offs_m < N, other=-2)
            hi = tl.load(SEG_END + (bh // H) * N + last_m)
            if CAUSAL:
                hi = tl.minimum(hi, last_m + 1)
            dq = _dq_seg_inner(dq, q, do, lse2, delta, seg_q, K + head, V + head, seg_base, offs_m, start_m, q_first,
                               q_last, N, (q_first // BLOCK_N) * BLOCK_N, hi, qk_scale, CAUSAL, EVEN_N, HEAD_DIM,
                               BLOCK_N, PRECISION)
        elif CAUSAL:
            dq = _dq_inner(dq, q, do, lse2, delta, K + head, V + head, offs_m, N, 0, start_m, qk_scale,
                           False, True, HEAD_DIM, BLOCK_N, PRECISION)
            dq = _dq_inner(dq, q, do, lse2, delta, K + head, V + head, offs_m, N, start_m,
                           tl.minimum(start_m + BLOCK_M, N), qk_scale, True, EVEN_N, HEAD_DIM, BLOCK_N, PRECISION)
        else:
            dq = _dq_inner(dq, q, do, lse2, delta, K + head, V + head, offs_m, N, 0, N, qk_scale,
                           False, EVEN_N, HEAD_DIM, BLOCK_N, PRECISION)
        dq = dq * scale
        if EVEN_N:
            tl.store(DQ + head + q_off, dq.to(DQ.dtype.element_ty))
        else:
            tl.store(DQ + head + q_off, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < N)
