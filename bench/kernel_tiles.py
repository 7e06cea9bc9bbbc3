"""Tile and chunk sweep for our GPU kernels: candidates timed side by side, each checked against torch.

The attention kernels' tile sizes (forward, dK/dV, dQ) and the fused cross-entropy's chunk and
matmul precision are hand-picked constants in ``kernels/``; this sweep is the evidence behind them.
Each kernel is timed alone with one knob set changed (the others at their defaults), so a row's
"vs default" ratio belongs to that kernel; the closing rows time the per-kernel winners together
against SDPA (attention) and naive logits + cross-entropy (CE), measured in the same run.

    python -m bench.kernel_tiles --out bench/results    # on a CUDA GPU; writes tiles-<card>.json/.md

Candidates that break the kernel (too much shared memory, a wrong answer) are listed with their
status rather than dropped, and never win.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.kernels import device_slug, time_ms
from bench.results_io import write_results
from kernels import attention as attn
from kernels import cross_entropy as ce

REPS, WARMUP = 20, 5

# (block_m, block_n, num_warps, num_stages); forward and dQ need block_m % block_n == 0, dK/dV the reverse
FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3),
       (64, 32, 4, 4), (128, 64, 4, 4)]
DQ = [(128, 32, 4, 3), (64, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2),
      (64, 32, 4, 4), (128, 128, 8, 2)]
DKDV = [(32, 128, 4, 3), (32, 64, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3),
        (16, 128, 4, 3), (128, 128, 8, 2)]
ATTN_SHAPES = [(4, 16, 4096, 64), (4, 16, 4096, 128), (16, 12, 512, 64)]  # causal; the last is the base preset's
CE_SHAPES = [(4096, 1024, 65536), (8192, 2048, 65536), (4096, 1024, 16384), (8160, 768, 1004)]
CE_CHUNKS = [None, 256, 1024, 4096]  # rows per chunk; None = the default (CE's GPU_CHUNK_BYTES of fp32 logits)
# --dry-run: the same code on CPU under TRITON_INTERPRET=1, tiny fp32 shapes, two candidates per kernel,
# so the sweep's plumbing is checked before it spends a GPU lease
DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16


@dataclass
class Row:
    kernel: str
    shape: str
    knobs: str
    ms: float | None = None
    vs_default: float | None = None  # default ms / this ms (> 1 is faster)
    vs_torch: float | None = None  # torch ms / this ms, same work
    max_err: float | None = None
    status: str = "ok"
    default: bool = False


def _tiles(c: tuple) -> attn._Tiles:
    return attn._Tiles(c[0], c[1], num_warps=c[2], num_stages=c[3])


def _as_tuple(t: attn._Tiles) -> tuple:
    return (t.block_m, t.block_n, t.num_warps, t.num_stages)


@contextmanager
def _patched(module, name: str, value):
    """Inside the block ``module.<name>`` is ``value``: the kernels read their knobs through such module-level
    choosers at every launch, so the sweep times the kernels' own code with one knob changed."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _tiles_patched(name: str, c: tuple):
    """``attn.<name>`` (the tile chooser one kernel launch reads) returns the tiles ``c``."""
    tiles = _tiles(c)
    return _patched(attn, name, lambda D, dtype, on_gpu: tiles)


def _time(fn: Callable[[], object]) -> float:
    return time_ms(fn, DEVICE, REPS, WARMUP)


def sweep_attention(b: int, h: int, n: int, d: int, cands: dict[str, list[tuple]]) -> tuple[list[Row], dict]:
    """Rows for each forward / dK-dV / dQ candidate at one causal shape; returns the winners too."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, n, d, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(4))
    scale = d ** -0.5
    shape = f"B{b} H{h} N{n} D{d} causal"
    # torch's answer and time: SDPA forward, and its backward as (fwd+bwd) - fwd
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    ref_o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
    ref_o.backward(do)
    ref = {"o": ref_o.detach(), "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}
    t_sdpa_fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def sdpa_fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)
    t_sdpa_bwd = max(_time(sdpa_fwd_bwd) - t_sdpa_fwd, 1e-6)
    defaults = {name: _as_tuple(getattr(attn, name)(d, DTYPE, DEVICE.type == "cuda"))
                for name in ("_fwd_tiles", "_dkdv_tiles", "_dq_tiles")}
    o, lse = attn._forward(q, k, v, None, None, True, scale)
    rows, winners = [], {}
    for kernel, name, t_torch in [("attention fwd", "_fwd_tiles", t_sdpa_fwd),
                                  ("attention dK/dV", "_dkdv_tiles", t_sdpa_bwd),
                                  ("attention dQ", "_dq_tiles", t_sdpa_bwd)]:
        krows = []
        for c in ([defaults[name]] + [c for c in cands[name] if c != defaults[name]]):
            row = Row(kernel, shape, "m{} n{} w{} s{}".format(*c), default=c == defaults[name])
            try:
                with _tiles_patched(name, c):
                    if name == "_fwd_tiles":
                        out, _ = attn._forward(q, k, v, None, None, True, scale)
                        row.max_err = (out.float() - ref["o"].float()).abs().max().item()
                        row.ms = _time(lambda: attn._forward(q, k, v, None, None, True, scale))
                    else:
                        dq, dk, dv = attn._backward(do, q, k, v, o, lse, None, None, True, scale)
                        row.max_err = max((x.float() - ref[key].float()).abs().max().item()
                                          for x, key in ((dq, "dq"), (dk, "dk"), (dv, "dv")))
                        row.ms = _time(lambda: attn._backward(do, q, k, v, o, lse, None, None, True, scale))
                row.vs_torch = t_torch / row.ms if name == "_fwd_tiles" else None
            except Exception as e:  # out of shared memory, a refused tile: the row says so
                row.status = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                row.ms = None
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
            krows.append(row)
        _judge(krows)
        winners[name] = _best(krows)
        rows += krows
    # the winners together vs SDPA, full forward + backward
    def ours_fwd_bwd():
        o2, lse2 = attn._forward(q, k, v, None, None, True, scale)
        attn._backward(do, q, k, v, o2, lse2, None, None, True, scale)
    t_default = _time(ours_fwd_bwd)
    with _tiles_patched("_fwd_tiles", winners["_fwd_tiles"]), \
            _tiles_patched("_dkdv_tiles", winners["_dkdv_tiles"]), \
            _tiles_patched("_dq_tiles", winners["_dq_tiles"]):
        t_best = _time(ours_fwd_bwd)
    t_sdpa = t_sdpa_fwd + t_sdpa_bwd
    rows.append(Row("attention fwd+bwd, defaults", shape, "as in kernels/attention.py", t_default, 1.0,
                    t_sdpa / t_default, default=True))
    rows.append(Row("attention fwd+bwd, winners", shape, " / ".join("m{} n{} w{} s{}".format(*winners[k])
                    for k in ("_fwd_tiles", "_dkdv_tiles", "_dq_tiles")), t_best, t_default / t_best,
                    t_sdpa / t_best))
    for r in rows:
        print(f"{r.kernel:28s} {r.shape:24s} {r.knobs:40s} {_fmt(r.ms, 3):>8s} ms  x{_fmt(r.vs_default, 2)} "
              f"vs default  x{_fmt(r.vs_torch, 2)} vs torch  err {_fmt(r.max_err, 4)}  {r.status}", flush=True)
    return rows, winners


def _judge(rows: list[Row]) -> None:
    """vs_default for each row; a candidate whose error is far above the default's, or not a number, is marked
    wrong."""
    base = next((r for r in rows if r.default and r.ms), None)
    for r in rows:
        if r.ms is None or base is None:
            continue
        r.vs_default = base.ms / r.ms
        # written as "not <=" so that a NaN error (a tile reading memory it never wrote) counts as wrong too
        if r.max_err is not None and base.max_err is not None and not r.max_err <= 4 * base.max_err + 1e-2:
            r.status = f"wrong: max error {r.max_err:.3g} vs default {base.max_err:.3g}"


def _best(rows: list[Row]) -> tuple:
    ok = [r for r in rows if r.ms and r.status == "ok"]
    best = min(ok, key=lambda r: r.ms)
    return tuple(int(x[1:]) for x in best.knobs.split())


# ----------------------------------------------------------------------------------------------
# fused cross-entropy: chunk rows x how the fp32 parts are produced
# ----------------------------------------------------------------------------------------------


# the two ways kernels/cross_entropy.py can take a chunk's matmuls, as the value its ``_fp32_out`` switch returns:
# widen (the matmul in the inputs' dtype, then a separate pass to fp32: the CPU path, and the GPU one before this
# sweep) or fp32 out (cuBLAS writes fp32 itself: logits, and d_weight accumulated with beta = 1; CUDA only)
MATMUL_MODES = {"widen": False, "fp32 out": True}


def sweep_ce(n: int, d: int, v: int, chunks: list[int | None]) -> list[Row]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=DEVICE, dtype=DTYPE)
    weight = (torch.randn(v, d, generator=g, device=DEVICE, dtype=DTYPE) / d ** 0.5)
    target = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    shape = f"N{n} D{d} V{v}"
    hg, wg = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def naive():
        hg.grad = wg.grad = None
        ce.linear_cross_entropy_reference(hg, wg, target).backward()
    naive()
    ref = (hg.grad.float(), wg.grad.float())
    t_naive = _time(naive)
    rows = [Row("CE fwd+bwd, naive", shape, "logits + F.cross_entropy", t_naive, None, 1.0)]
    default_chunk = ce.default_chunk_size(n, v, DEVICE.type == "cuda")
    default_mode = "fp32 out" if DEVICE.type == "cuda" else "widen"  # what kernels/cross_entropy.py does
    cands = []
    for mode in MATMUL_MODES:
        for chunk in chunks:
            rows_c = default_chunk if chunk is None else min(chunk, n)
            if chunk is not None and rows_c == default_chunk:
                continue
            cands.append((mode, chunk, rows_c))
    ce_rows = []
    for mode, chunk, rows_c in cands:
        row = Row("CE fwd+bwd, ours", shape, f"{mode}, chunk {rows_c} rows ({rows_c * v * 4 / 2**20:.0f} MiB)",
                  default=mode == default_mode and chunk is None)
        fp32_out = MATMUL_MODES[mode]

        def ours():
            hg.grad = wg.grad = None
            ce.fused_linear_cross_entropy(hg, wg, target, chunk_size=rows_c, backend="triton").backward()
        try:
            with _patched(ce, "_fp32_out", lambda h: fp32_out):
                ours()
                row.max_err = max((hg.grad.float() - ref[0]).abs().max().item(),
                                  (wg.grad.float() - ref[1]).abs().max().item())
                row.ms = _time(ours)
            row.vs_torch = t_naive / row.ms
        except Exception as e:
            row.status = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        finally:
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        ce_rows.append(row)
    _judge(ce_rows)
    for r in rows + ce_rows:
        print(f"{r.kernel:20s} {r.shape:22s} {r.knobs:40s} {_fmt(r.ms, 3):>8s} ms  x{_fmt(r.vs_default, 2)} "
              f"vs default  x{_fmt(r.vs_torch, 2)} vs naive  err {_fmt(r.max_err, 5)}  {r.status}", flush=True)
    return rows + ce_rows


def _fmt(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def render(header: dict, rows: list[Row], winners: dict) -> str:
    lines = [
        f"# Kernel tile / chunk sweep: {header['device_name']}",
        "",
        f"torch {header['torch']}, triton {header['triton']}, {header['date']}; {header['dtype']}, median of "
        f"{REPS} after {WARMUP} warm-up calls. Each kernel row changes one kernel's knobs, the others at their "
        "defaults; 'vs default' = default ms / row ms, 'vs torch' = SDPA (forward) or naive logits + "
        "F.cross_entropy ms / row ms, same run. Backward rows time the dK/dV + dQ pair (one of them varied); "
        "the 'fwd+bwd' rows time the per-kernel winners together against SDPA. max err: largest |difference| "
        "from torch's output or gradients. CE modes: 'widen' takes each chunk's matmuls in the "
        "inputs' dtype and widens to fp32 in a separate pass; 'fp32 out' has cuBLAS write fp32 logits and "
        "accumulate d_weight in fp32 itself (CUDA only; the GPU default since this sweep).",
        "",
        "| kernel | shape | knobs | ms | vs default | vs torch | max err | status |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        knobs = f"**{r.knobs}** (default)" if r.default and not r.kernel.endswith("defaults") else r.knobs
        lines.append(f"| {r.kernel} | {r.shape} | {knobs} | {_fmt(r.ms, 3)} | {_fmt(r.vs_default, 2)} | "
                     f"{_fmt(r.vs_torch, 2)} | {_fmt(r.max_err, 4)} | {r.status} |")
    lines += ["", "Winners per attention shape (forward / dK-dV / dQ, as block_m, block_n, warps, stages):", ""]
    lines += [f"- {shape}: {w}" for shape, w in winners.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--only", choices=["attention", "ce"], default=None)
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny fp32 shapes: checks the "
                   "sweep itself, not the kernels' speed")
    args = p.parse_args(argv)
    global DEVICE, DTYPE, REPS, WARMUP
    cands = {"_fwd_tiles": FWD, "_dkdv_tiles": DKDV, "_dq_tiles": DQ}
    attn_shapes, ce_shapes, chunks = ATTN_SHAPES, CE_SHAPES, CE_CHUNKS
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run runs the Triton kernels on CPU: set TRITON_INTERPRET=1.")
        DEVICE, DTYPE, REPS, WARMUP = torch.device("cpu"), torch.float32, 2, 1
        cands = {"_fwd_tiles": [(16, 16, 4, 2)], "_dkdv_tiles": [(16, 16, 4, 2)], "_dq_tiles": [(16, 16, 4, 2)]}
        attn_shapes, ce_shapes, chunks = [(1, 2, 64, 16)], [(48, 16, 40)], [None, 16]
    elif not torch.cuda.is_available():
        raise SystemExit("bench.kernel_tiles times GPU kernels: run it on a machine with a CUDA GPU "
                         "(or --dry-run with TRITON_INTERPRET=1 to check the sweep itself).")
    import triton

    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu dry run"
    header = {"device_name": name, "torch": torch.__version__, "triton": triton.__version__,
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dtype": str(DTYPE)[6:]}
    rows, winners = [], {}
    stem = args.out / f"tiles-{device_slug(DEVICE, name)}"

    def save() -> dict:  # after every shape, so a run stopped at its time cap keeps what it measured
        result = {"header": header, "rows": [r.__dict__ for r in rows], "winners": winners}
        write_results(stem, result, render(header, rows, winners))
        return result
    if args.only in (None, "attention"):
        for s in attn_shapes:
            r, w = sweep_attention(*s, cands)
            rows += r
            winners["B{} H{} N{} D{}".format(*s)] = {k.strip("_"): v for k, v in w.items()}
            save()
    if args.only in (None, "ce"):
        for s in ce_shapes:
            rows += sweep_ce(*s, chunks)
            save()
    return save()


if __name__ == "__main__":
    main()
