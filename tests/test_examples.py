"""The examples run end to end in their reduced (--quick) form and print a comparison."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "name, metric, lo, hi",
    [
        ("classification", "accuracy", 0.0, 1.0),
        ("regression", "test_mse", 0.0, 1.5),  # in target variances
        ("autoencoder", "test_mse", 0.0, 0.2),
    ],
)
def test_example_quick(name, metric, lo, hi, capsys):
    pytest.importorskip("sklearn")
    results = _load(name).main(["--quick"])
    out = capsys.readouterr().out
    assert set(results) == {"plain", "t1"}
    assert "plain" in out and "t1" in out
    for run in results.values():
        assert all(math.isfinite(v) for v in run.values())
        assert lo <= run[metric] <= hi
    if name == "classification":  # 5 epochs without the regulariser beat chance (0.1) by far
        assert results["plain"]["accuracy"] > 0.5
    # the regulariser changed training (same seed and batches otherwise)
    assert results["plain"][metric] != results["t1"][metric]
