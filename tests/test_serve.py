"""`lvm serve`: valid requests answer what the classifier predicts; bad ones get the right 4xx and the server keeps
serving; one real uvicorn socket on 127.0.0.1; the bounded load test runs against it."""
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")
pytest.importorskip("httpx", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")
pytest.importorskip("python_multipart", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")
uvicorn = pytest.importorskip("uvicorn", reason="the deploy extra is not installed: pip install 'lvm-toolkit[deploy]'")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lvm import Classifier  # noqa: E402
from lvm.classifier_train import ClassifierTrainConfig, classifier_train  # noqa: E402
from lvm.serve import ServeConfig, create_app  # noqa: E402

LIMITS = dict(max_images=4, max_body_mb=0.05, max_pixels=128 * 128)


@pytest.fixture(scope="module")
def clf(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "bundle"
    classifier_train(ClassifierTrainConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], layer=2,
                                           out=str(out)))
    return Classifier.from_pretrained(out)


@pytest.fixture(scope="module")
def client(clf):
    with TestClient(create_app(ServeConfig(**LIMITS), classifier=clf)) as c:
        yield c


def _png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, (16, 16), dtype=np.uint8)
        image[5 * (i % 3) : 5 * (i % 3) + 5] += 180
        out.append(image)
    return out


def test_health_and_info(client, clf):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["classes"] == clf.classes and info["layer"] == 2 and info["bundle_id"] == clf.info["bundle_id"]
    assert info["readout_layers"] == [2] and info["mirror"] is False
    assert info["preprocessing"] == {"image_size": 16, "channels": 1} and info["limits"]["max_images"] == 4


def test_multipart_and_base64_answer_what_the_classifier_predicts(client, clf):
    images = _images(3)
    labels, probs = clf.predict(np.stack(images))
    files = [("files", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    preds = answer.json()["predictions"]
    assert [p["name"] for p in preds] == ["0.png", "1.png", "2.png"]
    assert [p["label"] for p in preds] == labels
    np.testing.assert_allclose([p["probabilities"] for p in preds], probs, atol=1e-5)
    body = {"images": [base64.b64encode(_png(im)).decode() for im in images]}
    by_json = client.post("/predict", json=body).json()["predictions"]
    assert [p["label"] for p in by_json] == labels
    np.testing.assert_allclose([p["probability"] for p in by_json], probs.max(1), atol=1e-5)


@pytest.mark.parametrize("case, status, words", [
    ("no image", 400, "no image"),
    ("too many images", 413, "limit is 4"),
    ("body too large", 413, "over the limit"),
    ("streamed body too large", 413, "over the limit"),
    ("not an image", 422, "not a decodable image"),
    ("16-bit image", 415, "mode 'I;16'"),
    ("too many pixels", 413, "larger than the limit"),
    ("bad base64", 400, "not valid base64"),
    ("bad json", 400, "not valid JSON"),
    ("wrong content type", 415, "text/plain"),
])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(client, case, status, words):
    good = ("files", ("ok.png", _png(_images(1)[0]), "image/png"))
    rng = np.random.default_rng(0)
    requests = {
        "no image": dict(files={"note": (None, "hello")}),
        "too many images": dict(files=[good] * 5),
        "body too large": dict(files=[("files", ("big.png", _png(rng.integers(0, 256, (300, 300), np.uint8)),
                                                 "image/png"))]),
        "streamed body too large": dict(content=(b"x" * 20000 for _ in range(5)),  # chunked: no Content-Length
                                        headers={"content-type": "multipart/form-data; boundary=b"}),
        "not an image": dict(files=[good, ("files", ("junk.png", b"\x89PNG but not really", "image/png"))]),
        "16-bit image": dict(files=[("files", ("deep.png", _png(Image.new("I;16", (16, 16))), "image/png"))]),
        "too many pixels": dict(files=[("files", ("wide.png", _png(np.zeros((8, 4000), np.uint8)), "image/png"))]),
        "bad base64": dict(json={"images": ["***"]}),
        "bad json": dict(content=b"{not json", headers={"content-type": "application/json"}),
        "wrong content type": dict(content=b"hello", headers={"content-type": "text/plain"}),
    }
    answer = client.post("/predict", **requests[case])
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]
    if case == "not an image":
        assert "junk.png" in answer.json()["detail"]
    assert client.post("/predict", files=[good]).status_code == 200  # still serving


def test_the_batcher_survives_a_failing_forward_pass():
    from lvm.serve import Batcher

    calls = []

    def runner(pixels):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return pixels.reshape(len(pixels), -1)[:, :2]

    batcher = Batcher(runner, max_batch=8)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(np.zeros((1, 1, 2, 2), np.float32)).result(timeout=10)
    out = batcher.submit(np.ones((3, 1, 2, 2), np.float32)).result(timeout=10)
    assert out.shape == (3, 2) and calls == [1, 3]


def test_a_real_socket_and_the_load_test(clf):
    from bench.load_test import run_load_test

    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(), classifier=clf), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        answer = httpx.post(f"{url}/predict", files=[("files", ("a.png", _png(_images(1)[0]), "image/png"))])
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in clf.classes
        assert httpx.post(f"{url}/predict", content=b"x", headers={"content-type": "image/png"}).status_code == 415
        report = run_load_test(url, [_png(im) for im in _images(6)], requests=40, concurrency=4, timeout_s=60)
        assert report["requests"] == 40 and report["errors"] == 0
        assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
        assert json.dumps(report)  # JSON-able, as the script writes it
    finally:
        server.should_exit = True
        thread.join(timeout=30)
