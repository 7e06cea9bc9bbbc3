"""Image sources: everything a user may point the toolkit at, loaded into one uint8 array.

Supported: the named sources ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``) and
``skimage-crops`` (random crops of the real images bundled with scikit-image), a folder of
image files (recursive; class = top-level sub-folder), MNIST-style IDX files (raw or ``.gz``),
and ``.npy`` / ``.npz`` arrays. Every bad input raises :class:`ImageSourceError` with a one-line
message naming the file and the fix; corrupt image files can be skipped with a warning instead.
"""
from __future__ import annotations

import gzip
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "LVM_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ARRAY_SUFFIXES = {".npy", ".npz"}
# Real images shipped inside scikit-image's wheel (no download): microscopy, histology, retina,
# textures, documents, astronomy and a few photographs. Crops of these are the out-of-domain set
# for "does pretraining on *my* domain matter?" comparisons; the class of a crop is its image.
SKIMAGE_IMAGES = [
    "brick", "grass", "gravel", "cell", "coins", "immunohistochemistry", "retina", "microaneurysms",
    "moon", "hubble_deep_field", "camera", "page", "text", "clock", "coffee", "chelsea", "astronaut", "rocket",
]
SKIMAGE_SIZES = {"train": 60000, "test": 10000}


class ImageSourceError(ValueError):
    """Bad image input; the message names the offending file or argument and how to fix it."""


@dataclass
class ImageSet:
    """Images of one source, ready for the tokenizer."""

    images: np.ndarray  # uint8 [N, H, W, C], C in {1, 3}
    labels: np.ndarray | None  # int64 [N]
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def load_images(
    source: str | os.PathLike,
    split: str = "train",
    size: int | None = None,
    channels: int | None = None,
    on_error: str = "fail",
    limit: int | None = None,
    progress: bool = True,
) -> ImageSet:
    """Load any supported source as ``uint8 [N, H, W, C]``, resized/centre-cropped to ``size``.

    ``split`` only matters for ``fashion-mnist`` (``train`` or ``test``). ``on_error`` is
    ``"fail"`` or ``"skip"`` for unreadable image files in a folder.
    """
    if on_error not in ("fail", "skip"):
        raise ImageSourceError(f"on_error={on_error!r} is not valid; use 'fail' or 'skip'.")
    if channels not in (None, 1, 3):
        raise ImageSourceError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
    if size is not None and size < 1:
        raise ImageSourceError(f"size={size} must be a positive number of pixels.")
    if limit is not None and limit < 1:
        raise ImageSourceError(f"limit={limit} must be a positive number of images.")

    name = str(source)
    if name.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        result = _load_fashion_mnist(split, limit)
    elif name.lower() in ("skimage-crops", "skimage"):
        result = _load_skimage_crops(split, limit, size or 28, channels or 1, progress)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ImageSourceError(
                f"{path}: no such file or folder; pass a folder of images, an IDX/.npy/.npz file, "
                "or 'fashion-mnist'."
            )
        if path.is_dir():
            result = _load_folder(path, channels, size, on_error, limit, progress)
        elif path.suffix.lower() in ARRAY_SUFFIXES:
            result = _load_array_file(path, limit)
        elif _looks_like_idx(path):
            result = _load_idx_images(path, limit)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            result = _load_folder_files([path], None, channels, size, on_error, progress, str(path))
        else:
            raise ImageSourceError(
                f"{path}: unsupported format '{path.suffix or path.name}'; supported are image folders, "
                f"IDX files (raw or .gz), {sorted(ARRAY_SUFFIXES)} and images {sorted(IMAGE_SUFFIXES)}."
            )
    return _conform(result, size, channels)


def transform_images(images: np.ndarray, name: str) -> np.ndarray:
    """A deterministic image->image transform, the B side of A->B visual-sentence pairs."""
    ops = {
        "none": lambda x: x,
        "hflip": lambda x: x[:, :, ::-1],
        "vflip": lambda x: x[:, ::-1],
        "invert": lambda x: 255 - x,
        "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
        "mask-bottom": _mask_bottom,
    }
    if name not in ops:
        raise ImageSourceError(f"transform={name!r} is unknown; use one of {sorted(ops)}.")
    return np.ascontiguousarray(ops[name](images))


def _mask_bottom(images: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, images.shape[1] // 2 :] = 0
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 [N, H, W, C]`` -> ``float32 [N, C, H, W]`` in [0, 1], the tokenizer's input."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ImageSourceError(
            f"to_tensor expects uint8 [N, H, W, C] images, got {images.dtype} with shape {images.shape}."
        )
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------------------------
# Named source: Fashion-MNIST
# ---------------------------------------------------------------------------------------------

def _load_fashion_mnist(split: str, limit: int | None) -> ImageSet:
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise ImageSourceError(f"split={split!r} is not a Fashion-MNIST split; use 'train' or 'test'.")
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))
    images_path = _find_idx(root, f"{prefixes[split]}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefixes[split]}-labels-idx1-ubyte")
    if images_path is None:
        raise ImageSourceError(
            f"Fashion-MNIST not found under {root}; install it with 'apt-get install -y dataset-fashion-mnist' "
            f"or point ${FASHION_MNIST_ENV} at a folder with the IDX files."
        )
    images = _read_idx(images_path, limit)
    labels = _read_idx(labels_path, limit).astype(np.int64) if labels_path else None
    _check_label_count(images, labels, labels_path)
    return ImageSet(images[..., None], labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist:{split}")


# ---------------------------------------------------------------------------------------------
# Named source: crops of scikit-image's bundled images
# ---------------------------------------------------------------------------------------------

def _load_skimage_crops(split: str, limit: int | None, size: int, channels: int, progress: bool = True) -> ImageSet:
    """Square crops (16-160 px, random place) of each bundled image, resized to ``size``.

    Deterministic per split (train and test use different seeds, so no crop is shared exactly);
    classes are balanced, label = source image.
    """
    if split not in SKIMAGE_SIZES:
        raise ImageSourceError(f"split={split!r} is not a skimage-crops split; use 'train' or 'test'.")
    try:
        import skimage.data
    except ImportError:
        raise ImageSourceError("skimage-crops needs scikit-image; install it with 'pip install scikit-image'.") from None
    count = min(limit or SKIMAGE_SIZES[split], SKIMAGE_SIZES[split])
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    labels = np.arange(count) % len(SKIMAGE_IMAGES)
    rng.shuffle(labels)
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((count, size, size, channels), np.uint8)
    for k, name in enumerate(tqdm(SKIMAGE_IMAGES, desc="skimage crops", unit="image", leave=False, disable=not progress)):
        src = Image.fromarray(_as_uint8(np.asarray(getattr(skimage.data, name)()), name)).convert(mode)
        w, h = src.size
        for i in np.flatnonzero(labels == k):
            side = int(rng.integers(16, min(160, w, h) + 1))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = src.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BOX)
            arr = np.asarray(crop)
            images[i] = arr[..., None] if arr.ndim == 2 else arr
    return ImageSet(images, labels.astype(np.int64), list(SKIMAGE_IMAGES), f"skimage-crops:{split}")


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST format): magic 0x0000 <dtype> <ndim>, ndim big-endian uint32 dims, then data
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _looks_like_idx(path: Path) -> bool:
    name = path.name.lower()
    return "idx" in name or name.endswith("-ubyte") or name.endswith("-ubyte.gz")


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Read an IDX file, checking its header against its length so truncation is caught."""
    try:
        with _open_maybe_gzip(path) as f:
            header = f.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
                raise ImageSourceError(f"{path}: not an IDX file (bad magic number); expected MNIST-style IDX data.")
            dtype = np.dtype(_IDX_DTYPES[header[2]])
            ndim = header[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ImageSourceError(f"{path}: IDX header is truncated; re-download or re-copy the file.")
            dims = [int(d) for d in np.frombuffer(dims_raw, dtype=">u4")]
            count = dims[0] if limit is None else min(dims[0], limit)
            item = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
            want = count * item * dtype.itemsize
            data = f.read(want)
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise ImageSourceError(f"{path}: cannot read IDX data ({err}); the file is truncated or corrupt.") from None
    if len(data) < want:
        raise ImageSourceError(
            f"{path}: IDX file is truncated (header says {dims[0]} items, data holds "
            f"{len(data) // max(item * dtype.itemsize, 1)}); re-download or re-copy the file."
        )
    return np.frombuffer(data, dtype=dtype).reshape([count, *dims[1:]]).copy()


def _load_idx_images(path: Path, limit: int | None) -> ImageSet:
    images = _read_idx(path, limit)
    if images.ndim not in (3, 4):
        raise ImageSourceError(f"{path}: IDX images must be [N, H, W] or [N, H, W, C], got shape {images.shape}.")
    if images.dtype != np.uint8:
        images = _as_uint8(images, path)
    if images.ndim == 3:
        images = images[..., None]
    labels_path = _sibling_labels(path)
    labels = _read_idx(labels_path, limit).astype(np.int64) if labels_path else None
    _check_label_count(images, labels, labels_path)
    return ImageSet(images, labels, None, str(path))


def _sibling_labels(path: Path) -> Path | None:
    """``train-images-idx3-ubyte(.gz)`` -> ``train-labels-idx1-ubyte(.gz)`` when it exists."""
    name = path.name
    if "images-idx3" not in name:
        return None
    for candidate in (name.replace("images-idx3", "labels-idx1"),):
        for variant in (candidate, candidate + ".gz", candidate.removesuffix(".gz")):
            if (path.parent / variant).is_file():
                return path.parent / variant
    return None


def _check_label_count(images: np.ndarray, labels: np.ndarray | None, where) -> None:
    if labels is not None and len(labels) != len(images):
        raise ImageSourceError(
            f"{where}: {len(labels)} labels for {len(images)} images; the label file does not match the images."
        )


# ---------------------------------------------------------------------------------------------
# Arrays: .npy holds images; .npz holds images (key 'images' or 'x') and optional labels ('labels'/'y')
# ---------------------------------------------------------------------------------------------

def _load_array_file(path: Path, limit: int | None) -> ImageSet:
    labels = None
    try:
        if path.suffix.lower() == ".npy":
            images = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                keys = set(archive.files)
                image_key = next((k for k in ("images", "x", "arr_0") if k in keys), None)
                if image_key is None:
                    raise ImageSourceError(
                        f"{path}: no image array found (keys: {sorted(keys)}); store images under 'images' "
                        "and labels under 'labels'."
                    )
                images = archive[image_key]
                label_key = next((k for k in ("labels", "y") if k in keys), None)
                labels = archive[label_key] if label_key else None
    except ImageSourceError:
        raise
    except Exception as err:  # numpy raises several types for corrupt/truncated files
        raise ImageSourceError(f"{path}: cannot read array file ({err}); the file is truncated or corrupt.") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ImageSourceError(
            f"{path}: array shape {images.shape} is not images; expected [N, H, W] or [N, H, W, C] with C in (1, 3)."
        )
    images = _as_uint8(images, path)
    if limit is not None:
        images, labels = images[:limit], (labels[:limit] if labels is not None else None)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
    _check_label_count(images, labels, path)
    return ImageSet(np.ascontiguousarray(images), labels, None, str(path))


def _as_uint8(images: np.ndarray, path) -> np.ndarray:
    """Floats in [0, 1] are scaled to [0, 255]; integers must already be in [0, 255]."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ImageSourceError(f"{path}: float images must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]; rescale them.")
        return np.round(images * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min(initial=0)), int(images.max(initial=0))
        if lo < 0 or hi > 255:
            raise ImageSourceError(f"{path}: integer images must lie in [0, 255], found [{lo}, {hi}]; rescale them.")
        return images.astype(np.uint8)
    raise ImageSourceError(f"{path}: unsupported image dtype {images.dtype}; use uint8 or float in [0, 1].")


# ---------------------------------------------------------------------------------------------
# Folders of image files
# ---------------------------------------------------------------------------------------------

def _load_folder(
    root: Path, channels: int | None, size: int | None, on_error: str, limit: int | None, progress: bool
) -> ImageSet:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageSourceError(
            f"{root}: no images found (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    # Class = top-level sub-folder, but only when every image lives in one (otherwise unlabeled).
    tops = [p.relative_to(root).parts for p in files]
    labelled = all(len(parts) > 1 for parts in tops)
    class_names = sorted({parts[0] for parts in tops}) if labelled else None
    if limit is not None:
        files = files[:limit]
    labels = None
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[p.relative_to(root).parts[0]] for p in files]
    return _load_folder_files(files, labels, channels, size, on_error, progress, str(root), class_names)


def _load_folder_files(
    files: list[Path],
    labels: list[int] | None,
    channels: int | None,
    size: int | None,
    on_error: str,
    progress: bool,
    source: str,
    class_names: list[str] | None = None,
) -> ImageSet:
    arrays, kept_labels, modes, skipped = [], [], Counter(), []
    bar = tqdm(files, desc=f"reading {Path(source).name}", unit="img", disable=not progress or len(files) < 200)
    for i, path in enumerate(bar):
        try:
            with Image.open(path) as img:
                img.load()
                mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                modes[mode] += 1
                target_mode = {1: "L", 3: "RGB"}.get(channels, mode)
                img = img.convert(target_mode)
                if size is not None:
                    img = _resize_center_crop(img, size)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if on_error == "fail":
                raise ImageSourceError(
                    f"{path}: unreadable image ({type(err).__name__}: {err}); fix or remove it, "
                    "or pass on_error='skip' (CLI: --on-error skip) to skip bad files."
                ) from None
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            skipped.append(path)
            continue
        arrays.append(arr if arr.ndim == 3 else arr[..., None])
        if labels is not None:
            kept_labels.append(labels[i])
    if not arrays:
        raise ImageSourceError(f"{source}: none of the {len(files)} image files could be read.")
    if channels is None and len(modes) > 1:
        raise ImageSourceError(
            f"{source}: images of mixed modes ({dict(modes)}); pass channels=1 or channels=3 (CLI: --channels) "
            "to convert them all."
        )
    shapes = Counter(a.shape for a in arrays)
    if len(shapes) > 1:
        raise ImageSourceError(
            f"{source}: images of different sizes ({len(shapes)} distinct, e.g. {list(shapes)[:3]}); pass size=N "
            "(CLI: --size) to resize and centre-crop them to N x N."
        )
    return ImageSet(
        np.stack(arrays),
        np.asarray(kept_labels, dtype=np.int64) if labels is not None else None,
        class_names,
        source,
    )


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` then cut the centre square: keeps aspect, fills the frame."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _conform(result: ImageSet, size: int | None, channels: int | None) -> ImageSet:
    """Bring array-based sources to the requested size/channels (folders do it per file)."""
    images = result.images
    if channels is not None and images.shape[-1] != channels:
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:  # ITU-R 601 luma, as PIL's "L" conversion uses
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            images = np.round(images.astype(np.float32) @ weights)[..., None].astype(np.uint8)
    if size is not None and images.shape[1:3] != (size, size):
        mode = "L" if images.shape[-1] == 1 else "RGB"
        resized = [
            np.asarray(_resize_center_crop(Image.fromarray(im.squeeze(-1) if mode == "L" else im, mode), size))
            for im in images
        ]
        images = np.stack([r if r.ndim == 3 else r[..., None] for r in resized])
    result.images = np.ascontiguousarray(images)
    return result
