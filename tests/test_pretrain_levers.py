"""bench.pretrain_levers: every lever's commands are ones the CLI accepts, and they differ from the
baseline only in what the lever says (so a row measures its lever and nothing else)."""
import argparse
import importlib
import shlex
from pathlib import Path

import pytest

from bench.pretrain_levers import LEVERS, commands
from lvm.cli import COMMANDS, add_dataclass_arguments


def _parse(argv: list[str]) -> dict:
    """``lvm <command> flags...`` parsed as the CLI parses it (an unknown flag exits)."""
    assert argv[0] == "lvm"
    module, config, _, _ = COMMANDS[argv[1]]
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, getattr(importlib.import_module(module), config))
    return vars(parser.parse_args(argv[2:]))


def _parsed(name: str) -> dict:
    return {stage: _parse(argv) for stage, argv in commands(name, Path("/x"), 1, 6000)}


@pytest.mark.parametrize("name", list(LEVERS))
def test_lever_commands_parse(name):
    stages = _parsed(name)
    assert {"lvm", "probe10"} <= set(stages)
    assert stages["probe10"]["source"] == "fashion-mnist"  # every lever is probed on the same labelled images
    if "tokenizer" in stages:  # its own tokenizer and shards
        assert {"tokens/train", "tokens/test"} <= set(stages)
        assert stages["probe10"]["tokenizer"] == stages["tokenizer"]["out_dir"] == stages["tokens/train"]["tokenizer"]
    elif "tokenizer_from" in LEVERS[name]:  # another lever's tokenizer on this lever's data: its own shards
        source = LEVERS[name]["tokenizer_from"]
        assert stages["tokens/train"]["tokenizer"] == stages["probe10"]["tokenizer"] == f"/x/{source}/tokenizer"
        assert stages["lvm"]["data"] == stages["tokens/train"]["out"] == f"/x/{name}/tokens/train"
    else:  # an LVM-only lever pretrains on its base's shards (the baseline's), so the tokenizer is not a second change
        base = LEVERS[name].get("base", "baseline")
        assert stages["lvm"]["data"] == f"/x/{base}/tokens/train"
        assert stages["probe10"]["tokenizer"] == f"/x/{base}/tokenizer"


def test_levers_change_only_their_lever():
    base = _parsed("baseline")

    def changed(name: str, stage: str) -> dict:
        other = _parsed(name)[stage]
        return {k: v for k, v in other.items() if base[stage].get(k) != v and "/x/" not in str(v)}

    assert changed("grid14", "tokenizer") == {"grid": 14}
    assert changed("grid14", "lvm") == {"steps": 120}
    assert changed("wide_shallow", "lvm") == {"n_layer": 3, "d_model": 384, "n_head": 6, "steps": 95}
    assert "tokenizer" not in _parsed("wide_shallow") and "tokenizer" in _parsed("tokenizer_x3")
    assert changed("batch8", "lvm") == {"batch_size": 8, "steps": 2 * 106}
    assert changed("pairs_hflip", "lvm") == {"kind": "pairs"}  # plus the aligned view shards
    assert _parsed("pairs_hflip")["tokens/train_hflip"]["transform"] == "hflip"
    assert changed("tokenizer_x3", "tokenizer") == {"steps": 3 * 176}
    assert changed("lvm_x3", "lvm") == {"steps": 3 * 106}
    assert changed("ood_skimage", "tokenizer") == {"data": "skimage-crops", "image_size": 28, "channels": 1}
    assert changed("ood_skimage", "probe10") == {}
    grid14, x3 = _parsed("grid14"), _parsed("grid14_x3")  # on grid14's tokenizer: only the steps differ from it
    assert "tokenizer" not in x3 and x3["lvm"]["data"] == "/x/grid14/tokens/train"
    assert {k: v for k, v in x3["lvm"].items() if grid14["lvm"][k] != v and "/x/" not in str(v)} == {"steps": 360}


def test_commands_are_printable_and_reparse():
    for stage, argv in commands("pairs_hflip", Path("/x y"), 2, 6000):
        assert shlex.split(shlex.join(argv)) == argv


def test_an_lvm_only_lever_first_makes_the_baselines_shards(tmp_path, monkeypatch):
    import bench.pretrain_levers as pl

    calls = []
    monkeypatch.setattr(pl.subprocess, "call", lambda argv, **kw: calls.append(argv[:2]) or 0)
    pl.run_lever("lvm_x3", tmp_path, 1, 6000)
    assert calls[:3] == [["lvm", "tokenizer-train"], ["lvm", "tokenize"], ["lvm", "tokenize"]]
    assert calls[3:] == [["lvm", "train"], ["lvm", "probe"]]  # and not the baseline's own LVM
    calls.clear()
    pl.run_lever("grid14_x3", tmp_path, 1, 6000)  # makes grid14's tokenizer and shards, not the baseline's
    assert calls[0] == ["lvm", "tokenizer-train"] and (tmp_path / "grid14").is_dir()
    assert not (tmp_path / "grid14" / "lvm").exists() and calls[3:] == [["lvm", "train"], ["lvm", "probe"]]


def test_a_report_without_notes_keeps_the_notes_already_written(tmp_path):
    import json

    from bench.pretrain_levers import parse_args, report

    results = str(tmp_path / "levers")
    report([], parse_args(["--results", results, "--note", "Findings: grid14 wins."]))
    report([], parse_args(["--results", results]))  # e.g. a lever run afterwards
    assert json.loads((tmp_path / "levers.json").read_text())["notes"] == ["Findings: grid14 wins."]
    assert "Findings: grid14 wins." in (tmp_path / "levers.md").read_text()
    report([], parse_args(["--results", results, "--note", "Newer."]))  # given notes replace them
    assert json.loads((tmp_path / "levers.json").read_text())["notes"] == ["Newer."]


def test_the_cross_cells_swap_exactly_one_stage_of_the_matched_pair():
    """cross_tok_domain is ood_current with the domain's tokenizer, cross_tok_ood is current with the out-of-domain
    one: the LVM recipe is the pair's, the data the LVM's, and only the tokenizer crosses over."""
    cur, ood = _parsed("current"), _parsed("ood_current")
    for name, lvm_twin, tok_twin in (("cross_tok_domain", ood, cur), ("cross_tok_ood", cur, ood)):
        cell = _parsed(name)
        assert "tokenizer" not in cell
        assert cell["tokens/train"]["source"] == lvm_twin["tokens/train"]["source"]
        assert cell["tokens/train"]["tokenizer"] == tok_twin["tokenizer"]["out_dir"]
        assert {k: v for k, v in cell["lvm"].items() if lvm_twin["lvm"][k] != v and "/x/" not in str(v)} == {}
        assert cell["probe10"]["fractions"] == [0.1] and cell["probe10"]["seeds"] == 3
    assert cur["tokenizer"]["data"] == "fashion-mnist" and ood["tokenizer"]["data"] == "skimage-crops"


def test_a_cross_cell_first_makes_the_tokenizer_it_reads(tmp_path, monkeypatch):
    import bench.pretrain_levers as pl

    calls = []
    monkeypatch.setattr(pl.subprocess, "call", lambda argv, **kw: calls.append(argv[:2]) or 0)
    pl.run_lever("cross_tok_ood", tmp_path, 1, 6000)
    assert calls == [["lvm", "tokenizer-train"], ["lvm", "tokenize"], ["lvm", "tokenize"], ["lvm", "train"],
                     ["lvm", "probe"]]  # ood_current's tokenizer only (not its shards or LVM), then the cell
    assert (tmp_path / "ood_current").is_dir() and not (tmp_path / "ood_current" / "tokens").exists()


def test_the_amx_pair_differs_only_in_its_pretraining_images_and_is_probed_on_every_fraction():
    dom, ood = _parsed("amx_grid14"), _parsed("ood_amx_grid14")
    assert {k: v for k, v in ood["tokenizer"].items() if dom["tokenizer"][k] != v and "/x/" not in str(v)} == \
        {"data": "skimage-crops", "image_size": 28, "channels": 1}
    assert {k: v for k, v in ood["lvm"].items() if dom["lvm"][k] != v and "/x/" not in str(v)} == {}
    assert dom["tokenizer"]["grid"] == 14 and dom["lvm"]["steps"] == 1169 and dom["lvm"]["batch_size"] == 8 and dom["lvm"]["compile"]
    for cell in (dom, ood):
        assert cell["probe10"]["fractions"] == [0.01, 0.1, 0.3, 1.0] and cell["probe10"]["pixels"] == "both"
    assert ood["probe10"]["baselines"] and ood["probe10"]["supervised"] and not ood["probe10"]["random_init"]
    assert not dom["probe10"]["baselines"] and dom["probe10"]["layers"] == [5] and ood["probe10"]["layers"] == []


def test_a_continued_lever_resumes_a_copy_of_its_source_and_leaves_the_source_as_it_was(tmp_path, monkeypatch):
    """amx_15400 trains on to 15,400 steps from a copy of amx_7700's last checkpoint (the same shards, the same
    recipe but the steps), is done only once its checkpoint reaches them, and refuses to start without the source."""
    import json

    import bench.pretrain_levers as pl

    cont, src = _parsed("amx_15400"), _parsed("amx_7700")
    assert {k: v for k, v in cont["lvm"].items() if src["lvm"][k] != v and "/x/" not in str(v)} == {"steps": 15400}
    assert cont["lvm"]["data"] == src["lvm"]["data"] and cont["probe10"]["mirror"]
    assert _parsed("ood_amx_15400")["lvm"]["data"] == "/x/ood_amx_default13/tokens/train"

    def checkpoint(lvm: Path, step: int) -> None:
        folder = lvm / f"ckpt-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        (lvm / "latest").unlink(missing_ok=True)
        (lvm / "latest").symlink_to(folder.name)

    for stage in ("tokens/train", "tokens/test"):  # the base's shards exist
        (tmp_path / "amx_default13" / stage).mkdir(parents=True)
        (tmp_path / "amx_default13" / stage / "meta.json").write_text("{}")
    calls = []
    monkeypatch.setattr(pl.subprocess, "call", lambda argv, **kw: calls.append(argv[:2]) or 0)
    with pytest.raises(SystemExit, match="amx_7700"):  # no source LVM yet
        pl.run_lever("amx_15400", tmp_path, 1, 6000)
    assert calls == []
    source = tmp_path / "amx_7700" / "lvm"
    checkpoint(source, 7500)
    checkpoint(source, 7700)
    (source / "metrics.jsonl").write_text('{"step": 7700, "loss": 1.8}\n')
    pl.run_lever("amx_15400", tmp_path, 1, 6000)
    run = tmp_path / "amx_15400"
    assert calls == [["lvm", "train"], ["lvm", "probe"]]  # the stub trained nothing: still at the source's step
    assert pl.trained_steps(run / "lvm") == 7700 and not pl.done("lvm", run)
    assert (run / "lvm" / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    assert sorted(p.name for p in source.iterdir()) == ["ckpt-007500", "ckpt-007700", "latest", "metrics.jsonl"]
    checkpoint(run / "lvm", 15400)  # what lvm train leaves when it reaches the steps
    assert pl.done("lvm", run)
    calls.clear()
    pl.run_lever("amx_15400", tmp_path, 1, 6000)
    assert calls == [["lvm", "probe"]]  # the stub wrote no probe.json: only the probe runs again
