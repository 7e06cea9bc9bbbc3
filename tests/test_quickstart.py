"""`lvm quickstart --fast` end to end on a small labelled .npz, then a resumed re-run."""
import json

import pytest

from lvm.quickstart import QuickstartConfig, quickstart


def test_quickstart_fast_end_to_end_and_resume(tiny_pipeline, tmp_path):
    cfg = QuickstartConfig(out=str(tmp_path / "qs"), source=tiny_pipeline["npz"], fast=True,
                           probe_fractions=[0.5, 1.0])
    summary = quickstart(cfg)
    out = tmp_path / "qs"
    for name in ("report.md", "loss_curve.png", "tokenizer/recon.png", "generate/grid.png",
                 "probe/label_efficiency.png", "probe/probe.json", "lvm/latest/model.safetensors"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "raw pixels" in report and "![completions](generate/grid.png)" in report
    assert summary["eval_loss"] < summary["unigram_entropy"] + 1.0
    stamp = (out / "probe" / "probe.json").stat().st_mtime_ns
    again = quickstart(cfg)  # finished stages are skipped, not redone
    assert (out / "probe" / "probe.json").stat().st_mtime_ns == stamp
    assert again["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)  # metrics.jsonl keeps 5 decimals
    assert json.loads((out / "quickstart_config.json").read_text())["fast"] is True
