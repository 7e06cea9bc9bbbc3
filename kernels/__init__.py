"""Custom kernels for the LVM: flash attention and fused linear + cross-entropy.

Each op lives in its own module with its Triton kernels, its ``torch.autograd.Function`` and a
pure-PyTorch reference beside them; ``kernels.dispatch`` picks the path per call.
"""
from kernels.attention import attention_reference, flash_attention
from kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from kernels.dispatch import HAS_TRITON, default_backend, resolve_backend, triton_usable

__all__ = [
    "flash_attention",
    "attention_reference",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "resolve_backend",
    "default_backend",
    "triton_usable",
    "HAS_TRITON",
]
