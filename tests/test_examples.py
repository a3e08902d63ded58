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
