"""Prefix-LM pretraining (AIM's prefix attention): the mask, the targets it hides, the bidirectional read-out."""
import json

import pytest
import torch

from lvm.config import LVMConfig
from lvm.model import IGNORE_INDEX, LVM, prefix_attention, prefix_targets

V = 300


def tiny(prefix_lm: bool = False) -> LVM:
    torch.manual_seed(0)
    return LVM(LVMConfig.preset("tiny", vocab_size=V, prefix_lm=prefix_lm)).eval()


def dense_prefix_attention(q, k, v, seg, prefix):
    """Loop reference: each sentence alone, its scores masked by an explicitly built prefix-causal mask."""
    out = torch.zeros_like(q)
    t = q.shape[2]
    for b in range(q.shape[0]):
        for s, start in enumerate(range(0, t, seg)):
            end = min(start + seg, t)
            n = end - start
            allowed = torch.zeros(n, n, dtype=torch.bool)
            for i in range(n):
                for j in range(n):
                    allowed[i, j] = j <= i or (i < prefix[b, s] and j < prefix[b, s])
            scores = q[b, :, start:end] @ k[b, :, start:end].transpose(-1, -2) / q.shape[-1] ** 0.5
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[b, :, start:end] = weights @ v[b, :, start:end]
    return out


@pytest.mark.parametrize("t", [30, 27])  # whole sentences, and a last one cut short (the training rows' last token)
def test_prefix_attention_matches_a_dense_reference(t):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, t, 16, generator=g) for _ in range(3))
    prefix = torch.tensor([[1, 4, 9], [10, 2, 5]])  # 1: BOS alone (causal); 10: the whole sentence
    torch.testing.assert_close(prefix_attention(q, k, v, 10, prefix), dense_prefix_attention(q, k, v, 10, prefix),
                               atol=1e-5, rtol=1e-5)


def test_prefix_targets_hide_what_the_prefix_shows():
    targets = torch.arange(20).reshape(1, 20) + 100
    masked = prefix_targets(targets, 10, torch.tensor([[4, 1]]))
    hidden = (masked == IGNORE_INDEX)[0].tolist()
    # sentence 0, prefix of 4 tokens: positions 0, 1, 2 predict tokens 1, 2, 3, which the prefix attends to
    assert hidden[:10] == [True, True, True] + [False] * 7
    assert not any(hidden[10:])  # prefix of 1 (the BOS): plain next-token prediction
    assert masked[0, 3] == targets[0, 3]


def test_no_position_sees_the_token_it_predicts():
    """Logits at a position outside the prefix do not move when a later token changes; inside the prefix
    every position sees the whole prefix (its first position moves when the prefix's last token does)."""
    model, seg = tiny(prefix_lm=True), 12
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(1))
    prefix = torch.tensor([[5, 3]])
    with torch.no_grad():
        base = model(ids, segment_len=seg, prefix_len=prefix).logits
        later = ids.clone()
        later[0, 8] = (later[0, 8] + 1) % V  # outside sentence 0's prefix
        moved = model(later, segment_len=seg, prefix_len=prefix).logits
        inside = ids.clone()
        inside[0, 4] = (inside[0, 4] + 1) % V  # the last token of sentence 0's prefix
        seen = model(inside, segment_len=seg, prefix_len=prefix).logits
    torch.testing.assert_close(moved[0, :8], base[0, :8])
    assert (moved[0, 8:12] - base[0, 8:12]).abs().amax() > 1e-4
    torch.testing.assert_close(moved[0, 12:], base[0, 12:])  # the next sentence never sees it
    assert (seen[0, 0] - base[0, 0]).abs().amax() > 1e-4  # position 0 sees the prefix both ways


def test_a_prefix_lm_is_read_bidirectionally():
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    for prefix_lm in (False, True):
        model = tiny(prefix_lm)
        with torch.no_grad():
            first = model.hidden_states(ids, layers=[2])[0][:, 0]
            after = model.hidden_states(changed, layers=[2])[0][:, 0]
        assert bool((first - after).abs().amax() > 1e-5) == prefix_lm  # the first token sees the last one
    causal = tiny(True).hidden_states(ids, layers=[2], bidirectional=False)[0]
    torch.testing.assert_close(causal, tiny(False).hidden_states(ids, layers=[2])[0])  # same weights, causal read


def test_prefix_len_needs_sentences():
    with pytest.raises(ValueError, match="segment_len"):
        tiny(True)(torch.zeros(1, 8, dtype=torch.long), prefix_len=torch.ones(1, 1, dtype=torch.long))


def test_prefix_lm_training_writes_a_config_that_reads_bidirectionally(tiny_pipeline, tmp_path):
    from lvm.train import ConfigError, TrainConfig, train

    out = tmp_path / "prefix"
    summary = train(TrainConfig(data=tiny_pipeline["shards"], out=str(out), preset="tiny", context_len=64, steps=4,
                                batch_size=4, eval_every=4, ckpt_every=4, eval_rows=2, eval_fraction=0.1,
                                progress=False, prefix_lm=True))
    assert summary["eval_loss"] == summary["eval_loss"]  # finite, not NaN
    config = json.loads((out / "latest" / "config.json").read_text())
    assert config["prefix_lm"] is True and LVM.from_pretrained(out / "latest").config.prefix_lm
    with pytest.raises(ConfigError, match="sentence-attention"):
        train(TrainConfig(data=tiny_pipeline["shards"], out=str(tmp_path / "bad"), preset="tiny", prefix_lm=True,
                          sentence_attention=False))
    with pytest.raises(ConfigError, match="holds a prefix LM"):  # resuming it without the sentences it needs
        train(TrainConfig(data=tiny_pipeline["shards"], out=str(out), preset="tiny", context_len=64, steps=6,
                          batch_size=4, eval_fraction=0.1, progress=False, sentence_attention=False))
