"""Image sources on small generated files, including corrupt and truncated ones."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from tokenizer.images import ImageSourceError, load_images, open_images, prepare_image, to_tensor


def _write_idx(path, array, gz=False, truncate_to=None):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if truncate_to is not None:
        payload = payload[:truncate_to]
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def class_folder(tmp_path, rng):
    """Two classes in sub-folders, one nested one level deeper (recursion)."""
    root = tmp_path / "imgs"
    pixels = {}
    for cls, n in (("bolt", 3), ("nut", 2)):
        for i in range(n):
            arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            sub = root / cls / ("deep" if i == 0 else "") / f"{i}.png"
            _png(sub, arr)
            pixels[str(sub.relative_to(root))] = arr
    return root, pixels


def test_folder_labels_from_subfolders(class_folder):
    root, pixels = class_folder
    s = load_images(root, progress=False)
    assert s.images.shape == (5, 12, 12, 3) and s.images.dtype == np.uint8
    assert s.class_names == ["bolt", "nut"]
    assert sorted(s.labels.tolist()) == [0, 0, 0, 1, 1]
    # Pixels survive the round trip exactly (PNG is lossless, no resize requested).
    stored = {tuple(im.reshape(-1)[:8]) for im in s.images}
    assert stored == {tuple(a.reshape(-1)[:8]) for a in pixels.values()}


def test_folder_without_subfolders_is_unlabeled(tmp_path, rng):
    for i in range(3):
        _png(tmp_path / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    s = load_images(tmp_path, progress=False)
    assert s.labels is None and s.images.shape == (3, 8, 8, 1)


def test_resize_center_crop_and_channels(tmp_path):
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 10:30] = 255  # bright centre band: after centre crop of a 20x40 -> 10x10, all bright
    _png(tmp_path / "wide.png", arr)
    s = load_images(tmp_path, size=10, channels=3, progress=False)
    assert s.images.shape == (1, 10, 10, 3)
    assert s.images.min() > 200


def test_prepare_image_is_how_training_images_are_read(tmp_path, rng):
    """The public one-image step: a folder, an array source and a served image all go through it alike."""
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 10:30] = 255
    one = prepare_image(Image.fromarray(arr), 10, 3)
    assert one.shape == (10, 10, 3) and one.dtype == np.uint8 and one.min() > 200  # centre crop of the band
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grey = prepare_image(Image.fromarray(colour), 16, 1)  # right size: only PIL's "L" conversion
    np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.fromarray(colour).convert("L")))
    for i, (w, h) in enumerate([(20, 26), (31, 17), (16, 16)]):
        _png(tmp_path / "c" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    files = sorted((tmp_path / "c").glob("*.png"))
    for channels in (1, 3):
        folder = load_images(tmp_path, size=12, channels=channels, progress=False).images
        by_hand = np.stack([prepare_image(Image.open(f), 12, channels) for f in files])
        np.testing.assert_array_equal(folder, by_hand)
    big = rng.integers(0, 256, (2, 20, 26, 3), dtype=np.uint8)
    np.savez(tmp_path / "arr.npz", images=big)
    np.testing.assert_array_equal(load_images(tmp_path / "arr.npz", size=12, channels=3, progress=False).images,
                                  np.stack([prepare_image(Image.fromarray(a), 12, 3) for a in big]))


def test_missing_path(tmp_path):
    with pytest.raises(ImageSourceError, match="no such file"):
        load_images(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ImageSourceError, match="no images found"):
        load_images(tmp_path)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_fail_or_skip(tmp_path, rng, kind):
    good = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _png(tmp_path / "a.png", good)
    bad = tmp_path / "b.png"
    if kind == "garbage":
        bad.write_bytes(b"this is not a png")
    else:
        _png(bad, good)
        bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ImageSourceError, match=r"b\.png.*on_error='skip'"):
        load_images(tmp_path, progress=False)
    with pytest.warns(UserWarning, match="b.png"):
        s = load_images(tmp_path, on_error="skip", progress=False)
    assert len(s) == 1 and np.array_equal(s.images[0, ..., 0], good)


def test_all_images_corrupt_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(ImageSourceError, match="none of the 1"):
        load_images(tmp_path, on_error="skip", progress=False)


def test_mixed_modes_and_sizes_are_conformed_and_stated(tmp_path, rng):
    _png(tmp_path / "g.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    _png(tmp_path / "c.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    src = open_images(tmp_path)
    assert src.shape == (8, 8, 3) and any("mixed colour" in n for n in src.notes)
    assert load_images(tmp_path, channels=1, progress=False).images.shape == (2, 8, 8, 1)
    _png(tmp_path / "big.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    src = open_images(tmp_path, channels=1)
    assert src.shape == (8, 8, 1) and any("different sizes" in n and "8x8" in n for n in src.notes)
    assert load_images(tmp_path, channels=1, size=12, progress=False).images.shape == (3, 12, 12, 1)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_with_sibling_labels(tmp_path, rng, gz):
    images = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    s = load_images(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert np.array_equal(s.images[..., 0], images)
    assert np.array_equal(s.labels, labels.astype(np.int64))
    assert len(load_images(tmp_path / f"train-images-idx3-ubyte{suffix}", limit=3)) == 3


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, rng, gz):
    images = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8)
    path = tmp_path / ("x-images-idx3-ubyte" + (".gz" if gz else ""))
    _write_idx(path, images, gz, truncate_to=16 + 16 * 10 - 5)  # header + all but 5 pixels
    with pytest.raises(ImageSourceError, match="truncated"):
        load_images(path)


def test_truncated_gzip_stream(tmp_path, rng):
    path = tmp_path / "x-images-idx3-ubyte.gz"
    _write_idx(path, rng.integers(0, 256, (50, 8, 8), dtype=np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:-30])  # cut the compressed stream itself
    with pytest.raises(ImageSourceError, match="x-images-idx3-ubyte.gz.*(truncated|corrupt)"):
        load_images(path)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "data-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 64)
    with pytest.raises(ImageSourceError, match="not an IDX file"):
        load_images(path)


def test_idx_label_count_mismatch(tmp_path, rng):
    _write_idx(tmp_path / "t-images-idx3-ubyte", rng.integers(0, 256, (5, 4, 4), dtype=np.uint8))
    _write_idx(tmp_path / "t-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ImageSourceError, match="4 labels for 5 images"):
        load_images(tmp_path / "t-images-idx3-ubyte")


def test_npy_uint8_and_float(tmp_path, rng):
    arr = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    assert np.array_equal(load_images(tmp_path / "a.npy").images[..., 0], arr)
    np.save(tmp_path / "f.npy", arr.astype(np.float32) / 255.0)
    assert np.array_equal(load_images(tmp_path / "f.npy").images[..., 0], arr)
    np.save(tmp_path / "bad.npy", arr.astype(np.float32))  # floats outside [0, 1]
    with pytest.raises(ImageSourceError, match=r"\[0, 1\]"):
        load_images(tmp_path / "bad.npy")


def test_npz_with_labels_and_corrupt(tmp_path, rng):
    arr = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=arr, labels=np.array([0, 1, 1, 0]))
    s = load_images(tmp_path / "d.npz", channels=1)
    assert s.images.shape == (4, 6, 6, 1) and s.labels.tolist() == [0, 1, 1, 0]
    np.savez(tmp_path / "nokey.npz", stuff=arr)
    with pytest.raises(ImageSourceError, match="no image array"):
        load_images(tmp_path / "nokey.npz")
    (tmp_path / "broken.npy").write_bytes((tmp_path / "d.npz").read_bytes()[:50])
    with pytest.raises(ImageSourceError, match="broken.npy"):
        load_images(tmp_path / "broken.npy")


def test_unsupported_format_and_bad_args(tmp_path):
    (tmp_path / "x.txt").write_text("1,2,3")
    with pytest.raises(ImageSourceError, match="unsupported format"):
        load_images(tmp_path / "x.txt")
    with pytest.raises(ImageSourceError, match="channels"):
        load_images(tmp_path, channels=2)
    with pytest.raises(ImageSourceError, match="on_error"):
        load_images(tmp_path, on_error="ignore")


def test_fashion_mnist_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LVM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ImageSourceError, match="dataset-fashion-mnist"):
        load_images("fashion-mnist")
    with pytest.raises(ImageSourceError, match="split"):
        load_images("fashion-mnist", split="val")


def test_fashion_mnist_real(fashion_mnist_dir):
    s = load_images("fashion-mnist", split="test", limit=500)
    assert s.images.shape == (500, 28, 28, 1)
    assert s.labels.min() >= 0 and s.labels.max() <= 9 and len(s.class_names) == 10
    assert s.images.std() > 20  # real images, not blanks


def test_to_tensor_layout():
    arr = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    t = to_tensor(arr)
    assert t.shape == (2, 3, 3, 4)
    assert t[1, 2, 0, 3].item() == pytest.approx(arr[1, 0, 3, 2] / 255.0)
    with pytest.raises(ImageSourceError):
        to_tensor(arr.astype(np.float32))


def test_transforms():
    from tokenizer.images import transform_images

    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    assert np.array_equal(transform_images(x, "hflip")[0, 1, 0], x[0, 1, 3])
    assert np.array_equal(transform_images(x, "vflip")[1, 0, 2], x[1, 3, 2])
    assert transform_images(x, "invert")[0, 0, 0, 0] == 255
    masked = transform_images(x, "mask-bottom")
    assert masked[:, 2:].max() == 0 and np.array_equal(masked[:, :2], x[:, :2])
    assert np.array_equal(transform_images(x, "rot90")[0, 0, :, 0], x[0, :, 3, 0])
    with pytest.raises(ImageSourceError, match="transform"):
        transform_images(x, "blur")


def test_skimage_crops_source_is_real_deterministic_and_labelled():
    pytest.importorskip("skimage")
    from tokenizer.images import SKIMAGE_IMAGES

    a = load_images("skimage-crops", "test", limit=360, progress=False)
    b = load_images("skimage-crops", "test", limit=360, progress=False)
    assert a.images.shape == (360, 28, 28, 1) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    assert np.bincount(a.labels).tolist() == [360 // len(SKIMAGE_IMAGES)] * len(SKIMAGE_IMAGES)
    assert a.class_names == SKIMAGE_IMAGES
    assert a.images.reshape(360, -1).std(1).mean() > 5  # real texture, not blank crops
    train = load_images("skimage-crops", "train", limit=360, progress=False)
    assert not np.array_equal(train.images, a.images)
    rgb = load_images("skimage-crops", "train", size=16, channels=3, limit=20, progress=False)
    assert rgb.images.shape == (20, 16, 16, 3)
    with pytest.raises(ImageSourceError, match="split"):
        load_images("skimage-crops", "val")
