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
