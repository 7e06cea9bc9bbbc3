"""The supervised CNN baseline: it learns, it does not memorise its way to a fake score, it selects on
validation only, and it shows up in the probe report beside the LVM."""
import copy
import json

import pytest
import torch

import lvm.supervised as sup
from lvm.probe import ProbeConfig, _subset, run_probe
from lvm.supervised import SmallCNN, SupervisedConfig, evaluate, fit_supervised, stratified_split, supervised_efficiency


def bands(n: int, seed: int, classes: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 1, size, size] noise whose class is which horizontal band is brighter (flip-invariant)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 100, (n, 1, size, size), generator=g)
    rows = size // classes
    for c in range(classes):
        x[y == c, :, rows * c : rows * (c + 1)] += 80
    return x.to(torch.uint8), y


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions on a shared 2-core CPU: a second thread mostly waits at barriers (toy fit 28 s
    with 2 threads vs 1.3 s with 1 under load 3.5), so these tests run on one and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QUICK = dict(batch_size=32, device="cpu", precision="fp32")
NARROW = dict(widths=(16, 32, 64), **QUICK)  # 4x cheaper where the test is about training, not capacity


def test_learns_a_toy_task():
    x, y = bands(200, seed=0)
    x_test, y_test = bands(320, seed=1)  # fresh noise: held-out images
    model, val = fit_supervised(x, y, SupervisedConfig(epochs=20, max_steps=25, **QUICK))
    assert evaluate(model, x_test, y_test)[0] >= 0.9
    assert val is not None and val >= 0.9


def test_shuffled_labels_stay_at_chance_while_training_labels_are_memorised():
    """With labels independent of the images, no honest score can beat chance (0.25): held-out test
    accuracy is Binomial(320, 1/4) / 320 (sd 0.024), so > 0.35 is a 4 sd event (p = 3e-5); the reported
    validation accuracy is the best of 4 passes over 40 images (sd 0.068 each), so > 0.45 has p < 1 %
    even for the maximum (0.17 % per pass, union bound). The CNN memorises its training rows meanwhile
    (checked at each pass), so a validation split overlapping them would score far above 0.45."""
    x, y = bands(160, seed=0)
    x_test, y_test = bands(320, seed=1)
    g = torch.Generator().manual_seed(2)
    y, y_test = y[torch.randperm(len(y), generator=g)], y_test[torch.randperm(len(y_test), generator=g)]
    cfg = SupervisedConfig(epochs=100, max_steps=60, lr=3e-3, weight_decay=0.0, label_smoothing=0.0,
                           val_fraction=0.25, evals=4, patience=0, flip=False, pad=0, **NARROW)
    train_rows, _ = stratified_split(y, cfg.val_fraction, cfg.seed)
    train_acc = []
    model, val = fit_supervised(x, y, cfg, on_eval=lambda step, acc, loss, m: train_acc.append(
        evaluate(m, x[train_rows], y[train_rows])[0]))
    assert max(train_acc) > 0.9  # capacity: it memorised the random labels of its training rows
    assert val <= 0.45
    assert evaluate(model, x_test, y_test)[0] <= 0.35


def test_stratified_split_holds_out_every_class():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 1 + [3] * 30)
    tr, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(torch.cat([tr, val]).tolist()) == list(range(len(labels)))  # a partition
    assert torch.bincount(labels[val], minlength=4).tolist() == [1, 1, 0, 3]  # >= 1 each, a lone image trains
    assert set(labels[tr].tolist()) == {0, 1, 2, 3}


def test_early_stopping_returns_the_best_validation_weights():
    """Each validation pass is recorded with a copy of the weights; the returned model must be the
    best pass (accuracy, then loss), and training stops after ``patience`` passes without one."""
    x, y = bands(160, seed=0)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]  # noisy validation: the best is early
    passes = []
    cfg = SupervisedConfig(epochs=100, max_steps=40, evals=10, patience=2, flip=False, pad=0, val_fraction=0.25,
                           **NARROW)
    model, val = fit_supervised(x, y, cfg, on_eval=lambda step, acc, loss, m: passes.append(
        (step, acc, loss, copy.deepcopy(m.state_dict()))))
    best = max(range(len(passes)), key=lambda i: (passes[i][1], -passes[i][2]))
    assert best < len(passes) - 1, "precondition: the best pass is not the last one"
    assert len(passes) == best + 1 + cfg.patience < cfg.evals  # stopped early, patience passes after the best
    assert val == passes[best][1]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, passes[best][3][name]), name
    _, val_rows = stratified_split(y, cfg.val_fraction, cfg.seed)
    assert evaluate(model, x[val_rows], y[val_rows])[0] == pytest.approx(passes[best][1])


class Tripwire(torch.Tensor):
    """A tensor that raises on any use while ``armed``: stands in for test images."""

    armed = True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.armed:
            raise AssertionError(f"test images read during training ({func})")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_test_images_are_read_only_after_each_fit(monkeypatch):
    """Model selection (validation, early stopping, normalisation statistics) never touches test images."""
    x, y = bands(160, seed=0)
    x_test, y_test = bands(80, seed=1)
    guarded = x_test.as_subclass(Tripwire)
    fits = []

    def fit_then_disarm(*args, **kwargs):
        Tripwire.armed = True  # a fit reading the test images raises
        out = fit_supervised(*args, **kwargs)
        Tripwire.armed = False  # the final evaluation may read them
        fits.append(args[0])
        return out

    monkeypatch.setattr(sup, "fit_supervised", fit_then_disarm)
    cfg = ProbeConfig(fractions=[0.5, 1.0], seeds=2, finetune_epochs=3, finetune_max_steps=8, precision="fp32")
    try:
        rows = supervised_efficiency(x, y.numpy(), guarded, y_test.numpy(), cfg)
    finally:
        Tripwire.armed = True
    subsets = [_subset(y.numpy(), f, cfg.seed + s) for f, s in ((0.5, 0), (0.5, 1), (1.0, 0))]
    assert len(fits) == 3 and all(torch.equal(a, x[b]) for a, b in zip(fits, subsets))  # the probes' subsets
    assert [r["fraction"] for r in rows] == [0.5, 1.0] and [r["runs"] for r in rows] == [2, 1]
    assert all(0.0 <= r["acc_mean"] <= 1.0 for r in rows)  # and the test images were read for the score


@pytest.mark.parametrize("size,channels", [(16, 1), (28, 1), (64, 3), (256, 3)])
def test_any_size_and_channels(size, channels):
    model = SmallCNN(channels, 5, size)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000
    out = model(torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_probe_reports_the_supervised_baseline(tiny_pipeline, tmp_path):
    cfg = ProbeConfig(checkpoint=tiny_pipeline["lvm"], source=tiny_pipeline["npz"], fractions=[0.25, 1.0], seeds=1,
                      layers=[1], random_init=False, supervised=True, finetune_max_steps=6, out=str(tmp_path))
    summary = run_probe(cfg)
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["rows"] == summary["rows"]
    mine = [r for r in saved["rows"] if r["method"] == "supervised"]
    assert [r["fraction"] for r in mine] == [0.25, 1.0] and {r["features"] for r in mine} == {"supervised CNN"}
    pixels = [r for r in saved["rows"] if r["features"] == "raw pixels"]
    assert [r["n_labels"] for r in mine] == [r["n_labels"] for r in pixels]  # the same label subsets
    assert saved["seconds_by_stage"]["supervised CNN"] >= 0
    table = (tmp_path / "probe.md").read_text()
    line = next(ln for ln in table.splitlines() if ln.startswith("| supervised CNN | supervised |"))
    assert len([c for c in line.split("|")[3:-1] if c.strip()]) == 2  # a figure at every fraction
    assert (tmp_path / "label_efficiency.png").stat().st_size > 0
