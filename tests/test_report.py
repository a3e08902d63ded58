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
    choice_flags,
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


# -- convergence, grid edges, two stages, the tests that match the design ---------------------------


@pytest.mark.slow  # reports with figures
def test_headline_counts_capped_runs_and_grid_edges(tmp_path):
    # weights 0.1 and 1.0 (a grid short of both 1e-6 and 100): t1 chooses 1.0 (the high edge), l2 0.1
    # (the low edge, 1.0 diverged), none has no weight; every run trained 2 epochs
    _fill(tmp_path / "capped", [0, 1, 2], ACCS, networks=NETS, max_epochs=2)
    text = write_report(tmp_path / "capped")[0].read_text()
    head = text.split("## Convergence and grid edges")[1].split("## Warnings")[0]
    assert ("Of the 27 runs chosen by validation, **27 (100.0%) stopped at their epoch cap** and **18 chose a "
            "weight at an edge of a grid that stops short of 1e-06 or 100**") in head
    assert "| none | 9 | 9 | 0 | 0 |" in head and "| t1 | 9 | 9 | 0 | 9 |" in head and "| l2 | 9 | 9 | 9 | 0 |" in head
    assert text.index("## Convergence and grid edges") < text.index("## Warnings")  # the headline comes first
    _fill(tmp_path / "free", [0], ACCS)  # cap 1200 (the default), 2 epochs: none at the cap
    sweep = SweepData.load(tmp_path / "free")
    flags = choice_flags(sweep)
    sweep.close()
    assert not any(f["capped"] for f in flags) and {f["edge"] for f in flags if f["penalty"] == "t1"} == {"high"}
    design = text.split("## Tests that match the design")[1]
    assert "| t1 | 3 | 3 of 3 | +0.1100 | [+0.1100, +0.1100] |" in design  # a constant gain: no spread
    assert "Friedman test over data sets not computed (1 data set" in design
    assert "accuracy ~ penalty + (1 | network) + (1 | network:seed)" in design
    assert (tmp_path / "capped" / "figures" / "forest.png").exists()


def _staged(folder, accuracy, stage2=True):
    """A two-stage sweep: wide seeds 0 and 1 over [1e-6, 1e-3, 1, 100], then seed 2 (one neighbour each side)."""
    raw = {"name": "staged", "dataset": "digits", "networks": ["mlp"], "penalties": ["none", "t1"],
           "weights": [1e-6, 1e-3, 1.0, 100.0], "seeds": [0, 1, 2],
           "stages": {"wide_seeds": [0, 1], "neighbours": 1}, "split_per_seed": True}
    store = ResultStore(folder / DB_NAME)

    def run(cfg):
        store.init_sweep(cfg, [(k, {}) for k in cfg.grid(store.runs())], {})
        while (row := store.claim()) is not None:
            acc = accuracy(row["penalty"], row["weight"], row["seed"])
            store.finish(row["id"], {"status": "done", "val_acc": acc, "test_acc": acc, "val_loss": 1 - acc,
                                     "epochs": 2, "best_epoch": 1, "versions": {}, "history": []})

    run(parse_sweep(raw))
    if stage2:
        run(parse_sweep({**raw, "stages": {**raw["stages"], "run": 2}}))
    store.close()


@pytest.mark.slow  # reports with figures
def test_two_stage_choice_is_among_the_stage_two_weights(tmp_path):
    # t1: seed 0 likes 1e-3, seed 1 likes 100; the mean over the wide seeds peaks at 1e-3,
    # so stage 2 runs 1e-6, 1e-3 and 1, and seed 1 then chooses among them (1.0), not 100
    table = {0: {1e-6: 0.80, 1e-3: 0.90, 1.0: 0.85, 100.0: 0.10}, 1: {1e-6: 0.70, 1e-3: 0.80, 1.0: 0.85, 100.0: 0.95},
             2: {1e-6: 0.71, 1e-3: 0.81, 1.0: 0.80, 100.0: 0.99}}

    def accuracy(penalty, weight, seed):
        return 0.5 + 0.01 * seed if penalty == "none" else table[seed][weight]

    _staged(tmp_path / "one", accuracy, stage2=False)
    sweep = SweepData.load(tmp_path / "one")
    assert sweep.selection is None and sweep.chosen("mlp", 1, "t1")["weight"] == 100.0  # stage 1: every weight
    sweep.close()
    assert "**Stage 2 has not begun**" in write_report(tmp_path / "one")[0].read_text()
    _staged(tmp_path / "two", accuracy)
    sweep = SweepData.load(tmp_path / "two")
    assert sweep.selection == {("mlp", "t1"): (1e-6, 1e-3, 1.0)}
    assert [sweep.chosen("mlp", s, "t1")["weight"] for s in (0, 1, 2)] == [1e-3, 1.0, 1e-3]
    assert sorted(r["weight"] for r in sweep.runs if r["seed"] == 2 and r["penalty"] == "t1") == [1e-6, 1e-3, 1.0]
    flags = {f["seed"]: f["edge"] for f in choice_flags(sweep) if f["penalty"] == "t1"}
    sweep.close()
    assert flags == {0: "", 1: "high", 2: ""}  # 1.0 is the top of the stage-2 grid, short of 100
    text = write_report(tmp_path / "two")[0].read_text()
    assert "Each seed draws its own split (split seed 0 + seed)" in text
    assert "stage 1 ran every weight of the grid [1e-06, 0.001, 1.0, 100.0] on seed(s) [0, 1]" in text
    assert "- mlp / t1: 1e-06, 0.001, 1" in text
    assert "| t1 | 3 | 0 | 0 | 1 |" in text


def _independent_headline(db: Path) -> tuple[int, int, int]:
    """(chosen runs, chosen runs at their epoch cap, chosen weights at an edge short of 1e-6 / 100), read
    from the database with sqlite3 alone: per (network, seed, penalty) the finished run with the best
    validation accuracy, then the lower validation loss, then the smaller weight."""
    import sqlite3

    from topodecorr.experiments.config import selection_weights

    con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)  # leaves no -wal / -shm files
    con.row_factory = sqlite3.Row
    config = json.loads(con.execute("SELECT value FROM meta WHERE key='sweep'").fetchone()[0])
    runs = [dict(r) for r in con.execute("SELECT * FROM runs")]
    con.close()
    allowed = selection_weights(config, runs)
    best: dict = {}
    for r in runs:
        if r["status"] != "done" or r["val_acc"] is None or r["test_acc"] is None:
            continue
        if allowed is not None and r["penalty"] != "none" and r["weight"] not in allowed[(r["network"], r["penalty"])]:
            continue
        key = (r["network"], r["seed"], r["penalty"])
        rank = (-r["val_acc"], r["val_loss"] if r["val_loss"] is not None else float("inf"), r["weight"])
        if key not in best or rank < best[key][0]:
            best[key] = (rank, r)
    capped = edges = 0
    for (network, _, penalty), (_, r) in best.items():
        cap = (json.loads(r["config"] or "{}").get("train") or config["train"])["max_epochs"]
        capped += r["epochs"] >= cap
        if penalty != "none":
            grid = sorted(allowed[(network, penalty)] if allowed else config["weights"])
            edges += (r["weight"] == grid[0] and grid[0] > 1e-6) or (r["weight"] == grid[-1] and grid[-1] < 100)
    return len(best), capped, edges


HEADLINE = re.compile(r"Of the (\d+) runs chosen by validation, \*\*(\d+) \([\d.]+%\) stopped at their epoch cap\*\* "
                      r"and \*\*(\d+) chose a weight at an edge")


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_headlines_count_capped_runs_and_edges(folder):
    text = (folder / "report.md").read_text(encoding="utf-8")
    found = HEADLINE.search(text)
    assert found, f"{folder.name}/report.md has no convergence headline"
    assert tuple(int(g) for g in found.groups()) == _independent_headline(folder / DB_NAME)


@pytest.mark.parametrize("folder", COMBINED, ids=[p.name for p in COMBINED])
def test_committed_combined_headline_sums_its_sweeps(folder):
    text = (folder / "report.md").read_text(encoding="utf-8")
    found = HEADLINE.search(text)
    assert found, "the combined report has no convergence headline"
    names = re.findall(r"\[report\]\(\.\./([^/)]+)/report\.md\)", text)
    counts = [_independent_headline(RESULTS / n / DB_NAME) for n in names]
    assert tuple(int(g) for g in found.groups()) == tuple(sum(c[i] for c in counts) for i in range(3))


@pytest.mark.slow  # a figure
def test_cd_diagram_rank_axis_runs_from_one_to_k(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd

    from topodecorr.experiments import plots

    seen = {}
    real_save = plots._save

    def keep_axes(fig, stem, **kw):
        ax = fig.axes[0]
        seen.update(ticks=list(ax.get_xticks()), xlim=ax.get_xlim())
        return real_save(fig, stem, **kw)

    monkeypatch.setattr(plots, "_save", keep_axes)
    # no penalty reached rank 1 or rank k = 4: the axis still shows the whole rank scale 1..4
    ranks = pd.Series({"none": 1.6, "t1": 2.4, "t2": 3.1, "l1": 3.5})
    nemenyi = pd.DataFrame(np.full((4, 4), 0.5), index=ranks.index, columns=ranks.index)
    paths = plots.cd_diagram(ranks, nemenyi, 1.2, tmp_path / "cd")
    assert [p.name for p in paths] == ["cd.png", "cd.svg"]
    assert seen["ticks"] == [1, 2, 3, 4]
    assert seen["xlim"][0] <= 1 and seen["xlim"][1] >= 4
    plt.close("all")
