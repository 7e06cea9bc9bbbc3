"""Test wiring: Triton runs under its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before ``kernels`` is imported (Triton binds it when it decorates
the kernels). Model-level tests default to the torch kernels on CPU (``LVM_KERNELS=torch``) so
they stay fast; kernel tests ask for ``backend="triton"`` explicitly.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LVM_KERNELS", "torch")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def fashion_mnist_dir():
    """Path to the real Fashion-MNIST IDX files, or a clean skip when the Debian package is absent."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
    return FASHION_MNIST_DIR


class PixelTokenizer:
    """Token ids are the pixels themselves, so a test writes shards holding exactly the ids it wants."""

    def __init__(self, vocab_size: int, grid: tuple[int, int], fingerprint: str = "pix"):
        self.vocab_size, self.grid, self.fingerprint = vocab_size, grid, fingerprint

    def encode(self, images):
        import numpy as np

        return torch.from_numpy(np.asarray(images)[..., 0].astype(np.int64))


@pytest.fixture
def pixel_shards():
    """``write(path, ids [N, h, w], vocab_size, fingerprint="pix", labels=None) -> str``: token shards of ``ids``."""
    import numpy as np

    from tokenizer.images import ImageSet
    from tokenizer.shards import write_token_shards

    def write(path, ids, vocab_size, fingerprint="pix", labels=None):
        images = ImageSet(np.asarray(ids).astype(np.uint8)[..., None], labels, None, str(path))
        write_token_shards(PixelTokenizer(vocab_size, ids.shape[1:], fingerprint), images, path, progress=False)
        return str(path)

    return write


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A labelled 16x16 image set, an (untrained) tiny tokenizer, its shards, and a tiny LVM
    trained a few steps: the smallest complete stack for generate/probe/quickstart tests."""
    import numpy as np

    from lvm.train import TrainConfig, train
    from tokenizer.images import load_images
    from tokenizer.model import Tokenizer, TokenizerConfig
    from tokenizer.shards import write_token_shards

    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    images = rng.integers(0, 60, (120, 16, 16), dtype=np.uint8)
    for i, c in enumerate(labels):  # class = which horizontal band is bright
        images[i, 5 * c : 5 * c + 5] += 180
    np.savez(root / "images.npz", images=images, labels=labels)
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(image_size=16, widths=(16, 16), fsq_levels=(4, 4)))
    tok.save_pretrained(root / "tokenizer")
    write_token_shards(tok, load_images(root / "images.npz"), root / "shards", progress=False,
                       extra_meta={"tokenizer_path": str(root / "tokenizer")})
    train(TrainConfig(data=str(root / "shards"), out=str(root / "lvm"), preset="tiny", context_len=64, steps=3,
                      batch_size=4, eval_every=3, ckpt_every=3, eval_rows=2, eval_fraction=0.1, progress=False))
    return {"root": root, "npz": str(root / "images.npz"), "tokenizer": str(root / "tokenizer"),
            "shards": str(root / "shards"), "lvm": str(root / "lvm"), "tok": tok}
