"""The LVM transformer: shapes, loss, causality, probes' hidden states, generation, checkpoints, presets."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lvm.config import LVMConfig
from lvm.model import LVM, KVCache, filter_logits

V = 300


def tiny(seed: int = 0, **overrides) -> LVM:
    torch.manual_seed(seed)
    return LVM(LVMConfig.preset("tiny", vocab_size=V, **overrides)).eval()


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- forward / loss ------------------------------------------------------------------------------


def test_forward_shapes():
    model = tiny()
    ids = rand_ids(3, 17)
    out = model(ids)
    assert out.loss is None and out.logits.shape == (3, 17, V) and out.logits.dtype == torch.float32
    out = model(ids, targets=rand_ids(3, 17, seed=2))
    assert out.logits is None and out.loss.dim() == 0


@pytest.mark.parametrize("tie", [True, False])
def test_loss_at_init_is_log_vocab(tie):
    model = tiny(tie_embeddings=tie)
    with torch.no_grad():
        losses = [model(rand_ids(8, 128, seed=s), targets=rand_ids(8, 128, seed=100 + s)).loss for s in range(3)]
    assert abs(torch.stack(losses).mean().item() - math.log(V)) < 0.15


def test_loss_matches_cross_entropy_on_logits():
    model = tiny()
    ids, targets = rand_ids(2, 33), rand_ids(2, 33, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
        loss = model(ids, targets=targets).loss
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_ignore_index_positions_do_not_count():
    model = tiny()
    ids, targets = rand_ids(2, 20), rand_ids(2, 20, seed=6)
    targets[0, :7] = -100
    targets[1, 15:] = -100
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)  # [B, T, V]
        loss = model(ids, targets=targets).loss
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # Changing the token at an ignored target position must not move the loss.
    targets2 = targets.clone()
    targets2[0, 3] = -100
    with torch.no_grad():
        assert model(ids, targets=targets2).loss.item() == pytest.approx(loss.item(), abs=1e-6)


def test_loss_backward_reaches_every_parameter():
    model = tiny().train()
    model(rand_ids(2, 16), targets=rand_ids(2, 16, seed=3)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_scales_residual_outputs_by_depth():
    model = LVM(LVMConfig(vocab_size=V, n_layer=8, n_head=2, d_model=128))
    residual = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(residual, rel=0.1)
        assert block.mlp.w_out.weight.std().item() == pytest.approx(residual, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.equal(block.norm_attn.weight, torch.ones(128))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    ids = rand_ids(2, 30)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().amax() > 1e-4


@pytest.mark.parametrize("t", [30, 27])  # whole sentences, and a row whose last sentence is cut short
def test_segment_attention_equals_each_sentence_alone(t):
    """Packed sentences with segment_len attend only to themselves: as if each were its own row at position 0."""
    model, seg = tiny(), 10
    ids = rand_ids(2, t)
    with torch.no_grad():
        packed = model(ids, segment_len=seg).logits
        alone = torch.cat([model(ids[:, s : s + seg]).logits for s in range(0, t, seg)], dim=1)
        whole_row = model(ids).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (whole_row[:, seg:] - packed[:, seg:]).abs().amax() > 1e-3  # later sentences really are cut off
    torch.testing.assert_close(whole_row[:, :seg], packed[:, :seg], atol=1e-5, rtol=1e-5)


def test_segment_attention_loss_and_grads_match_separate_rows():
    model, seg = tiny(), 8
    ids, targets = rand_ids(2, 24), rand_ids(2, 24, seed=5)
    loss = model(ids, targets, segment_len=seg).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    rows, row_targets = (rearrange_rows(z, seg) for z in (ids, targets))
    ref = model(rows, row_targets).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="segment_len"):
        model(ids, segment_len=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_segment_attention_matches_blockwise_reference(backend, monkeypatch):
    """Through either kernel (Triton under the CPU interpreter): causal attention inside each block only."""
    import kernels.dispatch
    from kernels.attention import attention_reference
    from lvm.model import segment_attention

    if backend == "triton" and not kernels.dispatch.triton_usable(torch.device("cpu")):
        pytest.skip("Triton is not usable on CPU here (needs triton and TRITON_INTERPRET=1)")
    monkeypatch.setenv("LVM_KERNELS", backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 27, 32, generator=g) for _ in range(3))
    got = segment_attention(q, k, v, 10)
    want = torch.cat([attention_reference(q[:, :, s:s + 10], k[:, :, s:s + 10], v[:, :, s:s + 10], causal=True)
                      for s in range(0, 27, 10)], dim=2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def rearrange_rows(z: torch.Tensor, seg: int) -> torch.Tensor:
    return z.reshape(z.shape[0] * (z.shape[1] // seg), seg)


def test_bad_inputs_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len 128"):
        model(rand_ids(1, 129))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), V))
    with pytest.raises(ValueError, match="targets"):
        model(rand_ids(1, 4), targets=rand_ids(1, 5))


# ---- hidden states -------------------------------------------------------------------------------


def test_hidden_states_indexing():
    model = tiny()
    ids = rand_ids(2, 10)
    with torch.no_grad():
        states = model.hidden_states(ids)
        assert len(states) == model.config.n_layer + 1
        assert all(s.shape == (2, 10, 64) for s in states)
        torch.testing.assert_close(states[0], model.tok_emb(ids))
        torch.testing.assert_close(states[1], model.blocks[0](states[0], *model._rope(0, 10, ids.device)))
        with_norm = model.hidden_states(ids, final_norm=True)
        assert len(with_norm) == model.config.n_layer + 2
        torch.testing.assert_close(with_norm[-1], model.norm_f(states[-1]))
        torch.testing.assert_close(model.head(with_norm[-1]), model(ids).logits)
        picked = model.hidden_states(ids, layers=[-1, 0, 1])
        torch.testing.assert_close(picked[0], states[-1])
        torch.testing.assert_close(picked[1], states[0])
        torch.testing.assert_close(picked[2], states[1])
    with pytest.raises(IndexError, match="3 entries"):
        model.hidden_states(ids, layers=[3])


# ---- generation ----------------------------------------------------------------------------------


def test_greedy_generation_same_with_and_without_cache():
    model = tiny().train()  # generate must switch to eval itself and restore the mode
    prompt = rand_ids(3, 9)
    cached = model.generate(prompt, 40, temperature=0.0, use_cache=True)
    full = model.generate(prompt, 40, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 49)
    assert torch.equal(cached[:, :9], prompt)
    assert torch.equal(cached, full)
    assert model.training


def test_cache_chunk_after_prefill_matches_full_forward():
    """A multi-token step on a filled cache needs the shifted causal mask."""
    model = tiny()
    ids = rand_ids(2, 12)
    with torch.no_grad():
        cache = KVCache.empty(model.config, 2, 12, model.head.weight)
        model._step(ids[:, :5], cache)
        last = model._step(ids[:, 5:], cache)
        expected = model(ids).logits[:, -1]
    assert cache.length == 12
    torch.testing.assert_close(last, expected, rtol=1e-4, atol=1e-4)


def test_sampling_is_deterministic_under_a_seeded_generator():
    model = tiny()
    prompt = rand_ids(2, 5)
    run = lambda seed, **kw: model.generate(  # noqa: E731
        prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run(7, use_cache=False), run(7))
    greedy = model.generate(prompt, 20, temperature=0.0)
    assert torch.equal(run(3, top_k=1), greedy)


def test_token_limit_keeps_samples_below_it():
    model = tiny()
    prompt = rand_ids(4, 5)
    free = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0))
    limited = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0), token_limit=17)
    assert free[:, 5:].max() >= 17  # without the limit, ids above it do get sampled
    assert limited[:, 5:].max() < 17


def test_generate_length_error_names_both_numbers():
    model = tiny()
    with pytest.raises(ValueError, match=r"100.*\b29\b.*max_seq_len 128"):
        model.generate(rand_ids(1, 100), 29)


def test_filter_logits_top_k_keeps_exactly_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    out = filter_logits(logits, top_k=7)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.full((4,), 7))
    kept = torch.isfinite(out)
    assert (logits[kept].view(4, 7).amin(-1) >= logits[~kept].view(4, 43).amax(-1)).all()
    assert torch.equal(out[kept], logits[kept])
    # Ties at the k-th value are all kept.
    tied = filter_logits(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), top_k=1)
    assert torch.isfinite(tied).tolist() == [[False, True, True, False]]


def test_filter_logits_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log().repeat(5, 1)
    cases = {0.3: {1}, 0.7: {1, 3}, 0.81: {1, 3, 2}, 0.96: {0, 1, 2, 3}, 1.0: {0, 1, 2, 3}}
    for p, expected in cases.items():
        kept = torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist()
        assert set(kept) == expected, p
    both = filter_logits(logits, top_k=3, top_p=0.99)  # top-k first, then the nucleus of what is left
    assert set(torch.isfinite(both)[0].nonzero().flatten().tolist()) == {1, 3, 2}
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


# ---- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny(tie_embeddings=tie)
    target = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    with safe_open(str(target / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("head.weight" in keys) is (not tie)
    assert "tok_emb.weight" in keys
    loaded = LVM.from_pretrained(target)
    ids = rand_ids(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert (loaded.head.weight is loaded.tok_emb.weight) is tie
    assert loaded.config == model.config
    # Saving again over the same directory replaces it.
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tied_weights_stay_tied_after_load_and_training_step(tmp_path):
    loaded = LVM.from_pretrained(tiny().save_pretrained(tmp_path / "m"))
    opt = loaded.configure_optimizers(weight_decay=0.1, lr=1e-2)
    loaded(rand_ids(2, 8), targets=rand_ids(2, 8, seed=4)).loss.backward()
    opt.step()
    assert loaded.head.weight is loaded.tok_emb.weight
    assert len(list(loaded.parameters())) == len({id(p) for p in loaded.parameters()})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LVM.from_pretrained(tmp_path / "nowhere")
    target = tiny().save_pretrained(tmp_path / "m")
    (target / "model.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LVM.from_pretrained(target)
    (tmp_path / "w.safetensors").rename(target / "model.safetensors")

    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ValueError, match="missing tensors"):
        LVM.from_pretrained(target)
    (target / "config.json").write_text(json.dumps({**config, "d_model": 128}))
    with pytest.raises(ValueError, match="does not match"):
        LVM.from_pretrained(target)
    (target / "config.json").write_text(json.dumps({**config, "tie_embeddings": False}))
    with pytest.raises(ValueError, match="head.weight"):
        LVM.from_pretrained(target)
    (target / "config.json").write_text(json.dumps({**config, "n_heads": 2}))
    with pytest.raises(ValueError, match="n_heads"):
        LVM.from_pretrained(target)


# ---- optimizer / sizes / config ------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_configure_optimizers_decays_only_matmul_weights(tie):
    model = tiny(tie_embeddings=tie)
    opt = model.configure_optimizers(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    norms = {id(m.weight) for m in model.modules() if type(m).__name__ == "RMSNorm"}
    assert norms and norms <= ids(no_decay)
    assert id(model.tok_emb.weight) in ids(no_decay)
    for block in model.blocks:
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.w_gate, block.mlp.w_up, block.mlp.w_out):
            assert id(lin.weight) in ids(decay)
    assert (id(model.head.weight) in ids(decay)) is (not tie)
    assert ids(decay) | ids(no_decay) == {id(p) for p in model.parameters()}
    assert not ids(decay) & ids(no_decay)


def expected_non_embedding(c: LVMConfig) -> int:
    """Hand count: per block qkv + proj (4 d^2), SwiGLU (3 d d_ff), two norms (2 d); plus the final norm."""
    return c.n_layer * (4 * c.d_model**2 + 3 * c.d_model * c.d_ff + 2 * c.d_model) + c.d_model


@pytest.mark.parametrize(
    "name, approx", [("small", 5e6), ("base", 100e6), ("300m", 300e6), ("1b", 1e9)]
)
def test_presets_have_the_size_they_are_named_after(name, approx):
    config = LVMConfig.preset(name, vocab_size=1024)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = LVM(config)
    n = model.num_params()
    assert n == expected_non_embedding(config)
    assert 0.8 * approx <= n <= 1.2 * approx, n
    assert model.num_params(non_embedding=False) == n + 1024 * config.d_model


def test_untied_num_params_leaves_out_the_head():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.num_params() == untied.num_params() == expected_non_embedding(tied.config)
    assert untied.num_params(False) - tied.num_params(False) == V * 64


def test_config_presets_and_validation():
    c = LVMConfig.preset("tiny", vocab_size=V, max_seq_len=64)
    assert (c.d_model, c.n_layer, c.n_head, c.max_seq_len) == (64, 2, 2, 64)
    assert c.d_ff % 64 == 0 and abs(c.d_ff - 8 * 64 / 3) < 64
    assert LVMConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="tiny, small, base, 300m, 1b"):
        LVMConfig.preset("huge", vocab_size=V)
    with pytest.raises(ValueError, match="n_layers"):
        LVMConfig.preset("tiny", vocab_size=V, n_layers=3)
    with pytest.raises(ValueError, match="divisible"):
        LVMConfig(vocab_size=V, d_model=96, n_head=5)
    with pytest.raises(ValueError, match="power of"):
        LVMConfig(vocab_size=V, d_model=96, n_head=2)  # head dim 48
    with pytest.raises(ValueError, match="power of"):
        LVMConfig(vocab_size=V, d_model=64, n_head=8)  # head dim 8
    with pytest.raises(ValueError, match="vocab_size"):
        LVMConfig.from_dict({"n_layer": 2})
