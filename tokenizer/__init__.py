"""The visual tokenizer: images in, discrete token grids out (and back).

Its trainer is ``lvm.tokenizer_train`` (beside the other trainers, on the shared runtime).
"""
from tokenizer.metrics import code_perplexity, codebook_usage, psnr  # noqa: E402
from tokenizer.model import Tokenizer, TokenizerConfig  # noqa: E402
