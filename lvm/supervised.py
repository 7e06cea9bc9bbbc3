"""The supervised baseline: a small CNN trained from scratch on raw pixels of the labelled subset.

This is what a user would do without an LVM, so every probe report can show it beside the LVM's
rows. To make the comparison paired and fair it gets what the fine-tuning probe gets: the same
label subsets (``lvm.probe._curve`` draws them), the same step budget (epochs capped at a step count,
batch 128), horizontal flips when the probe flips, plus small random translations (pad and crop;
they suit any image domain). Validation comes from the subset's own labels (stratified, at least
one image per class where a class has two), early stopping keeps the best validation pass, and
the test images are read only by the final evaluation.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from lvm.augment import augment, default_pad
from lvm.runtime import EpochSampler, mixed_precision, param_groups, pick_device, set_lr, warmup_cosine

if TYPE_CHECKING:
    from lvm.probe import ProbeConfig

NAME = "supervised CNN"  # the features column of the baseline's rows in probe.json / probe.md
METHOD = "supervised"
STEM_SIDE = 32  # larger images enter through a patchifying stem that brings them to about this side


@dataclass
class SupervisedConfig:
    """How the CNN is built and trained on one labelled subset (``from_probe`` ties it to the fine-tuning budget)."""

    widths: tuple[int, ...] = (32, 64, 128)  # stem width, then one stride-2 stage per further width
    epochs: int = 10  # upper bound; ``max_steps`` may end training sooner
    max_steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    val_fraction: float = 0.1  # of each class, held out for validation (as much as fine-tuning holds out)
    evals: int = 10  # validation passes spread over training; the best one's weights are kept
    patience: int = 4  # stop after this many passes without a better one (0: run every step)
    flip: bool = True  # horizontal flips as augmentation
    pad: int | None = None  # random translations up to this many px (pad + crop); None: side / 8 within 2..4
    precision: str = "auto"  # autocast (see lvm.runtime.mixed_precision)
    device: str = "auto"
    seed: int = 0

    @classmethod
    def from_probe(cls, cfg: ProbeConfig, seed: int) -> "SupervisedConfig":
        """The fine-tuning probe's budget and augmentation, so both rows spend the same steps on the same labels."""
        return cls(epochs=cfg.finetune_epochs, max_steps=cfg.finetune_max_steps, batch_size=cfg.head_batch_size,
                       flip=cfg.flip, precision=cfg.precision, seed=seed)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU: a stem, then per width a stride-2 conv and a conv; global average pooling; linear head.

    Global pooling makes one set of weights fit any image size; the stem patchifies images larger
    than ``STEM_SIDE`` (kernel = stride = a power of 2) so that a 256 px image costs about what a
    32 px one does. Widths (32, 64, 128) give ~0.28 M parameters. Inputs are uint8 ``[B, C, H, W]``
    (or floats in [0, 1]), normalised per channel by statistics of the training images.
    """

    def __init__(self, channels: int, classes: int, image_size: int, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        stride = 2 ** max(0, math.ceil(math.log2(image_size / STEM_SIDE)))
        stem = (nn.Conv2d(channels, widths[0], 3, padding=1, bias=False) if stride == 1
                else nn.Conv2d(channels, widths[0], stride, stride=stride, bias=False))
        layers = [stem, nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for w_in, w in zip(widths[:-1], widths[1:]):
            layers += [*_conv_bn_relu(w_in, w, stride=2), *_conv_bn_relu(w, w)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], classes)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set_normalisation(self, images: torch.Tensor) -> None:
        """Per-channel mean and std of ``images`` (the training part only, so test images never inform them)."""
        x = images.float() / 255 if not images.is_floating_point() else images.float()
        self.mean.copy_(x.mean(dim=(0, 2, 3)))
        self.std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] -> logits [B, classes]."""
        x = x.float() / 255 if not x.is_floating_point() else x
        x = x.contiguous(memory_format=torch.channels_last)  # ~25 % faster convolutions on CPU
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.head(self.features(x).mean(dim=(2, 3)))  # global average pool: [B, widths[-1]]


def fit_supervised(
    images: torch.Tensor, labels, cfg: SupervisedConfig, classes: int | None = None,
    on_eval: Callable[[int, float, float, nn.Module], None] | None = None,
) -> tuple[SmallCNN, float | None]:
    """Train a ``SmallCNN`` from scratch on uint8 ``images [N, C, H, W]`` with ``labels [N]``.

    A stratified ``val_fraction`` of the rows is held out; returns the model with the weights of its
    best validation pass (accuracy, ties broken by loss) and that accuracy, or the last weights and
    None when the subset is too small to hold any out. ``on_eval(step, acc, loss, model)`` is called
    after each validation pass (for logs and tests).
    """
    labels = torch.as_tensor(labels).long()
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"fit_supervised: images {tuple(images.shape)} must be [N, C, H, W] with one label "
                         f"each ({len(labels)} labels); convert ImageSet arrays with lvm.supervised.to_nchw.")
    classes = classes or int(labels.max()) + 1
    device = pick_device(cfg.device)
    tr, val = stratified_split(labels, cfg.val_fraction, cfg.seed)
    x_tr, y_tr, x_val, y_val = images[tr], labels[tr], images[val], labels[val]
    torch.manual_seed(cfg.seed)
    model, opt = build_cnn(x_tr, classes, cfg, device)
    pad = cfg.pad if cfg.pad is not None else default_pad(max(images.shape[2:]))

    sampler = EpochSampler(len(tr), cfg.batch_size, cfg.seed)
    steps = max(1, min(cfg.max_steps, cfg.epochs * sampler.per_epoch))
    eval_at = set(np.linspace(0, steps, cfg.evals + 1, dtype=int)[1:].tolist()) if len(val) else set()
    warmup = max(1, steps // 20)
    autocast = mixed_precision(device, cfg.precision)
    gen = torch.Generator().manual_seed(cfg.seed)

    best_score, best_state, stale = (-math.inf, -math.inf), None, 0
    model.train()
    bar = tqdm(range(steps), desc="supervised CNN", unit="step", leave=False)
    for step in bar:
        idx = sampler.at(step)
        set_lr(opt, warmup_cosine(step, steps, warmup))
        loss = train_step(model, opt, x_tr[idx], y_tr[idx], cfg, pad, gen, autocast)
        if step + 1 in eval_at:
            acc, val_loss = evaluate(model, x_val, y_val, cfg.precision)
            model.train()
            if on_eval is not None:
                on_eval(step + 1, acc, val_loss, model)
            if (acc, -val_loss) > best_score:
                best_score, best_state, stale = (acc, -val_loss), copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{acc:.3f}")
            if cfg.patience and stale >= cfg.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, (best_score[0] if best_state is not None else None)


def build_cnn(train_images: torch.Tensor, classes: int, cfg: SupervisedConfig,
              device: torch.device | str = "cpu") -> tuple[SmallCNN, torch.optim.Optimizer]:
    """The CNN of ``fit_supervised`` normalised by its training images, and its AdamW: one place, so the
    quickstart's timing of a step (``lvm.quickstart.time_supervised_cnn``) times the step that is run."""
    model = SmallCNN(train_images.shape[1], classes, max(train_images.shape[2:]), cfg.widths)
    model.set_normalisation(train_images)
    model.to(device, memory_format=torch.channels_last)
    return model, torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr))


def train_step(model: SmallCNN, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               cfg: SupervisedConfig, pad: int, gen: torch.Generator, autocast) -> torch.Tensor:
    """One optimiser step on uint8 ``images`` [B, C, H, W]: augment, forward under ``autocast``, smoothed
    cross-entropy, backward, AdamW. Returns the loss."""
    device = next(model.parameters()).device
    x = augment(images.float() / 255, cfg.flip, pad, gen).to(device)  # [B, C, H, W] in [0, 1]
    with autocast:
        loss = F.cross_entropy(model(x).float(), labels.to(device), label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def supervised_efficiency(
    x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray, cfg: ProbeConfig,
    name: str = NAME,
) -> list[dict]:
    """Probe-table rows of the CNN at every ``cfg.fractions`` x ``cfg.seeds``, on the label subsets the
    probes draw (so each row pairs with theirs); ``x_*`` uint8 ``[N, C, H, W]``; test read after each fit only."""
    from lvm.probe import _curve

    classes = int(y_train.max()) + 1  # run_probe has checked that every test class has training images
    y_train_t = torch.from_numpy(y_train).long()

    def fit_score(idx: np.ndarray, s: int) -> tuple[float, float | None]:
        idx = torch.from_numpy(idx)
        model, val = fit_supervised(x_train[idx], y_train_t[idx], SupervisedConfig.from_probe(cfg, s), classes)
        return evaluate(model, x_test, y_test, cfg.precision)[0], val

    width = SupervisedConfig.widths[-1]  # the pooled features the linear head reads
    return _curve(name, METHOD, y_train, cfg.fractions, cfg.seeds, cfg.seed, width, fit_score, f"probes: {name}")


# ---- helpers -------------------------------------------------------------------------------------

def to_nchw(images: np.ndarray) -> torch.Tensor:
    """``ImageSet.images`` uint8 ``[N, H, W, C]`` -> uint8 ``[N, C, H, W]``: a view, no copy (channels-last
    strides, the layout the CNN runs in), kept uint8 (a quarter of float32's memory)."""
    return rearrange(torch.from_numpy(np.ascontiguousarray(images)), "n h w c -> n c h w")


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) row indices: ``fraction`` of every class held out, at least one of each class
    that has two or more images (so even a 1 % subset validates on every class), never a class's last."""
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    held = [torch.empty(0, dtype=torch.long)]
    if fraction > 0:
        for c in labels.unique():
            members = torch.nonzero(labels == c).flatten()
            k = min(max(1, round(len(members) * fraction)), len(members) - 1)
            held.append(members[torch.randperm(len(members), generator=gen)[:k]])
    val = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels, precision: str = "auto",
             batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``images`` [N, C, H, W], in batches, in eval mode."""
    model.eval()
    labels = torch.as_tensor(labels).long()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    with mixed_precision(device, precision):
        for i in range(0, len(images), batch_size):
            logits = model(images[i : i + batch_size].to(device)).float().cpu()
            y = labels[i : i + batch_size]
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
    n = max(len(labels), 1)
    return correct / n, loss / n


def _conv_bn_relu(w_in: int, w_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(w_in, w_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w_out),
            nn.ReLU(inplace=True)]
