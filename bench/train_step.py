"""Training-step throughput: our LVM step, one lever at a time, vs a plain eager PyTorch baseline.

    python -m bench.train_step [--preset small] [--batch 16] [--context 510] [--steps 6] [--rounds 3]

The baseline below is what one writes without our kernels: the same LLaMA-style blocks, attention
through ``F.scaled_dot_product_attention`` over the whole packed row and the loss as full
``[B*T, V]`` logits + ``F.cross_entropy``, in fp32. The rungs above it add, in turn, our kernels'
dispatch and fused linear+CE, bf16 autocast, attention restricted to each packed sentence (what
``lvm train`` does by default), and torch.compile. All rungs start from the same weights and see the
same batches; they alternate in rounds so machine noise hits all alike, and the figure is the ratio
of median tokens/s. Writes ``bench/results/train_step-<device>[-<preset>].json`` and ``.md`` (no suffix for ``small``).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.results_io import write_results
from lvm.config import LVMConfig
from lvm.model import LVM, apply_rope
from lvm.runtime import cpu_has_fast_bf16, mixed_precision


class PlainBlock(nn.Module):
    def __init__(self, c: LVMConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.norm1, self.norm2 = nn.RMSNorm(c.d_model, eps=c.norm_eps), nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.w_gate = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w_up = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w_down = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        h = self.norm2(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class PlainLVM(nn.Module):
    """Same shapes as ``lvm.model.LVM``; full logits and ordinary cross-entropy."""

    def __init__(self, c: LVMConfig) -> None:
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layer))
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)

    def forward(self, ids, targets):
        hd = self.c.head_dim
        inv = self.c.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32, device=ids.device) / hd)
        ang = torch.outer(torch.arange(ids.shape[1], dtype=torch.float32, device=ids.device), inv)
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, ang.cos(), ang.sin())
        logits = self.norm(x) @ self.emb.weight.T  # [B, T, V], tied head
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _time_steps(model, opt, batches, autocast=None, segment_len=None) -> float:
    """Tokens/s over the given batches (one optimizer step each)."""
    _sync(batches[0][0].device)
    start, tokens = time.perf_counter(), 0
    for x, y in batches:
        with autocast if autocast is not None else nullcontext():
            loss = model(x, y, segment_len=segment_len) if segment_len else model(x, y)
        loss = loss.loss if hasattr(loss, "loss") else loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
    _sync(batches[0][0].device)
    return tokens / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=1004)  # 1000 FSQ codes + 4 specials
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=510)
    p.add_argument("--sentence", type=int, default=51, help="packed sentence length (7x7 tokens + BOS + EOS)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rung")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = LVMConfig.preset(args.preset, vocab_size=args.vocab, max_seq_len=args.context)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16 = mixed_precision(device, "bf16")
    base = LVM(cfg).to(device)
    plain = PlainLVM(cfg).to(device)
    _copy_weights(base, plain)
    # Each rung adds one lever to the one above it; every rung owns a copy of the same weights.
    rungs = [("plain eager PyTorch (SDPA over the row, full-logits CE), fp32", plain, None, None)]
    rungs.append(("ours (kernels dispatch, fused linear+CE), fp32", copy.deepcopy(base), None, None))
    rungs.append(("ours, bf16 autocast", copy.deepcopy(base), bf16, None))
    rungs.append(("ours, bf16, attention within each sentence", copy.deepcopy(base), bf16, args.sentence))
    if not args.no_compile:
        rungs.append(("ours, bf16, sentence attention, torch.compile", torch.compile(copy.deepcopy(base)), bf16,
                      args.sentence))
    g = torch.Generator().manual_seed(0)
    batches = [
        (lambda s: (s[:, :-1], s[:, 1:]))(torch.randint(0, args.vocab, (args.batch, args.context), generator=g).to(device))
        for _ in range(args.steps)
    ]
    with torch.no_grad():  # same weights, same batch: the fp32 rungs must compute the same loss
        a, b = base(*batches[0]).loss.item(), plain(*batches[0]).item()
    assert abs(a - b) < 1e-3, f"baseline is not the same model: loss {a} vs {b}"
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for _, m, _, _ in rungs]
    for (_, m, ac, seg), opt in zip(rungs, opts):  # warm-up (and compilation)
        _time_steps(m, opt, batches[:2], ac, seg)
    tps: list[list[float]] = [[] for _ in rungs]
    for _ in range(args.rounds):
        for i, ((_, m, ac, seg), opt) in enumerate(zip(rungs, opts)):
            tps[i].append(_time_steps(m, opt, batches, ac, seg))
    medians = [statistics.median(t) for t in tps]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_amx_bf16": cpu_has_fast_bf16(), "torch": torch.__version__, "preset": args.preset,
        "batch": args.batch, "context": args.context, "sentence": args.sentence, "vocab": args.vocab,
        "rungs": [{"loop": name, "tokens_per_s": med, "ratio_vs_plain": med / medians[0], "rounds": t}
                  for (name, *_), med, t in zip(rungs, medians, tps)],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    name = f"train_step-{device.type}" + (f"-{args.preset}" if args.preset != "small" else "")
    lines = [
        f"# Training step: our levers one by one vs plain eager PyTorch ({result['device']}, {result['threads']} threads)",
        "",
        f"torch {result['torch']}, {result['date']}; CPU with AMX bf16: {result['cpu_amx_bf16']}; preset "
        f"`{args.preset}`, batch {args.batch} x {args.context} tokens ({args.context // args.sentence} packed "
        f"sentences of {args.sentence}), vocab {args.vocab}; median of {args.rounds} alternating rounds of "
        f"{args.steps} optimizer steps each.",
        "",
        "| loop | tokens/s (median) | ratio vs plain |",
        "|---|---:|---:|",
        *[f"| {r['loop']} | {r['tokens_per_s']:,.0f} | {r['ratio_vs_plain']:.2f} |" for r in result["rungs"]],
        "",
    ]
    write_results(Path(args.out) / name, result, "\n".join(lines))
    return result


def _copy_weights(ours: LVM, plain: PlainLVM) -> None:
    """Load our weights into the baseline so both compute the same function."""
    with torch.no_grad():
        plain.emb.weight.copy_(ours.tok_emb.weight)
        plain.norm.weight.copy_(ours.norm_f.weight)
        for pb, ob in zip(plain.blocks, ours.blocks):
            gate, up = ob.mlp.w_gate.weight, ob.mlp.w_up.weight
            pairs = [(pb.norm1, ob.norm_attn.weight), (pb.norm2, ob.norm_mlp.weight), (pb.qkv, ob.attn.qkv.weight),
                     (pb.proj, ob.attn.proj.weight), (pb.w_gate, gate), (pb.w_up, up), (pb.w_down, ob.mlp.w_out.weight)]
            for module, weight in pairs:
                module.weight.copy_(weight)


if __name__ == "__main__":
    main()
