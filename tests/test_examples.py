"""The example scripts run in their reduced (--quick) form and produce sensible numbers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models: one torch thread (thread teams only stall on a loaded shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_classification_quick(capsys):
    res = _load("classification").main(["--quick"])
    assert set(res) == {"plain", "t1"}
    for r in res.values():
        assert r["accuracy"] > 0.5  # 10 classes: chance is 0.1
    # T1 raises the deaths of the network's neurons
    assert res["t1"]["mean_death"] > res["plain"]["mean_death"]
    assert res["t1"]["last_stats"].neurons == 128 + 64 + 10
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_regression_quick():
    res = _load("regression").main(["--quick"])
    for r in res.values():
        assert math.isfinite(r["mse"]) and r["mse"] < 2.0
    assert res["plain"]["last_stats"].neurons == 64 + 32 + 1


@pytest.mark.slow
def test_autoencoder_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "samples.png"
    res = _load("autoencoder").main(["--quick", "--samples", str(out)])
    for r in res.values():
        assert 0 < r["mse"] < 0.2
    assert res["t1"]["last_stats"].neurons == 12  # the code layer only
    assert res["t1"]["mean_death"] > res["plain"]["mean_death"]
    assert out.stat().st_size > 1000


@pytest.mark.slow
def test_resnet_cifar10_quick_synthetic(capsys):
    pytest.importorskip("torchvision", reason="the ResNet example needs torchvision")
    res = _load("resnet_cifar10").main(["--quick", "--synthetic"])
    assert set(res) == {"plain", "t1"}
    for r in res.values():
        assert math.isfinite(r["loss"]) and r["steps"] == 8 and r["step_ms"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0
    s = res["t1"]["last_stats"]
    # every ReLU call of resnet18 is a cloud over its channels: the stem, then 2 per BasicBlock
    assert s.clouds == (64,) * 5 + (128,) * 4 + (256,) * 4 + (512,) * 4
    assert res["plain"]["last_stats"] is None  # the plain run has no regulariser attached
    out = capsys.readouterr().out
    assert "train loss" in out and "17 clouds, 3904 channels" in out


def test_resnet_cifar10_reads_a_local_copy(tmp_path):
    """Without --synthetic the example reads CIFAR-10 batches through the project's loader."""
    pytest.importorskip("torchvision", reason="the ResNet example needs torchvision")
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=4))
    mod = _load("resnet_cifar10")
    args = mod.argparse.Namespace(synthetic=False, data_dir=str(tmp_path), train_size=30, test_size=7)
    (Xtr, ytr), (Xte, yte) = mod.load_data(args)
    assert Xtr.shape == (30, 3, 32, 32) and Xte.shape == (7, 3, 32, 32)
    assert float(Xtr.min()) >= 0.0 and float(Xtr.max()) <= 1.0 and ytr.dtype == torch.int64
    from topodecorr.experiments.data import DataError

    with pytest.raises(DataError):
        mod.load_data(mod.argparse.Namespace(synthetic=False, data_dir=str(tmp_path / "none"),
                                             train_size=30, test_size=7))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--max-samples", "64"]], ids=["all-rows", "64-rows"])
def test_char_transformer_quick(capsys, extra):
    res = _load("char_transformer").main(["--quick", *extra])
    for r in res.values():
        # ~100 distinct characters: a uniform guess costs ~4.6 nats; 40 steps learn letter frequencies
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < 3.5
    s = res["t1"]["last_stats"]
    assert s.clouds == (256, 256)  # layers="auto": one cloud per block over its 4*d FFN units
    # T1 raises the deaths of every block's FFN units on held-out text
    assert all(t > p for t, p in zip(res["t1"]["mean_death"], res["plain"]["mean_death"]))
    assert "val loss" in capsys.readouterr().out
