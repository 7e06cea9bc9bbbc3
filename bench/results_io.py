"""Where benchmark scripts put their results, and how: ``<stem>.json`` (every figure, for diffing and
plots) beside ``<stem>.md`` (the table the README quotes), written together so the two never disagree."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(stem: str | Path, result: dict, markdown: str) -> Path:
    """Write ``stem.json`` and ``stem.md`` (creating the folder) and print the Markdown; returns the stem."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    return stem


def kept_notes(stem: str | Path) -> list[str]:
    """The hand-written ``notes`` of the results already at ``stem``.json: a report regenerated without new
    notes keeps them rather than wiping the findings."""
    path = Path(stem).with_suffix(".json")
    return json.loads(path.read_text()).get("notes", []) if path.exists() else []
