"""The training runtime every trainer shares: the tokenizer, the LVM, probe heads and fine-tuning.

A trainer is its setup, a step function and a short loop; everything a fix should reach in one
place lives here instead:

- device and precision: ``pick_device``, ``mixed_precision`` (bf16 autocast only where the hardware
  is fast at it), ``check_precision``;
- optimisation: ``param_groups`` (which parameters decay, per-group LR scales), ``warmup_cosine`` and
  ``set_lr``;
- data order: ``EpochSampler``, a pure function of the step, so resuming needs no replay;
- bookkeeping: ``MetricsLog`` (JSONL, trimmed on resume), ``Checkpointer`` (cadence, ``latest``,
  pruning, exact resume) and ``StepBudget`` (how many steps fit a wall-time budget, decided while the
  schedule does not yet depend on it).
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from tokenizer.atomic import atomic_path, point_symlink

PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A run configured in a way that cannot work; the message names the flag and the fix."""


class CheckpointError(ValueError):
    """No usable checkpoint at a path (missing folder or files); the message names the path and the fix."""
LATEST = "latest"  # in a run folder: symlink to the newest complete checkpoint
STATE_FILE = "trainer_state.json"


# ---- device and precision ------------------------------------------------------------------------

def device_name_ok(name: str) -> bool:
    """Whether ``pick_device`` knows ``name`` (auto, cpu, cuda, cuda:N): configs check it before any work starts."""
    return name in ("auto", "cpu") or name.startswith("cuda")


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the GPU of this process (its torchrun local rank) when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
        index = torch.device(name).index
        index = local_rank if index is None else index
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if not device_name_ok(name):
        raise ConfigError(f"--device {name!r} is not one of auto, cpu, cuda.")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has AMX tiles (bf16 matmuls in hardware); torch exposes the probe privately."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # pragma: no cover - a torch build without the probe
        return False


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from ``cpuinfo`` (else what ``platform`` knows, possibly ""): reports and
    benchmark tables name the machine their figures were measured on."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_is_fast(device: torch.device) -> bool:
    """CUDA GPUs and AMX CPUs multiply bf16 ~10x faster than fp32; elsewhere CPU bf16 is emulated."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def check_precision(precision: str, flag: str = "--precision") -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} {precision!r} is not one of {', '.join(PRECISIONS)}.")


def mixed_precision(device: torch.device, precision: str = "auto"):
    """The autocast context for ``precision``; ``auto`` uses bf16 where the hardware multiplies it fast.

    On CPUs with AMX tiles (Intel Sapphire Rapids and later) a bf16 matmul ran ~10x faster than
    fp32 (2.4 vs 0.23 TFLOP/s on 2 cores). Weights and optimizer state stay fp32 either way.
    """
    check_precision(precision, "precision")
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return nullcontext()
    if precision == "auto" and not bf16_is_fast(device):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- optimisation --------------------------------------------------------------------------------

def param_groups(
    model: nn.Module, weight_decay: float, lr: float, no_decay: Iterable[nn.Parameter] = (),
    lr_scale: dict[int, float] | None = None,
) -> list[dict]:
    """AdamW groups: decay only on matmul/conv weights (ndim >= 2) that are not in ``no_decay``.

    Decay is a prior that keeps projections small; on norm gains it pulls them towards 0 (not their
    neutral 1), and on embeddings or position tables it shrinks rarely used rows for being rare.
    ``lr_scale`` maps ``id(param)`` to an LR multiplier (e.g. a fine-tuned backbone at 0.1x). Each
    group remembers its ``base_lr`` so that ``set_lr`` can apply one schedule to all of them.
    """
    exempt = {id(p) for p in no_decay}
    scale = lr_scale or {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (scale.get(id(p), 1.0), p.ndim >= 2 and id(p) not in exempt)
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": lr * s, "base_lr": lr * s, "weight_decay": weight_decay if decay else 0.0}
            for (s, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0]))]


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at 0-based ``step``: (step + 1) / warmup, then a cosine from 1 to ``min_ratio``.

    During warmup the value does not depend on ``steps``, which is what lets ``StepBudget`` choose
    the run's length there without changing the schedule a fixed-length run would follow.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Every group's LR = its ``base_lr`` x ``multiplier``; returns the first group's LR (for logs)."""
    for g in optimizer.param_groups:
        if "base_lr" not in g:  # scaling the current lr would compound the schedule step after step
            raise ValueError("set_lr: optimizer groups need a 'base_lr'; build them with lvm.runtime.param_groups.")
        g["lr"] = g["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


# ---- data order ----------------------------------------------------------------------------------

class EpochSampler:
    """Index batch of any 0-based step: a fresh seeded permutation per epoch, the ragged tail dropped.

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"EpochSampler: {n} items with batch_size {batch_size}; both must be >= 1.")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = n // self.batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def at(self, step: int) -> torch.Tensor:
        """Indices ``[batch_size]`` for 0-based ``step``."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


# ---- bookkeeping ---------------------------------------------------------------------------------

class MetricsLog:
    """``metrics.jsonl``: one JSON record per line; on resume, records after the checkpoint are dropped
    so the curve has no duplicate steps. ``enabled=False`` (non-zero ranks) makes every call a no-op."""

    def __init__(self, path: str | Path, resume_step: int = 0, enabled: bool = True) -> None:
        self.path, self.enabled, self._file = Path(path), enabled, None
        if not enabled:
            return
        kept = []
        if resume_step > 0 and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w")
        self._file.writelines(ln + "\n" for ln in kept)
        self._file.flush()

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def last(self) -> dict:
        """The latest value of every metric (later records override earlier ones)."""
        merged: dict = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    merged.update(json.loads(line))
        return merged


class Checkpointer:
    """Checkpoints of one run folder: ``ckpt-000500/`` folders, ``latest`` naming the newest complete one.

    ``save`` lets the trainer write its files into a temporary folder, adds ``trainer_state.json``
    (step, torch RNG, anything else the trainer passes), renames the folder into place, swaps
    ``latest`` atomically and prunes to the ``keep`` newest. ``resume`` restores the RNG and returns
    the folder and state, so a resumed run continues exactly where it stopped.
    """

    def __init__(self, out: str | Path, every: int, keep: int = 2, enabled: bool = True) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint cadence {every} and keep {keep} must both be >= 1.")
        self.out, self.every, self.keep, self.enabled = Path(out), every, keep, enabled

    @property
    def latest(self) -> Path | None:
        link = self.out / LATEST
        return link if link.exists() else None

    def due(self, done: int, last: int) -> bool:
        return done % self.every == 0 or done == last

    def save(self, step: int, write: Callable[[Path], None], state: dict | None = None) -> Path | None:
        """Write checkpoint ``step``: ``write(folder)`` puts the trainer's files in a temporary folder."""
        if not self.enabled:
            return None
        final = self.out / f"ckpt-{step:06d}"
        with atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            write(tmp)
            full = {"step": step, "torch_rng": torch.get_rng_state().tolist(), **(state or {})}
            (tmp / STATE_FILE).write_text(json.dumps(full))
        point_symlink(self.out / LATEST, final.name)  # `latest` always names a complete checkpoint
        kept = sorted(p for p in self.out.glob("ckpt-*") if p.is_dir())
        for old in kept[: max(len(kept) - self.keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self, required: Iterable[str] = ()) -> tuple[Path, dict] | None:
        """``(folder, trainer state)`` of ``latest`` with the torch RNG restored; None for a fresh run."""
        folder = self.latest
        if folder is None:
            return None
        for name in (STATE_FILE, *required):
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"{folder / name} not found; the checkpoint is incomplete. Point the output folder "
                    "elsewhere or start over without resuming (CLI: --no-resume)."
                )
        state = json.loads((folder / STATE_FILE).read_text())
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        return folder, state


class StepBudget:
    """How many optimizer steps fit in ``seconds`` of wall time, decided during the LR warmup.

    The step time is measured over this process's steps after the first ``skip`` (those pay for
    compilation and cold caches); the time already spent, setup included, counts against the
    budget. The decision falls at most one step after the warmup, where ``warmup_cosine`` does not
    yet depend on the run's length, so the schedule is that of a run told the chosen number of
    steps from the start: re-running with ``steps = budget.steps`` reproduces the model. A warmup
    too short to measure in (< skip + 1 steps) leaves the length at ``max_steps``, with the
    ``out_of_time`` stop only. ``margin`` keeps room for evals and checkpoints.

    ``revise_until`` > 0: the plan is checked again every ``revise_every`` steps, from the rate of the
    later half of the steps timed so far, while the run is in its first ``revise_until`` fraction, and changed when
    it is off by more than ``revise_tolerance``. A rate taken in the first few dozen steps can be
    far from the run's (a shared machine's speed drifts; caches and allocators settle): a session-12
    run planned 1,169 steps at step 20 and left 20 % of its share unused. A revision bends the LR
    schedule to the new length from that step on (``warmup_cosine`` is then that of the final length
    for the rest of the run, a small step in the multiplier early on), so exact reproduction by
    ``steps = budget.steps`` holds only for runs whose first plan stood; ``revisions`` lists the
    (step, steps) of each change.
    """

    def __init__(self, seconds: float, max_steps: int, warmup: int, skip: int = 2, margin: float = 0.08,
                 planned: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 decide_by: int = 20, revise_until: float = 0.0, revise_every: int = 50,
                 revise_tolerance: float = 0.03) -> None:
        self.seconds, self.max_steps, self.skip, self.margin, self.clock = seconds, max_steps, skip, margin, clock
        self.revise_until, self.revise_every, self.revise_tolerance = revise_until, revise_every, revise_tolerance
        self.revisions: list[tuple[int, int]] = []
        self._next_check: int | None = None
        self.decide_at = max(skip + 2, min(warmup, decide_by))
        can_plan = seconds > 0 and self.decide_at <= warmup + 1
        self.t0 = clock()
        self.steps = planned if planned is not None else max_steps  # until decided: the upper bound
        self.decided = planned is not None or not can_plan
        self.fitted = planned is not None  # the length was chosen for the budget (now or before a resume)
        # (steps done, clock) after this process's first ``skip`` steps, then at the decision and each check
        self._marks: list[tuple[int, float]] = []
        self._seen = 0

    def observe(self, done: int, spent_before: float = 0.0) -> bool:
        """Call after each step with the steps done so far; returns True when it just decided or checked.

        The clock starts after this process's first ``skip`` steps (a resumed run compiles again).
        A check falls at a step every rank reaches with the same (rank 0's) plan, so they agree on it.
        """
        if self.decided:
            if self._next_check is None or done < self._next_check:
                return False
            if done > self.revise_until * self.steps:  # past the revisable part of the run: the plan stands
                self._next_check = None
                return False
            planned = self._fit(done, spent_before)
            if abs(planned - self.steps) > self.revise_tolerance * self.steps:
                self.steps = planned
                self.revisions.append((done, planned))
            return True  # a check, changed or not: every rank takes rank 0's count here
        self._seen += 1
        if self._seen == self.skip:
            self._marks = [(done, self.clock())]
        if not self._marks or done < self.decide_at or done - self._marks[0][0] < 2:
            return False
        self.steps = self._fit(done, spent_before)
        self.decided = self.fitted = True
        return True

    def _fit(self, done: int, spent_before: float) -> int:
        """The step count that fits the time left at the measured rate. At the first decision the rate is that
        since the first mark; at a check, that of the later half of the steps since then (the marks): recent
        enough to leave a slow start behind, long enough that one eval or checkpoint does not swing it (a
        50-step window moved a 30-minute quickstart's plan between 1,132 and 2,400 steps)."""
        now = self.clock()
        self._marks.append((done, now))
        middle = self._marks[0][0] + (done - self._marks[0][0]) / 2
        start = [m for m in self._marks[:-1] if m[0] <= middle][-1]  # the first mark always qualifies
        per_step = (now - start[1]) / max(done - start[0], 1)
        left = self.seconds * (1 - self.margin) - (now - self.t0) - spent_before
        if self.revise_until > 0:
            self._next_check = done + self.revise_every
        return int(min(self.max_steps, max(done, done + left // max(per_step, 1e-9))))

    def out_of_time(self, spent_before: float = 0.0) -> bool:
        """A safety stop: past the whole budget (the plan was too optimistic, e.g. the machine got busy)."""
        return self.seconds > 0 and (self.clock() - self.t0 + spent_before) > self.seconds
