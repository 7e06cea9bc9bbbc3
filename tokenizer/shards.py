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

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenizer.atomic import atomic_path, write_json_atomic
from tokenizer.images import ImageSet, load_images, transform_images

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
    images: ImageSet,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    extra_meta: dict | None = None,
) -> dict:
    """Encode ``images`` into ``out_dir``; resumes a half-finished run, skips a finished one.

    ``extra_meta`` (e.g. where the tokenizer lives) is stored in meta.json but is not part of the
    identity that decides whether existing shards can be reused.
    """
    out = Path(out_dir)
    if batch_size < 1:
        raise ShardError(f"batch_size={batch_size} must be >= 1.")
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: is a file, not a shard folder; choose another output folder (CLI: --out).")
    out.mkdir(parents=True, exist_ok=True)
    n = len(images)
    h, w = (int(x) for x in tokenizer.grid)
    dtype = token_dtype(int(tokenizer.vocab_size))
    identity = {
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "source": images.source,
        "images_sha256": _hash_images(images.images),
        "count": n,
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

    done = _resume_point(out, identity, overwrite)
    mode = "r+" if done > 0 else "w+"
    tokens = np.memmap(out / PARTIAL_FILE, dtype=dtype, mode=mode, shape=(max(n, 1), h, w))
    bar = tqdm(total=n, initial=done, desc="tokenizing", unit="img", disable=not progress)
    with torch.inference_mode():
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            ids = tokenizer.encode(images.images[start:stop])
            ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
            if ids.shape != (stop - start, h, w):
                raise ShardError(f"tokenizer returned ids of shape {ids.shape}, expected {(stop - start, h, w)}.")
            tokens[start:stop] = ids.astype(dtype, copy=False)
            tokens.flush()  # data first, then the progress record that vouches for it
            write_json_atomic(out / PROGRESS_FILE, {**identity, "done": stop})
            bar.update(stop - start)
    bar.close()
    del tokens

    # Not atomic_path: the partial file keeps its fixed name across interrupted runs, so a re-run resumes it.
    os.replace(out / PARTIAL_FILE, out / TOKENS_FILE)
    meta = {**identity, "tokens_file": TOKENS_FILE, "labels_file": None, "class_names": images.class_names,
            **(extra_meta or {})}
    if images.labels is not None:
        with atomic_path(out / LABELS_FILE) as tmp, open(tmp, "wb") as f:  # a file object: np.save adds no suffix
            np.save(f, np.asarray(images.labels, dtype=np.int64))
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

    source: str = "fashion-mnist"  # folder, IDX/.npy/.npz file, or 'fashion-mnist'
    tokenizer: str = "runs/tokenizer"  # directory written by 'lvm tokenizer-train'
    out: str = "runs/tokens/train"  # shard directory to write
    split: str = "train"  # for fashion-mnist: train or test
    transform: str = "none"  # none, hflip, vflip, invert, rot90, mask-bottom: views for A->B pair sentences
    batch_size: int = 256
    on_error: str = "fail"  # unreadable image files: 'fail' or 'skip'
    limit: int = 0  # encode only the first N images (0 = all)
    overwrite: bool = False


def run_tokenize(cfg: TokenizeConfig) -> dict:
    """The ``lvm tokenize`` entry point: load tokenizer and images, write shards, return meta."""
    from tokenizer.model import Tokenizer  # heavy import kept out of shard reading

    tok = Tokenizer.from_pretrained(cfg.tokenizer)
    images = load_images(
        cfg.source,
        split=cfg.split,
        size=tok.config.image_size,
        channels=tok.config.channels,
        on_error=cfg.on_error,
        limit=cfg.limit or None,
    )
    if cfg.transform != "none":
        images.images = transform_images(images.images, cfg.transform)
        images.source = f"{images.source}|{cfg.transform}"
    extra = {"tokenizer_path": str(Path(cfg.tokenizer).resolve())}
    meta = write_token_shards(tok, images, cfg.out, cfg.batch_size, cfg.overwrite, extra_meta=extra)
    write_json_atomic(Path(cfg.out) / "tokenize_config.json", asdict(cfg))
    return meta


def _resume_point(out: Path, identity: dict, overwrite: bool) -> int:
    """How many images a previous interrupted run already encoded into the partial file."""
    progress_path, partial = out / PROGRESS_FILE, out / PARTIAL_FILE
    if overwrite or not progress_path.exists() or not partial.exists():
        progress_path.unlink(missing_ok=True)
        return 0
    record = json.loads(progress_path.read_text())
    if any(record.get(k) != v for k, v in identity.items()):
        progress_path.unlink()  # an unfinished run of something else: start afresh
        return 0
    return int(record["done"])


def _read_meta(meta_path: Path) -> dict:
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(
            f"{meta_path}: not valid JSON ({err}); the shards are damaged, re-run 'lvm tokenize' with --overwrite."
        ) from err


def _hash_images(images: np.ndarray) -> str:
    digest = hashlib.sha256(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:16]
