"""``lvm export``: one ONNX graph from pixels to probabilities, and the ONNX Runtime runner for it.

    pixels float32 [N, C, H, W] in [0, 1]  ->  Classifier.forward  ->  probabilities float32 [N, K]

The whole bundle is one graph: the tokenizer's encoder and its FSQ rounding to ids, the LVM cut at
the bundle's layer (on its pure-torch path: SDPA attention, no custom ops) and the head. The batch
axis is dynamic; the image size and the class order are the bundle's and are written into the
graph's metadata with the bundle id. Export goes through ``torch.export`` (``torch.onnx.export(...,
dynamo=True)``), which needs the ``deploy`` extra: ``pip install 'lvm-toolkit[deploy]'``.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lvm.classifier import Classifier, bundle_id, to_uint8_images
from lvm.runtime import ConfigError
from tokenizer.atomic import atomic_path

FORMATS = ("onnx",)
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
DEPLOY_HINT = "pip install 'lvm-toolkit[deploy]'"


class MissingDeployExtra(ConfigError):
    """A deployment command whose optional dependencies are not installed; the message says what to install."""


@dataclass
class ExportConfig:
    """``lvm export``: the classifier bundle as one ONNX graph (pixels -> probabilities) for ONNX Runtime."""

    model: str = "runs/classifier"  # classifier bundle folder (the --out of lvm classifier-train)
    format: str = "onnx"  # onnx
    out: str = "model.onnx"  # the graph file (weights inside)
    opset: int = 18  # ONNX opset version
    check: bool = True  # run the graph in ONNX Runtime on random images and compare with PyTorch
    check_images: int = 64  # random images for --check

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}.")


def run_export(cfg: ExportConfig) -> dict:
    """The ``lvm export`` entry point: writes the graph and, with ``check``, its parity with PyTorch."""
    clf = Classifier.from_pretrained(cfg.model)
    path = export_onnx(clf, cfg.out, opset=cfg.opset)
    summary = {"out": str(path), "bytes": path.stat().st_size, "input": f"{INPUT_NAME} float32 [N, {clf.channels}, "
               f"{clf.image_size}, {clf.image_size}] in [0, 1]", "output": f"{OUTPUT_NAME} float32 [N, "
               f"{len(clf.classes)}]", "classes": clf.classes}
    if cfg.check:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (cfg.check_images, clf.image_size, clf.image_size, clf.channels), np.uint8)
        summary["check"] = compare_with_torch(clf, OnnxClassifier(path), images)
    return summary


def export_onnx(clf: Classifier, out: str | os.PathLike, opset: int = 18) -> Path:
    """Write ``clf`` as one ONNX file (weights inside) with a dynamic batch axis, atomically."""
    onnx = _require("onnx")
    _require("onnxscript")  # torch's dynamo exporter translates through it
    clf = clf.eval().float()
    example = torch.rand(2, clf.channels, clf.image_size, clf.image_size)  # batch 2: torch.export specialises 0/1
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch_kernels(), torch.no_grad():
        program = torch.onnx.export(clf, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"pixels": {0: batch}}, opset_version=opset, external_data=False,
                                    verbose=False)
    proto = program.model_proto
    props = {"classes": json.dumps(clf.classes), "image_size": str(clf.image_size), "channels": str(clf.channels),
             "bundle_id": clf.info.get("bundle_id") or bundle_id(clf.fingerprints(), clf.classes),
             "layer": str(clf.layer), "readout_layers": json.dumps(list(clf.readout)), "mirror": json.dumps(clf.mirror),
             "method": str(clf.info.get("method", ""))}
    onnx.helper.set_model_props(proto, props)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(out)


class OnnxClassifier:
    """An exported graph in ONNX Runtime, with ``Classifier``'s ``predict`` (the class list comes from the graph)."""

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("classes", "image_size", "channels") if k not in props]
        if missing:
            raise ConfigError(f"{path}: no {', '.join(missing)} in the graph's metadata; export it with 'lvm export'.")
        self.classes = json.loads(props["classes"])
        self.image_size, self.channels = int(props["image_size"]), int(props["channels"])
        self.bundle_id = props.get("bundle_id", "")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """float32 ``[N, C, H, W]`` in [0, 1] -> probabilities float32 ``[N, K]``."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixels, np.float32)})[0]

    def preprocess(self, images) -> np.ndarray:
        arr = to_uint8_images(images, self.image_size, self.channels)
        return arr.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)

    def predict(self, images, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        pixels = self.preprocess(images)
        probs = np.concatenate([self(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])
        return [self.classes[i] for i in probs.argmax(1)], probs


def compare_with_torch(clf: Classifier, runner: OnnxClassifier, images, batch_size: int = 256) -> dict:
    """Top-1 agreement and the largest probability difference between PyTorch (fp32) and ONNX Runtime."""
    _, ours = clf.predict(images, batch_size=batch_size)
    _, theirs = runner.predict(images, batch_size=batch_size)
    return {"images": len(ours), "top1_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(ours - theirs).max())}


@contextmanager
def torch_kernels():
    """Run the LVM on its pure-torch path (``LVM_KERNELS=torch``) inside the block: the exporter must see SDPA,
    not our Triton custom ops (which ONNX cannot express), even where Triton would run."""
    from kernels.dispatch import ENV_VAR

    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "torch"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


def _require(module: str):
    """Import an optional deployment dependency, or say which extra installs it."""
    try:
        if module == "onnx":
            import onnx as mod
        elif module == "onnxscript":
            import onnxscript as mod
        else:
            import onnxruntime as mod
    except ImportError:
        raise MissingDeployExtra(f"{module} is not installed; it is part of the deploy extra: {DEPLOY_HINT}.") from None
    return mod
