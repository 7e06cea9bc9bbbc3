"""What a finer token grid costs per image, measured side by side in one run.

    python -m bench.grid_cost

For 28 px grey (7x7 tokens, Fashion-MNIST's layout), 64 px RGB at 8x8 (the default layout for
64 px) and 64 px RGB at 16x16 (``--grid 16``), times per image: the tokenizer's encoder (what
``lvm tokenize`` pays), a training step of the ``small`` LVM (forward + backward on packed sentences
of the grid, per image it holds), and the LVM's forward at full depth (what probe feature extraction
pays). Ratios against the 7x7 row are the result; results go to ``bench/results/grid-cost-cpu.{md,json}``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = [("28 px grey, 7x7", 28, 1, 0), ("64 px RGB, 8x8", 64, 3, 0), ("64 px RGB, 16x16", 64, 3, 16)]


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


def main() -> None:
    from bench.results_io import write_results
    from lvm.runtime import cpu_has_fast_bf16, cpu_model

    rows = {name: measure(size, ch, grid) for name, size, ch, grid in LAYOUTS}
    base = rows[LAYOUTS[0][0]]
    result = {"cpu": cpu_model(), "amx": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
              "load_avg": os.getloadavg(), "precision": "fp32", "rows": rows}
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
    write_results(RESULTS / "grid-cost-cpu", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
