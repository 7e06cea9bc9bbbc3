"""bench.readout_levers: a partial run (--only) adds its rows to the table instead of replacing it."""
import json

from bench.readout_levers import merged, write_results


def _row(name, fraction, acc):
    return {"readout": name, "fraction": fraction, "dim": 8, "acc_mean": acc, "acc_std": 0.0, "seeds": 3,
            "fit_seconds": 1.0}


def test_partial_run_keeps_the_rows_it_does_not_rerun(tmp_path):
    out = tmp_path / "readout"
    old_meta = {"checkpoint": "c", "cpu": "x", "amx": False, "command": "first run"}
    write_results(out, old_meta, merged(out, [_row("layer 1", 0.1, 0.80), _row("layer 2", 0.1, 0.81)], old_meta), [0.1])
    saved = json.loads(out.with_suffix(".json").read_text())
    saved["meta"]["note"] = "Findings, written by hand."
    out.with_suffix(".json").write_text(json.dumps(saved))
    meta = {**old_meta, "command": "second run --only layers"}
    rows = merged(out, [_row("layer 2", 0.1, 0.90), _row("layers 1-2", 0.1, 0.85)], meta)
    write_results(out, meta, rows, [0.1])
    saved = {r["readout"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert saved["layer 1"]["acc_mean"] == 0.80 and saved["layer 1"]["command"] == "first run"
    assert saved["layer 2"]["acc_mean"] == 0.90 and saved["layer 2"]["command"] == "second run --only layers"
    assert set(saved) == {"layer 1", "layer 2", "layers 1-2"}
    text = out.with_suffix(".md").read_text()
    assert "Findings, written by hand." in text  # the partial run kept the note
    assert "`first run`" in text and "`second run --only layers`" in text and "| layers 1-2 | 8 | 85.0 ± 0.0 |" in text
