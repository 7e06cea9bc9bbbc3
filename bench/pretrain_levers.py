"""Pretraining levers for the features (issue #14, item 3), each probed at 10 % of the labels.

    python -m bench.pretrain_levers --out /tmp/levers --levers baseline grid14 wide_shallow
    python -m bench.pretrain_levers --out /tmp/levers --report        # table from the finished runs

Every lever is the default quickstart recipe (tokenizer, tokenize, LVM pretraining on Fashion-MNIST
train) with one thing changed, at the *compute* of the default 30-minute run on a 2-core fp32 CPU
(tokenizer 176 steps of 128 images, LVM 106 steps of 16 x 510 tokens, as measured in session 5; the
quickstart has trained on 8 rows a step since ``batch8`` won): a lever that costs more per
step gets fewer steps, so every row answers "is this a better use of the same CPU time". Step counts
are fixed rather than timed, so runs may share the machine without changing what they train.

The probe is ``lvm probe``'s linear probe (layer chosen by its sweep on training images, L2 on a
validation split of the labels) on 6,000 training images (10 % of the labels, an even subsample) and
scored on the 10,000 Fashion-MNIST test images, which no stage trains or chooses on. The ``ood_*``
levers pretrain tokenizer and LVM on scikit-image crops instead and are probed on Fashion-MNIST alike
(the out-of-domain LVM of item 4). Each row lists the exact commands that made it; results go to
bench/results/pretrain-levers-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = "runs/pretrain-levers"  # the report's commands name this folder

TOKENIZER_STEPS = 176  # the default quickstart's counts on a 2-core AMD EPYC without AMX (30-minute budget)
LVM_STEPS = 106
TOKENIZER_STEP_S = 0.46  # its measured seconds per step (median), to trade tokenizer steps for LVM steps
LVM_STEP_S = 3.34  # 353.9 s / 106 steps in that run

# every label fraction, 3 subsets each, with and without the raw pixels (the claim table's protocol)
FULL_PROTOCOL = ["--fractions", "0.01", "0.1", "0.3", "1.0", "--seeds", "3", "--pixels", "both"]
# the domain-side levers of target 4: the fractions it compares, 3 subsets each, the states alone
TARGET4_PROTOCOL = ["--fractions", "0.1", "0.3", "1.0", "--seeds", "3"]
# a ~4k-code head's LVM step against the 1,000-code one's (measured side by side, 1 thread, 16 x 510 tokens:
# 7.49 vs 6.52 s): vocabulary levers pay for it with LVM steps
HEAD_4K_STEP_COST = 1.15
AMX_DEFAULT13_STEPS = 1923  # LVM steps of 8 rows the AMX 30-minute default bought in session 13
# target 4's two columns, per member of a steps-curve pair: the domain at 30 % (3 subsets) and 100 %, its twin at 100 %
TARGET4_PAIR_FRACTIONS = (("", ["--fractions", "0.3", "1.0", "--seeds", "3"]),
                          ("ood_", ["--fractions", "1.0", "--seeds", "1"]))

def amx_default_pair(name: str, lvm_steps: int, what: str) -> dict[str, dict]:
    """An AMX 30-minute default (14x14, the tokenizer's 1,000-step cap, ``lvm_steps`` of 8 rows, probed at layer 5,
    its quickstart's sweep's pick; linked in from its run folder) and its out-of-domain twin ``ood_<name>``: the
    same recipe and step counts on scikit-image crops, its own layer sweep, with the baselines. Both are probed on
    every label fraction with and without the pixels, like the claim table's rows."""
    recipe = {"tok": ["--grid", "14"], "tokenizer_steps": 1000, "lvm_steps": lvm_steps,
              "train": ["--batch-size", "8", "--compile"], "probe_protocol": FULL_PROTOCOL}
    return {name: {**recipe, "probe": ["--layers", "5"],
                   "why": f"{what}; probed at layer 5, its quickstart's sweep's pick"},
            f"ood_{name}": {**recipe, "data": "skimage-crops", "probe": ["--baselines", "--supervised"],
                            "why": f"{name}'s recipe and step counts on scikit-image crops (28 px grey): out of "
                                   "domain; its own layer sweep; with the raw-pixel and supervised-CNN baselines"}}


# name -> what changes. tok / train: extra CLI flags; *_steps: step counts; pairs: a transform whose tokens
# sit beside each image in one sentence; data: the pretraining source; base: the lever whose tokenizer and
# shards an LVM-only lever trains on (default: the baseline's).
LEVERS: dict[str, dict] = {
    "baseline": {"why": "the default quickstart recipe of session 5: 7x7 FSQ tokens, small (6 x 256), 16 rows a step, "
                        "single images"},
    "grid14": {"tok": ["--grid", "14"], "lvm_steps": 120, "probe": ["--layers", "6"],
               "why": "14x14 tokens per image (rows of 2 sentences = 396 tokens: 120 steps cost the baseline's 106; "
                      "1/5 of the images per step); probed at layer 6 (the baseline's pick) without the sweep, "
                      "which costs 4x at this grid"},
    "wide_shallow": {"train": ["--n-layer", "3", "--d-model", "384", "--n-head", "6"], "lvm_steps": 95,
                     "why": "3 x 384 instead of 6 x 256 (1.12x the FLOPs per token, so 95 steps)"},
    "pairs_hflip": {"pairs": "hflip", "why": "sentences [image, its mirror image] (the image's view as the "
                                             "next sentence part; half the distinct images per step)"},
    "tokenizer_x3": {"tokenizer_steps": 3 * TOKENIZER_STEPS,
                     "lvm_steps": LVM_STEPS - round(2 * TOKENIZER_STEPS * TOKENIZER_STEP_S / LVM_STEP_S),
                     "why": "3x the tokenizer steps, paid for with LVM steps"},
    "batch8": {"train": ["--batch-size", "8"], "lvm_steps": 2 * LVM_STEPS,
               "why": "8 rows per step instead of 16, twice the steps (same tokens)"},
    "lr_x2": {"train": ["--lr", "4e-3"], "why": "peak learning rate 4e-3 instead of 2e-3"},
    "lvm_x3": {"lvm_steps": 3 * LVM_STEPS, "why": "3x the LVM steps (3x the compute: the scaling curve)"},
    "ood_skimage": {"data": "skimage-crops", "why": "the same recipe pretrained on scikit-image crops "
                                                     "(28 px grey): out of domain"},
    # the tokenizer's vocabulary (FSQ level sets of the FSQ paper for ~2^12 and ~2^14 codes; VQ at 2^12): more bits
    # per token, paid for with LVM steps, as a bigger head costs 1.15x / 1.69x the baseline's step (measured side by
    # side, 1 thread, 16 x 510 tokens: 7.49 / 11.03 s vs 6.52 s)
    "fsq_4k": {"tok": ["--fsq-levels", "7,5,5,5,5"], "lvm_steps": round(LVM_STEPS / HEAD_4K_STEP_COST),
               "why": "FSQ levels 7,5,5,5,5 (4,375 codes instead of 1,000)"},
    "fsq_16k": {"tok": ["--fsq-levels", "8,8,8,6,5"], "lvm_steps": round(LVM_STEPS / 1.69),
                "why": "FSQ levels 8,8,8,6,5 (15,360 codes)"},
    "vq_4k": {"tok": ["--quantizer", "vq", "--codebook-size", "4096"], "lvm_steps": round(LVM_STEPS / HEAD_4K_STEP_COST),
              "why": "VQ with 4,096 codes (k-means init, dead-code replacement) instead of FSQ"},
    # the two winners at equal compute together: what `lvm quickstart --grid 14` trains (8 rows a step)
    "grid14_batch8": {"base": "grid14", "train": ["--batch-size", "8"], "lvm_steps": 2 * 120, "probe": ["--layers", "6"],
                      "why": "grid14 with 8 rows a step and twice its steps (same tokens; its tokenizer and shards; "
                             "probed at layer 6 like grid14)"},
    # does the domain's advantage grow with the grid? grid14_batch8's recipe on scikit-image crops
    "ood_grid14": {"data": "skimage-crops", "tok": ["--grid", "14"], "train": ["--batch-size", "8"], "lvm_steps": 2 * 120,
                   "probe": ["--layers", "6"],
                   "why": "grid14_batch8's recipe (14x14 tokens, 240 steps of 8 rows) on scikit-image crops (28 px grey): "
                          "out of domain; probed at layer 6 like grid14"},
    # the grid-14 curve further out: 1,000 steps of 8 rows (4.2x grid14_batch8's tokens, 2.5x the default's seconds)
    "grid14_long": {"base": "grid14", "train": ["--batch-size", "8"], "lvm_steps": 1000, "probe": ["--layers", "6"],
                    "why": "grid14 with 8 rows a step and 1,000 steps (its tokenizer and shards; probed at layer 6 "
                           "like grid14): beyond the default's compute, a point on the grid-14 curve"},
    # the out-of-domain twin of the current default (session 8's quickstart: tokenizer 274 steps, LVM 359 steps of
    # 8 rows), so that checkpoint gets a matched out-of-domain row in the claim table
    "ood_current": {"data": "skimage-crops", "tokenizer_steps": 274, "lvm_steps": 359, "train": ["--batch-size", "8"],
                    "why": "the current default's step counts (tokenizer 274, LVM 359 of 8 rows) on scikit-image "
                           "crops (28 px grey): out of domain"},
    # the current default (session 8's `lvm quickstart`: tokenizer 274 steps, LVM 359 of 8 rows), linked in from the
    # quickstart's run folder like the baseline; it is here as the domain tokenizer of the cross_* levers
    "current": {"tokenizer_steps": 274, "lvm_steps": 359, "train": ["--batch-size", "8"],
                "why": "the current default quickstart recipe (session 8: tokenizer 274 steps, LVM 359 steps of 8 rows)"},
    # where does the domain's advantage live, tokenizer or LVM? The current recipe's two cross cells (the matched pair
    # is current / ood_current), each probed on 3 label subsets of 10 % like the claim table's rows
    "cross_tok_domain": {"tokenizer_from": "current", "data": "skimage-crops", "lvm_steps": 359,
                         "train": ["--batch-size", "8"], "probe_protocol": ["--fractions", "0.1", "--seeds", "3"],
                         "why": "the domain's tokenizer (current's), LVM pretrained on scikit-image crops (ood_current's "
                                "LVM recipe); 3 label subsets of 10 %"},
    "cross_tok_ood": {"tokenizer_from": "ood_current", "lvm_steps": 359, "train": ["--batch-size", "8"],
                      "probe_protocol": ["--fractions", "0.1", "--seeds", "3"],
                      "why": "the out-of-domain tokenizer (ood_current's), LVM pretrained on Fashion-MNIST (the current "
                             "recipe); 3 label subsets of 10 %"},
    # session 12, on 2 AMX cores: the 30-minute `lvm quickstart --grid 14` (its budget bought the tokenizer's 1,000-step
    # cap and 1,169 LVM steps of 8 rows), linked in from its run folder like `current`, and its out-of-domain twin
    **amx_default_pair("amx_grid14", 1169, "the 30-minute `lvm quickstart --grid 14` on 2 AMX cores (session 12: "
                       "tokenizer 1,000 steps, LVM 1,169 steps of 8 rows, bf16)"),
    # the AMX default's curve: twice its LVM steps on its tokenizer and shards (what would reach 90 % at 100 %?)
    "amx_grid14_x2": {"base": "amx_grid14", "lvm_steps": 2 * 1169, "train": ["--batch-size", "8", "--compile"],
                      "probe_protocol": ["--fractions", "1.0", "--seeds", "1", "--pixels", "both"],
                      "why": "amx_grid14 with twice its LVM steps (2,338 of 8 rows; its tokenizer and shards; its own "
                             "layer sweep): beyond the AMX default's compute, a point on its curve at 100 % labels"},
    # session 13's 30-minute default on 2 AMX cores (the probes' share a third, the step plan revised during the
    # run: LVM 1,923 steps of 8 rows), linked in from its run folder like amx_grid14, and its out-of-domain twin
    **amx_default_pair("amx_default13", AMX_DEFAULT13_STEPS, "the 30-minute `lvm quickstart` on 2 AMX cores since session 13 "
                       "(14x14; tokenizer 1,000 steps, LVM 1,923 steps of 8 rows, bf16)"),
    # the AMX default's curve for target 4 (domain at 30 % vs out of domain at 100 %): 3,200 LVM steps (1.66x, what a
    # ~40-minute budget buys) on each pair member's own tokenizer and shards, both with their own layer sweep
    **{f"{prefix}amx_3200": {"base": f"{prefix}amx_default13", "lvm_steps": 3200,
                             "train": ["--batch-size", "8", "--compile"], "probe_protocol": FULL_PROTOCOL,
                             "why": f"{prefix}amx_default13 with 3,200 LVM steps instead of 1,923 (its tokenizer and "
                                    "shards; its own layer sweep): a point beyond the 30-minute default"}
       for prefix in ("", "ood_")},
    # the same curve at 4x the default's LVM steps (7,700 of 8 rows, ~50 min of LVM training each on 2 AMX cores),
    # probed as target 4 compares the pair: mirrored, the domain at 30 % (3 subsets) and 100 %, its twin at 100 %
    **{f"{prefix}amx_7700": {"base": f"{prefix}amx_default13", "lvm_steps": 7700,
                             "train": ["--batch-size", "8", "--compile"],
                             "probe_protocol": [*fractions, "--mirror"],
                             "why": f"{prefix}amx_default13 with 7,700 LVM steps instead of 1,923 (4x; its tokenizer "
                                    "and shards; its own layer sweep; mirrored probe): the steps curve beyond 3,200"}
       for prefix, fractions in TARGET4_PAIR_FRACTIONS},
    # the next point of that curve, 8x (15,400 steps): each 7,700-step LVM resumed with --steps 15400, so the LR
    # steps back up to that cosine's midpoint (a warm restart) and decays again over 7,700 more steps of the same
    # data order; ~50 min more per model on 2 AMX cores instead of ~1.7 h from scratch. Probed like amx_7700
    **{f"{prefix}amx_15400": {"base": f"{prefix}amx_default13", "continue_from": f"{prefix}amx_7700",
                              "lvm_steps": 15400, "train": ["--batch-size", "8", "--compile"],
                              "probe_protocol": [*fractions, "--mirror"],
                              "why": f"{prefix}amx_7700's LVM resumed to 15,400 steps (8x the default's; the LR back "
                                     "up to the 15,400-step cosine's midpoint, then decayed; its own layer sweep; "
                                     "mirrored probe): the steps curve beyond 4x"}
       for prefix, fractions in TARGET4_PAIR_FRACTIONS},
    # the steps saturated there; is it capacity? A wider LVM (6 x 384, ~2.2x the non-embedding parameters) at about
    # the default's LVM seconds, on the default's tokenizer and shards (the domain side only, first)
    "amx_wide384": {"base": "amx_default13", "lvm_steps": 1000,
                    "train": ["--batch-size", "8", "--compile", "--d-model", "384", "--n-head", "6"],
                    "probe_protocol": TARGET4_PROTOCOL,
                    "why": "amx_default13's tokenizer and shards, a wider LVM (6 x 384 instead of 6 x 256) for 1,000 "
                           "steps of 8 rows (about the default's 1,923 steps' seconds); its own layer sweep"},
    # wider lost at equal seconds (undertrained); the other shape at about the same parameters and seconds: deeper and
    # narrower (10 x 192, head dim 64 as in `small`), on the same tokenizer and shards
    "amx_deep10": {"base": "amx_default13", "lvm_steps": 1500,
                   "train": ["--batch-size", "8", "--compile", "--n-layer", "10", "--d-model", "192", "--n-head", "3"],
                   "probe_protocol": TARGET4_PROTOCOL,
                   "why": "amx_default13's tokenizer and shards, a deeper and narrower LVM (10 x 192 instead of 6 x 256, "
                          "about the same parameters) for 1,500 steps of 8 rows (about the default's LVM seconds); its "
                          "own layer sweep"},
    # neither shape won; the tokenizer's vocabulary at 14x14 (FSQ 4,375 codes; +0.1 at 7x7 on fp32): its own tokenizer
    # and shards, the LVM steps cut by HEAD_4K_STEP_COST (the larger embedding and output layer)
    "amx_fsq4k": {"tok": ["--grid", "14", "--fsq-levels", "7,5,5,5,5"], "tokenizer_steps": 1000,
                  "lvm_steps": round(AMX_DEFAULT13_STEPS / HEAD_4K_STEP_COST), "train": ["--batch-size", "8", "--compile"],
                  "probe_protocol": TARGET4_PROTOCOL,
                  "why": "amx_default13's recipe with FSQ levels 7,5,5,5,5 (4,375 codes instead of 1,000; its own "
                         "tokenizer and shards) and 1,672 LVM steps of 8 rows (1,923 / 1.15); its own layer sweep"},
    # every shape and size tried left the gap to the twin at -0.4 to -0.9 point: the objective. A prefix LM (AIM's
    # prefix attention) whose features are read bidirectionally, on the default's tokenizer, shards and step count
    "amx_prefix": {"base": "amx_default13", "lvm_steps": AMX_DEFAULT13_STEPS,
                   "train": ["--batch-size", "8", "--compile", "--prefix-lm"], "probe_protocol": TARGET4_PROTOCOL,
                   "why": "amx_default13's tokenizer, shards and 1,923 LVM steps of 8 rows, pretrained as a prefix LM "
                          "(a uniform leading part of each sentence attends both ways and carries no loss) and read "
                          "with bidirectional attention; its own layer sweep"},
    # its out-of-domain twin, for target 4's gap: the same recipe on ood_amx_default13's tokenizer and shards, probed
    # at 100 % of the labels only (what the gap compares)
    "ood_amx_prefix": {"base": "ood_amx_default13", "lvm_steps": AMX_DEFAULT13_STEPS,
                       "train": ["--batch-size", "8", "--compile", "--prefix-lm"],
                       "probe_protocol": ["--fractions", "1.0", "--seeds", "1"],
                       "why": "amx_prefix's recipe on ood_amx_default13's tokenizer and shards (scikit-image crops): "
                              "out of domain; its own layer sweep; 100 % of the labels"},
    # beyond equal compute: the grid that won, given the steps that won (its tokenizer and shards, 3x its steps)
    "grid14_x3": {"base": "grid14", "lvm_steps": 3 * 120, "probe": ["--layers", "6"],
                  "why": "grid14 with 3x its LVM steps (3x the baseline's compute; its tokenizer and shards; "
                         "probed at layer 6 like grid14)"},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="one folder per lever; finished stages are kept")
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    p.add_argument("--threads", type=int, default=2, help="torch threads of every stage")
    p.add_argument("--probe-images", type=int, default=6000, help="labelled training images the probe fits on")
    p.add_argument("--report", action="store_true", help="only write the table from finished runs")
    p.add_argument("--results", default=str(RESULTS / "pretrain-levers-cpu"))
    p.add_argument("--note", action="append", default=[], help="a line for the report (how a row was made)")
    return p.parse_args(argv)


def own_tokenizer(name: str) -> bool:
    """Levers that change only the LVM share the baseline's tokenizer and token shards (one change per row);
    a ``tokenizer_from`` lever tokenizes its own data with another lever's tokenizer."""
    lever = LEVERS[name]
    if "tokenizer_from" in lever:
        return False
    return name == "baseline" or any(k in lever for k in ("tok", "tokenizer_steps", "data"))


def own_tokens(name: str) -> bool:
    return own_tokenizer(name) or "tokenizer_from" in LEVERS[name]


def tokens_from(name: str) -> str:
    """The lever whose token shards ``name`` trains on: its own, its ``base`` lever's, or the baseline's."""
    return name if own_tokens(name) else LEVERS[name].get("base", "baseline")


def tokenizer_from(name: str) -> str:
    """The lever whose tokenizer ``name`` reads: ``tokenizer_from``'s, else that of its shards."""
    return LEVERS[name].get("tokenizer_from", tokens_from(name))


def commands(name: str, out: Path, threads: int, probe_images: int) -> list[tuple[str, list[str]]]:
    """(stage, argv) of one lever's run, in order; a stage is skipped when its output exists."""
    lever = LEVERS[name]
    run, data = out / name, lever.get("data", "fashion-mnist")
    tok, tokens, lvm = out / tokenizer_from(name) / "tokenizer", out / tokens_from(name) / "tokens", run / "lvm"
    shape = ["--image-size", "28", "--channels", "1"] if data != "fashion-mnist" else []
    cmds = []
    if own_tokenizer(name):
        cmds.append(("tokenizer", ["lvm", "tokenizer-train", "--data", data, "--out-dir", str(tok), *shape,
                                   "--steps", str(lever.get("tokenizer_steps", TOKENIZER_STEPS)), "--batch-size", "128",
                                   "--eval-holdout", "500", "--threads", str(threads), "--no-progress",
                                   *lever.get("tok", [])]))
    if own_tokens(name):
        for side in ("train", "test"):
            cmds.append((f"tokens/{side}", ["lvm", "tokenize", "--source", data, "--tokenizer", str(tok),
                                            "--split", side, "--out", str(tokens / side)]))
    views = []
    if "pairs" in lever:
        view = run / "tokens" / f"train_{lever['pairs']}"
        cmds.append((f"tokens/train_{lever['pairs']}", ["lvm", "tokenize", "--source", data, "--tokenizer", str(tok),
                                                        "--split", "train", "--transform", lever["pairs"],
                                                        "--out", str(view)]))
        views = ["--kind", "pairs", "--views", str(view)]
    cmds.append(("lvm", ["lvm", "train", "--data", str(tokens / "train"),
                         "--eval-data", str(tokens / "test"), "--out", str(lvm), *views,
                         "--preset", "small", "--context-len", "512", "--steps", str(lever.get("lvm_steps", LVM_STEPS)),
                         "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "50", "--eval-every", "250",
                         "--ckpt-every", "250", "--eval-rows", "64", "--no-compile", "--threads", str(threads),
                         "--no-progress", *lever.get("train", [])]))
    # one even subsample of probe_images labels, or the lever's protocol (e.g. 3 class-balanced subsets of 10 %)
    protocol = lever.get("probe_protocol", ["--limit-train", str(probe_images), "--fractions", "1.0", "--seeds", "1"])
    cmds.append(("probe10", ["lvm", "probe", "--checkpoint", str(lvm), "--tokenizer", str(tok),
                             "--source", "fashion-mnist", *protocol, "--no-baselines", "--no-random-init",
                             "--sweep-images", "5000", "--out", str(run / "probe10"), *lever.get("probe", [])]))
    return cmds


def done(stage: str, run: Path) -> bool:
    marker = {"tokenizer": "tokenizer/eval.json", "lvm": "lvm/latest", "probe10": "probe10/probe.json"}
    path = run / marker.get(stage, f"{stage}/meta.json")
    lever = LEVERS.get(run.name, {})
    if stage == "lvm" and "continue_from" in lever and path.exists():  # seeded from another run: done at its steps
        return trained_steps(run / "lvm") >= lever["lvm_steps"]
    return path.exists()


def trained_steps(lvm: Path) -> int:
    """The step of a training folder's latest checkpoint (0 when it has none)."""
    from lvm.runtime import STATE_FILE

    state = lvm / "latest" / STATE_FILE
    return int(json.loads(state.read_text())["step"]) if state.exists() else 0


def seed_continuation(name: str, out: Path) -> None:
    """A ``continue_from`` lever starts from a copy of that lever's finished LVM (its latest checkpoint and its
    metrics, so the curve reads on); ``lvm train`` then resumes it to this lever's steps. The source is left as
    it was, so its own probe stays valid."""
    lvm, source = out / name / "lvm", out / LEVERS[name]["continue_from"] / "lvm"
    if (lvm / "latest").exists():
        return
    if not done("lvm", source.parent):
        sys.exit(f"[{name}] continues {source}, which has no finished LVM; run --levers "
                 f"{LEVERS[name]['continue_from']} first")
    checkpoint = (source / "latest").resolve()
    lvm.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, lvm / checkpoint.name)
    shutil.copy2(source / "metrics.jsonl", lvm / "metrics.jsonl")
    (lvm / "latest").symlink_to(checkpoint.name)


def run_lever(name: str, out: Path, threads: int, probe_images: int) -> None:
    source, tok_source = tokens_from(name), tokenizer_from(name)
    if source != name and not done("tokens/test", out / source):  # its shards come from there
        run_stages(source, out, threads, probe_images, ("tokenizer", "tokens/train", "tokens/test"))
    if tok_source != source and not done("tokenizer", out / tok_source):  # and its tokenizer from there
        run_stages(tok_source, out, threads, probe_images, ("tokenizer",))
    if "continue_from" in LEVERS[name]:
        seed_continuation(name, out)
    run_stages(name, out, threads, probe_images)


def run_stages(name: str, out: Path, threads: int, probe_images: int, only: tuple[str, ...] = ()) -> None:
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    for stage, argv in commands(name, out, threads, probe_images):
        if done(stage, run) or (only and stage not in only):
            continue
        print(f"[{name}] {stage}: {shlex.join(argv)}", flush=True)
        tic = time.time()
        with open(run / f"{stage.replace('/', '_')}.log", "w") as log:
            rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc:
            sys.exit(f"[{name}] {stage} failed (rc {rc}); see {run / (stage.replace('/', '_') + '.log')}")
        timings[stage] = round(time.time() - tic, 1)
        (run / "timings.json").write_text(json.dumps(timings, indent=2))


def row(name: str, out: Path, threads: int, probe_images: int) -> dict | None:
    run = out / name
    if not done("probe10", run):
        return None
    probe = json.loads((run / "probe10" / "probe.json").read_text())
    # the states' linear row at 10 % of the labels: the 6,000-image subsample's 100 %, or a full protocol's 10 %
    from lvm.probe import PIXELS_SUFFIX

    lin = [r for r in probe["rows"] if r["method"] == "linear" and not r["features"].endswith(PIXELS_SUFFIX)]
    tenth = [r for r in lin if r["fraction"] == 0.1] or \
        [r for r in lin if r["fraction"] == 1.0 and probe["config"].get("limit_train") == probe_images]
    if not tenth:  # probed at other fractions only (e.g. a curve point at 100 %): not a row of this table
        return None
    lin = tenth[0]
    tok = json.loads((out / tokenizer_from(name) / "tokenizer" / "eval.json").read_text())
    metrics = [json.loads(line) for line in (run / "lvm" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = {"steps": max(m["step"] for m in metrics),
               "eval_loss": next((m["eval_loss"] for m in reversed(metrics) if "eval_loss" in m), None)}
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    return {"lever": name, "why": LEVERS[name]["why"], "test_acc": lin["acc_mean"], "test_std": lin.get("acc_std", 0.0),
            "runs": lin.get("runs", 1), "n_labels": lin["n_labels"],
            "layer": lin["features"].rpartition("layer ")[2].rstrip(")"), "dim": lin["dim"], "tokenizer_psnr_db": tok.get("psnr_db"),
            "tokenizer_steps": tok.get("steps"), "grid": tok.get("grid"), "lvm_steps": summary.get("steps"),
            "eval_loss": summary.get("eval_loss"), "seconds": timings,
            "commands": [shlex.join(argv) for _, argv in commands(name, Path(DEFAULT_OUT), threads, probe_images)]}


def report(rows: list[dict], args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.results_io import kept_notes, write_results
    from lvm.runtime import cpu_has_fast_bf16, cpu_model

    base = next((r["test_acc"] for r in rows if r["lever"] == "baseline"), None)
    notes = args.note or kept_notes(args.results)  # a lever run keeps the findings
    lines = [
        "# Pretraining levers at the default run's compute, linear probe at 10 % labels (issue #14, item 3)", "",
        f"CPU: {cpu_model()}, AMX {'yes' if cpu_has_fast_bf16() else 'no'} (runs may have shared it: step counts are fixed, so accuracies do not depend on "
        "the load; seconds do). Command: `python -m bench.pretrain_levers` (module docstring: protocol).", "",
        f"Probe: linear, layer from the probe's sweep, {args.probe_images:,} labelled Fashion-MNIST training images "
        "(10 %), scored on the 10,000 test images no stage saw; one label subset, so differences under ~0.5 point "
        "are noise. Eval loss is per token on held-out images of the lever's own tokens (not comparable across "
        "grids, sentence kinds or domains).", "", *[line for n in notes for line in (n, "")],
        "| lever | what changes | grid | tokenizer steps (PSNR dB) | LVM steps | eval loss | layer | test % | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if base is None else f"{100 * (r['test_acc'] - base):+.1f}"
        grid = "x".join(map(str, r["grid"] or []))
        acc = f"{100 * r['test_acc']:.1f}" + (f" ± {100 * r['test_std']:.1f}" if r.get("runs", 1) > 1 else "")
        loss = "" if r["eval_loss"] is None else f"{r['eval_loss']:.3f}"
        lines.append(f"| {r['lever']} | {r['why']} | {grid} | {r['tokenizer_steps']} ({r['tokenizer_psnr_db']:.1f}) "
                     f"| {r['lvm_steps']} | {loss} | {r['layer']} | {acc} | {delta} |")
    lines += ["", f"Commands of each row, in order (`--out {DEFAULT_OUT}`, `OMP_NUM_THREADS` = the threads given):", ""]
    for r in rows:
        lines += [f"- {r['lever']}:", *[f"  - `{c}`" for c in r["commands"]]]
    write_results(args.results, {"cpu": cpu_model(), "probe_images": args.probe_images, "notes": notes,
                                 "rows": rows},
                  "\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.report:
        for name in args.levers:
            run_lever(name, out, args.threads, args.probe_images)
    rows = [r for name in LEVERS if (r := row(name, out, args.threads, args.probe_images)) is not None]
    report(rows, args)


if __name__ == "__main__":
    main()
