"""Fine-tuning levers, one change at a time, on one checkpoint and the same label subsets (issue #14, item 2).

    python -m bench.finetune_levers --checkpoint runs/quickstart/lvm --fraction 0.01 --levers base long views4 ...

Every row fine-tunes the same LVM layer on the same class-balanced label subset (seed 0, the
probes' ``_subset``) and is scored once on the whole Fashion-MNIST test set, which no choice here
reads: layer from the probe's sweep on training images, best weights from a validation part of the
subset. ``base`` is the recipe before the levers (attentive head, flipped view, 10-epoch cap);
``long`` lifts the epoch cap to the step budget; every other lever is ``long`` plus one change.
The linear probe and the supervised CNN on the same subset are the references. Rows are appended
to ``--out`` (JSONL) as they finish, so an interrupted run keeps what it measured; ``--report``
turns the JSONL into bench/results/finetune-levers-cpu.md.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"

# lever -> (HeadTrainConfig overrides, fine_tune keyword overrides); applied on top of ``long``
LEVERS: dict[str, tuple[dict, dict]] = {
    "long": ({}, {}),
    "views4": ({}, {"views": 4}),
    "lpft": ({}, {"init": "probe"}),
    "layer_decay": ({"layer_decay": 0.75}, {}),
    "top2": ({"train_blocks": 2}, {}),
    "mixup": ({"mixup": 0.4}, {}),
    "ema": ({"ema": 0.98}, {}),
    "no_smoothing": ({"label_smoothing": 0.0}, {}),
    "backbone_lr_0.3": ({"backbone_lr_scale": 0.3}, {}),
    "uniform_lr_1e-4": ({"lr": 1e-4, "backbone_lr_scale": 1.0}, {}),  # head and LVM alike, small (LP-FT's usual)
    "refit": ({}, {"refit": True}),  # the head refitted on every labelled row; the row also keeps the score before
}
REFERENCES = ("linear", "supervised")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/quickstart/lvm")
    p.add_argument("--layer", type=int, default=0, help="0: the layer the checkpoint's probe run chose")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--subset", type=int, default=0, help="which class-balanced label subset (lvm probe's seed); "
                                                         "also the seed of every fit")
    p.add_argument("--steps", type=int, default=0, help="step budget of every lever but base (0: 120 at <= 1 %%, "
                                                        "else 300)")
    p.add_argument("--levers", nargs="*", default=["linear", "supervised", "base", *LEVERS])
    p.add_argument("--combine", nargs="*", default=[], help="one more row: these levers together")
    p.add_argument("--on", nargs="*", default=[], help="levers every --levers row adds its change to (e.g. lpft views4)")
    p.add_argument("--cache", default="", help="token ids of train/test (.pt), written on first use")
    p.add_argument("--out", default=str(RESULTS / "finetune-levers-cpu.jsonl"))
    p.add_argument("--report", action="store_true", help="only write the Markdown table from --out")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        write_report(Path(args.out))
        return
    from lvm.attentive import HeadTrainConfig, accuracy, fine_tune, refit_linear_head
    from lvm.augment import token_views
    from lvm.checkpoint import load_model_and_tokenizer
    from lvm.data import SpecialTokens
    from lvm.probe import LinearProbe, _subset, extract_features
    from lvm.runtime import cpu_model, cpu_has_fast_bf16
    from tokenizer.images import load_images

    torch.manual_seed(0)
    model, tok, ckpt = load_model_and_tokenizer(args.checkpoint, "")
    special = SpecialTokens(tok.vocab_size)
    layer = args.layer or _probe_layer(Path(args.checkpoint))
    train = load_images("fashion-mnist", "train", size=tok.config.image_size, channels=tok.config.channels)
    test = load_images("fashion-mnist", "test", size=tok.config.image_size, channels=tok.config.channels)
    train_ids, test_ids = _encoded(tok, train.images, test.images, args.cache)
    idx = _subset(train.labels, args.fraction, args.subset)
    ids, y = train_ids[idx], torch.from_numpy(train.labels[idx]).long()
    test_flat, y_test = test_ids.reshape(len(test_ids), -1), torch.from_numpy(test.labels).long()
    steps = args.steps or (120 if args.fraction <= 0.01 else 300)
    hw = tuple(train_ids.shape[1:])
    base = HeadTrainConfig(epochs=10, max_steps=300, batch_size=128, lr=1e-3, seed=args.subset)
    long = replace(base, epochs=10_000, max_steps=steps)
    machine = {"cpu": cpu_model(), "amx": cpu_has_fast_bf16(), "threads": torch.get_num_threads()}
    common = {"checkpoint": str(ckpt), "layer": layer, "fraction": args.fraction, "subset": args.subset,
              "n_labels": len(idx), **machine}
    plan = [(name, [name]) if name in (*REFERENCES, "base") or not args.on else ("+".join([*args.on, name]), [*args.on, name])
            for name in args.levers]
    plan += [("+".join(args.combine), args.combine)] if args.combine else []
    for name, parts in plan:
        tic = time.time()
        row = {"lever": name, **common}
        if name == "linear":
            f_tr = extract_features(model, ids, special, layer, "grid", 3)
            f_te = extract_features(model, test_ids, special, layer, "grid", 3)
            row["test_acc"] = LinearProbe.fit(f_tr, y, seed=args.subset).accuracy(f_te, y_test)
        elif name == "supervised":
            from lvm.supervised import SupervisedConfig, evaluate, fit_supervised, to_nchw

            cfg = SupervisedConfig(epochs=10_000, max_steps=steps, seed=args.subset)
            cnn, val = fit_supervised(to_nchw(train.images[idx]), y, cfg)
            row.update(test_acc=evaluate(cnn, to_nchw(test.images), y_test)[0], val_acc=val, steps=steps)
        else:
            cfg_over, ft_over = {}, {}
            for part in parts:
                if part != "base":
                    cfg_over.update(LEVERS[part][0])
                    ft_over.update(LEVERS[part][1])
            cfg = replace(base if parts == ["base"] else long, **cfg_over)
            n_views, refit = ft_over.pop("views", 0), ft_over.pop("refit", False)
            views = token_views(tok, train.images[idx], n_views, seed=args.subset)
            clf, val = fine_tune(model, ids.reshape(len(ids), -1), y, layer, special, cfg, views=views, hw=hw,
                                 **ft_over)
            if refit:  # the same fine-tuned backbone scored with its own head, then with the refitted one
                row["test_acc_before_refit"] = accuracy(clf, test_flat, y_test)
                refit_linear_head(clf, ids.reshape(len(ids), -1), y, hw, 3, cfg)
            row.update(test_acc=accuracy(clf, test_flat, y_test), val_acc=val, config=cfg.__dict__ | ft_over,
                       views=n_views or "flip")
        row["seconds"] = round(time.time() - tic, 1)
        what = (f"--levers {name}" if len(parts) == 1 else f"--on {' '.join(args.on)} --levers {parts[-1]}"
                if args.on and parts[:-1] == args.on else f"--levers --combine {' '.join(parts)}")
        subset = f" --subset {args.subset}" if args.subset else ""
        row["command"] = (f"python -m bench.finetune_levers --checkpoint {args.checkpoint} --fraction {args.fraction}"
                          f"{subset} --steps {steps} {what}")
        print(json.dumps({k: row[k] for k in ("lever", "fraction", "test_acc", "seconds")}), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _probe_layer(checkpoint: Path) -> int:
    """The layer the quickstart's probe chose (on training images) for this run, else the deepest but one."""
    for probe_json in (checkpoint.parent / "probe" / "probe.json", checkpoint / "probe" / "probe.json"):
        if probe_json.exists():
            sweep = json.loads(probe_json.read_text())["layer_sweep"]["lvm"]
            return int(max(sweep, key=sweep.get))
    raise SystemExit(f"no probe.json beside {checkpoint}; pass --layer.")


def _encoded(tok, train_images: np.ndarray, test_images: np.ndarray, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    if cache and Path(cache).exists():
        saved = torch.load(cache)
        return saved["train"], saved["test"]
    train_ids, test_ids = tok.encode(train_images), tok.encode(test_images)
    if cache:
        torch.save({"train": train_ids, "test": test_ids}, cache)
    return train_ids, test_ids


FINDINGS = "## Findings"  # the report's hand-written part starts here; --report keeps it


def subset_runs(rows: list[dict]) -> dict[tuple[float, str], list[float]]:
    """``{(fraction, lever): test accuracies}``, one per label subset (the last run of each lever and subset). A
    ``+refit`` row's score before its refit is the lever without ``refit`` (the same seeded fine-tuning run),
    unless that lever has a row of its own for the subset."""
    last: dict[tuple, float] = {}
    for r in rows:
        last[(r["fraction"], r["lever"], r.get("subset", 0))] = r["test_acc"]
        if r.get("test_acc_before_refit") is not None:
            without = "+".join(p for p in r["lever"].split("+") if p != "refit") or "long"
            last.setdefault((r["fraction"], without, r.get("subset", 0)), r["test_acc_before_refit"])
    groups: dict[tuple, list[float]] = {}
    for (fraction, lever, _), acc in last.items():
        groups.setdefault((float(fraction), lever), []).append(acc)
    return groups


def _subset_means(rows: list[dict]) -> list[str]:
    """Mean ± std of the rows run on more than one label subset."""
    multi = {k: v for k, v in subset_runs(rows).items() if len(v) > 1}
    if not multi:
        return []
    out = ["", "Over label subsets:", "", "| fraction | row | subsets | test acc % (mean ± std) |", "|---|---|---|---|"]
    for (fraction, lever), accs in sorted(multi.items()):
        out.append(f"| {100 * fraction:g} % | {lever} | {len(accs)} | {100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f} |")
    return out


def write_report(jsonl: Path) -> Path:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    lines = ["# Fine-tuning levers (issue #14, item 2)", "",
             "One checkpoint, one layer, class-balanced label subsets (the `subset` column: lvm probe's seeds), the whole "
             "Fashion-MNIST test set scored once per row. `base` is the recipe before these levers (attentive "
             "head, flipped view, 10-epoch cap); every other row is `long` (the epoch cap lifted to the step "
             "budget) plus one change; `linear` (probe on the frozen features) and `supervised` (the small CNN "
             "at the same step budget) are the references. On one subset, differences under ~1 point are noise.", ""]
    if rows:
        r = rows[0]
        lines += [f"Checkpoint `{r['checkpoint']}`, layer {r['layer']}; CPU: {r['cpu']}, AMX {'yes' if r['amx'] else 'no'}, "
                  f"{r['threads']} threads.", ""]
    lines += ["| fraction | labels | subset | row | test acc % | val acc % | seconds | command |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = f"{100 * r['val_acc']:.1f}" if r.get("val_acc") is not None else ""
        before = (f" ({100 * r['test_acc_before_refit']:.1f} before the refit)"
                  if r.get("test_acc_before_refit") is not None else "")
        lines.append(f"| {100 * r['fraction']:g} % | {r['n_labels']} | {r.get('subset', 0)} | {r['lever']} "
                     f"| {100 * r['test_acc']:.1f}{before} | {val} | {r['seconds']} | `{r['command']}` |")
    lines += _subset_means(rows)
    out = jsonl.with_suffix(".md")
    notes = out.read_text().partition(FINDINGS)[2] if out.exists() else ""  # written by hand: kept
    out.write_text("\n".join(lines) + "\n" + (f"\n{FINDINGS}{notes}" if notes else ""))
    return out


if __name__ == "__main__":
    main()
