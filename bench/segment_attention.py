"""Sentence attention, two routes: segment ids inside the kernel vs sentences reshaped into padded rows.

    python -m bench.segment_attention [--rounds 3]      # CPU: Triton runs under its interpreter

"ids" passes ``segment_ids`` (position // L) to ``flash_attention`` on the packed row; "rows" is the
older route (``lvm.model.segment_attention_as_rows``): pad each row to a multiple of L, make every
sentence a batch row, run causal attention. Both routes, on the same kernel backend, time forward +
backward on the same inputs, alternating in rounds; the table gives the ratio of median times
(rows / ids: above 1 means the ids route is faster). Under the interpreter a time measures Python
per launched program, not a GPU, so read the CPU figure as "fewer, fuller programs", nothing more.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton binds it then

from kernels import flash_attention  # noqa: E402
from kernels.dispatch import triton_usable  # noqa: E402
from lvm.model import segment_attention_as_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (B, H, T, D, L): rows of packed 51-token sentences (7x7 image + 2 specials), and short sentences
SHAPES = [(8, 8, 2040, 64, 51), (8, 8, 2048, 64, 256)] if CUDA else [(2, 2, 255, 32, 51), (2, 2, 255, 32, 16)]


def _routes(L: int, backend: str):
    def ids(q, k, v):
        seg = (torch.arange(q.shape[2], device=q.device) // L).expand(q.shape[0], q.shape[2])  # [B, T]
        return flash_attention(q, k, v, causal=True, backend=backend, segment_ids=seg)

    def rows(q, k, v):
        os.environ["LVM_KERNELS"] = backend  # the rows route dispatches through the process default
        return segment_attention_as_rows(q, k, v, L)

    return {"ids": ids, "rows": rows}


def _time(fn, q, k, v, do) -> float:
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    torch.autograd.grad(fn(*leaves), leaves, do)
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dtype = torch.bfloat16 if CUDA else torch.float32
    backends = (["triton"] if triton_usable(DEVICE) else []) + ["torch"]
    print("| backend | B, H, T, D | sentence L | rows / ids time (fwd+bwd) |")
    print("|---|---|---|---|")
    for backend in backends:
        for B, H, T, D, L in SHAPES:
            g = torch.Generator().manual_seed(0)
            q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype) for _ in range(4))
            routes = _routes(L, backend)
            times = {name: [] for name in routes}
            for name, fn in routes.items():  # warm-up: compile / first-launch costs out of the figure
                _time(fn, q, k, v, do)
            for _ in range(args.rounds):
                for name, fn in routes.items():
                    times[name].append(_time(fn, q, k, v, do))
            ratio = statistics.median(times["rows"]) / statistics.median(times["ids"])
            print(f"| {backend}{' (interpreter)' if backend == 'triton' and not CUDA else ''} | "
                  f"{B}, {H}, {T}, {D} | {L} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
