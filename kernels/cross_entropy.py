"""Fused linear + cross-entropy: chunked torch path, Triton path, reference, dispatch.

Shapes: hidden ``[N, D]``, weight ``[V, D]``, target ``[N]``; the fused paths never hold the full
``[N, V]`` logits, only one ``[C, V]`` fp32 chunk at a time (C ~ 64 MB / (4 V)).

How (the Liger-Kernel recipe): per chunk of tokens, logits come from a plain matmul; a softmax
step (torch ops, or one Triton program per row writing in place) turns them into the per-row
loss and the gradient of the loss w.r.t. the logits; two more matmuls give d_hidden for the
chunk and add into d_weight. For ``mean``/``sum`` this happens in the forward pass and backward only rescales
the stored gradients by grad_output. For ``none`` the per-token grad_output is unknown at forward
time and d_weight is not separable per row, so forward computes losses only and backward redoes
the chunk loop with grad_output as a per-row scale (one extra logits matmul, still memory-flat).

Loss per non-ignored token, with logits x, log-sum-exp lse, target t, smoothing eps, z-loss z:
    (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j) + z * lse^2
and its gradient w.r.t. x_j:  p_j * (1 + 2 z lse) - (1 - eps) [j == t] - eps / V.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.dispatch import HAS_TRITON, resolve_backend

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk; a few such buffers live at once
# On a GPU bigger chunks pay: 256 MiB ran 1.8-2.0x faster than 64 MiB at V = 65536 on an H200 (2.5-2.6x with the
# fp32 output below) and still holds a quarter to an eighth of the naive path's logits (bench/results/tiles-nvidia-h200.md).
GPU_CHUNK_BYTES = 256 * 2**20
# torch.mm/addmm(..., out_dtype=fp32): cuBLAS writes fp32 straight from half inputs (recent torch, CUDA only)
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``, memory-flat in V.

    The LM head of a big-vocabulary model would otherwise hold ``[N, V]`` logits plus their
    gradient; here peak extra memory is O(chunk_size * V). Returns an fp32 loss (``[N]`` for
    ``reduction="none"``); gradients come back in the inputs' dtypes.
    """
    _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size)
    path = resolve_backend(backend, hidden.device, "fused_linear_cross_entropy")
    if backend == "auto" and hidden.is_cuda and chunk_size is None and 4 * hidden.shape[0] * weight.shape[0] <= CHUNK_BYTES:
        # the whole [N, V] fp32 logits fit in one small chunk (our own LVMs: V ~ 1,000): nothing to save, and on
        # a GPU the plain ops ran 2x faster than one fused chunk at N=8160 V=1004 (tiles-nvidia-h200.md). A backend
        # named outright (the kernel tests, the benchmarks) always runs the fused path.
        return plain_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                                          z_loss)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, *_ = torch.ops.lvm.linear_ce_fwd(
        hidden.contiguous(), weight, bias, target.contiguous(), int(ignore_index), reduction, float(label_smoothing),
        float(z_loss), chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.is_cuda),
        path == "triton",
        needs_grad,
    )
    return loss


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Naive logits + ``F.cross_entropy``: the twin the fused paths are checked against (its mean is NaN when
    every target is ignored, like ``F.cross_entropy``'s)."""
    return _full_logits_ce(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, 0)


def plain_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Full logits + ``F.cross_entropy`` with the fused paths' conventions (fp32 loss; 0.0, not NaN, when every
    target is ignored; no host sync): what small vocabularies take on a GPU."""
    return _full_logits_ce(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, 1)


def _full_logits_ce(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                    min_count: int) -> torch.Tensor:
    """The ``[N, V]`` fp32 logits path; the mean divides by max(valid targets, ``min_count``)."""
    logits = F.linear(hidden, weight, bias).float()  # [N, V]
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(min_count)


def default_chunk_size(n_tokens: int, vocab: int, on_gpu: bool = False) -> int:
    """Tokens per chunk so one fp32 ``[chunk, V]`` logits buffer stays near ``CHUNK_BYTES`` (GPU: ``GPU_CHUNK_BYTES``)."""
    budget = GPU_CHUNK_BYTES if on_gpu else CHUNK_BYTES
    return max(1, min(n_tokens, budget // (4 * vocab)))


# --------------------------------------------------------------------------------------------
# autograd Function shared by both paths; only the softmax step differs.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Non-tensor arguments, bundled so the chunk loop's signature stays readable."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    chunk_size: int
    softmax_step: Callable


def _options(ignore_index, reduction, label_smoothing, z_loss, chunk_size, use_triton) -> _Options:
    step = _softmax_step_triton if use_triton else _softmax_step_torch
    return _Options(ignore_index, reduction, label_smoothing, z_loss, chunk_size, step)


# Custom operators (torch.library): torch.compile sees the chunk loop as one opaque node, so the
# host sync for the number of valid targets and the Python loop cause no graph break.
# For mean/sum the forward op also returns the (already scaled) gradients, which the autograd
# formula rescales by grad_output; those outputs are empty [0] tensors when no gradient is wanted.


@torch.library.custom_op("lvm::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, chunk_size: int, use_triton: bool, needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss: [] or [N] fp32, d_hidden [N, D], d_weight [V, D], d_bias [V]) with empty grads when not computed."""
    opt = _options(ignore_index, reduction, label_smoothing, z_loss, chunk_size, use_triton)
    empty = hidden.new_empty(0)
    if reduction == "none":
        losses, _ = _chunk_loop(hidden, weight, bias, target, opt, want_grads=False)
        return losses, empty, empty.clone(), empty.clone()
    n_valid = int((target != ignore_index).sum())  # one host sync per call
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    losses, grads = _chunk_loop(hidden, weight, bias, target, opt, scale=scale, want_grads=needs_grad)
    loss = losses.sum() * scale  # fp32 scalar; 0.0 when every target is ignored
    if grads is None:
        return loss, empty, empty.clone(), empty.clone()
    d_hidden, d_weight, d_bias = grads
    return loss, d_hidden, d_weight, d_bias if d_bias is not None else empty


@_linear_ce_fwd.register_fake
def _(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, chunk_size, use_triton,
      needs_grad):
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    grads = needs_grad and reduction != "none"
    d_hidden = torch.empty_like(hidden) if grads else hidden.new_empty(0)
    d_weight = torch.empty_like(weight) if grads else hidden.new_empty(0)
    d_bias = torch.empty_like(bias) if grads and bias is not None else hidden.new_empty(0)
    return loss, d_hidden, d_weight, d_bias


@torch.library.custom_op("lvm::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    row_scale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, chunk_size: int,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction="none" backward: redo the chunk loop with the per-token upstream gradient as row scale."""
    opt = _options(ignore_index, "none", label_smoothing, z_loss, chunk_size, use_triton)
    _, (d_hidden, d_weight, d_bias) = _chunk_loop(hidden, weight, bias, target, opt, row_scale=row_scale,
                                                  want_grads=True)
    return d_hidden, d_weight, d_bias if d_bias is not None else hidden.new_empty(0)


@_linear_ce_bwd.register_fake
def _(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, chunk_size, use_triton):
    d_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), d_bias


def _linear_ce_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, chunk_size, use_triton, _ = inputs
    _, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias)
    ctx.set_materialize_grads(False)  # else autograd fills zero "gradients" the size of d_hidden and d_weight
    ctx.has_bias, ctx.reduction = bias is not None, reduction
    ctx.args = (ignore_index, label_smoothing, z_loss, chunk_size, use_triton)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _linear_ce_backward(ctx, grad_loss, *unused):
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        row_scale = grad_loss.float().contiguous()  # [N]: per-token upstream gradient
        d_hidden, d_weight, d_bias = torch.ops.lvm.linear_ce_bwd(hidden, weight, bias, target, row_scale, *ctx.args)
    else:
        d_hidden, d_weight, d_bias = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    return d_hidden, d_weight, d_bias if ctx.has_bias else None, None, None, None, None, None, None, None, None


_linear_ce_fwd.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def _chunk_loop(hidden, weight, bias, target, opt, scale=1.0, row_scale=None, want_grads=True):
    """Walk token chunks; return per-token losses [N] (fp32) and (d_hidden, d_weight, d_bias)."""
    n, v = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if want_grads:
        d_hidden = torch.empty_like(hidden)  # [N, D]
        # accumulate across chunks in fp32, cast once at the end
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, D]
        d_bias = torch.zeros(v, dtype=torch.float32, device=weight.device) if bias is not None else None
    for start in range(0, n, opt.chunk_size):
        stop = min(start + opt.chunk_size, n)
        h = hidden[start:stop]  # [C, D]
        logits = _chunk_logits(h, weight, bias)  # [C, V], fp32 from here on
        rs = None if row_scale is None else row_scale[start:stop]
        losses[start:stop], d_logits = opt.softmax_step(logits, target[start:stop], opt, scale, rs, want_grads)
        del logits  # the step may have written d_logits elsewhere; let the logits buffer go
        if not want_grads:
            continue
        d_bias_chunk = d_logits.sum(dim=0) if d_bias is not None else None  # [V], fp32
        d_logits = d_logits.to(hidden.dtype)  # [C, V]; no copy for fp32 inputs
        torch.mm(d_logits, weight, out=d_hidden[start:stop])  # [C, D]
        _add_d_weight(d_weight, d_logits, h)
        if d_bias is not None:
            d_bias += d_bias_chunk
    if not want_grads:
        return losses, None
    grads = (
        d_hidden,
        d_weight.to(weight.dtype),
        d_bias.to(bias.dtype) if d_bias is not None else None,
    )
    return losses, grads


def _fp32_out(h: torch.Tensor) -> bool:
    """Half inputs on CUDA: let cuBLAS write fp32 itself (up to 1.6x faster than a separate widening pass
    on an H200, and no bf16 rounding of logits or of each chunk's d_weight)."""
    return _HAS_OUT_DTYPE and h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of one chunk [C, V]."""
    if _fp32_out(h):
        logits = torch.mm(h, weight.t(), out_dtype=torch.float32)
        return logits if bias is None else logits.add_(bias.float())
    return F.linear(h, weight, bias).float()  # CPU: the matmul in the inputs' dtype, then widen


def _add_d_weight(d_weight: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor) -> None:
    """d_weight [V, D] (fp32) += d_logits.T @ h for one chunk."""
    if d_logits.dtype == torch.float32:
        d_weight.addmm_(d_logits.t(), h)
    elif _fp32_out(h):
        torch.addmm(d_weight, d_logits.t(), h, out_dtype=torch.float32, out=d_weight)  # fp32 sum, beta = 1
    else:
        d_weight += (d_logits.t() @ h).float()


# --------------------------------------------------------------------------------------------
# softmax steps: logits [C, V] fp32 -> (per-row loss [C], scaled d_logits [C, V] fp32 or None)
# --------------------------------------------------------------------------------------------


def _softmax_step_torch(logits, target, opt, scale, row_scale, want_grads):
    """The CPU default: log_softmax (one vectorised pass, faster than logsumexp on CPU) + in-place ops."""
    v = logits.shape[1]
    valid = target != opt.ignore_index  # [C]
    t = torch.where(valid, target, 0).unsqueeze(1)  # [C, 1]
    eps, z = opt.label_smoothing, opt.z_loss
    x_t = logits.gather(1, t).squeeze(1) if z else None  # [C]
    logp = logits.log_softmax(dim=-1)  # [C, V]
    logp_t = logp.gather(1, t).squeeze(1)  # [C]
    loss = -(1.0 - eps) * logp_t
    if eps:
        loss = loss - eps * logp.mean(dim=-1)
    if z:
        lse = x_t - logp_t
        loss = loss + z * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if not want_grads:
        return loss, None
    p = logp.exp_()  # softmax, in place
    if z:
        p.mul_((1.0 + 2.0 * z * lse).unsqueeze(1))
    p.scatter_add_(1, t, torch.full_like(loss, -(1.0 - eps)).unsqueeze(1))
    if eps:
        p.sub_(eps / v)
    factor = valid.float() * scale  # [C]; zero rows for ignored targets
    if row_scale is not None:
        factor = factor * row_scale
    p.mul_(factor.unsqueeze(1))
    return loss, p


def _softmax_step_triton(logits, target, opt, scale, row_scale, want_grads):
    """One Triton program per row: online softmax over V tiles, then d_logits written in place."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    block_v = min(triton.next_power_of_2(v), 16384 if logits.device.type == "cpu" else 4096)
    _ce_rows_kernel[(c,)](
        logits,
        logits.stride(0),
        target,
        loss,
        row_scale if row_scale is not None else loss,  # dummy pointer when unused
        v,
        opt.ignore_index,
        scale,
        opt.label_smoothing,
        opt.z_loss,
        HAS_ROW_SCALE=row_scale is not None,
        WANT_GRADS=want_grads,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss, logits


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_rows_kernel(
        logits_ptr,  # [C, V] fp32, overwritten with scaled d_logits
        stride_row,
        target_ptr,  # [C] int
        loss_ptr,  # [C] fp32 out
        row_scale_ptr,  # [C] fp32, read only when HAS_ROW_SCALE
        V,
        ignore_index,
        scale,
        label_smoothing,
        z_loss,
        HAS_ROW_SCALE: tl.constexpr,
        WANT_GRADS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride_row
        t = tl.load(target_ptr + row)
        if t == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if WANT_GRADS:
                for start in range(0, V, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    tl.store(ptr + cols, tl.zeros([BLOCK_V], tl.float32), mask=cols < V)
            return

        # pass 1: running max m and sum of exp(x - m) over vocab tiles, plus sum of x
        m = float("-inf")
        s = 0.0
        sum_x = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            sum_x += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        lse = m + tl.log(s)
        x_t = tl.load(ptr + t)
        loss = (1.0 - label_smoothing) * (lse - x_t) + label_smoothing * (lse - sum_x / V) + z_loss * lse * lse
        tl.store(loss_ptr + row, loss)

        # pass 2: d_logits = p * (1 + 2 z lse) - (1 - eps) onehot - eps / V, times the row's scale
        if WANT_GRADS:
            factor = scale
            if HAS_ROW_SCALE:
                factor = factor * tl.load(row_scale_ptr + row)
            coef = 1.0 + 2.0 * z_loss * lse
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(ptr + cols, mask=cols < V, other=0.0)
                g = tl.exp(x - lse) * coef - label_smoothing / V
                g = tl.where(cols == t, g - (1.0 - label_smoothing), g)
                tl.store(ptr + cols, g * factor, mask=cols < V)


# --------------------------------------------------------------------------------------------
# input checks: raised where the bad input enters, naming it
# --------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}; flatten batch and sequence first.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, D] with D={hidden.shape[1]} to match hidden, got {tuple(weight.shape)}."
        )
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"target must be [N]=[{hidden.shape[0]}], got {tuple(target.shape)}.")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}; use .long().")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
    if z_loss < 0.0:
        raise ValueError(f"z_loss={z_loss} must be >= 0.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1, or None to size chunks from V.")
    if torch.compiler.is_compiling():
        return  # the value check below is data-dependent: it would break the compiled graph in two
    v = weight.shape[0]
    bad = ((target < 0) | (target >= v)) & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(
            f"target holds class id {first} outside [0, {v}) for a vocabulary of V={v} "
            f"(ignore_index={ignore_index}); fix the labels or mark them with ignore_index."
        )
