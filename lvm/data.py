"""Visual sentences: token shards -> fixed-length packed training sequences.

A sentence is ``[BOS] img1 [SEP] img2 ... [EOS]`` with the special ids placed right after the
codebook (``SpecialTokens``). Kinds:

- ``single``  one image per sentence;
- ``pairs``   image -> one transformed version of it (A -> B), the version chosen per (seed, epoch,
              index) among aligned *view* shards (e.g. written by ``lvm tokenize --transform hflip``);
- ``chain``   image followed by every view in order (an augmentation chain);
- ``frames``  ``frames`` consecutive images of one shard whose order means something (video, scans).

The layout is built here and only here: ``visual_sentence`` for training sentences and the
prompts generation continues, ``image_rows`` for the ``[BOS] image`` rows probes and fine-tuning
read. Every sentence of a dataset has the same length, so ``context_len // length`` whole sentences are
packed per training row and no padding is needed. Batches are a pure function of ``(seed, step)``:
resuming at step ``s`` needs no replay, and each rank of a distributed run takes its own rows.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokenizer.shards import TokenShards, read_token_shards

KINDS = ("single", "pairs", "chain", "frames")
ENDS = ("eos", "sep", "open")


class DataError(ValueError):
    """Training data that cannot be used as asked; the message names the input and the fix."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens, placed right after the codebook ids."""

    codebook_size: int

    @property
    def bos(self) -> int:
        return self.codebook_size

    @property
    def sep(self) -> int:
        return self.codebook_size + 1

    @property
    def eos(self) -> int:
        return self.codebook_size + 2

    @property
    def pad(self) -> int:
        return self.codebook_size + 3

    @property
    def vocab_size(self) -> int:
        """The LVM's vocabulary: codebook + BOS/SEP/EOS/PAD."""
        return self.codebook_size + 4


def sentence_length(tokens_per_image: int, images: int) -> int:
    """BOS + images (each followed by SEP, the last by EOS)."""
    return 1 + images * (tokens_per_image + 1)


def visual_sentence(
    images: Sequence[np.ndarray | torch.Tensor], special: SpecialTokens, end: str = "eos",
    last_tokens: int | None = None,
) -> np.ndarray:
    """``[BOS] img1 [SEP] img2 ... imgk <end>`` as ``int64 [L]``: the one layout training and prompts share.

    ``end``: ``eos`` closes a finished sentence (training); ``sep`` leaves a prompt whose next image
    the model writes; ``open`` puts nothing after the last image, of which only the first
    ``last_tokens`` ids are kept (an image for the model to complete). Images are ``[T]`` or ``[h, w]``.
    """
    if end not in ENDS:
        raise ValueError(f"end={end!r} is not one of {ENDS}.")
    if last_tokens is not None and end != "open":
        raise ValueError(f"last_tokens={last_tokens} cuts the last image, which needs end='open' (got {end!r}).")
    if not len(images):
        raise ValueError("a visual sentence needs at least one image.")
    flat = [(img.cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)).reshape(-1)
            for img in images]  # each [T]
    if last_tokens is not None:
        if not 0 <= last_tokens <= len(flat[-1]):
            raise ValueError(f"last_tokens={last_tokens} must be in [0, {len(flat[-1])}] (the image's token count).")
        flat[-1] = flat[-1][:last_tokens]
    after = {"eos": [special.eos], "sep": [special.sep], "open": []}[end]
    out = np.empty(1 + sum(len(f) + 1 for f in flat[:-1]) + len(flat[-1]) + len(after), dtype=np.int64)
    out[0] = special.bos
    pos = 1
    for img in flat[:-1]:
        out[pos : pos + len(img)] = img
        out[pos + len(img)] = special.sep
        pos += len(img) + 1
    out[pos : pos + len(flat[-1])] = flat[-1]
    out[pos + len(flat[-1]) :] = after
    return out


def image_rows(ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """``[BOS] image`` rows ``long [N, 1 + T]`` from ids ``[N, T]`` or ``[N, h, w]``: what probes, fine-tuning
    and the classifier bundle read. Position ``i + 1`` holds image token ``i``, so ``states[:, 1:]`` are the
    image's. No Python int of the batch size is read, so under ``torch.export`` the batch stays dynamic."""
    flat = ids.flatten(1).long()  # [N, T]
    return torch.cat([torch.full_like(flat[:, :1], special.bos), flat], dim=1)


class VisualSentences:
    """Sentences over one main shard directory and optional aligned view directories."""

    def __init__(
        self,
        data: str | os.PathLike | TokenShards,
        views: list[str | os.PathLike | TokenShards] | tuple = (),
        kind: str = "single",
        frames: int = 2,
        indices: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise DataError(f"kind={kind!r} is not a sentence kind; use one of {KINDS}.")
        self.main = data if isinstance(data, TokenShards) else read_token_shards(data)
        self.views = [v if isinstance(v, TokenShards) else read_token_shards(v) for v in views]
        self.kind, self.seed = kind, seed
        if kind in ("pairs", "chain") and not self.views:
            raise DataError(
                f"kind={kind!r} needs aligned view shards (e.g. 'lvm tokenize --transform hflip --out DIR'), "
                "passed as views=[DIR, ...] (CLI: --views DIR ...)."
            )
        if kind == "frames" and frames < 2:
            raise DataError(f"frames={frames} must be >= 2 for kind='frames'.")
        meta = self.main.meta
        for view in self.views:
            for key in ("tokenizer_fingerprint", "grid", "vocab_size", "count"):
                if view.meta.get(key) != meta.get(key):
                    raise DataError(
                        f"{view.path}: its {key} ({view.meta.get(key)}) differs from {self.main.path} "
                        f"({meta.get(key)}); views must be the same images tokenized by the same tokenizer."
                    )
        self.special = SpecialTokens(int(meta["vocab_size"]))
        self.tokens_per_image = int(np.prod(meta["grid"]))
        self.images_per_sentence = {"single": 1, "pairs": 2, "chain": 1 + len(self.views), "frames": frames}[kind]
        self.length = sentence_length(self.tokens_per_image, self.images_per_sentence)
        n_starts = len(self.main) - (frames - 1 if kind == "frames" else 0)
        if n_starts < 1:
            raise DataError(f"{self.main.path}: {len(self.main)} images cannot make a {frames}-frame sentence.")
        self.indices = np.arange(n_starts) if indices is None else np.asarray(indices)
        self._check_ids()

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.main.meta["tokenizer_fingerprint"]

    def __len__(self) -> int:
        return len(self.indices)

    def split(self, eval_fraction: float, seed: int = 0) -> tuple["VisualSentences", "VisualSentences"]:
        """A seeded train / held-out split over sentence indices (views stay aligned)."""
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval_fraction={eval_fraction} must be in (0, 1).")
        order = np.random.default_rng(seed).permutation(self.indices)
        n_eval = max(1, int(round(len(order) * eval_fraction)))
        if n_eval >= len(order):
            raise DataError(f"{self.main.path}: {len(order)} sentences are too few to hold {n_eval} out for eval.")
        return self._subset(np.sort(order[n_eval:])), self._subset(np.sort(order[:n_eval]))

    def sentence(self, position: int, epoch: int = 0) -> np.ndarray:
        """Token ids ``int64 [length]`` of the sentence at ``position`` of this dataset."""
        i = int(self.indices[position])
        if self.kind == "single":
            images = [self.main.tokens[i]]
        elif self.kind == "frames":
            images = list(self.main.tokens[i : i + self.images_per_sentence])
        elif self.kind == "chain":
            images = [self.main.tokens[i]] + [v.tokens[i] for v in self.views]
        else:  # pairs: which view is a deterministic function of (seed, epoch, index)
            pick = np.random.default_rng([self.seed, epoch, i]).integers(len(self.views))
            images = [self.main.tokens[i], self.views[pick].tokens[i]]
        return visual_sentence(images, self.special, end="eos")

    def _subset(self, indices: np.ndarray) -> "VisualSentences":
        clone = object.__new__(VisualSentences)
        clone.__dict__.update(self.__dict__)
        clone.indices = indices
        return clone

    def _check_ids(self) -> None:
        """Ids beyond the codebook mean corrupt shards or a mismatched meta.json: catch them at load."""
        for shards in [self.main, *self.views]:
            top = int(shards.tokens.max()) if len(shards) else 0
            if top >= self.special.codebook_size:
                raise DataError(
                    f"{shards.path}: token id {top} >= the codebook size {self.special.codebook_size} in meta.json; "
                    "the shards are corrupt or were written by another tokenizer; re-run 'lvm tokenize --overwrite'."
                )


class PackedBatches:
    """Rows of ``context_len // sentence_length`` whole sentences; batch ``step`` is a pure function.

    The global batch of ``batch_size`` rows is split across ``world`` ranks (rank ``r`` takes rows
    ``r, r + world, ...``) so a distributed run sees exactly the single-process batches.
    """

    def __init__(
        self,
        sentences: VisualSentences,
        context_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if context_len < sentences.length:
            raise DataError(
                f"context length {context_len} is too short for one sentence of {sentences.length} tokens "
                f"({sentences.images_per_sentence} image(s) of {sentences.tokens_per_image} tokens + specials); "
                f"raise max_seq_len/context_len to at least {sentences.length}."
            )
        if batch_size % world:
            raise DataError(f"batch_size={batch_size} is not divisible by the {world} processes; make it a multiple.")
        self.sentences, self.seed, self.rank, self.world = sentences, seed, rank, world
        self.batch_size = batch_size
        self.per_row = context_len // sentences.length
        self.row_len = self.per_row * sentences.length
        self.rows_per_epoch = len(sentences) // self.per_row
        if self.rows_per_epoch < 1:
            raise DataError(f"{len(sentences)} sentences cannot fill one row of {self.per_row} sentences.")
        self._perm_epoch, self._perm = -1, None

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per global batch (what tokens/s is counted in)."""
        return self.batch_size * (self.row_len - 1)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.rows_per_epoch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(inputs, targets)``, each ``int64 [batch_size / world, row_len - 1]``."""
        rows = [self.row(step * self.batch_size + j) for j in range(self.rank, self.batch_size, self.world)]
        packed = torch.from_numpy(np.stack(rows))  # [b, row_len]
        return packed[:, :-1], packed[:, 1:]

    def row(self, global_row: int) -> np.ndarray:
        epoch, r = divmod(global_row, self.rows_per_epoch)
        perm = self._permutation(epoch)
        picks = perm[r * self.per_row : (r + 1) * self.per_row]
        return np.concatenate([self.sentences.sentence(int(p), epoch) for p in picks])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sentences))
            self._perm_epoch = epoch
        return self._perm


def eval_batches(sentences: VisualSentences, context_len: int, batch_size: int, max_rows: int = 64):
    """A fixed set of held-out rows (the same every eval), for a comparable eval loss curve."""
    context_len = min(context_len, len(sentences) * sentences.length)  # a small held-out set still fills a row
    packer = PackedBatches(sentences, context_len, batch_size=1, seed=1234)
    rows = min(max_rows, packer.rows_per_epoch)
    packed = torch.from_numpy(np.stack([packer.row(i) for i in range(rows)]))
    for start in range(0, rows, batch_size):
        chunk = packed[start : start + batch_size]
        yield chunk[:, :-1], chunk[:, 1:]
