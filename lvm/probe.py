"""Probes: how good are the LVM's hidden states for a labelled task, at 1/10/30/100 % of labels?

Features come from any layer of the LVM run on ``[BOS] image`` (``lvm.data.image_rows``); an
image's token states are pooled by ``mean`` (one vector), ``grid`` (average-pooled to a ``g x g``
grid, keeping the layout) or ``tokens`` (all of them). Three probes (``methods``):

- ``linear``: multinomial logistic regression on standardised pooled features, L2 strength
  picked on a validation split (with ``mirror``, fitted on every image and its mirror, and a test
  image's class read from the mean of both versions' probabilities);
- ``attentive``: an attention-pooling head trained on the frozen per-token states;
- ``finetune``: the LVM up to the chosen layer trained together with that head.

(the last two live in ``lvm.attentive``). Baselines at every fraction: raw pixels (linear), the
same architecture at random init (every method; for ``finetune`` that is training from scratch),
and with ``supervised`` a small CNN trained from scratch on the pixels (``lvm.supervised``).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from lvm.augment import mirror_images, token_views
from lvm.checkpoint import load_model_and_tokenizer, require_same_tokenizer
from lvm.data import SpecialTokens, image_rows
from lvm.model import LVM
from lvm.runtime import PRECISIONS, device_name_ok, mixed_precision, pick_device
from tokenizer.images import ImageSet, image_set_source, load_images
from tokenizer.splits import DEFAULT_TEST_FRACTION, align_labels, find_overlap

if TYPE_CHECKING:
    from tokenizer.model import Tokenizer

POOLS = ("mean", "grid", "tokens")
METHODS = ("linear", "attentive", "finetune")


class ProbeError(ValueError):
    """A probe that cannot run as asked (e.g. unlabeled data); the message says what to pass instead."""


def refuse_mirror_without_flip(mirror: bool, flip: bool) -> None:
    """``--mirror`` with ``--no-flip`` contradict each other; probe and classifier-train refuse them alike."""
    if mirror and not flip:
        raise ProbeError("--mirror fits and predicts on mirrored images, and --no-flip says this domain's mirrored "
                         "images may change class: drop one of them.")


@dataclass
class ProbeConfig:
    """``lvm probe``: label-efficiency curves of the LVM's features against baselines."""

    checkpoint: str = "runs/lvm"  # training output folder or checkpoint folder
    compare: list[str] = field(default_factory=list)  # more checkpoints to probe on the same task
    tokenizer: str = ""  # empty -> the tokenizer recorded with the checkpoint
    source: str = "fashion-mnist"  # labelled images for probe training
    split: str = "train"
    test_source: str = ""  # an explicit labelled test set; empty -> the source's test side
    test_split: str = "test"
    test_fraction: float = DEFAULT_TEST_FRACTION  # sources without a named split: share held out as test (by path hash)
    on_error: str = "fail"  # unreadable image files: 'fail' or 'skip'
    layers: list[int] = field(default_factory=list)  # empty -> sweep every layer on a subset, keep the best
    concat: bool = False  # linear/attentive probes: the --layers side by side as one feature, one row (layers 4+5+6)
    methods: list[str] = field(default_factory=lambda: ["linear"])  # linear, attentive, finetune
    pool: str = "grid"  # the linear probe's pooling: mean, grid, tokens (all token states concatenated)
    grid: int = 3  # g for pool=grid: token states average-pooled to g x g
    # auto: kept where they score better on a held-out part of the training images, at the checkpoint's first probed
    # layer; both: rows with and without them from one feature extraction (the bundle's probe is the one with them)
    pixels: str = "off"  # linear probe: raw pixels appended to the LVM's features (the detail tokens lose): off, on, auto, both
    mirror: bool = False  # linear probe: fit on each image and its left-right mirror, predict from both (2x extraction; where a mirror keeps the class)
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.3, 1.0])
    seeds: int = 3  # repeats (different label subsets) at fractions < 1
    baselines: bool = True  # raw pixels and random-init model
    random_init: bool = True  # with baselines: also the random-init model (as costly as probing the LVM again)
    supervised: bool = False  # with baselines: a small CNN trained from scratch (~1 fine-tune fit per fraction x seed)
    sweep_images: int = 5000  # train images used to pick the layer
    limit_train: int = 0  # use at most this many labelled train images (0 = all)
    limit_test: int = 0
    head_epochs: int = 30  # attentive probe: epochs, capped at head_max_steps steps of head_batch_size
    head_max_steps: int = 2000
    head_batch_size: int = 128
    head_lr: float = 1e-3
    finetune_epochs: int = 30  # fine-tuning: epochs over the labelled subset, capped at finetune_max_steps
    finetune_max_steps: int = 300  # ~170 images/s for `small` on 2 cores: 300 x 128 images ~ 4 minutes per fit
    finetune_lr: float = 1e-3  # the head's; the LVM's is 10x lower
    flip: bool = True  # fine-tuning: horizontally flipped images as augmentation
    finetune_views: int = 0  # fine-tuning: augmented views per image (random flips + translations); 0: the mirror only
    finetune_init: str = "probe"  # fine-tuning head: a fitted linear probe ("probe": LP-FT) or a fresh "attentive" head
    finetune_refit: bool = True  # LP-FT: once the weights are chosen on validation, refit the linear head on every label
    finetune_layer_decay: float = 1.0  # fine-tuning: block i of L at lr x decay ** (L - i)
    finetune_train_blocks: int = 0  # fine-tuning: train only the top k blocks (0: all)
    finetune_mixup: float = 0.0  # fine-tuning: Beta(a, a) mixup of the head's input features (0: off)
    finetune_ema: float = 0.0  # fine-tuning: EMA decay of the weights that are validated and kept (0: off)
    batch_size: int = 256
    precision: str = "auto"  # features, heads, fine-tuning: auto (bf16 on CUDA and AMX CPUs), bf16, fp32
    device: str = "auto"  # where the LVM extracts features: auto (a CUDA GPU when there is one and every method is linear), cpu, cuda
    seed: int = 0
    out: str = "runs/probe"


def probe_device(cfg: "ProbeConfig") -> torch.device:
    """Where the LVM's forward runs: ``auto`` takes a CUDA GPU only when every method is the linear probe (the
    attentive and fine-tuning probes train on the CPU, beside their data), so a default run never splits."""
    if cfg.device == "auto":
        return pick_device("auto") if set(cfg.methods) <= {"linear"} else torch.device("cpu")
    return pick_device(cfg.device)


def refits_head(cfg: "ProbeConfig") -> bool:
    """Whether fine-tuning ends by refitting the linear head on every label: LP-FT's last step only (a fresh
    attentive head has no linear probe to refit). ``cfg``: a ProbeConfig or anything with its finetune_* fields."""
    return cfg.finetune_refit and cfg.finetune_init == "probe"


def run_probe(cfg: ProbeConfig) -> dict:
    """The ``lvm probe`` entry point: writes probe.json, probe.md and label_efficiency.png.

    Besides the paths and rows it returns (not in probe.json) ``linear_probe``: the ``LinearProbe`` fitted at
    100 % labels on the first probed layer of the checkpoint, with that ``layer``, its ``features`` row name,
    the ``classes`` and ``pixels`` ((channels, side) where it reads the pixels too, else None), so that a caller
    can ship it as a classifier (``lvm.classifier_train.bundle_from_probe``) without fitting it again (``None``
    where no linear probe ran at 100 %); with ``concat`` ``layer`` is the list of layers it reads; ``mirror``: the
    probe was fitted on images and their mirrors and predicts from both (a bundle must average them too)."""
    _check_config(cfg)
    model, tok, ckpt = load_model_and_tokenizer(cfg.checkpoint, cfg.tokenizer)
    device = probe_device(cfg)
    train_set, test_set = _labelled_sets(cfg, tok)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    task = _encode_task(cfg, tok, train_set, test_set)
    results: dict = {"config": asdict(cfg), "checkpoint": str(ckpt), "rows": [], "layer_sweep": {},
                     "seconds_by_stage": {}}
    kept: dict = {}  # the checkpoint's 100 %-labels linear probe on its first layer, for a classifier bundle
    first = None
    for name, m in _models_to_probe(cfg, model, tok, ckpt).items():
        m = m.to(device)  # features come back to the CPU, where the heads are fitted
        sweep: dict[int, torch.Tensor] = {}  # the chosen layer's features on the sweep's images
        layers = cfg.layers or [_choose_layer(name, m, task, cfg, results, sweep)]
        # concat: in increasing order, as a bundle reads them (lvm.classifier: the LVM's states side by side)
        readouts: list[int | list[int]] = [sorted(set(layers))] if cfg.concat else list(layers)
        if first is None and cfg.pixels == "auto":  # decided once, on the checkpoint; every model is read alike
            _decide_pixels(m, readouts[0], task, cfg, results, sweep.get(readouts[0]) if not cfg.concat else None)
        for readout in readouts:
            label = f"{name} ({readout_name(readout)})"
            first = first or (label, readout)
            results["rows"] += _probe_layer(label, m, readout, task, cfg, results["seconds_by_stage"],
                                            keep=kept if (label, readout) == first else None)
    if cfg.baselines:  # raw pixels, linear probe
        results["rows"] += label_efficiency("raw pixels", pixel_features(train_set), train_set.labels,
                                            pixel_features(test_set), test_set.labels, cfg.fractions, cfg.seeds,
                                            cfg.seed)
    if cfg.baselines and cfg.supervised:  # what a user would do without the LVM, on the same label subsets
        from lvm.supervised import NAME, supervised_efficiency, to_nchw

        with _timed(results["seconds_by_stage"], NAME):
            results["rows"] += supervised_efficiency(to_nchw(train_set.images), train_set.labels,
                                                     to_nchw(test_set.images), test_set.labels, cfg)
    results["seconds"] = round(time.time() - t0, 1)
    summary = _write_outputs(results, cfg.fractions, out)
    pixels = task.train_pixels is not None
    features = first[0] + (PIXELS_SUFFIX if pixels else "") + (MIRROR_SUFFIX if cfg.mirror else "")
    return {**summary, "linear_probe": kept.get("model"), "layer": first[1], "features": features, "mirror": cfg.mirror,
            "pixels": (tok.config.channels, tok.config.image_size) if pixels else None,
            "classes": train_set.class_names or [str(c) for c in range(int(train_set.labels.max()) + 1)]}


@dataclass
class ProbeTask:
    """The labelled train/test sets encoded once, shared by every model, layer and method."""

    special: SpecialTokens
    train_ids: torch.Tensor  # [N, h, w]
    train_labels: np.ndarray  # [N]
    test_ids: torch.Tensor  # [M, h, w]
    test_labels: np.ndarray  # [M]
    views: Callable[[np.ndarray, int], torch.Tensor] | None = None  # (train indices, seed) -> augmented ids [V, n, h*w]
    train_pixels: torch.Tensor | None = None  # pixel_features [N, P] where the linear probe appends them
    test_pixels: torch.Tensor | None = None
    mirror_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # (train, test) ids of the mirrored images (--mirror)
    mirror_pixels: tuple[torch.Tensor, torch.Tensor] | None = None  # their pixel_features, where the pixels are read


def _check_config(cfg: ProbeConfig) -> None:
    if cfg.pool not in POOLS:
        raise ProbeError(f"pool={cfg.pool!r} is not one of {POOLS}.")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise ProbeError(f"methods {cfg.methods} must be a non-empty list drawn from {METHODS}.")
    if cfg.precision not in PRECISIONS:
        raise ProbeError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}.")
    if not device_name_ok(cfg.device):
        raise ProbeError(f"device={cfg.device!r} is not one of auto, cpu, cuda.")
    if cfg.device.startswith("cuda") and set(cfg.methods) - {"linear"}:
        raise ProbeError(f"--device {cfg.device} runs the linear probe's feature extraction on the GPU; the attentive "
                         f"and fine-tuning probes run on the CPU: pass --methods linear, or --device cpu "
                         f"(got --methods {' '.join(cfg.methods)}).")
    bad = [f for f in cfg.fractions if not 0 < f <= 1]
    if bad:
        raise ProbeError(f"fractions {bad} must lie in (0, 1].")
    if cfg.finetune_init not in ("attentive", "probe"):
        raise ProbeError(f"finetune_init={cfg.finetune_init!r} is not one of attentive, probe.")
    if cfg.pixels not in PIXELS_CHOICES:
        raise ProbeError(f"pixels={cfg.pixels!r} is not one of {', '.join(PIXELS_CHOICES)}.")
    if cfg.finetune_views < 0 or cfg.finetune_train_blocks < 0 or cfg.finetune_mixup < 0:
        raise ProbeError("finetune_views, finetune_train_blocks and finetune_mixup must be >= 0.")
    if not 0 <= cfg.finetune_ema < 1 or not 0 < cfg.finetune_layer_decay <= 1:
        raise ProbeError(f"finetune_ema={cfg.finetune_ema} must lie in [0, 1) and finetune_layer_decay="
                         f"{cfg.finetune_layer_decay} in (0, 1].")
    if cfg.concat and len(set(cfg.layers)) < 2:
        raise ProbeError(f"concat reads several layers as one feature; pass two or more --layers (got {cfg.layers}), "
                         "e.g. --layers 4 5 6 --concat.")
    if cfg.mirror and "linear" not in cfg.methods:
        raise ProbeError(f"mirror is a linear-probe option; add linear to --methods (got {cfg.methods}).")
    refuse_mirror_without_flip(cfg.mirror, cfg.flip)
    if cfg.concat and "finetune" in cfg.methods:
        raise ProbeError("concat is a read-out of frozen states (linear, attentive); fine-tuning trains up to one "
                         "layer: drop --concat or run --methods finetune separately.")


def _labelled_sets(cfg: ProbeConfig, tok: Tokenizer) -> tuple[ImageSet, ImageSet]:
    """Train and test images at the tokenizer's size, labelled alike, with no image on both sides."""
    size, channels = tok.config.image_size, tok.config.channels
    sides = {"test_fraction": cfg.test_fraction, "test_source": cfg.test_source or None, "on_error": cfg.on_error}
    train_set = load_images(cfg.source, cfg.split, size=size, channels=channels, limit=cfg.limit_train or None,
                            **sides)
    test_set = load_images(cfg.source, cfg.test_split, size=size, channels=channels, limit=cfg.limit_test or None,
                           **sides)
    for name, s in (("source", train_set), ("test_source", test_set)):
        if s.labels is None:
            raise ProbeError(
                f"{s.source} has no labels; probes need labelled images (a folder with one sub-folder per class, "
                "a labels.csv of path,label rows, IDX with a labels file, or .npz with 'labels'); pass a labelled "
                f"--{name.replace('_', '-')}."
            )
    test_set.labels = align_labels(test_set.labels, test_set.class_names, train_set.class_names, test_set.source)
    present = np.unique(train_set.labels)
    if len(present) < 2:
        raise ProbeError(f"{train_set.source}: the training side holds {len(present)} class; probes need at least 2.")
    missing = sorted(set(np.unique(test_set.labels).tolist()) - set(present.tolist()))
    if missing:
        names = [train_set.class_names[i] if train_set.class_names else str(i) for i in missing]
        raise ProbeError(f"{train_set.source}: class(es) {names} have test images but no training images; "
                         "add training images of them or drop them from the test set.")
    find_overlap(image_set_source(test_set), [image_set_source(train_set)], progress=False)
    return train_set, test_set


def _encode_task(cfg: ProbeConfig, tok: Tokenizer, train_set: ImageSet, test_set: ImageSet) -> ProbeTask:
    def finetune_views(idx: np.ndarray, seed: int) -> torch.Tensor:  # fine-tuning's augmentation, drawn per subset
        return token_views(tok, train_set.images[idx], cfg.finetune_views, flip=cfg.flip, seed=seed)

    views = finetune_views if "finetune" in cfg.methods and (cfg.flip or cfg.finetune_views) else None
    pixels = (pixel_features(train_set), pixel_features(test_set)) if cfg.pixels != "off" else (None, None)
    task = ProbeTask(SpecialTokens(tok.vocab_size), tok.encode(train_set.images), train_set.labels,
                     tok.encode(test_set.images), test_set.labels, views, *pixels)
    if cfg.mirror:
        mirrored = [replace(s, images=mirror_images(s.images)) for s in (train_set, test_set)]
        task.mirror_ids = tuple(tok.encode(s.images) for s in mirrored)
        if cfg.pixels != "off":
            task.mirror_pixels = tuple(pixel_features(s) for s in mirrored)
    return task


def _models_to_probe(cfg: ProbeConfig, model: LVM, tok: Tokenizer, ckpt: Path) -> dict[str, LVM]:
    """The checkpoint, every ``--compare`` checkpoint (same tokenizer only) and the random-init baseline."""
    models = {"lvm": model}
    for path in cfg.compare:
        other, other_tok, _ = load_model_and_tokenizer(path, cfg.tokenizer)
        require_same_tokenizer(tok.fingerprint, other_tok.fingerprint, what=f"--compare {path} against {ckpt}",
                               fix="probes compare checkpoints of one tokenizer; compare runs on the same shards.")
        models[f"lvm:{path}"] = other  # the path as given: basenames like "lvm" repeat
    if cfg.baselines and cfg.random_init:
        torch.manual_seed(cfg.seed)
        models["random-init"] = LVM(model.config).eval()
    return models


def _choose_layer(name: str, model: LVM, task: ProbeTask, cfg: ProbeConfig, results: dict,
                  keep: dict | None = None) -> int:
    """``pick_layer`` on train images only, its scores and time recorded in ``results``; ``keep``: see pick_layer."""
    n = min(cfg.sweep_images, len(task.train_ids))
    print(f"probe: choosing the layer of {name} on {n} train images", flush=True)
    tic = time.time()
    best, scores = pick_layer(model, task.train_ids, task.train_labels, task.special, cfg, keep)
    results["seconds_by_stage"][f"{name}: layer sweep"] = round(time.time() - tic, 1)
    results["layer_sweep"][name] = scores
    return best


def _decide_pixels(model: LVM, layer: int | list[int], task: ProbeTask, cfg: ProbeConfig, results: dict,
                   states: torch.Tensor | None = None) -> None:
    """``--pixels auto``: keep the pixels in ``task`` unless the states alone score clearly better (``pixels_pay``) on
    a held-out part of the layer sweep's training images, split as the sweep splits them; the scores go to ``results``.
    ``states``: the sweep's features of ``layer`` where it ran (else they are extracted here)."""
    idx = sweep_rows(len(task.train_ids), cfg)
    if states is None:
        states = readout_features(model, task.train_ids[idx], task.special, layer, sweep_pool(cfg), cfg.grid,
                                  cfg.batch_size, cfg.precision)
    keep, scores = pixels_pay(states, task.train_pixels[idx], task.train_labels[idx])
    results["pixels_choice"] = {"layer": layer, "images": len(idx), "val_accuracy": scores, "kept": keep}
    print(f"probe: pixels {'kept' if keep else 'left out'} (held-out training images: states "
          f"{100 * scores['states']:.1f} %, states + pixels {100 * scores['states + pixels']:.1f} %)", flush=True)
    if not keep:
        task.train_pixels = task.test_pixels = task.mirror_pixels = None


def pixels_pay(states: torch.Tensor, pixels: torch.Tensor, labels: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Whether to append ``pixels`` to ``states``: fitted on the first 80 % of the rows, scored on the rest (rows
    in random order, as ``pick_layer`` splits them). They are left out only where the states alone score better
    by more than one standard error of the paired difference: on ~1,000 held-out rows two read-outs within a
    few tenths of a point are a coin toss, and the pixels never cost accuracy on the test sets measured
    (session 12, 14x14 grid on AMX: a 0.2-point held-out loss left them out and cost 0.1-0.9 points on test).
    Returns the choice and both accuracies."""
    cut, y = int(len(states) * SWEEP_FIT_SHARE), torch.as_tensor(labels)
    right = {}
    for name, x in (("states", states), ("states + pixels", torch.cat([states, pixels], 1))):
        right[name] = (LinearProbe.fit(x[:cut], y[:cut]).predict(x[cut:]) == y[cut:]).float()
    diff = right["states"] - right["states + pixels"]  # per held-out row: +1 where only the states are right
    stderr = float(diff.std()) / max(len(diff), 1) ** 0.5 if len(diff) > 1 else 0.0
    scores = {name: float(r.mean()) for name, r in right.items()}
    return float(diff.mean()) <= stderr, scores


def _probe_layer(label: str, model: LVM, layer: int | list[int], task: ProbeTask, cfg: ProbeConfig, clock: dict,
                 keep: dict | None = None) -> list[dict]:
    """Every requested method on one layer of one model (a list: those layers side by side, frozen read-outs
    only); each stage's seconds go to ``clock``; ``keep`` receives the linear probe fitted at 100 % labels (see
    ``label_efficiency``)."""
    rows: list[dict] = []
    if "linear" in cfg.methods or "attentive" in cfg.methods:  # both read the cached token states
        print(f"probe: features of {label}", flush=True)
        # the linear probe alone needs only the pooled states: [N, F], not [N, h*w, D] (7 GB for Fashion-MNIST at 14x14)
        pool = "tokens" if "attentive" in cfg.methods else cfg.pool
        with _timed(clock, f"{label}: features"):
            t_train, t_test = (readout_features(model, ids, task.special, layer, pool, cfg.grid, cfg.batch_size,
                                                cfg.precision) for ids in (task.train_ids, task.test_ids))
        if "linear" in cfg.methods:
            mirrors = None
            if task.mirror_ids is not None:  # the mirrored images' pooled features, for the linear probe only
                with _timed(clock, f"{label}: mirrored features"):
                    mirrors = tuple(readout_features(model, ids, task.special, layer, cfg.pool, cfg.grid,
                                                     cfg.batch_size, cfg.precision) for ids in task.mirror_ids)
            with _timed(clock, f"{label}: linear"):
                rows += _linear_rows(label, t_train, t_test, task, cfg, keep, pooled=pool != "tokens", mirrors=mirrors)
        if "attentive" in cfg.methods:
            with _timed(clock, f"{label}: attentive"):
                rows += head_efficiency(label, "attentive", t_train, task.train_labels, t_test, task.test_labels, cfg)
        del t_train, t_test  # [N, h*w, D] each: free before fine-tuning
    if "finetune" in cfg.methods:
        ft_train, ft_test = (ids.reshape(len(ids), -1).long() for ids in (task.train_ids, task.test_ids))  # [N, h*w]
        with _timed(clock, f"{label}: finetune"):
            rows += head_efficiency(label, "finetune", ft_train, task.train_labels, ft_test, task.test_labels, cfg,
                                    lvm=model, layer=layer, special=task.special, views=task.views,
                                    hw=tuple(task.train_ids.shape[1:]))
    return rows


def _linear_rows(label: str, t_train: torch.Tensor, t_test: torch.Tensor, task: ProbeTask,
                 cfg: ProbeConfig, keep: dict | None = None, pooled: bool = False,
                 mirrors: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """The linear probe's rows from token states ``[N, h*w, D]`` (or, ``pooled``, from features already ``[N, F]``);
    ``mirrors``: the mirrored images' pooled features (train, test), for ``--mirror``."""
    hw = tuple(task.train_ids.shape[1:])
    f_train, f_test = (t if pooled else pool_tokens(t, cfg.pool, hw, cfg.grid) for t in (t_train, t_test))  # [N, F]
    suffix = MIRROR_SUFFIX if mirrors is not None else ""
    rows = []
    if task.train_pixels is not None and cfg.pixels == "both":  # the states alone too, from the same extraction
        rows += label_efficiency(label + suffix, f_train, task.train_labels, f_test, task.test_labels, cfg.fractions,
                                 cfg.seeds, cfg.seed, mirrors=mirrors)
    if task.train_pixels is not None:  # [N, F + P]: what a linear head with pixels computes (lvm.classifier)
        f_train, f_test = torch.cat([f_train, task.train_pixels], 1), torch.cat([f_test, task.test_pixels], 1)
        if mirrors is not None:
            mirrors = tuple(torch.cat([m, p], 1) for m, p in zip(mirrors, task.mirror_pixels))
        label += PIXELS_SUFFIX
    return rows + label_efficiency(label + suffix, f_train, task.train_labels, f_test, task.test_labels, cfg.fractions,
                                   cfg.seeds, cfg.seed, keep=keep, mirrors=mirrors)


@contextmanager
def _timed(clock: dict, key: str):
    tic = time.time()
    yield
    clock[key] = round(time.time() - tic, 1)


def _write_outputs(results: dict, fractions: list[float], out: Path) -> dict:
    (out / "probe.json").write_text(json.dumps(results, indent=2))
    (out / "probe.md").write_text(markdown_table(results["rows"], fractions))
    plot_label_efficiency(results["rows"], out / "label_efficiency.png")
    return {"out": str(out), "table": str(out / "probe.md"), "rows": results["rows"]}


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(
    model: LVM, ids: torch.Tensor, special: SpecialTokens, layers: int | list[int], pool: str = "grid",
    grid: int = 3, batch_size: int = 256, precision: str = "auto",
) -> torch.Tensor | dict[int, torch.Tensor]:
    """Hidden states of each layer over each image's tokens, pooled to [N, F] (``tokens``: [N, h*w, D]).

    One forward pass serves every requested layer; an int ``layers`` returns one tensor, a list a
    dict layer -> features. ``precision`` is the forward's autocast (see ``lvm.runtime.mixed_precision``);
    where bf16 is fast a long extraction runs a compiled forward (see COMPILE_MIN_TOKENS).
    """
    model.eval()
    device = next(model.parameters()).device
    wanted = [layers] if isinstance(layers, int) else list(layers)
    n, h, w = ids.shape
    seq = image_rows(ids, special)  # [N, 1 + h*w]
    compiled = _compiled_forward(model, precision) if n * seq.shape[1] >= COMPILE_MIN_TOKENS else None
    outs: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    for start in tqdm(range(0, n, batch_size), desc="features", unit="batch", leave=False):
        batch = seq[start : start + batch_size]
        if compiled is not None and len(batch) < batch_size:  # one shape, one compilation
            batch = torch.cat([batch, batch[:1].expand(batch_size - len(batch), -1)])
        with mixed_precision(device, precision):
            states = (compiled or model.hidden_states)(batch.to(device), layers=wanted)
        states = [state[: min(batch_size, n - start)] for state in states]
        for layer, state in zip(wanted, states):
            # Image token i sits at position i + 1; the state there has read tokens 0..i + 1.
            tokens = state[:, 1:].cpu()  # [b, h*w, D]; pool_tokens works in fp32, "tokens" are kept in fp16
            outs[layer].append(tokens.half() if pool == "tokens" else pool_tokens(tokens, pool, (h, w), grid))
    feats = {layer: torch.cat(chunks) for layer, chunks in outs.items()}
    return feats[layers] if isinstance(layers, int) else feats


# Extraction compiles the forward (torch.compile) where bf16 is fast (AMX CPUs, CUDA): there the eager forward is bound
# by elementwise ops, not matmuls, and compiling made it 2.7x faster (small preset, 197 tokens, bf16, Xeon with AMX:
# 24,400 vs 9,000 tokens/s on one thread) for ~20-30 s of compilation per layer list and batch shape, which pays from
# ~250k tokens (5,000 images of 7x7 tokens; ~17 s eager there); smaller jobs (and every fp32 CPU, where the matmuls
# dominate) stay eager.
COMPILE_MIN_TOKENS = 250_000


def _compiled_forward(model: LVM, precision: str) -> Callable | None:
    """``model.hidden_states`` compiled, where bf16 is fast (see COMPILE_MIN_TOKENS); else None (eager)."""
    from lvm.runtime import bf16_is_fast

    global _COMPILED_HIDDEN_STATES
    if precision == "fp32" or not bf16_is_fast(next(model.parameters()).device):
        return None
    if _COMPILED_HIDDEN_STATES is None:  # one compiled function; a model or layer list it has not seen recompiles it
        _COMPILED_HIDDEN_STATES = torch.compile(LVM.hidden_states, dynamic=False)
    return partial(_COMPILED_HIDDEN_STATES, model)


_COMPILED_HIDDEN_STATES: Callable | None = None


def readout_features(
    model: LVM, ids: torch.Tensor, special: SpecialTokens, layers: int | list[int], pool: str = "grid",
    grid: int = 3, batch_size: int = 256, precision: str = "auto",
) -> torch.Tensor:
    """``extract_features`` of one layer, or of a list of layers concatenated along the feature axis (one forward
    pass; ``[N, sum F]``, ``tokens``: ``[N, h*w, sum D]``): the probes' multi-layer read-out (``concat``)."""
    if isinstance(layers, int):
        return extract_features(model, ids, special, layers, pool, grid, batch_size, precision)
    feats = extract_features(model, ids, special, list(layers), pool, grid, batch_size, precision)
    return torch.cat([feats[layer] for layer in layers], -1)


def readout_name(layers: int | list[int]) -> str:
    """``layer 5`` or ``layers 4+5+6``: how a probe row names its read-out."""
    return f"layer {layers}" if isinstance(layers, int) else "layers " + "+".join(map(str, layers))


def pool_tokens(tokens: torch.Tensor, pool: str, hw: tuple[int, int], grid: int = 3, batch_size: int = 4096) -> torch.Tensor:
    """Per-token states ``[N, h*w, D]`` -> features ``[N, F]`` (``tokens``: all of them, flattened), in float32."""
    h, w = hw
    chunks = []
    for start in range(0, len(tokens), batch_size):
        t = tokens[start : start + batch_size].float()
        if pool == "mean":
            chunks.append(t.mean(dim=1))
        elif pool == "grid":
            spatial = rearrange(t, "b (h w) d -> b d h w", h=h, w=w)
            chunks.append(F.adaptive_avg_pool2d(spatial, grid).flatten(1))  # [b, D * g * g]
        else:
            chunks.append(t.flatten(1))
    return torch.cat(chunks)


SWEEP_FIT_SHARE = 0.8  # choices on training images (layer, pixels) fit on this share of the rows, score on the rest
PIXELS_CHOICES = ("off", "on", "auto", "both")
PIXELS_SUFFIX = " + pixels"  # the row name of LVM features with the raw pixels appended (--pixels)
MIRROR_SUFFIX = ", mirrored"  # the row name of a linear probe fitted and read on images and their mirrors (--mirror)
PIXEL_FEATURES_MAX = 28 * 28 * 3  # larger images are area-downsampled to this many values


def pixel_features(images: ImageSet) -> torch.Tensor:
    """The raw-pixel baseline: pixels in [0, 1], area-downsampled to at most PIXEL_FEATURES_MAX values
    (28x28 RGB) so that a 64 px RGB baseline costs what the LVM's probe costs, not 5x more."""
    x = torch.from_numpy(np.ascontiguousarray(images.images)).permute(0, 3, 1, 2).float() / 255.0  # [N, C, H, W]
    n, c, h, w = x.shape
    if c * h * w > PIXEL_FEATURES_MAX:
        side = int(math.sqrt(PIXEL_FEATURES_MAX / c))
        x = F.adaptive_avg_pool2d(x, (min(h, side), min(w, side)))
    return x.permute(0, 2, 3, 1).reshape(n, -1)


def sweep_rows(n: int, cfg: ProbeConfig) -> np.ndarray:
    """The training rows every choice on training images reads (``sweep_images`` of ``n``, in random order)."""
    return np.random.default_rng(cfg.seed).permutation(n)[: min(cfg.sweep_images, n)]


def sweep_pool(cfg: ProbeConfig) -> str:
    return cfg.pool if cfg.pool != "tokens" else "grid"


def pick_layer(
    model: LVM, ids: torch.Tensor, labels: np.ndarray, special: SpecialTokens, cfg: ProbeConfig,
    keep: dict | None = None,
) -> tuple[int, dict[int, float]]:
    """The layer whose features give the best linear-probe accuracy on a held-out part of a subset
    of the *training* images (the test set is never used to choose), and every layer's score;
    ``keep`` receives {best layer: its features on ``sweep_rows``}."""
    idx = sweep_rows(len(ids), cfg)
    cut = int(len(idx) * SWEEP_FIT_SHARE)
    layers = list(range(1, model.config.n_layer + 1))
    feats = extract_features(model, ids[idx], special, layers, sweep_pool(cfg), cfg.grid, cfg.batch_size, cfg.precision)
    y = torch.from_numpy(labels[idx])
    scores = {layer: LinearProbe.fit(f[:cut], y[:cut]).accuracy(f[cut:], y[cut:]) for layer, f in feats.items()}
    best = max(scores, key=scores.get)
    if keep is not None:
        keep[best] = feats[best]
    return best, scores


# ---------------------------------------------------------------------------------------------
# Linear probe: multinomial logistic regression, L2 picked on a validation split
# ---------------------------------------------------------------------------------------------

LINEAR_VAL_FRACTION = 0.15  # share of the labelled rows held out to choose the linear probe's L2


@dataclass
class LinearProbe:
    """Standardise -> linear -> softmax; fitted by full-batch L-BFGS (convex, so it converges)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [C, F]
    bias: torch.Tensor  # [C]
    l2: float
    l2_scores: dict[str, float] = field(default_factory=dict)  # validation accuracy of each L2 tried (when chosen)
    val_images: int = 0  # rows held out to choose L2 (0: L2 was given)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, l2: float | None = None, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1),
            val_fraction: float = LINEAR_VAL_FRACTION, seed: int = 0, max_iter: int = 200,
            init: "LinearProbe | None" = None, classes: int | None = None,
            select_rows: int | None = None, copies: int = 1) -> "LinearProbe":
        """Fit; with ``l2=None`` pick it on a random validation split, then refit on all.

        The grid is walked from the strongest L2 to the weakest, each fit starting from the previous
        solution, and the final refit starts from the chosen one (the optimum moves little along the
        regularisation path). ``select_rows`` makes the choice on at most that many random rows, so that
        only the final refit reads them all (the fits are memory-bound L-BFGS passes over ``[N, F]``).
        It is off by default: with a mean loss the best L2 shrinks as rows grow, and on Fashion-MNIST
        pixels at 100 % labels a 15k-row choice picked 1e-2 instead of 1e-3 (83.96 vs 84.65 % test;
        scaling it by rows gave 84.49 %), so the protocol keeps choosing on the rows it fits.

        ``copies``: ``x`` stacks that many versions of the same images, block after block (``--mirror``: the images,
        then their mirrors); the validation split then holds out whole images with every version of them (L2 is
        never chosen on an image whose mirror was fitted) and scores the mean of their versions' probabilities.
        """
        y = torch.as_tensor(y).long()
        classes = max(int(y.max()) + 1, classes or 0)
        scores, n_val = {}, 0
        if l2 is None:
            images = len(x) // copies
            if images * copies != len(x):
                raise ValueError(f"LinearProbe.fit: {len(x)} rows are not {copies} blocks of the same images.")
            rows = torch.randperm(images, generator=torch.Generator().manual_seed(seed))[:select_rows]
            n_val = max(int(len(rows) * val_fraction), 1)
            if len(rows) - n_val < 2 or len(set(y.tolist())) < 2:
                l2 = l2_grid[len(l2_grid) // 2]
            else:
                val = rows[:n_val]  # scored as predict reads them: every version's probabilities averaged
                tr = torch.cat([rows[n_val:] + k * images for k in range(copies)])
                best, best_acc, prev = None, -1.0, init
                for lam in sorted(l2_grid, reverse=True):
                    prev = cls.fit(x[tr], y[tr], lam, max_iter=max_iter, init=prev, classes=classes)
                    probs = sum(prev.probabilities(x[val + k * images]) for k in range(copies))
                    acc = scores[str(lam)] = float((probs.argmax(1) == y[val]).float().mean())
                    if acc > best_acc:
                        best, best_acc = prev, acc
                l2, init = best.l2, best
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        if init is not None and init.weight.shape == (classes, x.shape[1]):
            weight, bias = init.weight.clone().requires_grad_(True), init.bias.clone().requires_grad_(True)
        else:
            weight = torch.zeros(classes, x.shape[1], requires_grad=True)
            bias = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-4, tolerance_change=1e-6)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xs @ weight.T + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(mean, std, weight.detach(), bias.detach(), l2, scores, n_val if scores else 0)

    def probabilities(self, x: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, C]``; with ``mirror`` (the same images' mirrors' features) the mean of both images' probabilities."""
        probs = (((x - self.mean) / self.std) @ self.weight.T + self.bias).softmax(1)
        return probs if mirror is None else (probs + self.probabilities(mirror)) / 2

    def predict(self, x: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
        return self.probabilities(x, mirror).argmax(1)

    def accuracy(self, x: torch.Tensor, y, mirror: torch.Tensor | None = None) -> float:
        return float((self.predict(x, mirror) == torch.as_tensor(y)).float().mean())


def label_efficiency(
    name: str, f_train: torch.Tensor, y_train: np.ndarray, f_test: torch.Tensor, y_test: np.ndarray,
    fractions: list[float], seeds: int, seed: int = 0, keep: dict | None = None,
    mirrors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[dict]:
    """Test accuracy of a linear probe trained on each fraction of the labels (mean ± std over seeds);
    ``keep["model"]`` receives the probe fitted at 100 % labels, a classifier as it stands. ``mirrors``: the
    features of the train and test images' mirrors: the probe fits on both versions of each labelled image and
    scores the mean of a test image's and its mirror's probabilities."""
    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)

    def fit_score(idx: np.ndarray, s: int) -> tuple[float, None, LinearProbe]:
        if mirrors is None:
            probe = LinearProbe.fit(f_train[idx], y_train_t[idx], seed=s)
            return probe.accuracy(f_test, y_test_t), None, probe
        x = torch.cat([f_train[idx], mirrors[0][idx]])
        probe = LinearProbe.fit(x, y_train_t[idx].repeat(2), seed=s, copies=2)
        return probe.accuracy(f_test, y_test_t, mirror=mirrors[1]), None, probe

    return _curve(name, "linear", y_train, fractions, seeds, seed, int(f_train.shape[1]), fit_score, f"probes: {name}",
                  keep)


def head_efficiency(
    name: str, method: str, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
    cfg: ProbeConfig, lvm: LVM | None = None, layer: int = 0, special: SpecialTokens | None = None,
    views: Callable[[np.ndarray, int], torch.Tensor] | None = None, hw: tuple[int, int] | None = None,
) -> list[dict]:
    """``label_efficiency`` for the trained heads: ``attentive`` on frozen token states ``[N, T, D]``,
    ``finetune`` on token ids ``[N, T]`` (needs ``lvm``, ``layer``, ``special``; ``hw`` the token grid;
    ``views(indices, seed)`` the augmented ids of those training rows)."""
    from lvm.attentive import HeadTrainConfig, accuracy, fine_tune, fit_attentive

    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)
    attentive = method == "attentive"

    def fit_score(idx: np.ndarray, s: int) -> tuple[float, float]:
        idx = torch.from_numpy(idx)
        train_cfg = HeadTrainConfig(epochs=cfg.head_epochs if attentive else cfg.finetune_epochs,
                                    max_steps=cfg.head_max_steps if attentive else cfg.finetune_max_steps,
                                    batch_size=cfg.head_batch_size, lr=cfg.head_lr if attentive else cfg.finetune_lr,
                                    precision=cfg.precision, seed=s)
        if attentive:
            clf, val = fit_attentive(x_train[idx], y_train_t[idx], train_cfg)
        else:
            train_cfg = replace(train_cfg, layer_decay=cfg.finetune_layer_decay, train_blocks=cfg.finetune_train_blocks,
                                mixup=cfg.finetune_mixup, ema=cfg.finetune_ema)
            clf, val = fine_tune(lvm, x_train[idx], y_train_t[idx], layer, special, train_cfg,
                                 views=None if views is None else views(idx.numpy(), s), init=cfg.finetune_init, hw=hw,
                                 grid=cfg.grid, refit=refits_head(cfg))
        return accuracy(clf, x_test, y_test_t, cfg.precision), val

    return _curve(name, method, y_train, cfg.fractions, cfg.seeds, cfg.seed, int(x_train.shape[-1]), fit_score,
                  f"{method} probes: {name}")


def _curve(name: str, method: str, y_train: np.ndarray, fractions: list[float], seeds: int, seed: int, dim: int,
           fit_score, desc: str, keep: dict | None = None) -> list[dict]:
    """One row per fraction: ``fit_score(subset indices, seed) -> (test acc, val acc or None[, model])`` over
    ``seeds`` class-balanced label subsets (one at 100 %), reduced to mean ± std; ``keep["model"]`` receives
    the model fitted at 100 % where ``fit_score`` returns one."""
    rows = []
    bar = tqdm(total=sum(seeds if f < 1 else 1 for f in fractions), desc=desc, unit="fit")
    for frac in fractions:
        accs, val_accs = [], []
        for s in range(seeds if frac < 1 else 1):
            idx = _subset(y_train, frac, seed + s)
            acc, val, *model = fit_score(idx, seed + s)
            if keep is not None and frac == 1 and model:
                keep["model"] = model[0]
            accs.append(acc)
            if val is not None:
                val_accs.append(val)
            bar.update(1)
        row = {"features": name, "method": method, "fraction": frac, "n_labels": len(idx),
               "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)), "runs": len(accs)}
        if val_accs:
            row["val_acc_mean"] = float(np.mean(val_accs))
        rows.append({**row, "dim": dim})
    bar.close()
    return rows


def _subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-balanced random subset: the same fraction of every class (at least one each)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(len(members) * fraction)))
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict], fractions: list[float]) -> str:
    """(features, probe) x fraction table of test accuracy (mean ± std over label subsets)."""
    keys = list(dict.fromkeys((r["features"], r.get("method", "linear")) for r in rows))
    head = "| features | probe | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |\n"
    head += "|---|---|" + "---|" * len(fractions) + "\n"
    lines = []
    for name, method in keys:
        cells = []
        for f in fractions:
            r = next((r for r in rows if (r["features"], r.get("method", "linear")) == (name, method)
                      and math.isclose(r["fraction"], f)), None)
            cells.append("" if r is None else f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}"
                         if r["runs"] > 1 else f"{100 * r['acc_mean']:.1f}")
        lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot_label_efficiency(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key in dict.fromkeys((r["features"], r.get("method", "linear")) for r in rows):
        pts = sorted((r["fraction"], 100 * r["acc_mean"], 100 * r["acc_std"]) for r in rows
                     if (r["features"], r.get("method", "linear")) == key)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{key[0]}, {key[1]}",
                    linestyle={"linear": "-", "attentive": "--", "finetune": ":",
                               "supervised": "-."}.get(key[1], "-"))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
