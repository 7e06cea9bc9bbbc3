"""Checkpoint resolution, data.json, the one tokenizer-fingerprint check, and load errors."""
import json
import os
import shutil

import pytest

from lvm.checkpoint import (
    DATA_FILE, LATEST, CheckpointError, CheckpointMismatch, load_model_and_tokenizer, read_data_info,
    require_same_tokenizer, resolve_checkpoint,
)


def test_resolve_follows_latest_or_takes_a_checkpoint_folder(tiny_pipeline):
    run = tiny_pipeline["lvm"]
    ckpt = resolve_checkpoint(run)
    assert ckpt.name == LATEST and os.path.realpath(ckpt) == os.path.realpath(os.path.join(run, os.readlink(ckpt)))
    direct = os.path.join(run, os.readlink(ckpt))  # ckpt-000003
    assert str(resolve_checkpoint(direct)) == direct


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json, model.safetensors missing"):
        load_model_and_tokenizer(tmp_path / "empty")


def test_read_data_info(tiny_pipeline, tmp_path):
    info = read_data_info(resolve_checkpoint(tiny_pipeline["lvm"]))
    assert info["tokenizer_path"] == tiny_pipeline["tokenizer"]
    assert info["tokenizer_fingerprint"] == tiny_pipeline["tok"].fingerprint
    assert read_data_info(tmp_path) == {}
    (tmp_path / DATA_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_data_info(tmp_path)


def test_require_same_tokenizer_names_both_and_the_fix():
    require_same_tokenizer("abc", "abc", what="x", fix="y")
    require_same_tokenizer(None, "abc", what="x", fix="y")  # nothing recorded: nothing to check
    with pytest.raises(CheckpointMismatch, match=r"run A: .* differ \(expected abc, got def\); re-tokenize"):
        require_same_tokenizer("abc", "def", what="run A", fix="re-tokenize.")

    class Other(ValueError):
        pass

    with pytest.raises(Other):
        require_same_tokenizer("abc", "def", what="x", fix="y", error=Other)


def test_load_without_a_recorded_tokenizer(tiny_pipeline, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(tiny_pipeline["lvm"]), ckpt)
    (ckpt / DATA_FILE).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer recorded"):
        load_model_and_tokenizer(ckpt)
    model, tok, path = load_model_and_tokenizer(ckpt, tiny_pipeline["tokenizer"])  # nothing recorded to check
    assert path == ckpt and not model.training and tok.fingerprint == tiny_pipeline["tok"].fingerprint
    (ckpt / DATA_FILE).write_text(json.dumps({"tokenizer_fingerprint": "0" * 16}))
    with pytest.raises(CheckpointMismatch, match=f"expected {'0' * 16}, got {tok.fingerprint}"):
        load_model_and_tokenizer(ckpt, tiny_pipeline["tokenizer"])


def test_generate_still_exports_the_loader():
    import lvm.checkpoint
    import lvm.generate

    assert lvm.generate.CheckpointMismatch is lvm.checkpoint.CheckpointMismatch
    assert lvm.generate.load_model_and_tokenizer is lvm.checkpoint.load_model_and_tokenizer
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointMismatch, ValueError)
