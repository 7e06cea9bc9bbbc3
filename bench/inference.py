"""Classifier inference on CPU: PyTorch eager vs torch.compile vs ONNX Runtime, side by side in one run.

    python3 -m bench.inference --model runs/classifier [--eval-source fashion-mnist --eval-split test]

For one bundle: its parameter count and size on disk; accuracy of PyTorch and ONNX Runtime on a
labelled evaluation set and their parity (top-1 agreement, largest probability difference); per-image
latency at batch 1 (p50/p99 over distinct images, one call each) and throughput at batch 64 for every
engine; and where eager time goes (tokenizer encoder + FSQ rounding vs transformer vs head). The
engines alternate in rounds so machine noise hits them alike. Writes
``bench/results/inference-cpu.{md,json}`` with the CPU model, its AMX flag and the load average.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.results_io import RESULTS, write_results
from lvm.classifier import Classifier
from lvm.data import image_rows
from lvm.runtime import cpu_has_fast_bf16, cpu_model



def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="classifier bundle folder")
    parser.add_argument("--eval-source", default="fashion-mnist", help="labelled images for accuracy and parity")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--eval-limit", type=int, default=0, help="at most this many evaluation images (0 = all)")
    parser.add_argument("--latency-images", type=int, default=300, help="batch-1 calls per engine and round")
    parser.add_argument("--batches", type=int, default=10, help="batch-64 calls per engine and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--out", default="", help="results stem (default bench/results/inference-cpu)")
    args = parser.parse_args(argv)

    from lvm.export import OnnxClassifier, compare_with_torch, export_onnx
    from tokenizer.images import load_images

    machine = machine_info()
    clf = Classifier.from_pretrained(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    tic = time.perf_counter()
    onnx_path = export_onnx(clf, tmp / "model.onnx")
    export_s = time.perf_counter() - tic
    ort = OnnxClassifier(onnx_path)
    facts = bundle_facts(clf, Path(args.model), onnx_path, export_s)

    data = load_images(args.eval_source, args.eval_split, size=clf.image_size, channels=clf.channels,
                       limit=args.eval_limit or None, progress=False)
    evaluation = {"source": data.source, "images": len(data)}
    if data.labels is not None:
        labels_t, probs_t = clf.predict(data.images, batch_size=256)
        evaluation["accuracy_torch"] = _accuracy(labels_t, data, clf.classes)
        _, probs_o = ort.predict(data.images, batch_size=256)
        evaluation["accuracy_onnx"] = _accuracy([ort.classes[i] for i in probs_o.argmax(1)], data, clf.classes)
        evaluation["parity"] = {"top1_agreement": float((probs_t.argmax(1) == probs_o.argmax(1)).mean()),
                                "max_abs_prob_diff": float(np.abs(probs_t - probs_o).max())}
    else:
        evaluation["parity"] = compare_with_torch(clf, ort, data.images)

    pixels = clf.preprocess(data.images[: max(args.latency_images, 64 * args.batches)])  # [N, C, H, W]
    engines = {"pytorch eager": eager(clf), "onnx runtime": lambda x: ort(x.numpy())}
    compile_s = None
    if not args.no_compile:
        engines["torch.compile"], compile_s = compiled(clf, pixels)
    speed = measure(engines, pixels, args.latency_images, args.batches, args.rounds)
    work = flops_per_image(clf, pixels[:1])
    peak = matmul_gflops()
    for s in speed.values():  # achieved rate at batch 64, against the matmul peak measured in this run
        s["batch64_gflops"] = round(s["batch64_images_per_s"] * work["total"] / 1e9, 1)
    result = {"machine": {**machine, "load_1min_end": round(os.getloadavg()[0], 2)}, "bundle": facts,
              "evaluation": evaluation, "work": {"mflop_per_image": work, "matmul_peak_gflops": peak},
              "speed": speed, "compile_s": compile_s, "breakdown": breakdown(clf, pixels), "args": vars(args)}
    write_results(Path(args.out) if args.out else RESULTS / f"inference-{device_slug()}", result, markdown(result))
    return result


# ---- engines -------------------------------------------------------------------------------------

def eager(clf: Classifier):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return clf(x)
    return run


def compiled(clf: Classifier, pixels: torch.Tensor):
    """torch.compile of the whole classifier (one graph per batch size), warmed on both measured shapes."""
    model = torch.compile(clf, dynamic=False)
    tic = time.perf_counter()
    with torch.inference_mode():
        for batch in (1, 64):
            model(pixels[:batch].clone())
    seconds = time.perf_counter() - tic

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run, round(seconds, 1)


def measure(engines: dict, pixels: torch.Tensor, latency_images: int, batches: int, rounds: int) -> dict:
    """Per engine: batch-1 latency p50/p99 over distinct images, and batch-64 throughput; rounds alternate engines."""
    ones: dict[str, list[float]] = {name: [] for name in engines}
    sixty_four: dict[str, list[float]] = {name: [] for name in engines}
    cycle = torch.arange(max(latency_images, 64 * batches)) % len(pixels)
    singles = [pixels[i : i + 1].clone() for i in cycle[:latency_images]]  # own storage: same guards every call
    blocks = [b.clone() for b in pixels[cycle[: 64 * batches]].split(64)]
    for fn in engines.values():  # warm-up: allocator, thread pools, lazy init
        for x in singles[:10]:
            fn(x)
        fn(blocks[0])
    for _ in range(rounds):
        for name, fn in engines.items():
            for x in singles:
                tic = time.perf_counter()
                fn(x)
                ones[name].append(time.perf_counter() - tic)
            for x in blocks:
                tic = time.perf_counter()
                fn(x)
                sixty_four[name].append(time.perf_counter() - tic)
    eager_p50 = float(np.percentile(ones["pytorch eager"], 50))
    eager_tp = 64 / statistics.median(sixty_four["pytorch eager"])
    out = {}
    for name in engines:
        p50 = float(np.percentile(ones[name], 50))
        tp = 64 / statistics.median(sixty_four[name])
        out[name] = {"batch1_p50_ms": round(1000 * p50, 3), "batch1_p99_ms": round(1000 * float(np.percentile(
            ones[name], 99)), 3), "batch1_speedup_vs_eager": round(eager_p50 / p50, 2),
            "batch64_images_per_s": round(tp, 1), "batch64_speedup_vs_eager": round(tp / eager_tp, 2),
            "batch1_calls": len(ones[name]), "batch64_calls": len(sixty_four[name])}
    return out


def breakdown(clf: Classifier, pixels: torch.Tensor, repeats: int = 50) -> dict:
    """Eager milliseconds per stage at batch 1 and 64: tokenizer (encoder + FSQ to ids), transformer, head."""
    out = {}
    with torch.inference_mode():
        for batch in (1, 64):
            x = pixels[:batch]
            ids = clf.token_ids(x)
            rows = image_rows(ids, clf.special)
            states = clf.lvm.hidden_states(rows, layers=[clf.layer])[0][:, 1:]
            stages = {
                "tokenizer encoder + FSQ": lambda: clf.token_ids(x),
                "transformer": lambda: clf.lvm.hidden_states(rows, layers=[clf.layer]),
                "head + softmax": lambda: clf.head(states).softmax(-1),
            }
            times = {}
            for name, fn in stages.items():
                fn()
                samples = []
                for _ in range(repeats if batch == 1 else max(repeats // 5, 5)):
                    tic = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - tic)
                times[name] = round(1000 * statistics.median(samples), 3)
            total = sum(times.values())
            out[f"batch{batch}"] = {name: {"ms": ms, "share": round(ms / total, 3)} for name, ms in times.items()}
    return out


# ---- facts ---------------------------------------------------------------------------------------

def flops_per_image(clf: Classifier, pixel: torch.Tensor) -> dict:
    """Matmul/conv FLOPs of one image by stage (torch's FLOP counter): the work every engine must do."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    total = count(lambda: clf(pixel))
    tokenizer = count(lambda: clf.token_ids(pixel))
    head = count(lambda: clf.head(clf.token_states(pixel))) - count(lambda: clf.token_states(pixel))
    return {"total": total, "tokenizer": tokenizer, "transformer": total - tokenizer - head, "head": head}


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """fp32 GFLOP/s of an n x n x n matmul on all torch threads: what this CPU can do at best, measured now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - tic)
    return round(2 * n**3 * repeats / best / 1e9, 1)


def bundle_facts(clf: Classifier, folder: Path, onnx_path: Path, export_s: float) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"path": str(folder), "bundle_id": clf.info.get("bundle_id"), "method": clf.info.get("method"),
            "layer": clf.layer, "classes": len(clf.classes), "image_size": clf.image_size, "channels": clf.channels,
            "params_run": clf.num_params(), "params_stored": sum(p.numel() for p in clf.parameters()),
            "bundle_bytes": sum(p.stat().st_size for p in files), "onnx_bytes": onnx_path.stat().st_size,
            "onnx_export_s": round(export_s, 1), "val_accuracy": clf.info.get("metrics", {}).get("val_accuracy")}


def machine_info() -> dict:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "amx": cpu_has_fast_bf16(), "torch": torch.__version__, "onnxruntime": ort_version,
            "python": platform.python_version(), "load_1min": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def device_slug() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _accuracy(predicted: list[str], data, classes: list[str]) -> float:
    names = data.class_names or [str(i) for i in range(int(data.labels.max()) + 1)]
    return float(np.mean([p == names[y] for p, y in zip(predicted, data.labels)]))


def work_line(w: dict) -> str:
    f, peak = w["mflop_per_image"], w["matmul_peak_gflops"]
    return (f"Work per image: {f['total'] / 1e6:.0f} MFLOP (tokenizer encoder {f['tokenizer'] / 1e6:.0f}, transformer "
            f"{f['transformer'] / 1e6:.0f}, head {f['head'] / 1e6:.2f}). This CPU's fp32 matmul rate, measured in the "
            f"same run (1024^3, all threads): {peak:.0f} GFLOP/s, so no engine can go below "
            f"{f['total'] / peak / 1e6:.2f} ms per image.")


def evaluation_line(e: dict, val_accuracy: float | None) -> str:
    line = f"{e['images']} images of `{e['source']}`"
    if "accuracy_torch" in e:
        line += (f": accuracy PyTorch **{100 * e['accuracy_torch']:.2f} %**, ONNX Runtime "
                 f"{100 * e['accuracy_onnx']:.2f} %")
    line += (f"; ONNX Runtime vs PyTorch: top-1 agreement {100 * e['parity']['top1_agreement']:.3f} %, largest "
             f"probability difference {e['parity']['max_abs_prob_diff']:.1e} (fp32).")
    if val_accuracy is not None:
        line += f" Validation accuracy recorded in the bundle (train side only): {100 * val_accuracy:.2f} %."
    return line


def markdown(r: dict) -> str:
    m, b, e = r["machine"], r["bundle"], r["evaluation"]
    params = b["params_run"]
    lines = [
        "# Classifier inference on CPU",
        "",
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), AMX bf16: "
        f"{'yes' if m['amx'] else 'no'} (all engines fp32); torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"1-min load {m['load_1min']} at the start, {m['load_1min_end']} at the end; {m['date']}.",
        "",
        f"Bundle `{b['path']}`: {b['method']} head on layer {b['layer']}, {b['classes']} classes, "
        f"{b['image_size']}x{b['image_size']}x{b['channels']} input. Parameters run: {params['total']:,} "
        f"(tokenizer encoder {params['tokenizer_encoder']:,}, transformer {params['lvm']:,}, head {params['head']:,}); "
        f"{b['params_stored']:,} stored with the tokenizer's decoder. Bundle {b['bundle_bytes'] / 2**20:.1f} MiB on "
        f"disk, ONNX graph {b['onnx_bytes'] / 2**20:.1f} MiB (exported in {b['onnx_export_s']} s).",
        "",
        "## Accuracy and ONNX parity",
        "",
        evaluation_line(e, b["val_accuracy"]),
        "",
        "## Speed",
        "",
        work_line(r["work"]),
        "",
        "| engine | batch 1 p50 ms | batch 1 p99 ms | vs eager (batch 1) | batch 64 images/s | vs eager (batch 64) "
        "| batch 64 GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["speed"].items():
        lines.append(f"| {name} | {s['batch1_p50_ms']:.2f} | {s['batch1_p99_ms']:.2f} | "
                     f"{s['batch1_speedup_vs_eager']:.2f}x | {s['batch64_images_per_s']:,.0f} | "
                     f"{s['batch64_speedup_vs_eager']:.2f}x | {s['batch64_gflops']:.0f} |")
    first = next(iter(r["speed"].values()))
    lines += ["", f"Batch 1: {first['batch1_calls']} calls per engine (distinct images, {r['args']['rounds']} rounds "
              f"alternating engines); batch 64: median of {first['batch64_calls']} calls."
              + (f" torch.compile warm-up (both shapes): {r['compile_s']} s." if r["compile_s"] else ""), "",
              "## Where eager time goes", "",
              "| stage | batch 1 ms | share | batch 64 ms | share |", "|---|---|---|---|---|"]
    for stage, one in r["breakdown"]["batch1"].items():
        many = r["breakdown"]["batch64"][stage]
        lines.append(f"| {stage} | {one['ms']:.3f} | {100 * one['share']:.0f} % | {many['ms']:.2f} | "
                     f"{100 * many['share']:.0f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
