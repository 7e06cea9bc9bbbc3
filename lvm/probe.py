"""Probes: how good are the LVM's hidden states for a labelled task, at 1/10/30/100 % of labels?

Features come from any layer of the LVM run on ``[BOS] image``; an image's token states are
pooled by ``mean`` (one vector), ``grid`` (average-pooled to a ``g x g`` grid, keeping the layout)
or ``tokens`` (all of them). Three probes (``methods``):

- ``linear``: multinomial logistic regression on standardised pooled features, L2 strength
  picked on a validation split;
- ``attentive``: an attention-pooling head trained on the frozen per-token states;
- ``finetune``: the LVM up to the chosen layer trained together with that head.

(the last two live in ``lvm.attentive``). Baselines at every fraction: raw pixels (linear), and
the same architecture at random init (every method; for ``finetune`` that is training from scratch).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from kernels.dispatch import PRECISIONS, mixed_precision
from lvm.data import SpecialTokens
from lvm.model import LVM
from tokenizer.images import ImageSet, load_images

POOLS = ("mean", "grid", "tokens")
METHODS = ("linear", "attentive", "finetune")


class ProbeError(ValueError):
    """A probe that cannot run as asked (e.g. unlabeled data); the message says what to pass instead."""


@dataclass
class ProbeConfig:
    """``lvm probe``: label-efficiency curves of the LVM's features against baselines."""

    checkpoint: str = "runs/lvm"  # training output folder or checkpoint folder
    compare: list[str] = field(default_factory=list)  # more checkpoints to probe on the same task
    tokenizer: str = ""  # empty -> the tokenizer recorded with the checkpoint
    source: str = "fashion-mnist"  # labelled images for probe training
    split: str = "train"
    test_source: str = ""  # empty -> same source, test_split
    test_split: str = "test"
    layers: list[int] = field(default_factory=list)  # empty -> sweep every layer on a subset, keep the best
    methods: list[str] = field(default_factory=lambda: ["linear"])  # linear, attentive, finetune
    pool: str = "grid"  # the linear probe's pooling: mean, grid, tokens (all token states concatenated)
    grid: int = 3  # g for pool=grid: token states average-pooled to g x g
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.3, 1.0])
    seeds: int = 3  # repeats (different label subsets) at fractions < 1
    baselines: bool = True  # raw pixels and random-init model
    sweep_images: int = 5000  # train images used to pick the layer
    limit_train: int = 0  # use at most this many labelled train images (0 = all)
    limit_test: int = 0
    head_epochs: int = 30  # attentive probe: epochs, capped at head_max_steps steps of head_batch_size
    head_max_steps: int = 2000
    head_batch_size: int = 128
    head_lr: float = 1e-3
    finetune_epochs: int = 10  # fine-tuning: epochs over the labelled subset, capped at finetune_max_steps
    finetune_max_steps: int = 300  # ~170 images/s for `small` on 2 cores: 300 x 128 images ~ 4 minutes per fit
    finetune_lr: float = 1e-3  # the head's; the LVM's is 10x lower
    flip: bool = True  # fine-tuning: horizontally flipped images as augmentation
    batch_size: int = 256
    precision: str = "auto"  # features, heads, fine-tuning: auto (bf16 on CUDA and AMX CPUs), bf16, fp32
    seed: int = 0
    out: str = "runs/probe"


def run_probe(cfg: ProbeConfig) -> dict:
    """The ``lvm probe`` entry point: writes probe.json, probe.md and label_efficiency.png."""
    from lvm.generate import load_model_and_tokenizer

    if cfg.pool not in POOLS:
        raise ProbeError(f"pool={cfg.pool!r} is not one of {POOLS}.")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise ProbeError(f"methods {cfg.methods} must be a non-empty list drawn from {METHODS}.")
    if cfg.precision not in PRECISIONS:
        raise ProbeError(f"precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}.")
    bad = [f for f in cfg.fractions if not 0 < f <= 1]
    if bad:
        raise ProbeError(f"fractions {bad} must lie in (0, 1].")
    model, tok, ckpt = load_model_and_tokenizer(cfg.checkpoint, cfg.tokenizer)
    size, channels = tok.config.image_size, tok.config.channels
    train_set = load_images(cfg.source, cfg.split, size=size, channels=channels, limit=cfg.limit_train or None)
    test_set = load_images(cfg.test_source or cfg.source, cfg.test_split, size=size, channels=channels,
                           limit=cfg.limit_test or None)
    for name, s in (("source", train_set), ("test_source", test_set)):
        if s.labels is None:
            raise ProbeError(
                f"{s.source} has no labels; probes need labelled images (a folder with one sub-folder per class, "
                f"IDX with a labels file, or .npz with 'labels'); pass a labelled --{name.replace('_', '-')}."
            )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_ids, test_ids = tok.encode(train_set.images), tok.encode(test_set.images)  # [N, h, w]
    if "finetune" in cfg.methods:  # fine-tuning reads token ids, one row per image: [N, h*w]
        ft_train, ft_test = (ids.reshape(len(ids), -1).long() for ids in (train_ids, test_ids))
        ft_flipped = None
        if cfg.flip:
            ft_flipped = tok.encode(np.ascontiguousarray(train_set.images[:, :, ::-1])).reshape(len(ft_train), -1).long()
    frozen_states = "linear" in cfg.methods or "attentive" in cfg.methods  # both read cached token states

    results: dict = {"config": asdict(cfg), "checkpoint": str(ckpt), "rows": [], "layer_sweep": {}, "seconds_by_stage": {}}
    models = {"lvm": model}
    for path in cfg.compare:
        other, other_tok, other_ckpt = load_model_and_tokenizer(path, cfg.tokenizer)
        if other_tok.fingerprint != tok.fingerprint:
            raise ProbeError(f"--compare {path} uses another tokenizer than {ckpt}; probes compare checkpoints of one tokenizer.")
        models[f"lvm:{path}"] = other  # the path as given: basenames like "lvm" repeat
    if cfg.baselines:
        torch.manual_seed(cfg.seed)
        models["random-init"] = LVM(model.config).eval()

    special = SpecialTokens(tok.vocab_size)
    clock = results["seconds_by_stage"]
    for name, m in models.items():
        layers = cfg.layers
        if not layers:
            print(f"probe: choosing the layer of {name} on {min(cfg.sweep_images, len(train_ids))} train images", flush=True)
            tic = time.time()
            best, scores = pick_layer(m, train_ids, train_set.labels, special, cfg)
            clock[f"{name}: layer sweep"] = round(time.time() - tic, 1)
            results["layer_sweep"][name] = scores
            layers = [best]
        for lay in layers:
            label = f"{name} (layer {lay})"
            if frozen_states:
                print(f"probe: features of {name}, layer {lay}", flush=True)
                tic = time.time()
                t_train = extract_features(m, train_ids, special, lay, "tokens", batch_size=cfg.batch_size,
                                           precision=cfg.precision)
                t_test = extract_features(m, test_ids, special, lay, "tokens", batch_size=cfg.batch_size,
                                          precision=cfg.precision)
                clock[f"{label}: features"] = round(time.time() - tic, 1)
            if "linear" in cfg.methods:
                tic = time.time()
                hw = train_ids.shape[1:]
                f_train, f_test = (pool_tokens(t, cfg.pool, hw, cfg.grid) for t in (t_train, t_test))
                results["rows"] += label_efficiency(label, f_train, train_set.labels, f_test, test_set.labels,
                                                    cfg.fractions, cfg.seeds, cfg.seed)
                clock[f"{label}: linear"] = round(time.time() - tic, 1)
                del f_train, f_test
            if "attentive" in cfg.methods:
                tic = time.time()
                results["rows"] += head_efficiency(label, "attentive", t_train, train_set.labels, t_test,
                                                   test_set.labels, cfg)
                clock[f"{label}: attentive"] = round(time.time() - tic, 1)
            if frozen_states:
                del t_train, t_test
            if "finetune" in cfg.methods:
                tic = time.time()
                results["rows"] += head_efficiency(label, "finetune", ft_train, train_set.labels, ft_test,
                                                   test_set.labels, cfg, lvm=m, layer=lay, bos=special.bos,
                                                   flipped=ft_flipped)
                clock[f"{label}: finetune"] = round(time.time() - tic, 1)
    if cfg.baselines:
        px_train, px_test = pixel_features(train_set), pixel_features(test_set)
        results["rows"] += label_efficiency("raw pixels", px_train, train_set.labels, px_test, test_set.labels,
                                            cfg.fractions, cfg.seeds, cfg.seed)
    results["seconds"] = round(time.time() - t0, 1)
    (out / "probe.json").write_text(json.dumps(results, indent=2))
    (out / "probe.md").write_text(markdown_table(results["rows"], cfg.fractions))
    plot_label_efficiency(results["rows"], out / "label_efficiency.png")
    return {"out": str(out), "table": str(out / "probe.md"), "rows": results["rows"]}


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(
    model: LVM, ids: torch.Tensor, special: SpecialTokens, layers: int | list[int], pool: str = "grid",
    grid: int = 3, batch_size: int = 256, precision: str = "auto",
) -> torch.Tensor | dict[int, torch.Tensor]:
    """Hidden states of each layer over each image's tokens, pooled to [N, F] (``tokens``: [N, h*w, D]).

    One forward pass serves every requested layer; an int ``layers`` returns one tensor, a list a
    dict layer -> features. ``precision`` is the forward's autocast (see ``kernels.dispatch.mixed_precision``).
    """
    model.eval()
    device = next(model.parameters()).device
    wanted = [layers] if isinstance(layers, int) else list(layers)
    n, h, w = ids.shape
    seq = torch.cat([torch.full((n, 1), special.bos), ids.reshape(n, h * w).long()], dim=1)  # [N, 1 + h*w]
    outs: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    for start in tqdm(range(0, n, batch_size), desc="features", unit="batch", leave=False):
        with mixed_precision(device, precision):
            states = model.hidden_states(seq[start : start + batch_size].to(device), layers=wanted)
        for layer, state in zip(wanted, states):
            # Image token i sits at position i + 1; the state there has read tokens 0..i + 1.
            tokens = state[:, 1:].cpu()  # [b, h*w, D]; pool_tokens works in fp32, "tokens" are kept in fp16
            outs[layer].append(tokens.half() if pool == "tokens" else pool_tokens(tokens, pool, (h, w), grid))
    feats = {layer: torch.cat(chunks) for layer, chunks in outs.items()}
    return feats[layers] if isinstance(layers, int) else feats


def pool_tokens(tokens: torch.Tensor, pool: str, hw: tuple[int, int], grid: int = 3, batch_size: int = 4096) -> torch.Tensor:
    """Per-token states ``[N, h*w, D]`` -> features ``[N, F]`` (``tokens``: all of them, flattened), in float32."""
    h, w = hw
    chunks = []
    for start in range(0, len(tokens), batch_size):
        t = tokens[start : start + batch_size].float()
        if pool == "mean":
            chunks.append(t.mean(dim=1))
        elif pool == "grid":
            spatial = rearrange(t, "b (h w) d -> b d h w", h=h, w=w)
            chunks.append(F.adaptive_avg_pool2d(spatial, grid).flatten(1))  # [b, D * g * g]
        else:
            chunks.append(t.flatten(1))
    return torch.cat(chunks)


def pixel_features(images: ImageSet) -> torch.Tensor:
    return torch.from_numpy(images.images.reshape(len(images), -1)).float() / 255.0


def pick_layer(
    model: LVM, ids: torch.Tensor, labels: np.ndarray, special: SpecialTokens, cfg: ProbeConfig
) -> tuple[int, dict[int, float]]:
    """The layer whose features give the best linear-probe accuracy on a held-out part of a subset
    of the *training* images (the test set is never used to choose), and every layer's score."""
    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(ids))[: min(cfg.sweep_images, len(ids))]
    cut = int(len(idx) * 0.8)
    layers = list(range(1, model.config.n_layer + 1))
    pool = cfg.pool if cfg.pool != "tokens" else "grid"
    feats = extract_features(model, ids[idx], special, layers, pool, cfg.grid, cfg.batch_size, cfg.precision)
    y = torch.from_numpy(labels[idx])
    scores = {layer: LinearProbe.fit(f[:cut], y[:cut]).accuracy(f[cut:], y[cut:]) for layer, f in feats.items()}
    return max(scores, key=scores.get), scores


# ---------------------------------------------------------------------------------------------
# Linear probe: multinomial logistic regression, L2 picked on a validation split
# ---------------------------------------------------------------------------------------------

@dataclass
class LinearProbe:
    """Standardise -> linear -> softmax; fitted by full-batch L-BFGS (convex, so it converges)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [C, F]
    bias: torch.Tensor  # [C]
    l2: float

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, l2: float | None = None, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1),
            val_fraction: float = 0.15, seed: int = 0, max_iter: int = 200,
            init: "LinearProbe | None" = None, classes: int | None = None) -> "LinearProbe":
        """Fit; with ``l2=None`` pick it on a random validation split, then refit on all.

        The grid is walked from the strongest L2 to the weakest, each fit starting from the previous
        solution, and the final refit starts from the chosen one (the optimum moves little along the
        regularisation path). With the looser tolerances below this fits 60k x 2304 features in 56 s
        instead of 80 s on 2 cores, at the same test accuracy.
        """
        y = torch.as_tensor(y).long()
        classes = max(int(y.max()) + 1, classes or 0)
        if l2 is None:
            n_val = max(int(len(x) * val_fraction), 1)
            if len(x) - n_val < 2 or len(set(y.tolist())) < 2:
                l2 = l2_grid[len(l2_grid) // 2]
            else:
                perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
                val, tr = perm[:n_val], perm[n_val:]
                best, best_acc, prev = None, -1.0, init
                for lam in sorted(l2_grid, reverse=True):
                    prev = cls.fit(x[tr], y[tr], lam, max_iter=max_iter, init=prev, classes=classes)
                    acc = prev.accuracy(x[val], y[val])
                    if acc > best_acc:
                        best, best_acc = prev, acc
                l2, init = best.l2, best
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        if init is not None and init.weight.shape == (classes, x.shape[1]):
            weight, bias = init.weight.clone().requires_grad_(True), init.bias.clone().requires_grad_(True)
        else:
            weight = torch.zeros(classes, x.shape[1], requires_grad=True)
            bias = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-4, tolerance_change=1e-6)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xs @ weight.T + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(mean, std, weight.detach(), bias.detach(), l2)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (((x - self.mean) / self.std) @ self.weight.T + self.bias).argmax(1)

    def accuracy(self, x: torch.Tensor, y) -> float:
        return float((self.predict(x) == torch.as_tensor(y)).float().mean())


def label_efficiency(
    name: str, f_train: torch.Tensor, y_train: np.ndarray, f_test: torch.Tensor, y_test: np.ndarray,
    fractions: list[float], seeds: int, seed: int = 0,
) -> list[dict]:
    """Test accuracy of a linear probe trained on each fraction of the labels (mean ± std over seeds)."""
    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)

    def fit_score(idx: np.ndarray, s: int) -> tuple[float, None]:
        return LinearProbe.fit(f_train[idx], y_train_t[idx], seed=s).accuracy(f_test, y_test_t), None

    return _curve(name, "linear", y_train, fractions, seeds, seed, int(f_train.shape[1]), fit_score, f"probes: {name}")


def head_efficiency(
    name: str, method: str, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
    cfg: ProbeConfig, lvm: LVM | None = None, layer: int = 0, bos: int = 0, flipped: torch.Tensor | None = None,
) -> list[dict]:
    """``label_efficiency`` for the trained heads: ``attentive`` on frozen token states ``[N, T, D]``,
    ``finetune`` on token ids ``[N, T]`` (needs ``lvm``, ``layer``, ``bos``)."""
    from lvm.attentive import HeadTrainConfig, accuracy, fine_tune, fit_attentive

    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)
    attentive = method == "attentive"

    def fit_score(idx: np.ndarray, s: int) -> tuple[float, float]:
        idx = torch.from_numpy(idx)
        train_cfg = HeadTrainConfig(epochs=cfg.head_epochs if attentive else cfg.finetune_epochs,
                                    max_steps=cfg.head_max_steps if attentive else cfg.finetune_max_steps,
                                    batch_size=cfg.head_batch_size, lr=cfg.head_lr if attentive else cfg.finetune_lr,
                                    precision=cfg.precision, seed=s)
        if attentive:
            clf, val = fit_attentive(x_train[idx], y_train_t[idx], train_cfg)
        else:
            clf, val = fine_tune(lvm, x_train[idx], y_train_t[idx], layer, bos, train_cfg,
                                 flipped_ids=None if flipped is None else flipped[idx])
        return accuracy(clf, x_test, y_test_t, cfg.precision), val

    return _curve(name, method, y_train, cfg.fractions, cfg.seeds, cfg.seed, int(x_train.shape[-1]), fit_score,
                  f"{method} probes: {name}")


def _curve(name: str, method: str, y_train: np.ndarray, fractions: list[float], seeds: int, seed: int, dim: int,
           fit_score, desc: str) -> list[dict]:
    """One row per fraction: ``fit_score(subset indices, seed) -> (test acc, val acc or None)`` over
    ``seeds`` class-balanced label subsets (one at 100 %), reduced to mean ± std."""
    rows = []
    bar = tqdm(total=sum(seeds if f < 1 else 1 for f in fractions), desc=desc, unit="fit")
    for frac in fractions:
        accs, val_accs = [], []
        for s in range(seeds if frac < 1 else 1):
            idx = _subset(y_train, frac, seed + s)
            acc, val = fit_score(idx, seed + s)
            accs.append(acc)
            if val is not None:
                val_accs.append(val)
            bar.update(1)
        row = {"features": name, "method": method, "fraction": frac, "n_labels": len(idx),
               "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)), "runs": len(accs)}
        if val_accs:
            row["val_acc_mean"] = float(np.mean(val_accs))
        rows.append({**row, "dim": dim})
    bar.close()
    return rows


def _subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-balanced random subset: the same fraction of every class (at least one each)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(len(members) * fraction)))
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict], fractions: list[float]) -> str:
    """(features, probe) x fraction table of test accuracy (mean ± std over label subsets)."""
    keys = list(dict.fromkeys((r["features"], r.get("method", "linear")) for r in rows))
    head = "| features | probe | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |\n"
    head += "|---|---|" + "---|" * len(fractions) + "\n"
    lines = []
    for name, method in keys:
        cells = []
        for f in fractions:
            r = next((r for r in rows if (r["features"], r.get("method", "linear")) == (name, method)
                      and math.isclose(r["fraction"], f)), None)
            cells.append("" if r is None else f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}"
                         if r["runs"] > 1 else f"{100 * r['acc_mean']:.1f}")
        lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot_label_efficiency(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key in dict.fromkeys((r["features"], r.get("method", "linear")) for r in rows):
        pts = sorted((r["fraction"], 100 * r["acc_mean"], 100 * r["acc_std"]) for r in rows
                     if (r["features"], r.get("method", "linear")) == key)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{key[0]}, {key[1]}",
                    linestyle={"linear": "-", "attentive": "--", "finetune": ":"}.get(key[1], "-"))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
