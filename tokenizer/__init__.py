"""The visual tokenizer: images in, discrete token grids out (and back).

Its trainer is ``lvm.tokenizer_train`` (beside the other trainers, on the shared runtime).

The package's names load on first use (PEP 562), so importing a light submodule such as
``tokenizer.atomic`` (which the runtime and the kernel benchmarks need) does not pull in the
quantizer library: a GPU box that holds only torch and triton can still run the benchmarks.
"""
from importlib import import_module

_LAZY = {
    "code_perplexity": "tokenizer.metrics", "codebook_usage": "tokenizer.metrics", "psnr": "tokenizer.metrics",
    "Tokenizer": "tokenizer.model", "TokenizerConfig": "tokenizer.model",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
