"""LVM pretraining: setup, one step function and a short loop on the shared runtime (``lvm.runtime``).

The same entry point runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP, or FSDP2
with ``--fsdp``; the global batch is split across ranks, rank 0 logs and checkpoints). Batches are
a pure function of the step (``lvm.data.PackedBatches``), so a checkpoint needs only the step,
weights, optimizer state and RNG to resume exactly where it stopped. ``--time-budget`` fits the
run's length to a wall time (``lvm.runtime.StepBudget``).

Checkpoint layout (``out/``)::

    ckpt-000500/   model.safetensors  config.json  optimizer.pt  trainer_state.json  data.json
    latest ->      symlink to the newest complete checkpoint (swapped atomically)
    metrics.jsonl  train_config.json
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kernels.dispatch import BACKENDS
from lvm.checkpoint import DATA_FILE, require_same_tokenizer
from lvm.config import LVMConfig
from lvm.data import DataError, PackedBatches, VisualSentences, eval_batches
from lvm.model import LVM, prefix_targets
from lvm.runtime import (
    LATEST, Checkpointer, ConfigError, MetricsLog, StepBudget, check_precision, mixed_precision, pick_device, set_lr,
    warmup_cosine,
)
from tokenizer.atomic import write_json_atomic

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
    n_layer: int = 0  # 0 -> the preset's; set to try other shapes (e.g. wider and shallower) at equal cost
    n_head: int = 0  # 0 -> the preset's
    d_model: int = 0  # 0 -> the preset's
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
    prefix_lm: bool = False  # AIM's prefix LM: a random leading part of each sentence attends both ways, without loss
    fsdp: bool = False  # under torchrun: shard weights, grads and optimizer state (FSDP2) instead of DDP
    kernels: str = "auto"  # auto, torch, triton (sets LVM_KERNELS for this process)
    threads: int = 0  # torch CPU threads; 0 -> leave torch's default
    log_every: int = 10
    eval_every: int = 200
    eval_rows: int = 64  # held-out rows per eval (the same rows every time)
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    time_budget: float = 0.0  # minutes; > 0: the step count (<= steps) that fits, decided at the end of warmup
                              # from the measured speed; an overrun still stops at a clean checkpoint
    budget_revise_until: float = 0.5  # --time-budget: re-plan every 50 steps through this share of the run; 0: once
    resume: bool = True  # continue from out/latest when it exists
    progress: bool = True


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) and return a summary: final/eval loss, tokens/s, steps run, checkpoint path."""
    run = _setup(cfg)
    budget, ckpt = run.budget, run.checkpointer
    bar = tqdm(total=budget.steps, initial=run.start, desc="train", unit="step",
               disable=not (run.is_main and cfg.progress))
    t_start, loss, eval_loss, done, stopped_early = time.time(), float("nan"), None, run.start, False
    log_t, log_step = t_start, run.start
    try:
        while done < budget.steps:
            loss, grad_norm = _train_step(run, done)
            done += 1
            planned, deciding = budget.steps, not budget.decided
            if budget.observe(done, run.spent_before):  # every rank decides at the same step; rank 0's count wins
                budget.steps = int(_from_rank0(budget.steps, run))
                bar.total = budget.steps
                if run.is_main and (deciding or budget.steps != planned):  # the plan, then only its changes
                    what = "fit" if deciding else "now fit"
                    print(f"\ntrain: {budget.steps} steps {what} the {cfg.time_budget:g}-minute budget", flush=True)
            record = {"step": done}
            if done % cfg.log_every == 0 or done == budget.steps:
                now = time.time()
                tok_s = (done - log_step) * run.packer.tokens_per_step / max(now - log_t, 1e-9)
                log_t, log_step = now, done
                record.update(loss=round(loss, 5), lr=run.optimizer.param_groups[0]["lr"],
                              grad_norm=round(grad_norm, 4), tokens_per_s=round(tok_s, 1),
                              epoch=round(run.packer.epoch_of(done), 4))
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            out_of_time = budget.seconds > 0 and bool(_from_rank0(budget.out_of_time(run.spent_before), run))
            if done % cfg.eval_every == 0 or done == budget.steps or out_of_time:
                eval_loss = evaluate(run.model, run.eval_set, run.context_len, run.micro_rows, cfg.eval_rows,
                                     run.device, run.autocast, cfg.sentence_attention)
                record["eval_loss"] = round(eval_loss, 5)
            if len(record) > 1:
                run.log.write(record)
            bar.update(1)
            if ckpt.due(done, budget.steps) or out_of_time:
                _save(run, done, spent=run.spent_before + time.time() - t_start)
            if out_of_time and done < budget.steps:
                stopped_early = True
                break
    finally:
        bar.close()
        run.log.close()
        if run.world > 1:
            dist.barrier()
            dist.destroy_process_group()
    return _summary(run, done, loss, eval_loss, time.time() - t_start, stopped_early)


@dataclass
class _Run:
    """Everything the step function and the loop share, built once by ``_setup``."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: LVM  # the unwrapped model (sharded in place under FSDP)
    step_model: torch.nn.Module  # what the forward runs through: DDP and/or torch.compile wrappers
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    packer: PackedBatches
    eval_set: VisualSentences
    data_info: dict
    checkpointer: Checkpointer
    log: MetricsLog
    budget: StepBudget
    autocast: object
    start: int
    spent_before: float  # seconds of training before this process (from the checkpoint), for the budget

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.cfg.fsdp

    @property
    def context_len(self) -> int:
        return self.model.config.max_seq_len

    @property
    def micro_rows(self) -> int:
        return self.cfg.batch_size // self.world // self.cfg.grad_accum

    @property
    def segment_len(self) -> int | None:
        return self.packer.sentences.length if self.cfg.sentence_attention else None


def _setup(cfg: TrainConfig) -> _Run:
    """Process group, device, data, model (fresh or resumed), wrappers, optimizer, bookkeeping."""
    rank, world, local_rank = _init_distributed()
    device = pick_device(cfg.device, local_rank)
    if cfg.kernels != "auto":
        os.environ["LVM_KERNELS"] = cfg.kernels
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_config(cfg, world)
    out = Path(cfg.out)
    train_set, eval_set = _datasets(cfg)
    data_info = {
        "tokenizer_fingerprint": train_set.tokenizer_fingerprint,
        "tokenizer_path": train_set.main.meta.get("tokenizer_path"),
        "grid": train_set.main.meta["grid"],
        "codebook_size": train_set.special.codebook_size,
        "kind": cfg.kind,
        "sentence_length": train_set.length,
    }
    torch.manual_seed(cfg.seed)
    checkpointer = Checkpointer(out, cfg.ckpt_every, cfg.keep_checkpoints, enabled=rank == 0)
    resumed = checkpointer.resume(required=(OPTIM_FILE, DATA_FILE, "model.safetensors")) if cfg.resume else None
    if resumed:
        folder, state = resumed
        saved = json.loads((folder / DATA_FILE).read_text())
        require_same_tokenizer(saved["tokenizer_fingerprint"], data_info["tokenizer_fingerprint"],
                               what=f"token shards {cfg.data} and checkpoint {folder.resolve()}",
                               fix="re-tokenize with the checkpoint's tokenizer, or train into a fresh --out",
                               error=DataError)
        model = LVM.from_pretrained(folder, map_location=device)
        start, spent, planned = int(state["step"]), float(state.get("elapsed_s", 0.0)), state.get("planned_steps")
    else:
        overrides = {"dropout": cfg.dropout, **({"max_seq_len": cfg.context_len} if cfg.context_len else {}),
                     **{k: v for k in ("n_layer", "n_head", "d_model") if (v := getattr(cfg, k))}}
        model = LVM(LVMConfig.preset(cfg.preset, vocab_size=train_set.special.vocab_size, prefix_lm=cfg.prefix_lm,
                                     **overrides)).to(device)
        start, spent, planned = 0, 0.0, None
    if model.config.prefix_lm and not cfg.sentence_attention:  # e.g. resuming a prefix LM with the flag dropped
        raise ConfigError(f"{out} holds a prefix LM, which draws one prefix per packed sentence; it needs "
                          "--sentence-attention.")
    if world > 1 and cfg.fsdp:  # FSDP2: each block is one all-gather unit; the root holds embeddings, norm, head
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
    if resumed:
        _load_optimizer_state(model, optimizer, torch.load(folder / OPTIM_FILE, map_location=device, weights_only=True))
    ddp = None
    if world > 1 and not cfg.fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = ddp or model
    if cfg.compile:
        step_model = torch.compile(step_model)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "train_config.json", asdict(cfg))
    budget = StepBudget(cfg.time_budget * 60, cfg.steps, cfg.warmup_steps, planned=planned,
                        revise_until=cfg.budget_revise_until)
    return _Run(cfg, rank, world, device, model, step_model, ddp, optimizer,
                PackedBatches(train_set, model.config.max_seq_len, cfg.batch_size, cfg.seed, rank, world), eval_set,
                data_info, checkpointer, MetricsLog(out / "metrics.jsonl", start, enabled=rank == 0), budget,
                mixed_precision(device, cfg.precision), start, spent)


def _train_step(run: _Run, step: int) -> tuple[float, float]:
    """One optimizer step (all micro-steps, gradients synchronised once); returns (loss, grad norm)."""
    cfg = run.cfg
    set_lr(run.optimizer, warmup_cosine(step, run.budget.steps, cfg.warmup_steps, cfg.min_lr_ratio))
    inputs, targets = (t.to(run.device, non_blocking=True) for t in run.packer.batch(step))
    prefix = None
    if run.model.config.prefix_lm:  # one prefix per sentence, drawn per step (seeded: a resumed run draws the same)
        length, per_row = run.segment_len, run.packer.per_row
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * run.world + run.rank)
        prefix = torch.randint(1, length - 1, (inputs.shape[0], per_row), generator=gen).to(run.device)  # [b, S]
        targets = prefix_targets(targets, length, prefix)
    total = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        rows = slice(micro * run.micro_rows, (micro + 1) * run.micro_rows)
        with _gradient_sync(run, micro == cfg.grad_accum - 1), run.autocast:
            extra = {"prefix_len": prefix[rows]} if prefix is not None else {}
            loss = run.step_model(inputs[rows], targets[rows], segment_len=run.segment_len, **extra).loss / cfg.grad_accum
        loss.backward()
        total += loss.detach()
    if run.world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    loss_value = float(total)
    if not math.isfinite(loss_value):
        raise TrainingDiverged(
            f"loss became {loss_value} at step {step}; the last good checkpoint in {Path(cfg.out) / LATEST} is kept. "
            "Lower --lr, raise --warmup-steps or keep --grad-clip on, then resume."
        )
    params = run.model.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor under FSDP
    return loss_value, float(grad_norm)


def _gradient_sync(run: _Run, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step: DDP's ``no_sync`` context, or
    FSDP2's ``set_requires_gradient_sync`` switch (FSDP2 modules have no ``no_sync``)."""
    if run.ddp is not None:
        return nullcontext() if sync else run.ddp.no_sync()
    if run.sharded:
        run.model.set_requires_gradient_sync(sync)
    return nullcontext()


def _from_rank0(value: float, run: _Run) -> float:
    """Rank 0's ``value`` on every rank: stopping and the run's length must not depend on each rank's clock."""
    if run.world > 1:
        t = torch.tensor([float(value)], device=run.device)
        dist.broadcast(t, src=0)
        return t.item()
    return value


def _save(run: _Run, step: int, spent: float) -> None:
    """A checkpoint of ``step`` (a collective under FSDP: every rank gathers, rank 0 writes)."""
    model_state, optim_state = _full_states(run.model, run.optimizer, run.sharded)

    def write(folder: Path) -> None:
        run.model.save_pretrained(folder, state_dict=model_state)
        torch.save(optim_state, folder / OPTIM_FILE)
        (folder / DATA_FILE).write_text(json.dumps(run.data_info, indent=2))

    run.checkpointer.save(step, write, {"train_config": asdict(run.cfg), "elapsed_s": round(spent, 2),
                                        "planned_steps": run.budget.steps if run.budget.fitted else None})


def _summary(run: _Run, done: int, loss: float, eval_loss: float | None, elapsed: float, stopped_early: bool) -> dict:
    trained = done - run.start
    summary = {
        "out": run.cfg.out,
        "checkpoint": str(run.checkpointer.latest.resolve()) if run.checkpointer.latest else None,
        "steps": done,
        "planned_steps": run.budget.steps,
        "plan_revisions": [list(r) for r in run.budget.revisions],  # (step, steps) where the time plan changed
        "stopped_early": stopped_early,
        "loss": loss,
        "eval_loss": eval_loss,
        "tokens_per_s": trained * run.packer.tokens_per_step / max(elapsed, 1e-9),
        "seconds": round(run.spent_before + elapsed, 1),
        "params_non_embedding": run.model.num_params(),
    }
    if trained == 0:  # a finished run started again: report what it logged last
        last = run.log.last()
        summary.update({k: last[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in last})
    return summary


def _datasets(cfg: TrainConfig) -> tuple[VisualSentences, VisualSentences]:
    """Training sentences and the held-out ones (a separate shard folder, or a seeded split)."""
    sentences = VisualSentences(cfg.data, cfg.views, cfg.kind, cfg.frames, seed=cfg.seed)
    if not cfg.eval_data:
        return sentences.split(cfg.eval_fraction, seed=cfg.seed)
    eval_set = VisualSentences(cfg.eval_data, [], "single")
    require_same_tokenizer(sentences.tokenizer_fingerprint, eval_set.tokenizer_fingerprint,
                           what=f"--eval-data {cfg.eval_data} against --data {cfg.data}",
                           fix="tokenize both with the same tokenizer.", error=DataError)
    return sentences, eval_set


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


def _check_config(cfg: TrainConfig, world: int) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("--steps, --batch-size and --grad-accum must all be >= 1.")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be divisible by processes x grad_accum = {world} x {cfg.grad_accum}."
        )
    for name in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1.")
    if cfg.time_budget < 0:
        raise ConfigError(f"--time-budget {cfg.time_budget} must be >= 0 minutes (0 = no budget).")
    if not 0 <= cfg.budget_revise_until <= 1:
        raise ConfigError(f"--budget-revise-until {cfg.budget_revise_until} must be in [0, 1] (0 = plan once).")
    if cfg.kernels not in BACKENDS:
        raise ConfigError(f"--kernels {cfg.kernels!r} is not one of {', '.join(BACKENDS)}.")
    if cfg.prefix_lm and not cfg.sentence_attention:
        raise ConfigError("--prefix-lm draws one prefix per packed sentence; it needs --sentence-attention.")
    check_precision(cfg.precision)


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank): joins the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
