"""``lvm quickstart``: the whole story on Fashion-MNIST in one folder, inside a time budget.

    tokenizer-train -> tokenize (train, test) -> train LVM -> generate -> probe -> classifier/ -> report.md

``--time-budget`` (default 30 minutes) is split over the stages from speeds measured at the start:
a timed forward pass of the LVM and a timed probe-sized matmul predict the fixed stages (tokenize,
probes); the two trained stages share the rest, and each fits its step count to its share during
its own warmup (``lvm.runtime.StepBudget``), so the run is sized for the machine it is on, AMX or
not. The report states the budget, each stage's share and time, and the steps actually run;
re-running with ``--tokenizer-steps`` / ``--lvm-steps`` set to those counts reproduces the models.
The probe stage's linear probe at 100 % labels is written as a classifier bundle (``classifier/``,
nothing refitted) that ``lvm predict`` / ``lvm export`` / ``lvm serve`` take as it is. Beside the
LVM the probes show what a user would do without it: raw pixels, and (``--supervised auto``: where
a few timed training steps predict that it fits the probe stage's share) a small CNN trained from
scratch on the same label subsets (``lvm.supervised``); what the budget left out, the report says,
with the command that runs it.

Finished stages are skipped on a re-run (tokenizer, probes) or resume from their last checkpoint
(tokenize, pretrain); generation is cheap and always re-run. ``--fast`` is a smoke run of about a
minute on a subset with a tiny model and fixed step counts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tokenizer.atomic import write_json_atomic, write_text_atomic
from tokenizer.splits import write_split_record

MAX_TOKENIZER_STEPS = 1000  # 1000 steps: 23.6 dB; more adds little
MAX_LVM_STEPS = 3000  # 4 epochs of Fashion-MNIST at 8 rows a step (1500 at 16 rows gained +0.6 point at 10 % labels over 500)
LVM_WARMUP = 50  # a 30-minute budget on a 2-core fp32 CPU buys ~400 steps of 8 rows; a long warmup would waste them
TOKENIZER_SHARE = 0.2  # of the time left for the two trained stages; the LVM gets the rest
# Probe-stage cost model, measured in a full run on a 2-core AMD EPYC (no AMX, fp32), where the probes
# took 1263 s of 1984 (layer 6 chosen): per probed model, features of 5000 (layer sweep) + 70k images
# through up to all blocks, at ~0.9x the rate measure_speeds sees (82k full-depth equivalents below),
# and L-BFGS fits worth ~1440 passes of a 60k x 2304 matmul; the raw-pixel fits ~500 such passes.
# A run whose sweep picks a shallower layer finishes early (layer 3: probes 738 s).
FEATURE_IMAGES_PER_MODEL = 82_000
FIT_PASSES_PER_MODEL = 1440
FIT_DIMS = 2304  # the width those passes were counted at: the small LVM's 256 states x the probe's 3x3 pooling grid
PIXEL_FIT_PASSES = 500
ESTIMATE_MARGIN = 1.05  # fixed stages are predicted, not fitted: err a little on the long side
RANDOM_INIT_MAX_SHARE = 1 / 3  # the random-init baseline runs only if the whole probe stage fits in this share
# Beyond this share, the probes fit on an even subsample of the labelled training images. A third, not half
# (sessions 1-12): the LVM's steps buy accuracy at every label fraction, the subsample only the quickstart's
# own '100 %' row (session 12, AMX: 2x the LVM steps took the full-label probe from 89.5 to 90.2 %).
PROBE_MAX_SHARE = 1 / 3
# (--supervised auto: the supervised CNN runs only if the probe stage including it fits this share too)
SUPERVISED_MODES = ("auto", "on", "off")
MIN_PROBE_IMAGES = 1000
SLACK_S = 45.0  # generation, plots, classifier bundle, report, process start
FAST_TEST_IMAGES = 1000  # --fast: test images tokenized and probed


@dataclass
class QuickstartConfig:
    """``lvm quickstart``: tokenizer, LVM pretraining, continuations and label-efficiency probes."""

    out: str = "runs/quickstart"  # everything lands here; re-running resumes
    source: str = "fashion-mnist"  # labelled images: folder (class sub-folders or labels.csv), CSV, IDX, .npy/.npz, fashion-mnist
    test_source: str = ""  # an explicit labelled test set; empty -> test_fraction of the source, chosen by path hash
    test_fraction: float = 0.2  # share of a source without a named split held out as test (never trained on)
    unlabeled: list[str] = field(default_factory=list)  # more image folders/files the tokenizer and LVM pretrain on
    image_size: int = 0  # 0 = the images' size (mixed sizes: the most common, stated in the report)
    channels: int = 0  # 0 = the images' (grey if all are grey, else RGB)
    grid: int = 0  # tokens per side; 0 = at most 14 where bf16 is fast (AMX CPUs, CUDA: 14x14 for 28 px), else at most 8 (7x7)
    on_error: str = "fail"  # unreadable image files: fail, or skip them (counted in the report)
    fast: bool = False  # a smoke run of about a minute (subset, tiny sizes, fixed steps)
    time_budget: float = 30.0  # minutes for the whole run, split over the stages from measured speeds; 0 = none
    preset: str = "small"  # LVM size for the default run
    tokenizer_steps: int = 0  # 0 -> as many as fit the budget, at most 1000; N -> exactly N
    lvm_steps: int = 0  # 0 -> as many as fit the budget, at most 3000; N -> exactly N
    lvm_batch_size: int = 8  # rows per step: at equal tokens 8 beat 16 (+0.7 point at 10 % labels, bench/results/pretrain-levers-cpu.md)
    lvm_lr: float = 2e-3
    context_len: int = 512  # tokens per training row, rounded down to whole sentences (10 of 51 for 28 px)
    compile: str = "auto"  # torch.compile the LVM: auto (where bf16 is fast: 1.55x steps on AMX, 1.04x in fp32 on an AMD EPYC), yes, no
    precision: str = "auto"  # tokenizer, LVM and feature extraction: auto (bf16 on CUDA and AMX CPUs), bf16, fp32
    probe_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.3, 1.0])
    probe_methods: list[str] = field(default_factory=lambda: ["linear"])  # + attentive: ~4 more minutes; finetune: ~5 min a fit
    probe_pool: str = "grid"
    probe_grid: int = 3
    # +1.8 / +1.4 / +0.9 / +0.9 points at 1 / 10 / 30 / 100 % labels on Fashion-MNIST, -0.7 / +0.2 / -1.2 on scikit-image
    # crops, where pixels alone score 37 % (bench/results/claim-table-cpu.md): so "auto" checks on training images
    probe_pixels: str = "auto"  # linear probe and bundle: raw pixels appended to the LVM's features: auto, on, off
    # linear probe and bundle: fitted on every image and its left-right mirror, predicting from both: +0.8 / +0.4 / +0.9 /
    # +0.7 points at 1 / 10 / 30 / 100 % on Fashion-MNIST (bench/results/claim-table-amx.md) for twice the probes'
    # features and fits, which the budget pays with a smaller probe subsample; off by default, as not every domain keeps
    # its classes in a mirror
    probe_mirror: bool = False
    probe_seeds: int = 3  # label subsets per fraction < 100 % (1 % labels is noisy: ±0.5 point per subset)
    supervised: str = "auto"  # small CNN from scratch on the same labels: auto (if the probes fit their third of the budget with it), on, off
    seed: int = 0


def quickstart(cfg: QuickstartConfig) -> dict:
    """Run (or resume) every stage and write ``report.md``; returns the headline figures."""
    from lvm.generate import GenerateConfig, generate
    from lvm.probe import ProbeConfig, run_probe
    from lvm.tokenizer_train import TokenizerTrainConfig, train_tokenizer
    from lvm.train import TrainConfig, train
    from tokenizer.shards import TokenizeConfig, read_token_shards, run_tokenize

    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "quickstart_config.json", asdict(cfg))
    fast = cfg.fast

    # 0. sides: which images are test, checked against everything that trains --------------------
    print("\n== quickstart: split ==", flush=True)
    t0 = time.time()
    split = write_split_record(out / "split.json", cfg.source, cfg.test_source or None, cfg.unlabeled,
                               cfg.test_fraction, cfg.image_size or None, cfg.channels or None, cfg.on_error)
    sides = {"test_fraction": cfg.test_fraction, "test_source": cfg.test_source}
    cfg = replace(cfg, grid=quickstart_grid(cfg, split["image_shape"][0]))
    budget = Budget.load_or_plan(out, cfg, split, time.time() - t0)
    stages = budget.stages

    # 1. tokenizer ------------------------------------------------------------------------------
    budget.start("tokenizer")
    tok_dir = out / "tokenizer"
    height, _, channels = split["image_shape"]
    if not (tok_dir / "eval.json").exists():
        train_tokenizer(TokenizerTrainConfig(
            data=cfg.source, unlabeled=cfg.unlabeled, out_dir=str(tok_dir), image_size=height, channels=channels,
            grid=cfg.grid, steps=300 if fast else cfg.tokenizer_steps or MAX_TOKENIZER_STEPS,
            time_budget=0 if fast or cfg.tokenizer_steps else budget.share("tokenizer") / 60,
            batch_size=tokenizer_batch(split["image_shape"]),
            limit=3000 if fast else 0, eval_holdout=500, seed=cfg.seed, precision=cfg.precision, on_error=cfg.on_error,
            **({"width": 32, "eval_every": 0, "max_eval_images": 1000} if fast else {}), **sides,
        ))
    tok_eval = json.loads((tok_dir / "eval.json").read_text())
    budget.end("tokenizer", steps=tok_eval.get("steps"))

    # 2. tokens ---------------------------------------------------------------------------------
    budget.start("tokenize")
    limit = {"train": 3000, "test": FAST_TEST_IMAGES} if fast else {"train": 0, "test": 0}
    for side in ("train", "test"):
        run_tokenize(TokenizeConfig(source=cfg.source, tokenizer=str(tok_dir), out=str(out / "tokens" / side),
                                    split=side, limit=limit[side], on_error=cfg.on_error,
                                    unlabeled=cfg.unlabeled if side == "train" else [], **sides))
    train_tokens = read_token_shards(out / "tokens" / "train")
    budget.end("tokenize")

    # 3. LVM pretraining --------------------------------------------------------------------------
    budget.start("pretrain")
    lvm_dir = out / "lvm"
    sentence = int(np.prod(train_tokens.meta["grid"])) + 2  # [BOS] image [EOS]
    summary = train(TrainConfig(
        data=str(out / "tokens" / "train"), eval_data=str(out / "tokens" / "test"), out=str(lvm_dir),
        preset="tiny" if fast else cfg.preset, context_len=context_for(sentence, 128 if fast else cfg.context_len),
        steps=300 if fast else (cfg.lvm_steps or MAX_LVM_STEPS),
        time_budget=0 if fast or cfg.lvm_steps else budget.share("pretrain") / 60,
        batch_size=8 if fast else cfg.lvm_batch_size, lr=cfg.lvm_lr,
        warmup_steps=30 if fast else LVM_WARMUP, eval_every=100 if fast else 250, ckpt_every=100 if fast else 250,
        eval_rows=16 if fast else 64, seed=cfg.seed, compile=not fast and use_compile(cfg), precision=cfg.precision,
    ))
    entropy = unigram_entropy(np.asarray(train_tokens.tokens))
    if summary.get("plan_revisions"):  # the step plan moved with the machine's speed (lvm.runtime.StepBudget)
        stages["pretrain"]["plan_revisions"] = summary["plan_revisions"]
    budget.end("pretrain", steps=summary["steps"])

    # 4. continuations --------------------------------------------------------------------------
    budget.start("generate")
    gen = generate(GenerateConfig(checkpoint=str(lvm_dir), source=cfg.source, split="test", prompts=6,
                                  samples=5, complete_rows=max(1, train_tokens.meta["grid"][0] * 3 // 7),
                                  temperature=1.0, top_k=0, seed=cfg.seed, out=str(out / "generate"),
                                  on_error=cfg.on_error, **sides))
    budget.end("generate")

    # 5. probes, and the 100 %-labels linear probe as a classifier bundle ---------------------------
    budget.start("probe")
    probe_dir, bundle_dir = out / "probe", out / "classifier"
    wants_bundle = "linear" in cfg.probe_methods and any(f >= 1 for f in cfg.probe_fractions)
    missing_bundle = wants_bundle and not (bundle_dir / "bundle.json").exists()
    if (probe_dir / "probe.json").exists() and missing_bundle:  # a run from before bundles, or stopped in between
        print(f"quickstart: no classifier bundle in {bundle_dir}; running the probes again to fit it", flush=True)
    if not (probe_dir / "probe.json").exists() or missing_bundle:
        probed = run_probe(ProbeConfig(
            checkpoint=str(lvm_dir), source=cfg.source, fractions=cfg.probe_fractions, pool=cfg.probe_pool,
            methods=cfg.probe_methods, **({"head_max_steps": 200, "finetune_max_steps": 30} if fast else {}),
            grid=cfg.probe_grid, pixels=cfg.probe_pixels, mirror=cfg.probe_mirror, seeds=cfg.probe_seeds,
            sweep_images=1000 if fast else 5000,
            limit_train=3000 if fast else budget.measured.get("probe_train_images", 0),
            limit_test=FAST_TEST_IMAGES if fast else 0,
            out=str(probe_dir), seed=cfg.seed,
            precision=cfg.precision, random_init=budget.measured.get("random_init", True),
            supervised=run_supervised(cfg, budget), on_error=cfg.on_error, **sides,
        ))
        if probed["linear_probe"] is not None:
            write_classifier(bundle_dir, cfg, probed, split)
    probe = json.loads((probe_dir / "probe.json").read_text())
    budget.end("probe")

    # 6. report ---------------------------------------------------------------------------------
    from lvm.report import plot_loss_curve

    plot_loss_curve(lvm_dir / "metrics.jsonl", out / "loss_curve.png", unigram_entropy=entropy)
    shown = show_classifier(out, cfg) if (bundle_dir / "bundle.json").exists() else None
    report = write_report(out, cfg, tok_eval, summary, entropy, probe, budget, split, shown)
    print(f"\nquickstart report: {report}")
    return {"report": str(report), "classifier": str(bundle_dir) if shown else None,
            "tokenizer_psnr_db": tok_eval.get("psnr_db"), "eval_loss": summary["eval_loss"],
            "unigram_entropy": entropy, "grid": gen["grid"], "timings_s": {k: v.get("seconds") for k, v in stages.items()},
            "steps": {k: v["steps"] for k, v in stages.items() if "steps" in v}, "budget_s": budget.total_s}


def tokenizer_batch(image_shape: list[int]) -> int:
    """128 images of 28x28 grey per tokenizer step, and about as many pixels for larger images (at
    least 32 images): at 64 px RGB a 128-image step took 3.7 s on 2 fp32 cores, so a budgeted run
    got 28 steps (18.2 dB); more, smaller steps learn more in the same time."""
    pixels = int(np.prod(image_shape))
    return int(min(128, max(32, 128 * 784 // pixels // 8 * 8)))


def context_for(sentence: int, context_len: int) -> int:
    """Whole sentences per training row: at most ``context_len`` tokens, at least one sentence."""
    return max(1, context_len // sentence) * sentence


def check_config(cfg: QuickstartConfig) -> None:
    """Flags whose mistakes would otherwise surface only at a late stage."""
    from lvm.runtime import ConfigError

    if cfg.supervised not in SUPERVISED_MODES:
        raise ConfigError(f"--supervised {cfg.supervised!r} is not one of {', '.join(SUPERVISED_MODES)}.")
    if cfg.probe_mirror and "linear" not in cfg.probe_methods:
        raise ConfigError(f"--probe-mirror is a linear-probe option; add linear to --probe-methods "
                          f"(got {cfg.probe_methods}).")


def run_supervised(cfg: QuickstartConfig, budget: "Budget") -> bool:
    """Whether the probe stage trains the supervised CNN: ``on`` / ``off`` as asked; ``auto`` as the plan
    decided, and always without a budget (``--fast``: its steps are capped like fine-tuning's, 30). A plan
    made before the decision existed (a resumed run) did not count its cost, so ``auto`` leaves it out there."""
    if cfg.supervised != "auto":
        return cfg.supervised == "on"
    return bool(budget.measured.get("supervised", not budget.measured))


def use_compile(cfg: QuickstartConfig) -> bool:
    """torch.compile pays where matmuls are fast and overheads dominate (bf16 on AMX or CUDA); on an fp32
    CPU the step is matmul-bound, compiling gained 4 % and costs its compile time out of the budget."""
    if cfg.compile not in ("auto", "yes", "no"):
        from lvm.runtime import ConfigError

        raise ConfigError(f"--compile {cfg.compile!r} is not one of auto, yes, no.")
    if cfg.compile != "auto":
        return cfg.compile == "yes"
    return fast_bf16(cfg)


# --grid 0 where bf16 is fast: the finest grid of at most this many tokens per side. On 2 AMX cores the 30-minute run
# at 14x14 scored 79.7 / 86.2 / 88.2 / 89.5 % (states, session 12; 80.1 / 87.0 / 88.6 / 90.2 % in session 13's, with
# more LVM steps in the same budget) at 1 / 10 / 30 / 100 % of the Fashion-MNIST labels against 79.6 / 85.1 / 86.9 /
# 88.6 % for the 7x7 grid's 24,000 rows there (bench/results/claim-table-amx.md); on an fp32 CPU the 14x14 grid's 4.7x cost per image leaves too few steps
# (bench/results/grid-cost-cpu.md), so it stays at 8 (7x7).
FAST_MAX_GRID = 14


def quickstart_grid(cfg: QuickstartConfig, image_size: int) -> int:
    """The token grid of the run: ``--grid`` where given; for ``--grid 0`` on a machine where bf16 is fast, the finest
    grid of at most FAST_MAX_GRID per side that the image size allows; else 0 (the tokenizer's default, at most 8)."""
    if cfg.grid or cfg.fast or not fast_bf16(cfg):
        return cfg.grid
    fits = [f for f in (2, 4, 8, 16, 32, 64) if image_size % f == 0 and image_size // f <= FAST_MAX_GRID]
    return image_size // fits[0] if fits else 0


def fast_bf16(cfg: QuickstartConfig) -> bool:
    """Whether this run trains in bf16 on hardware that multiplies it fast (AMX CPU or CUDA)."""
    import torch

    from lvm.runtime import bf16_is_fast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return cfg.precision != "fp32" and bf16_is_fast(device)


def trained_seconds(left_s: float, fixed_s: float) -> float:
    """Seconds the trained stages (tokenizer, then LVM) share: what is left of the budget after the untrained
    stages' estimates and the slack; never below a minute, as each stage must run."""
    return max(left_s - fixed_s - SLACK_S, 60.0)


class Budget:
    """The run's time plan and record (``budget.json``): each stage's share, time and step count.

    Planned once, at the first start, from speeds measured on this machine; a resumed quickstart
    keeps the plan and adds the time its earlier runs spent, so the record covers the whole run.
    """

    def __init__(self, path: Path, total_s: float, stages: dict, measured: dict) -> None:
        self.path, self.total_s, self.stages, self.measured = path, total_s, stages, measured
        self._t0: float | None = None

    @classmethod
    def load_or_plan(cls, out: Path, cfg: QuickstartConfig, split: dict | None = None,
                     split_s: float = 0.0) -> "Budget":
        path = out / "budget.json"
        if path.exists():
            saved = json.loads(path.read_text())
            budget = cls(path, saved["total_s"], saved["stages"], saved["measured"])
        else:
            total = 0.0 if cfg.fast else cfg.time_budget * 60
            measured = measure_speeds(cfg.precision, RunShape.of(split, cfg.grid), cfg.probe_pixels != "off",
                                      cfg.probe_mirror) if total > 0 else {}
            stages = {name: {} for name in ("split", "tokenizer", "tokenize", "pretrain", "generate", "probe")}
            if measured:
                probe_s = plan_probes(measured, RunShape.of(split, cfg.grid), total, cfg.supervised,
                                      cfg.probe_fractions, cfg.probe_seeds)
                stages["tokenize"]["estimate_s"] = round(measured["tokenize_s"], 1)
                stages["probe"]["estimate_s"] = round(probe_s, 1)
            budget = cls(path, total, stages, measured)
        record = budget.stages.setdefault("split", {})
        record["seconds"] = round(record.get("seconds", 0.0) + split_s, 1)
        budget.save()
        return budget

    @property
    def spent_s(self) -> float:
        return sum(v.get("seconds", 0.0) for v in self.stages.values())

    def share(self, stage: str) -> float:
        """Seconds for a trained stage: what is left after the fixed stages' estimates (and, for the
        tokenizer, its fraction of that); 0 when the run has no budget."""
        if self.total_s <= 0:
            return 0.0
        fixed = sum(v.get("estimate_s", 0.0) for k, v in self.stages.items() if "seconds" not in v)
        left = trained_seconds(self.total_s - self.spent_s, fixed)
        seconds = left * TOKENIZER_SHARE if stage == "tokenizer" else left
        self.stages[stage]["share_s"] = round(seconds, 1)
        self.save()
        return seconds

    def start(self, stage: str) -> None:
        print(f"\n== quickstart: {stage} ==", flush=True)
        self._t0 = time.time()

    def end(self, stage: str, steps: int | None = None) -> None:
        """Add this run's time for ``stage`` (a stage skipped as finished adds next to nothing)."""
        record = self.stages[stage]
        record["seconds"] = round(record.get("seconds", 0.0) + time.time() - self._t0, 1)
        if steps is not None:
            record["steps"] = int(steps)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"total_s": self.total_s, "stages": self.stages, "measured": self.measured})


def plan_probes(measured: dict, shape: "RunShape", total: float, supervised: str = "auto",
                fractions: list[float] | None = None, seeds: int = 3) -> float:
    """Decide what the probe stage runs inside the budget and return its predicted seconds.

    The LVM's probes and the raw-pixel baseline always run. Where they would pass their share of the
    budget (``PROBE_MAX_SHARE``; many labelled images on a slow CPU) they fit on an even subsample of
    the labelled training images, recorded as ``probe_train_images`` and stated in the report; the test set is always
    used whole. The supervised CNN (``supervised``: auto) is kept where the stage including it
    still fits that share, recorded as ``supervised`` with its predicted cost
    ``supervised_estimate_s`` (``on`` keeps it, and a subsample then leaves room for it). The
    random-init baseline doubles the model probes: kept where the whole stage, supervised CNN
    included, fits in a third of the budget. Measured speeds from before the supervised CNN was
    timed plan without it.
    """
    fractions = [0.01, 0.1, 0.3, 1.0] if fractions is None else fractions
    timed = "supervised_step_s" in measured and supervised != "off"
    cnn_s = lambda train: supervised_seconds(measured, shape, train, fractions, seeds) if timed else 0.0  # noqa: E731
    half = PROBE_MAX_SHARE * total
    probe_s = measured["probe_s_per_model"] + measured["probe_pixels_s"]
    forced = supervised == "on"
    train = shape.train
    if probe_s + (cnn_s(train) if forced else 0.0) > half and "per_train_image_s" in measured:
        # the stage is then fixed + per-image cost x training images (sweep capped at 5000 images)
        per_image, fixed = measured["per_train_image_s"], measured["probe_fixed_s"]
        fit = int((half - fixed) / per_image)
        if forced:  # room for the CNN's fits, whose cost also falls with the subsample: the largest that fits
            low, high = 0, min(fit, shape.train)
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fixed + per_image * mid + cnn_s(mid) <= half else (low, mid - 1)
            fit = low
        train = measured["probe_train_images"] = max(min(fit, shape.train), min(MIN_PROBE_IMAGES, shape.train))
        probe_s = fixed + per_image * train
    if supervised == "off":
        measured["supervised"] = False
    elif timed:
        measured["supervised_estimate_s"] = round(cnn_s(train), 1)
        measured["supervised"] = supervised == "on" or probe_s + measured["supervised_estimate_s"] <= half
        probe_s += measured["supervised_estimate_s"] if measured["supervised"] else 0.0
    with_random = probe_s + measured["probe_s_per_model"]
    measured["random_init"] = "probe_train_images" not in measured and with_random <= RANDOM_INIT_MAX_SHARE * total
    return with_random if measured["random_init"] else probe_s


def supervised_seconds(measured: dict, shape: "RunShape", train: int, fractions: list[float], seeds: int) -> float:
    """Predicted seconds of the supervised CNN's fits (``lvm.supervised.supervised_efficiency``) on ``train``
    labelled images: per fraction, ``seeds`` fits (one at 100 %), each as many steps as ``fit_supervised``
    runs (epochs over the subset's training part, capped at the fine-tuning step budget; early stopping
    only shortens it), its validation passes and a pass over the test images, at the speeds
    ``measure_speeds`` timed (``supervised_step_s`` for a batch, ``supervised_eval_images_per_s``)."""
    from lvm.probe import ProbeConfig
    from lvm.supervised import SupervisedConfig

    probe, sup = ProbeConfig(), SupervisedConfig()
    step_s, eval_ips = measured["supervised_step_s"], measured["supervised_eval_images_per_s"]
    classes = max(1, shape.classes)
    per_class = train / classes
    seconds = 0.0
    for fraction in fractions:
        labelled = max(1, round(per_class * fraction))  # per class, as lvm.probe._subset draws it
        held = min(max(1, round(labelled * sup.val_fraction)), labelled - 1)  # as stratified_split holds out
        n_train, n_val = classes * (labelled - held), classes * held
        batch = min(probe.head_batch_size, n_train)
        steps = max(1, min(probe.finetune_max_steps, probe.finetune_epochs * (n_train // batch)))
        fit_s = steps * step_s * batch / probe.head_batch_size + (sup.evals * n_val + shape.test) / eval_ips
        seconds += fit_s * (seeds if fraction < 1 else 1)
    return ESTIMATE_MARGIN * seconds


@dataclass
class RunShape:
    """What the stage costs scale with: image shape, token grid, and images per side."""

    image_shape: tuple[int, int, int] = (28, 28, 1)
    grid: int = 0  # tokens per side; 0 = the tokenizer's default for the size
    train: int = 60_000  # labelled training images
    test: int = 10_000
    unlabeled: int = 0
    classes: int = 10

    @classmethod
    def of(cls, split: dict | None, grid: int = 0) -> "RunShape":
        if not split:
            return cls(grid=grid)
        return cls(tuple(split["image_shape"]), grid, sum(split["train"].values()), sum(split["test"].values()),
                   sum(split.get("unlabeled", {}).values()), max(1, len(split["train"])))


def measure_speeds(precision: str = "auto", shape: RunShape | None = None, pixels: bool = False,
                   mirror: bool = False) -> dict:
    """A few seconds of timing that predict the fixed stages on this machine: the small LVM's
    forward (feature extraction), the tokenizer's encoder (tokenizing), and the matmul shape of
    the linear-probe fits, scaled to the run's image counts, size and grid; and a few training steps of
    the supervised CNN baseline at the run's image shape and batch (``plan_probes`` turns them into the
    cost of its fits; ``pixels``: the LVM's linear probes read the raw pixels too, wider fits; ``mirror``: they
    read every train and test image's mirror too, twice the features and fit rows). Returns rates and the
    predicted seconds of the tokenize and probe stages."""
    import torch

    from lvm.config import LVMConfig
    from lvm.model import LVM
    from lvm.probe import PIXEL_FEATURES_MAX, _compiled_forward
    from lvm.runtime import mixed_precision
    from tokenizer.model import Tokenizer, TokenizerConfig, auto_layout

    shape = shape or RunShape()
    size, _, channels = shape.image_shape
    patch, downsamplings = auto_layout(size, shape.grid)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), mixed_precision(device, precision):
        tok = Tokenizer(TokenizerConfig(image_size=size, channels=channels, patch_size=patch,
                                        widths=(64,) * (downsamplings + 1))).eval()
        tokens = tok.grid[0] * tok.grid[1]
        lvm = LVM(LVMConfig.preset("small", vocab_size=1004, max_seq_len=max(512, tokens + 2))).eval()
        ids = torch.randint(0, 1000, (256, tokens + 1), generator=gen)
        # the forward the probe's extraction runs: compiled where bf16 is fast (lvm.probe.COMPILE_MIN_TOKENS)
        compiled = _compiled_forward(lvm, precision)
        forward = compiled or lvm.hidden_states
        tic = time.perf_counter()
        forward(ids, layers=[lvm.config.n_layer])  # the first call compiles
        first_s = time.perf_counter() - tic
        forward_s = _best_time(lambda: forward(ids, layers=[lvm.config.n_layer]), repeats=2)
        images = torch.rand(min(512, max(64, 2**22 // (size * size * channels))), channels, size, size, generator=gen)
        encode_s = _best_time(lambda: tok.encode(images))
    x, w = torch.randn(15_000, FIT_DIMS, generator=gen), torch.randn(FIT_DIMS, 10, generator=gen)
    pass_s = 4 * _best_time(lambda: (x @ w).T @ x, repeats=2)  # forward + weight gradient, scaled to 60k rows
    forward_ips, encode_ips = 256 / forward_s, len(images) / encode_s
    # compiling once for the layer sweep's layers and once for the chosen layer; nothing where the forward is eager
    compile_s = 2 * max(0.0, first_s - forward_s) if compiled is not None else 0.0
    cnn_step_s, cnn_eval_ips = time_supervised_cnn(shape, precision)
    # Per labelled training image: its features (x1.09: the measured rate overstates a full run's) and its
    # share of the L-BFGS fits, calibrated at Fashion-MNIST's 60k rows; raw pixels are pooled to <= PIXEL_FEATURES_MAX values.
    feature_s = FEATURE_IMAGES_PER_MODEL / 75_000 / forward_ips
    pixel_dims = min(size * size * channels, PIXEL_FEATURES_MAX)
    fit_s = FIT_PASSES_PER_MODEL * pass_s / 60_000 * ((FIT_DIMS + pixel_dims) / FIT_DIMS if pixels else 1.0)
    pixel_s = PIXEL_FIT_PASSES * pass_s / 60_000 * max(1.0, pixel_dims / 784)
    sweep, copies = min(5000, shape.train), 2 if mirror else 1
    per_model = ESTIMATE_MARGIN * (feature_s * (sweep + copies * (shape.train + shape.test))
                                   + copies * fit_s * shape.train + compile_s)
    return {"forward_images_per_s": round(forward_ips, 1), "encode_images_per_s": round(encode_ips, 1),
            "fit_pass_s": round(pass_s, 4),
            "tokenize_s": ESTIMATE_MARGIN * (shape.train + shape.test + shape.unlabeled) / encode_ips + 10.0,
            "probe_s_per_model": per_model, "probe_pixels_s": ESTIMATE_MARGIN * pixel_s * shape.train,
            "per_train_image_s": ESTIMATE_MARGIN * (copies * (feature_s + fit_s) + pixel_s),
            "probe_fixed_s": ESTIMATE_MARGIN * (feature_s * (5000 + copies * shape.test) + compile_s),
            "extract_compile_s": round(compile_s, 1),
            "supervised_step_s": round(cnn_step_s, 4), "supervised_eval_images_per_s": round(cnn_eval_ips, 1),
            "torch_threads": torch.get_num_threads()}


def time_supervised_cnn(shape: "RunShape", precision: str = "auto") -> tuple[float, float]:
    """(seconds per training step, test images per second) of ``lvm.supervised``'s ``SmallCNN`` at the run's
    image shape and the probes' batch: ``fit_supervised``'s own step (``lvm.supervised.train_step``) on random
    uint8 images, and its batched evaluation: 2-3 s at 28 px on one core."""
    import torch

    from lvm.augment import default_pad
    from lvm.probe import ProbeConfig
    from lvm.runtime import mixed_precision
    from lvm.supervised import SupervisedConfig, build_cnn, evaluate, train_step

    h, w, c = shape.image_shape
    classes, batch, cfg = max(2, shape.classes), ProbeConfig().head_batch_size, SupervisedConfig()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (512, c, h, w), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (512,), generator=gen)
    torch.manual_seed(0)
    model, opt = build_cnn(images, classes, cfg)
    autocast, pad = mixed_precision(torch.device("cpu"), precision), default_pad(max(h, w))
    model.train()
    step_s = _best_time(lambda: train_step(model, opt, images[:batch], labels[:batch], cfg, pad, gen, autocast))
    eval_s = _best_time(lambda: evaluate(model, images, labels, precision), repeats=2)
    return step_s, len(images) / eval_s


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores all context."""
    counts = np.bincount(tokens.reshape(-1).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def write_report(out: Path, cfg: QuickstartConfig, tok_eval: dict, train_summary: dict, entropy: float,
                 probe: dict, budget: Budget, split: dict, classifier: dict | None = None) -> Path:
    """One Markdown page with every figure and picture of the run (``classifier``: ``show_classifier``'s)."""
    probe_md = (out / "probe" / "probe.md").read_text()
    lines = [
        "# LVM quickstart report",
        "",
        f"Source: `{cfg.source}`; mode: {'fast smoke run' if cfg.fast else 'default'}.",
        "",
        *budget_lines(budget, cfg),
        *split_lines(split, out),
        "## 1. Visual tokenizer",
        "",
        f"{tok_eval.get('grid', ['?', '?'])[0]}x{tok_eval.get('grid', ['?', '?'])[1]} tokens per image of "
        f"{tok_eval.get('vocab_size', '?')} codes. Held-out PSNR **{tok_eval.get('psnr_db', float('nan')):.2f} dB**, codebook usage "
        f"**{100 * tok_eval.get('codebook_usage', float('nan')):.1f} %**, perplexity "
        f"{tok_eval.get('perplexity', float('nan')):.0f}, encoding {tok_eval.get('encode_images_per_s', 0):,.0f} images/s.",
        "",
        "Originals (top) and reconstructions (bottom):",
        "",
        "![reconstructions](tokenizer/recon.png)",
        "",
        "## 2. LVM pretraining",
        "",
        f"Final train loss {train_summary['loss']:.3f}, held-out loss **{train_summary['eval_loss']:.3f}** nats/token "
        f"vs the unigram entropy {entropy:.3f} (a model that ignores context); "
        f"{train_summary['tokens_per_s']:,.0f} tokens/s; {train_summary['params_non_embedding'] / 1e6:.2f} M "
        "non-embedding parameters.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## 3. Completions",
        "",
        "Left of the bar: a test image with its bottom rows hidden (grey); right: the LVM's completions.",
        "",
        "![completions](generate/grid.png)",
        "",
        "## 4. Label efficiency (test accuracy %)",
        "",
        "Probes on the best layer (chosen on training images): `linear` is logistic regression on grid-pooled "
        "token states" + pixels_text(cfg.probe_pixels, probe) +
        (", fitted on every labelled image and its left-right mirror and reading a test image's class from the mean "
         "of both versions' probabilities (`, mirrored`; so does the classifier below)" if cfg.probe_mirror else "") +
        ", `attentive` an attention-pooling head on the frozen token states, `finetune` the LVM "
        "trained with that head. Baselines: raw pixels and (unless left out, see above) the same architecture at "
        "random init." + supervised_text(probe) + " Fractions below 100 % are means ± std over label subsets.",
        "",
        probe_md,
        "![label efficiency](probe/label_efficiency.png)",
        "",
        *classifier_lines(cfg, classifier, split),
    ]
    return write_text_atomic(out / "report.md", "\n".join(lines))


FIGURE_IMAGES = 16  # test images in classifier/predictions.png (a few of each class)


def write_classifier(bundle_dir: Path, cfg: QuickstartConfig, probed: dict, split: dict) -> dict:
    """The probe stage's linear probe at 100 % labels as a classifier bundle, wrapped without refitting
    (``bundle_from_probe``: seconds). Its metrics are the probe's test accuracy, on images no stage
    fitted or chose on, and what the head was fitted on (a subsample where the budget or --fast cut it)."""
    from lvm.classifier_train import bundle_from_probe

    probe, layer = probed["linear_probe"], probed["layer"]
    row = next(r for r in probed["rows"] if r["features"] == probed["features"] and r["method"] == "linear"
               and r["fraction"] >= 1)
    n_train, n_test = sum(split["train"].values()), sum(split["test"].values())
    n_test = min(n_test, FAST_TEST_IMAGES) if cfg.fast else n_test
    metrics = {
        "test_accuracy": row["acc_mean"],
        "test_accuracy_is": f"test accuracy ({test_side(cfg, split)}, never used to fit or choose), measured by the "
                            f"quickstart's probe stage on {n_test:,} test images",
        "test_images": n_test,
        "train_images": row["n_labels"],
        "fitted": f"the quickstart's linear probe at 100 % labels (layer {layer}, chosen on training images; "
                  f"L2 {probe.l2:g}, chosen on a validation split of the training labels"
                  + ("; fitted on the images and their mirrors, predicting from both" if probed.get("mirror") else "")
                  + "), wrapped without refitting",
    }
    if row["n_labels"] < n_train:
        why = "--fast" if cfg.fast else "the probes on every label would not fit their third of the time budget on this CPU"
        metrics["train_subsample"] = (f"the head was fitted on {row['n_labels']:,} of the {n_train:,} labelled "
                                      f"training images, a subsample of the training side ({why}); "
                                      "'lvm classifier-train' fits one on all of them")
    classes = probed["classes"][: probe.weight.shape[0]]
    return bundle_from_probe(str(Path(cfg.out) / "lvm"), probe, layer, str(bundle_dir), classes, pool=cfg.probe_pool,
                             grid=cfg.probe_grid, metrics=metrics, pixels=probed.get("pixels") is not None,
                             mirror=bool(probed.get("mirror")), training={"source": cfg.source, "test_source": cfg.test_source or None,
                                       "by": "lvm quickstart"})


def test_side(cfg: QuickstartConfig, split: dict) -> str:
    """The test images in words: the side no stage trains or chooses on."""
    if cfg.test_source:
        return f"the test set {cfg.test_source}"
    if split.get("rule", "").startswith("the source's published"):
        return "Fashion-MNIST test" if "fashion" in cfg.source.lower() else f"the {cfg.source} test split"
    return f"the test side of {cfg.source}, {split.get('rule', 'split.json')}"


def show_classifier(out: Path, cfg: QuickstartConfig) -> dict:
    """Load the saved bundle as a user would (``Classifier.from_pretrained``), predict a few test images (the
    first of each class, in test order), save them as PNGs in ``examples/`` (what the report's commands run
    on) and draw ``classifier/predictions.png``: proof that the bundle on disk works. Returns what the
    report states about it."""
    import shutil

    from PIL import Image

    from lvm.classifier import Classifier
    from tokenizer.images import open_images

    bundle_dir = out / "classifier"
    size = sum(f.stat().st_size for f in bundle_dir.rglob("*") if f.is_file() and f.name != "predictions.png")
    clf = Classifier.from_pretrained(bundle_dir)
    test = open_images(cfg.source, "test", clf.image_size, clf.channels, cfg.on_error, progress=False,
                       test_fraction=cfg.test_fraction, test_source=cfg.test_source or None)
    names = test.class_names or [str(c) for c in range(int(test.labels.max()) + 1)]
    present = np.unique(test.labels)
    per_class = max(1, min(4, round(FIGURE_IMAGES / len(present))))
    picks = [int(p) for c in present for p in np.flatnonzero(test.labels == c)[:per_class]][: 2 * FIGURE_IMAGES]
    images, kept = test.read(np.asarray(picks))
    truth = [names[test.labels[p]] for p in kept]
    predicted, probs = clf.predict(images)

    examples = out / "examples"
    shutil.rmtree(examples, ignore_errors=True)
    examples.mkdir()
    files = []
    for i, (image, name) in enumerate(zip(images, truth)):
        slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-") or "image"
        files.append(examples / f"{i:02d}-{slug}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(files[-1])
    wrong = plot_predictions(images, predicted, probs.max(1), truth, bundle_dir / "predictions.png")
    return {"path": bundle_dir, "bytes": size, "params": clf.num_params()["total"], "layer": clf.layer,
            "classes": len(clf.classes), "metrics": clf.info.get("metrics", {}), "shown": len(images),
            "per_class": per_class, "wrong": wrong, "examples": files}


def plot_predictions(images: np.ndarray, predicted: list[str], confidence: np.ndarray, truth: list[str],
                     path: Path) -> int:
    """A grid of images titled with the predicted label and its probability over the true one; wrong ones in
    red with a cross. Returns how many are wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols, 1.75 * rows), dpi=110, squeeze=False)
    wrong = 0
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, pred, p, true in zip(axes.flat, images, predicted, confidence, truth):
        ok = pred == true
        wrong += not ok
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_title(f"{'' if ok else 'X '}{pred} {100 * p:.0f}%\ntrue: {true}", fontsize=6.5,
                     color="black" if ok else "red")
    fig.suptitle("predicted label, probability / true label (X, red: wrong)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return wrong


def classifier_lines(cfg: QuickstartConfig, shown: dict | None, split: dict) -> list[str]:
    """Section 5: where the bundle is, what it scores, a figure of its predictions, and how to run it."""
    import shlex

    run = Path(cfg.out)
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    lines = ["## 5. Your classifier", ""]
    if shown is None:
        return lines + [
            "No classifier bundle: the linear probe did not run at 100 % labels (`--probe-methods` / "
            f"`--probe-fractions`). `lvm classifier-train --checkpoint {q(run / 'lvm')} --source {q(cfg.source)} "
            f"{'--pixels ' if cfg.probe_pixels == 'on' else ''}{'--mirror ' if cfg.probe_mirror else ''}"
            f"--out {q(run / 'classifier')}` builds one.", ""]
    m = shown["metrics"]
    mib = shown["bytes"] / 2**20
    lines += [
        f"`{run / 'classifier'}/` is a classifier bundle ({mib:.1f} MiB; tokenizer, LVM cut at layer {shown['layer']} "
        f"and the linear head, safetensors + JSON; {shown['params'] / 1e6:.2f} M parameters run per image): the "
        "linear probe of section 4 at 100 % labels, saved as it was fitted, nothing refitted. "
        + (f"Test accuracy **{100 * m['test_accuracy']:.1f} %** on {m['test_images']:,} test images "
           f"({test_side(cfg, split)}: never used to fit or choose)." if "test_accuracy" in m else ""),
        "",
    ]
    if m.get("train_subsample"):
        lines += [f"Note: {m['train_subsample']}.", ""]
    example = shown["examples"][0] if shown["examples"] else run / "examples" / "image.png"
    lines += [
        f"{shown['shown']} test images ({shown['per_class']} of each class, the first in test order) as the saved "
        "bundle predicts them, loaded back with `lvm.Classifier.from_pretrained`: predicted label and probability "
        f"over the true label, wrong ones in red ({shown['wrong']} of {shown['shown']}). The images are in "
        f"`{run / 'examples'}/`.",
        "",
        "![predictions](classifier/predictions.png)",
        "",
        "Run it on your images (`lvm export` and `lvm serve` need the deploy extra: `pip install -e '.[deploy]'`):",
        "",
        "```bash",
        f"lvm predict --model {q(run / 'classifier')} --images {q(run / 'examples')} --out preds.csv --top-k 3",
        f"lvm export --model {q(run / 'classifier')} --format onnx --out {q(run / 'classifier.onnx')}",
        f"lvm serve --model {q(run / 'classifier')} --port 8000 --backend onnx",
        f"curl -F files=@{q(example)} http://127.0.0.1:8000/predict   # from another shell",
        "```",
        "",
        f"From Python: `Classifier.from_pretrained({str(run / 'classifier')!r}).predict(paths)` (`from lvm import "
        "Classifier`).",
        "",
    ]
    return lines

def split_lines(split: dict, out: Path) -> list[str]:
    """The data the run used: image shape, the split rule, images per side and class, warnings."""
    h, w, c = split["image_shape"]
    lines = ["## 0. Data", "",
             f"Images read at {h}x{w}, {'RGB' if c == 3 else 'grey'}. Split: {split['rule']} (`split.json`); "
             f"{split['checked']}.", ""]
    lines += [f"- {note}" for note in split.get("notes", [])]
    skipped = _skipped_files(out)
    if skipped:
        lines.append(f"- {len(skipped)} unreadable file(s) skipped (`--on-error skip`), e.g. {', '.join(skipped[:3])}")
    lines += ["", "| class | train | test |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {split['test'].get(name, 0)} |" for name, n in split["train"].items()]
    lines.append(f"| **all** | {sum(split['train'].values())} | {sum(split['test'].values())} |")
    for name, n in split.get("unlabeled", {}).items():
        lines.append(f"| unlabeled: {name} | {n} | - |")
    lines.append("")
    lines += [f"**Warning:** {text}" for text in split.get("warnings", [])]
    return lines + [""]


def _skipped_files(out: Path) -> list[str]:
    found = []
    for side in ("train", "test"):
        meta = out / "tokens" / side / "meta.json"
        if meta.exists():
            found += json.loads(meta.read_text()).get("skipped", [])
    return found


def budget_lines(budget: Budget, cfg: QuickstartConfig) -> list[str]:
    """The time budget, each stage's share and time, and the steps actually run, as Markdown."""
    from lvm.runtime import cpu_has_fast_bf16, cpu_model

    total = budget.spent_s
    head = (f"Time: **{total / 60:.1f} min** in all"
            + (f" of a {budget.total_s / 60:.0f}-minute budget" if budget.total_s else " (no time budget)")
            + f"; CPU: {cpu_model() or 'unknown'}, "
            + f"AMX {'yes' if cpu_has_fast_bf16() else 'no'}, precision {cfg.precision}.")
    rows = ["| stage | share or estimate (s) | time (s) | steps |", "|---|---|---|---|"]
    for name, rec in budget.stages.items():
        plan = rec.get("share_s", rec.get("estimate_s", ""))
        rows.append(f"| {name} | {plan} | {rec.get('seconds', '')} | {rec.get('steps', '')} |")
    steps = {k: v.get("steps") for k, v in budget.stages.items()}
    grid = f"--grid {cfg.grid} " if cfg.grid else ""
    revised = budget.stages.get("pretrain", {}).get("plan_revisions")
    same = "the same models again." if not revised else (
        "the same step counts again, with the LVM's learning-rate schedule set for "
        f"{steps['pretrain']:,} steps from the start (this run's plan was revised at step"
        f"{'s' if len(revised) > 1 else ''} {', '.join(f'{r[0]:,}' for r in revised)} as the machine's speed "
        "moved: a close model, not the same one).")
    again = (f"`lvm quickstart {grid}--tokenizer-steps {steps['tokenizer']} --lvm-steps {steps['pretrain']}` "
             f"trains {same}" if steps.get("tokenizer") and steps.get("pretrain") else "")
    random_left_out = budget.measured.get("random_init") is False
    skipped = ("The random-init baseline was left out to keep the probes within the budget on this CPU; "
               f"`{probe_command(cfg, budget)}` runs it." if random_left_out else "")
    if cfg.supervised == "off" or (cfg.supervised == "auto" and budget.measured.get("supervised") is False):
        why = ("was turned off (`--supervised off`)" if cfg.supervised == "off" else
               f"was left out to keep the probes within the budget on this CPU (its fits were predicted at "
               f"{budget.measured.get('supervised_estimate_s', float('nan')):.0f} s)")
        skipped += (f" The supervised CNN baseline (what a user would do without the LVM: a small CNN trained from "
                    f"scratch on the same label subsets) {why}; `{probe_command(cfg, budget, '--supervised')}` "
                    "runs it" + ("." if random_left_out else " (`--no-random-init`: that baseline ran here)."))
    subsample = budget.measured.get("probe_train_images")
    if subsample:
        skipped += (f" The probes fit on {subsample:,} labelled training images spread evenly over the training "
                    "side (all of them would not fit the probes' third of the budget on this CPU), so '100 %' below means those; "
                    "the test set is whole. `lvm probe` without `--limit-train` uses them all.")
    return [head, "", *rows, "", again, skipped.strip(), ""]


def probe_command(cfg: QuickstartConfig, budget: Budget, *flags: str) -> str:
    """The ``lvm probe`` command that probes this run's LVM on the same data, labels and settings as its probe
    stage, plus ``flags`` (``--supervised``: with the supervised CNN, and then without the random-init
    baseline where that ran here), into ``RUN/probe-baselines``."""
    import shlex

    from lvm.probe import ProbeConfig

    default, q = ProbeConfig(), lambda v: shlex.quote(str(v))  # noqa: E731
    run = Path(cfg.out)
    parts = ["lvm probe", "--checkpoint", q(run / "lvm")]
    if cfg.source != default.source:
        parts += ["--source", q(cfg.source)]
    if cfg.test_source:
        parts += ["--test-source", q(cfg.test_source)]
    elif cfg.test_fraction != default.test_fraction:
        parts += ["--test-fraction", f"{cfg.test_fraction:g}"]
    if cfg.on_error != default.on_error:
        parts += ["--on-error", cfg.on_error]
    if cfg.probe_fractions != default.fractions:
        parts += ["--fractions", *(f"{f:g}" for f in cfg.probe_fractions)]
    if cfg.probe_seeds != default.seeds:
        parts += ["--seeds", str(cfg.probe_seeds)]
    if cfg.probe_pool != default.pool or cfg.probe_grid != default.grid:
        parts += ["--pool", cfg.probe_pool, "--grid", str(cfg.probe_grid)]
    if cfg.probe_pixels != default.pixels:
        parts += ["--pixels", cfg.probe_pixels]
    if cfg.probe_mirror:
        parts += ["--mirror"]
    if cfg.probe_methods != default.methods:
        parts += ["--methods", *cfg.probe_methods]
    if cfg.precision != default.precision:
        parts += ["--precision", cfg.precision]
    if budget.measured.get("probe_train_images"):
        parts += ["--limit-train", str(budget.measured["probe_train_images"])]
    parts += list(flags)
    if "--supervised" in flags and budget.measured.get("random_init") is not False:
        parts.append("--no-random-init")
    return " ".join(parts + ["--out", q(run / "probe-baselines")])


def pixels_text(mode: str, probe: dict) -> str:
    """The report's words for ``--probe-pixels``: what the linear probe reads besides the states, and what ``auto``
    decided in this run and on what ('' for off)."""
    from lvm.probe import SWEEP_FIT_SHARE

    if mode == "off":
        return ""
    text = " with the image's raw pixels appended (`+ pixels`: the detail the tokens lose)"
    choice = probe.get("pixels_choice")
    if mode != "auto" or not choice:
        return text
    acc, held = choice["val_accuracy"], choice["images"] - int(choice["images"] * SWEEP_FIT_SHARE)
    return (f"{text} where that scored better on held-out training images (this run: "
            f"{'kept' if choice['kept'] else 'left out'}; states + pixels {100 * acc['states + pixels']:.1f} % vs "
            f"states {100 * acc['states']:.1f} % on {held:,} held-out training images at layer {choice['layer']})")


def supervised_text(probe: dict) -> str:
    """Section 4's words on the supervised CNN row, from the settings its fits ran with; empty when it did not run."""
    from lvm.supervised import NAME

    if not any(row["features"] == NAME for row in probe["rows"]):
        return ""
    pc = probe.get("config", {})
    augmentation = ("its horizontal flips plus small random translations as augmentation" if pc.get("flip", True)
                    else "small random translations as augmentation")
    return (f" `{NAME}` is what a user would do without the LVM: a small CNN (~0.28 M parameters, `lvm.supervised`) "
            "trained from scratch on the raw pixels of the same label subsets as the probes, with the fine-tuning "
            f"probe's step budget (at most {pc.get('finetune_epochs', '?')} epochs, capped at "
            f"{pc.get('finetune_max_steps', '?')} steps of {pc.get('head_batch_size', '?')} images) and "
            f"{augmentation}; it keeps its best pass on a validation split of the subset's own labels.")

