"""Tokenizer: shapes, determinism, save/load, errors, metrics, and a tiny end-to-end training run."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenizer.images import ImageSet
from tokenizer.metrics import code_perplexity, codebook_usage, psnr, psnr_per_image
from tokenizer.model import CONFIG_NAME, WEIGHTS_NAME, Tokenizer, TokenizerConfig
from lvm.tokenizer_train import TokenizerTrainConfig, train_tokenizer

TINY = dict(image_size=16, channels=1, patch_size=1, widths=(8, 16), fsq_levels=(4, 3, 3))  # 8x8 grid, 36 codes


def tiny(**kw) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(**{**TINY, **kw})).eval()


def blobs(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Smooth synthetic images (random Gaussian blobs), uint8 [n, size, size, channels]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size, channels), np.float32)
    for i in range(n):
        for _ in range(3):
            cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            amp = rng.uniform(0.3, 1.0, size=channels)
            out[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None] * amp
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_encode_decode_shapes_and_dtypes(quantizer):
    tok = tiny(quantizer=quantizer, codebook_size=32, code_dim=4)
    if quantizer == "vq":  # k-means init happens on the first training batch
        tok.train()
        tok(torch.rand(16, 1, 16, 16))
        tok.eval()
    assert tok.grid == (8, 8)
    assert tok.vocab_size == (36 if quantizer == "fsq" else 32)
    ids = tok.encode(torch.rand(5, 1, 16, 16))
    assert ids.shape == (5, 8, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    img = tok.decode(ids)
    assert img.shape == (5, 1, 16, 16) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_default_config_is_7x7_with_1000_codes():
    cfg = TokenizerConfig()
    assert (cfg.image_size, cfg.channels, cfg.grid, cfg.vocab_size) == (28, 1, (7, 7), 8 * 5 * 5 * 5)


def test_uint8_numpy_hwc_and_float_nchw_give_same_ids():
    tok = tiny()
    u8 = blobs(4)  # [4, 16, 16, 1]
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(tok.encode(u8), tok.encode(as_float))
    assert torch.equal(tok.encode(u8[..., 0]), tok.encode(u8))  # grey [B, H, W] is accepted too


def test_rgb_tokenizer_runs():
    tok = tiny(channels=3)
    ids = tok.encode(blobs(2, channels=3))
    assert tok.decode(ids).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_encode_is_deterministic_and_leaves_training_mode(quantizer):
    tok = tiny(quantizer=quantizer, codebook_size=32, code_dim=4)
    tok.train()
    tok(torch.rand(16, 1, 16, 16))  # VQ: k-means init + EMA update happen here, never inside encode
    x = torch.rand(6, 1, 16, 16)
    a, b = tok.encode(x), tok.encode(x)
    assert torch.equal(a, b)
    assert tok.training  # encode must not silently flip the caller's mode
    assert torch.equal(tok.encode(x, batch_size=4), a)  # chunking does not change the ids


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_encode_pixels_is_encodes_step(quantizer):
    tok = tiny(quantizer=quantizer, codebook_size=32, code_dim=4)
    if quantizer == "vq":
        tok.train()
        tok(torch.rand(16, 1, 16, 16))
        tok.eval()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(tok.encode_pixels(x), tok.encode(x))
        assert torch.equal(tok.encode_pixels(x.double()), tok.encode(x))  # float32 inside, as encode


def test_encode_pixels_exports_for_any_batch():
    """What the classifier's ONNX graph runs: one traced step from pixels to ids, batch axis dynamic."""
    tok = tiny()

    class Ids(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = tok

        def forward(self, pixels):
            return self.tok.encode_pixels(pixels)

    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.export.export(Ids(), (torch.rand(2, 1, 16, 16),), dynamic_shapes={"pixels": {0: batch}})
        x = torch.rand(6, 1, 16, 16)
        assert torch.equal(program.module()(x), tok.encode(x))


def test_decode_inverts_quantisation_of_encoder_output():
    """decode(ids) must equal the training path's reconstruction (same codes, same decoder)."""
    tok = tiny()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        recon, ids, _ = tok(x)
    assert torch.equal(ids, tok.encode(x))
    torch.testing.assert_close(tok.decode(ids), ((recon + 1) / 2).clamp(0, 1))


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_save_load_round_trip_is_identical(tmp_path, quantizer):
    tok = tiny(quantizer=quantizer, codebook_size=32, code_dim=4)
    if quantizer == "vq":
        tok.train()
        tok(torch.rand(16, 1, 16, 16))
        tok.eval()
    tok.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / CONFIG_NAME).is_file()
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["vocab_size"] == tok.vocab_size and meta["grid"] == [8, 8]
    assert meta["image_size"] == 16 and meta["channels"] == 1 and "normalisation" in meta
    assert meta["fingerprint"] == tok.fingerprint and len(meta["fingerprint"]) == 16

    loaded = Tokenizer.from_pretrained(tmp_path)
    x = torch.rand(4, 1, 16, 16)
    ids = tok.encode(x)
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), tok.decode(ids))
    assert loaded.fingerprint == tok.fingerprint


def test_fingerprint_changes_with_weights():
    a, b = tiny(), tiny()
    assert a.fingerprint == b.fingerprint  # same seed, same config
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert a.fingerprint != b.fingerprint


def test_tampered_weights_are_rejected(tmp_path):
    tok = tiny()
    tok.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["fingerprint"] = "0" * 16
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        Tokenizer.from_pretrained(tmp_path)


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the previous tokenizer loadable and no temp file behind."""
    import tokenizer.model as tm

    first = tiny()
    first.save_pretrained(tmp_path)

    def dies_midway(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tm, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        tiny(fsq_levels=(5, 5)).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert Tokenizer.from_pretrained(tmp_path).fingerprint == first.fingerprint


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        Tokenizer.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        Tokenizer.from_pretrained(tmp_path)


def test_wrong_size_or_channels_says_expected_and_got():
    tok = tiny()
    with pytest.raises(ValueError, match=r"1 channel\(s\) at 16x16; got 1 channel\(s\) at 28x28"):
        tok.encode(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"got 3 channel\(s\)"):
        tok.encode(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((2, 16, 16, 1), np.float32))


def test_out_of_range_ids_are_rejected():
    tok = tiny()
    good = torch.zeros(1, 8, 8, dtype=torch.long)
    tok.decode(good)
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode(good + tok.vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode(good - 1)
    with pytest.raises(ValueError, match=r"\[B, 8, 8\]"):
        tok.decode(torch.zeros(1, 7, 7, dtype=torch.long))


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="quantizer"):
        TokenizerConfig(quantizer="lfq")
    with pytest.raises(ValueError, match="image_size"):
        TokenizerConfig(image_size=30, widths=(8, 16, 16))


def test_metrics_against_hand_computed_values():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.full((2, 1, 2, 2), 0.1)  # MSE 0.01 -> 20 dB
    assert psnr(pred, target) == pytest.approx(20.0)
    pred2 = pred.clone()
    pred2[1] = 0.01  # image 2: MSE 1e-4 -> 40 dB
    assert psnr_per_image(pred2, target).tolist() == pytest.approx([20.0, 40.0])
    assert psnr(pred2, target) == pytest.approx(10 * math.log10(1 / ((0.01 + 1e-4) / 2)))
    ids = torch.tensor([[0, 0, 1, 3]])
    assert codebook_usage(ids, 4) == 0.75
    assert code_perplexity(torch.tensor([0, 1, 2, 3]), 8) == pytest.approx(4.0)
    assert code_perplexity(torch.tensor([5, 5, 5]), 8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        codebook_usage(torch.tensor([4]), 4)


def test_tiny_training_run_writes_everything_and_learns(tmp_path):
    images = blobs(96, seed=1)
    train = ImageSet(images=images[:64], labels=None, class_names=None, source="synthetic")
    held = ImageSet(images=images[64:], labels=None, class_names=None, source="synthetic")
    cfg = TokenizerTrainConfig(
        out_dir=str(tmp_path / "run"), patch_size=1, widths="8,16", fsq_levels="4,3,3", steps=40, batch_size=16,
        lr=3e-3, warmup_steps=5, log_every=5, eval_every=20, periodic_eval_images=16, recon_examples=4,
        progress=False, threads=1,
    )
    tok = train_tokenizer(cfg, train_set=train, eval_set=held)
    out = tmp_path / "run"
    for name in (WEIGHTS_NAME, CONFIG_NAME, "metrics.jsonl", "eval.json", "recon.png", "train_config.json"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert any("eval_psnr_db" in r for r in recs)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_eval"] == 32 and ev["grid"] == [8, 8] and ev["vocab_size"] == 36
    assert ev["fingerprint"] == tok.fingerprint
    assert 0 < ev["codebook_usage"] <= 1 and 1 <= ev["perplexity"] <= 36 and ev["encode_images_per_s"] > 0
    # untrained tokenizer of the same shape reconstructs much worse than the trained one
    untrained_psnr = psnr(tiny().decode(tiny().encode(held.images)), torch.from_numpy(held.images).permute(0, 3, 1, 2) / 255.0)
    assert ev["psnr_db"] > untrained_psnr + 3
    from PIL import Image

    png = Image.open(out / "recon.png")
    assert png.width == 4 * 16 * 6 and png.height == 2 * 16 * 6  # 4 examples, 2 rows, upscaled x6
    reloaded = Tokenizer.from_pretrained(out)
    assert torch.equal(reloaded.encode(held.images), tok.encode(held.images))


def test_bf16_training_reconstructs_as_well_as_fp32(tmp_path):
    """Tokenizer training under bf16 autocast (the default on AMX CPUs) ends within 1 dB of fp32."""
    images = blobs(96, seed=1)
    train = ImageSet(images=images[:64], labels=None, class_names=None, source="synthetic")
    held = ImageSet(images=images[64:], labels=None, class_names=None, source="synthetic")
    psnrs = {}
    for precision in ("fp32", "bf16"):
        cfg = TokenizerTrainConfig(
            out_dir=str(tmp_path / precision), patch_size=1, widths="8,16", fsq_levels="4,3,3", steps=40,
            batch_size=16, lr=3e-3, warmup_steps=5, eval_every=0, recon_examples=2, progress=False, threads=1,
            precision=precision,
        )
        train_tokenizer(cfg, train_set=train, eval_set=held)
        psnrs[precision] = json.loads((tmp_path / precision / "eval.json").read_text())["psnr_db"]
    assert psnrs["bf16"] != psnrs["fp32"]  # bf16 really ran
    assert abs(psnrs["bf16"] - psnrs["fp32"]) < 1.0, psnrs
    with pytest.raises(ValueError, match="precision"):
        train_tokenizer(TokenizerTrainConfig(out_dir=str(tmp_path / "bad"), precision="fp8", steps=1, progress=False),
                        train_set=train, eval_set=held)


def test_holdout_split_when_no_eval_split(tmp_path):
    images = blobs(40, seed=2)
    np.save(tmp_path / "imgs.npy", images)
    cfg = TokenizerTrainConfig(
        data=str(tmp_path / "imgs.npy"), split="all", eval_split="", eval_holdout=8, out_dir=str(tmp_path / "run"),
        patch_size=1, widths="8,16", fsq_levels="4,3,3", steps=3, batch_size=8, eval_every=0, recon_examples=2,
        progress=False, threads=1,
    )
    train_tokenizer(cfg)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["n_eval"] == 8 and ev["n_train"] == 32


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import lvm.tokenizer_train as tt

    images = blobs(48, seed=3)
    train = ImageSet(images=images[:32], labels=None, class_names=None, source="synthetic")
    held = ImageSet(images=images[32:], labels=None, class_names=None, source="synthetic")

    def cfg(out):
        return TokenizerTrainConfig(
            out_dir=str(tmp_path / out), patch_size=1, widths="8,16", fsq_levels="4,3,3", steps=10, batch_size=8,
            warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=4, recon_examples=2, progress=False, threads=1,
        )

    straight = train_tokenizer(cfg("a"), train_set=train, eval_set=held)

    real_lr = tt.warmup_cosine

    def crash_at_6(step, *args):
        if step == 5:  # 0-based: the sixth step
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(tt, "warmup_cosine", crash_at_6)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg("b"), train_set=train, eval_set=held)
    assert not (tmp_path / "b" / "eval.json").exists()
    monkeypatch.setattr(tt, "warmup_cosine", real_lr)
    resumed = train_tokenizer(cfg("b"), train_set=train, eval_set=held)
    assert resumed.fingerprint == straight.fingerprint
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:10] == list(range(1, 11))  # no duplicated steps 5 after the resume at step 4

    changed = cfg("b")
    changed.lr = 1.0
    with pytest.raises(ValueError, match="resume=False"):
        train_tokenizer(changed, train_set=train, eval_set=held)


def test_time_budget_picks_the_steps_and_they_reproduce_the_tokenizer(tmp_path, monkeypatch):
    from functools import partial

    import lvm.tokenizer_train as tt
    from lvm.runtime import StepBudget

    images = blobs(48, seed=4)
    train = ImageSet(images=images[:32], labels=None, class_names=None, source="synthetic")
    held = ImageSet(images=images[32:], labels=None, class_names=None, source="synthetic")
    ticks = iter(range(10**6))  # 0.1 s per clock reading: independent of the machine's load
    monkeypatch.setattr(tt, "StepBudget", partial(StepBudget, clock=lambda: 0.1 * next(ticks)))

    def cfg(out, **kw):
        return TokenizerTrainConfig(out_dir=str(tmp_path / out), patch_size=1, widths="8,16", fsq_levels="4,3,3",
                                    batch_size=8, warmup_steps=6, eval_every=0, recon_examples=2, progress=False,
                                    threads=1, **kw)

    budgeted = train_tokenizer(cfg("budget", steps=10_000, time_budget=0.05), train_set=train, eval_set=held)
    ev = json.loads((tmp_path / "budget" / "eval.json").read_text())
    assert 6 <= ev["steps"] == ev["planned_steps"] < 10_000
    fixed = train_tokenizer(cfg("fixed", steps=ev["steps"]), train_set=train, eval_set=held)
    assert fixed.fingerprint == budgeted.fingerprint
