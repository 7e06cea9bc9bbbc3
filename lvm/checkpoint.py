"""Checkpoint + tokenizer loading, and the tokenizer fingerprint check, in one place.

A training run writes ``out/ckpt-NNNNNN/`` folders (``model.safetensors``, ``config.json``,
``data.json`` naming the tokenizer the shards were made with, ...) and a ``latest`` symlink to the
newest complete one. Generation, probes and training's resume all start here, so a checkpoint paired
with the wrong tokenizer fails the same way everywhere: ``CheckpointMismatch`` naming both and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lvm.data import SpecialTokens
from lvm.model import LVM
from lvm.runtime import LATEST, CheckpointError

if TYPE_CHECKING:
    from tokenizer.model import Tokenizer

DATA_FILE = "data.json"  # the data a checkpoint was trained on: tokenizer fingerprint and path, grid, ...
MODEL_FILES = ("config.json", "model.safetensors")  # what LVM.save_pretrained writes


class CheckpointMismatch(ValueError):
    """The tokenizer does not match the checkpoint; the message names both and the fix."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A training output folder (its ``latest``) or a checkpoint folder -> the checkpoint folder,
    checked to hold the model files, so a wrong path fails here with the fix instead of deep in a load."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a training output folder (with a '{LATEST}' checkpoint) or a checkpoint "
            "folder, e.g. the --out of 'lvm train'."
        )
    ckpt = path / LATEST if (path / LATEST).exists() else path
    missing = [name for name in MODEL_FILES if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{ckpt} is not an LVM checkpoint: {', '.join(missing)} missing; pass a training output folder "
            f"(with a '{LATEST}' checkpoint) or a checkpoint folder written by 'lvm train'."
        )
    return ckpt


def read_data_info(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's ``data.json`` (tokenizer fingerprint and path, grid, ...); ``{}`` when absent
    (a model saved by ``LVM.save_pretrained`` alone)."""
    data_file = Path(ckpt) / DATA_FILE
    if not data_file.is_file():
        return {}
    try:
        return json.loads(data_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{data_file} is not valid JSON ({err}); the checkpoint is damaged, use another."
        ) from err


def require_same_tokenizer(
    expected: str | None, actual: str, *, what: str, fix: str, error: type[ValueError] = CheckpointMismatch
) -> None:
    """Raise ``error`` when fingerprint ``actual`` is not ``expected`` (``None``: nothing recorded, nothing
    to check). ``what`` says whose fingerprints these are, ``fix`` what to do; both go in the message."""
    if expected is not None and actual != expected:
        raise error(f"{what}: tokenizer fingerprints differ (expected {expected}, got {actual}); {fix}")


def load_model_and_tokenizer(
    checkpoint: str | os.PathLike, tokenizer: str | os.PathLike = ""
) -> tuple[LVM, Tokenizer, Path]:
    """``(model in eval mode, tokenizer, checkpoint folder)``, refusing a tokenizer the model was not trained
    with. ``tokenizer`` empty -> the one recorded in the checkpoint's ``data.json``."""
    from tokenizer.model import Tokenizer

    ckpt = resolve_checkpoint(checkpoint)
    model = LVM.from_pretrained(ckpt)
    data_info = read_data_info(ckpt)
    tok_dir = tokenizer or data_info.get("tokenizer_path")
    if not tok_dir:
        raise CheckpointError(
            f"{ckpt}: no tokenizer recorded with this checkpoint; pass the tokenizer folder (--tokenizer DIR)."
        )
    tok = Tokenizer.from_pretrained(tok_dir)
    require_same_tokenizer(
        data_info.get("tokenizer_fingerprint"), tok.fingerprint,
        what=f"tokenizer {tok_dir} is not the one checkpoint {ckpt} was trained on",
        fix="pass the matching --tokenizer (empty: the one recorded in its data.json).",
    )
    if SpecialTokens(tok.vocab_size).vocab_size != model.config.vocab_size:
        raise CheckpointMismatch(
            f"tokenizer {tok_dir} has {tok.vocab_size} codes (+4 specials) but checkpoint {ckpt} has vocab "
            f"{model.config.vocab_size}; pass the tokenizer the checkpoint was trained with."
        )
    model.eval()
    return model, tok, ckpt
