"""Probes: the linear probe on known problems, subsets, and the pipeline end to end."""
import json

import numpy as np
import pytest
import torch

from lvm.probe import LinearProbe, ProbeConfig, ProbeError, _subset, extract_features, run_probe


def test_linear_probe_separable_vs_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 20, generator=g) * 3
    y = torch.arange(800) % 4
    x = centers[y] + torch.randn(800, 20, generator=g)
    clf = LinearProbe.fit(x[:600], y[:600])
    assert clf.accuracy(x[600:], y[600:]) > 0.97
    shuffled = y[torch.randperm(800, generator=g)]
    assert LinearProbe.fit(x[:600], shuffled[:600]).accuracy(x[600:], shuffled[600:]) < 0.45  # chance is 0.25
    assert clf.l2 in (1e-4, 1e-3, 1e-2, 1e-1)


def test_subset_is_class_balanced():
    labels = np.repeat(np.arange(5), [100, 200, 50, 10, 40])
    idx = _subset(labels, 0.1, seed=0)
    counts = np.bincount(labels[idx], minlength=5)
    assert counts.tolist() == [10, 20, 5, 1, 4]
    assert len(set(idx)) == len(idx)
    assert not np.array_equal(idx, _subset(labels, 0.1, seed=1))


def test_probe_end_to_end(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"],
                      fractions=[0.25, 1.0], seeds=2, sweep_images=60, out=str(tmp_path), pool="grid", grid=2)
    summary = run_probe(cfg)
    rows = summary["rows"]
    names = {r["features"] for r in rows}
    assert any(n.startswith("lvm (layer") for n in names) and "raw pixels" in names
    assert any(n.startswith("random-init") for n in names)
    pixels = [r for r in rows if r["features"] == "raw pixels" and r["fraction"] == 1.0][0]
    assert pixels["acc_mean"] > 0.9  # bright bands are linearly separable from pixels
    assert [r["runs"] for r in rows if r["features"] == "raw pixels"] == [2, 1]
    assert (tmp_path / "label_efficiency.png").stat().st_size > 0
    table = (tmp_path / "probe.md").read_text()
    assert "raw pixels" in table and "25% labels" in table
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["rows"] == rows
    assert sorted(saved["layer_sweep"]["lvm"]) == ["1", "2"]  # every block of the tiny model was scored
    _check_kept_probe(summary, cfg, tiny_pipeline)
    assert "linear_probe" not in saved and "linear_probe" not in json.dumps(saved)  # handed back, not written


def _check_kept_probe(summary, cfg, tiny_pipeline):
    """run_probe hands back the checkpoint's linear probe at 100 % labels: the one that scored its 100 % row."""
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.data import SpecialTokens
    from lvm.probe import extract_features, pool_tokens
    from tokenizer.images import load_images

    probe, layer = summary["linear_probe"], summary["layer"]
    assert isinstance(probe, LinearProbe) and summary["features"] == f"lvm (layer {layer})"
    assert summary["classes"] == ["0", "1", "2"]  # an .npz without class names
    row = next(r for r in summary["rows"] if r["features"] == summary["features"] and r["fraction"] == 1.0)
    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    test = load_images(tiny_pipeline["npz"], "test", size=16, channels=1)
    tokens = extract_features(model, tok.encode(test.images), SpecialTokens(tok.vocab_size), layer, "tokens")
    features = pool_tokens(tokens, cfg.pool, tok.grid, cfg.grid)
    assert probe.weight.shape == (3, features.shape[1])
    assert probe.accuracy(features, test.labels) == row["acc_mean"]


def test_probe_rejects_unlabeled_data(tiny_pipeline, tmp_path):
    images = np.load(tiny_pipeline["npz"])["images"]
    np.save(tmp_path / "unlabeled.npy", images)
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=str(tmp_path / "unlabeled.npy"), out=str(tmp_path))
    with pytest.raises(ProbeError, match="no labels"):
        run_probe(cfg)


def test_probe_compares_checkpoints_on_one_task(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], compare=[tiny_pipeline["lvm"]], source=tiny_pipeline["npz"],
                      fractions=[1.0], seeds=1, layers=[2], baselines=False, out=str(tmp_path))
    rows = run_probe(cfg)["rows"]
    by_name = {r["features"]: r["acc_mean"] for r in rows}
    assert set(by_name) == {"lvm (layer 2)", f"lvm:{tiny_pipeline['lvm']} (layer 2)"}
    assert len(set(by_name.values())) == 1  # the same weights probed twice give the same accuracy


def test_bf16_features_track_fp32(tiny_pipeline):
    """Feature extraction under bf16 autocast (the CPU default on AMX machines) stays close to fp32's."""
    from lvm.data import SpecialTokens
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.probe import extract_features

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"], "")
    ids = tok.encode(np.load(tiny_pipeline["npz"])["images"][:16])
    special = SpecialTokens(tok.vocab_size)
    exact = extract_features(model, ids, special, 2, "mean", precision="fp32")
    fast = extract_features(model, ids, special, 2, "mean", precision="bf16")
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    rel = (fast - exact).norm() / exact.norm()
    assert 0 < rel < 0.05, rel  # > 0: bf16 really ran


def test_probe_rejects_unknown_precision(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], precision="fp16", out=str(tmp_path))
    with pytest.raises(ProbeError, match="precision='fp16'"):
        run_probe(cfg)


def test_probe_features_read_the_training_layout(tiny_pipeline):
    """The probe's [BOS] image rows are the start of a training sentence: same states at the image's tokens."""
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.data import SpecialTokens, VisualSentences
    from lvm.probe import extract_features

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    special = SpecialTokens(tok.vocab_size)
    sentences = VisualSentences(tiny_pipeline["shards"])
    ids = torch.from_numpy(np.stack([sentences.main.tokens[i] for i in range(5)]).astype(np.int64))  # [5, h, w]
    rows = torch.from_numpy(np.stack([sentences.sentence(i) for i in range(5)]))  # [5, 1 + h*w + 1]
    per_image = ids[0].numel()
    assert torch.equal(rows[:, 0], torch.full((5,), special.bos))
    assert torch.equal(rows[:, 1 : 1 + per_image], ids.reshape(5, -1))
    with torch.no_grad():
        states = model.hidden_states(rows, layers=[2])[0][:, 1 : 1 + per_image]  # [5, h*w, D]
    feats = extract_features(model, ids, special, 2, "mean", precision="fp32")  # [5, D]
    torch.testing.assert_close(feats, states.float().mean(1), rtol=1e-4, atol=1e-5)


def test_probe_compare_refuses_another_tokenizer(tiny_pipeline, tmp_path):
    import json
    import shutil

    from lvm.checkpoint import CheckpointMismatch, resolve_checkpoint
    from tokenizer.model import Tokenizer, TokenizerConfig

    torch.manual_seed(321)  # same codebook size, other weights
    other = Tokenizer(TokenizerConfig(image_size=16, widths=(16, 16), fsq_levels=(4, 4)))
    other.save_pretrained(tmp_path / "t2")
    shutil.copytree(resolve_checkpoint(tiny_pipeline["lvm"]), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "data.json").write_text(json.dumps(
        {"tokenizer_path": str(tmp_path / "t2"), "tokenizer_fingerprint": other.fingerprint}))
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], compare=[str(tmp_path / "ckpt")], source=tiny_pipeline["npz"],
                      fractions=[1.0], seeds=1, layers=[1], baselines=False, out=str(tmp_path / "out"))
    with pytest.raises(CheckpointMismatch, match=f"--compare {tmp_path / 'ckpt'}.*got {other.fingerprint}"):
        run_probe(cfg)


def test_linear_probe_chooses_l2_on_a_row_subset_then_refits_on_all():
    from lvm.probe import LinearProbe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    x = torch.randn(600, 8, generator=g) + 4.0 * torch.nn.functional.one_hot(y, 8).float()
    whole = LinearProbe.fit(x, y, seed=1)
    assert torch.equal(LinearProbe.fit(x, y, seed=1, select_rows=10_000).weight, whole.weight)  # nothing to cut
    cut = LinearProbe.fit(x, y, seed=1, select_rows=120)
    assert cut.l2 in (1e-4, 1e-3, 1e-2, 1e-1) and cut.accuracy(x, y) >= whole.accuracy(x, y) - 0.02 > 0.9
    # the refit reads every row: standardisation statistics are those of all 600
    assert torch.allclose(cut.mean, x.mean(0)) and torch.allclose(cut.std, x.std(0))


def test_probe_appends_the_pixels_to_the_lvm_features(tiny_pipeline, tmp_path):
    """--pixels on: the linear probe reads [LVM features, raw pixels]; the bands that make the class are in the
    pixels, so the joint probe separates them; the 100 % probe handed back for a bundle is that joint one."""
    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[1.0], seeds=1, layers=[2],
                  baselines=False, pool="grid", grid=2)
    plain = run_probe(ProbeConfig(**common, out=str(tmp_path / "plain")))
    joint = run_probe(ProbeConfig(**common, pixels="on", out=str(tmp_path / "joint")))
    (p,), (j,) = plain["rows"], joint["rows"]
    assert p["features"] == "lvm (layer 2)" and j["features"] == "lvm (layer 2) + pixels"
    assert j["dim"] == p["dim"] + 16 * 16  # 16x16 grey pixels appended
    assert j["acc_mean"] > 0.9
    assert plain["pixels"] is None and joint["pixels"] == (1, 16)
    assert joint["features"] == j["features"] and joint["linear_probe"].weight.shape == (3, j["dim"])


def test_probe_pixels_both_reports_the_states_and_the_states_with_pixels_from_one_run(tiny_pipeline, tmp_path):
    """--pixels both: the plain row equals a --pixels off run's, the joint row a --pixels on run's (same label subsets),
    and the probe handed back for a bundle is the joint one."""
    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[0.5, 1.0], seeds=2,
                  layers=[2], baselines=False, pool="grid", grid=2)
    plain = run_probe(ProbeConfig(**common, out=str(tmp_path / "plain")))
    joint = run_probe(ProbeConfig(**common, pixels="on", out=str(tmp_path / "joint")))
    both = run_probe(ProbeConfig(**common, pixels="both", out=str(tmp_path / "both")))
    key = lambda r: (r["features"], r["fraction"])  # noqa: E731
    assert sorted(map(key, both["rows"])) == sorted(map(key, plain["rows"] + joint["rows"]))
    by = {key(r): r["acc_mean"] for r in both["rows"]}
    for r in plain["rows"] + joint["rows"]:
        assert by[key(r)] == pytest.approx(r["acc_mean"])
    assert both["features"] == "lvm (layer 2) + pixels" and both["pixels"] == (1, 16)
    assert both["linear_probe"].weight.shape == joint["linear_probe"].weight.shape


def test_pixels_are_left_out_only_where_they_score_clearly_worse_on_held_out_training_rows():
    from lvm.probe import pixels_pay

    g = torch.Generator().manual_seed(0)
    y = torch.arange(1000) % 4
    signal = torch.randn(4, 16, generator=g)[y] * 0.6 + torch.randn(1000, 16, generator=g)  # ~90 % separable
    keep, scores = pixels_pay(torch.randn(1000, 64, generator=g), signal, y.numpy())  # the class is in the pixels only
    assert keep and scores["states + pixels"] > scores["states"] + 0.3
    wide_noise = torch.randn(1000, 2000, generator=g)  # 2,000 values that carry nothing, fitted on 800 rows: overfit
    keep, scores = pixels_pay(signal, wide_noise, y.numpy())
    assert not keep and scores["states"] > scores["states + pixels"] + 0.02
    weak = signal + 4 * torch.randn(1000, 16, generator=g)  # pixels that add little: a tie within the noise keeps them
    keep, scores = pixels_pay(signal, weak, y.numpy())
    assert keep and 0.6 < scores["states"] < 0.99 and abs(scores["states"] - scores["states + pixels"]) < 0.03


def test_probe_pixels_auto_records_its_choice_and_reads_the_features_it_chose(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[1.0], seeds=1,
                      layers=[2], baselines=False, pool="grid", grid=2, pixels="auto", sweep_images=100,
                      out=str(tmp_path))
    summary = run_probe(cfg)
    choice = json.loads((tmp_path / "probe.json").read_text())["pixels_choice"]
    assert choice["layer"] == 2 and choice["images"] == 100 and set(choice["val_accuracy"]) == {"states", "states + pixels"}
    (row,) = summary["rows"]
    assert row["features"].endswith(" + pixels") == choice["kept"] == (summary["pixels"] is not None)
    with pytest.raises(ProbeError, match="pixels"):
        run_probe(ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], pixels="yes",
                              out=str(tmp_path / "bad")))


def test_compiled_extraction_matches_eager_on_a_padded_last_batch(tiny_pipeline, monkeypatch):
    """Where bf16 is fast, long extractions run a compiled forward on batches of one shape (the last one padded):
    the features must be the eager forward's, every image's own, none of the padding's."""
    import lvm.probe as probe_mod
    import lvm.runtime
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.data import SpecialTokens

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    images = np.load(tiny_pipeline["npz"])["images"][:, :, :, None]
    ids, special = tok.encode(images[:50]), SpecialTokens(tok.vocab_size)  # 50 = 2 batches of 32, the last padded
    eager = extract_features(model, ids, special, [1, 2], "grid", 2, batch_size=32, precision="fp32")
    monkeypatch.setattr(lvm.runtime, "bf16_is_fast", lambda device: True)
    monkeypatch.setattr(probe_mod, "COMPILE_MIN_TOKENS", 0)
    calls = []
    real = probe_mod._compiled_forward
    monkeypatch.setattr(probe_mod, "_compiled_forward", lambda m, p: calls.append(p) or real(m, p))
    compiled = extract_features(model, ids, special, [1, 2], "grid", 2, batch_size=32, precision="bf16")
    assert calls == ["bf16"]
    for layer in (1, 2):
        assert compiled[layer].shape == eager[layer].shape == (50, model.config.d_model * 4)
        err = (compiled[layer] - eager[layer]).abs().max() / eager[layer].abs().max()
        assert err < 0.05  # bf16 autocast against fp32: every row is its own image's, in order


def test_probe_concat_reads_the_listed_layers_as_one_feature(tiny_pipeline, tmp_path):
    """--layers 1 2 --concat: one linear row whose features are both layers' pooled states side by side, scored
    exactly as a probe fitted on the two single-layer extractions concatenated by hand."""
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.data import SpecialTokens
    from tokenizer.images import load_images

    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[1.0], seeds=1,
                  baselines=False, pool="grid", grid=2)
    single = run_probe(ProbeConfig(**common, layers=[1, 2], out=str(tmp_path / "single")))
    joint = run_probe(ProbeConfig(**common, layers=[2, 1], concat=True, out=str(tmp_path / "joint")))  # any order
    (row,) = joint["rows"]
    assert row["features"] == "lvm (layers 1+2)" and joint["layer"] == [1, 2]
    assert row["dim"] == sum(r["dim"] for r in single["rows"])

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    special = SpecialTokens(tok.vocab_size)
    sets = [load_images(tiny_pipeline["npz"], split, size=16, channels=1) for split in ("train", "test")]
    (f_train, f_test) = (torch.cat([extract_features(model, tok.encode(s.images), special, layer, "grid", 2)
                                    for layer in (1, 2)], 1) for s in sets)
    probe = LinearProbe.fit(f_train, torch.from_numpy(sets[0].labels), seed=0)
    assert row["acc_mean"] == pytest.approx(probe.accuracy(f_test, torch.from_numpy(sets[1].labels)))

    # the probe handed back ships as a bundle that reads both layers and scores the row's accuracy on the test images
    from lvm.classifier import Classifier
    from lvm.classifier_train import bundle_from_probe

    bundle_from_probe(tiny_pipeline["lvm"], joint["linear_probe"], joint["layer"], str(tmp_path / "bundle"),
                      pool="grid", grid=2)
    clf = Classifier.from_pretrained(tmp_path / "bundle")
    assert clf.readout == (1, 2) and clf.layer == 2
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["readout_layers"] == [1, 2] and meta["format_version"] == 2
    labels, _ = clf.predict(sets[1].images)
    # the bundle runs fp32, the probe's features the machine's default precision (bf16 on AMX): one image may differ
    right = np.mean(np.array(labels) == sets[1].labels.astype(str))
    assert right == pytest.approx(row["acc_mean"], abs=1.01 / len(labels))


def test_probe_concat_needs_several_layers_and_frozen_read_outs(tiny_pipeline, tmp_path):
    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], out=str(tmp_path), concat=True)
    with pytest.raises(ProbeError, match="two or more --layers"):
        run_probe(ProbeConfig(**common, layers=[2]))
    with pytest.raises(ProbeError, match="two or more --layers"):
        run_probe(ProbeConfig(**common))  # the sweep picks one layer: nothing to concatenate
    with pytest.raises(ProbeError, match="fine-tuning"):
        run_probe(ProbeConfig(**common, layers=[1, 2], methods=["linear", "finetune"]))


def test_linear_probe_copies_hold_out_whole_images_when_choosing_l2():
    """Rows that are versions of the same images (--mirror: images, then mirrors): with copies=2 the validation
    split holds out both versions of an image, so on random labels L2 is scored near chance; split row by row, an
    image's twin sits in the fit and the scores are inflated (what copies prevents)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 120, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    doubled, y2 = torch.cat([x, x]), y.repeat(2)
    grouped = LinearProbe.fit(doubled, y2, seed=0, copies=2)
    leaky = LinearProbe.fit(doubled, y2, seed=0)
    assert max(grouped.l2_scores.values()) < 0.45  # chance is 0.25
    assert max(leaky.l2_scores.values()) > max(grouped.l2_scores.values()) + 0.2
    assert grouped.val_images == 30  # images held out, not rows
    with pytest.raises(ValueError, match="blocks"):
        LinearProbe.fit(doubled[:-1], y2[:-1], copies=2)


def test_mirror_probabilities_are_the_mean_of_both_versions():
    probe = LinearProbe(torch.zeros(3), torch.ones(3), torch.randn(4, 3), torch.randn(4), 1e-3)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(probe.probabilities(a, mirror=b), (probe.probabilities(a) + probe.probabilities(b)) / 2)
    assert torch.equal(probe.predict(a, mirror=b), probe.predict(b, mirror=a))


def test_probe_mirror_fits_on_images_and_mirrors_and_ships_a_mirror_invariant_bundle(tiny_pipeline, tmp_path):
    """--mirror: the row is a probe fitted on every image and its mirror and scored on the mean of both versions'
    probabilities, exactly as rebuilt by hand; the bundle made from it averages both versions too (so a mirrored
    image gets the same probabilities) and scores the row's accuracy."""
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.classifier import Classifier
    from lvm.classifier_train import bundle_from_probe
    from lvm.data import SpecialTokens
    from tokenizer.images import load_images

    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[1.0], seeds=1, layers=[2],
                  baselines=False, pool="grid", grid=2)
    mirrored = run_probe(ProbeConfig(**common, mirror=True, out=str(tmp_path / "m")))
    (row,) = mirrored["rows"]
    assert row["features"] == mirrored["features"] == "lvm (layer 2), mirrored" and mirrored["mirror"] is True

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    special = SpecialTokens(tok.vocab_size)
    sets = [load_images(tiny_pipeline["npz"], split, size=16, channels=1) for split in ("train", "test")]
    feats = [[extract_features(model, tok.encode(np.ascontiguousarray(im)), special, 2, "grid", 2)
              for im in (s.images, s.images[:, :, ::-1])] for s in sets]
    y_train, y_test = (torch.from_numpy(s.labels) for s in sets)
    probe = LinearProbe.fit(torch.cat(feats[0]), y_train.repeat(2), seed=0, copies=2)
    assert row["acc_mean"] == pytest.approx(probe.accuracy(feats[1][0], y_test, mirror=feats[1][1]))

    bundle_from_probe(tiny_pipeline["lvm"], mirrored["linear_probe"], 2, str(tmp_path / "bundle"), pool="grid", grid=2,
                      mirror=True)
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["mirror"] is True and meta["format_version"] == 2
    clf = Classifier.from_pretrained(tmp_path / "bundle")
    assert clf.mirror
    pixels = clf.preprocess(sets[1].images[:16])
    with torch.no_grad():
        torch.testing.assert_close(clf(pixels), clf(pixels.flip(-1)))  # the mean of both versions, in either order
        clf.mirror = False
        assert not torch.allclose(clf(pixels), clf(pixels.flip(-1)))  # what the averaging removes
        clf.mirror = True
    labels, _ = clf.predict(sets[1].images)
    right = np.mean(np.array(labels) == sets[1].labels.astype(str))
    assert right == pytest.approx(row["acc_mean"], abs=1.01 / len(labels))  # bf16 features vs the fp32 bundle


def test_probe_mirror_is_a_linear_probe_option_for_flippable_domains(tiny_pipeline, tmp_path):
    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], out=str(tmp_path), mirror=True)
    with pytest.raises(ProbeError, match="linear"):
        run_probe(ProbeConfig(**common, methods=["attentive"]))
    with pytest.raises(ProbeError, match="no-flip"):
        run_probe(ProbeConfig(**common, flip=False))


def test_probe_mirror_with_pixels_both_mirrors_the_pixels_too(tiny_pipeline, tmp_path):
    """--mirror --pixels both: both rows are mirror-averaged, and the joint one reads the mirror image's own pixels
    (the same probe as a --pixels on --mirror run, on the same subsets)."""
    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[0.5, 1.0], seeds=2,
                  layers=[2], baselines=False, pool="grid", grid=2, mirror=True)
    both = run_probe(ProbeConfig(**common, pixels="both", out=str(tmp_path / "both")))
    joint = run_probe(ProbeConfig(**common, pixels="on", out=str(tmp_path / "on")))
    names = {r["features"]: r["dim"] for r in both["rows"]}
    assert names == {"lvm (layer 2), mirrored": names["lvm (layer 2), mirrored"],
                     "lvm (layer 2) + pixels, mirrored": names["lvm (layer 2), mirrored"] + 16 * 16}
    by = {(r["features"], r["fraction"]): r["acc_mean"] for r in both["rows"]}
    for r in joint["rows"]:
        assert by[(r["features"], r["fraction"])] == pytest.approx(r["acc_mean"])
    assert both["features"] == "lvm (layer 2) + pixels, mirrored" and both["pixels"] == (1, 16)
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.probe import _encode_task, pixel_features
    from tokenizer.images import load_images

    _, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    sets = [load_images(tiny_pipeline["npz"], split, size=16, channels=1) for split in ("train", "test")]
    task = _encode_task(ProbeConfig(**common, pixels="on"), tok, *sets)
    for images, ids, pixels in zip(sets, task.mirror_ids, task.mirror_pixels):
        mirrored = images.images[:, :, ::-1]
        assert torch.equal(ids, tok.encode(np.ascontiguousarray(mirrored)))
        torch.testing.assert_close(pixels, torch.from_numpy(mirrored.reshape(len(mirrored), -1) / 255.0).float())
    assert not torch.equal(task.mirror_pixels[0], task.train_pixels)


def test_probe_device_runs_linear_probes_on_a_gpu_and_keeps_other_methods_on_the_cpu(tiny_pipeline, tmp_path):
    from lvm.probe import probe_device

    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], out=str(tmp_path))
    assert probe_device(ProbeConfig(**common, methods=["linear", "attentive"])) == torch.device("cpu")
    assert probe_device(ProbeConfig(**common, device="cpu")) == torch.device("cpu")
    with pytest.raises(ProbeError, match="--methods linear"):
        run_probe(ProbeConfig(**common, methods=["linear", "finetune"], device="cuda"))
    with pytest.raises(ProbeError, match="device='tpu'"):
        run_probe(ProbeConfig(**common, device="tpu"))


@pytest.mark.gpu
def test_probe_on_the_gpu_scores_what_the_cpu_scores(tiny_pipeline, tmp_path):
    common = dict(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[1.0], layers=[1],
                  baselines=False, random_init=False, precision="fp32")
    rows = {d: run_probe(ProbeConfig(**common, device=d, out=str(tmp_path / d)))["rows"] for d in ("cpu", "cuda")}
    assert [r["features"] for r in rows["cpu"]] == [r["features"] for r in rows["cuda"]]
    for a, b in zip(rows["cpu"], rows["cuda"]):
        assert abs(a["acc_mean"] - b["acc_mean"]) <= 0.02
