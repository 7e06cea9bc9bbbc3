"""``lvm predict`` and ``lvm embed``: a classifier bundle run over image files.

Files are read in batches; an unreadable file is named with its reason (on stderr and in
``<out>.errors.csv``) while the others are processed, and the command then ends with a one-line
error and a non-zero exit status so that a script notices. Everything here is a thin layer over
``Classifier.predict`` / ``Classifier.embed``.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from lvm.classifier import Classifier, read_image
from lvm.runtime import ConfigError, check_precision
from tokenizer.atomic import atomic_path
from tokenizer.images import IMAGE_SUFFIXES, ImageSourceError


class UnreadableImages(ImageSourceError):
    """Some input files could not be read; the others were processed. The message names them."""


@dataclass
class PredictConfig:
    """``lvm predict``: class labels and probabilities for image files, as CSV."""

    model: str = "runs/classifier"  # classifier bundle folder (the --out of lvm classifier-train)
    images: list[str] = field(default_factory=list)  # image files and/or folders (searched recursively)
    out: str = "predictions.csv"  # columns path,label,probability (+ label_k,probability_k up to --top-k)
    top_k: int = 1  # classes listed per image, most probable first
    batch_size: int = 64  # images per forward pass
    precision: str = "fp32"  # fp32, or auto (bf16 on AMX CPUs and CUDA: faster, probabilities differ slightly)
    progress: bool = True  # a tqdm bar on stderr


@dataclass
class EmbedConfig:
    """``lvm embed``: the classifier's pooled features of image files, as a .npy array plus a paths list."""

    model: str = "runs/classifier"  # classifier bundle folder (the --out of lvm classifier-train)
    images: list[str] = field(default_factory=list)  # image files and/or folders (searched recursively)
    out: str = "features.npy"  # float32 [N, F], one row per readable image, in the order of the paths file
    paths_out: str = ""  # the paths of the rows, one per line; empty -> <out without .npy>.paths.txt
    batch_size: int = 64  # images per forward pass
    precision: str = "fp32"  # fp32, or auto (bf16 on AMX CPUs and CUDA)
    progress: bool = True  # a tqdm bar on stderr


def run_predict(cfg: PredictConfig) -> dict:
    """The ``lvm predict`` entry point: writes ``cfg.out``; raises ``UnreadableImages`` after it if any file failed."""
    check_precision(cfg.precision)
    clf = Classifier.from_pretrained(cfg.model, precision=cfg.precision)
    if not 1 <= cfg.top_k <= len(clf.classes):
        raise ConfigError(f"--top-k {cfg.top_k} must lie in 1..{len(clf.classes)} (the bundle's classes).")
    files = collect_image_files(cfg.images)
    header = ["path", "label", "probability"]
    header += [f"{name}_{k}" for k in range(2, cfg.top_k + 1) for name in ("label", "probability")]
    failures: list[tuple[str, str]] = []
    done = 0
    with atomic_path(cfg.out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for paths, images in read_batches(files, clf, cfg.batch_size, failures, cfg.progress, "predict"):
            _, probs = clf.predict(images, batch_size=cfg.batch_size)
            top = np.argsort(-probs, axis=1, kind="stable")[:, : cfg.top_k]  # [b, k]
            for path, p, order in zip(paths, probs, top):
                writer.writerow([path] + [v for c in order for v in (clf.classes[c], f"{p[c]:.6f}")])
            done += len(paths)
    _finish(cfg.out, done, len(files), failures, "predict")
    return {"out": cfg.out, "predicted": done, "classes": clf.classes}


def run_embed(cfg: EmbedConfig) -> dict:
    """The ``lvm embed`` entry point: writes the features and their paths; raises ``UnreadableImages`` if any failed."""
    check_precision(cfg.precision)
    clf = Classifier.from_pretrained(cfg.model, precision=cfg.precision)
    files = collect_image_files(cfg.images)
    failures: list[tuple[str, str]] = []
    rows, kept = [], []
    for paths, images in read_batches(files, clf, cfg.batch_size, failures, cfg.progress, "embed"):
        rows.append(clf.embed(images, batch_size=cfg.batch_size))
        kept += paths
    feats = np.concatenate(rows) if rows else np.empty((0, 0), np.float32)
    paths_out = cfg.paths_out or str(Path(cfg.out).with_suffix("")) + ".paths.txt"
    with atomic_path(cfg.out) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    with atomic_path(paths_out) as tmp:
        tmp.write_text("".join(p + "\n" for p in kept))
    _finish(cfg.out, len(kept), len(files), failures, "embed")
    return {"out": cfg.out, "paths": paths_out, "shape": list(feats.shape)}


def collect_image_files(inputs: list[str]) -> list[str]:
    """Files as given, and folders searched recursively for image files (sorted), in argument order.

    A named file is kept whatever its suffix (it is reported if unreadable); a missing path is an error
    before anything runs, since it is more likely a typo than a bad image."""
    if not inputs:
        raise ConfigError("no images given; pass --images with image files and/or folders.")
    files: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageSourceError(f"{path}: no image files found (looked recursively for "
                                       f"{', '.join(sorted(IMAGE_SUFFIXES))}).")
            files += found
        elif path.exists():
            files.append(str(path))
        else:
            raise ImageSourceError(f"{path}: no such file or folder; pass image files and/or folders to --images.")
    return files


def read_batches(files: list[str], clf: Classifier, batch_size: int, failures: list[tuple[str, str]],
                 progress: bool = True, desc: str = "images") -> Iterator[tuple[list[str], np.ndarray]]:
    """``(paths, uint8 [b, S, S, C])`` per batch of readable files; each unreadable one is appended to
    ``failures`` as ``(path, reason)`` and named on stderr."""
    bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        paths, arrays = [], []
        for path in files[start : start + batch_size]:
            try:
                arrays.append(read_image(path, clf.image_size, clf.channels))
                paths.append(path)
            except ImageSourceError as err:
                reason = str(err).removeprefix(f"{path}: ").rstrip(".")
                failures.append((path, reason))
                tqdm.write(f"lvm {desc}: cannot read {path}: {reason}", file=sys.stderr)
        bar.update(len(files[start : start + batch_size]))
        if paths:
            yield paths, np.stack(arrays)
    bar.close()


def _finish(out: str, done: int, total: int, failures: list[tuple[str, str]], command: str) -> None:
    """Write ``<out>.errors.csv`` and raise ``UnreadableImages`` when files failed (the CLI exits non-zero)."""
    errors = Path(str(Path(out).with_suffix("")) + ".errors.csv")
    if not failures:
        errors.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
        return
    with atomic_path(errors) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("path", "error"), *failures])
    first = "; ".join(f"{p}: {r}" for p, r in failures[:3]) + (" ..." if len(failures) > 3 else "")
    raise UnreadableImages(
        f"{len(failures)} of {total} images could not be read ({first}); all are listed in {errors}. The other "
        f"{done} are in {out}. Fix or remove the listed files and run 'lvm {command}' again."
    )
