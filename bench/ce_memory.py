"""Peak host memory of one linear + cross-entropy forward+backward, measured in a fresh process.

Why a subprocess and RSS: on CPU there is no ``max_memory_allocated``; the kernel's claim (never
hold ``[N, V]``) shows up as the process' peak resident set. The peak is reset after the inputs
exist (``/proc/self/clear_refs``), so the figure is what the loss itself costs.

    python -m bench.ce_memory --variant fused   # or naive; last line: "peak_delta_bytes <int>"
"""
from __future__ import annotations

import argparse
import time

import torch

from kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference


def read_status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure from /proc/self/status, in KiB (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this probe needs Linux.")


def reset_peak_rss() -> bool:
    """Make VmHWM restart from the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(variant: str, n: int, d: int, v: int, backend: str = "torch", seed: int = 0) -> dict:
    """Run ``variant`` once (forward + backward) and return its peak RSS above the inputs' baseline."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()  # [N, D]
    weight = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()  # [V, D]
    target = torch.randint(0, v, (n,), generator=g)  # [N]
    reset = reset_peak_rss()
    baseline = read_status_kib("VmRSS")
    start = time.perf_counter()
    if variant == "fused":
        loss = fused_linear_cross_entropy(hidden, weight, target, backend=backend)
    elif variant == "naive":
        loss = linear_cross_entropy_reference(hidden, weight, target)
    else:
        raise ValueError(f"--variant {variant!r}: pick 'fused' or 'naive'.")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = read_status_kib("VmHWM")
    return {
        "variant": variant,
        "N": n,
        "D": d,
        "V": v,
        "loss": loss.detach().item(),
        "seconds": seconds,
        "baseline_bytes": baseline * 1024,
        "peak_delta_bytes": (peak - baseline) * 1024,
        "peak_reset": reset,
        "naive_logits_bytes": n * v * 4,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["fused", "naive"], required=True)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=65536)
    p.add_argument("--backend", default="torch", help="backend for the fused variant (torch|triton|auto)")
    args = p.parse_args(argv)
    r = measure(args.variant, args.n, args.d, args.v, args.backend)
    mib = 2**20
    print(
        f"{r['variant']}: N={r['N']} D={r['D']} V={r['V']} loss={r['loss']:.4f} time={r['seconds']:.2f}s "
        f"peak above inputs={r['peak_delta_bytes'] / mib:.0f} MiB "
        f"(one fp32 [N, V] logits = {r['naive_logits_bytes'] / mib:.0f} MiB; peak reset: {r['peak_reset']})"
    )
    print(f"peak_delta_bytes {r['peak_delta_bytes']}")


if __name__ == "__main__":
    main()
