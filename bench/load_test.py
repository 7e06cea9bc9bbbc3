"""Bounded load test of `lvm serve`: N requests at a fixed concurrency, then it stops and reports.

    python3 -m bench.load_test --model runs/classifier     # starts `lvm serve` per backend (torch, onnx) on 127.0.0.1
    python3 -m bench.load_test --url http://127.0.0.1:8000 --requests 200

Each request POSTs one PNG (multipart) to /predict, cycling over images of ``--images``. The run
ends after ``--requests`` requests or ``--max-seconds``, whichever comes first. Reports client-side
latency p50/p90/p99, throughput and errors (non-200 answers and failed connections) to
``bench/results/inference-serve-<device>.{md,json}``.
"""
from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.results_io import RESULTS, write_results


def run_load_test(url: str, payloads: list[bytes], requests: int = 2000, concurrency: int = 8,
                  timeout_s: float = 600.0, request_timeout_s: float = 30.0) -> dict:
    """``requests`` POSTs of one image each from ``concurrency`` threads; returns latency, throughput and errors."""
    import httpx

    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: Counter = Counter()
    deadline = time.perf_counter() + timeout_s

    def worker() -> None:
        nonlocal issued
        with httpx.Client(base_url=url, timeout=request_timeout_s) as client:
            while True:
                with lock:
                    if issued >= requests or time.perf_counter() > deadline:
                        return
                    i = issued
                    issued += 1
                body = payloads[i % len(payloads)]
                tic = time.perf_counter()
                try:
                    answer = client.post("/predict", files=[("files", (f"{i}.png", body, "image/png"))])
                    status = answer.status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                elapsed = time.perf_counter() - tic
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors[str(status)] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "url": url, "requests": issued, "ok": len(latencies), "errors": sum(errors.values()),
        "errors_by_kind": dict(errors), "concurrency": concurrency, "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": {k: round(float(v), 2) for k, v in {
            "p50": np.percentile(ms, 50), "p90": np.percentile(ms, 90), "p99": np.percentile(ms, 99),
            "mean": ms.mean(), "max": ms.max()}.items()},
        "stopped_by_deadline": issued < requests,
    }


def png_payloads(source: str, split: str, size: int, channels: int, count: int = 64) -> list[bytes]:
    """``count`` images of a source as PNG bytes, at the bundle's size (what a client would send)."""
    from PIL import Image

    from tokenizer.images import load_images

    images = load_images(source, split, size=size, channels=channels, limit=count, progress=False).images
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def start_server(model: str, backend: str, port: int, wait_s: float = 180.0) -> subprocess.Popen:
    """``lvm serve`` in a child process on 127.0.0.1, returned once /health answers."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "lvm.cli", "serve", "--model", model, "--port", str(port),
                             "--backend", backend, "--log-level", "warning"])
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lvm serve exited with status {proc.returncode} before answering")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"lvm serve did not answer /health within {wait_s:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    from bench.inference import device_slug, machine_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="bundle to serve (starts `lvm serve` on 127.0.0.1 per backend)")
    parser.add_argument("--url", default="", help="an already running server instead of --model")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"],
                        help="with --model: one run per serving backend")
    parser.add_argument("--images", default="fashion-mnist", help="image source the requests send")
    parser.add_argument("--split", default="test")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per run")
    parser.add_argument("--out", default="", help="results stem (default bench/results/inference-serve-<device>)")
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.url):
        parser.error("pass exactly one of --model (start a server) or --url (use a running one)")

    runs = []
    for backend in args.backends if args.model else [None]:
        runs.append(_one_run(args, backend))
    result = {"machine": machine_info(), "runs": runs}
    write_results(Path(args.out) if args.out else RESULTS / f"inference-serve-{device_slug()}", result,
                  markdown(result))
    return result


def _one_run(args, backend: str | None) -> dict:
    """Start the server for ``backend`` (or use ``args.url``), load-test it, stop it."""
    import httpx

    from bench.inference import machine_info

    proc = None
    if backend is not None:
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = start_server(args.model, backend, port)
        url = f"http://127.0.0.1:{port}"
    else:
        url = args.url.rstrip("/")
    try:
        info = httpx.get(f"{url}/info", timeout=10).json()
        size, channels = info["preprocessing"]["image_size"], info["preprocessing"]["channels"]
        payloads = png_payloads(args.images, args.split, size, channels)
        load_before = machine_info()["load_1min"]
        report = run_load_test(url, payloads, args.requests, args.concurrency, args.max_seconds)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"server": {k: info.get(k) for k in ("model", "bundle_id", "method", "layer", "backend", "limits")},
            "images": f"{args.images}:{args.split} ({len(payloads)} PNGs, one per request)",
            "load_1min_before": load_before, **report}


def markdown(result: dict) -> str:
    m = result["machine"]
    first = result["runs"][0]
    lines = [
        "# `lvm serve` load test",
        "",
        f"{m['cpu']} ({m['cores']} cores, AMX: {'yes' if m['amx'] else 'no'}), torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, {m['date']}. Bundle `{first['server']['model']}` ({first['server']['method']}, layer "
        f"{first['server']['layer']}). Client and server share the machine and talk over 127.0.0.1; every request "
        f"POSTs one PNG ({first['images']}) to /predict as multipart; concurrent requests are batched by the server.",
        "",
        "| backend | requests | concurrency | ok | errors | wall s | req/s | p50 ms | p90 ms | p99 ms | max ms | "
        "1-min load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lat = r["latency_ms"]
        errors = f"{r['errors']} {r['errors_by_kind']}" if r["errors"] else "0"
        lines.append(f"| {r['server']['backend']} | {r['requests']} | {r['concurrency']} | {r['ok']} | {errors} | "
                     f"{r['wall_s']} | {r['throughput_rps']} | {lat['p50']} | {lat['p90']} | {lat['p99']} | "
                     f"{lat['max']} | {r['load_1min_before']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
