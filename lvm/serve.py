"""``lvm serve``: a classifier bundle behind FastAPI + uvicorn.

    POST /predict   images as multipart files (any field name) or JSON {"images": ["<base64>", ...]}
                    -> {"predictions": [{"label", "probability", "probabilities": [K, in /info's class order]}]}
    GET  /health    -> {"status": "ok", ...}
    GET  /info      -> model, bundle id, method, layer, read-out layers, classes, preprocessing, limits

Bad input gets a 4xx answer naming the problem, never a dead server: 400 malformed request or no
image, 413 body / image count / image pixels over the limits, 415 content type or image mode not
accepted, 422 bytes that are not a decodable image. Concurrent requests are batched: one worker
thread runs the model on everything that arrived while it was busy (up to ``max_batch`` images), so
requests never wait for a timer and the CPU is not oversubscribed by parallel forward passes.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (``request: Request``)
# as objects, and Request is imported inside create_app (the deploy extra is optional).
import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lvm.classifier import Classifier, ImageTooLarge, UnsupportedImage, prepare_image
from lvm.export import DEPLOY_HINT, MissingDeployExtra
from lvm.runtime import ConfigError

BACKENDS = ("torch", "onnx")
JSON_FORM = '{"images": ["<base64>", ...]}'  # the JSON body /predict takes


@dataclass
class ServeConfig:
    """``lvm serve``: the classifier bundle over HTTP (FastAPI + uvicorn) with request limits."""

    model: str = "runs/classifier"  # classifier bundle folder (the --out of lvm classifier-train)
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000  # TCP port to listen on
    backend: str = "torch"  # torch (PyTorch eager) or onnx (exported on start, run in ONNX Runtime)
    max_body_mb: float = 8.0  # larger request bodies get 413
    max_images: int = 32  # images per request; more get 413
    max_pixels: int = 4096 * 4096  # per image, checked before it is decoded; more get 413
    max_batch: int = 64  # images the worker runs in one forward pass across concurrent requests
    log_level: str = "info"  # uvicorn's: critical, error, warning, info, debug

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")
        for name in ("max_body_mb", "max_images", "max_pixels", "max_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be > 0.")


def serve(cfg: ServeConfig) -> None:
    """The ``lvm serve`` entry point: blocks until the server is stopped (Ctrl-C)."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDeployExtra(f"uvicorn is not installed; it is part of the deploy extra: {DEPLOY_HINT}.") from None
    app = create_app(cfg)
    print(f"lvm serve: {cfg.model} on http://{cfg.host}:{cfg.port} (backend {cfg.backend})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


def create_app(cfg: ServeConfig, classifier: Classifier | None = None):
    """The FastAPI app for ``cfg`` (``classifier``: an already loaded bundle instead of ``cfg.model``)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError:
        raise MissingDeployExtra(f"fastapi is not installed; it is part of the deploy extra: {DEPLOY_HINT}.") from None

    clf = classifier or Classifier.from_pretrained(cfg.model)
    runner = _runner(clf, cfg.backend)
    batcher = Batcher(runner, cfg.max_batch)
    limits = {"max_body_bytes": int(cfg.max_body_mb * 2**20), "max_images": cfg.max_images,
              "max_pixels": cfg.max_pixels}
    info = {
        "model": str(clf.path or cfg.model), "bundle_id": clf.info.get("bundle_id", ""),
        "method": clf.info.get("method", ""), "layer": clf.layer,
        "readout_layers": list(clf.readout), "mirror": clf.mirror, "classes": clf.classes,
        "preprocessing": {"image_size": clf.image_size, "channels": clf.channels},
        "val_accuracy": clf.info.get("metrics", {}).get("val_accuracy"),
        "test_accuracy": clf.info.get("metrics", {}).get("test_accuracy"), "backend": cfg.backend, "limits": limits,
    }

    app = FastAPI(title="lvm classifier", version=str(info["bundle_id"]))
    app.add_middleware(BodyLimit, max_bytes=limits["max_body_bytes"])

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "bundle_id": info["bundle_id"]}

    @app.get("/info")
    def get_info() -> dict:
        return info

    @app.post("/predict")
    async def predict(request: Request):
        named = await _read_images(request, cfg.max_images)  # [(name, bytes)]
        arrays = await asyncio.to_thread(  # decoding a large image must not stall the event loop
            lambda: [prepare_image_bytes(data, name, clf.image_size, clf.channels, cfg.max_pixels)
                     for name, data in named])
        pixels = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)  # [N, C, H, W]
        probs = await asyncio.wrap_future(batcher.submit(pixels))
        return {"predictions": [
            {"name": name, "label": clf.classes[int(p.argmax())], "probability": float(p.max()),
             "probabilities": [round(float(v), 6) for v in p]} for (name, _), p in zip(named, probs)]}

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, err: RequestRejected):
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # the server answers 500 and keeps serving
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    app.state.batcher = batcher
    return app


def prepare_image_bytes(data: bytes, name: str, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[size, size, channels]``, or ``RequestRejected`` naming the image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return prepare_image(img, size, channels, max_pixels)
    except (ImageTooLarge, Image.DecompressionBombError) as err:
        raise RequestRejected(413, f"image {name!r}: {err}") from None
    except UnsupportedImage as err:
        raise RequestRejected(415, f"image {name!r}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RequestRejected(422, f"image {name!r}: not a decodable image ({type(err).__name__}: {err}); send PNG, "
                                   "JPEG, BMP, GIF, TIFF or WebP bytes.") from None


class RequestRejected(Exception):
    """A request the server answers with a 4xx ``status`` and ``detail`` (raised anywhere while it is read)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def _read_images(request, max_images: int) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` per image from a multipart form or a JSON body of base64 strings."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
        except RequestRejected:
            raise
        except Exception as err:  # starlette's parser: limits exceeded or a broken body
            message = str(getattr(err, "detail", err))
            status = 413 if "maximum number" in message.lower() or "too many" in message.lower() else 400
            raise RequestRejected(status, f"cannot read the multipart body: {message}") from None
        files = [(v.filename or k, v) for k, v in form.multi_items() if not isinstance(v, str)]  # uploads
        _check_count(len(files), max_images)
        return [(name, await f.read()) for name, f in files]
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestRejected(400, f"the body is not valid JSON ({err}); send {JSON_FORM}.") from None
        items = body.get("images", [body["image"]] if "image" in body else None) if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise RequestRejected(400, f"JSON must be {JSON_FORM} (or {{\"image\": \"<base64>\"}}).")
        _check_count(len(items), max_images)
        out = []
        for i, text in enumerate(items):
            try:
                out.append((f"images[{i}]", base64.b64decode(text.split(",", 1)[-1], validate=True)))
            except (binascii.Error, ValueError):
                raise RequestRejected(400, f"images[{i}] is not valid base64.") from None
        return out
    raise RequestRejected(415, f"content type {kind or 'none'!r} is not accepted; send multipart/form-data files or "
                               f"application/json {JSON_FORM}.")


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise RequestRejected(400, "no image in the request; send one or more files, or {\"images\": [...]}.")
    if count > max_images:
        raise RequestRejected(413, f"{count} images in one request; the limit is {max_images}. Split the request.")


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, from its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, {"detail": self._message(int(length))})
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestRejected(413, self._message(received))
            return message

        return await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return f"request body of {size} bytes is over the limit of {self.max_bytes}; send fewer or smaller images."


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class Batcher:
    """One worker thread runs ``runner`` on the images of every request queued while it was busy.

    ``submit`` returns a future of the probabilities of that request's images. Nothing waits for a
    batch to fill: a lone request runs at once, and under load the batch grows to what arrived.
    """

    def __init__(self, runner, max_batch: int) -> None:
        self.runner, self.max_batch = runner, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="lvm-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, pixels: np.ndarray) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((pixels, future))
        return future

    def _work(self) -> None:
        while True:
            jobs = [self.queue.get()]
            count = len(jobs[0][0])
            while count < self.max_batch:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                count += len(job[0])
            try:
                probs = self.runner(np.concatenate([pixels for pixels, _ in jobs]))
            except Exception as err:  # reported to each waiting request as a 500; the worker lives on
                for _, future in jobs:
                    future.set_exception(err)
                continue
            start = 0
            for pixels, future in jobs:
                future.set_result(probs[start : start + len(pixels)])
                start += len(pixels)


def _runner(clf: Classifier, backend: str):
    """``float32 [N, C, H, W] -> probabilities [N, K]`` on the chosen backend."""
    if backend == "onnx":
        import tempfile

        from lvm.export import OnnxClassifier, export_onnx

        folder = Path(tempfile.mkdtemp(prefix="lvm-serve-"))
        return OnnxClassifier(export_onnx(clf, folder / "model.onnx"))

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        return clf(torch.from_numpy(pixels)).numpy()

    return run
