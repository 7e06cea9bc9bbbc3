"""The fine-tuning levers of issue #14: augmented views, LP-FT, layer-wise LR decay, training only the
top blocks, mixup and weight EMA. Each test checks the lever does what it says, not only that it runs."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from lvm.attentive import (AttentiveClassifier, HeadTrainConfig, accuracy, backbone_lr_scales, fine_tune,
                           fit_attentive, split_rows, train_classifier)
from lvm.augment import augmented_views, mirrored_view, token_views
from lvm.data import SpecialTokens
from lvm.probe import LinearProbe, ProbeConfig, ProbeError, extract_features, run_probe


@pytest.fixture(scope="module")
def tiny(tiny_pipeline):
    from lvm.checkpoint import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"], "")
    data = np.load(tiny_pipeline["npz"])
    images = data["images"][..., None]  # [N, 16, 16, 1]
    ids = tok.encode(images)  # [N, h, w]
    return {"model": model, "tok": tok, "images": images, "ids": ids, "labels": torch.from_numpy(data["labels"]),
            "special": SpecialTokens(tok.vocab_size)}


def test_augmented_views_are_the_tokens_of_flipped_and_shifted_images(tiny):
    tok, images = tiny["tok"], tiny["images"][:20]
    plain = tok.encode(images).reshape(20, -1)
    same = augmented_views(tok, images, views=2, flip=False, pad=0)
    assert same.shape == (2, 20, plain.shape[1]) and torch.equal(same[0], plain) and torch.equal(same[1], plain)
    mirror = mirrored_view(tok, images)[0]
    flips = augmented_views(tok, images, views=3, flip=True, pad=0, seed=1)
    is_plain, is_mirror = (flips == plain).all(-1), (flips == mirror).all(-1)
    assert (is_plain | is_mirror).all()  # every row is the image or its mirror...
    assert is_mirror.float().mean() > 0.2 and is_plain.float().mean() > 0.2  # ... drawn at random
    shifted = augmented_views(tok, images, views=2, flip=False, pad=3, seed=2)
    assert not (shifted == plain).all(-1).all()  # translations change tokens
    with pytest.raises(ValueError, match="views"):
        augmented_views(tok, images, views=0)


def test_token_views_picks_the_augmentation_the_flags_ask_for(tiny):
    tok, images = tiny["tok"], tiny["images"][:12]
    assert torch.equal(token_views(tok, images, 0, flip=True), mirrored_view(tok, images))
    assert token_views(tok, images, 0, flip=False) is None
    drawn = token_views(tok, images, 2, flip=True, seed=3)
    assert drawn.shape[0] == 2 and torch.equal(drawn, augmented_views(tok, images, 2, flip=True, seed=3))


class _Recorder(nn.Module):
    """A linear classifier that remembers the first feature of every training row it reads."""

    def __init__(self):
        super().__init__()
        self.linear, self.seen = nn.Linear(4, 2), []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0].clone())
        return self.linear(x)


def test_train_classifier_reads_each_view_as_often_as_the_original():
    inputs = torch.zeros(400, 4)
    views = torch.stack([torch.full((400, 4), float(k)) for k in (1, 2, 3)])  # view k is all k
    labels = torch.arange(400) % 2
    model = _Recorder()
    train_classifier(model, inputs, labels, HeadTrainConfig(epochs=100, max_steps=60, batch_size=64), views=views)
    seen = torch.cat(model.seen)
    shares = torch.stack([(seen == k).float().mean() for k in range(4)])
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.05), shares


def test_layer_decay_scales_and_top_blocks_freeze(tiny):
    import copy

    backbone = copy.deepcopy(tiny["model"])  # tiny preset: 2 blocks
    layer = len(backbone.blocks)
    scale = backbone_lr_scales(backbone, layer, HeadTrainConfig(backbone_lr_scale=0.1, layer_decay=0.5))
    top, bottom = backbone.blocks[-1], backbone.blocks[0]
    assert scale[id(next(top.parameters()))] == pytest.approx(0.1)
    assert scale[id(next(bottom.parameters()))] == pytest.approx(0.1 * 0.5 ** (layer - 1))
    assert scale[id(backbone.tok_emb.weight)] == pytest.approx(0.1 * 0.5 ** layer)

    model, ids, y = tiny["model"], tiny["ids"].reshape(120, -1).long(), tiny["labels"]
    cfg = HeadTrainConfig(epochs=10, max_steps=8, batch_size=16, lr=3e-3, backbone_lr_scale=1.0, train_blocks=1)
    clf, _ = fine_tune(model, ids[:90], y[:90], layer=2, special=tiny["special"], cfg=cfg)
    changed = lambda a, b: any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not changed(clf.backbone.blocks[0], model.blocks[0])  # frozen below the top block
    assert torch.equal(clf.backbone.tok_emb.weight, model.tok_emb.weight)
    assert changed(clf.backbone.blocks[1], model.blocks[1])  # the top block trained


def test_lpft_starts_from_the_probe_and_never_ends_below_it_on_validation(tiny):
    """With a learning rate that wrecks every step, LP-FT must hand back the probe itself."""
    model, ids, y, special = tiny["model"], tiny["ids"], tiny["labels"], tiny["special"]
    flat = ids.reshape(120, -1).long()
    cfg = HeadTrainConfig(epochs=10, max_steps=6, batch_size=16, lr=50.0, backbone_lr_scale=1.0, evals=3)
    clf, val = fine_tune(model, flat[:90], y[:90], layer=1, special=special, cfg=cfg, init="probe", hw=ids.shape[1:])
    tr, _ = split_rows(90, cfg)
    feats = extract_features(model, ids[:90][tr], special, 1, "grid", 3)
    probe = LinearProbe.fit(feats, y[:90][tr], seed=cfg.seed, classes=3)
    expected = probe.predict(extract_features(model, ids[90:], special, 1, "grid", 3))
    got = torch.cat([clf(flat[90:]).argmax(1)])
    assert torch.equal(got, expected)  # the probe's predictions, exactly: the wrecked steps were not kept
    with pytest.raises(ValueError, match="init"):
        fine_tune(model, flat[:90], y[:90], layer=1, special=special, cfg=cfg, init="zeros")


def test_refit_fits_the_head_on_every_labelled_row_after_choosing_the_backbone(tiny):
    """The wrecking learning rate again keeps the initial backbone; with ``refit`` the head must then be the
    linear probe of all 90 labelled rows (validation rows included), not of the 81 training rows."""
    model, ids, y, special = tiny["model"], tiny["ids"], tiny["labels"], tiny["special"]
    flat = ids.reshape(120, -1).long()
    cfg = HeadTrainConfig(epochs=10, max_steps=6, batch_size=16, lr=50.0, backbone_lr_scale=1.0, evals=3)
    clf, _ = fine_tune(model, flat[:90], y[:90], layer=1, special=special, cfg=cfg, init="probe", hw=ids.shape[1:],
                       refit=True)
    every = LinearProbe.fit(extract_features(model, ids[:90], special, 1, "grid", 3), y[:90], seed=cfg.seed, classes=3)
    tr, _ = split_rows(90, cfg)
    part = LinearProbe.fit(extract_features(model, ids[:90][tr], special, 1, "grid", 3), y[:90][tr], seed=cfg.seed,
                           classes=3)
    assert torch.allclose(clf.classifier.linear.weight, every.weight)
    assert not torch.allclose(clf.classifier.linear.weight, part.weight)
    expected = every.predict(extract_features(model, ids[90:], special, 1, "grid", 3))
    assert torch.equal(clf(flat[90:]).argmax(1), expected)


def _where_task(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 9, 16, generator=g)
    return x, x[:, 3, :4].argmax(1)


def test_mixup_still_learns_and_mixes_features():
    x, y = _where_task(1500, 0)
    xt, yt = _where_task(500, 1)
    cfg = HeadTrainConfig(epochs=40, max_steps=400, batch_size=64, lr=3e-3, mixup=0.4)
    torch.manual_seed(0)
    model = AttentiveClassifier(16, 9, 4)
    calls = []
    original = model.logits
    model.logits = lambda f: calls.append(f.shape) or original(f)
    clf, _ = train_classifier(model, x, y, cfg)
    assert sum(s == (64, 16) for s in calls) == 400  # every training step went through features -> mix -> logits
    assert accuracy(clf, xt, yt) > 0.8


def test_ema_keeps_the_averaged_weights():
    x, y = _where_task(600, 0)
    torch.manual_seed(0)
    start = AttentiveClassifier(16, 9, 4)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    slow, _ = train_classifier(start, x, y, HeadTrainConfig(epochs=40, max_steps=50, batch_size=64, lr=1e-2,
                                                            ema=0.999999, evals=1))
    drift = max((slow.state_dict()[k] - v).abs().max().item() for k, v in init.items())
    torch.manual_seed(0)
    raw, _ = train_classifier(AttentiveClassifier(16, 9, 4), x, y,
                              HeadTrainConfig(epochs=40, max_steps=50, batch_size=64, lr=1e-2, evals=1))
    moved = max((raw.state_dict()[k] - v).abs().max().item() for k, v in init.items())
    assert drift < 1e-3 < moved  # the kept weights are the (barely moving) average, not the trained ones


def test_probe_runs_the_levers_end_to_end(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], methods=["finetune"],
                      fractions=[1.0], seeds=1, layers=[1], finetune_max_steps=6, head_batch_size=16, baselines=False,
                      finetune_views=2, finetune_init="probe", finetune_layer_decay=0.8, finetune_train_blocks=1,
                      finetune_mixup=0.2, finetune_ema=0.9, out=str(tmp_path))
    rows = run_probe(cfg)["rows"]
    assert [(r["method"], r["fraction"]) for r in rows] == [("finetune", 1.0)]
    assert 0 <= rows[0]["acc_mean"] <= 1
    for bad in ({"finetune_init": "zeros"}, {"finetune_views": -1}, {"finetune_ema": 1.0},
                {"finetune_layer_decay": 0.0}):
        with pytest.raises(ProbeError):
            run_probe(ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], out=str(tmp_path),
                                  **bad))
