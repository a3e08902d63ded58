"""The report: tables from a hand-made database, degenerate sweeps reported not raised."""

from __future__ import annotations

import numpy as np

from topodecorr.experiments.config import parse_sweep
from topodecorr.experiments.report import markdown_table, write_report
from topodecorr.experiments.store import ResultStore
from topodecorr.experiments.sweep import DB_NAME


def _fill(folder, seeds, accs):
    cfg = parse_sweep({"name": "hand", "dataset": "digits", "networks": ["mlp"], "penalties": ["none", "t1", "l2"],
                       "weights": [0.1, 1.0], "seeds": seeds})
    store = ResultStore(folder / DB_NAME)
    store.init_sweep(cfg, [(k, {}) for k in cfg.grid()], {"torch": "9.9"})
    rng = np.random.default_rng(0)
    while (row := store.claim()) is not None:
        acc = accs[row["penalty"]] + (0.01 if row["weight"] == 1.0 else 0.0)
        status = "diverged" if (row["penalty"] == "l2" and row["weight"] == 1.0) else "done"
        store.finish(row["id"], {
            "status": status, "val_acc": acc if status == "done" else None, "test_acc": acc if status == "done" else None,
            "val_loss": 1 - acc, "epochs": 2, "best_epoch": 1, "epoch_s": 0.1, "wall_s": 0.2, "versions": {},
            "history": [{"epoch": 0, "val_acc": acc - 0.1, "train_loss": 1.0, "mean_death": 0.3},
                        {"epoch": 1, "val_acc": acc, "train_loss": 0.5, "mean_death": 0.4}],
            "deaths": rng.uniform(0, 1, 30) if status == "done" else None,
            "correlation": np.corrcoef(rng.normal(size=(8, 20))) if status == "done" else None,
            "error": "non-finite loss at epoch 1" if status == "diverged" else None,
        })
    store.close()


def test_report_tables_from_known_results(tmp_path):
    _fill(tmp_path, [0, 1, 2], {"none": 0.80, "t1": 0.90, "l2": 0.85})
    path, printed = write_report(tmp_path)
    text = path.read_text()
    # weight chosen by validation accuracy: 1.0 for t1 (+0.01), 0.1 for l2 (1.0 diverged); none has weight 0
    assert "| mlp | 0.8000 ± 0.0000 | 0.9100 ± 0.0000 | 0.8500 ± 0.0000 |" in text
    assert "| **average rank** | 3.00 | 1.00 | 2.00 |" in text
    assert "| mlp/0 | 0.8000 (0) | 0.9100 (1) | 0.8500 (0.1) |" in text
    assert "Friedman test over N=3 blocks and k=3 penalties: chi2=6.000" in text
    assert "diverged" in text and "non-finite loss at epoch 1" in text
    assert (tmp_path / "figures" / "cd_diagram.svg").exists()
    assert "| network | none | t1 | l2 |" in printed


def test_degenerate_sweep_is_reported(tmp_path):
    _fill(tmp_path, [0], {"none": 0.8, "t1": 0.9, "l2": 0.85})
    path, printed = write_report(tmp_path)
    text = path.read_text()
    assert "Friedman test not computed" in text and "at least 3 complete blocks" in text
    assert not (tmp_path / "figures" / "cd_diagram.png").exists()
    assert (tmp_path / "figures" / "death_histograms.png").exists()


def test_markdown_table_formats_missing_values():
    assert markdown_table(["a"], [[None], [float("nan")], [0.5]]).splitlines()[2:] == ["| – |", "| – |", "| 0.5000 |"]
