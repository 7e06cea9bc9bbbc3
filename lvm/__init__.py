"""Domain-specific Large Vision Models: the transformer, its data, training, generation and probes."""

from lvm.config import LVMConfig
from lvm.model import LVM, LVMOutput


def __getattr__(name: str):
    """``lvm.Classifier`` on first use: the bundle code (tokenizer, probes' heads) stays out of ``import lvm``."""
    if name == "Classifier":
        from lvm.classifier import Classifier

        return Classifier
    raise AttributeError(f"module 'lvm' has no attribute {name!r}")
