"""``lvm classifier-train``: fit a probe head on every given label and write a classifier bundle.

The protocol is the probes' (``lvm.probe``), so a bundle scores what ``lvm probe`` reported at 100 %
labels: the layer is chosen by ``pick_layer`` on train images, the linear head is ``LinearProbe``
on the same pooled features with L2 chosen on a validation split of the train labels, and the
attentive / fine-tuned heads are ``lvm.attentive``'s, which keep the weights of their best validation
pass. No test image is read. The bundle format itself lives in ``lvm.classifier``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from lvm.augment import mirror_images
from lvm.checkpoint import load_model_and_tokenizer
from lvm.classifier import Classifier, LinearHead, head_config, truncate_lvm
from lvm.data import SpecialTokens
from lvm.probe import (LINEAR_VAL_FRACTION, METHODS, POOLS, LinearProbe, ProbeConfig, ProbeError, pick_layer,
                       pixel_features, readout_features, readout_name, refits_head, refuse_mirror_without_flip)
from lvm.runtime import check_precision
from tokenizer.images import ImageSet, load_images

_PROBE = ProbeConfig()  # the probes' defaults: a bundle is fitted as `lvm probe` fits at 100 % labels


@dataclass
class ClassifierTrainConfig:
    """``lvm classifier-train``: fit a head on all given labels and write a self-contained classifier bundle."""

    checkpoint: str = "runs/lvm"  # LVM training output folder or checkpoint folder
    tokenizer: str = ""  # empty -> the tokenizer recorded with the checkpoint
    source: str = "fashion-mnist"  # labelled images: folder with one sub-folder per class, IDX, .npz, fashion-mnist
    split: str = "train"  # only the train side of the source is read
    test_fraction: float = 0.2  # share of a source without named splits held out as its test side (never read here)
    test_source: str = ""  # a separate test source: then all of --source is train
    method: str = "linear"  # linear, attentive, finetune
    layer: int = 0  # LVM layer the head reads; 0 -> chosen on train images like lvm probe
    layers: list[int] = field(default_factory=list)  # linear/attentive: these layers side by side instead (--concat's)
    pool: str = _PROBE.pool  # linear head: mean, grid or tokens pooling of the layer's token states
    grid: int = _PROBE.grid  # pool=grid: token states average-pooled to grid x grid
    pixels: bool = False  # linear head: the raw pixels appended to the LVM's features (lvm probe --pixels on)
    mirror: bool = False  # linear head: fitted on every image and its mirror, predicts from both (lvm probe --mirror)
    sweep_images: int = _PROBE.sweep_images  # train images used to choose the layer
    limit_train: int = 0  # use at most this many labelled images (0 = all)
    on_error: str = "fail"  # an unreadable image in --source: fail, or skip it with a warning
    head_epochs: int = _PROBE.head_epochs  # attentive head: epochs, capped at head_max_steps
    head_max_steps: int = _PROBE.head_max_steps
    head_batch_size: int = _PROBE.head_batch_size
    head_lr: float = _PROBE.head_lr
    finetune_epochs: int = _PROBE.finetune_epochs  # fine-tuning: epochs, capped at finetune_max_steps
    finetune_max_steps: int = _PROBE.finetune_max_steps
    finetune_lr: float = _PROBE.finetune_lr  # the head's; the LVM's is 10x lower
    flip: bool = _PROBE.flip  # fine-tuning: horizontally flipped images as augmentation
    finetune_views: int = _PROBE.finetune_views  # fine-tuning: augmented views per image (flips + translations)
    finetune_init: str = _PROBE.finetune_init  # fine-tuning head: "probe" (LP-FT: a fitted linear probe) or "attentive"
    finetune_refit: bool = _PROBE.finetune_refit  # LP-FT: once the weights are chosen on validation, refit the head on every label
    batch_size: int = _PROBE.batch_size  # feature extraction
    precision: str = _PROBE.precision  # fitting: auto (bf16 on CUDA and AMX CPUs), bf16, fp32; the bundle runs fp32
    seed: int = _PROBE.seed
    out: str = "runs/classifier"  # the bundle folder to write (replaced as a whole)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ProbeError(f"--method {self.method!r} is not one of {', '.join(METHODS)}.")
        if self.pool not in POOLS:
            raise ProbeError(f"--pool {self.pool!r} is not one of {', '.join(POOLS)}.")
        if self.pixels and self.method != "linear":
            raise ProbeError(f"--pixels is a linear head's read-out; --method {self.method} reads token states only.")
        if self.mirror and self.method != "linear":
            raise ProbeError(f"--mirror is a linear head's option; --method {self.method} learns from flips through "
                             "--flip instead.")
        refuse_mirror_without_flip(self.mirror, self.flip)
        if self.layer < 0:
            raise ProbeError(f"--layer {self.layer} must be >= 1, or 0 to choose it on train images.")
        if self.layers and (self.layer or min(self.layers) < 1 or len(set(self.layers)) != len(self.layers)):
            raise ProbeError(f"--layers {self.layers}: distinct layers >= 1, and not together with --layer.")
        if len(self.layers) > 1 and self.method == "finetune":
            raise ProbeError("--layers reads several frozen layers (linear, attentive); fine-tuning trains up to one "
                             "--layer.")
        if not 0 < self.test_fraction < 1:
            raise ProbeError(f"--test-fraction {self.test_fraction} must lie in (0, 1).")
        if self.finetune_init not in ("attentive", "probe"):
            raise ProbeError(f"--finetune-init {self.finetune_init!r} must be attentive or probe.")
        if self.on_error not in ("fail", "skip"):
            raise ProbeError(f"--on-error {self.on_error!r} must be fail or skip.")
        check_precision(self.precision)


def classifier_train(cfg: ClassifierTrainConfig) -> dict:
    """The ``lvm classifier-train`` entry point; returns a summary (bundle path, layer, validation accuracy)."""
    t0 = time.time()
    model, tok, ckpt = load_model_and_tokenizer(cfg.checkpoint, cfg.tokenizer)
    train_set = _labelled_train_set(cfg, tok.config.image_size, tok.config.channels)
    special = SpecialTokens(tok.vocab_size)
    print(f"classifier-train: encoding {len(train_set)} labelled images", flush=True)
    ids = tok.encode(train_set.images)  # [N, h, w]
    labels = train_set.labels
    probe_cfg = _probe_config(cfg)
    sweep = None
    readout = sorted(cfg.layers) or [cfg.layer]
    if not readout[0]:
        print(f"classifier-train: choosing the layer on {min(cfg.sweep_images, len(ids))} train images", flush=True)
        readout[0], sweep = pick_layer(model, ids, labels, special, probe_cfg)
    elif readout[-1] > model.config.n_layer:
        raise ProbeError(f"layer {readout[-1]} is out of range; {ckpt} has layers 1..{model.config.n_layer}.")
    layer = readout[0] if len(readout) == 1 else readout
    classes = train_set.class_names or [str(c) for c in range(int(labels.max()) + 1)]

    views = None
    if cfg.method == "finetune":  # as lvm probe: augmented images, encoded
        from lvm.augment import token_views

        views = token_views(tok, train_set.images, cfg.finetune_views, flip=cfg.flip, seed=cfg.seed)
    pixels = pixel_features(train_set) if cfg.pixels else None
    mirrored = None
    if cfg.mirror:  # the linear head also fits on the mirror images: their ids (and pixels), after the originals'
        flipped = replace(train_set, images=mirror_images(train_set.images))
        mirrored = (tok.encode(flipped.images), pixel_features(flipped) if cfg.pixels else None)
    lvm, head, metrics = _fit_head(cfg, model, ids, labels, special, layer, len(classes), views, pixels,
                                   (tok.config.channels, tok.config.image_size), mirrored)
    metrics = {**metrics, "train_images": len(labels), "layer_sweep": sweep}
    info = {
        "method": cfg.method,
        "metrics": metrics,
        "training": {"checkpoint": str(ckpt), "source": train_set.source, "split": cfg.split,
                     "config": asdict(cfg), "seconds": round(time.time() - t0, 1)},
    }
    clf = Classifier(tok, truncate_lvm(lvm, readout[-1]), head, classes[: head_config(head)["classes"]], info,
                     readout=readout, mirror=cfg.mirror)
    clf.save_pretrained(cfg.out)
    return {"out": cfg.out, "method": cfg.method, "layer": layer, "classes": clf.classes,
            "val_accuracy": metrics["val_accuracy"], "train_images": len(labels),
            "seconds": round(time.time() - t0, 1)}


def build_classifier(checkpoint: str, source: str, method: str = "linear", out: str = "runs/classifier",
                     layer: int | None = None, **options) -> dict:
    """Write a bundle from a finished run (e.g. the quickstart's); ``layer=None`` chooses it as the probe did.

    ``options`` are any other ``ClassifierTrainConfig`` fields (``split``, ``test_fraction``, ``precision``...).
    """
    return classifier_train(ClassifierTrainConfig(checkpoint=str(checkpoint), source=str(source), method=method,
                                                  out=str(out), layer=layer or 0, **options))


def bundle_from_probe(checkpoint: str, probe: LinearProbe, layer: int | list[int], out: str,
                      classes: list[str] | None = None,
                      pool: str = _PROBE.pool, grid: int = _PROBE.grid, metrics: dict | None = None,
                      tokenizer: str = "", training: dict | None = None, pixels: bool = False,
                      mirror: bool = False) -> dict:
    """Write a linear bundle around a ``LinearProbe`` already fitted on the ``pool``ed layer-``layer`` features
    of ``checkpoint`` (a list: those layers' side by side, ``lvm probe --concat``; as ``lvm probe`` fits at 100 %
    labels), followed by the raw pixels where ``pixels``
    (``lvm probe --pixels``): nothing is refitted, so it costs seconds. ``mirror``: the probe was fitted on images
    and their mirrors (``lvm probe --mirror``), so the bundle averages both. ``metrics`` and ``training`` (what it
    was fitted on) are recorded in bundle.json as given."""
    model, tok, ckpt = load_model_and_tokenizer(checkpoint, tokenizer)
    readout = [layer] if isinstance(layer, int) else sorted(layer)
    head = LinearHead.from_probe(probe, pool, grid, tok.grid, model.config.d_model * len(readout),
                                 (tok.config.channels, tok.config.image_size) if pixels else None)
    classes = classes or [str(c) for c in range(probe.weight.shape[0])]
    info = {"method": "linear", "metrics": metrics or {},
            "training": {"checkpoint": str(ckpt), "l2": probe.l2, **(training or {})}}
    clf = Classifier(tok, truncate_lvm(model, readout[-1]), head, classes, info, readout=readout, mirror=mirror)
    clf.save_pretrained(out)
    return {"out": str(out), "method": "linear", "layer": layer, "classes": clf.classes}


def fit_linear(features: torch.Tensor, labels: torch.Tensor, classes: int | None = None,
               seed: int = 0, copies: int = 1) -> tuple[LinearProbe, dict]:
    """``LinearProbe.fit`` (L2 chosen on a random validation split, then a refit on all rows) and the
    validation accuracy of each L2 it tried, which a bundle records; ``copies``: see ``LinearProbe.fit``."""
    y = torch.as_tensor(labels).long()
    n_val = max(int(len(y) // copies * LINEAR_VAL_FRACTION), 1)
    if len(y) - n_val < 2 or len(set(y.tolist())) < 2:
        raise ProbeError(f"{len(y)} labelled images in {len(set(y.tolist()))} classes are too few to fit and "
                         "validate a classifier; give at least a few images of two or more classes.")
    probe = LinearProbe.fit(features, y, seed=seed, classes=classes, copies=copies)
    return probe, {"val_accuracy": probe.l2_scores[str(probe.l2)], "val_images": probe.val_images, "l2": probe.l2,
                   "l2_scores": probe.l2_scores}


def _fit_head(cfg: ClassifierTrainConfig, model, ids: torch.Tensor, labels: np.ndarray, special: SpecialTokens,
              layer: int | list[int], classes: int, views: torch.Tensor | None = None,
              pixels: torch.Tensor | None = None,
              image: tuple[int, int] = (1, 28), mirrored: tuple[torch.Tensor, torch.Tensor | None] | None = None):
    """``(LVM the head reads, head, validation metrics)`` for the configured method; ``views``: ids ``[V, N, T]``
    of augmented images, fine-tuning's augmentation; ``pixels``: ``pixel_features`` the linear head appends,
    of images of ``image`` = (channels, side); ``layer`` a list: those layers' states side by side; ``mirrored``:
    the mirror images' ids and pixel features, which the linear head fits on too."""
    from lvm.attentive import HeadTrainConfig, fine_tune, fit_attentive

    y = torch.from_numpy(labels)
    hw = tuple(ids.shape[1:])
    width = model.config.d_model * (1 if isinstance(layer, int) else len(layer))
    print(f"classifier-train: fitting the {cfg.method} head on {readout_name(layer)}", flush=True)
    if cfg.method == "linear":
        feats = readout_features(model, ids, special, layer, cfg.pool, cfg.grid, cfg.batch_size, cfg.precision)
        if pixels is not None:
            feats = torch.cat([feats, pixels], dim=1)
        if mirrored is not None:  # [2N, F]: the images, then their mirrors (LinearProbe.fit's copies)
            m_ids, m_pixels = mirrored
            m_feats = readout_features(model, m_ids, special, layer, cfg.pool, cfg.grid, cfg.batch_size, cfg.precision)
            feats = torch.cat([feats, m_feats if m_pixels is None else torch.cat([m_feats, m_pixels], dim=1)])
            y = y.repeat(2)
        probe, metrics = fit_linear(feats, y, classes, cfg.seed, copies=1 if mirrored is None else 2)
        head = LinearHead.from_probe(probe, cfg.pool, cfg.grid, hw, width, image if pixels is not None else None)
        return model, head, metrics
    attentive = cfg.method == "attentive"
    train_cfg = HeadTrainConfig(epochs=cfg.head_epochs if attentive else cfg.finetune_epochs,
                                max_steps=cfg.head_max_steps if attentive else cfg.finetune_max_steps,
                                batch_size=cfg.head_batch_size, lr=cfg.head_lr if attentive else cfg.finetune_lr,
                                precision=cfg.precision, seed=cfg.seed)
    n_val = max(1, int(round(len(y) * train_cfg.val_fraction))) if len(y) >= 10 else 0
    refit = not attentive and refits_head(cfg)
    if attentive:
        tokens = readout_features(model, ids, special, layer, "tokens", batch_size=cfg.batch_size,
                                  precision=cfg.precision)  # [N, T, D x layers]
        head, val = fit_attentive(tokens, y, train_cfg)
        lvm = model
    else:
        flat = ids.reshape(len(ids), -1).long()  # [N, T]
        tuned, val = fine_tune(model, flat, y, layer, special, train_cfg, views=views, init=cfg.finetune_init, hw=hw,
                               grid=cfg.grid, refit=refit)
        lvm, head = tuned.backbone, tuned.classifier
    metrics = {"val_accuracy": val, "val_images": n_val}
    if refit:  # the validation images chose the LVM's weights, then the head learnt from them too
        metrics["head_refit_on_all_images"] = True
    return lvm, head, metrics


def _probe_config(cfg: ClassifierTrainConfig) -> ProbeConfig:
    return ProbeConfig(checkpoint=cfg.checkpoint, source=cfg.source, pool=cfg.pool, grid=cfg.grid,
                       sweep_images=cfg.sweep_images, batch_size=cfg.batch_size, precision=cfg.precision,
                       seed=cfg.seed)


def _labelled_train_set(cfg: ClassifierTrainConfig, size: int, channels: int) -> ImageSet:
    """The train side of ``--source`` at the tokenizer's size; it must carry labels."""
    train_set = load_images(cfg.source, cfg.split, size=size, channels=channels, on_error=cfg.on_error,
                            limit=cfg.limit_train or None, test_fraction=cfg.test_fraction,
                            test_source=cfg.test_source or None)
    if train_set.labels is None:
        raise ProbeError(
            f"{train_set.source} has no labels; a classifier needs labelled images (a folder with one sub-folder "
            "per class or a labels.csv of path,label rows, IDX with a labels file, or .npz with 'labels'); pass a "
            "labelled --source."
        )
    return train_set
