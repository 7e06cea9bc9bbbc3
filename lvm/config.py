"""Model configuration for the LVM: one dataclass, named size presets, and its config.json form."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Sizes follow LLaMA-style shapes (SwiGLU width ~8/3 d, head dim 64 from `small` up) so that the
# flash-attention kernel sees the head dims it is tuned for. `vocab_size` is always the caller's.
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: builds in milliseconds, runs a forward pass on CPU in well under a second.
    "tiny": dict(n_layer=2, n_head=2, d_model=64, max_seq_len=128),
    # Trains on a laptop CPU in minutes; ~4.7 M non-embedding parameters.
    "small": dict(n_layer=6, n_head=4, d_model=256, max_seq_len=512),
    # GPT-2-small shape: ~85 M non-embedding parameters.
    "base": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    # ~300 M non-embedding parameters.
    "300m": dict(n_layer=24, n_head=16, d_model=1024, max_seq_len=2048),
    # TinyLlama-like depth/width (without grouped-query attention): ~1.1 B non-embedding parameters.
    "1b": dict(n_layer=22, n_head=32, d_model=2048, max_seq_len=2048),
}


@dataclass
class LVMConfig:
    """Everything that fixes the LVM's architecture; saved next to the weights as config.json."""

    vocab_size: int  # codebook ids + special tokens (BOS/SEP/EOS/PAD), as the data layer counts them
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    d_ff: int | None = None  # SwiGLU hidden width; None -> 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # pretrained as a prefix LM (AIM's prefix attention: a random leading part of each sentence attends both ways,
    # the loss is on the rest), so features are read with bidirectional attention over the whole image
    prefix_lm: bool = False

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        """Fail at construction, naming the field, rather than deep inside a kernel launch."""
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LVMConfig.{name}={value!r} must be a positive integer.")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"LVMConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head so that d_model / n_head is a power of two between 16 and 128."
            )
        hd = self.head_dim
        if hd < 16 or hd > 128 or hd & (hd - 1):
            raise ValueError(
                f"LVMConfig head dim d_model/n_head = {self.d_model}/{self.n_head} = {hd} must be a power of "
                "two in 16..128 (the flash-attention kernel's tile sizes); change d_model or n_head."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LVMConfig.dropout={self.dropout!r} must be in [0, 1).")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(
                f"LVMConfig rope_theta={self.rope_theta}, norm_eps={self.norm_eps}, init_std={self.init_std} "
                "must all be > 0."
            )

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> "LVMConfig":
        """A named size (tiny/small/base/300m/1b) with any field overridden, e.g. max_seq_len=256."""
        if name not in PRESETS:
            raise ValueError(f"Unknown LVM preset {name!r}; valid presets are: {', '.join(PRESETS)}.")
        _check_fields(overrides, f"LVMConfig.preset({name!r}) override")
        return cls(**{**PRESETS[name], "vocab_size": vocab_size, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every field resolved (d_ff included), for config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LVMConfig":
        """Inverse of to_dict; unknown keys are an error so a mismatched config.json is caught early."""
        _check_fields(data, "config")
        if "vocab_size" not in data:
            raise ValueError("config is missing 'vocab_size'; it must hold the LVM's full vocabulary size.")
        return cls(**data)


def default_d_ff(d_model: int) -> int:
    """8/3 * d keeps SwiGLU's three matrices at the cost of a 4*d two-matrix MLP; 64-aligned for matmuls."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def _check_fields(data: dict[str, Any], where: str) -> None:
    valid = {f.name for f in dataclasses.fields(LVMConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; valid fields are: {', '.join(sorted(valid))}.")
