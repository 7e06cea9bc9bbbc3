"""Domain-specific Large Vision Models: the transformer, its data, training, generation and probes."""

from lvm.config import LVMConfig
from lvm.model import LVM, LVMOutput
