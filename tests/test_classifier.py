"""Classifier bundles: the probe's head on all train labels, saved as safetensors + JSON, loaded back to the
same predictions, refused when its parts do not match, and run over files by `lvm predict` / `lvm embed`."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lvm import Classifier
from lvm.checkpoint import load_model_and_tokenizer
from lvm.classifier import BundleError, BundleMismatch, LinearHead, UnsupportedImage, prepare_image, to_uint8_images
from lvm.classifier_train import ClassifierTrainConfig, bundle_from_probe, classifier_train, fit_linear
from lvm.cli import main
from lvm.data import SpecialTokens
from lvm.probe import LinearProbe, ProbeError, extract_features, pool_tokens
from tokenizer.images import load_images

CLASSES = ["band0", "band1", "band2"]


@pytest.fixture(scope="module")
def labelled_folder(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline's banded 16x16 images as PNG files, one sub-folder per class."""
    data = np.load(tiny_pipeline["npz"])
    root = tmp_path_factory.mktemp("bands")
    for i, (image, label) in enumerate(zip(data["images"], data["labels"])):
        (root / CLASSES[label]).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / CLASSES[label] / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def bundle(tiny_pipeline, labelled_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "classifier"
    # fitted in fp32 like the bundle runs (on an AMX CPU "auto" fits on bf16 features): exact comparisons below
    summary = classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder),
                                                     sweep_images=60, precision="fp32", out=str(out)))
    return out, summary


def _files(folder, count=6):
    """A few PNGs of every class, class-interleaved."""
    per_class = [sorted((folder / c).glob("*.png")) for c in CLASSES]
    return [str(p) for group in zip(*per_class) for p in group][:count]


def test_bundle_is_json_and_safetensors(bundle):
    out, summary = bundle
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["bundle.json", "head/head.json", "head/head.safetensors", "lvm/config.json",
                     "lvm/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer.safetensors"]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["classes"] == CLASSES and meta["method"] == "linear"
    assert meta["layer"] == summary["layer"] in (1, 2)
    assert meta["readout_layers"] == [meta["layer"]] and meta["format_version"] == 1  # older toolkits read it
    assert json.loads((out / "lvm" / "config.json").read_text())["n_layer"] == meta["layer"]  # truncated
    assert meta["preprocessing"]["image_size"] == 16 and meta["preprocessing"]["channels"] == 1
    assert 0.0 <= meta["metrics"]["val_accuracy"] <= 1.0
    assert set(meta["metrics"]["layer_sweep"]) == {"1", "2"}
    assert set(meta["fingerprints"]) == {"tokenizer", "lvm", "head"}
    assert all((p.stat().st_mode & 0o444) == 0o444 for p in out.rglob("*"))  # readable by the serving user


def test_round_trip_gives_identical_predictions(bundle, labelled_folder, tmp_path):
    first = Classifier.from_pretrained(bundle[0])
    first.save_pretrained(tmp_path / "copy")
    second = Classifier.from_pretrained(tmp_path / "copy")
    paths = _files(labelled_folder, 9)
    labels_a, probs_a = first.predict(paths)
    labels_b, probs_b = second.predict(paths)
    assert labels_a == labels_b and np.array_equal(probs_a, probs_b)
    assert second.info["bundle_id"] == first.info["bundle_id"]
    assert np.allclose(probs_a.sum(1), 1.0, atol=1e-5)


def test_bundle_predicts_what_the_probe_fits(bundle, tiny_pipeline, labelled_folder, tmp_path):
    """Independent route: the probe's own features and LinearProbe.fit on every train label."""
    clf = Classifier.from_pretrained(bundle[0])
    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    train = load_images(str(labelled_folder), "train", size=16, channels=1)
    ids = tok.encode(train.images)
    feats = extract_features(model, ids, SpecialTokens(tok.vocab_size), clf.layer, "grid", 3, precision="fp32")
    probe = LinearProbe.fit(feats, torch.from_numpy(train.labels), classes=3)
    with torch.no_grad():
        logits = clf.head(clf.token_states(clf.preprocess(train.images)))
    expected = ((feats - probe.mean) / probe.std) @ probe.weight.T + probe.bias
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert bundle[1]["train_images"] == len(train) < 120  # the test side of the folder was never read

    wrapped = tmp_path / "from-probe"  # the same probe wrapped without a refit: the same classifier
    bundle_from_probe(tiny_pipeline["lvm"], probe, clf.layer, str(wrapped), classes=CLASSES)
    assert np.array_equal(Classifier.from_pretrained(wrapped).predict(train.images)[1], clf.predict(train.images)[1])


def test_fit_linear_is_the_probes_fit():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(3, 12, generator=g)[y] + 1.5 * torch.randn(300, 12, generator=g)
    probe, metrics = fit_linear(x, y, classes=3)
    reference = LinearProbe.fit(x, y, classes=3)
    assert probe.l2 == reference.l2 == metrics["l2"]
    assert torch.equal(probe.weight, reference.weight) and torch.equal(probe.bias, reference.bias)
    assert metrics["val_accuracy"] == max(metrics["l2_scores"].values()) and len(metrics["l2_scores"]) == 4


def test_linear_head_pools_like_the_probe():
    tokens = torch.randn(5, 49, 8)
    for pool in ("grid", "mean", "tokens"):
        head = LinearHead(pool, 3, (7, 7), 8, 2)
        torch.testing.assert_close(head.pool(tokens), pool_tokens(tokens, pool, (7, 7), 3))


@pytest.mark.parametrize("channels,side", [(1, 16), (3, 64)])  # as is; area-downsampled to 28 px (not a divisor)
def test_linear_head_appends_the_pixels_as_the_probe_does(channels, side):
    from lvm.probe import pixel_features
    from tokenizer.images import ImageSet

    images = np.random.default_rng(0).integers(0, 256, (4, side, side, channels), dtype=np.uint8)
    tokens = torch.randn(4, 49, 8)
    head = LinearHead("grid", 3, (7, 7), 8, 2, pixels=(channels, side))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected = torch.cat([pool_tokens(tokens, "grid", (7, 7), 3), pixel_features(ImageSet(images, None, None, "test"))], 1)
    torch.testing.assert_close(head.pool(tokens, x), expected, atol=1e-5, rtol=1e-5)
    assert head.linear.in_features == expected.shape[1]
    with pytest.raises(Exception, match="pixels"):
        head.pool(tokens)


def test_a_pixels_bundle_predicts_what_the_probe_fits(tiny_pipeline, labelled_folder, tmp_path):
    """classifier-train --pixels: the head reads [pooled states, pixels], as lvm probe --pixels fits them,
    through save and load; a probe of the other width is refused by name."""
    from lvm.probe import pixel_features

    out = tmp_path / "px"
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder), layer=2,
                                           pixels=True, precision="fp32", out=str(out)))
    clf = Classifier.from_pretrained(out)
    assert json.loads((out / "head" / "head.json").read_text())["pixels"] == [1, 16]
    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    train = load_images(str(labelled_folder), "train", size=16, channels=1)
    feats = torch.cat([extract_features(model, tok.encode(train.images), SpecialTokens(tok.vocab_size), 2, "grid", 3,
                                        precision="fp32"), pixel_features(train)], 1)
    probe = LinearProbe.fit(feats, torch.from_numpy(train.labels), classes=3)
    expected = (((feats - probe.mean) / probe.std) @ probe.weight.T + probe.bias).softmax(1)
    torch.testing.assert_close(torch.from_numpy(clf.predict(train.images)[1]), expected, atol=1e-4, rtol=1e-4)
    assert clf.embed(train.images[:3]).shape == (3, feats.shape[1])
    wrapped = bundle_from_probe(tiny_pipeline["lvm"], probe, 2, str(tmp_path / "wrapped"), CLASSES, pixels=True)
    assert np.allclose(Classifier.from_pretrained(wrapped["out"]).predict(train.images)[1], clf.predict(train.images)[1],
                       atol=1e-6)
    with pytest.raises(Exception, match="--pixels"):
        bundle_from_probe(tiny_pipeline["lvm"], probe, 2, str(tmp_path / "no"), CLASSES)  # pixels not declared
    with pytest.raises(ProbeError, match="--pixels"):
        ClassifierTrainConfig(method="attentive", pixels=True)


def test_token_ids_are_the_tokenizers(bundle, labelled_folder):
    """The graph's first step is Tokenizer.encode's: the same ids as the shards the LVM was trained on."""
    clf = Classifier.from_pretrained(bundle[0])
    images = load_images(str(labelled_folder), "train", size=16, channels=1, limit=10).images
    ids = clf.token_ids(clf.preprocess(images))
    assert ids.shape == (10, 16) and torch.equal(ids, clf.tokenizer.encode(images).flatten(1))  # 4x4 tokens


def test_another_tokenizer_is_refused(bundle, tiny_pipeline, labelled_folder, tmp_path, capsys):
    from tokenizer.model import Tokenizer

    bad = tmp_path / "mixed"
    shutil.copytree(bundle[0], bad)
    other = Tokenizer.from_pretrained(bad / "tokenizer")
    torch.manual_seed(1)
    for p in other.encoder.parameters():  # same shapes and vocabulary, other weights
        torch.nn.init.normal_(p, std=0.05)
    shutil.rmtree(bad / "tokenizer")
    other.save_pretrained(bad / "tokenizer")
    with pytest.raises(BundleMismatch, match=r"tokenizer: fingerprint .* not the one the classifier was built with"):
        Classifier.from_pretrained(bad)
    code = main(["predict", "--model", str(bad), "--images", _files(labelled_folder, 1)[0],
                 "--out", str(tmp_path / "p.csv"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lvm predict: error: ") and "fingerprint" in lines[0]


def test_a_modified_head_is_refused(bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "tampered"
    shutil.copytree(bundle[0], bad)
    state = load_file(str(bad / "head" / "head.safetensors"))
    state["linear.weight"] = state["linear.weight"] * 2
    save_file(state, str(bad / "head" / "head.safetensors"))
    with pytest.raises(BundleMismatch, match="head"):
        Classifier.from_pretrained(bad)


def test_predict_names_the_corrupt_file_and_predicts_the_rest(bundle, labelled_folder, tmp_path, capsys):
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = []
    for i, path in enumerate(_files(labelled_folder, 6)):
        good.append(str(folder / f"img{i}.png"))
        shutil.copy(path, good[-1])
    (folder / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "preds.csv"
    code = main(["predict", "--model", str(bundle[0]), "--images", str(folder), "--out", str(out), "--top-k", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "1 of 7 images could not be read" in err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "probability", "label_2", "probability_2"]
    assert sorted(r["path"] for r in rows) == sorted(good)
    labels, probs = Classifier.from_pretrained(bundle[0]).predict([r["path"] for r in rows])
    assert [r["label"] for r in rows] == labels
    assert np.allclose([float(r["probability"]) for r in rows], probs.max(1), atol=1e-6)
    assert all(r["label_2"] != r["label"] and float(r["probability_2"]) <= float(r["probability"]) for r in rows)
    errors = list(csv.reader((tmp_path / "preds.errors.csv").open()))
    assert errors[0] == ["path", "error"] and errors[1][0].endswith("broken.png")

    (folder / "broken.png").unlink()  # all readable: exit 0, and the stale error list is gone
    assert main(["predict", "--model", str(bundle[0]), "--images", *good, "--out", str(out), "--no-progress"]) == 0
    assert not (tmp_path / "preds.errors.csv").exists()


def test_embed_writes_features_and_their_paths(bundle, labelled_folder, tmp_path):
    paths = _files(labelled_folder, 5)
    out = tmp_path / "feats.npy"
    assert main(["embed", "--model", str(bundle[0]), "--images", *paths, "--out", str(out), "--no-progress"]) == 0
    feats = np.load(out)
    assert (tmp_path / "feats.paths.txt").read_text().splitlines() == paths
    clf = Classifier.from_pretrained(bundle[0])
    assert feats.shape == (5, 64 * 9)  # tiny LVM width 64, 3x3 grid
    np.testing.assert_allclose(feats, clf.embed(paths), atol=1e-6)


def test_every_input_kind_is_prepared_as_load_images_prepares_training_images(bundle, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "odd"
    for i, (w, h) in enumerate([(20, 26), (31, 17), (16, 16), (40, 40)]):
        (folder / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / "c" / f"{i}.png")
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    reference = load_images(str(folder), "all", size=16, channels=1).images
    np.testing.assert_array_equal(to_uint8_images(paths, 16, 1), reference)
    clf = Classifier.from_pretrained(bundle[0])
    pil = [Image.open(p) for p in paths]
    _, from_paths = clf.predict(paths)
    _, from_pil = clf.predict(pil)
    _, from_array = clf.predict(reference)
    assert np.array_equal(from_paths, from_pil) and np.array_equal(from_paths, from_array)


def test_high_bit_depth_images_are_refused_with_the_fix():
    with pytest.raises(UnsupportedImage, match="mode 'I;16'"):
        prepare_image(Image.new("I;16", (8, 8)), 16, 1)


@pytest.mark.parametrize("method, init, head_kind", [("attentive", "probe", "attentive"), ("finetune", "probe", "linear"),
                                                      ("finetune", "attentive", "attentive")])
def test_attentive_and_finetuned_bundles(method, init, head_kind, tiny_pipeline, labelled_folder, tmp_path):
    out = tmp_path / method
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder), layer=2,
                                           method=method, head_max_steps=20, finetune_max_steps=3, head_batch_size=32,
                                           finetune_init=init, out=str(out)))
    clf = Classifier.from_pretrained(out)
    assert clf.info["method"] == method and clf.layer == 2
    assert json.loads((out / "head" / "head.json").read_text())["kind"] == head_kind  # LP-FT keeps a linear head
    # LP-FT's head is refitted on every labelled image once the LVM's weights are chosen (the default), and says so
    assert clf.info["metrics"].get("head_refit_on_all_images", False) == (method == "finetune" and init == "probe")
    _, probs = clf.predict(_files(labelled_folder, 4))
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert clf.embed(_files(labelled_folder, 2)).shape == (2, 64 if head_kind == "attentive" else 64 * 9)
    model, _, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    same = torch.equal(clf.lvm.blocks[0].mlp.w_up.weight, model.blocks[0].mlp.w_up.weight)
    if init == "attentive" or method == "attentive":  # LP-FT may keep its start (the probe) if no step beats it
        assert same == (method == "attentive")  # fine-tuning trains the LVM too


def test_cli_trains_a_bundle_at_a_given_layer(tiny_pipeline, labelled_folder, tmp_path):
    out = tmp_path / "cli"
    assert main(["classifier-train", "--checkpoint", tiny_pipeline["lvm"], "--source", str(labelled_folder),
                 "--layer", "1", "--out", str(out)]) == 0
    assert json.loads((out / "bundle.json").read_text())["layer"] == 1


def test_unlabelled_images_are_refused(tiny_pipeline, tmp_path, capsys):
    np.save(tmp_path / "unlabelled.npy", np.load(tiny_pipeline["npz"])["images"])
    with pytest.raises(ProbeError, match="no labels"):
        classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=str(tmp_path / "unlabelled.npy"),
                                               out=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()


def test_a_bundle_reading_several_layers_predicts_what_the_probe_fits(tiny_pipeline, labelled_folder, tmp_path):
    """--layers 1 2: the head reads both layers' pooled states side by side, in the order lvm probe --concat
    fits them; the bundle records its read-out, runs the LVM to the highest layer and loads back the same."""
    out = tmp_path / "l12"
    summary = classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder),
                                                     layers=[2, 1], precision="fp32", out=str(out)))
    assert summary["layer"] == [1, 2]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["readout_layers"] == [1, 2] and meta["layer"] == 2 and meta["format_version"] == 2
    clf = Classifier.from_pretrained(out)
    assert clf.readout == (1, 2) and clf.lvm.config.n_layer == 2

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    train = load_images(str(labelled_folder), "train", size=16, channels=1)
    ids, special = tok.encode(train.images), SpecialTokens(tok.vocab_size)
    feats = torch.cat([extract_features(model, ids, special, layer, "grid", 3, precision="fp32") for layer in (1, 2)], 1)
    probe = LinearProbe.fit(feats, torch.from_numpy(train.labels), classes=3)
    with torch.no_grad():
        logits = clf.head(clf.token_states(clf.preprocess(train.images)))
    expected = ((feats - probe.mean) / probe.std) @ probe.weight.T + probe.bias
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert clf.embed(_files(labelled_folder, 2)).shape == (2, 2 * 64 * 9)


def test_several_read_out_layers_are_checked(tiny_pipeline, labelled_folder, tmp_path):
    common = dict(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder), out=str(tmp_path / "b"))
    with pytest.raises(ProbeError, match="not together with --layer"):
        ClassifierTrainConfig(**common, layer=1, layers=[1, 2])
    with pytest.raises(ProbeError, match="fine-tuning"):
        ClassifierTrainConfig(**common, layers=[1, 2], method="finetune")
    with pytest.raises(ProbeError, match="out of range"):
        classifier_train(ClassifierTrainConfig(**common, layers=[1, 3]))
    # an attentive head reads the layers side by side too
    classifier_train(ClassifierTrainConfig(**{**common, "out": str(tmp_path / "att")}, layers=[1, 2],
                                           method="attentive", head_max_steps=5))
    att = Classifier.from_pretrained(tmp_path / "att")
    assert att.readout == (1, 2) and att.predict(_files(labelled_folder, 3))[1].shape == (3, 3)
    # a bundle.json whose read-out does not fit its head is refused with the fix
    meta = json.loads((tmp_path / "att" / "bundle.json").read_text())
    (tmp_path / "att" / "bundle.json").write_text(json.dumps({**meta, "readout_layers": [2]}))
    with pytest.raises(BundleMismatch, match="read-out layers"):
        Classifier.from_pretrained(tmp_path / "att")


def test_a_mirror_bundle_fits_on_images_and_mirrors_and_averages_both(tiny_pipeline, labelled_folder, tmp_path):
    """--mirror: the linear head is LinearProbe fitted on the images then their mirrors (whole images held out for
    L2), the bundle records it, and its probabilities are the mean over an image and its mirror."""
    out = tmp_path / "mirror"
    summary = classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder),
                                                     layer=2, mirror=True, precision="fp32", out=str(out)))
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["mirror"] is True and meta["format_version"] == 2 and meta["training"]["config"]["mirror"]
    clf = Classifier.from_pretrained(out)
    assert clf.mirror

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    train = load_images(str(labelled_folder), "train", size=16, channels=1)
    special = SpecialTokens(tok.vocab_size)
    feats = torch.cat([extract_features(model, tok.encode(np.ascontiguousarray(im)), special, 2, "grid", 3,
                                        precision="fp32") for im in (train.images, train.images[:, :, ::-1])])
    probe = LinearProbe.fit(feats, torch.from_numpy(train.labels).repeat(2), classes=3, copies=2)
    assert summary["val_accuracy"] == probe.l2_scores[str(probe.l2)]
    assert meta["metrics"]["val_images"] == int(len(train.labels) * 0.15)  # images, not rows
    torch.testing.assert_close(clf.head.linear.weight, probe.weight, atol=1e-4, rtol=1e-4)

    pixels = clf.preprocess(train.images[:8])
    with torch.no_grad():
        logits = clf.head(clf.token_states(torch.cat([pixels, pixels.flip(-1)])))
        expected = logits.softmax(-1).reshape(2, 8, 3).mean(0)
        torch.testing.assert_close(clf(pixels), expected)
        torch.testing.assert_close(clf(pixels.flip(-1)), expected)


def test_mirror_needs_a_linear_head_a_flippable_domain_and_a_boolean(tiny_pipeline, labelled_folder, tmp_path):
    common = dict(checkpoint=tiny_pipeline["lvm"], source=str(labelled_folder), out=str(tmp_path / "b"), mirror=True)
    with pytest.raises(ProbeError, match="linear head"):
        ClassifierTrainConfig(**common, method="attentive")
    with pytest.raises(ProbeError, match="no-flip"):
        ClassifierTrainConfig(**common, flip=False)
    classifier_train(ClassifierTrainConfig(**common, layer=1))
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({**meta, "mirror": "yes"}))
    with pytest.raises(BundleError, match="mirror"):
        Classifier.from_pretrained(tmp_path / "b")


def test_a_bundle_from_before_a_later_lvm_config_field_still_loads(bundle, tmp_path):
    """Bundles written before LVMConfig.prefix_lm existed fingerprinted their LVM's config without it; they load, and
    a config that sets the field otherwise (a different model) is still refused against that fingerprint."""
    from lvm.classifier import bundle_id, state_fingerprint

    out, _ = bundle
    old = tmp_path / "old"
    shutil.copytree(out, old)
    config = json.loads((old / "lvm" / "config.json").read_text())
    config.pop("prefix_lm")  # as the toolkit wrote it then
    (old / "lvm" / "config.json").write_text(json.dumps(config))
    clf = Classifier.from_pretrained(out)
    meta = json.loads((old / "bundle.json").read_text())
    meta["fingerprints"]["lvm"] = state_fingerprint(config, clf.lvm.state_dict())
    meta["bundle_id"] = bundle_id(meta["fingerprints"], meta["classes"])
    (old / "bundle.json").write_text(json.dumps(meta))
    loaded = Classifier.from_pretrained(old)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(images)[1], clf.predict(images)[1], atol=1e-6)
    (old / "lvm" / "config.json").write_text(json.dumps({**config, "prefix_lm": True}))
    with pytest.raises(BundleMismatch, match="fingerprint"):
        Classifier.from_pretrained(old)
