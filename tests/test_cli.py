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
