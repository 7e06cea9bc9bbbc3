"""Atomic writes: a reader, or a re-run after a crash, never sees a half-written file or folder.

Everything is written under a temporary name beside the target and renamed into place (a rename
within one folder is atomic on POSIX). This lives in the lowest package that writes files (the
tokenizer's weights and token shards); the LVM's checkpoints and every trainer use the same helpers.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    The caller creates a file or a folder at the yielded path. An existing folder at ``path`` is
    swapped out as a whole; on an exception the temporary is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` that never leaves a truncated file behind."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def point_symlink(link: str | os.PathLike, target_name: str) -> None:
    """Make ``link`` name ``target_name`` (a sibling), swapping the old link atomically."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.symlink_to(target_name)
    os.replace(tmp, link)
