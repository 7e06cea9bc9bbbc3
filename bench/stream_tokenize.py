"""Peak memory of ``lvm tokenize`` on a folder larger than it should hold: is it flat in the image count?

    python -m bench.stream_tokenize --images 100000 --size 128 --dir /tmp/stream-imgs

Writes ``--images`` generated RGB PNG files (2,000 drawn images of smooth blobs and stripes, which
compress like photographs rather than noise, and hard links to them) into ``DIR/first/`` (the first tenth) and ``DIR/rest/``, saves an untrained
tokenizer for that size (its speed does not depend on its weights), then runs ``lvm tokenize`` as a
child process on the first tenth and on everything, and reports each run's peak resident memory
(``ru_maxrss`` of the child) and images/s. Results go to ``bench/results/stream-tokenize-cpu.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bench.results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def make_images(root: Path, count: int, size: int, distinct: int = 2000, seed: int = 0) -> None:
    """``count`` RGB PNG files of which ``distinct`` are drawn and the rest are hard links to them
    (every file is still opened and decoded; writing 100k PNGs would take most of an hour on 2 cores).
    An existing folder with the right count is reused."""
    first = max(1, count // 10)
    done = root / f"done-{count}-{size}"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    made: list[Path] = []
    for i in tqdm(range(count), desc="writing PNGs", unit="img", mininterval=5):
        sub = root / ("first" if i < first else "rest") / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        if i >= distinct:
            os.link(made[i % distinct], sub / f"{i:06d}.png")
            continue
        cx, cy, r = rng.random(3) * [1, 1, 0.4] + [0, 0, 0.1]
        freq, phase = rng.integers(2, 12), rng.random() * 6.3
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(phase) + yy * np.sin(phase)))
        colour = rng.random((3, 2))
        img = np.stack([colour[c, 0] * blob + colour[c, 1] * stripes * (1 - blob) for c in range(3)], -1)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(sub / f"{i:06d}.png")
        made.append(sub / f"{i:06d}.png")
    done.touch()


def run_tokenize(source: Path, tokenizer: Path, out: Path) -> dict:
    """``lvm tokenize`` in a child process; its peak RSS from the kernel's accounting."""
    cmd = [sys.executable, "-m", "lvm.cli", "tokenize", "--source", str(source), "--split", "all",
           "--tokenizer", str(tokenizer), "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    count = json.loads((out / "meta.json").read_text())["count"]
    return {"images": count, "seconds": round(seconds, 1), "images_per_s": round(count / seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dir", default="/tmp/stream-imgs")
    args = parser.parse_args()

    import torch

    from lvm.runtime import cpu_has_fast_bf16, cpu_model
    from tokenizer.model import Tokenizer, TokenizerConfig, auto_layout

    root = Path(args.dir)
    make_images(root, args.images, args.size)
    patch, downsamplings = auto_layout(args.size)
    torch.manual_seed(0)
    tok_dir = root / "tokenizer"
    Tokenizer(TokenizerConfig(image_size=args.size, channels=3, patch_size=patch,
                              widths=(64,) * (downsamplings + 1))).save_pretrained(tok_dir)
    runs = {
        "first tenth": run_tokenize(root / "first", tok_dir, root / "tokens-first"),
        "all": run_tokenize(root, tok_dir, root / "tokens-all"),
    }
    cpu = cpu_model()
    result = {"cpu": cpu, "amx": cpu_has_fast_bf16(), "threads": torch.get_num_threads(), "size": args.size,
              "load_avg_at_end": os.getloadavg(), "runs": runs,
              "grid": list(TokenizerConfig(image_size=args.size, patch_size=patch,
                                           widths=(64,) * (downsamplings + 1)).grid)}
    lines = [
        "# Streaming `lvm tokenize`: peak memory vs image count",
        "",
        f"CPU: {cpu}, AMX {'yes' if result['amx'] else 'no'}, {result['threads']} torch threads; generated "
        f"{args.size}x{args.size} RGB PNGs, an untrained tokenizer of the default layout "
        f"({result['grid'][0]}x{result['grid'][1]} tokens). Command: `python -m bench.stream_tokenize "
        f"--images {args.images} --size {args.size}`. Load average at the end: "
        f"{', '.join(f'{v:.1f}' for v in result['load_avg_at_end'])}.",
        "",
        "| run | images | peak RSS (MiB) | images/s | seconds |",
        "|---|---|---|---|---|",
        *[f"| {name} | {r['images']:,} | {r['peak_rss_mib']:,.0f} | {r['images_per_s']:,.0f} | {r['seconds']} |"
          for name, r in runs.items()],
        "",
        f"Raw pixels of all {args.images:,} images: {args.images * args.size * args.size * 3 / 2**30:.1f} GiB.",
    ]
    write_results(RESULTS / "stream-tokenize-cpu", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
