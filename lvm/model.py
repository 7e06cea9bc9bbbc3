"""The LVM: a decoder-only transformer over visual tokens, read top to bottom.

    ids [B, T] -> token embedding -> n_layer x Block -> RMSNorm -> head (tied or not) -> logits [B, T, V]
    Block: x + Attention(RMSNorm(x)) (RoPE on q, k; causal), then x + SwiGLU(RMSNorm(x)). No biases.

Attention runs through ``kernels.flash_attention`` and the training loss through
``kernels.fused_linear_cross_entropy`` so the [B*T, V] logits are never built for training.
Generation keeps a preallocated KV cache per layer; see ``LVM.generate``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from kernels import flash_attention, fused_linear_cross_entropy
from kernels.dispatch import resolve_backend
from lvm.config import LVMConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
IGNORE_INDEX = -100


@dataclass
class LVMOutput:
    """``loss`` when targets were given (then ``logits`` is None, never materialised), else ``logits`` [B, T, V]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class LVM(nn.Module):
    """Decoder-only transformer; ``forward`` for training, ``hidden_states`` for probes, ``generate`` for sampling."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # one [V, D] tensor reads tokens in and writes them out
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; residual-branch outputs shrunk by 1/sqrt(2 n_layer) so the stream's variance stays O(1)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.w_out.weight, mean=0.0, std=residual_std)

    # ---- training / scoring -------------------------------------------------------------------

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None, segment_len: int | None = None,
        prefix_len: torch.Tensor | None = None,
    ) -> LVMOutput:
        """Next-token loss (mean over targets != -100) when ``targets`` [B, T] is given, else logits [B, T, V].

        ``segment_len`` L: the row is consecutive blocks of L tokens (packed sentences) and each
        block attends only to itself, as if every sentence were its own row; with RoPE this is
        exactly what a lone sentence at position 0 sees (at probe and generation time), and
        attention costs T*L instead of T^2/2.

        ``prefix_len`` ``long [B, S]`` (prefix-LM pretraining, with ``segment_len``; S sentences a row): the first
        ``prefix_len[b, s]`` tokens of sentence s attend to each other both ways, the rest causally. The caller
        masks the targets inside a prefix (``prefix_targets``): those tokens are visible there.
        """
        self._check_ids(ids)
        if segment_len is not None and segment_len < 1:
            raise ValueError(f"segment_len={segment_len} must be >= 1 (or None for attention over the whole row).")
        if prefix_len is not None and segment_len is None:
            raise ValueError("prefix_len gives one prefix per packed sentence; pass segment_len too.")
        x = self.drop(self.tok_emb(ids))  # [B, T, D]
        cos, sin = self._rope(0, ids.shape[1], ids.device)
        for block in self.blocks:
            x = block(x, cos, sin, segment_len=segment_len, prefix_len=prefix_len)
        h = self.norm_f(x)  # [B, T, D]
        if targets is not None:
            if targets.shape != ids.shape:
                raise ValueError(f"targets has shape {tuple(targets.shape)} but ids has {tuple(ids.shape)}; they must match.")
            loss = fused_linear_cross_entropy(
                h.flatten(0, 1), self.head.weight, targets.flatten(), ignore_index=IGNORE_INDEX
            )
            return LVMOutput(loss=loss)
        return LVMOutput(logits=self.head(h).float())

    def hidden_states(
        self, ids: torch.Tensor, layers: Sequence[int] | None = None, final_norm: bool = False,
        bidirectional: bool | None = None,
    ) -> list[torch.Tensor]:
        """Residual stream [B, T, D] per layer for probes.

        ``bidirectional`` (default: ``config.prefix_lm``): every token attends to the whole row, as a prefix LM's
        prefix does; a causal LM's states are read causally, as it was trained.

        Index 0 is the token embedding, index i (1..n_layer) the output of block i. With
        ``final_norm=True`` one more entry, index n_layer + 1, holds the final RMSNorm output
        (what the head reads). ``layers`` picks entries from that list (negative indices count
        from its end) and the result follows the order of ``layers``; blocks past the deepest
        requested entry are not run.
        """
        self._check_ids(ids)
        count = self.config.n_layer + 1 + int(final_norm)
        if layers is None:
            wanted = list(range(count))
        else:
            wanted = []
            for i in layers:
                if not -count <= i < count:
                    raise IndexError(
                        f"hidden_states: layer {i} out of range; there are {count} entries "
                        f"(0 = embeddings, 1..{self.config.n_layer} = blocks"
                        f"{', ' + str(count - 1) + ' = final norm' if final_norm else ''})."
                    )
                wanted.append(i % count)
        deepest = max(wanted, default=0)
        both_ways = self.config.prefix_lm if bidirectional is None else bidirectional
        states = [self.drop(self.tok_emb(ids))]  # [B, T, D]
        cos, sin = self._rope(0, ids.shape[1], ids.device)
        for block in self.blocks[: min(deepest, self.config.n_layer)]:
            states.append(block(states[-1], cos, sin, bidirectional=both_ways))
        if deepest == self.config.n_layer + 1:
            states.append(self.norm_f(states[-1]))
        return [states[i] for i in wanted]

    # ---- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        token_limit: int | None = None,
    ) -> torch.Tensor:
        """Continue ``ids`` [B, T0] by ``max_new_tokens`` sampled tokens -> [B, T0 + new]; temperature 0 is greedy.

        ``token_limit`` restricts sampling to ids below it (the codebook), so special tokens never
        land inside a generated image.

        With ``use_cache`` the prompt is run once (prefill) and each new token attends to a
        preallocated KV cache; without it the whole sequence is recomputed every step (the
        reference the cache is tested against).
        """
        self._check_ids(ids)
        total = ids.shape[1] + max_new_tokens
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0.")
        if total > self.config.max_seq_len:
            raise ValueError(
                f"generate: prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                f"max_seq_len {self.config.max_seq_len}; shorten the prompt or ask for fewer tokens."
            )
        was_training = self.training
        self.eval()
        try:
            if use_cache:
                cache = KVCache.empty(self.config, ids.shape[0], total, self.head.weight)
                logits = self._step(ids, cache)  # prefill: [B, V] for the last prompt position
            out = ids
            for i in range(max_new_tokens):
                if not use_cache:
                    logits = self(out).logits[:, -1]  # [B, V]
                if token_limit is not None:
                    logits[:, token_limit:] = float("-inf")
                token = sample_next(logits, temperature, top_k, top_p, generator)  # [B, 1]
                out = torch.cat([out, token], dim=1)
                if use_cache and i + 1 < max_new_tokens:
                    logits = self._step(token, cache)
        finally:
            self.train(was_training)
        return out

    def _step(self, ids: torch.Tensor, cache: "KVCache") -> torch.Tensor:
        """Run ``ids`` [B, t] at positions cache.length.. ; append their keys/values; return last logits [B, V]."""
        start = cache.length
        cos, sin = self._rope(start, ids.shape[1], ids.device)
        x = self.tok_emb(ids)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache=cache, layer=layer)
        cache.length = start + ids.shape[1]
        return self.head(self.norm_f(x[:, -1])).float()

    # ---- bookkeeping ----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non-embedding (the scaling-law convention) leaves out the token embedding and an untied head."""
        n = sum(p.numel() for p in self.parameters())  # shared (tied) tensors are counted once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def configure_optimizers(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """AdamW with weight decay only on 2-D matmul weights (``lvm.runtime.param_groups`` says why);
        the token embedding gets none: decay would shrink rare tokens' rows merely for being rare.
        An untied head is a matmul weight and is decayed."""
        from lvm.runtime import param_groups

        groups = param_groups(self, weight_decay, lr, no_decay=[self.tok_emb.weight])
        return torch.optim.AdamW(groups, lr=lr, betas=betas)

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write model.safetensors + config.json into a temp dir beside ``directory``, then rename it into place.

        A reader never sees a half-written checkpoint. An existing ``directory`` is replaced as a
        whole (anything else in it goes too), so write optimizer state after this call.
        """
        from safetensors.torch import save_file

        from tokenizer.atomic import atomic_path

        state = {  # ``state_dict``: a full one gathered from a sharded (FSDP) model, if given
            name: t.detach().to("cpu").contiguous()
            for name, t in (state_dict if state_dict is not None else self.state_dict()).items()
            if not (self.config.tie_embeddings and name == "head.weight")  # same memory as tok_emb.weight
        }
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "LVM":
        """Load a save_pretrained directory: config.json, then safetensors weights (nothing is unpickled)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found; an LVM checkpoint directory needs {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME} (written by LVM.save_pretrained)."
                )
        try:
            config = LVMConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{directory / CONFIG_NAME} is not a valid LVM config: {err}") from err
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        with torch.device("meta"):  # no throwaway random init: the weights are assigned from the file
            model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: {err}"
            ) from err
        if config.tie_embeddings:
            model.head.weight = model.tok_emb.weight  # assign replaced the embedding Parameter: re-tie
            missing = [k for k in missing if k != "head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: "
                f"missing tensors {missing}, unexpected tensors {unexpected}. Check tie_embeddings/n_layer in the config."
            )
        return model

    # ---- helpers --------------------------------------------------------------------------------

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"ids must be an integer tensor [B, T]; got dtype {ids.dtype}, shape {tuple(ids.shape)}.")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"ids has length {ids.shape[1]} > max_seq_len {self.config.max_seq_len}; crop the sequence "
                "or build the model with a larger max_seq_len."
            )
        if ids.device.type != "cpu" or torch.compiler.is_compiling():
            return  # the value check below would force a device sync / a graph break
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"ids hold values in [{int(ids.min())}, {int(ids.max())}] but vocab_size is "
                f"{self.config.vocab_size}; check the tokenizer/special-token ids against the config."
            )

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, Dh/2] for positions start..start+T, computed in fp32 on the fly so .half()/.to() cannot degrade them."""
        hd = self.config.head_dim
        inv_freq = self.config.rope_theta ** (-torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
        pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)  # [T, Dh/2]
        return angles.cos(), angles.sin()


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.norm_mlp = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: "KVCache | None" = None,
        layer: int = 0,
        segment_len: int | None = None,
        prefix_len: torch.Tensor | None = None,
        bidirectional: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_attn(x), cos, sin, cache, layer, segment_len, prefix_len, bidirectional))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions on q and k (bidirectional over a prefix LM's
    prefix, or over the whole row for a prefix LM's features)."""

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: "KVCache | None" = None,
        layer: int = 0,
        segment_len: int | None = None,
        prefix_len: torch.Tensor | None = None,
        bidirectional: bool = False,
    ) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        q, k = apply_rope(qkv[:2], cos, sin)  # q and k rotated in one go: [B, H, T, Dh] each
        v = qkv[2]
        if prefix_len is not None:
            y = prefix_attention(q, k, v, segment_len, prefix_len)
        elif bidirectional and cache is None:
            y = flash_attention(q, k, v, causal=False)
        elif segment_len is not None and cache is None and q.shape[2] > segment_len:
            y = segment_attention(q, k, v, segment_len)
        elif cache is None or cache.length == 0:
            if cache is not None:
                cache.write(layer, k, v)  # prefill: the prompt attends only to itself
            y = flash_attention(q, k, v, causal=True)
        else:
            k, v = cache.write(layer, k, v)  # [B, H, past + T, Dh]
            t, past = q.shape[2], cache.length
            # One new query may see every cached key, so it needs no mask; a chunk needs the causal
            # mask shifted by the cache length (SDPA's is_causal aligns top-left, which is wrong here).
            mask = None if t == 1 else torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) -> W_out.

    Gate and up are separate matmuls on purpose: one fused [2F, D] matmul leaves both halves as
    strided views, and silu plus the backward's concatenation on those cost more than the launch
    they save (measured 5 % of a CPU training step of the `small` preset).
    """

    def __init__(self, config: LVMConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_out = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_up(x))  # [B, T, F] inside


class RMSNorm(nn.Module):
    """Scale by 1/RMS with a learned gain: LayerNorm without the mean, cheaper and as stable for LMs."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_len: int) -> torch.Tensor:
    """Causal attention inside consecutive blocks of ``segment_len`` tokens of q, k, v [B, H, T, Dh].

    On the Triton path the kernel takes sentence ids (position // segment_len) and skips the tiles
    between sentences, so nothing is padded or copied (bench/segment_attention.py measures both
    routes). The torch path keeps the blocks-as-rows route: SDPA's fast causal kernel needs no mask.
    """
    t = q.shape[2]
    if resolve_backend("auto", q.device, "flash_attention") == "triton":
        segment_ids = (torch.arange(t, device=q.device) // segment_len).expand(q.shape[0], t)  # [B, T]
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids)
    return segment_attention_as_rows(q, k, v, segment_len)


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_len: int,
                     prefix_len: torch.Tensor) -> torch.Tensor:
    """Prefix-LM attention inside consecutive sentences of ``segment_len`` tokens of q, k, v [B, H, T, Dh]:
    query i of sentence s sees key j of it where j <= i, or where both lie in its first ``prefix_len[b, s]``
    tokens. Sentences become batch rows (as ``segment_attention_as_rows``) under SDPA with a boolean mask:
    pretraining only, so the torch path serves every device (the Triton kernel has no prefix mask)."""
    b, t = q.shape[0], q.shape[2]
    pad = -t % segment_len  # padded keys sit after every real query of the last sentence; the causal part hides them
    q, k, v = (_sentence_rows(z, segment_len) for z in (q, k, v))
    if prefix_len.shape != (b, q.shape[0] // b):
        raise ValueError(f"prefix_len has shape {tuple(prefix_len.shape)}; one per sentence is "
                         f"{(b, q.shape[0] // b)} (rows, sentences a row).")
    pos = torch.arange(segment_len, device=q.device)
    prefix = pos < prefix_len.reshape(-1, 1, 1).to(q.device)  # [B*S, 1, L]: key j inside its sentence's prefix
    if pad:  # a prefix longer than a cut last sentence must not reach its padding
        real = (torch.arange(q.shape[0] // b * segment_len, device=q.device) < t).reshape(-1, segment_len)  # [S, L]
        prefix = prefix & real.repeat(b, 1)[:, None]
    mask = (pos[None, :] <= pos[:, None]) | (prefix & prefix.transpose(1, 2))  # [B*S, L, L]
    return _packed_rows(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]), b, t)


def prefix_targets(targets: torch.Tensor, segment_len: int, prefix_len: torch.Tensor) -> torch.Tensor:
    """``targets`` [B, T] with those a prefix already shows set to the ignore index: position i of a sentence
    predicts its token i + 1, which its prefix lets it see while i + 1 < prefix_len."""
    t = targets.shape[1]
    pos = torch.arange(t, device=targets.device) % segment_len  # position inside its sentence
    sentence = torch.arange(t, device=targets.device) // segment_len
    limit = prefix_len.to(targets.device)[:, sentence]  # [B, T]: the prefix length of each position's sentence
    return targets.masked_fill(pos[None, :] + 1 < limit, IGNORE_INDEX)


def segment_attention_as_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_len: int) -> torch.Tensor:
    """The blocks become batch rows, so any causal attention kernel serves.

    A short last block is padded at its end; padded keys sit after every real query of that
    block, so the causal mask hides them.
    """
    b, t = q.shape[0], q.shape[2]
    q, k, v = (_sentence_rows(z, segment_len) for z in (q, k, v))
    return _packed_rows(flash_attention(q, k, v, causal=True), b, t)


def _sentence_rows(z: torch.Tensor, segment_len: int) -> torch.Tensor:
    """``[B, H, T, Dh]`` -> ``[B * S, H, L, Dh]``: each block of ``segment_len`` tokens its own row, a short last
    block padded at its end."""
    pad = -z.shape[2] % segment_len
    return rearrange(F.pad(z, (0, 0, 0, pad)) if pad else z, "b h (s l) d -> (b s) h l d", l=segment_len)


def _packed_rows(y: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """``_sentence_rows`` undone: ``[B * S, H, L, Dh]`` -> ``[B, H, T, Dh]``, the padding dropped."""
    return rearrange(y, "(b s) h l d -> b h (s l) d", b=b)[:, :, :t]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + Dh/2) of x [..., T, Dh] by position-dependent angles; cos, sin [T, Dh/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys/values [B, H, max_len, Dh] per layer; ``length`` positions are filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: LVMConfig, batch: int, max_len: int, like: torch.Tensor) -> "KVCache":
        shape = (batch, config.n_head, max_len, config.head_dim)
        make = lambda: [like.new_empty(shape) for _ in range(config.n_layer)]  # noqa: E731
        return cls(keys=make(), values=make())

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, t, Dh] after the filled positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k (ties at the k-th value kept) and outside the nucleus.

    The nucleus is the smallest set of most-probable tokens whose probability mass reaches
    ``top_p``. ``logits`` is [..., V]; a new tensor is returned.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable).")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable).")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more probable tokens
        drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] -> [B, 1]; temperature 0 takes the argmax."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy).")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
