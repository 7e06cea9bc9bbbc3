"""The visual tokenizer: images in, discrete token grids out (and back)."""
