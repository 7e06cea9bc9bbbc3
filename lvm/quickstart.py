"""``lvm quickstart``: the whole story on Fashion-MNIST in one folder, resumable stage by stage.

    tokenizer-train -> tokenize (train, test) -> train LVM -> generate -> probe -> report.md

Every stage writes its outputs atomically and is skipped (or resumed) when re-run, so an
interrupted quickstart continues where it stopped. ``--fast`` is a few-minute smoke run on a
subset with a tiny model; the default run is sized for about 30 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class QuickstartConfig:
    """``lvm quickstart``: tokenizer, LVM pretraining, continuations and label-efficiency probes."""

    out: str = "runs/quickstart"  # everything lands here; re-running resumes
    source: str = "fashion-mnist"  # labelled images with a train/test split
    fast: bool = False  # a few-minute smoke run (subset, tiny sizes)
    preset: str = "small"  # LVM size for the default run
    tokenizer_steps: int = 1000
    lvm_steps: int = 0  # 0 -> 1500 (4 epochs, ~15 min) where bf16 is fast (AMX CPU, CUDA), else 500 (fp32 CPU)
    lvm_batch_size: int = 16
    lvm_lr: float = 2e-3
    context_len: int = 510  # 10 Fashion-MNIST sentences of 51 tokens
    compile: bool = True  # torch.compile the LVM (~40 s of compilation, then ~1.4x faster steps on CPU)
    precision: str = "auto"  # tokenizer, LVM and feature extraction: auto (bf16 on CUDA and AMX CPUs), bf16, fp32
    probe_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.3, 1.0])
    probe_methods: list[str] = field(default_factory=lambda: ["linear"])  # + attentive: ~4 more minutes; finetune: ~5 min a fit
    probe_pool: str = "grid"
    probe_grid: int = 3
    probe_seeds: int = 3  # label subsets per fraction < 100 % (1 % labels is noisy: ±0.5 point per subset)
    seed: int = 0


def quickstart(cfg: QuickstartConfig) -> dict:
    """Run (or resume) every stage and write ``report.md``; returns the headline figures."""
    from lvm.generate import GenerateConfig, generate
    from lvm.probe import ProbeConfig, run_probe
    from lvm.train import TrainConfig, train
    from tokenizer.shards import TokenizeConfig, read_token_shards, run_tokenize
    from lvm.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    fast = cfg.fast
    timings: dict[str, float] = {}

    def stage(name: str):
        print(f"\n== quickstart: {name} ==", flush=True)
        timings[name] = time.time()

    def done(name: str):
        timings[name] = round(time.time() - timings[name], 1)

    # 1. tokenizer ------------------------------------------------------------------------------
    stage("tokenizer")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "eval.json").exists():
        train_tokenizer(TokenizerTrainConfig(
            data=cfg.source, out_dir=str(tok_dir), steps=300 if fast else cfg.tokenizer_steps,
            limit=3000 if fast else 0, eval_holdout=500, seed=cfg.seed, precision=cfg.precision,
            **({"widths": "32,32", "eval_every": 0} if fast else {}),
        ))
    tok_eval = json.loads((tok_dir / "eval.json").read_text())
    done("tokenizer")

    # 2. tokens ---------------------------------------------------------------------------------
    stage("tokenize")
    limit = {"train": 3000, "test": 1000} if fast else {"train": 0, "test": 0}
    for split in ("train", "test"):
        run_tokenize(TokenizeConfig(source=cfg.source, tokenizer=str(tok_dir), out=str(out / "tokens" / split),
                                    split=split, limit=limit[split]))
    train_tokens = read_token_shards(out / "tokens" / "train")
    done("tokenize")

    # 3. LVM pretraining --------------------------------------------------------------------------
    stage("pretrain")
    lvm_dir = out / "lvm"
    summary = train(TrainConfig(
        data=str(out / "tokens" / "train"), eval_data=str(out / "tokens" / "test"), out=str(lvm_dir),
        preset="tiny" if fast else cfg.preset, context_len=102 if fast else cfg.context_len,
        steps=300 if fast else (cfg.lvm_steps or default_lvm_steps(cfg.precision)),
        batch_size=8 if fast else cfg.lvm_batch_size, lr=cfg.lvm_lr,
        warmup_steps=30 if fast else 100, eval_every=100 if fast else 250, ckpt_every=100 if fast else 250,
        eval_rows=16 if fast else 64, seed=cfg.seed, compile=cfg.compile and not fast, precision=cfg.precision,
    ))
    entropy = unigram_entropy(np.asarray(train_tokens.tokens))
    done("pretrain")

    # 4. continuations --------------------------------------------------------------------------
    stage("generate")
    gen = generate(GenerateConfig(checkpoint=str(lvm_dir), source=cfg.source, split="test", prompts=6,
                                  samples=5, complete_rows=3, temperature=1.0, top_k=0, seed=cfg.seed,
                                  out=str(out / "generate")))
    done("generate")

    # 5. probes ---------------------------------------------------------------------------------
    stage("probe")
    probe_dir = out / "probe"
    if not (probe_dir / "probe.json").exists():
        run_probe(ProbeConfig(
            checkpoint=str(lvm_dir), source=cfg.source, fractions=cfg.probe_fractions, pool=cfg.probe_pool,
            methods=cfg.probe_methods, **({"head_max_steps": 200, "finetune_max_steps": 30} if fast else {}),
            grid=cfg.probe_grid, seeds=cfg.probe_seeds, sweep_images=1000 if fast else 5000,
            limit_train=3000 if fast else 0, limit_test=1000 if fast else 0, out=str(probe_dir), seed=cfg.seed,
            precision=cfg.precision,
        ))
    probe = json.loads((probe_dir / "probe.json").read_text())
    done("probe")

    # 6. report ---------------------------------------------------------------------------------
    from lvm.report import plot_loss_curve

    plot_loss_curve(lvm_dir / "metrics.jsonl", out / "loss_curve.png", unigram_entropy=entropy)
    report = write_report(out, cfg, tok_eval, summary, entropy, probe, timings)
    print(f"\nquickstart report: {report}")
    return {"report": str(report), "tokenizer_psnr_db": tok_eval.get("psnr_db"), "eval_loss": summary["eval_loss"],
            "unigram_entropy": entropy, "grid": gen["grid"], "timings_s": timings}


def default_lvm_steps(precision: str = "auto") -> int:
    """Pretraining steps that fit the ~30-minute budget: `small` steps take ~0.6 s on 2 AMX cores in
    bf16 (compiled) but ~1.6 s in fp32; 1500 steps probe at 85.5 % with 10 % labels, 500 at 84.3 %."""
    import torch

    from kernels.dispatch import cpu_has_fast_bf16

    fast_bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()
    return 1500 if precision != "fp32" and fast_bf16 else 500


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores all context."""
    counts = np.bincount(tokens.reshape(-1).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def write_report(out: Path, cfg: QuickstartConfig, tok_eval: dict, train_summary: dict, entropy: float,
                 probe: dict, timings: dict) -> Path:
    """One Markdown page with every figure and picture of the run."""
    probe_md = (out / "probe" / "probe.md").read_text()
    lines = [
        "# LVM quickstart report",
        "",
        f"Source: `{cfg.source}`; mode: {'fast smoke run' if cfg.fast else 'default'}; stage times (s): "
        + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
        "## 1. Visual tokenizer",
        "",
        f"Held-out PSNR **{tok_eval.get('psnr_db', float('nan')):.2f} dB**, codebook usage "
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
        "token states, `attentive` an attention-pooling head on the frozen token states, `finetune` the LVM "
        "trained with that head. Baselines: raw pixels and the same architecture at random init. Fractions "
        "below 100 % are means ± std over label subsets.",
        "",
        probe_md,
        "![label efficiency](probe/label_efficiency.png)",
        "",
    ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
