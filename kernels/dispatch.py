"""The one switch that decides, per call, whether an op runs our Triton kernel or the torch path.

Rules: ``auto`` picks Triton for CUDA tensors, Triton for CPU tensors when the
Triton interpreter is on (``TRITON_INTERPRET=1`` set *before* ``kernels`` is imported, because
Triton binds the interpreter at decoration time), and the torch path otherwise. The environment
variable ``LVM_KERNELS=auto|torch|triton`` replaces the ``auto`` default for the whole process;
an explicit ``backend=`` argument always wins. (Number formats, the autocast policy, are the
training runtime's business: ``lvm.runtime.mixed_precision``.)
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: absent on macOS/Windows, and kernels must still import.
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAS_TRITON = False

# Captured at import time, like Triton itself does when it decorates our kernels.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "LVM_KERNELS"


def default_backend() -> str:
    """The process-wide default: ``$LVM_KERNELS`` if set, else ``auto``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}; unset it or pick one of those.")
    return value


def triton_usable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors living on ``device`` in this process."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return not TRITON_INTERPRET
    return device.type == "cpu" and TRITON_INTERPRET


def resolve_backend(backend: str | None, device: torch.device, op: str = "op") -> str:
    """Turn a requested backend into ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}.")
    if backend == "auto":
        backend = default_backend()
    if backend == "auto":
        return "triton" if triton_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        why = "triton is not installed" if not HAS_TRITON else (
            f"tensors are on {device.type} and TRITON_INTERPRET is {'on' if TRITON_INTERPRET else 'off'}"
        )
        raise RuntimeError(
            f"{op}: backend='triton' cannot run here ({why}). Use a CUDA device, or set "
            "TRITON_INTERPRET=1 before importing kernels to run the kernels on CPU, or pass backend='torch'."
        )
    return backend
