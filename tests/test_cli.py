"""The console script: every command's --help renders (flags and help come from the config dataclasses)."""
import pytest

from lvm.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"lvm {command}" in text and "--" in text and "default:" in text


def test_help_text_with_percent_signs_renders(capsys):
    """A field comment such as '1 % labels' must not break argparse's %-formatting of help."""
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    assert "1 % labels" in capsys.readouterr().out


def test_summary_names_a_returned_model_instead_of_printing_its_weights(capsys):
    """``lvm probe`` hands its fitted linear probe back to Python callers; the printed summary names it."""
    import json
    from pathlib import Path

    import torch

    from lvm.cli import _print_summary
    from lvm.probe import LinearProbe

    probe = LinearProbe(torch.zeros(500), torch.ones(500), torch.zeros(3, 500), torch.zeros(3), 1e-3)
    _print_summary({"out": Path("runs/probe"), "linear_probe": probe, "layer": 2, "weights": torch.zeros(500)})
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"out": "runs/probe", "linear_probe": "<LinearProbe>", "layer": 2,
                                   "weights": "<Tensor>"}


# ---- errors: the project's own error classes end in one line and exit 2; anything else is a bug ----


def _one_line_error(capsys, command: str) -> str:
    """The single stderr line of a reported user error, checked for the ``lvm <command>: error:`` form."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"lvm {command}: error: "), lines[0]
    return lines[0]


def test_bad_flag_value_is_one_line(pixel_shards, tmp_path, capsys):
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 16, (24, 4, 4))
    data = pixel_shards(tmp_path / "shards", ids, vocab_size=16)
    code = main(["train", "--data", data, "--out", str(tmp_path / "run"), "--precision", "half", "--no-progress"])
    assert code == 2
    assert "--precision 'half'" in _one_line_error(capsys, "train")


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["generate", "--checkpoint", "/nonexistent/lvm", "--out", str(tmp_path)]) == 2
    assert "/nonexistent/lvm does not exist" in _one_line_error(capsys, "generate")


def test_missing_tokenizer_is_one_line(tmp_path, capsys):
    code = main(["tokenize", "--tokenizer", "/nonexistent/tok", "--source", str(tmp_path), "--out", str(tmp_path / "s")])
    assert code == 2
    assert "/nonexistent/tok/tokenizer.json not found" in _one_line_error(capsys, "tokenize")


def test_tokenizer_checkpoint_mismatch_is_one_line(tiny_pipeline, tmp_path, capsys):
    import torch

    from tokenizer.model import Tokenizer, TokenizerConfig

    torch.manual_seed(1)
    Tokenizer(TokenizerConfig(image_size=16, widths=(16, 16), fsq_levels=(4, 4))).save_pretrained(tmp_path / "other")
    code = main(["generate", "--checkpoint", tiny_pipeline["lvm"], "--tokenizer", str(tmp_path / "other"),
                 "--source", tiny_pipeline["npz"], "--out", str(tmp_path / "gen")])
    assert code == 2
    assert "tokenizer fingerprints differ" in _one_line_error(capsys, "generate")
    assert not (tmp_path / "gen").exists()


def test_multi_line_message_is_joined(monkeypatch, capsys):
    from lvm.checkpoint import CheckpointError

    def runner(cfg):
        raise CheckpointError("first line\nsecond line")

    monkeypatch.setattr("lvm.generate.generate", runner)
    assert main(["generate"]) == 2
    assert _one_line_error(capsys, "generate").endswith("first line second line")


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("a bug"), FileNotFoundError("a bug")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch, capsys):
    """Only the project's error classes are user errors: a plain ValueError/KeyError/OSError propagates."""

    def runner(cfg):
        raise bug

    monkeypatch.setattr("lvm.generate.generate", runner)
    with pytest.raises(type(bug), match="a bug"):
        main(["generate"])
    assert "error:" not in capsys.readouterr().err


def test_lvm_debug_keeps_the_traceback_of_a_user_error(monkeypatch, tmp_path):
    from lvm.checkpoint import CheckpointError

    monkeypatch.setenv("LVM_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["generate", "--checkpoint", str(tmp_path / "missing")])
