"""The classifier bundle: what a user takes home from a probe and runs on a CPU server.

    pixels [N, C, H, W] in [0, 1] -> tokenizer encoder + quantizer -> ids [N, h*w] -> [BOS] ids
      -> LVM cut at the chosen layer -> token states [N, T, D] -> head -> probabilities [N, K]

(a bundle that reads several layers, ``readout_layers``, takes their states side by side: [N, T, D x layers];
a ``mirror`` bundle runs each image and its left-right mirror and returns the mean of their probabilities).

A bundle is a folder of safetensors + JSON (loading never unpickles code), written atomically:

    bundle.json   classes, method, layer, readout_layers, mirror, preprocessing, validation metrics and the
                  parts' fingerprints
    tokenizer/    Tokenizer.save_pretrained (weights + config)
    lvm/          LVM.save_pretrained of the model truncated at ``layer`` (``n_layer = layer``)
    head/         head.safetensors + head.json: ``linear`` (pooled states, standardised, one matmul) or
                  ``attentive`` (attention pooling + linear; what ``attentive`` and ``finetune`` fit)

The fingerprints in bundle.json tie the parts together: a folder whose tokenizer, LVM or head is not
the one the classifier was fitted with is refused with ``BundleMismatch``. ``lvm.classifier_train``
builds bundles, ``lvm.predict`` runs them on files, ``lvm.export`` and ``lvm.serve`` deploy them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange
from PIL import Image, UnidentifiedImageError

from lvm.attentive import AttentiveClassifier
from lvm.data import SpecialTokens, image_rows
from lvm.model import LVM
from lvm.runtime import mixed_precision
from tokenizer import images as _images
from tokenizer.images import ImageSourceError
from tokenizer.model import Tokenizer

BUNDLE_FILE = "bundle.json"
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head.json"
# the newest this toolkit reads; 2: several read-out layers or mirror averaging (other bundles still write 1, so that
# older toolkits read them; an older one refuses a 2 instead of running it without what it needs)
FORMAT_VERSION = 2
HEAD_KINDS = ("linear", "attentive")
# bundle.json entries save_pretrained computes itself; the rest of ``Classifier.info`` (metrics, training) is kept
COMPUTED_KEYS = ("format_version", "classes", "method", "layer", "readout_layers", "mirror", "preprocessing",
                 "fingerprints", "bundle_id")
NOT_INFO = ("classes", "layer", "readout_layers", "mirror")  # bundle.json entries the Classifier holds as attributes
# 8-bit modes that convert to grey or RGB without loss of meaning; 16-bit, 32-bit int and float images
# would be clipped to 8 bits silently, so they are refused with the fix instead.
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


class BundleError(ValueError):
    """A folder that is not a usable classifier bundle; the message names the file and the fix."""


class BundleMismatch(BundleError):
    """The bundle's parts are not the ones it was built from (fingerprints differ)."""


class UnsupportedImage(ImageSourceError):
    """An image whose mode or size the classifier cannot take; the message says what to send instead."""


class ImageTooLarge(UnsupportedImage):
    """An image with more pixels than allowed (checked from its header, before it is decoded)."""


class Classifier(nn.Module):
    """Tokenizer + LVM truncated at ``layer`` + head, as one module from pixels to probabilities.

    ``readout``: the layers whose states the head reads side by side (``lvm probe --layers 4 5 6 --concat``);
    default the last one. The LVM is cut at the highest of them. ``mirror``: the head was fitted on images and
    their left-right mirrors (``lvm probe --mirror``); ``forward`` returns the mean of an image's and its mirror's
    probabilities (twice the compute), ``embed`` the image's own features.

    ``forward`` is the graph that is exported and served; ``predict`` and ``embed`` take what users
    have (uint8 arrays ``[N, H, W, C]``, PIL images or paths) and preprocess them the way
    ``tokenizer.images.load_images`` prepared the training images.
    """

    def __init__(self, tokenizer: Tokenizer, lvm: LVM, head: nn.Module, classes: Sequence[str],
                 info: dict | None = None, precision: str = "fp32", readout: Sequence[int] | None = None,
                 mirror: bool = False) -> None:
        super().__init__()
        self.tokenizer, self.lvm, self.head = tokenizer.eval(), lvm.eval(), head.eval()
        self.readout = tuple(int(layer) for layer in readout) if readout else (lvm.config.n_layer,)
        self.classes = [str(c) for c in classes]
        self.mirror = bool(mirror)
        self.special = SpecialTokens(tokenizer.vocab_size)
        self.info = dict(info or {})
        self.precision = precision
        self.path: Path | None = None  # the bundle folder it was loaded from
        _check_parts(self)

    # ---- the graph ----------------------------------------------------------------------------

    @property
    def layer(self) -> int:
        return self.lvm.config.n_layer

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def channels(self) -> int:
        return self.tokenizer.config.channels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` float32 [N, C, H, W] in [0, 1] -> probabilities float32 [N, K] in ``classes`` order."""
        if not self.mirror:
            return self.head(*self._head_inputs(pixels)).float().softmax(dim=-1)
        both = torch.cat([pixels, pixels.flip(-1)])  # one batch: the images, then their mirrors
        probs = self.head(*self._head_inputs(both)).float().softmax(dim=-1)
        return rearrange(probs, "(v n) k -> v n k", v=2).mean(0)

    def _head_inputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The token states, and the pixels too for a linear head that appends them (``lvm probe --pixels``)."""
        states = self.token_states(pixels)
        return (states, pixels) if getattr(self.head, "pixels", None) else (states,)

    def token_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tokenizer's ids ``long [N, h*w]``, as ``Tokenizer.encode`` computes them (FSQ rounding included)."""
        return self.tokenizer.encode_pixels(pixels).flatten(1)  # [N, h, w] -> [N, h*w]

    def token_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """The read-out layers' states at the image tokens, ``[N, T, D]`` per layer side by side (the probes'
        features; one layer: the truncated LVM's last)."""
        rows = image_rows(self.token_ids(pixels), self.special)  # [N, 1 + T]
        states = self.lvm.hidden_states(rows, layers=list(self.readout))
        return (states[0] if len(states) == 1 else torch.cat(states, dim=-1))[:, 1:]

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the head's last linear layer reads: ``[N, F]`` (linear: pooled states; attentive: attention pool)."""
        return self.head.pool(*self._head_inputs(pixels))

    # ---- user-facing --------------------------------------------------------------------------

    def preprocess(self, images) -> torch.Tensor:
        """uint8 ``[N, H, W, C]`` / ``[N, H, W]``, PIL images or paths -> float32 ``[N, C, S, S]`` in [0, 1]."""
        arr = to_uint8_images(images, self.image_size, self.channels)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """``(labels, probabilities)``: the top class name per image and float32 ``[N, K]`` in ``classes`` order."""
        probs = self._batched(self.forward, images, batch_size)
        return [self.classes[i] for i in probs.argmax(1)], probs

    @torch.inference_mode()
    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """Pooled features float32 ``[N, F]``: the vectors the head's last linear layer classifies."""
        return self._batched(self.pooled, images, batch_size)

    def _batched(self, fn, images, batch_size: int) -> np.ndarray:
        pixels = self.preprocess(images)
        device = next(self.parameters()).device
        outs = []
        with mixed_precision(device, self.precision):
            for start in range(0, len(pixels), batch_size):
                outs.append(fn(pixels[start : start + batch_size].to(device)).float().cpu())
        if not outs:
            raise ImageSourceError("no images were given to the classifier; pass at least one.")
        return torch.cat(outs).numpy()

    def num_params(self) -> dict[str, int]:
        """Parameters by part, counting only what inference runs (the tokenizer's decoder is stored, not run)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = {"tokenizer_encoder": count(self.tokenizer.encoder) + count(self.tokenizer.quantizer),
                 "lvm": count(self.lvm) - (0 if self.lvm.config.tie_embeddings else self.lvm.head.weight.numel()),
                 "head": count(self.head)}
        return {**parts, "total": sum(parts.values())}

    # ---- files --------------------------------------------------------------------------------

    def fingerprints(self) -> dict[str, str]:
        """Short sha256 of each part (config + weights); bundle.json records them to tie the parts together."""
        return {"tokenizer": self.tokenizer.fingerprint, "lvm": lvm_fingerprint(self.lvm),
                "head": state_fingerprint(head_config(self.head), self.head.state_dict())}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the bundle folder (temp folder, then renamed into place: never half-written)."""
        from safetensors.torch import save_file

        from tokenizer.atomic import atomic_path

        fingerprints = self.fingerprints()
        meta = {
            "format_version": 2 if len(self.readout) > 1 or self.mirror else 1,  # see FORMAT_VERSION
            "classes": self.classes,
            "method": self.info.get("method", "linear"),
            "layer": self.layer,
            "readout_layers": list(self.readout),
            "mirror": self.mirror,
            "preprocessing": {
                "image_size": self.image_size, "channels": self.channels,
                "resize": "shorter side to image_size (bicubic), then centre crop; grey = PIL 'L', colour = 'RGB'",
                "pixels": "float32 [N, C, H, W] in [0, 1] (uint8 / 255)",
            },
            **{k: v for k, v in self.info.items() if k not in COMPUTED_KEYS},
            "fingerprints": fingerprints,
            "bundle_id": bundle_id(fingerprints, self.classes),
        }
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.lvm.save_pretrained(tmp / "lvm")
            (tmp / "head").mkdir()
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, str(tmp / "head" / HEAD_WEIGHTS), metadata={"fingerprint": fingerprints["head"]})
            (tmp / "head" / HEAD_CONFIG).write_text(json.dumps(head_config(self.head), indent=2) + "\n")
            (tmp / BUNDLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            for path in tmp.rglob("*"):  # safetensors writes 0600; a bundle is read by whoever serves it
                path.chmod(0o755 if path.is_dir() else 0o644)
        self.info = {k: v for k, v in meta.items() if k not in NOT_INFO}
        self.path = Path(directory)
        return self.path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, precision: str = "fp32") -> "Classifier":
        """Load a bundle, refusing one whose parts' fingerprints differ from those in its bundle.json."""
        directory = Path(directory)
        meta = read_bundle_json(directory)
        tokenizer = Tokenizer.from_pretrained(directory / "tokenizer")  # TokenizerError names the file
        try:
            lvm = LVM.from_pretrained(directory / "lvm")
        except (FileNotFoundError, ValueError) as err:
            raise BundleError(f"{directory / 'lvm'}: {err} Rebuild the bundle with 'lvm classifier-train'.") from None
        head = load_head(directory / "head")
        info = {k: v for k, v in meta.items() if k not in NOT_INFO}
        readout = meta.get("readout_layers")
        if readout is not None and (not isinstance(readout, list) or not all(isinstance(x, int) for x in readout)):
            raise BundleError(f"{directory / BUNDLE_FILE}: readout_layers {readout!r} is not a list of layer numbers; "
                              "rebuild the bundle with 'lvm classifier-train'.")
        mirror = meta.get("mirror", False)
        if not isinstance(mirror, bool):
            raise BundleError(f"{directory / BUNDLE_FILE}: mirror {mirror!r} is not true or false; rebuild the bundle "
                              "with 'lvm classifier-train'.")
        clf = cls(tokenizer, lvm, head, meta["classes"], info, precision, readout, mirror)
        expected = meta.get("fingerprints", {})
        actual = clf.fingerprints()
        for part in ("tokenizer", "lvm", "head"):
            # an LVM written before a config field existed was fingerprinted without it (see LATER_LVM_FIELDS)
            older = {older_lvm_fingerprint(clf.lvm)} if part == "lvm" else set()
            if expected.get(part) not in {actual[part], *older}:
                raise BundleMismatch(
                    f"{directory / part}: fingerprint {actual[part]} but {directory / BUNDLE_FILE} records "
                    f"{expected.get(part)}; this {part} is not the one the classifier was built with (the parts were "
                    "mixed up or modified). Restore the bundle folder as written, or rebuild it with "
                    "'lvm classifier-train'."
                )
        if meta.get("layer") not in (None, clf.layer):
            raise BundleMismatch(f"{directory / 'lvm'} has {clf.layer} layers but {directory / BUNDLE_FILE} "
                                 f"says layer {meta['layer']}; rebuild the bundle with 'lvm classifier-train'.")
        clf.path = directory
        return clf


# ---------------------------------------------------------------------------------------------
# Heads: what reads the token states [N, T, D]
# ---------------------------------------------------------------------------------------------

class LinearHead(nn.Module):
    """The linear probe as a module: pool the token states, standardise, one matmul to class logits.

    Pooling is a fixed ``[P, T]`` averaging matrix built by ``adaptive_avg_pool2d`` itself, so it
    averages exactly the windows the probe's ``pool_tokens`` does, and exports as a plain matmul
    (ONNX has no adaptive pooling for 7 -> 3 windows).
    """

    def __init__(self, pool: str, grid: int, hw: tuple[int, int], dim: int, classes: int,
                 pixels: tuple[int, int] | None = None) -> None:
        super().__init__()
        if pool not in ("mean", "grid", "tokens"):
            raise BundleError(f"linear head: pool={pool!r} is not one of mean, grid, tokens.")
        self.pool_name, self.grid, self.hw = pool, grid, tuple(hw)
        self.register_buffer("pool_matrix", pool_matrix(pool, grid, self.hw))  # [P, T]
        features = dim * (self.hw[0] * self.hw[1] if pool == "tokens" else len(self.pool_matrix))
        # (channels, image side): the raw-pixel features (lvm.probe.pixel_features) appended to the pooled states
        self.pixels = tuple(pixels) if pixels else None
        if self.pixels:
            channels, side = self.pixels
            self.register_buffer("pixel_matrix", _avg_matrix(side, pixel_side(channels, side)))  # [s, S], one axis
            features += pixel_dims(*self.pixels)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.linear = nn.Linear(features, classes)

    @classmethod
    def from_probe(cls, probe, pool: str, grid: int, hw: tuple[int, int], dim: int,
                   pixels: tuple[int, int] | None = None) -> "LinearHead":
        """Wrap a fitted ``lvm.probe.LinearProbe`` (mean, std, weight ``[K, F]``, bias ``[K]``); ``pixels``
        (channels, image side) where it was fitted on the states followed by ``pixel_features``."""
        head = cls(pool, grid, hw, dim, probe.weight.shape[0], pixels)
        if probe.weight.shape[1] != head.linear.in_features:
            raise BundleError(f"the linear probe reads {probe.weight.shape[1]} features but this head makes "
                              f"{head.linear.in_features}; pass pixels=(channels, side) for a probe fitted with "
                              "--pixels, and the pool and grid it was fitted with.")
        with torch.no_grad():
            head.mean.copy_(probe.mean)
            head.std.copy_(probe.std)
            head.linear.weight.copy_(probe.weight)
            head.linear.bias.copy_(probe.bias)
        return head

    def pool(self, tokens: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, T, D]`` -> ``[N, F]`` in the probe's feature order (``d`` major, then grid cell), then, for a
        head with ``pixels``, the image ``[N, C, H, W]`` in [0, 1] as ``pixel_features`` lays it out."""
        if self.pool_name == "tokens":
            feats = tokens.float().flatten(1)
        else:
            feats = einsum(self.pool_matrix, tokens.float(), "p t, n t d -> n d p").flatten(1)
        if not self.pixels:
            return feats
        if pixels is None:
            raise BundleError("this linear head appends the image's pixels to the LVM's features; pass them.")
        m = self.pixel_matrix  # separable area averaging = adaptive_avg_pool2d, as a matmul that ONNX exports
        small = einsum(m, pixels.float(), m, "i h, n c h w, j w -> n i j c")  # channels last, as pixel_features
        return torch.cat([feats, small.flatten(1)], dim=1)

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear((self.pool(tokens, pixels) - self.mean) / self.std)


def pixel_side(channels: int, side: int) -> int:
    """The side ``lvm.probe.pixel_features`` area-downsamples a ``side`` px image to (itself when small enough)."""
    from lvm.probe import PIXEL_FEATURES_MAX

    return side if channels * side * side <= PIXEL_FEATURES_MAX else min(side, int(math.sqrt(PIXEL_FEATURES_MAX / channels)))


def pixel_dims(channels: int, side: int) -> int:
    """How many values ``pixel_features`` gives a ``channels`` x ``side`` px image."""
    return channels * pixel_side(channels, side) ** 2


def _avg_matrix(side: int, small: int) -> torch.Tensor:
    """``[small, side]``: row i averages the pixels of adaptive pooling's window i (identity when equal)."""
    return F.adaptive_avg_pool1d(torch.eye(side)[None], small)[0].T.contiguous()


def pool_matrix(pool: str, grid: int, hw: tuple[int, int]) -> torch.Tensor:
    """``[P, h*w]`` averaging weights: row p holds 1/|window| on the tokens of output cell p."""
    h, w = hw
    if pool != "grid":
        return torch.full((1, h * w), 1.0 / (h * w))
    basis = rearrange(torch.eye(h * w), "t (h w) -> t 1 h w", h=h, w=w)  # one image per token
    cells = F.adaptive_avg_pool2d(basis, grid)  # [T, 1, g, g]: token t's weight in each cell
    return rearrange(cells, "t 1 g1 g2 -> (g1 g2) t").contiguous()


def head_config(head: nn.Module) -> dict:
    """The JSON that rebuilds ``head`` (its kind and shapes) before its safetensors are loaded."""
    if isinstance(head, LinearHead):
        cells = head.hw[0] * head.hw[1] if head.pool_name == "tokens" else len(head.pool_matrix)
        appended = pixel_dims(*head.pixels) if head.pixels else 0
        config = {"kind": "linear", "pool": head.pool_name, "grid": head.grid, "hw": list(head.hw),
                  "dim": (head.linear.in_features - appended) // cells, "classes": head.linear.out_features}
        return {**config, "pixels": list(head.pixels)} if head.pixels else config
    if isinstance(head, AttentiveClassifier):
        pool = head.pool
        return {"kind": "attentive", "dim": pool.pos.shape[1], "tokens": pool.pos.shape[0],
                "classes": head.head.out_features, "heads": pool.heads, "queries": pool.queries}
    raise TypeError(f"no bundle format for a head of type {type(head).__name__}; use LinearHead or "
                    "AttentiveClassifier.")


def build_head(config: dict) -> nn.Module:
    """An untrained head of the shape ``config`` (``head_config``'s output) describes."""
    kind = config.get("kind")
    if kind == "linear":
        pixels = config.get("pixels")
        return LinearHead(config["pool"], int(config["grid"]), tuple(config["hw"]), int(config["dim"]),
                          int(config["classes"]), tuple(int(v) for v in pixels) if pixels else None)
    if kind == "attentive":
        return AttentiveClassifier(int(config["dim"]), int(config["tokens"]), int(config["classes"]),
                                   int(config["heads"]), int(config["queries"]))
    raise BundleError(f"head kind {kind!r} is unknown; this toolkit reads heads of kind {HEAD_KINDS}.")


def load_head(directory: Path) -> nn.Module:
    from safetensors.torch import load_file

    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        if not (directory / name).is_file():
            raise BundleError(f"{directory / name} not found; a bundle's head/ holds {HEAD_CONFIG} and {HEAD_WEIGHTS}. "
                              "Rebuild the bundle with 'lvm classifier-train'.")
    try:
        config = json.loads((directory / HEAD_CONFIG).read_text())
        head = build_head(config)
        missing, unexpected = head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)), strict=False)
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError) as err:
        raise BundleError(f"{directory}: the head's files do not fit together ({type(err).__name__}: {err}); "
                          "rebuild the bundle with 'lvm classifier-train'.") from None
    if missing or unexpected:
        raise BundleError(f"{directory / HEAD_WEIGHTS} does not match {directory / HEAD_CONFIG}: missing {missing}, "
                          f"unexpected {unexpected}; rebuild the bundle with 'lvm classifier-train'.")
    return head.eval()


# ---------------------------------------------------------------------------------------------
# Fingerprints and bundle.json
# ---------------------------------------------------------------------------------------------

def state_fingerprint(config: dict, state: dict[str, torch.Tensor]) -> str:
    """Short sha256 of a JSON config and the tensors of a state dict (name, dtype, shape and bytes)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def lvm_fingerprint(lvm: LVM) -> str:
    return state_fingerprint(lvm.config.to_dict(), lvm.state_dict())


# LVMConfig fields added after bundles were first written, with the value that leaves the model as it was: a bundle
# from before a field existed recorded the fingerprint of a config without it, and must still load (and one with the
# field at another value must not match that fingerprint)
LATER_LVM_FIELDS = {"prefix_lm": False}


def older_lvm_fingerprint(lvm: LVM) -> str:
    """``lvm_fingerprint`` as a toolkit from before ``LATER_LVM_FIELDS`` computed it (those at their neutral value
    left out of the config)."""
    config = {k: v for k, v in lvm.config.to_dict().items() if k not in LATER_LVM_FIELDS or LATER_LVM_FIELDS[k] != v}
    return state_fingerprint(config, lvm.state_dict())


def bundle_id(fingerprints: dict[str, str], classes: Sequence[str]) -> str:
    """One id for the whole bundle: what ``lvm serve`` reports and the ONNX graph carries."""
    return hashlib.sha256(json.dumps([fingerprints, list(classes)], sort_keys=True).encode()).hexdigest()[:16]


def read_bundle_json(directory: Path) -> dict:
    path = directory / BUNDLE_FILE
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such folder; pass a classifier bundle (the --out of "
                          "'lvm classifier-train').")
    if not path.is_file():
        raise BundleError(f"{path} not found; {directory} is not a classifier bundle. Pass the --out folder of "
                          "'lvm classifier-train'.")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON ({err}); rebuild the bundle with "
                          "'lvm classifier-train'.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise BundleError(f"{path} has no 'classes' list; rebuild the bundle with 'lvm classifier-train'.")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise BundleError(f"{path} has format_version {meta['format_version']}; this toolkit reads up to "
                          f"{FORMAT_VERSION}. Upgrade lvm-toolkit.")
    return meta


def truncate_lvm(lvm: LVM, layer: int) -> LVM:
    """A copy of ``lvm`` with blocks ``1..layer`` only and ``config.n_layer = layer``: what a bundle stores."""
    if not 1 <= layer <= len(lvm.blocks):
        raise BundleError(f"layer {layer} is out of range; this LVM has blocks 1..{len(lvm.blocks)}.")
    cut = copy.deepcopy(lvm).cpu().eval()
    cut.blocks = cut.blocks[:layer]
    cut.config = dataclasses.replace(lvm.config, n_layer=layer)
    return cut


def _check_parts(clf: Classifier) -> None:
    """The parts must fit each other; a mismatch is named here instead of failing inside a matmul."""
    vocab = clf.special.vocab_size
    if clf.lvm.config.vocab_size != vocab:
        raise BundleMismatch(f"the LVM has vocab {clf.lvm.config.vocab_size} but the tokenizer gives {vocab} "
                             "(codes + 4 specials); the LVM was trained with another tokenizer.")
    config = head_config(clf.head)
    if config.get("pixels") and tuple(config["pixels"]) != (clf.channels, clf.image_size):
        raise BundleMismatch(f"the head appends pixels of {config['pixels'][0]} channel(s) at {config['pixels'][1]} px "
                             f"but the tokenizer reads {clf.channels} at {clf.image_size} px.")
    n = clf.lvm.config.n_layer
    if list(clf.readout) != sorted(set(clf.readout)) or clf.readout[0] < 1 or clf.readout[-1] != n:
        raise BundleMismatch(f"read-out layers {list(clf.readout)} must be distinct, increasing, >= 1 and end at the "
                             f"LVM's last layer ({n}: it is cut at the highest one read).")
    width = clf.lvm.config.d_model * len(clf.readout)
    if config["dim"] != width or config["classes"] != len(clf.classes):
        raise BundleMismatch(f"the head reads width {config['dim']} into {config['classes']} classes but the LVM's "
                             f"read-out layers {list(clf.readout)} give width {width} and the bundle names "
                             f"{len(clf.classes)} classes.")


# ---------------------------------------------------------------------------------------------
# Preprocessing: what users have -> uint8 [N, S, S, C], as load_images prepares training images
# ---------------------------------------------------------------------------------------------

def to_uint8_images(images, size: int, channels: int) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` / ``[N, H, W]``, PIL images or paths -> uint8 ``[N, size, size, channels]``."""
    if isinstance(images, torch.Tensor):
        raise ImageSourceError("pass images as a uint8 numpy array [N, H, W, C], PIL images or paths; for float "
                               "tensors [N, C, H, W] in [0, 1] call the classifier module itself.")
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ImageSourceError(f"images must be uint8 [N, H, W, C] with C in (1, 3, 4); got {images.dtype} "
                                   f"with shape {images.shape}.")
        if images.shape[1:] == (size, size, channels):
            return np.ascontiguousarray(images)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[images.shape[-1]]
        images = [Image.fromarray(im[..., 0] if mode == "L" else im, mode) for im in images]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = [read_image(im, size, channels) if not isinstance(im, Image.Image) else prepare_image(im, size, channels)
           for im in images]
    if not out:
        return np.empty((0, size, size, channels), np.uint8)
    return np.stack(out)


def read_image(path: str | os.PathLike, size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """One image file -> uint8 ``[size, size, channels]``; an unreadable file raises ``ImageSourceError`` naming it."""
    try:
        with Image.open(path) as img:
            return prepare_image(img, size, channels, max_pixels)
    except UnsupportedImage as err:
        raise UnsupportedImage(f"{path}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageSourceError(f"{path}: unreadable image ({type(err).__name__}: {err}).") from None


def prepare_image(img: Image.Image, size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """``tokenizer.images.prepare_image`` (the steps ``load_images`` applies to a folder of training images, so
    a served image is seen as the training images were), behind a server's checks: modes that would lose
    meaning in 8 bits are refused, and ``max_pixels`` refuses huge images before they are decoded."""
    if img.mode not in ACCEPTED_MODES:
        raise UnsupportedImage(f"image mode {img.mode!r} is not supported; send an 8-bit grey or colour image "
                               f"(PIL modes {', '.join(ACCEPTED_MODES)}).")
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"image of {w}x{h} pixels is larger than the limit of {max_pixels} pixels; "
                               "downscale it first.")
    return _images.prepare_image(img, size, channels)
