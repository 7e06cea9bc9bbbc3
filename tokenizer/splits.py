"""Train/test splits for sources that do not come with one, and the check that no image crosses them.

An image's side is a pure function of its *key* (its path relative to the source for files, a
hash of its pixels for arrays): ``sha256(key)`` read as a number in [0, 1) below ``test_fraction``
means test. So the split needs no state, is the same in every command and on every machine, is
stratified in expectation (each class loses the same share), and adding images never moves the
ones already there. ``split.json`` records it for a run; ``find_overlap`` refuses a run whose test
side shares pixels with anything it trains on.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizer.images import ImageSource

DEFAULT_TEST_FRACTION = 0.2
SIDES = ("train", "test", "all")
MIN_TEST_PER_CLASS = 5  # fewer test images than this in a class: its accuracy is noise; the report warns


def split_rule(test_fraction: float) -> str:
    """The rule in words, for split.json and the report."""
    return (f"test = sha256(key) / 2^256 < {test_fraction:g}, key = path relative to the source "
            "(pixel hash for arrays)")


def on_test_side(keys: Sequence[str], test_fraction: float) -> np.ndarray:
    """``bool [N]``: which keys fall on the test side."""
    if not 0.0 < test_fraction < 1.0:
        from tokenizer.images import ImageSourceError

        raise ImageSourceError(f"test_fraction={test_fraction} must lie in (0, 1) (CLI: --test-fraction).")
    limit = int(test_fraction * 2**64)
    return np.fromiter((int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") < limit for k in keys),
                       dtype=bool, count=len(keys))


def pixel_hash(image: np.ndarray) -> str:
    """The identity of an image's pixels (shape included): equal hashes mean equal images."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def pixel_hashes(source: "ImageSource", progress: bool = True, desc: str = "hashing") -> dict[str, str]:
    """``{pixel hash: name}`` over a whole source, read in chunks (never all in memory)."""
    out: dict[str, str] = {}
    for positions, images in source.chunks(512, progress=progress, desc=desc):
        for pos, img in zip(positions, images):  # files by path, array images by their index
            out.setdefault(pixel_hash(img), str(source.keys[pos]) if source.root else f"#{source.index[pos]}")
    return out


def find_overlap(test: "ImageSource", others: Iterable["ImageSource"], progress: bool = True) -> None:
    """Raise if a test image is also, by key or by pixels, in any source a stage trains on."""
    from tokenizer.images import ImageSourceError

    test_keys = {str(k) for k in test.keys}
    test_pixels = pixel_hashes(test, progress, desc="hashing test images")
    for other in others:
        same_key = [] if other.root is None or other.root != test.root else sorted(
            test_keys.intersection(str(k) for k in other.keys))
        pixels = pixel_hashes(other, progress, desc=f"hashing {other.name}")
        same_pixels = [(test_pixels[h], k) for h, k in pixels.items() if h in test_pixels]
        if same_key or same_pixels:
            shown = [f"{k}" for k in same_key[:5]] + [f"{a} == {b}" for a, b in same_pixels[:5]]
            raise ImageSourceError(
                f"{len(same_key) + len(same_pixels)} test image(s) of {test.name} also appear in {other.name} "
                f"(e.g. {', '.join(shown)}); a test image must not be seen by any stage before evaluation: "
                "remove the duplicates from one side."
            )


def side_counts(labels: np.ndarray | None, class_names: list[str] | None, count: int) -> dict[str, int]:
    """Images per class (``{"(unlabeled)": count}`` when there are no labels)."""
    if labels is None:
        return {"(unlabeled)": int(count)}
    counts = Counter(int(v) for v in labels)
    names = class_names or [str(i) for i in range(max(counts, default=-1) + 1)]
    return {names[i]: counts.get(i, 0) for i in range(len(names))}


def split_warnings(train: dict[str, int], test: dict[str, int]) -> list[str]:
    """Lines for the report: classes with too few test images, or none to train on."""
    out = []
    for name in train:
        if train[name] == 0 and test.get(name, 0) > 0:
            out.append(f"class {name!r} has no training images; the probes cannot learn it.")
        elif 0 < test.get(name, 0) < MIN_TEST_PER_CLASS or (train[name] > 0 and test.get(name, 0) == 0):
            out.append(f"class {name!r} has {test.get(name, 0)} test image(s) (< {MIN_TEST_PER_CLASS}); its accuracy "
                       "is noise. Add images or pass --test-source.")
    return out


def write_split_record(path, source: str, test_source: str | None, unlabeled: Sequence[str], test_fraction: float,
                       size: int | None = None, channels: int | None = None, on_error: str = "fail",
                       progress: bool = True) -> dict:
    """Decide (or re-read) a run's sides, check that no test image is trained on, and record it all
    in ``split.json``: the rule, the image shape, counts per side and class, and each side's keys.

    A re-run with the same inputs reuses the record; other inputs in the same run folder are refused.
    """
    import json
    from pathlib import Path

    from tokenizer.atomic import write_json_atomic
    from tokenizer.images import ImageSourceError, NAMED_SOURCES, open_images

    path = Path(path)
    inputs = {"source": str(source), "test_source": test_source or None, "unlabeled": [str(u) for u in unlabeled],
              "test_fraction": test_fraction, "image_size": size, "channels": channels}
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("inputs") != inputs:
            raise ImageSourceError(
                f"{path} records another split ({record.get('inputs')}) than asked ({inputs}); "
                "use a new --out folder for other images or split settings."
            )
        return record
    sides = {"test_fraction": test_fraction, "test_source": test_source}
    train = open_images(source, "train", size, channels, on_error, progress=progress, **sides)
    size, channels = train.shape[0], train.channels
    test = open_images(source, "test", size, channels, on_error, progress=progress, **sides)
    extra = [open_images(u, "all", size, channels, on_error, progress=progress) for u in unlabeled]
    if train.labels is None:
        raise ImageSourceError(
            f"{source}: no labels (no class sub-folders, labels.csv, label file or 'labels' array); the quickstart "
            "ends in label-efficiency probes. Pass labelled images as --source and unlabeled ones as --unlabeled, "
            "or pretrain only with 'lvm tokenizer-train', 'lvm tokenize' and 'lvm train'."
        )
    train_counts = side_counts(train.labels, train.class_names, len(train))
    test_counts = side_counts(align_labels(test.labels, test.class_names, train.class_names, test.name),
                             train.class_names, len(test))
    if sum(1 for v in train_counts.values() if v) < 2:
        raise ImageSourceError(f"{source}: the training side holds fewer than 2 classes ({train_counts}); "
                               "a classifier needs at least 2.")
    empty = [name for name, v in train_counts.items() if v == 0 and test_counts.get(name, 0) > 0]
    if empty:
        raise ImageSourceError(f"{source}: class(es) {empty} have test images but no training images; add "
                               "training images of them, or a larger share with --test-fraction lower.")
    find_overlap(test, [train, *extra], progress=progress)
    named = str(source).lower() in NAMED_SOURCES and not test_source
    record = {
        "inputs": inputs,
        "rule": ("the source's published train/test split" if named else
                 f"explicit test set {test_source}" if test_source else split_rule(test_fraction)),
        "image_shape": list(train.shape),
        "notes": list(dict.fromkeys(train.notes + test.notes + [n for e in extra for n in e.notes])),
        "train": train_counts, "test": test_counts,
        "unlabeled": {e.name: len(e) for e in extra},
        "warnings": split_warnings(train_counts, test_counts),
        "checked": "no test image shares a path or pixels with a training or unlabeled image",
    }
    if not named:
        record["test_keys"], record["train_keys"] = [str(k) for k in test.keys], [str(k) for k in train.keys]
    write_json_atomic(path, record)
    return record


def align_labels(labels: np.ndarray | None, test_names: list[str] | None, train_names: list[str] | None,
                 where: str) -> np.ndarray | None:
    """Test labels renumbered as the training side's classes (an explicit test folder may list fewer)."""
    if labels is None or test_names is None or train_names is None or test_names == train_names:
        return labels
    index = {name: i for i, name in enumerate(train_names)}
    unknown = sorted(set(test_names) - set(index))
    if unknown:
        from tokenizer.images import ImageSourceError

        raise ImageSourceError(f"{where}: test classes {unknown} are not among the training classes {train_names}.")
    return np.asarray([index[test_names[v]] for v in labels], dtype=np.int64)
