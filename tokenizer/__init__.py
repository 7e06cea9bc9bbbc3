"""The visual tokenizer: images in, discrete token grids out (and back)."""
from tokenizer.metrics import code_perplexity, codebook_usage, psnr  # noqa: E402
from tokenizer.model import Tokenizer, TokenizerConfig  # noqa: E402
from tokenizer.train import TokenizerTrainConfig, train_tokenizer  # noqa: E402
