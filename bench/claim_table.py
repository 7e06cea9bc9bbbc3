"""The seeds' claim measured head-on (issue #14, item 4): a domain LVM against what else a user could do.

    python -m bench.claim_table --domain runs/quickstart/probe/probe.json \\
        --ood runs/pretrain-levers/ood_skimage/probe_full/probe.json \\
        --finetune bench/results/finetune-levers-cpu.jsonl \\
        --current runs/quickstart/probe_full/probe.json \\
        --current-ood runs/pretrain-levers/ood_current/probe_full/probe.json

Rows, on the same class-balanced label subsets (``lvm probe``'s seeds) and scored on the Fashion-MNIST
test images no stage trained or chose on, in blocks of one pretraining recipe and read-out each:

- each ``--block LABEL DOMAIN OOD`` (first, in the order given): a domain LVM and its out-of-domain twin read
  the same way (e.g. ``lvm probe --mirror``), and where they were probed with ``--pixels both`` the same two
  with the raw pixels appended, a block of their own;
- with ``--current``: the current default recipe's checkpoint (its quickstart), linear probe, and with
  ``--current-ood`` the same recipe and step counts pretrained on scikit-image crops, probed alike; with
  ``--current-pixels`` / ``--current-ood-pixels`` the same two checkpoints probed with the raw pixels appended
  to their features (``lvm probe --pixels on``), a block of their own;
- domain LVM: tokenizer and LVM pretrained on Fashion-MNIST train (an earlier default quickstart), linear
  probe, and its LP-FT fine-tuning (with and without the head refit) where ``bench.finetune_levers``
  measured it, averaged over the label subsets run; its out-of-domain twin (``bench.pretrain_levers
  --levers ood_skimage`` + ``lvm probe``);
- where ``--domain`` / ``--ood`` were probed with ``--pixels both``, their rows with the raw pixels appended, a
  block of their own;
- supervised CNN from scratch on the same labels (``lvm probe --supervised``) and raw pixels.

The last column is the label fraction at which the domain LVM reaches each competitor's 100 %-labels
accuracy (linear in log-fraction between measured points; "not reached" if it never does): an
out-of-domain row against the domain rows of its own block (same recipe, same steps), a baseline against
the best domain row of any block. Results go to bench/results/claim-table-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvm.probe import MIRROR_SUFFIX, PIXELS_SUFFIX  # row-name endings: pixels appended, mirror-averaged

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", required=True, help="probe.json of the domain LVM (its quickstart's probe stage)")
    p.add_argument("--ood", required=True, help="probe.json of the out-of-domain LVM, with --baselines --supervised "
                                                "(else the baselines are --domain's)")
    p.add_argument("--finetune", default=str(RESULTS / "finetune-levers-cpu.jsonl"),
                   help="bench.finetune_levers rows (the 'lpft' and 'lpft+refit' ones are the domain LVM fine-tuned); "
                        "'' where none were run on --domain's checkpoint")
    p.add_argument("--domain-label", default="domain LVM (Fashion-MNIST)")
    p.add_argument("--ood-label", default="out-of-domain LVM (skimage crops)")
    p.add_argument("--block", nargs=3, action="append", default=[], metavar=("LABEL", "DOMAIN", "OOD"),
                   help="a block of its own above the others: probe.json of a domain LVM and of its out-of-domain "
                        "twin read the same way, LABEL saying how (repeatable)")
    p.add_argument("--current", default="",
                   help="probe.json of a later default recipe's checkpoint: a second block of rows")
    p.add_argument("--current-ood", default="",
                   help="probe.json of --current's recipe pretrained out of domain: the last column matches it "
                        "against --current's rows only")
    p.add_argument("--current-pixels", default="",
                   help="probe.json of --current's checkpoint probed with --pixels on (the raw pixels appended to its "
                        "features): a block of its own")
    p.add_argument("--current-ood-pixels", default="",
                   help="probe.json of --current-ood's checkpoint probed with --pixels on, matched against "
                        "--current-pixels' rows only")
    p.add_argument("--current-label", default="current default LVM (Fashion-MNIST)")
    p.add_argument("--current-ood-label", default="out-of-domain LVM, current default's recipe (skimage crops)")
    p.add_argument("--commands", nargs="*", default=[], help="the commands that made the inputs, for the table")
    p.add_argument("--note", action="append", default=[], help="a paragraph for the report (e.g. the findings); "
                                                               "none given: the report's notes are kept")
    p.add_argument("--out", default=str(RESULTS / "claim-table-cpu"))
    args = p.parse_args(argv)
    if args.current_ood and not args.current:
        p.error("--current-ood is the out-of-domain twin of --current: pass --current too")
    if args.current_ood_pixels and not args.current_pixels:
        p.error("--current-ood-pixels is the out-of-domain twin of --current-pixels: pass --current-pixels too")
    if args.current_pixels and not args.current:
        p.error("--current-pixels probes --current's checkpoint with --pixels on: pass --current too")
    return args


def curves(probe: dict, rename: dict[str, str], pixels: bool = False) -> dict[str, dict[float, tuple[float, float, int]]]:
    """``{row name: {fraction: (mean, std, runs)}}`` of a probe.json, for the features named in ``rename``: the
    LVM's own rows, or with ``pixels`` its rows with the raw pixels appended (``lvm probe --pixels on|both``)."""
    out: dict[str, dict] = {}
    for r in probe["rows"]:
        features = r["features"]
        key = next((name for prefix, name in rename.items() if features.startswith(prefix)), None)
        if key is None or features.removesuffix(MIRROR_SUFFIX).endswith(PIXELS_SUFFIX) != pixels:
            continue
        key = f"{key}, {r['method']}" if r["method"] not in ("linear", "supervised") else key
        out.setdefault(key, {})[float(r["fraction"])] = (r["acc_mean"], r.get("acc_std", 0.0), r.get("runs", 1))
    return out


def finetune_curves(ft_rows: list[dict]) -> dict[str, dict[float, tuple[float, float, int]]]:
    """LP-FT and LP-FT + refit curves ``{name: {fraction: (mean, std, runs)}}`` over the label subsets
    ``bench.finetune_levers`` ran, counted as that bench's own report counts them (``subset_runs``); std over
    subsets as lvm probe's rows (ddof 0)."""
    from bench.finetune_levers import subset_runs

    names = {"lpft": "LP-FT fine-tuning", "lpft+refit": "LP-FT fine-tuning + head refit"}
    out: dict[str, dict] = {}
    for (fraction, lever), accs in sorted(subset_runs(ft_rows).items()):
        if lever in names:
            out.setdefault(names[lever], {})[fraction] = (float(np.mean(accs)), float(np.std(accs)), len(accs))
    return out


def fraction_to_match(curve: dict[float, float], target: float) -> float | None:
    """Smallest label fraction where ``curve`` (fraction -> accuracy) reaches ``target``, interpolating
    linearly in log-fraction between measured points; None if no measured point reaches it."""
    points = sorted(curve.items())
    for i, (f, acc) in enumerate(points):
        if acc >= target:
            if i == 0:
                return f
            f0, a0 = points[i - 1]
            t = (target - a0) / (acc - a0)
            return math.exp(math.log(f0) + t * (math.log(f) - math.log(f0)))
    return None


@dataclass
class Row:
    """One table row: its curve, whether it is a domain LVM, an out-of-domain LVM or a baseline, and the
    block (pretraining recipe) it belongs to: an out-of-domain row is matched against its own block's
    domain rows, a baseline against the best domain row of every block."""

    curve: dict[float, tuple[float, float, int]]
    role: str  # "domain", "ood" or "baseline"
    block: str = ""


def table_rows(args: argparse.Namespace) -> dict[str, Row]:
    """Every row of the table from the inputs ``args`` names, in table order."""
    def probe(path: str) -> dict:
        return json.loads(Path(path).read_text())

    rows: dict[str, Row] = {}

    def add(curves_: dict, role: str, block: str = "") -> None:
        for name, curve in curves_.items():
            if name in rows:
                raise SystemExit(f"claim_table: two rows are named {name!r}; give the blocks distinct --*-label values.")
            rows[name] = Row(curve, role, block)

    for label, domain_path, ood_path in args.block:
        for pixels, suffix in ((False, ""), (True, PIXELS_SUFFIX)):
            for path, name, role in ((domain_path, "domain LVM", "domain"),
                                     (ood_path, "out-of-domain LVM (skimage crops)", "ood")):
                add(curves(probe(path), {"lvm": f"{name}, {label}, linear{suffix}"}, pixels=pixels), role,
                    label + suffix)
    if args.current:
        add(curves(probe(args.current), {"lvm": f"{args.current_label}, linear"}), "domain", "current")
        if args.current_ood:
            add(curves(probe(args.current_ood), {"lvm": f"{args.current_ood_label}, linear"}), "ood", "current")
        if args.current_pixels:  # the same checkpoints, the pixels appended to the features: a block of their own
            add(curves(probe(args.current_pixels), {"lvm": f"{args.current_label}, linear + pixels"}, pixels=True),
                "domain", "current + pixels")
            if args.current_ood_pixels:
                add(curves(probe(args.current_ood_pixels), {"lvm": f"{args.current_ood_label}, linear + pixels"},
                           pixels=True), "ood", "current + pixels")
    domain, ood = probe(args.domain), probe(args.ood)
    add(curves(domain, {"lvm": f"{args.domain_label}, linear"}), "domain", "domain")
    ft = [json.loads(line) for line in Path(args.finetune).read_text().splitlines() if line.strip()] \
        if args.finetune and Path(args.finetune).is_file() else []
    add({f"{args.domain_label}, {method}": curve for method, curve in finetune_curves(ft).items()}, "domain", "domain")
    add(curves(ood, {"lvm": f"{args.ood_label}, linear"}), "ood", "domain")
    # probed with --pixels both: the same two checkpoints with the pixels appended, a block of their own
    add(curves(domain, {"lvm": f"{args.domain_label}, linear + pixels"}, pixels=True), "domain", "domain + pixels")
    add(curves(ood, {"lvm": f"{args.ood_label}, linear + pixels"}, pixels=True), "ood", "domain + pixels")
    baselines = {"raw pixels": "raw pixels", "supervised": "supervised CNN"}  # --ood's, else --domain's
    add(curves(ood, baselines) or curves(domain, baselines), "baseline")
    return rows


def best_of(rows: dict[str, Row], block: str | None = None) -> dict[float, float]:
    """Per fraction, the best mean accuracy over the domain rows of ``block`` (None: of every block)."""
    curves_ = [r.curve for r in rows.values() if r.role == "domain" and block in (None, r.block)]
    fractions = sorted({f for c in curves_ for f in c})
    return {f: max(c[f][0] for c in curves_ if f in c) for f in fractions}


def main(argv=None) -> None:
    args = parse_args(argv)
    from bench.results_io import kept_notes, write_results
    from lvm.runtime import cpu_has_fast_bf16, cpu_model

    rows = table_rows(args)
    fractions = sorted({f for r in rows.values() for f in r.curve})
    best = best_of(rows)
    head = "| features / method | " + " | ".join(f"{100 * f:g} % labels" for f in fractions)
    lines = [
        "# The claim head-on: domain LVM vs out-of-domain LVM vs supervised CNN vs raw pixels (issue #14, item 4)", "",
        f"CPU: {cpu_model()}, AMX {'yes' if cpu_has_fast_bf16() else 'no'}. Fashion-MNIST test accuracy (%), mean ± "
        "std over the probe's 3 label subsets below 100 % (\"1 subset\" where only one was run); every stage trained "
        "and chose on Fashion-MNIST train images only. Last column: the label fraction at which the domain LVM reaches "
        "this row's 100 %-labels accuracy (an out-of-domain row: the domain LVM of the same recipe; a baseline: the "
        "best domain row).", "",
        head + " | domain LVM reaches this row's 100 % at |",
        "|---" * (len(fractions) + 2) + "|",
    ]
    table = {}
    for name, row in rows.items():
        cells = []
        for f in fractions:
            if f not in row.curve:
                cells.append("")
                continue
            mean, std, runs = row.curve[f]
            cell = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if runs > 1 else "")
            cells.append(cell + (" (1 subset)" if runs == 1 and f < 1 else ""))
        match = ""
        if row.role != "domain" and 1.0 in row.curve:
            against = best if row.role == "baseline" else best_of(rows, row.block)
            reached = fraction_to_match(against, row.curve[1.0][0])
            match = f"{100 * reached:.2g} % labels" if reached is not None else \
                f"not reached (domain best at 100 %: {100 * against.get(1.0, float('nan')):.1f})"
        table[name] = {"accuracy": {str(f): row.curve[f] for f in row.curve}, "role": row.role, "block": row.block,
                       "domain_matches_at": match}
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {match} |")
    notes = args.note or kept_notes(args.out)
    commands = list(dict.fromkeys(args.commands))  # a re-rendered table re-passes its commands: list each once
    for note in notes:
        lines += ["", note]
    if commands:
        lines += ["", "Commands:", "", *[f"- `{c}`" for c in commands]]
    write_results(args.out, {"cpu": cpu_model(), "rows": table, "domain_best": best,
                             "inputs": {"blocks": args.block, "domain": args.domain, "ood": args.ood,
                                        "finetune": args.finetune,
                                        "current": args.current, "current_ood": args.current_ood,
                                        "current_pixels": args.current_pixels,
                                        "current_ood_pixels": args.current_ood_pixels},
                             "commands": commands, "notes": notes}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
