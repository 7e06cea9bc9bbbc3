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
    choice = json.loads((out / "probe" / "probe.json").read_text())["pixels_choice"]  # --probe-pixels auto
    assert f"(this run: {'kept' if choice['kept'] else 'left out'}; states + pixels" in report
    rows = json.loads((out / "probe" / "probe.json").read_text())["rows"]
    cnn = {r["fraction"]: r for r in rows if r["features"] == "supervised CNN"}  # --supervised auto: on in --fast
    assert sorted(cnn) == [0.5, 1.0] and cnn[0.5]["runs"] == 3 and cnn[1.0]["runs"] == 1
    assert "| supervised CNN |" in (out / "probe" / "probe.md").read_text()
    assert "`supervised CNN` is what a user would do without the LVM" in report
    assert "capped at 30 steps of 128 images" in report and "supervised CNN baseline" not in report  # not left out
    assert summary["eval_loss"] < summary["unigram_entropy"] + 1.0
    _check_classifier(out, tiny_pipeline["npz"], report)
    stamp = (out / "probe" / "probe.json").stat().st_mtime_ns
    again = quickstart(cfg)  # finished stages are skipped, not redone
    assert (out / "probe" / "probe.json").stat().st_mtime_ns == stamp
    assert again["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)  # metrics.jsonl keeps 5 decimals
    assert json.loads((out / "quickstart_config.json").read_text())["fast"] is True


def test_quickstart_probe_mirror_ships_the_mirrored_probe_as_its_classifier(tiny_pipeline, tmp_path):
    """--probe-mirror: the probe stage's linear rows are fitted on images and mirrors, the bundle averages both
    versions (bundle.json says so) and scores on the test images what its row reported; the report says it."""
    import numpy as np

    from lvm import Classifier
    from tokenizer.images import load_images

    out = tmp_path / "qs"
    quickstart(QuickstartConfig(out=str(out), source=tiny_pipeline["npz"], fast=True, probe_fractions=[1.0],
                                probe_mirror=True, probe_pixels="off", supervised="off"))
    rows = json.loads((out / "probe" / "probe.json").read_text())["rows"]
    (row,) = [r for r in rows if r["features"].startswith("lvm (layer")]
    assert row["features"].endswith(", mirrored")
    meta = json.loads((out / "classifier" / "bundle.json").read_text())
    assert meta["mirror"] is True and "their mirrors" in meta["metrics"]["fitted"]
    clf = Classifier.from_pretrained(out / "classifier")
    test = load_images(tiny_pipeline["npz"], "test", size=clf.image_size, channels=clf.channels, limit=1000)
    labels, _ = clf.predict(test.images)
    assert abs(float(np.mean([label == str(y) for label, y in zip(labels, test.labels)])) - row["acc_mean"]) <= 0.005
    assert "`, mirrored`" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="--probe-mirror is a linear-probe option"):
        quickstart(QuickstartConfig(out=str(tmp_path / "bad"), probe_mirror=True, probe_methods=["attentive"]))


def _check_classifier(out, source, report):
    """The probe's 100 %-labels linear probe shipped as a bundle: it loads as a user loads it, scores on the test
    images what the probe reported, records that as its test accuracy, and the report shows and runs it."""
    import numpy as np

    from lvm import Classifier
    from tokenizer.images import load_images

    probe = json.loads((out / "probe" / "probe.json").read_text())
    row = next(r for r in probe["rows"] if r["features"].startswith("lvm (layer") and r["method"] == "linear"
               and r["fraction"] == 1.0)
    clf = Classifier.from_pretrained(out / "classifier")
    assert f"lvm (layer {clf.layer})" + (" + pixels" if clf.head.pixels else "") == row["features"]
    test = load_images(source, "test", size=clf.image_size, channels=clf.channels, limit=1000)
    labels, _ = clf.predict(test.images)
    accuracy = float(np.mean([label == str(y) for label, y in zip(labels, test.labels)]))
    assert abs(accuracy - row["acc_mean"]) <= 0.005, (accuracy, row)
    metrics = json.loads((out / "classifier" / "bundle.json").read_text())["metrics"]
    assert metrics["test_accuracy"] == row["acc_mean"] and metrics["test_images"] == len(test)
    assert metrics["train_images"] == row["n_labels"] and "never used to fit or choose" in metrics["test_accuracy_is"]
    assert (out / "classifier" / "predictions.png").stat().st_size > 1000
    shown = sorted((out / "examples").glob("*.png"))
    assert 8 <= len(shown) <= 32
    assert "## 5. Your classifier" in report and "![predictions](classifier/predictions.png)" in report
    assert f"lvm predict --model {out / 'classifier'} --images {out / 'examples'} --out preds.csv" in report
    assert f"lvm serve --model {out / 'classifier'} --port 8000" in report and "lvm export --model" in report


def test_budget_shares_follow_the_measured_fixed_stages(tmp_path, monkeypatch):
    """The trained stages get what the fixed stages' estimates leave; the record adds up what ran."""
    import lvm.quickstart as qs

    fake = {"forward_images_per_s": 1.0, "encode_images_per_s": 1.0, "fit_pass_s": 0.1,
            "tokenize_s": 120.0, "probe_s_per_model": 250.0, "probe_pixels_s": 100.0}
    monkeypatch.setattr(qs, "measure_speeds", lambda precision, shape=None, pixels=False, mirror=False: fake)
    budget = qs.Budget.load_or_plan(tmp_path, QuickstartConfig(out=str(tmp_path), time_budget=30))
    left = 1800 - 120 - 600 - qs.SLACK_S
    assert budget.share("tokenizer") == pytest.approx(qs.TOKENIZER_SHARE * left)
    budget.stages["tokenizer"]["seconds"] = 200.0  # what the two first stages really took
    budget.stages["tokenize"]["seconds"] = 100.0
    assert budget.share("pretrain") == pytest.approx(1800 - 300 - 600 - qs.SLACK_S)
    again = qs.Budget.load_or_plan(tmp_path, QuickstartConfig(out=str(tmp_path), time_budget=5))
    assert again.total_s == 1800 and again.stages["tokenize"]["seconds"] == 100.0  # a resumed run keeps its plan
    lines = "\n".join(qs.budget_lines(again, QuickstartConfig()))
    assert "30-minute budget" in lines and "| tokenize | 120.0 | 100.0 |" in lines
    assert budget.measured["random_init"] and "left out" not in lines  # 600 s <= a third of 30 min
    slow = dict(fake, probe_s_per_model=400.0)  # 900 s > 600 s: the random-init model is left out
    monkeypatch.setattr(qs, "measure_speeds", lambda precision, shape=None, pixels=False, mirror=False: dict(slow))
    tight = qs.Budget.load_or_plan(tmp_path / "slow", QuickstartConfig(time_budget=30))
    assert not tight.measured["random_init"] and tight.stages["probe"]["estimate_s"] == 500.0
    assert "left out" in "\n".join(qs.budget_lines(tight, QuickstartConfig()))
    assert qs.Budget.load_or_plan(tmp_path / "none", QuickstartConfig(time_budget=0)).share("pretrain") == 0.0


def test_report_says_when_the_lvm_step_plan_was_revised_during_the_run():
    import lvm.quickstart as qs

    stages = {"tokenizer": {"steps": 1000}, "pretrain": {"steps": 1923}}
    plain = "\n".join(qs.budget_lines(qs.Budget(None, 1800, stages, {}), QuickstartConfig(grid=14)))
    assert "`lvm quickstart --grid 14 --tokenizer-steps 1000 --lvm-steps 1923` trains the same models again." in plain
    stages["pretrain"]["plan_revisions"] = [[70, 2309], [170, 1923]]
    revised = "\n".join(qs.budget_lines(qs.Budget(None, 1800, stages, {}), QuickstartConfig(grid=14)))
    assert "--lvm-steps 1923` trains the same step counts again" in revised and "same models" not in revised
    assert "revised at steps 70, 170" in revised


def test_measured_speeds_predict_positive_stage_times():
    from lvm.quickstart import RunShape, measure_speeds, supervised_seconds

    m = measure_speeds("fp32")
    assert m["forward_images_per_s"] > 0 and m["encode_images_per_s"] > 0
    assert 0 < m["tokenize_s"] < 3600 and 0 < m["probe_s_per_model"] < 36_000 and m["probe_pixels_s"] > 0
    assert 0 < m["supervised_step_s"] < 30 and m["supervised_eval_images_per_s"] > 0
    assert 0 < supervised_seconds(m, RunShape(), 60_000, [0.01, 0.1, 0.3, 1.0], 3) < 36_000


def test_mirrored_probes_cost_twice_the_features_and_fits_of_every_train_and_test_image(monkeypatch):
    """--probe-mirror: the plan counts each image's mirror (features and fit rows) but not the raw pixels' fits
    nor the layer sweep's extraction twice. Timings are fixed so that the two plans differ by the mirror alone."""
    import lvm.quickstart as qs

    monkeypatch.setattr(qs, "_best_time", lambda fn, repeats=3: 0.01)
    monkeypatch.setattr(qs, "time_supervised_cnn", lambda shape, precision="auto": (0.1, 1000.0))
    shape = qs.RunShape(train=60_000, test=10_000)
    plain, mirror = (qs.measure_speeds("fp32", shape, pixels=True, mirror=m) for m in (False, True))
    pixel_per_image = plain["probe_pixels_s"] / shape.train
    own = plain["per_train_image_s"] - pixel_per_image  # a train image's features and fit rows
    assert own > 0 and mirror["per_train_image_s"] == pytest.approx(2 * own + pixel_per_image)
    feature_per_image = (mirror["probe_fixed_s"] - plain["probe_fixed_s"]) / shape.test  # the test mirrors' features
    assert feature_per_image > 0
    assert mirror["probe_s_per_model"] - plain["probe_s_per_model"] == pytest.approx(
        feature_per_image * shape.test + own * shape.train)


# Speeds that put the supervised CNN's fits on Fashion-MNIST's shape at a known cost: 0.1 s a step, 1000 images/s.
CNN = {"supervised_step_s": 0.1, "supervised_eval_images_per_s": 1000.0}


def test_supervised_cost_counts_the_steps_and_passes_fit_supervised_runs():
    import lvm.quickstart as qs
    from lvm.probe import ProbeConfig

    shape = qs.RunShape(train=60_000, test=10_000, classes=10)
    probe = ProbeConfig()  # the fine-tuning budget the CNN's fits get: epochs capped at a step count
    assert probe.finetune_epochs * 4 < probe.finetune_max_steps <= probe.finetune_epochs * 42
    # 1 %: 60 a class, 6 held out -> 540 rows, 4 batches an epoch x the epochs; 10 passes over 60 validation
    # images and one over 10,000 test images; 3 subsets. 100 %: 54,000 rows, the step cap, one fit.
    one = probe.finetune_epochs * 4 * 0.1 + (10 * 60 + 10_000) / 1000
    full = probe.finetune_max_steps * 0.1 + (10 * 6000 + 10_000) / 1000
    predicted = qs.supervised_seconds(CNN, shape, 60_000, [0.01, 1.0], 3)
    assert predicted == pytest.approx(qs.ESTIMATE_MARGIN * (3 * one + full))
    assert qs.supervised_seconds(CNN, shape, 6000, [1.0], 3) == pytest.approx(  # a subsample: 5400 rows, the cap
        qs.ESTIMATE_MARGIN * (probe.finetune_max_steps * 0.1 + (10 * 600 + 10_000) / 1000))


def test_supervised_baseline_runs_when_the_probe_stage_with_it_fits_its_share_of_the_budget(tmp_path, monkeypatch):
    import lvm.quickstart as qs

    shape = qs.RunShape(train=60_000, test=10_000)
    probes = {"probe_s_per_model": 300.0, "probe_pixels_s": 50.0, "per_train_image_s": 0.005, "probe_fixed_s": 50.0}
    cnn_s = qs.supervised_seconds(CNN, shape, 60_000, [0.01, 0.1, 0.3, 1.0], 3)
    assert qs.PROBE_MAX_SHARE == pytest.approx(1 / 3)  # the probe stage's share of the budget, at most
    assert 300 < cnn_s < 550  # 350 s of probes + the CNN fit in 900 s (a third of 45 minutes), not in 600 s

    measured = {**probes, **CNN}  # 45 minutes: kept; with it the random-init model would pass a third
    assert qs.plan_probes(measured, shape, 2700) == pytest.approx(350 + cnn_s, abs=0.1)
    assert measured["supervised"] and measured["supervised_estimate_s"] == pytest.approx(cnn_s, abs=0.1)
    assert not measured["random_init"] and "probe_train_images" not in measured

    measured = {**probes, **CNN}  # 30 minutes: left out, the LVM's probes keep every label
    assert qs.plan_probes(measured, shape, 1800) == 350.0
    assert measured["supervised"] is False and "probe_train_images" not in measured
    budget = qs.Budget(None, 1800, {"probe": {}}, measured)
    lines = "\n".join(qs.budget_lines(budget, qs.QuickstartConfig()))
    assert "supervised CNN baseline" in lines and f"predicted at {cnn_s:.0f} s" in lines
    command = "lvm probe --checkpoint runs/quickstart/lvm --pixels auto --supervised --out runs/quickstart/probe-baselines"
    assert f"`{command}` runs it." in lines  # the random-init model was left out too: the command runs both
    assert not qs.run_supervised(qs.QuickstartConfig(), budget)
    assert qs.run_supervised(qs.QuickstartConfig(supervised="on"), budget)

    cheap = {"probe_s_per_model": 100.0, "probe_pixels_s": 20.0, **CNN, "supervised_step_s": 1.0}
    assert qs.plan_probes(cheap, shape, 1800) == 220.0  # CNN ~2500 s: out; random init fits a third: in
    assert cheap["random_init"] and not cheap["supervised"]
    cfg = qs.QuickstartConfig(out="runs/mine", source="my images/", probe_fractions=[0.1, 1.0])
    lines = "\n".join(qs.budget_lines(qs.Budget(None, 1800, {"probe": {}}, cheap), cfg))
    assert ("`lvm probe --checkpoint runs/mine/lvm --source 'my images/' --fractions 0.1 1 --pixels auto --supervised "
            "--no-random-init --out runs/mine/probe-baselines` runs it") in lines
    assert "random-init baseline was left out" not in lines

    off = {**probes, **CNN}
    assert qs.plan_probes(off, shape, 1800, "off") == 350.0 and off["supervised"] is False
    assert "turned off (`--supervised off`)" in "\n".join(
        qs.budget_lines(qs.Budget(None, 1800, {"probe": {}}, off), qs.QuickstartConfig(supervised="off")))

    slow = {"probe_s_per_model": 3000.0, "probe_pixels_s": 500.0, "per_train_image_s": 0.05, "probe_fixed_s": 300.0,
            **CNN}
    auto = dict(slow)  # 45 minutes: the LVM's probes need a subsample to fit a third: no room for the CNN
    assert qs.plan_probes(auto, shape, 2700) <= 900 and auto["probe_train_images"] == 12_000
    assert auto["supervised"] is False
    forced = dict(slow)  # --supervised on: the subsample shrinks to make room for it, and no more
    probe_s = qs.plan_probes(forced, shape, 2700, "on")
    assert forced["supervised"] and 1000 < forced["probe_train_images"] < 12_000 and 899 < probe_s <= 900
    assert probe_s == pytest.approx(300 + 0.05 * forced["probe_train_images"] + forced["supervised_estimate_s"], abs=0.1)
    assert "--limit-train" in qs.probe_command(qs.QuickstartConfig(), qs.Budget(None, 1800, {}, forced), "--supervised")

    # the quickstart's plan passes --supervised and the probe settings through, and keeps the decision on a resume
    monkeypatch.setattr(qs, "measure_speeds", lambda precision, shape=None, pixels=False, mirror=False: {"tokenize_s": 60.0, **probes, **CNN})
    planned = qs.Budget.load_or_plan(tmp_path, QuickstartConfig(out=str(tmp_path), time_budget=30))
    assert planned.measured["supervised"] is False and planned.stages["probe"]["estimate_s"] == 350.0
    assert qs.run_supervised(QuickstartConfig(), qs.Budget.load_or_plan(tmp_path, QuickstartConfig())) is False
    few = qs.Budget.load_or_plan(tmp_path / "few", QuickstartConfig(time_budget=30, probe_fractions=[1.0]))
    assert few.measured["supervised"] and qs.run_supervised(QuickstartConfig(), few)
    assert qs.run_supervised(QuickstartConfig(), qs.Budget(None, 0, {}, {}))  # no budget (--fast): runs
    with pytest.raises(ValueError, match="--supervised 'yes' is not one of auto, on, off"):
        quickstart(QuickstartConfig(out=str(tmp_path / "bad"), supervised="yes"))


def test_compile_only_where_it_pays(monkeypatch):
    import lvm.runtime
    from lvm.quickstart import use_compile

    monkeypatch.setattr(lvm.runtime, "bf16_is_fast", lambda device: True)
    assert use_compile(QuickstartConfig()) and not use_compile(QuickstartConfig(precision="fp32"))
    monkeypatch.setattr(lvm.runtime, "bf16_is_fast", lambda device: False)
    assert not use_compile(QuickstartConfig()) and use_compile(QuickstartConfig(compile="yes"))
    with pytest.raises(ValueError, match="--compile 'maybe'"):
        use_compile(QuickstartConfig(compile="maybe"))


def test_the_default_grid_is_finer_only_where_bf16_is_fast(monkeypatch):
    """--grid 0: 14x14 for 28 px where bf16 is fast (the AMX run's winner), the tokenizer's default (at most 8 per side)
    on an fp32 CPU; a given --grid and --fast are left alone; sizes whose finest grid fits 14 anyway keep it."""
    import lvm.runtime
    from lvm.quickstart import quickstart_grid
    from tokenizer.model import auto_layout

    monkeypatch.setattr(lvm.runtime, "bf16_is_fast", lambda device: True)
    assert quickstart_grid(QuickstartConfig(), 28) == 14 and quickstart_grid(QuickstartConfig(), 56) == 14
    assert quickstart_grid(QuickstartConfig(), 64) == 8  # 16 per side would pass the cap: 8x8 as before
    assert quickstart_grid(QuickstartConfig(grid=7), 28) == 7 and quickstart_grid(QuickstartConfig(fast=True), 28) == 0
    assert quickstart_grid(QuickstartConfig(precision="fp32"), 28) == 0
    assert auto_layout(28, quickstart_grid(QuickstartConfig(), 28)) == (2, 0)  # the tokenizer accepts it
    monkeypatch.setattr(lvm.runtime, "bf16_is_fast", lambda device: False)
    assert quickstart_grid(QuickstartConfig(), 28) == 0


def test_random_labels_on_a_folder_stay_near_chance(tmp_path):
    """Regression for a leak: a folder has no published split, and once the probes were trained and
    tested on the same images (100 % "test" accuracy on noise). Noise with random labels must score
    near chance for every feature set, and the report must state the split it used."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(300):
        cls = f"class{rng.integers(3)}"  # a random label: nothing in the pixels predicts it
        (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "qs"
    quickstart(QuickstartConfig(out=str(out), source=str(tmp_path / "imgs"), fast=True, probe_fractions=[1.0]))
    rows = json.loads((out / "probe" / "probe.json").read_text())["rows"]
    assert {r["features"].split(" (")[0] for r in rows} >= {"lvm", "raw pixels"}
    for row in rows:
        assert row["acc_mean"] < 0.6, row  # chance is 1/3; a train/test leak gives ~1.0 on noise
    split = json.loads((out / "split.json").read_text())
    assert set(split["test_keys"]).isdisjoint(split["train_keys"])
    assert sum(split["test"].values()) == len(split["test_keys"]) > 30
    report = (out / "report.md").read_text()
    assert "sha256(key)" in report and "| class0 |" in report


def test_probes_fit_a_subsample_when_all_labels_would_not_fit_their_share_of_the_budget():
    import lvm.quickstart as qs

    shape = qs.RunShape(train=60_000, test=10_000)
    fast = {"probe_s_per_model": 300.0, "probe_pixels_s": 50.0, "per_train_image_s": 0.005, "probe_fixed_s": 50.0}
    measured = dict(fast)  # with random init 650 s > a third of 1800: left out, then 350 s fits the probes' third
    assert qs.plan_probes(measured, shape, 1800) == 350.0 and "probe_train_images" not in measured
    slow = {"probe_s_per_model": 3000.0, "probe_pixels_s": 500.0, "per_train_image_s": 0.05, "probe_fixed_s": 300.0}
    measured = dict(slow)
    probe_s = qs.plan_probes(measured, shape, 2700)  # 45 minutes: the probes' third is 900 s
    assert measured["probe_train_images"] == int((900 - 300) / 0.05) and probe_s <= 900
    assert not measured["random_init"]
    lines = "\n".join(qs.budget_lines(qs.Budget(None, 2700, {"probe": {}}, measured), qs.QuickstartConfig()))
    assert "12,000 labelled training images" in lines
