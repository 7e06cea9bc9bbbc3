"""What a finer token grid costs per image, measured side by side in one run.

    python -m bench.grid_cost

For 28 px grey at 7x7 tokens (Fashion-MNIST's default layout) and 14x14 (``--grid 14``), 64 px RGB
at 8x8 (the default layout for 64 px) and 64 px RGB at 16x16 (``--grid 16``), times per image: the
tokenizer's encoder (what ``lvm tokenize`` pays), a training step of the ``small`` LVM (forward +
backward on packed sentences of the grid, per image it holds), and the LVM's forward at full depth
(what probe feature extraction and the classifier pay). Ratios against the 7x7 row are the result.
For the 28 px grids, the plan a 30-minute ``lvm quickstart`` on Fashion-MNIST makes on this machine
(its own ``measure_speeds`` and ``plan_probes``): the probe stage's predicted seconds, the labelled
images it can probe on, and the seconds left for pretraining. Results go to
``bench/results/grid-cost-cpu.{md,json}``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = [("28 px grey, 7x7", 28, 1, 0), ("28 px grey, 14x14", 28, 1, 14), ("64 px RGB, 8x8", 64, 3, 0),
           ("64 px RGB, 16x16", 64, 3, 16)]
PLAN_BUDGET_MIN = 30.0  # the quickstart's default budget


def measure(size: int, channels: int, grid: int, context: int = 512, rows: int = 8) -> dict:
    from lvm.config import LVMConfig
    from lvm.model import LVM
    from lvm.quickstart import _best_time as _best
    from tokenizer.model import Tokenizer, TokenizerConfig, auto_layout

    torch.manual_seed(0)
    patch, downsamplings = auto_layout(size, grid)
    tok = Tokenizer(TokenizerConfig(image_size=size, channels=channels, patch_size=patch,
                                    widths=(64,) * (downsamplings + 1))).eval()
    tokens = tok.grid[0] * tok.grid[1]
    sentence = tokens + 2
    per_row = max(1, context // sentence)
    images = torch.rand(256, channels, size, size)
    with torch.no_grad():
        encode_s = _best(lambda: tok.encode(images)) / 256
    model = LVM(LVMConfig.preset("small", vocab_size=1004, max_seq_len=per_row * sentence))
    ids = torch.randint(0, 1000, (rows, per_row * sentence))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(ids, ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_s = _best(step) / (rows * per_row)
    model.eval()
    prompts = torch.randint(0, 1000, (64, tokens + 1))
    with torch.no_grad():
        forward_s = _best(lambda: model.hidden_states(prompts, layers=[model.config.n_layer])) / 64
    return {"grid": list(tok.grid), "tokens_per_image": tokens, "patch_size": patch, "downsamplings": downsamplings,
            "encode_ms": round(1000 * encode_s, 3), "train_ms_per_image": round(1000 * train_s, 3),
            "forward_ms": round(1000 * forward_s, 3), "images_per_row": per_row}


def quickstart_plan(grid: int, minutes: float = PLAN_BUDGET_MIN) -> dict:
    """What ``lvm quickstart --grid grid`` on Fashion-MNIST would plan here: the probe stage's predicted
    seconds and labelled training images (a subsample when all would pass half the budget), and the
    seconds the two trained stages share (the LVM gets all but ``TOKENIZER_SHARE`` of them)."""
    from lvm.quickstart import TOKENIZER_SHARE, RunShape, measure_speeds, plan_probes, trained_seconds

    shape, total = RunShape(grid=grid), minutes * 60
    measured = measure_speeds("fp32", shape)
    probe_s = plan_probes(measured, shape, total)
    trained = trained_seconds(total, measured["tokenize_s"] + probe_s)
    return {"budget_s": total, "probe_estimate_s": round(probe_s, 1),
            "probe_train_images": measured.get("probe_train_images", shape.train),
            "pretrain_s": round(trained * (1 - TOKENIZER_SHARE), 1),
            "forward_images_per_s": measured["forward_images_per_s"]}


def main() -> None:
    from bench.results_io import write_results
    from lvm.runtime import cpu_has_fast_bf16, cpu_model

    rows = {name: measure(size, ch, grid) for name, size, ch, grid in LAYOUTS}
    plans = {name: quickstart_plan(grid) for name, size, _, grid in LAYOUTS if size == 28}
    base = rows[LAYOUTS[0][0]]
    result = {"cpu": cpu_model(), "amx": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
              "load_avg": os.getloadavg(), "precision": "fp32", "rows": rows, "quickstart_plans": plans}
    lines = ["# Cost per image vs token grid (fp32, `small` LVM, side by side in one run)", "",
             f"CPU: {result['cpu']}, AMX {'yes' if result['amx'] else 'no'}, {result['threads']} threads, "
             f"load average {result['load_avg'][0]:.1f}. Command: `python -m bench.grid_cost`. Ratios are to the "
             "7x7 row; the absolute times are this CPU's only.", "",
             "| layout | tokens | tokenizer encode (ms, x) | LVM train step per image (ms, x) | LVM forward (ms, x) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['tokens_per_image']} | {r['encode_ms']:.2f} ({r['encode_ms'] / base['encode_ms']:.1f}x) "
            f"| {r['train_ms_per_image']:.2f} ({r['train_ms_per_image'] / base['train_ms_per_image']:.1f}x) "
            f"| {r['forward_ms']:.2f} ({r['forward_ms'] / base['forward_ms']:.1f}x) |")
    lines += ["", f"A {PLAN_BUDGET_MIN:.0f}-minute `lvm quickstart` on Fashion-MNIST (60,000 labelled training images) as "
              "planned on this machine by the quickstart's own speed measurements:", "",
              "| layout | probe stage (s, predicted) | labelled images the probes fit on | pretraining (s) |",
              "|---|---|---|---|"]
    for name, plan in plans.items():
        lines.append(f"| {name} | {plan['probe_estimate_s']:.0f} | {plan['probe_train_images']:,} "
                     f"| {plan['pretrain_s']:.0f} |")
    write_results(RESULTS / "grid-cost-cpu", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
