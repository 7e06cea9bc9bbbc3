"""Kernel benchmark table: our attention and fused CE vs the torch baselines, measured in one run.

    python -m bench.kernels [--quick] [--out bench/results] [--only attention|ce]

Writes ``<out>/<device-slug>.json`` and ``.md``. Every row carries the median time, TFLOP/s, peak
memory (CUDA only) and the speedup over the torch baseline measured in the same process
(SDPA for attention, naive logits + ``F.cross_entropy`` for CE). A row that cannot run here
(``--backend triton`` without a GPU or TRITON_INTERPRET, out of memory, a shape a kernel refuses) is
kept with status ``n/a: <reason>``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import kernels
from kernels import attention as attention_module
from kernels.dispatch import resolve_backend
from lvm.runtime import cpu_model

# The roofline we read GPU figures against (H100 SXM, dense bf16 tensor cores, HBM3).
H100_BF16_TFLOPS = 989.0
H100_HBM_TBPS = 3.35


@dataclass
class AttnShape:
    b: int
    h: int
    n: int
    d: int
    causal: bool = True
    dtype: str = "bfloat16"


@dataclass
class CEShape:
    n: int
    d: int
    v: int
    dtype: str = "bfloat16"


@dataclass
class Row:
    op: str  # "attention" | "cross_entropy"
    impl: str  # "ours" | "sdpa" | "naive"
    backend: str  # what actually ran: "triton" | "torch" | "-"
    mode: str  # "fwd" | "fwd+bwd"
    shape: dict = field(default_factory=dict)
    ms: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    speedup_vs_baseline: float | None = None
    status: str = "ok"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the .json/.md tables")
    p.add_argument("--only", choices=["attention", "ce"], default=None, help="run one op only")
    p.add_argument("--backend", default="auto", help="backend for 'ours' rows (auto|torch|triton)")
    p.add_argument("--ce-memory", action="store_true",
                   help="also run bench.ce_memory (peak RSS, N=4096 D=256 V=65536) in subprocesses")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps, warmup = (7, 2) if args.quick else (20, 5)
    header = describe_device(device)
    rows: list[Row] = []
    if args.only in (None, "attention"):
        for s in attention_shapes(device, args.quick):
            rows += bench_attention(s, device, args.backend, reps, warmup)
    if args.only in (None, "ce"):
        for s in ce_shapes(device, args.quick):
            rows += bench_ce(s, device, args.backend, reps, warmup)
    if args.ce_memory:
        header["ce_peak_rss"] = ce_peak_rss()
    header["quick"] = args.quick
    header["reps"], header["warmup"] = reps, warmup
    write_results(args.out, header, rows)


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


def attention_shapes(device: torch.device, quick: bool) -> list[AttnShape]:
    if device.type == "cuda":
        shapes = [AttnShape(4, 16, 4096, 64), AttnShape(4, 16, 4096, 128)]
        if not quick:
            shapes += [AttnShape(4, 16, 4096, 64, causal=False), AttnShape(8, 16, 1024, 64),
                       AttnShape(1, 16, 16384, 128)]
        return shapes
    shapes = [AttnShape(1, 4, 256, 64, dtype="float32"), AttnShape(1, 4, 512, 64, dtype="float32")]
    if not quick:
        shapes += [AttnShape(2, 8, 1024, 64, dtype="float32"), AttnShape(1, 4, 512, 64, causal=False, dtype="float32")]
    return shapes


def ce_shapes(device: torch.device, quick: bool) -> list[CEShape]:
    if device.type == "cuda":
        if quick:
            return [CEShape(4096, 1024, 16384), CEShape(8192, 2048, 65536)]
        return [CEShape(n, d, v) for n in (4096, 8192) for d in (1024, 2048) for v in (16384, 65536)]
    shapes = [CEShape(512, 128, 8192, "float32"), CEShape(1024, 256, 16384, "float32")]
    if not quick:
        shapes += [CEShape(2048, 256, 32768, "float32")]
    return shapes


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


def bench_attention(s: AttnShape, device: torch.device, backend: str, reps: int, warmup: int) -> list[Row]:
    """ours / SDPA / naive, fwd and fwd+bwd, for one [B, H, N, D] shape."""
    dtype = getattr(torch, s.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s.b, s.h, s.n, s.d, generator=g, device=device, dtype=dtype) for _ in range(3))
    do = torch.randn_like(q)
    try:
        ours_backend = resolve_backend(backend, device, "flash_attention")
    except (RuntimeError, ValueError) as e:
        ours_backend = f"n/a: {e}"
    impls: dict[str, Callable] = {
        "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=s.causal),
        "ours": lambda q, k, v: kernels.flash_attention(q, k, v, causal=s.causal, backend=backend),
        "naive": lambda q, k, v: kernels.attention_reference(q, k, v, causal=s.causal),
    }
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        flops = attention_flops(s.b, s.h, s.n, s.d, s.causal, mode)
        mode_rows = []
        for impl, fn in impls.items():
            row = Row("attention", impl, ours_backend if impl == "ours" else "torch", mode, asdict(s))
            if impl == "ours" and ours_backend.startswith("n/a"):
                row.status = ours_backend
            else:
                run = _attention_runner(fn, q, k, v, do, mode)
                _measure(row, run, flops, device, reps, warmup)
            mode_rows.append(row)
        _fill_speedups(mode_rows, baseline="sdpa")
        rows += mode_rows
        _print_rows(mode_rows)
    return rows


def bench_ce(s: CEShape, device: torch.device, backend: str, reps: int, warmup: int) -> list[Row]:
    """fused (ours) vs naive logits + F.cross_entropy, fwd and fwd+bwd, for one [N, D] x [V, D]."""
    dtype = getattr(torch, s.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(s.n, s.d, generator=g, device=device, dtype=dtype)  # [N, D]
    weight = torch.randn(s.v, s.d, generator=g, device=device, dtype=dtype) / s.d**0.5  # [V, D]
    target = torch.randint(0, s.v, (s.n,), generator=g, device=device)  # [N]
    try:
        ours_backend = resolve_backend(backend, device, "fused_linear_cross_entropy")
    except (RuntimeError, ValueError) as e:
        ours_backend = f"n/a: {e}"
    impls: dict[str, Callable] = {
        "naive": lambda h, w: kernels.linear_cross_entropy_reference(h, w, target),
        "ours": lambda h, w: kernels.fused_linear_cross_entropy(h, w, target, backend=backend),
    }
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        flops = (2 if mode == "fwd" else 6) * s.n * s.d * s.v  # logits matmul; + d_hidden, d_weight
        mode_rows = []
        for impl, fn in impls.items():
            row = Row("cross_entropy", impl, ours_backend if impl == "ours" else "torch", mode, asdict(s))
            if impl == "ours" and ours_backend.startswith("n/a"):
                row.status = ours_backend
            else:
                _measure(row, _ce_runner(fn, hidden, weight, mode), flops, device, reps, warmup)
            mode_rows.append(row)
        _fill_speedups(mode_rows, baseline="naive")
        rows += mode_rows
        _print_rows(mode_rows)
    return rows


def ce_peak_rss(n: int = 4096, d: int = 256, v: int = 65536) -> dict:
    """Peak RSS above the inputs of fused and naive CE fwd+bwd, each in a fresh process."""
    result = {"N": n, "D": d, "V": v}
    for variant in ("fused", "naive"):
        cmd = [sys.executable, "-m", "bench.ce_memory", "--variant", variant, "--n", str(n), "--d", str(d),
               "--v", str(v)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if out.returncode != 0:
            result[variant + "_mib"] = None
            print(f"ce_memory {variant} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        result[variant + "_mib"] = int(out.stdout.split()[-1]) / 2**20
        print(out.stdout.splitlines()[0])
    if result.get("fused_mib") and result.get("naive_mib"):
        result["ratio"] = result["fused_mib"] / result["naive_mib"]
    return result


def attention_flops(b: int, h: int, n: int, d: int, causal: bool, mode: str) -> float:
    """FLOPs of attention; the attention module's own count when it has one."""
    own = getattr(attention_module, "attention_flops", None)
    if own is not None:
        return float(own(b, h, n, d, causal, "fwd_bwd" if mode == "fwd+bwd" else mode))
    fwd = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)  # QK^T and PV
    return fwd if mode == "fwd" else fwd * 3.5  # bwd = 2.5 x fwd


def _attention_runner(fn, q, k, v, do, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def run_bwd():
        qg.grad = kg.grad = vg.grad = None
        fn(qg, kg, vg).backward(do)
    return run_bwd


def _ce_runner(fn, hidden, weight, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(hidden, weight)
        return run
    hg, wg = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()

    def run_bwd():
        hg.grad = wg.grad = None
        fn(hg, wg).backward()
    return run_bwd


def _measure(row: Row, run: Callable[[], None], flops: float, device: torch.device, reps: int, warmup: int) -> None:
    """Median time, TFLOP/s and (CUDA) peak memory of ``run``; errors become the row's status."""
    try:
        row.ms = time_ms(run, device, reps, warmup)
        row.tflops = flops / (row.ms * 1e-3) / 1e12
        row.peak_mib = peak_memory_mib(run, device)
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as e:  # OOM, or a shape the kernel refuses
        row.status = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        row.ms = row.tflops = row.peak_mib = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_ms(run: Callable[[], None], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time per call in ms (CUDA events on GPU so launch overhead is counted once)."""
    for _ in range(warmup):
        run()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mib(run: Callable[[], None], device: torch.device) -> float | None:
    """Extra CUDA memory one call needs above what is already allocated; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _fill_speedups(rows: list[Row], baseline: str) -> None:
    base = next((r for r in rows if r.impl == baseline and r.ms), None)
    for r in rows:
        if base is not None and r.ms:
            r.speedup_vs_baseline = base.ms / r.ms


def _print_rows(rows: list[Row]) -> None:
    for r in rows:
        ms = f"{r.ms:9.3f} ms" if r.ms else "      n/a   "
        sp = f"x{r.speedup_vs_baseline:.2f}" if r.speedup_vs_baseline else ""
        print(f"{r.op:13s} {r.mode:7s} {r.impl:5s} {r.backend:6.6s} {_shape_str(r):28s} {ms} {sp:7s} {r.status}",
              flush=True)


# --------------------------------------------------------------------------------------------
# header and output files
# --------------------------------------------------------------------------------------------


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": name,
        "slug": device_slug(device, name),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_threads": torch.get_num_threads(),
    }


def device_slug(device: torch.device, name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"[:60].rstrip("-")


def write_results(out: Path, header: dict, rows: list[Row]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / header["slug"]
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=1)
    stem.with_suffix(".md").write_text(render_markdown(header, rows))
    print(f"wrote {stem}.json and {stem}.md")


def render_markdown(header: dict, rows: list[Row]) -> str:
    cpu = header["device"] == "cpu"
    lines = [
        f"# Kernel benchmarks: {header['device_name']} ({header['device'].upper()})",
        "",
        f"torch {header['torch']}, triton {header['triton']}, {header['date']}, "
        f"{'quick run, ' if header.get('quick') else ''}median of {header['reps']} after {header['warmup']} warmup.",
        "",
    ]
    if cpu:
        lines += [
            f"**CPU run ({header['cpu_threads']} threads, shared machine).** Absolute times and TFLOP/s are not "
            "meaningful for the GPU kernels; read the speedup column (same process, same shapes). On CPU "
            "'ours' runs the torch path unless TRITON_INTERPRET=1 (then the Triton interpreter, which is slow by design). "
            "Peak memory is not tracked per row on CPU; `python -m bench.ce_memory` measures the CE peak RSS.",
            "",
        ]
    mem = header.get("ce_peak_rss")
    if mem and mem.get("ratio"):
        lines += [
            f"CE peak memory (fwd+bwd, fp32, N={mem['N']} D={mem['D']} V={mem['V']}, peak RSS above the inputs, "
            f"fresh process each): fused {mem['fused_mib']:.0f} MiB vs naive {mem['naive_mib']:.0f} MiB "
            f"= {mem['ratio']:.3f} (1/{1 / mem['ratio']:.1f}).",
            "",
        ]
    lines += [
        f"Roofline (H100 SXM; an H200 has the same tensor-core peak and 4.8 TB/s): {H100_BF16_TFLOPS:g} TFLOP/s dense "
        f"bf16, {H100_HBM_TBPS:g} TB/s HBM3, so a kernel "
        f"is compute-bound above {H100_BF16_TFLOPS / H100_HBM_TBPS:.0f} FLOP/byte. Attention forward does "
        "4·B·H·N²·D FLOPs (×0.5 causal, backward ×2.5) over ≈ 8·B·H·N·D bytes of bf16 q/k/v/o: ≈ N/2 FLOP/byte, "
        "compute-bound for N ≥ 1024. Fused CE does 2·N·D·V (fwd) / 6·N·D·V (fwd+bwd) FLOPs; the naive path also "
        "writes and re-reads 4·N·V bytes of fp32 logits (and their gradient), which the fused path keeps to one chunk.",
        "",
        "| op | mode | impl | backend | shape | dtype | ms | TFLOP/s | % H100 peak | peak MiB | speedup vs torch | status |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pct = "—" if cpu or r.tflops is None else f"{100 * r.tflops / H100_BF16_TFLOPS:.1f}"
        lines.append(
            f"| {r.op} | {r.mode} | {r.impl} | {r.backend if not r.backend.startswith('n/a') else 'n/a'} | "
            f"{_shape_str(r)} | {r.shape.get('dtype')} | {_fmt(r.ms, 3)} | {_fmt(r.tflops, 3)} | {pct} | "
            f"{_fmt(r.peak_mib, 0)} | {_fmt(r.speedup_vs_baseline, 2)} | {r.status} |"
        )
    lines += ["", "Baselines: attention → torch SDPA; cross_entropy → naive logits + F.cross_entropy (speedup = "
              "baseline ms / row ms, measured in the same run).", ""]
    return "\n".join(lines)


def _shape_str(r: Row) -> str:
    s = r.shape
    if r.op == "attention":
        return f"B{s['b']} H{s['h']} N{s['n']} D{s['d']}{' causal' if s['causal'] else ''}"
    return f"N{s['n']} D{s['d']} V{s['v']}"


def _fmt(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    main()
