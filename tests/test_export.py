"""ONNX export: one graph from pixels to probabilities, with a dynamic batch, that ONNX Runtime runs to the
same top-1 and within 1e-4 of PyTorch's probabilities, built on the torch path whatever the kernel switch says."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")
pytest.importorskip("onnxscript", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")
pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")

from lvm import Classifier  # noqa: E402
from lvm.classifier_train import ClassifierTrainConfig, classifier_train  # noqa: E402
from lvm.cli import main  # noqa: E402
from lvm.export import MissingDeployExtra, OnnxClassifier, compare_with_torch, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory):
    """A linear bundle of the tiny pipeline (its .npz source) and its ONNX graph, exported with the kernel
    switch on ``auto``: under the Triton interpreter (conftest) that picks our custom ops, and the export
    must still trace the torch path (the tests below check the graph holds standard ops only)."""
    root = tmp_path_factory.mktemp("export")
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], layer=2,
                                           out=str(root / "bundle")))
    clf = Classifier.from_pretrained(root / "bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LVM_KERNELS", "auto")
        path = export_onnx(clf, root / "model.onnx")
        assert os.environ["LVM_KERNELS"] == "auto"  # the switch is restored
    return clf, path


def _generated_images(n: int, seed: int = 0) -> np.ndarray:
    """Banded images like the training ones, plus noise images nothing was fitted on."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, 16, 16, 1), dtype=np.uint8)
    for i in range(n // 2):
        band = i % 3
        images[i, 5 * band : 5 * band + 5] += 180
    images[n // 2 :] = rng.integers(0, 256, (n - n // 2, 16, 16, 1), dtype=np.uint8)
    return images


def test_onnx_runtime_matches_pytorch(exported):
    clf, path = exported
    parity = compare_with_torch(clf, OnnxClassifier(path), _generated_images(200))
    assert parity["images"] == 200
    assert parity["top1_agreement"] == 1.0
    assert parity["max_abs_prob_diff"] <= 1e-4


def test_graph_takes_any_batch_and_names_its_ends(exported):
    clf, path = exported
    model = onnx.load(str(path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("pixels", "probabilities")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 16, 16]  # symbolic batch
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no custom (Triton) ops: the torch path
    runner = OnnxClassifier(path)
    assert runner.classes == clf.classes and runner.bundle_id == clf.info["bundle_id"]
    pixels = clf.preprocess(_generated_images(5, seed=1))
    for batch in (1, 2, 5):
        probs = runner(pixels[:batch].numpy())
        assert probs.shape == (batch, 3)
        np.testing.assert_allclose(probs, clf(pixels[:batch]).detach().numpy(), atol=1e-4)


def test_export_cli_checks_parity(exported, tmp_path, capsys):
    clf, _ = exported
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(clf.path), "--out", str(out), "--check-images", "16"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[text.index("{\n"):])  # the command's summary, after any exporter progress lines
    assert summary["check"]["images"] == 16 and summary["check"]["top1_agreement"] == 1.0
    assert summary["check"]["max_abs_prob_diff"] <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == clf.classes and props["image_size"] == "16"


def test_predict_from_files_matches(exported, tmp_path):
    clf, path = exported
    files = []
    for i, image in enumerate(_generated_images(4, seed=2)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image[..., 0]).save(files[-1])
    labels_onnx, probs_onnx = OnnxClassifier(path).predict(files)
    labels_torch, probs_torch = clf.predict(files)
    assert labels_onnx == labels_torch and np.allclose(probs_onnx, probs_torch, atol=1e-4)


def test_missing_runtime_names_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(MissingDeployExtra, match=r"lvm-toolkit\[deploy\]"):
        OnnxClassifier(exported[1])


def test_onnx_parity_holds_for_an_attentive_head(tiny_pipeline, tmp_path):
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], layer=1,
                                           method="attentive", head_max_steps=10, out=str(tmp_path / "att")))
    clf = Classifier.from_pretrained(tmp_path / "att")
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking head: attention that is not uniform
        clf.head.pool.query.mul_(20)
        torch.nn.init.normal_(clf.head.head.weight)
    parity = compare_with_torch(clf, OnnxClassifier(export_onnx(clf, tmp_path / "att.onnx")), _generated_images(64))
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4


def test_onnx_parity_holds_for_a_head_that_appends_the_pixels(tiny_pipeline, tmp_path):
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], layer=2,
                                           pixels=True, out=str(tmp_path / "px")))
    clf = Classifier.from_pretrained(tmp_path / "px")
    assert clf.head.pixels == (1, 16)
    parity = compare_with_torch(clf, OnnxClassifier(export_onnx(clf, tmp_path / "px.onnx")), _generated_images(64))
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4


def test_onnx_parity_holds_for_a_bundle_reading_several_layers(tiny_pipeline, tmp_path):
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], layers=[1, 2],
                                           out=str(tmp_path / "l12")))
    clf = Classifier.from_pretrained(tmp_path / "l12")
    assert clf.readout == (1, 2)
    model = OnnxClassifier(export_onnx(clf, tmp_path / "l12.onnx"))
    parity = compare_with_torch(clf, model, _generated_images(64))
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "l12.onnx")).metadata_props}
    assert json.loads(props["readout_layers"]) == [1, 2] and props["layer"] == "2"


def test_onnx_parity_holds_for_a_mirror_bundle(tiny_pipeline, tmp_path):
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], layer=2,
                                           mirror=True, out=str(tmp_path / "m")))
    clf = Classifier.from_pretrained(tmp_path / "m")
    assert clf.mirror
    model = OnnxClassifier(export_onnx(clf, tmp_path / "m.onnx"))
    images = _generated_images(64)
    parity = compare_with_torch(clf, model, images)
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4
    pixels = model.preprocess(images)
    np.testing.assert_allclose(model(pixels), model(np.ascontiguousarray(pixels[..., ::-1])), atol=1e-5)  # averaged
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["mirror"]) is True
