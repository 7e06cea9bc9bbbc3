"""The tile sweep (bench.kernel_tiles) on CPU: it must catch a broken candidate, and its files must say
which row is the default, before a GPU lease is spent on it."""
import json

import pytest
import torch

import bench.kernel_tiles as kt
from kernels.dispatch import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter on CPU)")


@pytest.fixture
def cpu_sweep(monkeypatch):
    monkeypatch.setattr(kt, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(kt, "DTYPE", torch.float32)
    monkeypatch.setattr(kt, "REPS", 1)
    monkeypatch.setattr(kt, "WARMUP", 0)


def test_a_tile_that_breaks_the_kernel_is_marked_wrong_and_never_wins(cpu_sweep):
    # block_m < block_n breaks the forward and dQ kernels' causal split (they need block_m % block_n == 0)
    broken = (16, 32, 4, 2)
    rows, winners = kt.sweep_attention(1, 2, 64, 16, {"_fwd_tiles": [broken], "_dkdv_tiles": [], "_dq_tiles": [broken]})
    bad = [r for r in rows if r.knobs == "m16 n32 w4 s2" and r.kernel in ("attention fwd", "attention dQ")]
    assert len(bad) == 2 and all(r.status.startswith("wrong") for r in bad), [(r.kernel, r.status) for r in bad]
    assert winners["_fwd_tiles"] != broken and winners["_dq_tiles"] != broken
    defaults = [r for r in rows if r.default and r.kernel.startswith("attention ") and "fwd+bwd" not in r.kernel]
    assert len(defaults) == 3 and all(r.status == "ok" and r.max_err < 1e-4 for r in defaults)


def test_dry_run_writes_both_files_with_the_default_rows(tmp_path):
    result = kt.main(["--dry-run", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "tiles-cpu-cpu-dry-run.json").read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    kernels = {r["kernel"] for r in data["rows"] if r["default"]}
    assert {"attention fwd", "attention dK/dV", "attention dQ", "CE fwd+bwd, ours"} <= kernels
    md = (tmp_path / "tiles-cpu-cpu-dry-run.md").read_text()
    assert md.count("(default)") == 4 and "| attention fwd+bwd, winners |" in md


def test_a_candidate_with_a_nan_error_is_wrong_too():
    """A broken tile can leave memory unwritten: its error is then NaN, which no comparison with a bound catches."""
    rows = [kt.Row("k", "s", "default", ms=1.0, max_err=1e-3, default=True),
            kt.Row("k", "s", "nan", ms=0.5, max_err=float("nan")), kt.Row("k", "s", "good", ms=0.8, max_err=2e-3)]
    kt._judge(rows)
    assert [r.status.split(":")[0] for r in rows] == ["ok", "wrong", "ok"]
