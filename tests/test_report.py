"""The report: tables from hand-made databases (the store API, no training), warnings, reproducibility,
the combined report of several sweeps, layer boundaries of the heat maps."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from topodecorr.experiments.cli import main
from topodecorr.experiments.config import parse_sweep
from topodecorr.experiments.report import (
    SweepData,
    _layer_layout,
    markdown_table,
    run_warnings,
    write_combined_report,
    write_report,
)
from topodecorr.experiments.store import DB_NAME, ResultStore, StoreError

NETS = ["mlp", "mlp-dropout", "mlp-deep"]


def _fill(folder, seeds, accs, networks=("mlp",), dataset="digits", name="hand", max_epochs=None, classes=10,
          override=None):
    """A finished sweep: test accuracy accs[penalty] (+0.01 at weight 1.0, + 0.001 * seed), l2 at 1.0 diverged.

    ``override[(network, penalty, weight, seed)]`` replaces a run's result fields.
    """
    raw = {"name": name, "dataset": dataset, "networks": list(networks), "penalties": list(accs),
           "weights": [0.1, 1.0], "seeds": seeds}
    if max_epochs is not None:
        raw["train"] = {"max_epochs": max_epochs}
    cfg = parse_sweep(raw)
    store = ResultStore(folder / DB_NAME)
    store.init_sweep(cfg, [(k, {"train": {"max_epochs": max_epochs}} if max_epochs else {}) for k in cfg.grid()],
                     {"torch": "9.9"})
    if classes:
        store.set_meta("data", json.dumps({"source": "hand", "sizes": {}, "input_shape": [64], "num_classes": classes}))
    rng = np.random.default_rng(0)
    while (row := store.claim()) is not None:
        acc = accs[row["penalty"]] + (0.01 if row["weight"] == 1.0 else 0.0) + 0.001 * row["seed"]
        status = "diverged" if (row["penalty"] == "l2" and row["weight"] == 1.0) else "done"
        result = {
            "status": status, "val_acc": acc if status == "done" else None, "test_acc": acc if status == "done" else None,
            "val_loss": 1 - acc, "epochs": 2, "best_epoch": 1, "epoch_s": 0.1, "wall_s": 0.2, "versions": {},
            "history": [{"epoch": 0, "val_acc": acc - 0.1, "train_loss": 1.0, "mean_death": 0.3},
                        {"epoch": 1, "val_acc": acc, "train_loss": 0.5, "mean_death": 0.4}],
            "deaths": np.r_[rng.uniform(0, 1, 30), [1.0, 1.0, 0.0]] if status == "done" else None,
            "correlation": np.corrcoef(rng.normal(size=(8, 20))) if status == "done" else None,
            "error": "non-finite loss at epoch 1" if status == "diverged" else None,
        }
        result.update((override or {}).get((row["network"], row["penalty"], row["weight"], row["seed"]), {}))
        store.finish(row["id"], result)
    store.close()


ACCS = {"none": 0.80, "t1": 0.90, "l2": 0.85}


@pytest.mark.slow  # several reports with figures
def test_report_tables_from_known_results(tmp_path):
    _fill(tmp_path, [0, 1, 2], ACCS, networks=NETS)
    path, printed = write_report(tmp_path)
    text = path.read_text()
    # weight chosen per seed by validation accuracy: 1.0 for t1 (+0.01), 0.1 for l2 (1.0 diverged), none 0;
    # test accuracy + 0.001 * seed: seed means 0.801, 0.911, 0.851, std 0.001
    assert "| mlp | 0.8010 ± 0.0010 | 0.9110 ± 0.0010 | 0.8510 ± 0.0010 |" in text
    assert "| **average rank** | 3.00 | 1.00 | 2.00 |" in text
    assert "| mlp/2 | 0.8020 (0) | 0.9120 (1) | 0.8520 (0.1) |" in text
    # blocks are the 3 networks (not 9 network/seed pairs): chi2 = 12 N / (k (k+1)) * (1 + 4 + 9 - 12) = 6
    assert "Friedman test over N=3 blocks and k=3 penalties: chi2=6.000" in text
    assert "(3 seeds per block)" in text
    # the difference to none: paired by seed the gain is exactly 0.11 (t1) and 0.05 (l2), so is the interval
    assert "| t1 | +0.1100 | [+0.1100, +0.1100] | 3 | 9 |" in text
    assert "| l2 | +0.0500 | [+0.0500, +0.0500] | 3 | 9 |" in text
    assert "| mlp-deep | +0.1100 [+0.1100, +0.1100] | +0.0500 [+0.0500, +0.0500] |" in text
    assert (tmp_path / "figures" / "cd_diagram.svg").exists()
    assert "| network | none | t1 | l2 |" in printed
    # deaths: 33 per run, 2 dead (1.0) and 1 duplicate (0.0)
    assert "| none | 0.0000 |" in text and "6.1% |" in text and "3.0% |" in text and "duplicate neurons" in text
    assert "median s per epoch" in text and "median epoch s" not in text


@pytest.mark.slow
def test_degenerate_sweep_is_reported(tmp_path):
    _fill(tmp_path, [0], ACCS)
    path, printed = write_report(tmp_path)
    text = path.read_text()
    assert "Friedman test not computed" in text and "at least 3 complete blocks" in text
    assert "| t1 | +0.1100 | – | 1 | 1 |" in text  # one seed: a difference, no interval
    assert not (tmp_path / "figures" / "cd_diagram.png").exists()
    assert (tmp_path / "figures" / "death_histograms.png").exists()


@pytest.mark.slow
def test_warnings_flag_capped_chance_and_diverged_runs(tmp_path):
    override = {
        ("mlp", "t1", 0.1, 0): {"epochs": 5, "best_epoch": 4},  # at the cap, still improving
        ("mlp", "t1", 1.0, 1): {"epochs": 5, "best_epoch": 2},  # at the cap
        ("mlp", "none", 0.0, 0): {"test_acc": 0.12, "val_acc": 0.11},  # chance 0.1: 0.12 <= 0.15
        ("mlp", "none", 0.0, 1): {"test_acc": 0.16, "val_acc": 0.16},  # above 1.5 x chance
        ("mlp", "l2", 0.1, 1): {"status": "failed", "error": "RuntimeError: out of memory\ntraceback"},
    }
    _fill(tmp_path, [0, 1, 2], ACCS, max_epochs=5, override=override)
    text = write_report(tmp_path)[0].read_text()
    warnings = text.split("## Warnings")[1].split("## Test accuracy")[0]
    assert "| penalty | finished runs | at epoch cap | near chance | diverged | failed |" in warnings
    assert "| none | 3 | 0 | 1 | 0 | 0 |" in warnings
    assert "| t1 | 6 | 2 | 0 | 0 | 0 |" in warnings
    assert "| l2 | 6 | 0 | 0 | 3 | 1 |" in warnings
    assert "(2 of 15 finished runs; cap 5 epochs)" in warnings and "1 of them had their best validation loss" in warnings
    assert "| mlp | none | 0 | 0 | 0.1200 | yes |" in warnings  # none has one weight: it is the chosen run
    assert "0.1600" not in warnings
    assert "| mlp | l2 | 0.1 | 1 | failed | RuntimeError: out of memory |" in warnings
    assert "| mlp | l2 | 1 | 2 | diverged | non-finite loss at epoch 1 |" in warnings
    sweep = SweepData.load(tmp_path)
    flags = {(f["penalty"], f["weight"], f["seed"]): f for f in run_warnings(sweep)}
    sweep.close()
    assert flags[("t1", 1.0, 1)]["capped"] and flags[("t1", 1.0, 1)]["chosen"]  # t1's best weight is 1.0
    assert not flags[("t1", 0.1, 1)]["chosen"] and not flags[("t1", 0.1, 1)]["capped"]


@pytest.mark.slow  # several reports with figures
def test_no_warning_and_unknown_classes_are_said(tmp_path):
    _fill(tmp_path / "a", [0], {"none": 0.8, "t1": 0.9}, classes=None)
    text = write_report(tmp_path / "a")[0].read_text()
    assert "Near-chance check skipped for hand: the database does not store the number of classes" in text
    assert "No run hit the epoch cap, diverged or failed." in text
    _fill(tmp_path / "b", [0], {"none": 0.8, "t1": 0.9})
    text = write_report(tmp_path / "b")[0].read_text()
    assert "No run hit the epoch cap, ended near chance, diverged or failed." in text


def _snapshot(folder):
    files = [folder / "report.md", *sorted((folder / "figures").iterdir())]
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.mark.slow  # several reports with figures
def test_report_is_a_pure_function_of_the_database(tmp_path):
    src = tmp_path / "sweep"
    _fill(src, [0, 1, 2], ACCS, networks=NETS, max_epochs=2,
          override={("mlp", "t1", 0.1, 0): {"test_acc": 0.1}})
    write_report(src)
    first = _snapshot(src)
    assert {"report.md", "figures/cd_diagram.svg", "figures/cd_diagram.png", "figures/death_histograms.png",
            "figures/correlations.png", "figures/training_curves.png"} <= set(first)
    assert "## Warnings" in first["report.md"].decode() and "Near chance" in first["report.md"].decode()
    write_report(src)  # again, in place
    assert _snapshot(src) == first
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(src / DB_NAME, copy / DB_NAME)  # the database alone
    assert main(["report", str(copy)]) == 0
    assert _snapshot(copy) == first  # report and figures, byte for byte


@pytest.mark.slow  # several reports with figures
def test_combined_report_pools_sweeps_into_one_comparison(tmp_path, capsys):
    _fill(tmp_path / "d", [0, 1], ACCS, networks=["mlp", "mlp-deep"], dataset="digits", name="d")
    # the second sweep lacks l2 entirely and has the same network label on another dataset
    _fill(tmp_path / "m", [0, 1], {"none": 0.70, "t1": 0.65, "decov": 0.72}, networks=["mlp"], dataset="mnist1d",
          name="m")
    out = tmp_path / "combined"
    path, printed = write_combined_report([tmp_path / "d", tmp_path / "m"], out)
    text = path.read_text()
    assert path == out / "report.md"
    assert "| dataset/network | none | t1 |" in text
    assert "| digits/mlp | 0.8005 ± 0.0007 | 0.9105 ± 0.0007 |" in text and "| mnist1d/mlp |" in text
    assert "Friedman test over N=3 blocks and k=2 penalties" not in text  # k=2: not computed, said so
    assert "the Friedman test needs at least 3 penalties, got 2" in text
    assert "Left out (not in every sweep): decov, l2." in text
    assert "[report](../d/report.md)" in text and "[report](../m/report.md)" in text
    # t1 - none: +0.11 on both digits blocks, 0.66 - 0.70 on mnist1d: mean over blocks (0.11 + 0.11 - 0.04) / 3
    assert "| t1 | +0.0600 |" in text and "| 3 | 6 |" in text
    # three penalties everywhere: a CD diagram
    _fill(tmp_path / "m3", [0, 1], {"none": 0.70, "t1": 0.75, "l2": 0.72}, networks=["mlp"], dataset="mnist1d",
          name="m3")
    capsys.readouterr()
    assert main(["report", "--combine", str(tmp_path / "d"), str(tmp_path / "m3"), "--out", str(out)]) == 0
    assert "report: " in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "Friedman test over N=3 blocks and k=3 penalties" in text and (out / "figures" / "cd_diagram.svg").exists()


def test_combined_report_refuses_bad_folders(tmp_path, capsys):
    _fill(tmp_path / "d", [0], ACCS)
    with pytest.raises(StoreError, match="given twice"):
        write_combined_report([tmp_path / "d", tmp_path / "d"], tmp_path / "out")
    with pytest.raises(StoreError, match="overwrite"):
        write_combined_report([tmp_path / "d"], tmp_path / "d")
    with pytest.raises(StoreError, match="no results database"):
        write_combined_report([tmp_path / "d", tmp_path / "nothing"], tmp_path / "out")
    assert main(["report", "--combine", str(tmp_path / "d")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report"]) == 2


def test_heat_map_layers_are_rebuilt_and_checked():
    # the paper's MLP on 8x8 digits: 450 + 350 + 200 hidden + 10 logits, 192 of the 1010 sampled evenly
    row = {"config": json.dumps({"model": "mlp", "model_params": {}, "train": {"sampling": "all", "fraction": 1.0}}),
           "metrics": json.dumps({"neurons": 1010})}
    cuts, names = _layer_layout(row, {"input_shape": [64], "num_classes": 10}, 192)
    idx = np.unique(np.round(np.linspace(0, 1009, 192)))
    assert cuts == [int((idx < 450).sum()), int((idx < 800).sum()), int((idx < 1000).sum())]
    assert names == ["h1", "h2", "h3", "out"]
    bad = dict(row, metrics=json.dumps({"neurons": 999}))
    assert "stored 999" in _layer_layout(bad, {"input_shape": [64], "num_classes": 10}, 192)
    assert "has 100" in _layer_layout(row, {"input_shape": [64], "num_classes": 10}, 100)
    assert "lacks" in _layer_layout({"config": "{}"}, {}, 8)


def test_markdown_table_formats_missing_values():
    assert markdown_table(["a"], [[None], [float("nan")], [0.5]]).splitlines()[2:] == ["| – |", "| – |", "| 0.5000 |"]


RESULTS = Path(__file__).resolve().parents[1] / "results"
COMMITTED = sorted(p.parent for p in RESULTS.glob(f"*/{DB_NAME}")) if RESULTS.is_dir() else []


@pytest.mark.slow  # a full report per committed sweep
@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_reports_rebuild_from_their_databases(folder, tmp_path):
    committed = folder / "report.md"
    if not committed.exists():
        pytest.skip(f"{folder.name} has a database but no committed report.md")
    copy = tmp_path / folder.name
    copy.mkdir()
    shutil.copy(folder / DB_NAME, copy / DB_NAME)
    rebuilt = write_report(copy)[0].read_text(encoding="utf-8")
    assert rebuilt.splitlines() == committed.read_text(encoding="utf-8").splitlines()


COMBINED = [p.parent for p in RESULTS.glob("*/report.md") if p.parent.name == "combined"] if RESULTS.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("folder", COMBINED, ids=[p.name for p in COMBINED])
def test_committed_combined_report_rebuilds(folder, tmp_path):
    text = (folder / "report.md").read_text(encoding="utf-8")
    names = re.findall(r"\[report\]\(\.\./([^/)]+)/report\.md\)", text)
    assert names, "the combined report links no sweep"
    for name in names:
        (tmp_path / name).mkdir()
        shutil.copy(RESULTS / name / DB_NAME, tmp_path / name / DB_NAME)
    rebuilt = write_combined_report([tmp_path / n for n in names], tmp_path / folder.name)[0].read_text(encoding="utf-8")
    assert rebuilt.splitlines() == text.splitlines()
