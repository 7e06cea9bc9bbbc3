"""Attentive probe and fine-tuning: the folded pooling equals cross-attention, heads learn where to
look, fine-tuning trains a copy, and ``lvm probe`` runs every method end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvm.attentive import AttentivePool, HeadTrainConfig, accuracy, fine_tune, fit_attentive
from lvm.probe import LinearProbe, ProbeConfig, ProbeError, run_probe


def test_folded_pooling_equals_cross_attention():
    """One learned query, explicit W_q/W_k/W_v per head == the folded W_k^T q form the pool stores."""
    torch.manual_seed(0)
    dim, tokens, heads = 16, 7, 4
    dh = dim // heads
    pool = AttentivePool(dim, tokens, heads=heads)
    with torch.no_grad():
        pool.pos.normal_()
    x = torch.randn(3, tokens, dim)
    q0, wq, wk, wv = torch.randn(dim), torch.randn(dim, dim), torch.randn(dim, dim), torch.randn(dim, dim)

    xn = F.layer_norm(x, (dim,), pool.norm.weight, pool.norm.bias) + pool.pos  # what attention reads
    q = (wq @ q0).view(heads, dh)
    k = (xn @ wk.T).view(3, tokens, heads, dh)
    v = (xn @ wv.T).view(3, tokens, heads, dh)
    att = torch.einsum("hd,bthd->bht", q, k).div(math.sqrt(dh)).softmax(-1)
    expected = F.layer_norm(torch.einsum("bht,bthd->bhd", att, v).flatten(1), (dim,),
                            pool.out_norm.weight, pool.out_norm.bias)

    with torch.no_grad():
        pool.query.copy_(torch.einsum("hd,hde->he", q, wk.view(heads, dh, dim)).div(math.sqrt(dh))[None])
        pool.value.copy_(wv.view(heads, dh, dim))
    torch.testing.assert_close(pool(x), expected, rtol=1e-4, atol=1e-4)
    assert pool.attention_map(x).shape == (3, 1, heads, tokens)


def _where_task(n, seed):
    """The class is decided by one token's first 4 channels; the other tokens are noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 9, 16, generator=g)
    y = x[:, 3, :4].argmax(1)
    return x, y


def test_attentive_probe_learns_where_to_look_and_not_noise():
    x, y = _where_task(1500, 0)
    xt, yt = _where_task(500, 1)
    cfg = HeadTrainConfig(epochs=40, max_steps=600, batch_size=64, lr=3e-3)
    clf, val = fit_attentive(x, y, cfg)
    acc = accuracy(clf, xt, yt)
    mean_acc = LinearProbe.fit(x.mean(1), y).accuracy(xt.mean(1), yt)
    assert acc > 0.8 and acc > mean_acc + 0.2, (acc, mean_acc)  # mean pooling dilutes the one token
    assert 0 < val <= 1
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    clf_noise, _ = fit_attentive(x, shuffled, cfg)
    assert accuracy(clf_noise, xt, yt) < 0.45  # 4 classes: chance is 0.25


def test_fine_tune_trains_a_copy_and_learns(tiny_pipeline):
    from lvm.data import SpecialTokens
    from lvm.checkpoint import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(tiny_pipeline["lvm"], "")
    data = np.load(tiny_pipeline["npz"])
    ids = tok.encode(data["images"][..., None]).reshape(120, -1).long()
    labels = torch.from_numpy(data["labels"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = HeadTrainConfig(epochs=30, max_steps=150, batch_size=16, lr=3e-3, backbone_lr_scale=0.3)
    clf, val = fine_tune(model, ids[:90], labels[:90], layer=1, special=SpecialTokens(tok.vocab_size), cfg=cfg,
                         flipped_ids=ids[:90].flip(0))
    assert len(clf.backbone.blocks) == 1  # only what layer 1 needs is kept and trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the LVM itself is untouched
    changed = [not torch.equal(before[f"blocks.0.{k}"], v) for k, v in clf.backbone.blocks[0].state_dict().items()]
    assert all(changed)  # the copy's block was trained
    assert accuracy(clf, ids[90:], labels[90:]) > 0.6  # bright-band classes; chance is 1/3


def test_probe_every_method_end_to_end(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"],
                      methods=["linear", "attentive", "finetune"], fractions=[0.5, 1.0], seeds=1, layers=[1],
                      head_max_steps=30, finetune_max_steps=10, head_batch_size=16, out=str(tmp_path))
    rows = run_probe(cfg)["rows"]
    got = {(r["features"], r["method"]) for r in rows}
    for method in ("linear", "attentive", "finetune"):
        assert ("lvm (layer 1)", method) in got and ("random-init (layer 1)", method) in got
    assert ("raw pixels", "linear") in got and ("raw pixels", "attentive") not in got
    assert all(0 <= r["acc_mean"] <= 1 for r in rows)
    table = (tmp_path / "probe.md").read_text()
    assert "| probe |" in table and "| finetune |" in table
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert any(k.endswith(": finetune") for k in saved["seconds_by_stage"])


def test_probe_rejects_unknown_method(tiny_pipeline, tmp_path):
    with pytest.raises(ProbeError, match="methods"):
        run_probe(ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], methods=["knn"],
                              out=str(tmp_path)))
