"""Statistics: weight selection, Friedman (vs scipy and the closed form), Nemenyi, CD."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from topodecorr.experiments.stats import compare, critical_difference, select_best


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
    assert comp.n == 3 and "net0/0" not in comp.table.index
    assert any("net0/0" in n for n in comp.notes)
    assert isinstance(comp.table, pd.DataFrame)
