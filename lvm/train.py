"""Training: the loop, checkpoints with exact resume, and torchrun/DDP, in one readable file.

The same entry point runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP; the
global batch is split across ranks, rank 0 logs and checkpoints). Batches are a pure function of
the step (``lvm.data.PackedBatches``), so a checkpoint needs only the step, weights, optimizer
state and RNG to resume exactly where it stopped.

Checkpoint layout (``out/``)::

    ckpt-000500/   model.safetensors  config.json  optimizer.pt  trainer_state.json  data.json
    latest ->      symlink to the newest complete checkpoint (swapped atomically)
    metrics.jsonl  train_config.json
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kernels.dispatch import PRECISIONS, mixed_precision
from lvm.config import LVMConfig
from lvm.data import DataError, PackedBatches, VisualSentences, eval_batches
from lvm.model import LVM

LATEST = "latest"
DATA_FILE = "data.json"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class TrainConfig:
    """``lvm train``: next-token pretraining of the LVM on token shards."""

    data: str = "runs/tokens/train"  # token shard folder written by 'lvm tokenize'
    views: list[str] = field(default_factory=list)  # aligned shard folders (transforms) for pairs/chain
    kind: str = "single"  # sentence kind: single, pairs, chain, frames
    frames: int = 2  # images per sentence for kind=frames
    eval_data: str = ""  # held-out shard folder; empty -> hold out eval_fraction of data
    eval_fraction: float = 0.02
    out: str = "runs/lvm"  # checkpoints, metrics.jsonl, train_config.json
    preset: str = "small"  # model size: tiny, small, base, 300m, 1b
    context_len: int = 0  # tokens per training row; 0 -> the preset's max_seq_len
    dropout: float = 0.0
    steps: int = 2000  # optimizer steps
    batch_size: int = 16  # rows per optimizer step (global, over all processes and micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    compile: bool = False  # torch.compile the model
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with AMX, else fp32), bf16, fp32
    sentence_attention: bool = True  # each packed sentence attends only to itself; False: to the whole row
    fsdp: bool = False  # under torchrun: shard weights, grads and optimizer state (FSDP2) instead of DDP
    kernels: str = "auto"  # auto, torch, triton (sets LVM_KERNELS for this process)
    threads: int = 0  # torch CPU threads; 0 -> leave torch's default
    log_every: int = 10
    eval_every: int = 200
    eval_rows: int = 64  # held-out rows per eval (the same rows every time)
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall time; 0 = no limit
    resume: bool = True  # continue from out/latest when it exists
    progress: bool = True


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) and return a summary: final/eval loss, tokens/s, checkpoint path."""
    dist_ctx = _init_distributed()
    rank, world, device = dist_ctx["rank"], dist_ctx["world"], _pick_device(cfg.device, dist_ctx)
    is_main = rank == 0
    if cfg.kernels != "auto":
        os.environ["LVM_KERNELS"] = cfg.kernels
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_config(cfg, world)
    out = Path(cfg.out)

    # ---- data ------------------------------------------------------------------------------
    sentences = VisualSentences(cfg.data, cfg.views, cfg.kind, cfg.frames, seed=cfg.seed)
    if cfg.eval_data:
        train_set, eval_set = sentences, VisualSentences(cfg.eval_data, [], "single")
        if eval_set.tokenizer_fingerprint != train_set.tokenizer_fingerprint:
            raise DataError(f"{cfg.eval_data}: made by another tokenizer than {cfg.data}; tokenize both with the same one.")
    else:
        train_set, eval_set = sentences.split(cfg.eval_fraction, seed=cfg.seed)
    data_info = {
        "tokenizer_fingerprint": train_set.tokenizer_fingerprint,
        "tokenizer_path": train_set.main.meta.get("tokenizer_path"),
        "grid": train_set.main.meta["grid"],
        "codebook_size": train_set.special.codebook_size,
        "kind": cfg.kind,
        "sentence_length": train_set.length,
    }

    # ---- model, optimizer, resume ----------------------------------------------------------
    torch.manual_seed(cfg.seed)
    start_step, optim_state = 0, None
    resume_dir = out / LATEST
    if cfg.resume and resume_dir.exists():
        model, optim_state, start_step = _load_checkpoint(resume_dir, cfg, data_info, device)
    else:
        overrides = {"dropout": cfg.dropout}
        if cfg.context_len:
            overrides["max_seq_len"] = cfg.context_len
        config = LVMConfig.preset(cfg.preset, vocab_size=train_set.special.vocab_size, **overrides)
        model = LVM(config).to(device)
    sharded = world > 1 and cfg.fsdp
    if sharded:  # FSDP2: each block is one all-gather unit; the root holds embeddings, norm and head
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
    if optim_state is not None:
        _load_optimizer_state(model, optimizer, optim_state)
    context_len = model.config.max_seq_len
    packer = PackedBatches(train_set, context_len, cfg.batch_size, cfg.seed, rank, world)
    micro_rows = cfg.batch_size // world // cfg.grad_accum

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        _truncate_metrics(out / "metrics.jsonl", start_step)
    step_model = model
    if world > 1 and not sharded:
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)
    autocast = mixed_precision(device, cfg.precision)
    segment_len = train_set.length if cfg.sentence_attention else None

    # ---- loop ------------------------------------------------------------------------------
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not (is_main and cfg.progress))
    t_start, last_log_t, last_log_step = time.time(), time.time(), start_step
    loss_value, eval_loss, step = float("nan"), None, start_step
    metrics_file = open(out / "metrics.jsonl", "a") if is_main else None
    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = packer.batch(step)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            total = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                sl = slice(micro * micro_rows, (micro + 1) * micro_rows)
                sync = micro == cfg.grad_accum - 1 or world == 1
                ctx = step_model.no_sync() if (world > 1 and not sync) else nullcontext()
                with ctx, autocast:
                    loss = step_model(inputs[sl], targets[sl], segment_len=segment_len).loss / cfg.grad_accum
                loss.backward()
                total += loss.detach()
            if world > 1:
                dist.all_reduce(total, op=dist.ReduceOp.AVG)
            loss_value = float(total)
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; the last good checkpoint in {out / LATEST} is kept. "
                    "Lower --lr, raise --warmup-steps or keep --grad-clip on, then resume."
                )
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if cfg.grad_clip > 0
                else _grad_norm(model)
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            record = None
            if is_main and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.time()
                tok_s = (done - last_log_step) * packer.tokens_per_step / max(now - last_log_t, 1e-9)
                last_log_t, last_log_step = now, done
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor under FSDP
                record = {"step": done, "loss": round(loss_value, 5), "lr": lr, "grad_norm": round(float(gn), 4),
                          "tokens_per_s": round(tok_s, 1), "epoch": round(packer.epoch_of(done), 4)}
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                eval_loss = evaluate(model, eval_set, context_len, micro_rows, cfg.eval_rows, device, autocast,
                                     cfg.sentence_attention)
                if is_main:
                    record = {**(record or {"step": done}), "eval_loss": round(eval_loss, 5)}
            if record is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.update(1)
            out_of_time = bool(cfg.max_minutes) and (time.time() - t_start) > cfg.max_minutes * 60
            if world > 1 and cfg.max_minutes:  # every rank must stop at the same step: rank 0's clock decides
                flag = torch.tensor([float(out_of_time)], device=device)
                dist.broadcast(flag, src=0)
                out_of_time = bool(flag.item())
            if done % cfg.ckpt_every == 0 or done == cfg.steps or out_of_time:
                states = _full_states(model, optimizer, sharded)  # a collective call under FSDP: all ranks
                if is_main:
                    save_checkpoint(out, model, optimizer, done, cfg, data_info, *states)
                if out_of_time:
                    break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    elapsed = time.time() - t_start
    finished = step + 1 if cfg.steps > start_step else start_step
    summary = {
        "out": str(out),
        "checkpoint": str((out / LATEST).resolve()) if (out / LATEST).exists() else None,
        "steps": finished,
        "loss": loss_value,
        "eval_loss": eval_loss,
        "tokens_per_s": (finished - start_step) * packer.tokens_per_step / max(elapsed, 1e-9),
        "params_non_embedding": model.num_params(),
    }
    if finished == start_step:  # a finished run started again: report what it logged last
        last = _last_logged(out / "metrics.jsonl")
        summary.update({k: last[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in last})
    return summary


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at 0-based ``step``: (step + 1) / warmup, then a cosine from 1 to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: LVM, sentences: VisualSentences, context_len: int, batch_rows: int, max_rows: int,
             device: torch.device, autocast=nullcontext(), sentence_attention: bool = True) -> float:
    """Mean next-token loss over a fixed set of held-out rows (attention masked as in training)."""
    segment_len = sentences.length if sentence_attention else None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in eval_batches(sentences, context_len, max(batch_rows, 1), max_rows):
        with autocast:
            loss = model(inputs.to(device), targets.to(device), segment_len=segment_len).loss
        total += float(loss) * targets.numel()
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


def save_checkpoint(out: Path, model: LVM, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    data_info: dict, model_state: dict | None = None, optim_state: dict | None = None) -> Path:
    """Write a complete checkpoint folder, then atomically point ``latest`` at it.

    ``model_state``/``optim_state``: full (unsharded) state dicts when the model is FSDP-sharded.
    """
    final = out / f"ckpt-{step:06d}"
    tmp = out / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=model_state)
    torch.save(optim_state if optim_state is not None else optimizer.state_dict(), tmp / OPTIM_FILE)
    state = {"step": step, "torch_rng": torch.get_rng_state().tolist(), "train_config": asdict(cfg)}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    (tmp / DATA_FILE).write_text(json.dumps(data_info, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link_tmp = out / f".{LATEST}.tmp"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, out / LATEST)  # atomic: `latest` always names a complete checkpoint
    kept = sorted(p for p in out.glob("ckpt-*") if p.is_dir())
    for old in kept[: max(len(kept) - cfg.keep_checkpoints, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, cfg: TrainConfig, data_info: dict, device: torch.device):
    for name in (STATE_FILE, OPTIM_FILE, DATA_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found; the checkpoint is incomplete. Point --out elsewhere or pass --no-resume."
            )
    saved = json.loads((path / DATA_FILE).read_text())
    if saved["tokenizer_fingerprint"] != data_info["tokenizer_fingerprint"]:
        raise DataError(
            f"{cfg.data} was tokenized by tokenizer {data_info['tokenizer_fingerprint']} but the checkpoint "
            f"{path.resolve()} was trained on tokenizer {saved['tokenizer_fingerprint']}; re-tokenize with the "
            "checkpoint's tokenizer, or train into a fresh --out."
        )
    model = LVM.from_pretrained(path, map_location=device)
    optim_state = torch.load(path / OPTIM_FILE, map_location=device, weights_only=True)
    state = json.loads((path / STATE_FILE).read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return model, optim_state, int(state["step"])


def _full_states(model: LVM, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """Unsharded model state (FSDP only; else None) and optimizer state keyed by parameter name.

    Keying the optimizer state by name (not by position) makes a checkpoint resumable by a
    single process, DDP or FSDP alike.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    model_state = get_model_state_dict(model, options=opts) if sharded else None
    return model_state, get_optimizer_state_dict(model, optimizer, options=opts)


def _load_optimizer_state(model: LVM, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _last_logged(path: Path) -> dict:
    """The latest value of every metric in a metrics.jsonl (later records override earlier ones)."""
    merged: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                merged.update(json.loads(line))
    return merged


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint, so the curve has no duplicate steps."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _check_config(cfg: TrainConfig, world: int) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("--steps, --batch-size and --grad-accum must all be >= 1.")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be divisible by processes x grad_accum = {world} x {cfg.grad_accum}."
        )
    for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}.")


def _init_distributed() -> dict:
    """Join the torchrun process group when launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return {"rank": 0, "world": 1, "local_rank": 0}
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": int(os.environ.get("LOCAL_RANK", 0))}


def _pick_device(name: str, ctx: dict) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
        torch.cuda.set_device(ctx["local_rank"])
        return torch.device("cuda", ctx["local_rank"])
    return torch.device(name)
