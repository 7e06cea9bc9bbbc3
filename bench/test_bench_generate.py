"""Generation speed with and without the KV cache (small preset, 256 new tokens, greedy).

Without a cache every step re-runs the whole sequence, so the work grows with the square of the
length; with it each step runs one token. Run as a benchmark suite
(``pytest bench/test_bench_generate.py``) or as a script that prints the ratio
(``python -m bench.test_bench_generate``).
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from lvm.config import LVMConfig
from lvm.model import LVM

VOCAB = 1024 + 4  # a 1024-code tokenizer plus BOS/SEP/EOS/PAD
PROMPT_LEN = 16
NEW_TOKENS = 256


def build(preset: str = "small", batch: int = 1, seed: int = 0) -> tuple[LVM, torch.Tensor]:
    torch.manual_seed(seed)
    model = LVM(LVMConfig.preset(preset, vocab_size=VOCAB)).eval()
    prompt = torch.randint(0, VOCAB, (batch, PROMPT_LEN))
    return model, prompt


def generate(model: LVM, prompt: torch.Tensor, use_cache: bool, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)


@pytest.fixture(scope="module")
def small_model():
    """One intra-op thread: on a shared, loaded CPU more threads mostly time the contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generate_small(benchmark, small_model, use_cache):
    model, prompt = small_model
    out = benchmark.pedantic(generate, args=(model, prompt, use_cache), rounds=2, warmup_rounds=1)
    assert out.shape == (1, PROMPT_LEN + NEW_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 gives steady figures on a shared, loaded machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, prompt = build(args.preset, args.batch)
    times = {}
    outputs = {}
    for use_cache in (True, False):
        generate(model, prompt, use_cache, new_tokens=8)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs[use_cache] = generate(model, prompt, use_cache, new_tokens=args.new_tokens)
            best = min(best, time.perf_counter() - start)
        times[use_cache] = best
    new = args.new_tokens * args.batch
    print(f"preset={args.preset} batch={args.batch} prompt={PROMPT_LEN} new_tokens={args.new_tokens} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"with cache:    {times[True]:7.3f} s  ({new / times[True]:8.1f} tok/s)")
    print(f"without cache: {times[False]:7.3f} s  ({new / times[False]:8.1f} tok/s)")
    print(f"speed-up from KV cache: {times[False] / times[True]:.1f}x; "
          f"same greedy tokens: {torch.equal(outputs[True], outputs[False])}")


if __name__ == "__main__":
    main()
