"""Our kernels as torch custom ops: torch.compile traces the LVM through them as opaque nodes, no graph breaks.

Under the CPU interpreter the Triton launches run inside the ops' eager implementations; dynamo and
AOTAutograd only see the ops' schemas and fake (shape) functions, so the same graphs compile here and
on a GPU.
"""
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import kernels  # noqa: F401  (registers the lvm:: ops)
import kernels.dispatch as dispatch
from kernels.attention import segment_bounds
from lvm.config import LVMConfig
from lvm.model import LVM

V = 50
pytestmark = pytest.mark.skipif(not dispatch.triton_usable(torch.device("cpu")),
                                reason="needs Triton under TRITON_INTERPRET=1 on CPU")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_opcheck_flash_attention_ops():
    """Schema, fake (meta) shapes and autograd registration agree with what the ops really do."""
    q, k, v = (torch.randn(2, 2, 20, 16, generator=_g(i)) for i in range(3))
    seg_start, seg_end = segment_bounds(torch.tensor([[0] * 7 + [1] * 13, [4] * 20]))
    for seg in [(None, None), (seg_start, seg_end)]:
        args = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(), *seg, True, 0.25)
        torch.library.opcheck(torch.ops.lvm.flash_attn_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_linear_cross_entropy_op(reduction):
    h = torch.randn(12, 16, generator=_g(1), requires_grad=True)
    w = torch.randn(30, 16, generator=_g(2), requires_grad=True)
    t = torch.randint(0, 30, (12,), generator=_g(3))
    for use_triton in (False, True):
        args = (h, w, None, t, -100, reduction, 0.0, 0.0, 5, use_triton, True)
        torch.library.opcheck(torch.ops.lvm.linear_ce_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


class _GraphCounter:
    """A torch.compile backend that counts forward/backward graphs and the lvm:: ops inside them."""

    def __init__(self) -> None:
        self.graphs = {"fw": [], "bw": []}
        self.backend = aot_autograd(fw_compiler=self._compiler("fw"), bw_compiler=self._compiler("bw"))

    def _compiler(self, kind: str):
        def compile_graph(gm: torch.fx.GraphModule, example_inputs):
            ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("lvm.")]
            self.graphs[kind].append(ops)
            return make_boxed_func(gm.forward)
        return compile_graph


def _tiny_and_batch():
    torch.manual_seed(0)
    model = LVM(LVMConfig.preset("tiny", vocab_size=V))
    ids = torch.randint(0, V, (2, 24), generator=_g(5))
    targets = torch.randint(0, V, (2, 24), generator=_g(6))
    return model, ids, targets


def _loss_and_grads(model, ids, targets, segment_len):
    loss = model(ids, targets, segment_len=segment_len).loss
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("segment_len", [None, 10])
def test_compiled_tiny_lvm_runs_our_kernels_without_graph_breaks(segment_len, monkeypatch):
    monkeypatch.setenv("LVM_KERNELS", "triton")
    torch._dynamo.reset()
    counters.clear()
    model, ids, targets = _tiny_and_batch()
    counter = _GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, ids, targets, segment_len)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    n_layer = model.config.n_layer
    # one graph each way, holding every attention call and the fused loss as our ops
    assert len(counter.graphs["fw"]) == 1 and len(counter.graphs["bw"]) == 1, counter.graphs
    fw, bw = counter.graphs["fw"][0], counter.graphs["bw"][0]
    assert fw.count("lvm.flash_attn_fwd.default") == n_layer and fw.count("lvm.linear_ce_fwd.default") == 1, fw
    assert bw.count("lvm.flash_attn_bwd.default") == n_layer, bw

    eager_loss, eager_grads = _loss_and_grads(model, ids, targets, segment_len)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_tiny_lvm_matches_eager(monkeypatch):
    """The real compiler (Inductor, C++ codegen on CPU) around our ops: same loss and gradients as eager."""
    monkeypatch.setenv("LVM_KERNELS", "triton")
    torch._dynamo.reset()
    counters.clear()
    model, ids, targets = _tiny_and_batch()
    loss, grads = _loss_and_grads(torch.compile(model, fullgraph=True), ids, targets, 8)
    assert sum(counters["graph_break"].values()) == 0
    eager_loss, eager_grads = _loss_and_grads(model, ids, targets, 8)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_torch_path_loss_compiles_without_graph_breaks(monkeypatch):
    """The chunked torch CE is the same custom op, so its host sync no longer splits the compiled graph."""
    monkeypatch.setenv("LVM_KERNELS", "torch")
    torch._dynamo.reset()
    counters.clear()
    model, ids, targets = _tiny_and_batch()
    counter = _GraphCounter()
    loss, _ = _loss_and_grads(torch.compile(model, backend=counter.backend, fullgraph=True), ids, targets, 8)
    assert sum(counters["graph_break"].values()) == 0
    assert counter.graphs["fw"][0].count("lvm.linear_ce_fwd.default") == 1
    torch.testing.assert_close(loss, _loss_and_grads(model, ids, targets, 8)[0], atol=1e-6, rtol=1e-6)
