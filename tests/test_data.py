"""Visual sentences and packed batches over small hand-made token shards."""
import numpy as np
import pytest
import torch

from lvm.data import (
    DataError, PackedBatches, SpecialTokens, VisualSentences, eval_batches, image_rows, sentence_length,
    visual_sentence,
)

CODEBOOK = 50


@pytest.fixture
def _shards(pixel_shards):
    return lambda path, ids, fingerprint="pix": pixel_shards(path, ids, CODEBOOK, fingerprint)


@pytest.fixture
def main_ids():
    return np.random.default_rng(0).integers(0, CODEBOOK, (20, 2, 3))


def test_single_sentence_layout(tmp_path, main_ids, _shards):
    ds = VisualSentences(_shards(tmp_path / "m", main_ids))
    sp = SpecialTokens(CODEBOOK)
    assert ds.length == 8 and sp.vocab_size == 54
    s = ds.sentence(4)
    assert s[0] == sp.bos and s[-1] == sp.eos
    assert s[1:7].tolist() == main_ids[4].reshape(-1).tolist()


def test_pairs_and_chain(tmp_path, main_ids, _shards):
    m = _shards(tmp_path / "m", main_ids)
    flip = _shards(tmp_path / "flip", main_ids[:, :, ::-1])
    inv = _shards(tmp_path / "inv", CODEBOOK - 1 - main_ids)
    sp = SpecialTokens(CODEBOOK)
    pairs = VisualSentences(m, views=[flip, inv], kind="pairs", seed=3)
    s = pairs.sentence(2)
    assert len(s) == 15 and s[7] == sp.sep and s[-1] == sp.eos
    second = s[8:14].reshape(2, 3)
    assert np.array_equal(second, main_ids[2, :, ::-1]) or np.array_equal(second, CODEBOOK - 1 - main_ids[2])
    picks = {tuple(pairs.sentence(i, epoch)[8:14]) == tuple(main_ids[i, :, ::-1].reshape(-1))
             for i in range(20) for epoch in range(2)}
    assert picks == {True, False}  # both views get used
    assert np.array_equal(pairs.sentence(5, 1), pairs.sentence(5, 1))  # deterministic
    chain = VisualSentences(m, views=[flip, inv], kind="chain")
    c = chain.sentence(1)
    assert len(c) == 1 + 3 * 7
    assert c[15:21].tolist() == (CODEBOOK - 1 - main_ids[1]).reshape(-1).tolist()


def test_frames(tmp_path, main_ids, _shards):
    ds = VisualSentences(_shards(tmp_path / "m", main_ids), kind="frames", frames=3)
    assert len(ds) == 18
    s = ds.sentence(5)
    assert s[8:14].tolist() == main_ids[6].reshape(-1).tolist()


def test_bad_inputs(tmp_path, main_ids, _shards):
    m = _shards(tmp_path / "m", main_ids)
    with pytest.raises(DataError, match="needs aligned view"):
        VisualSentences(m, kind="pairs")
    other = _shards(tmp_path / "other", main_ids, fingerprint="another-tokenizer")
    with pytest.raises(DataError, match="tokenizer_fingerprint"):
        VisualSentences(m, views=[other], kind="pairs")
    with pytest.raises(DataError, match="kind"):
        VisualSentences(m, kind="video")
    ds = VisualSentences(m)
    with pytest.raises(DataError, match="too short for one sentence of 8 tokens"):
        PackedBatches(ds, context_len=7, batch_size=2)
    with pytest.raises(DataError, match="divisible"):
        PackedBatches(ds, context_len=16, batch_size=3, world=2)


def test_ids_beyond_codebook_rejected(tmp_path, main_ids, _shards):
    m = _shards(tmp_path / "m", main_ids)
    tokens = np.memmap(f"{m}/tokens.bin", dtype=np.uint16, mode="r+")
    tokens[3] = CODEBOOK + 7
    tokens.flush()
    with pytest.raises(DataError, match="token id 57 >= the codebook size 50"):
        VisualSentences(m)


def test_packed_batches_deterministic_and_sharded(tmp_path, main_ids, _shards):
    ds = VisualSentences(_shards(tmp_path / "m", main_ids))
    packer = PackedBatches(ds, context_len=25, batch_size=4, seed=7)
    assert packer.per_row == 3 and packer.rows_per_epoch == 6
    x, y = packer.batch(3)
    assert x.shape == (4, 23) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = PackedBatches(ds, context_len=25, batch_size=4, seed=7).batch(3)
    assert torch.equal(x, x2)  # a fresh packer (a resumed run) gives the same batch
    halves = [PackedBatches(ds, 25, 4, seed=7, rank=r, world=2).batch(3)[0] for r in range(2)]
    assert torch.equal(torch.stack([halves[0], halves[1]], 1).reshape(4, 23), x)
    # Within one epoch every sentence is used once.
    seen = np.concatenate([packer.row(r).reshape(3, 8)[:, 1:7] for r in range(6)])
    assert len({tuple(s) for s in seen}) == 18
    assert not torch.equal(packer.batch(0)[0], PackedBatches(ds, 25, 4, seed=8).batch(0)[0])


def test_split_and_eval_batches(tmp_path, main_ids, _shards):
    ds = VisualSentences(_shards(tmp_path / "m", main_ids))
    train, held = ds.split(0.2, seed=0)
    assert len(train) == 16 and len(held) == 4
    assert not set(train.indices) & set(held.indices)
    a = [x for x, _ in eval_batches(held, 16, 1)]  # 4 sentences, 2 per row -> 2 rows
    b = [x for x, _ in eval_batches(held, 16, 1)]
    assert len(a) == 2 and all(torch.equal(p, q) for p, q in zip(a, b))


def test_visual_sentence_layout_from_the_spec():
    """[BOS] img1 [SEP] img2 ... then EOS (finished), SEP (a prompt) or nothing after a cut last image."""
    sp = SpecialTokens(10)  # BOS 10, SEP 11, EOS 12
    a, b = np.array([[1, 2], [3, 4]]), np.array([5, 6, 7, 8])
    assert visual_sentence([a, b], sp).tolist() == [10, 1, 2, 3, 4, 11, 5, 6, 7, 8, 12]
    assert visual_sentence([a, b], sp, end="sep").tolist() == [10, 1, 2, 3, 4, 11, 5, 6, 7, 8, 11]
    assert visual_sentence([a, b], sp, end="open", last_tokens=2).tolist() == [10, 1, 2, 3, 4, 11, 5, 6]
    assert visual_sentence([a, b], sp, end="open").tolist() == [10, 1, 2, 3, 4, 11, 5, 6, 7, 8]
    assert visual_sentence([torch.tensor([9, 0])], sp).tolist() == [10, 9, 0, 12]
    assert len(visual_sentence([a, b, a], sp)) == sentence_length(4, 3)
    with pytest.raises(ValueError, match="end='open'"):
        visual_sentence([a], sp, end="eos", last_tokens=1)
    with pytest.raises(ValueError, match="end="):
        visual_sentence([a], sp, end="pad")


def test_image_rows_from_the_spec():
    """BOS then one image's ids, row-major: position i + 1 holds image token i."""
    sp = SpecialTokens(10)
    ids = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])  # [N=2, h=2, w=2]
    expected = torch.tensor([[10, 1, 2, 3, 4], [10, 5, 6, 7, 8]])
    assert torch.equal(image_rows(ids, sp), expected)
    assert torch.equal(image_rows(ids.reshape(2, 4).int(), sp), expected)
    assert image_rows(ids, sp).dtype == torch.long
    assert image_rows(ids[:0], sp).shape == (0, 5)


def test_image_rows_keep_the_batch_dynamic_under_export():
    """The classifier's exported graph takes any batch, so image_rows must not read the batch size as a
    Python int (``len(ids)`` fixes it to the example's under torch.export)."""
    sp = SpecialTokens(10)

    class Rows(torch.nn.Module):
        def forward(self, ids):
            return image_rows(ids, sp)

    batch = torch.export.Dim("batch", min=1, max=1024)
    for shape in ((3, 2, 2), (3, 4)):  # [N, h, w] and [N, T]
        program = torch.export.export(Rows(), (torch.randint(0, 10, shape),), dynamic_shapes={"ids": {0: batch}})
        more = torch.randint(0, 10, (7, *shape[1:]))
        assert torch.equal(program.module()(more), image_rows(more, sp))


def test_dataset_sentences_are_the_shared_layout(tmp_path, main_ids, _shards):
    """Every kind writes exactly visual_sentence(its images, EOS): training and prompts share one layout."""
    m = _shards(tmp_path / "m", main_ids)
    flip = _shards(tmp_path / "flip", main_ids[:, :, ::-1])
    sp = SpecialTokens(CODEBOOK)
    single = VisualSentences(m)
    assert np.array_equal(single.sentence(3), visual_sentence([main_ids[3]], sp))
    frames = VisualSentences(m, kind="frames", frames=3)
    assert np.array_equal(frames.sentence(2), visual_sentence(list(main_ids[2:5]), sp))
    chain = VisualSentences(m, views=[flip], kind="chain")
    assert np.array_equal(chain.sentence(1), visual_sentence([main_ids[1], main_ids[1, :, ::-1]], sp))
    assert np.array_equal(single.sentence(3)[: 1 + 6], image_rows(torch.from_numpy(main_ids[3:4]), sp)[0].numpy())
