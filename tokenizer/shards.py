"""Token shards: the images of a source encoded once, stored as a flat memmap the LVM streams from.

Layout of a shard directory::

    tokens.bin    uint16 (vocab < 65536) or int32, [count, h, w] row-major
    meta.json     tokenizer fingerprint, grid, vocab size, count, dtype, source, labels file
    labels.npy    int64 [count], only when the source has labels

``meta.json`` is written last and atomically: it marks a finished directory. While encoding,
``tokens.bin.partial`` and ``progress.json`` let a re-run resume after an interruption without
redoing or duplicating work (the memmap is flushed before ``progress.json`` advances).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tokenizer.atomic import atomic_path, write_json_atomic
from tokenizer.images import ImageSet, ImageSource, concat_sources, image_set_source, open_images, transform_images
from tokenizer.splits import DEFAULT_TEST_FRACTION

META_FILE = "meta.json"
TOKENS_FILE = "tokens.bin"
LABELS_FILE = "labels.npy"
PROGRESS_FILE = "progress.json"
PARTIAL_FILE = "tokens.bin.partial"


class ShardError(ValueError):
    """A shard directory that cannot be used as asked; the message says which and how to fix it."""


class Encoder(Protocol):
    """What the shard writer needs of a tokenizer (``tokenizer.Tokenizer`` provides it)."""

    vocab_size: int
    grid: tuple[int, int]
    fingerprint: str

    def encode(self, images: Any) -> torch.Tensor: ...


@dataclass
class TokenShards:
    """A finished shard directory, memory-mapped."""

    tokens: np.ndarray  # [count, h, w] memmap, uint16 or int32
    labels: np.ndarray | None  # int64 [count]
    meta: dict
    path: Path

    def __len__(self) -> int:
        return int(self.meta["count"])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever the ids fit in it."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def write_token_shards(
    tokenizer: Encoder,
    images: ImageSet | ImageSource,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    extra_meta: dict | None = None,
    transform: str = "none",
) -> dict:
    """Encode ``images`` into ``out_dir``, streaming a source chunk by chunk (memory stays flat in
    the image count); resumes a half-finished run, skips a finished one.

    ``transform`` (see ``transform_images``) is applied to each chunk. ``extra_meta`` (e.g. where the
    tokenizer lives) is stored in meta.json but is not part of the identity that decides whether
    existing shards can be reused. Files a skipping source cannot read are left out and listed.
    """
    source = images if isinstance(images, ImageSource) else image_set_source(images)
    out = Path(out_dir)
    if batch_size < 1:
        raise ShardError(f"batch_size={batch_size} must be >= 1.")
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: is a file, not a shard folder; choose another output folder (CLI: --out).")
    out.mkdir(parents=True, exist_ok=True)
    n = len(source)
    h, w = (int(x) for x in tokenizer.grid)
    dtype = token_dtype(int(tokenizer.vocab_size))
    identity = {
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "source": source.name if transform == "none" else f"{source.name}|{transform}",
        "images_identity": f"{source.identity}|{transform}",
        "images_listed": n,
        "grid": [h, w],
        "vocab_size": int(tokenizer.vocab_size),
        "dtype": dtype.name,
    }

    meta_path = out / META_FILE
    if meta_path.exists():
        if not overwrite:
            meta = _read_meta(meta_path)
            if all(meta.get(k) == v for k, v in identity.items()):
                return meta  # already finished with the same tokenizer and images
            raise ShardError(
                f"{out}: already holds token shards of another tokenizer or image set "
                f"({meta.get('source')}, tokenizer {meta.get('tokenizer_fingerprint')}); "
                "choose another output folder or pass overwrite=True (CLI: --overwrite)."
            )
        for name in (META_FILE, TOKENS_FILE, LABELS_FILE):
            (out / name).unlink(missing_ok=True)

    record = _resume_point(out, identity, overwrite)
    done, written, skipped = record["done"], record["written"], record["skipped"]
    tokens = np.memmap(out / PARTIAL_FILE, dtype=dtype, mode="r+" if done > 0 else "w+", shape=(max(n, 1), h, w))
    with torch.inference_mode():
        for positions, chunk in source.chunks(batch_size, start=done, progress=progress, desc="tokenizing"):
            stop = min(done + batch_size, n)
            kept = len(chunk)
            if kept:
                if transform != "none":
                    chunk = transform_images(chunk, transform)
                ids = tokenizer.encode(chunk)
                ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
                if ids.shape != (kept, h, w):
                    raise ShardError(f"tokenizer returned ids of shape {ids.shape}, expected {(kept, h, w)}.")
                tokens[written : written + kept] = ids.astype(dtype, copy=False)
                tokens.flush()  # data first, then the progress record that vouches for it
            skipped += sorted(set(range(done, stop)) - {int(p) for p in positions})
            done, written = stop, written + kept
            write_json_atomic(out / PROGRESS_FILE, {**identity, "done": done, "written": written, "skipped": skipped})
    del tokens
    if written == 0:
        raise ShardError(f"{source.name}: none of the {n} images could be read; nothing to tokenize.")

    # Not atomic_path: the partial file keeps its fixed name across interrupted runs, so a re-run resumes it.
    os.truncate(out / PARTIAL_FILE, written * h * w * dtype.itemsize)  # rows of skipped images were never used
    os.replace(out / PARTIAL_FILE, out / TOKENS_FILE)
    keep = np.setdiff1d(np.arange(n), np.asarray(skipped, dtype=np.int64))
    meta = {**identity, "count": int(written), "tokens_file": TOKENS_FILE, "labels_file": None,
            "class_names": source.class_names, "notes": source.notes,
            "skipped": [str(source.keys[i]) for i in skipped], **(extra_meta or {})}
    if source.labels is not None:
        with atomic_path(out / LABELS_FILE) as tmp, open(tmp, "wb") as f:  # a file object: np.save adds no suffix
            np.save(f, np.asarray(source.labels[keep], dtype=np.int64))
        meta["labels_file"] = LABELS_FILE
    write_json_atomic(meta_path, meta)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return meta


def read_token_shards(path: str | os.PathLike) -> TokenShards:
    """Open a finished shard directory read-only (memory-mapped, nothing loaded up front)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        hint = (
            "it holds an unfinished run; re-run 'lvm tokenize' with the same arguments to finish it"
            if (path / PROGRESS_FILE).exists()
            else "create it with 'lvm tokenize'"
        )
        raise ShardError(f"{path}: not a token shard folder (no {META_FILE}); {hint}.")
    meta = _read_meta(meta_path)
    tokens_path = path / meta.get("tokens_file", TOKENS_FILE)
    h, w = meta["grid"]
    expected = meta["count"] * h * w * np.dtype(meta["dtype"]).itemsize
    if not tokens_path.exists() or tokens_path.stat().st_size < expected:
        raise ShardError(f"{tokens_path}: missing or shorter than meta.json says; re-run 'lvm tokenize' with --overwrite.")
    tokens = np.memmap(tokens_path, dtype=meta["dtype"], mode="r", shape=(meta["count"], h, w))
    labels = np.load(path / meta["labels_file"]) if meta.get("labels_file") else None
    return TokenShards(tokens, labels, meta, path)


@dataclass
class TokenizeConfig:
    """``lvm tokenize``: images of a source -> token shards, with a trained tokenizer."""

    source: str = "fashion-mnist"  # folder, labels CSV, IDX/.npy/.npz file, 'fashion-mnist' or 'skimage-crops'
    tokenizer: str = "runs/tokenizer"  # directory written by 'lvm tokenizer-train'
    out: str = "runs/tokens/train"  # shard directory to write
    split: str = "train"  # train, test or all; sources without a named split are split by path hash
    test_fraction: float = DEFAULT_TEST_FRACTION  # share of a source without a named split held out as test
    test_source: str = ""  # an explicit test set: then 'train' is all of --source and 'test' all of this
    unlabeled: list[str] = field(default_factory=list)  # more sources added whole to the train side, labels dropped
    transform: str = "none"  # none, hflip, vflip, invert, rot90, mask-bottom: views for A->B pair sentences
    batch_size: int = 256
    on_error: str = "fail"  # unreadable image files: 'fail' or 'skip' (skipped files are listed in meta.json)
    limit: int = 0  # encode at most N images, spread evenly over the source (0 = all)
    overwrite: bool = False


def run_tokenize(cfg: TokenizeConfig) -> dict:
    """The ``lvm tokenize`` entry point: list the images, stream them through the tokenizer, return meta."""
    from tokenizer.model import Tokenizer  # heavy import kept out of shard reading

    tok = Tokenizer.from_pretrained(cfg.tokenizer)
    source = open_source(cfg.source, cfg.split, tok.config.image_size, tok.config.channels, cfg.on_error,
                         cfg.limit or None, cfg.test_fraction, cfg.test_source or None, cfg.unlabeled)
    extra = {"tokenizer_path": str(Path(cfg.tokenizer).resolve())}
    meta = write_token_shards(tok, source, cfg.out, cfg.batch_size, cfg.overwrite, extra_meta=extra,
                              transform=cfg.transform)
    write_json_atomic(Path(cfg.out) / "tokenize_config.json", asdict(cfg))
    return meta


def open_source(source: str, split: str, size: int | None, channels: int | None, on_error: str = "fail",
                limit: int | None = None, test_fraction: float = DEFAULT_TEST_FRACTION,
                test_source: str | None = None, unlabeled: list[str] | tuple = ()) -> ImageSource:
    """One side of ``source``; on the train side, plus every ``unlabeled`` source whole (labels dropped):
    what the tokenizer and the LVM pretrain on."""
    main = open_images(source, split, size, channels, on_error, limit, test_fraction=test_fraction,
                       test_source=test_source)
    if not unlabeled or split == "test":
        return main
    extra = [open_images(u, "all", main.shape[0], main.channels, on_error) for u in unlabeled]
    return concat_sources([main.without_labels(), *extra], name="+".join([main.name, *(e.name for e in extra)]))


def _resume_point(out: Path, identity: dict, overwrite: bool) -> dict:
    """How far a previous interrupted run got: source positions done, rows written, positions skipped."""
    progress_path, partial = out / PROGRESS_FILE, out / PARTIAL_FILE
    fresh = {"done": 0, "written": 0, "skipped": []}
    if overwrite or not progress_path.exists() or not partial.exists():
        progress_path.unlink(missing_ok=True)
        return fresh
    record = json.loads(progress_path.read_text())
    if any(record.get(k) != v for k, v in identity.items()) or "written" not in record:
        progress_path.unlink()  # an unfinished run of something else: start afresh
        return fresh
    return {"done": int(record["done"]), "written": int(record["written"]), "skipped": list(record["skipped"])}


def _read_meta(meta_path: Path) -> dict:
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(
            f"{meta_path}: not valid JSON ({err}); the shards are damaged, re-run 'lvm tokenize' with --overwrite."
        ) from err
