"""bench.finetune_levers --report: rows, means over label subsets, and the hand-written findings kept."""
import json

from bench.finetune_levers import FINDINGS, write_report


def _row(lever, subset, acc):
    return {"lever": lever, "fraction": 0.1, "subset": subset, "n_labels": 6000, "test_acc": acc, "seconds": 1.0,
            "command": f"cmd {lever} {subset}", "checkpoint": "c", "layer": 5, "cpu": "x", "amx": False, "threads": 2}


def test_report_means_over_subsets_and_keeps_findings(tmp_path):
    jsonl = tmp_path / "levers.jsonl"
    rows = [_row("lpft", 0, 0.80), _row("lpft", 1, 0.84), _row("linear", 0, 0.83)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = jsonl.with_suffix(".md")
    md.write_text(f"old table\n\n{FINDINGS}\nLP-FT is the default.\n")
    text = write_report(jsonl).read_text()
    assert "old table" not in text and text.count(FINDINGS) == 1 and text.endswith("LP-FT is the default.\n")
    assert "| 10 % | lpft | 2 | 82.0 ± 2.0 |" in text  # mean ± std of the two subsets
    assert "| 10 % | linear |" not in text.split("Over label subsets")[1]  # one subset: no mean row


def test_a_refit_row_also_counts_as_its_lever_before_the_refit(tmp_path):
    jsonl = tmp_path / "levers.jsonl"
    rows = [_row("lpft", 0, 0.80), {**_row("lpft+refit", 1, 0.85), "test_acc_before_refit": 0.82},
            {**_row("lpft+refit", 2, 0.87), "test_acc_before_refit": 0.84}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(jsonl).read_text()
    assert "| 85.0 (82.0 before the refit) |" in text
    means = text.split("Over label subsets")[1]
    assert "| 10 % | lpft | 3 | 82.0 ± 1.6 |" in means and "| 10 % | lpft+refit | 2 | 86.0 ± 1.0 |" in means
