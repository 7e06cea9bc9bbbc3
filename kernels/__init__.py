"""Custom kernels for the LVM: flash attention and fused linear + cross-entropy.

Each op lives in its own module with its Triton kernels, its autograd wiring and a pure-PyTorch
reference beside them; ``kernels.dispatch`` picks the path per call. The kernel calls are torch
custom operators (``torch.ops.lvm.flash_attn_fwd/bwd``, ``torch.ops.lvm.linear_ce_fwd/bwd``),
registered on import, so torch.compile keeps a model that calls them in one graph.
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
