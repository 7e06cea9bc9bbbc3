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


def test_default_pretraining_length_follows_the_hardware(monkeypatch):
    """1500 steps only where bf16 is fast (AMX CPU or CUDA); fp32 machines get 500 to stay in the time budget."""
    import kernels.dispatch
    import torch

    from lvm.quickstart import default_lvm_steps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernels.dispatch, "cpu_has_fast_bf16", lambda: True)
    assert default_lvm_steps("auto") == 1500 and default_lvm_steps("bf16") == 1500
    assert default_lvm_steps("fp32") == 500
    monkeypatch.setattr(kernels.dispatch, "cpu_has_fast_bf16", lambda: False)
    assert default_lvm_steps("auto") == 500
