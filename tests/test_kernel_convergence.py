"""Convergence through the real kernels (Liger-Kernel's habit): train the tiny LVM on the Triton path
(CPU interpreter) and on the torch path from the same seed and data; the runs must stay together.

Why these tolerances. Both runs are fp32 and compute the same functions; they differ only in
summation order (online softmax over key tiles vs SDPA, a Triton row softmax vs log_softmax), about
1e-7 relative per op. Per-step losses (~2-4 nats) agree to ~2e-6 (measured), so LOSS_ATOL = 1e-5.
Weights: the typical element differs by ~1e-7 (measured median), but AdamW divides each update by
the gradient's RMS, so an element whose gradient is at rounding level moves by up to ~lr either
way, whatever its size. Such elements are rare (measured < 0.2 %, at most 1.8e-4 apart with
lr = 1e-2), so we bound the 99th percentile of |dW| per tensor by 1e-5 and the maximum by lr / 10.
The test also checks that these bounds see a real fault: the same run with attention leaking
across sentences (segment_len ignored) breaks every bound by orders of magnitude.
"""
import pytest
import torch

import kernels.dispatch as dispatch
from lvm.config import LVMConfig
from lvm.model import LVM

V, SEG, STEPS = 64, 10, 8
LR = 1e-2
LOSS_ATOL = 1e-5
WEIGHT_Q99_ATOL = 1e-5  # 99th percentile of |dW| per tensor
WEIGHT_MAX_ATOL = LR / 10

pytestmark = pytest.mark.skipif(not dispatch.triton_usable(torch.device("cpu")),
                                reason="needs Triton under TRITON_INTERPRET=1 on CPU")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 10-token sentences whose second half copies the first: attention inside a sentence pays."""
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, V, (2, 3, SEG // 2), generator=g)  # [B, sentences, L/2]
    rows = torch.cat([half, half], dim=-1).reshape(2, -1)  # [B, 30]: inputs [B, 29], the last sentence cut short
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _train(backend: str, segment_len: int | None, monkeypatch) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS AdamW steps on one fixed batch; returns per-step losses and the final weights."""
    monkeypatch.setenv("LVM_KERNELS", backend)
    torch.manual_seed(0)
    model = LVM(LVMConfig.preset("tiny", vocab_size=V))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    ids, targets = _batch()
    losses = []
    for _ in range(STEPS):
        loss = model(ids, targets, segment_len=segment_len).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _weight_gaps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest per-tensor 99th percentile, largest element) of |a - b| over all weights."""
    diffs = [(a[k] - b[k]).abs().flatten() for k in a]
    return max(d.quantile(0.99).item() for d in diffs), max(d.max().item() for d in diffs)


@pytest.mark.parametrize("segment_len", [SEG, pytest.param(None, marks=pytest.mark.slow)])
def test_triton_and_torch_paths_train_alike(segment_len, monkeypatch):
    triton_losses, triton_weights = _train("triton", segment_len, monkeypatch)
    torch_losses, torch_weights = _train("torch", segment_len, monkeypatch)
    assert triton_losses[-1] < triton_losses[0] - 1.0, triton_losses  # the run really trains
    for step, (a, b) in enumerate(zip(triton_losses, torch_losses)):
        assert abs(a - b) <= LOSS_ATOL, f"step {step}: triton {a:.6f} vs torch {b:.6f}"
    q99, worst = _weight_gaps(triton_weights, torch_weights)
    assert q99 <= WEIGHT_Q99_ATOL and worst <= WEIGHT_MAX_ATOL, (q99, worst)
    if segment_len is not None:  # the bounds can see a real fault: attention leaking across sentences
        leak_losses, leak_weights = _train("torch", None, monkeypatch)
        assert max(abs(a - b) for a, b in zip(leak_losses, triton_losses)) > 100 * LOSS_ATOL
        q99, worst = _weight_gaps(leak_weights, triton_weights)
        assert q99 > 100 * WEIGHT_Q99_ATOL and worst > WEIGHT_MAX_ATOL, (q99, worst)
