"""Feature read-out levers for the linear probe (issue #14, item 3): which layers, which pooling.

    python -m bench.readout_levers --checkpoint runs/quickstart/lvm --fractions 0.01 0.1

One forward pass gives every layer's token states for the label subsets' images and the whole
Fashion-MNIST test set; then linear probes (the probes' L2 choice on a split of the subset) are fitted
on single layers, concatenations of layers and other poolings, each on the same class-balanced subsets
(seeds 0..k-1, as ``lvm probe``) and scored on the test set, which no choice here reads. Results go to
bench/results/readout-levers-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/quickstart/lvm")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cache", default="", help="token ids of train/test (.pt) as written by bench.finetune_levers")
    p.add_argument("--out", default=str(RESULTS / "readout-levers-cpu"))
    p.add_argument("--only", nargs="*", default=[], help="run only the read-outs whose name starts with one of these "
                                                         "(e.g. 'layers'); rows of --out's JSON not re-run are kept")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.data import SpecialTokens
    from lvm.probe import LinearProbe, _subset, extract_features, pool_tokens
    from lvm.runtime import cpu_has_fast_bf16, cpu_model
    from tokenizer.images import load_images

    from bench.finetune_levers import _encoded

    model, tok, ckpt = load_model_and_tokenizer(args.checkpoint, "")
    special = SpecialTokens(tok.vocab_size)
    train = load_images("fashion-mnist", "train", size=tok.config.image_size, channels=tok.config.channels)
    test = load_images("fashion-mnist", "test", size=tok.config.image_size, channels=tok.config.channels)
    train_ids, test_ids = _encoded(tok, train.images, test.images, args.cache)
    subsets = {(f, s): _subset(train.labels, f, s) for f in args.fractions for s in range(args.seeds)}
    rows_needed = np.unique(np.concatenate(list(subsets.values())))
    position = {int(r): i for i, r in enumerate(rows_needed)}
    layers = list(range(0, model.config.n_layer + 1))
    hw = tuple(train_ids.shape[1:])
    tic = time.time()
    tokens_tr = extract_features(model, train_ids[rows_needed], special, layers, "tokens")
    tokens_te = extract_features(model, test_ids, special, layers, "tokens")
    feature_s = time.time() - tic

    def pooled(states: dict, layer: int, pool: str, grid: int = 3) -> torch.Tensor:
        return pool_tokens(states[layer], pool, hw, grid)

    n = model.config.n_layer
    readouts = {f"layer {i}, grid 3x3": [(i, "grid", 3)] for i in layers}
    readouts |= {
        f"layer {n - 1}, grid 2x2": [(n - 1, "grid", 2)],
        f"layer {n - 1}, grid 4x4": [(n - 1, "grid", 4)],
        f"layer {n - 1}, mean": [(n - 1, "mean", 1)],
        f"layers {n - 2}-{n}, grid 3x3": [(i, "grid", 3) for i in range(n - 2, n + 1)],
        f"layers 2-{n}, grid 3x3": [(i, "grid", 3) for i in range(2, n + 1)],
        f"layers 0+{n - 1}, grid 3x3": [(0, "grid", 3), (n - 1, "grid", 3)],
    }
    if args.only:
        readouts = {k: v for k, v in readouts.items() if k.startswith(tuple(args.only))}
    y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    rows = []
    for name, parts in readouts.items():
        f_tr = torch.cat([pooled(tokens_tr, i, p, g) for i, p, g in parts], dim=1)
        f_te = torch.cat([pooled(tokens_te, i, p, g) for i, p, g in parts], dim=1)
        for frac in args.fractions:
            tic = time.time()
            accs = []
            for s in range(args.seeds):
                idx = [position[int(r)] for r in subsets[(frac, s)]]
                probe = LinearProbe.fit(f_tr[idx], y_train[subsets[(frac, s)]], seed=s)
                accs.append(probe.accuracy(f_te, y_test))
            row = {"readout": name, "fraction": frac, "dim": int(f_tr.shape[1]), "acc_mean": float(np.mean(accs)),
                   "acc_std": float(np.std(accs)), "seeds": args.seeds, "fit_seconds": round(time.time() - tic, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = (f"python -m bench.readout_levers --checkpoint {args.checkpoint} --fractions "
               f"{' '.join(map(str, args.fractions))} --seeds {args.seeds}"
               + (f" --only {' '.join(args.only)}" if args.only else ""))
    meta = {"checkpoint": str(ckpt), "cpu": cpu_model(), "amx": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
            "feature_seconds": round(feature_s, 1), "command": command}
    write_results(Path(args.out), meta, merged(Path(args.out), rows, meta), args.fractions)


def merged(out: Path, rows: list[dict], meta: dict) -> list[dict]:
    """``rows`` after the rows of ``out``.json that they do not re-run (same read-out and fraction), each row
    carrying the command that made it, so a partial run adds to the table instead of replacing it; the
    table's hand-written note (``meta["note"]``) is kept in ``meta`` too."""
    for r in rows:
        r["command"] = meta["command"]
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"rows": []}
    if old.get("meta", {}).get("note"):
        meta.setdefault("note", old["meta"]["note"])
    fresh = {(r["readout"], r["fraction"]) for r in rows}
    kept = [{"command": old.get("meta", {}).get("command", ""), **r} for r in old["rows"]
            if (r["readout"], r["fraction"]) not in fresh]
    return kept + rows


def write_results(out: Path, meta: dict, rows: list[dict], fractions: list[float]) -> None:
    """``out``.json (meta + rows) and ``out``.md (one line per read-out, one column per fraction)."""
    seeds = rows[0]["seeds"] if rows else 0
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    commands = list(dict.fromkeys(r.get("command", meta["command"]) for r in rows))
    lines = ["# Linear-probe read-out levers (issue #14, item 3)", "",
             "Commands: " + "; ".join(f"`{c}`" for c in commands), "",
             f"Checkpoint `{meta['checkpoint']}`; CPU: {meta['cpu']}, AMX {'yes' if meta['amx'] else 'no'}. "
             f"Test accuracy % on the whole Fashion-MNIST test set, mean ± std over {seeds} class-balanced label "
             "subsets (the probe's L2 chosen on a split of each subset). Layer 0 is the token embedding.", "",
             *([meta["note"], ""] if meta.get("note") else []),
             "| read-out | dim | " + " | ".join(f"{100 * f:g} % labels" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    for name in dict.fromkeys(r["readout"] for r in rows):
        cells = {r["fraction"]: r for r in rows if r["readout"] == name}
        dim = next(iter(cells.values()))["dim"]
        lines.append(f"| {name} | {dim} | " + " | ".join(
            f"{100 * cells[f]['acc_mean']:.1f} ± {100 * cells[f]['acc_std']:.1f}" if f in cells else "not run"
            for f in fractions) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
