"""Image sources: everything a user may point the toolkit at, listed lazily and read in chunks.

Supported: the named sources ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``) and
``skimage-crops`` (random crops of the real images bundled with scikit-image), a folder of
image files (recursive; class = top-level sub-folder, or rows of a ``labels.csv`` in it), a CSV
file of ``path,label`` rows itself, MNIST-style IDX files (raw or ``.gz``), and ``.npy`` /
``.npz`` arrays.

``open_images`` lists a source without decoding it (an :class:`ImageSource`: keys, labels and a
reader); ``ImageSource.chunks`` streams it, so a folder larger than memory can be tokenized;
``load_images`` reads it whole into an :class:`ImageSet`. Sources without a named split are split
by ``tokenizer.splits`` (each image's side is a hash of its key), so every command sees the same
train and test sides. Every bad input raises :class:`ImageSourceError` with a one-line message
naming the file and the fix; corrupt image files can be skipped (and counted) instead.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from tokenizer.splits import DEFAULT_TEST_FRACTION, SIDES, pixel_hash, on_test_side

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "LVM_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ARRAY_SUFFIXES = {".npy", ".npz"}
LABELS_CSV = "labels.csv"  # inside a folder: labels for the images it names, instead of class sub-folders
# Real images shipped inside scikit-image's wheel (no download): microscopy, histology, retina,
# textures, documents, astronomy and a few photographs. Crops of these are the out-of-domain set
# for "does pretraining on *my* domain matter?" comparisons; the class of a crop is its image.
SKIMAGE_IMAGES = [
    "brick", "grass", "gravel", "cell", "coins", "immunohistochemistry", "retina", "microaneurysms",
    "moon", "hubble_deep_field", "camera", "page", "text", "clock", "coffee", "chelsea", "astronaut", "rocket",
]
SKIMAGE_SIZES = {"train": 60000, "test": 10000}
NAMED_SOURCES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist",
                 "skimage-crops": "skimage-crops", "skimage": "skimage-crops"}
SURVEY_FILES = 256  # image headers read to decide a folder's size and colour when not given


class ImageSourceError(ValueError):
    """Bad image input; the message names the offending file or argument and how to fix it."""


@dataclass
class ImageSet:
    """Images of one source, in memory, ready for the tokenizer."""

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


@dataclass
class ImageSource:
    """A source listed but not read: what each image is (key, label) and how to read any of them.

    ``keys`` identify images for the split and for overlap checks: the path relative to ``root``
    for files, a pixel hash for arrays. Views (``select``) share the reader; ``skipped`` collects
    the files an ``on_error='skip'`` read left out, with the reason.
    """

    name: str
    keys: np.ndarray  # str [N]
    labels: np.ndarray | None  # int64 [N]
    class_names: list[str] | None
    shape: tuple[int, int, int]  # (H, W, C) every image is read at
    reader: Callable[[np.ndarray], list[np.ndarray | None]]  # base positions -> images (None: skipped)
    index: np.ndarray  # base positions of this view
    root: str | None = None  # folder the keys are relative to (files only)
    identity_parts: Callable[[np.ndarray], bytes] | None = None  # cheap fingerprint of the base positions
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def channels(self) -> int:
        return self.shape[2]

    def select(self, positions: np.ndarray, name: str | None = None) -> "ImageSource":
        """A view of some of this source's images (positions into this view)."""
        positions = np.asarray(positions, dtype=np.int64)
        return replace(self, name=name or self.name, keys=self.keys[positions],
                       labels=None if self.labels is None else self.labels[positions], index=self.index[positions])

    def without_labels(self) -> "ImageSource":
        return replace(self, labels=None, class_names=None)

    @property
    def identity(self) -> str:
        """What these images are, without decoding them (files: names, sizes, times): shard reuse keys on it."""
        digest = hashlib.sha256(f"{self.name}|{self.shape}|{len(self)}".encode())
        digest.update(self.identity_parts(self.index) if self.identity_parts else "\n".join(self.keys).encode())
        return digest.hexdigest()[:16]

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images at ``positions`` of this view as ``uint8 [k, H, W, C]`` plus the positions actually read."""
        positions = np.asarray(positions, dtype=np.int64)
        got = self.reader(self.index[positions])
        kept = [i for i, img in enumerate(got) if img is not None]  # the reader logged the others in `skipped`
        images = np.stack([got[i] for i in kept]) if kept else np.empty((0, *self.shape), np.uint8)
        return images, positions[kept]

    def chunks(self, batch_size: int = 256, start: int = 0, progress: bool = True,
               desc: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, images)`` chunks in order from ``start``: the whole source never sits in memory."""
        bar = tqdm(total=len(self), initial=start, desc=desc or f"reading {Path(self.name).name}", unit="img",
                   disable=not progress or len(self) - start < 1000)
        for lo in range(start, len(self), batch_size):
            images, kept = self.read(np.arange(lo, min(lo + batch_size, len(self))))
            bar.update(min(batch_size, len(self) - lo))
            yield kept, images
        bar.close()

    def load(self, progress: bool = True) -> ImageSet:
        """Everything, in memory."""
        parts, kept = [], []
        for positions, images in self.chunks(1024, progress=progress):
            parts.append(images)
            kept.append(positions)
        positions = np.concatenate(kept) if kept else np.empty(0, np.int64)
        if len(positions) == 0:
            raise ImageSourceError(f"{self.name}: none of the {len(self)} images could be read.")
        labels = None if self.labels is None else self.labels[positions]
        return ImageSet(np.concatenate(parts), labels, self.class_names, self.name)


def open_images(
    source: str | os.PathLike,
    split: str = "all",
    size: int | None = None,
    channels: int | None = None,
    on_error: str = "fail",
    limit: int | None = None,
    progress: bool = True,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    test_source: str | os.PathLike | None = None,
) -> ImageSource:
    """List one side of a source, resized/centre-cropped to ``size`` and converted to ``channels``.

    ``split``: ``train``, ``test`` or ``all``. Named sources have their own split; any other source
    is split by key hash with ``test_fraction`` on the test side, unless ``test_source`` is given: then
    ``train`` is all of ``source`` and ``test`` all of ``test_source``. ``limit`` keeps at most that
    many images, spread evenly over the side (a class-sorted folder keeps every class; named sources
    keep their first ones, which are shuffled). ``on_error``: ``fail`` or ``skip`` unreadable files.
    """
    if on_error not in ("fail", "skip"):
        raise ImageSourceError(f"on_error={on_error!r} is not valid; use 'fail' or 'skip'.")
    if channels not in (None, 1, 3):
        raise ImageSourceError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
    if size is not None and size < 1:
        raise ImageSourceError(f"size={size} must be a positive number of pixels.")
    if limit is not None and limit < 1:
        raise ImageSourceError(f"limit={limit} must be a positive number of images.")
    if split not in SIDES and split != "t10k":
        raise ImageSourceError(f"split={split!r} is not valid; use one of {', '.join(SIDES)}.")
    if test_source:
        if split == "test":
            if size is None or channels is None:  # read the test side as the training side is read
                train = open_images(source, "all", size, channels, on_error, progress=False)
                size, channels = size or train.shape[0], channels or train.channels
            return open_images(test_source, "test" if _named(test_source) else "all", size, channels, on_error,
                               limit, progress)
        split = "train" if _named(source) else "all"
    named = _named(source)
    if named:
        result = _open_named(named, split, size, channels, limit, progress)
        return result
    src = _open_path(Path(source).expanduser(), size, channels, on_error, progress)
    if split != "all":
        on_test = on_test_side(src.keys, test_fraction)
        src = src.select(np.flatnonzero(on_test if split == "test" else ~on_test), name=f"{src.name}:{split}")
        if not len(src):
            raise ImageSourceError(
                f"{source}: the {split} side of a {test_fraction:g} test split is empty ({len(on_test)} images); "
                "add images or pass --test-source with an explicit test set."
            )
    if limit is not None and limit < len(src):
        src = src.select(np.unique(np.linspace(0, len(src) - 1, limit).round().astype(np.int64)))
    return src


def load_images(
    source: str | os.PathLike,
    split: str = "all",
    size: int | None = None,
    channels: int | None = None,
    on_error: str = "fail",
    limit: int | None = None,
    progress: bool = True,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    test_source: str | os.PathLike | None = None,
) -> ImageSet:
    """``open_images(...)`` read whole into memory as ``uint8 [N, H, W, C]`` (see its arguments)."""
    src = open_images(source, split, size, channels, on_error, limit, progress, test_fraction, test_source)
    return src.load(progress)


def concat_sources(sources: list[ImageSource], name: str) -> ImageSource:
    """Several sources read as one (labels dropped): the pretraining set of labelled + unlabeled folders."""
    shapes = {s.shape for s in sources}
    if len(shapes) > 1:
        raise ImageSourceError(
            f"{name}: sources read at different sizes {sorted(shapes)}; pass one --image-size and --channels for all."
        )
    offsets = np.cumsum([0] + [len(s) for s in sources])
    skipped: list[tuple[str, str]] = []

    def reader(positions: np.ndarray) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(positions)
        which = np.searchsorted(offsets, positions, side="right") - 1
        for k, s in enumerate(sources):
            mine = np.flatnonzero(which == k)
            if len(mine):
                before = len(s.skipped)
                images, kept = s.read(positions[mine] - offsets[k])
                skipped.extend(s.skipped[before:])
                for img, pos in zip(images, kept):
                    out[mine[np.searchsorted(positions[mine] - offsets[k], pos)]] = img
        return out

    def identity(positions: np.ndarray) -> bytes:
        return "|".join(s.identity for s in sources).encode() + np.asarray(positions).tobytes()

    keys = np.concatenate([np.asarray([f"{s.name}/{k}" for k in s.keys], dtype=object) for s in sources])
    return ImageSource(name, keys, None, None, sources[0].shape, reader, np.arange(offsets[-1]),
                       identity_parts=identity, notes=[n for s in sources for n in s.notes], skipped=skipped)


def _named(source) -> str | None:
    return NAMED_SOURCES.get(str(source).lower())


def _open_named(named: str, split: str, size: int | None, channels: int | None, limit: int | None,
                progress: bool) -> ImageSource:
    """The named sources are small enough to read whole; they keep their published split."""
    sides = ["train", "test"] if split == "all" else [split]
    parts = []
    for side in sides:
        if named == "fashion-mnist":
            parts.append(_load_fashion_mnist(side, limit))
        else:
            parts.append(_load_skimage_crops(side, limit, size or 28, channels or 1, progress))
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    name = parts[0].source if len(parts) == 1 else f"{named}:all"
    return array_source(_conform(images, size, channels), labels, parts[0].class_names, name)


def array_source(images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None,
                 name: str) -> ImageSource:
    """An in-memory (or memory-mapped) ``uint8 [N, H, W, C]`` array as a source; keys are pixel hashes."""
    keys = np.asarray([pixel_hash(im) for im in images], dtype=object)

    def reader(positions: np.ndarray) -> list[np.ndarray | None]:
        return list(np.asarray(images[positions]))

    return ImageSource(name, keys, labels, class_names, tuple(int(v) for v in images.shape[1:]), reader,
                       np.arange(len(images)))


def image_set_source(images: ImageSet) -> ImageSource:
    """An ImageSet already in memory, seen as a source."""
    return array_source(images.images, images.labels, images.class_names, images.source)


def _open_path(path: Path, size: int | None, channels: int | None, on_error: str, progress: bool) -> ImageSource:
    if not path.exists():
        raise ImageSourceError(
            f"{path}: no such file or folder; pass a folder of images, a labels CSV, an IDX/.npy/.npz file, "
            "or 'fashion-mnist'."
        )
    if path.is_dir():
        if (path / LABELS_CSV).is_file():
            files, labels, class_names = _list_csv(path / LABELS_CSV)
        else:
            files, labels, class_names = _list_folder(path)
        return _file_source(path, files, labels, class_names, size, channels, on_error)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        files, labels, class_names = _list_csv(path)
        return _file_source(path.parent, files, labels, class_names, size, channels, on_error, name=str(path))
    if suffix in IMAGE_SUFFIXES:
        return _file_source(path.parent, [path], None, None, size, channels, on_error, name=str(path))
    if suffix in ARRAY_SUFFIXES:
        result = _load_array_file(path)
    elif _looks_like_idx(path):
        result = _load_idx_images(path, None)
    else:
        raise ImageSourceError(
            f"{path}: unsupported format '{path.suffix or path.name}'; supported are image folders, labels CSVs, "
            f"IDX files (raw or .gz), {sorted(ARRAY_SUFFIXES)} and images {sorted(IMAGE_SUFFIXES)}."
        )
    return array_source(_conform(result.images, size, channels), result.labels, result.class_names, result.source)


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

MIN_CROP_STD = 2.0  # near-constant crops (black retina borders, empty sky) say nothing and repeat across splits


def _load_skimage_crops(split: str, limit: int | None, size: int, channels: int, progress: bool = True) -> ImageSet:
    if split not in SKIMAGE_SIZES:
        raise ImageSourceError(f"split={split!r} is not a skimage-crops split; use 'train' or 'test'.")
    return _skimage_crops(split, min(limit or SKIMAGE_SIZES[split], SKIMAGE_SIZES[split]), size, channels)


@functools.lru_cache(maxsize=2)  # the stages of one quickstart read the same crops; making them takes a minute at 64 px
def _skimage_crops(split: str, count: int, size: int, channels: int) -> ImageSet:
    """Square crops (16-160 px, random place) of each bundled image, resized to ``size``.

    Deterministic per split, and a prefix of the full split whatever ``limit`` is; classes come in
    rounds of a permutation (any multiple of 18 images is balanced); label = source image. No test
    crop repeats a training crop's box, and near-constant crops are redrawn, so no test image is a
    training image (``tokenizer.splits.find_overlap`` checks it).
    """
    sources = _skimage_sources()
    labels, boxes = _skimage_plan(split, tuple(sources))
    labels, boxes = labels[:count], boxes[:count]
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((count, size, size, channels), np.uint8)
    for k, name in enumerate(tqdm(SKIMAGE_IMAGES, desc="skimage crops", unit="image", leave=False)):
        src = Image.fromarray(sources[k]).convert(mode)
        for i in np.flatnonzero(labels == k):
            side, x, y = (int(v) for v in boxes[i])
            arr = np.asarray(src.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BOX))
            images[i] = arr[..., None] if arr.ndim == 2 else arr
    images.setflags(write=False)  # cached and shared between callers
    return ImageSet(images, labels.astype(np.int64), list(SKIMAGE_IMAGES), f"skimage-crops:{split}")


def _skimage_sources() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise ImageSourceError("skimage-crops needs scikit-image; install it with 'pip install scikit-image'.") from None
    return [_as_uint8(np.asarray(getattr(skimage.data, name)()), name) for name in SKIMAGE_IMAGES]


_PLANS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _skimage_plan(split: str, sources: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[N]`` and crop boxes ``[N, 3]`` (side, x, y) of a whole split; test avoids train's boxes."""
    if split in _PLANS:
        return _PLANS[split]
    taken = set()
    if split == "test":
        train_labels, train_boxes = _skimage_plan("train", sources)
        taken = {(int(k), *map(int, b)) for k, b in zip(train_labels, train_boxes)}
    count, classes = SKIMAGE_SIZES[split], len(SKIMAGE_IMAGES)
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    labels = np.concatenate([rng.permutation(classes) for _ in range(-(-count // classes))])[:count]
    boxes = np.empty((count, 3), np.int64)
    grey = [src if src.ndim == 2 else src.mean(-1) for src in sources]
    for i, k in enumerate(labels):
        h, w = grey[k].shape
        for _ in range(1000):
            side = int(rng.integers(16, min(160, w, h) + 1))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            if (int(k), side, x, y) not in taken and grey[k][y : y + side, x : x + side].std() >= MIN_CROP_STD:
                break
        boxes[i] = side, x, y
    _PLANS[split] = labels, boxes
    return labels, boxes


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

def _load_array_file(path: Path) -> ImageSet:
    labels = None
    try:
        if path.suffix.lower() == ".npy":  # memory-mapped: read in chunks as the source is streamed
            images = np.load(path, mmap_mode="r", allow_pickle=False)
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
# Folders of image files, and CSVs of path,label rows
# ---------------------------------------------------------------------------------------------

def _list_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageSourceError(
            f"{root}: no images found (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    # Class = top-level sub-folder, but only when every image lives in one (otherwise unlabeled).
    tops = [p.relative_to(root).parts for p in files]
    if not all(len(parts) > 1 for parts in tops):
        return files, None, None
    class_names = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(class_names)}
    return files, [index[parts[0]] for parts in tops], class_names


def _list_csv(path: Path) -> tuple[list[Path], list[int], list[str]]:
    """``path,label`` rows (a header row is optional); paths relative to the CSV's folder."""
    try:
        with open(path, newline="") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ImageSourceError(f"{path}: cannot read the labels CSV ({err}).") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise ImageSourceError(f"{path}: no rows; write one 'path,label' row per image.")
    files, names = [], []
    for line, row in rows:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise ImageSourceError(f"{path}: row {line} {row!r} is not 'path,label'.")
        file = (path.parent / row[0].strip()).expanduser()
        if not file.is_file():
            raise ImageSourceError(f"{path}: row {line} names {file}, which does not exist; fix the path or drop the row.")
        files.append(file)
        names.append(row[1].strip())
    unique = set(names)
    class_names = sorted(unique, key=int) if all(n.lstrip("-").isdigit() for n in unique) else sorted(unique)
    index = {name: i for i, name in enumerate(class_names)}
    return files, [index[n] for n in names], class_names


def _survey(files: list[Path]) -> tuple[Counter, Counter]:
    """Sizes and colour of up to SURVEY_FILES files spread over the list (headers only: no decoding)."""
    picks = np.unique(np.linspace(0, len(files) - 1, min(len(files), SURVEY_FILES)).round().astype(int))
    sizes, modes = Counter(), Counter()
    for i in picks:
        try:
            with Image.open(files[i]) as img:
                sizes[img.size] += 1
                modes[_mode_of(img)] += 1
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            continue  # reported when the file is read
    return sizes, modes


def _mode_of(img: Image.Image) -> str:
    return "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F", "P") and not _palette_has_colour(img) else "RGB"


def _palette_has_colour(img: Image.Image) -> bool:
    if img.mode != "P":
        return False
    palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    return bool(len(palette) and (palette != palette[:, :1]).any())


def _file_source(root: Path, files: list[Path], labels: list[int] | None, class_names: list[str] | None,
                 size: int | None, channels: int | None, on_error: str, name: str | None = None) -> ImageSource:
    """Files read one by one at a common size and colour, decided from a survey when not given."""
    notes = []
    sizes, modes = _survey(files)
    if channels is None:
        channels = 3 if modes.get("RGB") else 1
        if len(modes) > 1:
            notes.append(f"images of mixed colour ({modes['L']} grey, {modes['RGB']} colour in a sample of "
                         f"{sum(modes.values())}): all read as RGB (--channels 1 reads them as grey)")
    if size is None:
        if not sizes:
            pass
        elif len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1]:
            size = next(iter(sizes))[0]
        else:
            sides = Counter()
            for (w, h), n in sizes.items():
                sides[min(w, h)] += n
            size = sides.most_common(1)[0][0]
            notes.append(f"images of different sizes (e.g. {', '.join(f'{w}x{h}' for (w, h) in list(sizes)[:3])}): "
                         f"resized and centre-cropped to {size}x{size} (--image-size chooses)")
    if size is None:  # nothing in the survey could be opened: the first read will say why
        size = _first_readable_side(files, on_error)
    skipped_sink: list[tuple[str, str]] = []

    def reader(positions: np.ndarray) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for i in positions:
            path = files[i]
            try:
                with Image.open(path) as img:
                    arr = prepare_image(img, size, channels)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                if on_error == "fail":
                    raise ImageSourceError(
                        f"{path}: unreadable image ({type(err).__name__}: {err}); fix or remove it, "
                        "or pass on_error='skip' (CLI: --on-error skip) to skip bad files."
                    ) from None
                skipped_sink.append((str(path), f"{type(err).__name__}: {err}"))
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                out.append(None)
                continue
            out.append(arr)
        return out

    def identity(positions: np.ndarray) -> bytes:
        parts = []
        for i in positions:
            st = files[i].stat()
            parts.append(f"{files[i].relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}")
        return "\n".join(parts).encode()

    keys = np.asarray([f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f) for f in files],
                      dtype=object)
    return ImageSource(name or str(root), keys, None if labels is None else np.asarray(labels, np.int64), class_names,
                       (size, size, channels), reader, np.arange(len(files)), root=str(root.resolve()),
                       identity_parts=identity, notes=notes, skipped=skipped_sink)


def _first_readable_side(files: list[Path], on_error: str) -> int:
    for path in files:
        try:
            with Image.open(path) as img:
                return min(img.size)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if on_error == "fail":
                raise ImageSourceError(
                    f"{path}: unreadable image ({type(err).__name__}: {err}); fix or remove it, "
                    "or pass on_error='skip' (CLI: --on-error skip) to skip bad files."
                ) from None
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
    raise ImageSourceError(f"{files[0].parent}: none of the {len(files)} image files could be read.")


def prepare_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """One PIL image as a folder's training images are read: grey ``L`` (``channels=1``) or ``RGB``,
    shorter side scaled to ``size`` (bicubic), centre square cut -> uint8 ``[size, size, channels]``.
    Public so that a deployed classifier prepares what it is sent exactly as its training images were."""
    img.load()
    arr = np.asarray(_resize_center_crop(img.convert("L" if channels == 1 else "RGB"), size), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


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



def _conform(images: np.ndarray, size: int | None, channels: int | None) -> np.ndarray:
    """Bring an array source to the requested size/channels (files are conformed one by one as read)."""
    if channels is not None and images.shape[-1] != channels:
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:  # ITU-R 601 luma, as PIL's "L" conversion uses
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            images = np.round(images.astype(np.float32) @ weights)[..., None].astype(np.uint8)
    if size is not None and images.shape[1:3] != (size, size):
        c = images.shape[-1]
        images = np.stack([prepare_image(Image.fromarray(im.squeeze(-1) if c == 1 else im, "L" if c == 1 else "RGB"),
                                         size, c) for im in images])
    return images
