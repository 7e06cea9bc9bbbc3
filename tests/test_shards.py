"""Token shard writing: layout, labels, identity checks, and resume after an interruption."""
import json

import numpy as np
import pytest
import torch

from tokenizer.images import ImageSet
from tokenizer.shards import ShardError, read_token_shards, token_dtype, write_token_shards


class FakeTokenizer:
    """Deterministic stand-in: each 2x2 pixel block's mean becomes its token id."""

    def __init__(self, vocab_size=256, fingerprint="fake-1", fail_after=None):
        self.vocab_size, self.fingerprint, self.grid = vocab_size, fingerprint, (4, 4)
        self.calls, self.fail_after = 0, fail_after

    def encode(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        x = torch.from_numpy(np.asarray(images)).float()[..., 0]  # [B, 8, 8]
        blocks = x.unflatten(1, (4, 2)).unflatten(3, (4, 2)).mean(dim=(2, 4))  # [B, 4, 4]
        return (blocks.long() * (self.vocab_size - 1)) // 255


def _images(n=37, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    return ImageSet(imgs, rng.integers(0, 5, n) if labels else None, None, f"synthetic-{seed}")


def test_write_and_read(tmp_path):
    imgs, tok = _images(), FakeTokenizer()
    meta = write_token_shards(tok, imgs, tmp_path, batch_size=10, progress=False)
    shards = read_token_shards(tmp_path)
    assert meta["count"] == 37 and meta["grid"] == [4, 4] and meta["vocab_size"] == 256
    assert shards.tokens.dtype == np.uint16 and shards.tokens.shape == (37, 4, 4)
    assert np.array_equal(shards.tokens, FakeTokenizer().encode(imgs.images).numpy())
    assert np.array_equal(shards.labels, imgs.labels)
    assert meta["tokenizer_fingerprint"] == "fake-1"
    assert not (tmp_path / "progress.json").exists() and not (tmp_path / "tokens.bin.partial").exists()


def test_int32_for_large_vocab_and_unlabeled(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.int32
    imgs = _images(labels=False)
    imgs.images[0] = 255  # a white image maps to the largest id
    write_token_shards(FakeTokenizer(vocab_size=70000), imgs, tmp_path, progress=False)
    shards = read_token_shards(tmp_path)
    assert shards.tokens.dtype == np.int32 and shards.labels is None
    assert shards.tokens.max() == 69999  # ids beyond uint16 survive


def test_resume_after_interruption(tmp_path):
    imgs = _images(n=95)
    straight = tmp_path / "straight"
    write_token_shards(FakeTokenizer(), imgs, straight, batch_size=10, progress=False)

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(FakeTokenizer(fail_after=4), imgs, resumed, batch_size=10, progress=False)
    assert not (resumed / "meta.json").exists()
    assert json.loads((resumed / "progress.json").read_text())["done"] == 40
    with pytest.raises(ShardError, match="unfinished run"):
        read_token_shards(resumed)

    second = FakeTokenizer()
    write_token_shards(second, imgs, resumed, batch_size=10, progress=False)
    assert second.calls == 6  # batches 40..95 only: nothing redone
    assert np.array_equal(read_token_shards(resumed).tokens, read_token_shards(straight).tokens)
    assert (resumed / "tokens.bin").stat().st_size == 95 * 16 * 2  # nothing duplicated

    third = FakeTokenizer()
    write_token_shards(third, imgs, resumed, batch_size=10, progress=False)
    assert third.calls == 0  # finished: a re-run is a no-op


def test_progress_of_another_run_is_not_resumed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(FakeTokenizer(fail_after=2), _images(seed=1), tmp_path, batch_size=10, progress=False)
    tok = FakeTokenizer()
    write_token_shards(tok, _images(seed=2), tmp_path, batch_size=10, progress=False)
    assert tok.calls == 4  # all 37 images encoded afresh
    assert np.array_equal(read_token_shards(tmp_path).tokens, FakeTokenizer().encode(_images(seed=2).images).numpy())


def test_other_tokenizer_refused_unless_overwrite(tmp_path):
    write_token_shards(FakeTokenizer(), _images(), tmp_path, progress=False)
    with pytest.raises(ShardError, match="another tokenizer.*--overwrite"):
        write_token_shards(FakeTokenizer(fingerprint="fake-2"), _images(), tmp_path, progress=False)
    meta = write_token_shards(FakeTokenizer(fingerprint="fake-2"), _images(), tmp_path, overwrite=True, progress=False)
    assert meta["tokenizer_fingerprint"] == "fake-2"


def test_read_errors(tmp_path):
    with pytest.raises(ShardError, match="lvm tokenize"):
        read_token_shards(tmp_path)
    write_token_shards(FakeTokenizer(), _images(), tmp_path, progress=False)
    with open(tmp_path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ShardError, match="shorter"):
        read_token_shards(tmp_path)
