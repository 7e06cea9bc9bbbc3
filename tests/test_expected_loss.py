"""Expected-loss regression: training on real Fashion-MNIST tokens must follow the recorded curve.

The assets are 4,000 train / 500 test images of Fashion-MNIST tokenized by the default tokenizer
(7x7 FSQ ids, 1000 codes). Two independent checks: the held-out loss ends clearly below the
unigram entropy of the tokens (a model that ignores context), and the eval curve stays within
``TOLERANCE`` nats of the one recorded in ``assets/expected_loss.json``. To re-record after an
intended change to training numerics: ``python tests/test_expected_loss.py --record``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
TOKENS = ASSETS / "fmnist_tokens"
CURVES = ASSETS / "expected_loss.json"
TOLERANCE = 0.03  # nats; the run is deterministic on one machine, this absorbs other BLAS builds

RUNS = {
    # ~15 s on 2 cores: part of the default suite.
    "tiny": dict(preset="tiny", context_len=255, steps=60, batch_size=8, lr=3e-3, warmup_steps=10,
                 eval_every=20, eval_rows=20),
    # ~3-4 minutes: the `small` preset, marked slow.
    "small": dict(preset="small", context_len=510, steps=150, batch_size=8, lr=2e-3, warmup_steps=20,
                  eval_every=50, eval_rows=20),
}


def run_curve(name: str, out: Path) -> list[list[float]]:
    from lvm.train import TrainConfig, train

    threads = torch.get_num_threads()
    try:
        cfg = TrainConfig(data=str(TOKENS / "train"), eval_data=str(TOKENS / "test"), out=str(out), seed=0,
                          ckpt_every=10_000, log_every=10, threads=1, progress=False, kernels="torch",
                          precision="fp32", **RUNS[name])
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r]


def unigram_entropy() -> float:
    tokens = np.fromfile(TOKENS / "train" / "tokens.bin", dtype=np.uint16)
    p = np.bincount(tokens) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("name", [pytest.param("tiny"), pytest.param("small", marks=pytest.mark.slow)])
def test_training_follows_expected_curve(name, tmp_path):
    curve = run_curve(name, tmp_path)
    expected = json.loads(CURVES.read_text())[name]
    assert expected["config"] == RUNS[name], "the asset was recorded with another config; re-record it"
    final = curve[-1][1]
    assert final < unigram_entropy() - 0.3, f"eval loss {final:.3f} is not clearly below the unigram entropy"
    assert [s for s, _ in curve] == [s for s, _ in expected["eval_curve"]]
    for (step, got), (_, want) in zip(curve, expected["eval_curve"]):
        assert abs(got - want) <= TOLERANCE, f"step {step}: eval loss {got:.4f} vs expected {want:.4f}"


def record() -> None:
    """Re-run every configuration and overwrite the asset (only after an intended numerics change)."""
    import tempfile

    curves = {}
    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            curves[name] = {"config": RUNS[name], "eval_curve": run_curve(name, Path(tmp)),
                            "unigram_entropy": unigram_entropy(), "torch": torch.__version__}
        print(name, curves[name]["eval_curve"])
    CURVES.write_text(json.dumps(curves, indent=2) + "\n")


if __name__ == "__main__":
    if "--record" in sys.argv:
        record()
