"""Training loop: exact resume, crash-safe checkpoints, divergence stop, torchrun parity."""
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import lvm.train as train_mod
from lvm.runtime import ConfigError, cpu_has_fast_bf16, device_name_ok, mixed_precision, pick_device
from lvm.data import DataError, PackedBatches
from lvm.model import LVM
from lvm.train import TrainConfig, TrainingDiverged, train

CODEBOOK = 32


@pytest.fixture
def make_shards(pixel_shards):
    def make(path, n=120, fingerprint="pix", seed=0):
        """Learnable toy images: each row repeats one random id."""
        rng = np.random.default_rng(seed)
        ids = np.repeat(rng.integers(0, CODEBOOK, (n, 3, 1)), 3, axis=2)
        return pixel_shards(path, ids, CODEBOOK, fingerprint)

    return make


@pytest.fixture
def cfg(tmp_path, make_shards):
    return TrainConfig(data=make_shards(tmp_path / "shards"), out=str(tmp_path / "run"), preset="tiny",
                       context_len=44, steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4,
                       ckpt_every=4, log_every=1, eval_rows=4, eval_fraction=0.1, progress=False)


def _free_port() -> int:
    """A port nobody listens on now: a fixed one can still be held (TIME_WAIT) by the previous torchrun."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(run_dir):
    return LVM.from_pretrained(os.path.join(run_dir, "latest")).state_dict()


def _losses(run_dir):
    lines = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_exact_resume(cfg, tmp_path, monkeypatch):
    straight = train(cfg)
    assert straight["steps"] == 8
    resumed_cfg = replace(cfg, out=str(tmp_path / "resumed"))
    original = PackedBatches.batch

    def interrupt_at_5(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(PackedBatches, "batch", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_cfg)
    monkeypatch.setattr(PackedBatches, "batch", original)
    assert os.path.basename(os.readlink(tmp_path / "resumed" / "latest")) == "ckpt-000004"
    train(resumed_cfg)
    a, b = _weights(cfg.out), _weights(resumed_cfg.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(cfg.out) == _losses(resumed_cfg.out)  # same curve, no duplicated step 5
    assert [s for s, _ in _losses(cfg.out)] == list(range(1, 9))
    again = train(cfg)  # a finished run started again trains nothing and reports its last figures
    assert again["steps"] == 8 and again["loss"] == _losses(cfg.out)[-1][1]
    assert again["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-4)


def test_loss_decreases_and_metrics(cfg):
    summary = train(replace(cfg, steps=30, eval_every=30, ckpt_every=30))
    records = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert records[0]["loss"] > records[-1]["loss"] + 0.5
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(records[-1])
    assert summary["eval_loss"] == pytest.approx(records[-1]["eval_loss"], abs=1e-4)
    assert json.load(open(os.path.join(cfg.out, "train_config.json")))["steps"] == 30


def test_crash_while_checkpointing_keeps_previous(cfg, monkeypatch):
    real_save, calls = torch.save, []

    def dying_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint dies half-written
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    latest = os.path.join(cfg.out, "latest")
    assert os.path.basename(os.readlink(latest)) == "ckpt-000004"
    LVM.from_pretrained(latest)  # loadable
    assert train(cfg)["steps"] == 8  # and resumable


def test_nan_loss_stops_and_keeps_checkpoint(cfg, monkeypatch):
    real_forward, calls = LVM.forward, []

    def poisoned(self, ids, targets=None, **kwargs):
        out = real_forward(self, ids, targets, **kwargs)
        calls.append(1)
        if targets is not None and self.training and len(calls) > 6:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LVM, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(cfg)
    assert os.path.basename(os.readlink(os.path.join(cfg.out, "latest"))) == "ckpt-000004"


@pytest.mark.parametrize("sentence_attention", [True, False])
def test_sentence_attention_reaches_the_model(cfg, monkeypatch, sentence_attention):
    """Training and eval forwards get the sentence length (3x3 ids + BOS + EOS) as segment_len, or None."""
    real_forward, seen = LVM.forward, set()

    def spy(self, ids, targets=None, segment_len=None):
        seen.add(segment_len)
        return real_forward(self, ids, targets, segment_len=segment_len)

    monkeypatch.setattr(LVM, "forward", spy)
    train(replace(cfg, steps=4, sentence_attention=sentence_attention))
    assert seen == ({11} if sentence_attention else {None})


def test_mixed_precision_contexts():
    cpu, layer, x = torch.device("cpu"), torch.nn.Linear(4, 4), torch.randn(2, 4)
    with mixed_precision(cpu, "fp32"):
        assert layer(x).dtype == torch.float32
    with mixed_precision(cpu, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with mixed_precision(cpu, "auto"):
        want = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        assert layer(x).dtype == want
    with pytest.raises(ValueError, match="precision"):
        mixed_precision(cpu, "fp8")


def test_bf16_training_learns_and_keeps_fp32_weights(cfg):
    summary = train(replace(cfg, steps=30, eval_every=30, ckpt_every=30, precision="bf16"))
    records = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert records[0]["loss"] > records[-1]["loss"] + 0.5 and math.isfinite(summary["eval_loss"])
    assert all(t.dtype == torch.float32 for t in _weights(cfg.out).values())


def test_bad_precision_is_named(cfg):
    with pytest.raises(ValueError, match="--precision 'half'"):
        train(replace(cfg, precision="half"))


def test_resume_with_other_tokenizer_refused(cfg, tmp_path, make_shards):
    train(replace(cfg, steps=4))
    other = make_shards(tmp_path / "other", fingerprint="other-tok")
    with pytest.raises(DataError, match="tokenizer"):
        train(replace(cfg, data=other))


def test_eval_data_of_another_tokenizer_refused(cfg, tmp_path, make_shards):
    other = make_shards(tmp_path / "other-eval", fingerprint="other-tok")
    with pytest.raises(DataError, match="--eval-data .* tokenizer fingerprints differ"):
        train(replace(cfg, eval_data=other))


def test_context_too_short(cfg):
    with pytest.raises(DataError, match="too short"):
        train(replace(cfg, context_len=8))


def test_incomplete_checkpoint_dir(cfg):
    train(replace(cfg, steps=4))
    os.remove(os.path.join(cfg.out, "latest", "optimizer.pt"))
    from lvm.runtime import CheckpointError

    with pytest.raises(CheckpointError, match="optimizer.pt"):
        train(cfg)


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("mode", ["single", "ddp", "fsdp"])
def test_parallel_modes_match_single_process(cfg, tmp_path, mode, grad_accum):
    """{one process, two DDP processes, two FSDP2 processes} x {grad-accum 1, 2} all follow the loss curve
    and weights of one process without accumulation (same global batch). The FSDP run is also stopped
    after its first step and resumed, from the full-state checkpoint it wrote."""
    # fp32: bf16 matmuls round differently for 2 rows than for 4, and this test is about exact parity
    single = replace(cfg, steps=4, out=str(tmp_path / "single"), precision="fp32")
    train(single)
    run_dir = tmp_path / f"{mode}-{grad_accum}"
    if mode == "single":
        train(replace(single, out=str(run_dir), grad_accum=grad_accum))
    else:
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                "-m", "lvm.cli", "train", "--data", cfg.data, "--out", str(run_dir), "--preset", "tiny",
                "--context-len", "44", "--steps", "4", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
                "--eval-every", "4", "--ckpt-every", "4", "--log-every", "1", "--eval-rows", "4",
                "--eval-fraction", "0.1", "--no-progress", "--precision", "fp32", "--grad-accum", str(grad_accum),
                "--threads", "1", "--fsdp" if mode == "fsdp" else "--no-fsdp"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        port = args.index("--master_port=0")
        if mode == "fsdp":  # one step under a tiny time budget, then a resumed run does the rest
            args[port] = f"--master_port={_free_port()}"
            first = subprocess.run([*args, "--time-budget", "0.0001"], capture_output=True, text=True, timeout=240,
                                   env=env)
            assert first.returncode == 0, first.stderr[-3000:]
            assert len(_losses(str(run_dir))) == 1  # stopped after one step by the budget
        args[port] = f"--master_port={_free_port()}"  # a fixed port can still be held by the previous run
        proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = _losses(str(run_dir)), _losses(single.out)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    np.testing.assert_allclose([l for _, l in ours], [l for _, l in ref], rtol=1e-4, atol=1e-4)
    a, b = _weights(str(run_dir)), _weights(single.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_time_budget_fits_the_run_and_is_reproducible_from_its_step_count(cfg, tmp_path, monkeypatch):
    """A budgeted run chooses its length during warmup; a run told that length reproduces it exactly."""
    from functools import partial

    from lvm.runtime import StepBudget

    ticks = iter(range(10**6))  # a clock that advances 0.1 s per reading: the test does not depend on load
    monkeypatch.setattr(train_mod, "StepBudget", partial(StepBudget, clock=lambda: 0.1 * next(ticks)))
    budgeted = replace(cfg, steps=100_000, warmup_steps=6, time_budget=0.05, eval_every=1000, ckpt_every=1000,
                       log_every=5)
    first = train(budgeted)
    assert not first["stopped_early"]
    n = first["planned_steps"]
    assert 6 <= n < 100_000 and first["steps"] == n
    state = json.load(open(os.path.join(cfg.out, "latest", "trainer_state.json")))
    assert state["planned_steps"] == n
    fixed = train(replace(budgeted, steps=n, time_budget=0.0, out=str(tmp_path / "fixed")))
    a, b = _weights(cfg.out), _weights(fixed["out"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_budget_decides_from_measured_steps():
    from lvm.runtime import StepBudget

    now = [0.0]
    budget = StepBudget(100.0, max_steps=10_000, warmup=10, skip=2, margin=0.0, clock=lambda: now[0])
    now[0] = 10.0  # setup and compilation
    for done in range(1, 11):
        now[0] += 5.0 if done <= 2 else 1.0  # the first two steps are slow (compile), then 1 s/step
        decided = budget.observe(done)
        assert decided == (done == 10)
    # at done = 10: 28 s spent, 1 s/step measured over steps 3..10 -> 72 more steps
    assert budget.steps == 82 and budget.fitted
    assert not budget.out_of_time()
    now[0] = 101.0
    assert budget.out_of_time()
    short = StepBudget(100.0, max_steps=50, warmup=2)  # a warmup too short to measure in: no fitting
    assert short.decided and not short.fitted and short.steps == 50


def test_step_budget_revises_a_plan_made_while_the_machine_was_slow():
    """A run whose first steps ran at 2 s/step and the rest at 1 s/step ends up using its budget, and the
    plan only moves at checks inside the revisable first half, by more than the tolerance."""
    from lvm.runtime import StepBudget

    def run(revise_until: float, slow_until: int) -> tuple[StepBudget, float, list[int]]:
        now = [0.0]
        budget = StepBudget(1000.0, max_steps=100_000, warmup=10, skip=2, margin=0.0, clock=lambda: now[0],
                            decide_by=10, revise_until=revise_until, revise_every=50)
        checks, done = [], 0
        while done < budget.steps:
            done += 1
            now[0] += 2.0 if done <= slow_until else 1.0
            if budget.observe(done):
                checks.append(done)
        return budget, now[0], checks

    once, once_s, _ = run(0.0, slow_until=100)
    assert once.steps == 10 + (1000 - 20) // 2 and once.revisions == []  # 500: the slow rate, planned once
    assert once_s < 0.8 * 1000  # a fifth of the budget left unused
    revised, revised_s, checks = run(0.5, slow_until=100)
    assert revised.revisions and all(step <= 0.5 * steps for step, steps in revised.revisions)
    assert revised.revisions[-1][1] == revised.steps > once.steps
    assert 0.97 * 1000 <= revised_s <= 1000  # the budget used, not overrun
    assert checks[0] == 10 and all(b - a == 50 for a, b in zip(checks, checks[1:]))
    assert checks[-1] <= 0.5 * revised.steps
    steady, _, _ = run(0.5, slow_until=0)  # a steady rate: checks find the plan within tolerance
    assert steady.revisions == [] and steady.steps == 10 + (1000 - 10) // 1


def test_shape_overrides_replace_the_presets_dimensions(cfg):
    """--n-layer/--n-head/--d-model size the model (the wide/shallow lever); unset ones keep the preset's."""
    train(replace(cfg, steps=2, n_layer=1, d_model=96, n_head=3))
    model = LVM.from_pretrained(os.path.join(cfg.out, "latest"))
    assert (model.config.n_layer, model.config.n_head, model.config.d_model) == (1, 3, 96)
    assert len(model.blocks) == 1 and model.tok_emb.weight.shape[1] == 96


def test_device_names_are_checked_the_same_way_before_and_when_a_device_is_picked():
    """Configs check a device name up front with device_name_ok; pick_device refuses exactly the names it rejects."""
    assert [device_name_ok(n) for n in ("auto", "cpu", "cuda", "cuda:1", "tpu", "CPU", "")] == \
        [True, True, True, True, False, False, False]
    assert pick_device("cpu") == torch.device("cpu")
    for name in ("tpu", "CPU", ""):
        with pytest.raises(ConfigError, match=f"--device {name!r} is not one of auto, cpu, cuda"):
            pick_device(name)
