"""Statistics: weight selection, blocks of seed means, Friedman (vs scipy and the closed form), Nemenyi, CD,
bootstrap intervals of the difference to the baseline (vs scipy.stats.bootstrap and closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from topodecorr.experiments.stats import (
    block_means,
    compare,
    critical_difference,
    differences_to_baseline,
    select_best,
)


def _runs_from_table(table: np.ndarray, penalties):
    runs = []
    for b, row in enumerate(table):
        for p, acc in zip(penalties, row):
            runs.append(dict(network=f"net{b}", seed=0, penalty=p, weight=0.1, status="done",
                             val_acc=acc, val_loss=1.0, test_acc=acc))
    return runs


def test_select_best_uses_validation_accuracy_and_drops_diverged():
    runs = [
        dict(network="a", seed=0, penalty="t1", weight=1e-3, status="done", val_acc=0.90, val_loss=0.3, test_acc=0.80),
        dict(network="a", seed=0, penalty="t1", weight=1e-2, status="done", val_acc=0.95, val_loss=0.4, test_acc=0.70),
        dict(network="a", seed=0, penalty="t1", weight=1.0, status="diverged", val_acc=None, val_loss=None, test_acc=None),
        dict(network="a", seed=0, penalty="l2", weight=1e-3, status="done", val_acc=0.9, val_loss=0.5, test_acc=0.6),
        dict(network="a", seed=0, penalty="l2", weight=1e-4, status="done", val_acc=0.9, val_loss=0.2, test_acc=0.65),
        dict(network="a", seed=0, penalty="l1", weight=1e-4, status="failed", val_acc=None, val_loss=None, test_acc=None),
    ]
    best = select_best(runs).set_index("penalty")
    assert best.loc["t1", "weight"] == 1e-2 and best.loc["t1", "test_acc"] == 0.70  # by validation, not test
    assert best.loc["t1", "candidates"] == 2
    assert best.loc["l2", "weight"] == 1e-4  # tie on val_acc -> lower val_loss
    assert "l1" not in best.index


def test_friedman_agrees_with_scipy_and_the_closed_form():
    rng = np.random.default_rng(7)
    table = rng.uniform(0.8, 0.99, size=(9, 5))  # no ties
    pens = ["p0", "p1", "p2", "p3", "p4"]
    comp = compare(select_best(_runs_from_table(table, pens)), penalties=pens)
    stat, p = scipy.stats.friedmanchisquare(*table.T)
    assert comp.friedman_statistic == pytest.approx(stat, rel=1e-12)
    assert comp.friedman_p == pytest.approx(p, rel=1e-12)
    # Friedman's chi^2 by hand: 12 N / (k (k+1)) * (sum R_j^2 - k (k+1)^2 / 4), ranks 1 = best
    n, k = table.shape
    ranks = np.vstack([scipy.stats.rankdata(-r) for r in table])
    R = ranks.mean(axis=0)
    chi2 = 12 * n / (k * (k + 1)) * ((R**2).sum() - k * (k + 1) ** 2 / 4)
    assert comp.friedman_statistic == pytest.approx(chi2, rel=1e-10)
    assert comp.average_ranks.to_dict() == pytest.approx(dict(zip(pens, R)))
    assert list(comp.average_ranks.values) == sorted(comp.average_ranks.values)


def test_nemenyi_hand_checked_example():
    # 3 methods, 4 blocks, A always best, C always worst: average ranks 1, 2, 3.
    table = np.array([[0.9, 0.8, 0.7], [0.95, 0.85, 0.6], [0.92, 0.91, 0.5], [0.99, 0.98, 0.97]])
    comp = compare(select_best(_runs_from_table(table, ["A", "B", "C"])), penalties=["A", "B", "C"])
    assert comp.average_ranks.to_dict() == {"A": 1.0, "B": 2.0, "C": 3.0}
    # Friedman: 12*4/(3*4) * (1 + 4 + 9 - 3*16/4) = 4 * 2 = 8.0, p = exp(-8/2) for 2 dof
    assert comp.friedman_statistic == pytest.approx(8.0)
    assert comp.friedman_p == pytest.approx(math.exp(-4.0))
    # Nemenyi: q = |R_i - R_j| / sqrt(k (k+1) / (6 N)) * sqrt(2); se = sqrt(12/24) = sqrt(1/2)
    # A vs C: q = 2 / sqrt(0.5) * sqrt(2) = 4;  A vs B: q = 2.
    p_ac = scipy.stats.studentized_range.sf(4.0, 3, np.inf)
    p_ab = scipy.stats.studentized_range.sf(2.0, 3, np.inf)
    assert comp.nemenyi.loc["A", "C"] == pytest.approx(p_ac, rel=1e-3)
    assert comp.nemenyi.loc["A", "B"] == pytest.approx(p_ab, rel=1e-3)
    assert comp.nemenyi.loc["C", "A"] == pytest.approx(p_ac, rel=1e-3)
    assert 0.01 < p_ac < 0.02 and 0.3 < p_ab < 0.4  # tabulated ptukey values: 0.0175, 0.3444
    # CD for k=3, N=4 with Demsar's q_0.05 = 2.343: 2.343 * sqrt(12/24)
    assert comp.cd == pytest.approx(2.343 * math.sqrt(0.5), rel=1e-3)
    assert comp.significant is True  # p = 0.018 < 0.05


def test_critical_difference_matches_demsar_table():
    for k, q in [(2, 1.960), (3, 2.343), (5, 2.728), (7, 2.949), (10, 3.164)]:
        assert critical_difference(k, 6) == pytest.approx(q * math.sqrt(k * (k + 1) / 36), rel=2e-3)


def test_degenerate_inputs_are_reported_not_raised():
    two_blocks = np.array([[0.9, 0.8, 0.7], [0.95, 0.85, 0.6]])
    comp = compare(select_best(_runs_from_table(two_blocks, "ABC")), penalties=list("ABC"))
    assert comp.friedman_p is None and any("at least 3 complete blocks" in n for n in comp.notes)
    assert "not computed" in comp.summary()
    two_pens = np.array([[0.9, 0.8]] * 5)
    comp = compare(select_best(_runs_from_table(two_pens, "AB")), penalties=list("AB"))
    assert comp.friedman_p is None and any("at least 3 penalties" in n for n in comp.notes)
    ties = np.full((4, 3), 0.5)
    comp = compare(select_best(_runs_from_table(ties, "ABC")), penalties=list("ABC"))
    assert comp.friedman_p is None and comp.nemenyi is None
    comp = compare(select_best([]), penalties=list("ABC"))
    assert comp.friedman_p is None and comp.table.empty
    # a non-significant comparison is reported as such
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.9, 0.91, size=(4, 4))
    comp = compare(select_best(_runs_from_table(noise, "ABCD")), penalties=list("ABCD"))
    assert comp.friedman_p is not None and comp.friedman_p > 0.05 and not comp.significant
    assert "not significant" in comp.summary()


def test_incomplete_blocks_are_left_out():
    table = np.array([[0.9, 0.8, 0.7]] * 4)
    runs = _runs_from_table(table, "ABC")
    runs = [r for r in runs if not (r["network"] == "net0" and r["penalty"] == "B")]
    comp = compare(select_best(runs), penalties=list("ABC"))
    assert comp.n == 3 and "net0" not in comp.table.index
    assert any("net0" in n for n in comp.notes)
    assert isinstance(comp.table, pd.DataFrame)


def _seeded_runs(acc: dict, dataset: str = "d"):
    """acc[(network, seed, penalty)] -> test accuracy, one weight per penalty."""
    return [dict(dataset=dataset, network=n, seed=s, penalty=p, weight=0.1, status="done", val_acc=a, val_loss=1.0,
                 test_acc=a) for (n, s, p), a in acc.items()]


def test_blocks_are_networks_valued_by_the_seed_mean():
    rng = np.random.default_rng(3)
    nets, seeds, pens = ["n0", "n1", "n2", "n3"], [0, 1, 2], ["A", "B", "C"]
    cube = rng.uniform(0.5, 0.9, size=(len(nets), len(seeds), len(pens)))
    acc = {(n, s, p): cube[i, j, k] for i, n in enumerate(nets) for j, s in enumerate(seeds) for k, p in enumerate(pens)}
    comp = compare(select_best(_seeded_runs(acc)), penalties=pens)
    assert comp.n == 4 and list(comp.table.index) == nets  # one block per network, not per (network, seed)
    np.testing.assert_allclose(comp.table.to_numpy(), cube.mean(axis=1), rtol=1e-12)
    assert (comp.seeds == 3).all()
    stat, p = scipy.stats.friedmanchisquare(*cube.mean(axis=1).T)
    assert comp.friedman_statistic == pytest.approx(stat) and comp.friedman_p == pytest.approx(p)
    assert any("little power" in n for n in comp.notes)  # N = 4 < 10


def test_block_means_pair_seeds_and_separate_datasets():
    acc = {("mlp", 0, "A"): 0.8, ("mlp", 0, "B"): 0.9, ("mlp", 1, "A"): 0.6, ("mlp", 1, "B"): 0.7,
           ("mlp", 2, "A"): 0.1}  # seed 2 lacks B: left out of both means
    runs = _seeded_runs(acc, "digits") + _seeded_runs({("mlp", 0, "A"): 0.5, ("mlp", 0, "B"): 0.4}, "mnist1d")
    table, seeds, notes = block_means(select_best(runs), ["A", "B"])
    assert list(table.index) == ["digits/mlp", "mnist1d/mlp"]  # same label, different datasets: two blocks
    assert table.loc["digits/mlp"].to_dict() == pytest.approx({"A": 0.7, "B": 0.8})
    assert seeds.to_dict() == {"digits/mlp": 2, "mnist1d/mlp": 1}
    assert notes == ["digits/mlp: seeds [2] left out (no result for every penalty)"]
    table, _, notes = block_means(select_best(runs), ["A", "B", "C"])
    assert table.empty and all("no result for ['C']" in n for n in notes) and len(notes) == 2


def test_bootstrap_interval_agrees_with_scipy():
    d = np.array([0.012, -0.004, 0.021, 0.008, 0.030])
    acc = {}
    for s, di in enumerate(d):
        acc[("mlp", s, "none")] = 0.8 + 0.01 * s
        acc[("mlp", s, "t1")] = 0.8 + 0.01 * s + di
    pooled, per_block = differences_to_baseline(select_best(_seeded_runs(acc)), n_resamples=20_000)
    row = pooled.loc["t1"]
    assert row["mean"] == pytest.approx(d.mean()) and row["blocks"] == 1 and row["pairs"] == 5
    ref = scipy.stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile",
                                random_state=np.random.default_rng(1)).confidence_interval
    width = ref.high - ref.low
    assert abs(row["low"] - ref.low) < 0.05 * width and abs(row["high"] - ref.high) < 0.05 * width
    assert per_block.set_index("penalty").loc["t1", "low"] == pytest.approx(row["low"])  # one block: the same
    # reproducible: the same data give the same interval; another generator seed about the same one
    again, _ = differences_to_baseline(select_best(_seeded_runs(acc)), n_resamples=20_000)
    assert again.loc["t1"].to_dict() == row.to_dict()
    other, _ = differences_to_baseline(select_best(_seeded_runs(acc)), n_resamples=20_000, seed=5)
    assert abs(other.loc["t1", "low"] - row["low"]) < 0.05 * width
    assert abs(other.loc["t1", "high"] - row["high"]) < 0.05 * width


def test_bootstrap_is_paired_by_seed_and_pools_blocks_equally():
    # huge seed-to-seed spread, constant per-seed gain: pairing leaves no uncertainty
    base = {0: 0.3, 1: 0.9, 2: 0.5, 3: 0.7}
    acc = {("a", s, "none"): b for s, b in base.items()} | {("a", s, "l2"): b + 0.01 for s, b in base.items()}
    # a second block with one seed only and gain -0.05
    acc |= {("b", 0, "none"): 0.6, ("b", 0, "l2"): 0.55}
    pooled, per_block = differences_to_baseline(select_best(_seeded_runs(acc)))
    assert pooled.loc["l2", "mean"] == pytest.approx((0.01 - 0.05) / 2)  # blocks weigh the same, not seeds
    assert pooled.loc["l2", "low"] == pytest.approx(-0.02) and pooled.loc["l2", "high"] == pytest.approx(-0.02)
    one = per_block[per_block["block"] == "b"].iloc[0]
    assert one["pairs"] == 1 and math.isnan(one["low"]) and math.isnan(one["high"])
    # no seed pairs at all: no interval, and a missing baseline gives an empty result, not an error
    pooled, _ = differences_to_baseline(select_best(_seeded_runs({("b", 0, "none"): 0.6, ("b", 0, "l2"): 0.5})))
    assert math.isnan(pooled.loc["l2", "low"])
    pooled, per_block = differences_to_baseline(select_best(_seeded_runs({("b", 0, "l2"): 0.5})))
    assert pooled.empty and per_block.empty
    with pytest.raises(ValueError, match="confidence"):
        differences_to_baseline(select_best(_seeded_runs(acc)), confidence=95)
