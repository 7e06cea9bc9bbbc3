"""Attentive probe and full fine-tuning: the two probes that read *all* of an image's token states.

A causal LVM's token states are uneven: the state at the top-left has read almost nothing, the
bottom-right one the whole image. A mean over them blurs that; an attention-pooling head learns
*where* to read (AIM, Sec. "attentive probe"). Both probes here share that head:

- ``attentive``: the LVM is frozen; the head trains on cached per-token states of one layer.
- ``finetune``: the LVM up to that layer trains too (smaller learning rate than the head), on the
  token ids, with augmented views (flips, small translations; ``lvm.augment``) when they are given,
  optionally starting from a fitted linear probe (LP-FT) and with the levers of ``HeadTrainConfig``.

Training keeps out a validation part of the labelled subset and returns the weights of the best
validation epoch, so no test label is ever used to choose anything.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lvm.data import SpecialTokens, image_rows
from lvm.model import LVM
from lvm.runtime import EpochSampler, mixed_precision, param_groups, set_lr, warmup_cosine


class AttentivePool(nn.Module):
    """Multi-head attention pooling with learned queries over ``[B, T, D]`` token states -> ``[B, Q * D]``.

    With one query per head the keys need not be built: ``q . (W_k x) = (W_k^T q) . x``, so each head
    keeps the folded vector ``W_k^T q`` directly, and the value projection is applied after pooling
    (it is linear). That is the same function as standard cross-attention at a fraction of the cost,
    which matters when the head trains on 60k images x 49 tokens on a CPU.
    """

    def __init__(self, dim: int, tokens: int, heads: int | None = None, queries: int = 1) -> None:
        super().__init__()
        heads = heads or max(1, dim // 8)  # narrow heads: each is a cheap, separate "where to look"
        if dim % heads:
            raise ValueError(f"AttentivePool: dim {dim} is not divisible by heads {heads}.")
        self.heads, self.queries = heads, queries
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))  # lets a head select places, not only content
        self.query = nn.Parameter(torch.randn(queries, heads, dim) / math.sqrt(dim))
        self.value = nn.Parameter(torch.randn(heads, dim // heads, dim) / math.sqrt(dim))
        self.out_norm = nn.LayerNorm(queries * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.float()) + self.pos  # [B, T, D]
        weights = einsum(x, self.query, "b t d, q h d -> b q h t").softmax(dim=-1)
        pooled = einsum(weights, x, "b q h t, b t d -> b q h d")
        values = einsum(pooled, self.value, "b q h d, h e d -> b q h e")
        return self.out_norm(rearrange(values, "b q h e -> b (q h e)"))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling weights ``[B, Q, H, T]`` (where each head reads), for inspection."""
        x = self.norm(x.float()) + self.pos
        return einsum(x, self.query, "b t d, q h d -> b q h t").softmax(dim=-1)


class AttentiveClassifier(nn.Module):
    """Attention pooling then a linear layer to class logits."""

    def __init__(self, dim: int, tokens: int, classes: int, heads: int | None = None, queries: int = 1) -> None:
        super().__init__()
        self.pool = AttentivePool(dim, tokens, heads, queries)
        self.head = nn.Linear(queries * dim, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the last linear layer reads ``[B, F]`` (mixup mixes these)."""
        return self.pool(tokens)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(tokens))


class FineTuneClassifier(nn.Module):
    """The LVM read up to ``layer`` on ``[BOS] image``, then a head over the image's token states.

    The head is an attentive one by default; ``head`` may instead be an ``lvm.classifier.LinearHead``
    (e.g. wrapping a fitted linear probe: "LP-FT", which starts fine-tuning from the probe's solution).
    """

    def __init__(self, lvm: LVM, layer: int, tokens: int, classes: int, special: SpecialTokens,
                 heads: int | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(lvm)
        # Blocks past ``layer`` are never run; dropping them keeps the optimizer and checkpoints honest.
        self.backbone.blocks = self.backbone.blocks[:layer]
        self.layer, self.special = layer, special
        self.classifier = head if head is not None else AttentiveClassifier(lvm.config.d_model, tokens, classes, heads)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` [B, T] image tokens (row-major) -> the head's input features [B, F]."""
        states = self.backbone.hidden_states(image_rows(ids, self.special), layers=[self.layer])[0][:, 1:]
        if isinstance(self.classifier, AttentiveClassifier):
            return self.classifier.features(states)
        return (self.classifier.pool(states) - self.classifier.mean) / self.classifier.std  # LinearHead

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if isinstance(self.classifier, AttentiveClassifier):
            return self.classifier.logits(features)
        return self.classifier.linear(features)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` [B, T] image tokens (row-major) -> logits [B, classes]."""
        return self.logits(self.features(ids))


@dataclass
class HeadTrainConfig:
    """How a probe head (or a fine-tuned LVM) is trained on one labelled subset.

    The fine-tuning levers (``layer_decay``, ``train_blocks``, ``mixup``, ``ema``, and in ``fine_tune``
    augmented views and ``init="probe"``) default to off, i.e. to the recipe measured before them;
    bench/results/finetune-levers-cpu.md measures each one.
    """

    epochs: int = 30  # upper bound; ``max_steps`` may end training sooner
    max_steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3  # the head's; the backbone (fine-tuning) uses ``lr * backbone_lr_scale``
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    val_fraction: float = 0.1
    evals: int = 10  # validation passes spread over training; the best one's weights are kept
    layer_decay: float = 1.0  # fine-tuning: block i of L trains at backbone lr x layer_decay ** (L - i)
    train_blocks: int = 0  # fine-tuning: train only the top k blocks, the rest frozen (0: all, embeddings too)
    mixup: float = 0.0  # Beta(a, a) mixing of pairs of the head's input features and their labels (0: off)
    ema: float = 0.0  # decay of an exponential moving average of the weights; evaluated and kept if > 0
    precision: str = "auto"  # autocast for forward passes: auto (bf16 on CUDA and AMX CPUs), bf16, fp32
    seed: int = 0


def split_rows(n: int, cfg: HeadTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows) of ``train_classifier``: a seeded random ``val_fraction`` held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(n * cfg.val_fraction))) if n >= 10 else 0
    return perm[n_val:], perm[:n_val]


def train_classifier(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: HeadTrainConfig,
    views: torch.Tensor | None = None, lr_scale: dict[int, float] | None = None, desc: str = "head",
    eval_at_start: bool = False,
) -> tuple[nn.Module, float]:
    """Train ``model(inputs[i]) -> logits`` on the train rows of ``split_rows``.

    Returns the model with the weights of its best validation pass, and that validation accuracy.
    ``views`` ``[V, N, ...]``: augmented copies of ``inputs``; each training row is drawn from the
    original or one of its V views with equal chance. ``lr_scale`` maps ``id(param)`` to an LR factor.
    ``eval_at_start`` makes the untrained weights a candidate (a head initialised from a fitted probe).
    Mixup needs ``model.features`` and ``model.logits``.
    """
    labels = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(cfg.seed)
    tr, val = split_rows(len(inputs), cfg)
    sampler = EpochSampler(len(tr), cfg.batch_size, cfg.seed)
    steps = max(1, min(cfg.max_steps, cfg.epochs * sampler.per_epoch))
    eval_at = set(np.linspace(0, steps, cfg.evals + 1, dtype=int)[1:].tolist())
    # no decay on position tables and token embeddings
    no_decay = [p for name, p in model.named_parameters() if name.endswith("pos")]
    no_decay += [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, no_decay, lr_scale))
    warmup = max(1, steps // 20)
    autocast = mixed_precision(next(model.parameters()).device, cfg.precision)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    if ema is not None:
        ema.update_parameters(model)  # the average starts at the initial weights, not after the first step
    beta = torch.distributions.Beta(cfg.mixup, cfg.mixup) if cfg.mixup > 0 else None

    def evaluate(step_loss: float) -> float:
        kept = ema.module if ema is not None else model
        acc = accuracy(kept, inputs[val], labels[val], cfg.precision) if len(val) else -step_loss
        model.train()
        return acc

    best_acc, best_state = -math.inf, None
    if eval_at_start and len(val):
        best_acc, best_state = evaluate(0.0), copy.deepcopy(model.state_dict())
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for step in bar:
        idx = tr[sampler.at(step)]
        x = inputs[idx]
        if views is not None:  # row r reads view k - 1 when k > 0, the original when k == 0
            pick = torch.randint(0, len(views) + 1, (len(idx),), generator=gen)
            for k in range(1, len(views) + 1):
                rows = torch.nonzero(pick == k).flatten()
                x[rows] = views[k - 1][idx[rows]]
        set_lr(opt, warmup_cosine(step, steps, warmup))
        y = labels[idx]
        with autocast:
            if beta is not None:
                lam = float(beta.sample())
                mate = torch.randperm(len(idx), generator=gen)
                feats = model.features(x)
                logits = model.logits(lam * feats + (1 - lam) * feats[mate]).float()
                loss = (lam * F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                        + (1 - lam) * F.cross_entropy(logits, y[mate], label_smoothing=cfg.label_smoothing))
            else:
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        if step + 1 in eval_at:
            acc = evaluate(loss.item())
            if acc > best_acc:
                kept = ema.module if ema is not None else model
                best_acc, best_state = acc, copy.deepcopy(kept.state_dict())
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{acc:.3f}")
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, best_acc


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512, precision: str = "auto") -> torch.Tensor:
    model.eval()
    with mixed_precision(next(model.parameters()).device, precision):
        return torch.cat([model(inputs[i : i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)])


def accuracy(model: nn.Module, inputs: torch.Tensor, labels, precision: str = "auto") -> float:
    if len(inputs) == 0:
        return float("nan")
    return float((predict(model, inputs, precision=precision) == torch.as_tensor(labels)).float().mean())


def fit_attentive(
    tokens: torch.Tensor, labels, cfg: HeadTrainConfig, heads: int | None = None, queries: int = 1
) -> tuple[AttentiveClassifier, float]:
    """Attentive probe on frozen per-token states ``[N, T, D]``."""
    torch.manual_seed(cfg.seed)
    classes = int(torch.as_tensor(labels).max()) + 1
    model = AttentiveClassifier(tokens.shape[2], tokens.shape[1], classes, heads, queries)
    return train_classifier(model, tokens, labels, cfg, desc="attentive probe")


FINETUNE_INITS = ("attentive", "probe")


def fine_tune(
    lvm: LVM, ids: torch.Tensor, labels, layer: int, special: SpecialTokens, cfg: HeadTrainConfig,
    flipped_ids: torch.Tensor | None = None, heads: int | None = None, views: torch.Tensor | None = None,
    init: str = "attentive", hw: tuple[int, int] | None = None, grid: int = 3, refit: bool = False,
) -> tuple[FineTuneClassifier, float]:
    """Fine-tune a copy of ``lvm`` (blocks 1..layer) with a head on image token ids ``[N, T]``.

    ``init="attentive"``: a fresh attentive head. ``init="probe"``: a linear head on ``grid``-pooled
    states (``hw`` is the token grid), initialised with a linear probe fitted on the frozen features
    of the training rows only (LP-FT: fine-tuning starts from, and is validated against, the probe).
    ``views`` ``[V, N, T]`` (or the older ``flipped_ids`` ``[N, T]``) are augmented token views.
    ``refit``: after the backbone is chosen on the validation rows, replace the head by a linear probe
    fitted on *all* labelled rows (``refit_linear_head``); the returned validation accuracy is then the
    backbone's, measured before the refit read those rows.
    """
    if init not in FINETUNE_INITS:
        raise ValueError(f"fine_tune: init={init!r} is not one of {FINETUNE_INITS}.")
    torch.manual_seed(cfg.seed)
    labels = torch.as_tensor(labels).long()
    classes = int(labels.max()) + 1
    if views is None and flipped_ids is not None:
        views = flipped_ids[None]
    head = None
    if init == "probe":
        head = _probe_head(lvm, ids, labels, layer, special, cfg, hw, grid, classes)
    model = FineTuneClassifier(lvm, layer, ids.shape[1], classes, special, heads, head)
    scale = backbone_lr_scales(model.backbone, layer, cfg)
    tuned, val = train_classifier(model, ids, labels, cfg, views=views, lr_scale=scale, desc="fine-tune",
                                  eval_at_start=init == "probe")
    if refit:
        refit_linear_head(tuned, ids, labels, hw, grid, cfg)
    return tuned, val


def refit_linear_head(model: FineTuneClassifier, ids: torch.Tensor, labels, hw: tuple[int, int] | None,
                      grid: int, cfg: HeadTrainConfig) -> FineTuneClassifier:
    """Give a fine-tuned classifier a fresh linear head fitted on every labelled row ``ids`` ``[N, T]``.

    Fine-tuning holds out ``cfg.val_fraction`` of the labels to choose its weights, so its head never
    learns from them, while the linear probe it is compared with refits on all of them; with the
    backbone fixed, a linear probe on its ``grid``-pooled states (L2 chosen on a split of these same
    rows) uses every label. Test images play no part. Modifies and returns ``model``.
    """
    from lvm.classifier import LinearHead
    from lvm.probe import LinearProbe, extract_features

    hw = hw or _square(ids.shape[1])
    labels = torch.as_tensor(labels).long()
    feats = extract_features(model.backbone, ids.reshape(len(ids), *hw), model.special, model.layer, "grid", grid,
                             precision=cfg.precision)
    probe = LinearProbe.fit(feats, labels, seed=cfg.seed, classes=int(labels.max()) + 1)
    model.classifier = LinearHead.from_probe(probe, "grid", grid, hw, model.backbone.config.d_model)
    return model.eval()


def _square(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"fine_tune: {tokens} tokens per image is not a square grid; pass hw=(h, w).")
    return side, side


def backbone_lr_scales(backbone: LVM, layer: int, cfg: HeadTrainConfig) -> dict[int, float]:
    """LR factors of the backbone's parameters, freezing those below the top ``train_blocks`` blocks.

    Block i (1-based) of ``layer`` gets ``backbone_lr_scale * layer_decay ** (layer - i)``; the token
    embedding (and anything else not in a block) ``... ** layer``: lower layers hold more general
    features and move less (BEiT / ELECTRA's layer-wise decay).
    """
    scale: dict[int, float] = {}
    frozen_below = layer - cfg.train_blocks if cfg.train_blocks > 0 else 0
    in_blocks = set()
    for i, block in enumerate(backbone.blocks, start=1):
        for p in block.parameters():
            in_blocks.add(id(p))
            if i <= frozen_below:
                p.requires_grad_(False)
            scale[id(p)] = cfg.backbone_lr_scale * cfg.layer_decay ** (layer - i)
    for p in backbone.parameters():
        if id(p) not in in_blocks:
            if frozen_below > 0:
                p.requires_grad_(False)
            scale[id(p)] = cfg.backbone_lr_scale * cfg.layer_decay ** layer
    return scale


def _probe_head(lvm: LVM, ids: torch.Tensor, labels: torch.Tensor, layer: int, special: SpecialTokens,
                cfg: HeadTrainConfig, hw: tuple[int, int] | None, grid: int, classes: int) -> nn.Module:
    """A ``LinearHead`` holding a linear probe fitted on the frozen, grid-pooled states of the training rows."""
    from lvm.classifier import LinearHead
    from lvm.probe import LinearProbe, extract_features

    hw = hw or _square(ids.shape[1])
    tr, _ = split_rows(len(ids), cfg)  # the validation rows stay unseen by the probe too
    feats = extract_features(lvm, ids[tr].reshape(len(tr), *hw), special, layer, "grid", grid,
                             precision=cfg.precision)
    probe = LinearProbe.fit(feats, labels[tr], seed=cfg.seed, classes=classes)
    return LinearHead.from_probe(probe, "grid", grid, hw, lvm.config.d_model)
