"""Generation end to end on the tiny stack: shapes, determinism, completion, mismatch errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from lvm.generate import CheckpointMismatch, GenerateConfig, continue_images, generate, load_model_and_tokenizer
from tokenizer.model import Tokenizer, TokenizerConfig


def _cfg(p, tmp_path, **kw):
    return GenerateConfig(checkpoint=p["lvm"], source=p["npz"], prompts=2, samples=3, out=str(tmp_path), **kw)


def test_generate_writes_grid_and_tokens(tiny_pipeline, tmp_path):
    summary = generate(_cfg(tiny_pipeline, tmp_path / "a", seed=1))
    tokens = np.load(summary["tokens"])
    assert tokens.shape == (2, 3, 4, 4)
    assert tokens.max() < tiny_pipeline["tok"].vocab_size  # no special token inside an image
    grid = Image.open(summary["grid"])
    assert grid.width > grid.height  # 2 rows of 1 prompt + 3 samples
    again = np.load(generate(_cfg(tiny_pipeline, tmp_path / "b", seed=1))["tokens"])
    other = np.load(generate(_cfg(tiny_pipeline, tmp_path / "c", seed=2))["tokens"])
    assert np.array_equal(tokens, again) and not np.array_equal(tokens, other)


def test_complete_keeps_the_given_rows(tiny_pipeline):
    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    images = np.load(tiny_pipeline["npz"])["images"][:2, None, :, :, None]  # [P=2, k=1, H, W, C]
    out = continue_images(model, tok, images, samples=2, complete_rows=2, seed=0)
    given = tok.encode(images[:, 0])[:, :2]  # [P, 2, w]
    assert torch.equal(out["tokens"][:, :, :2], given[:, None].expand(-1, 2, -1, -1))
    assert out["images"].shape == (2, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="complete_rows"):
        continue_images(model, tok, images, complete_rows=4)


def test_in_context_pairs_prompt(tiny_pipeline):
    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    images = np.load(tiny_pipeline["npz"])["images"][:4].reshape(2, 2, 16, 16, 1)
    with pytest.raises(ValueError, match="exceeds max_seq_len 64"):  # A1 t(A1) A2 t(A2): 69 tokens
        continue_images(model, tok, images, samples=1, transform="hflip")
    out = continue_images(model, tok, images[:, :1], samples=2, transform="hflip")
    assert out["prompt_images"].shape == (2, 1, 1, 16, 16)  # A1 -> the model writes t(A1)
    assert out["images"].shape == (2, 2, 1, 16, 16)


def test_tokenizer_checkpoint_mismatch(tiny_pipeline, tmp_path):
    torch.manual_seed(123)
    Tokenizer(TokenizerConfig(image_size=16, widths=(16, 16), fsq_levels=(4, 4))).save_pretrained(tmp_path / "t2")
    with pytest.raises(CheckpointMismatch, match="not the one checkpoint"):
        load_model_and_tokenizer(tiny_pipeline["lvm"], tmp_path / "t2")
    Tokenizer(TokenizerConfig(image_size=16, widths=(16, 16), fsq_levels=(4, 5))).save_pretrained(tmp_path / "t3")
    with pytest.raises(CheckpointMismatch):
        load_model_and_tokenizer(tiny_pipeline["lvm"], tmp_path / "t3")


def _captured_prompt(model, monkeypatch):
    """Record the prompt continue_images hands to model.generate."""
    seen = []
    real = model.generate

    def spy(prompt, *args, **kwargs):
        seen.append(prompt.clone())
        return real(prompt, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_prompts_follow_the_sentence_layout(tiny_pipeline, monkeypatch):
    """Continue: [BOS] A1 [SEP] A2 [SEP]; complete: [BOS] A1 [SEP] top rows of A2 (nothing after)."""
    from lvm.data import SpecialTokens, visual_sentence

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"])
    sp = SpecialTokens(tok.vocab_size)
    images = np.load(tiny_pipeline["npz"])["images"][:2].reshape(1, 2, 16, 16, 1)
    a1, a2 = (tok.encode(images[0, j : j + 1])[0].reshape(-1).tolist() for j in range(2))  # 16 ids each
    seen = _captured_prompt(model, monkeypatch)
    continue_images(model, tok, images, samples=2)
    continue_images(model, tok, images, samples=1, complete_rows=1)
    assert seen[0].tolist() == [[sp.bos, *a1, sp.sep, *a2, sp.sep]] * 2
    assert seen[1].tolist() == [[sp.bos, *a1, sp.sep, *a2[:4]]]  # the 4x4 grid's top row
    assert seen[1][0].tolist() == visual_sentence([a1, a2], sp, end="open", last_tokens=4).tolist()
