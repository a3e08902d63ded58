"""Statistics of a sweep: weight selection, Friedman test, Nemenyi post-hoc test.

Following the paper (and Demsar, JMLR 7, 2006):

1. For every block -- a (network, seed) pair -- and penalty, the weight with the
   best validation accuracy is chosen (diverged and failed runs are dropped;
   ties go to the lower validation loss, then the smaller weight) and its test
   accuracy is reported.
2. Blocks with a result for every penalty enter the comparison. Within a block
   the penalties are ranked by test accuracy (rank 1 = best, ties averaged).
3. Friedman test (:func:`scipy.stats.friedmanchisquare`) over the ``N`` blocks and
   ``k`` penalties; Nemenyi post-hoc p-values
   (:func:`scikit_posthocs.posthoc_nemenyi_friedman`); the critical difference

       CD = q_alpha * sqrt(k (k + 1) / (6 N)),   q_alpha = Q_{1-alpha}(k, inf) / sqrt(2)

   with ``Q`` the studentized range distribution
   (:data:`scipy.stats.studentized_range`). Two penalties whose average ranks
   differ by more than CD differ significantly at level alpha.

Fewer than 3 penalties or fewer than 3 complete blocks, or a table without any
variation, are *reported* as "not computed", never raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
import scipy.stats

__all__ = ["select_best", "critical_difference", "Comparison", "compare", "accuracy_table", "describe"]


def select_best(runs: Iterable[dict]) -> pd.DataFrame:
    """Choose, per (network, seed, penalty), the weight with the best validation accuracy.

    Parameters
    ----------
    runs : iterable of dict
        Run rows with ``network, seed, penalty, weight, status, val_acc, val_loss, test_acc``.
        Only ``status == "done"`` rows with a finite validation accuracy count.

    Returns
    -------
    DataFrame
        One row per (network, seed, penalty): ``weight, val_acc, val_loss, test_acc``
        and ``candidates`` (how many weights competed).
    """
    df = pd.DataFrame(list(runs))
    cols = ["network", "seed", "penalty", "weight", "val_acc", "val_loss", "test_acc", "candidates"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df[(df["status"] == "done") & df["val_acc"].notna() & df["test_acc"].notna()].copy()
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["val_loss"] = df["val_loss"].fillna(math.inf)
    df = df.sort_values(["network", "seed", "penalty", "val_acc", "val_loss", "weight"],
                        ascending=[True, True, True, False, True, True])
    counts = df.groupby(["network", "seed", "penalty"]).size().rename("candidates")
    best = df.groupby(["network", "seed", "penalty"], as_index=False).first()
    best = best.merge(counts.reset_index(), on=["network", "seed", "penalty"])
    return best[cols].reset_index(drop=True)


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks for ``k`` methods over ``n`` blocks.

    Examples
    --------
    >>> round(critical_difference(7, 3), 2)   # Demsar's q_0.05 = 2.949 for k = 7: 2.949 * sqrt(56 / 18)
    5.2
    """
    if k < 2 or n < 1:
        raise ValueError(f"need k >= 2 methods and n >= 1 blocks, got k={k}, n={n}")
    q = scipy.stats.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


@dataclass
class Comparison:
    """The result of :func:`compare`.

    Attributes
    ----------
    table : DataFrame
        Test accuracy of the chosen weight; rows are blocks ``"network/seed"``,
        columns penalties (complete blocks only).
    weights : DataFrame
        The chosen weights, same shape.
    ranks : DataFrame
        Ranks within each block (1 = best).
    average_ranks : Series
        Mean rank per penalty, ascending (best first).
    friedman_statistic, friedman_p : float or None
        None when the test was not computed (see ``notes``).
    nemenyi : DataFrame or None
        Pairwise Nemenyi p-values.
    cd : float or None
        Critical difference of average ranks at ``alpha``.
    significant : bool
        Whether the Friedman test rejects equal performance at ``alpha``.
    notes : list of str
        Human-readable remarks (dropped blocks, degenerate cases).
    """

    table: pd.DataFrame
    weights: pd.DataFrame
    ranks: pd.DataFrame
    average_ranks: pd.Series
    alpha: float = 0.05
    friedman_statistic: float | None = None
    friedman_p: float | None = None
    nemenyi: pd.DataFrame | None = None
    cd: float | None = None
    significant: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.table.shape[1]

    @property
    def n(self) -> int:
        return self.table.shape[0]

    def summary(self) -> str:
        """One paragraph saying what the test found."""
        if self.friedman_p is None:
            return "Friedman test not computed: " + "; ".join(self.notes or ["no data"])
        verdict = "significant" if self.significant else "not significant"
        best = ", ".join(f"{p} {r:.2f}" for p, r in self.average_ranks.items())
        return (
            f"Friedman test over N={self.n} blocks and k={self.k} penalties: chi2={self.friedman_statistic:.3f}, "
            f"p={self.friedman_p:.3g} ({verdict} at alpha={self.alpha}). Nemenyi CD={self.cd:.3f}. "
            f"Average ranks (1 = best): {best}."
        )


def accuracy_table(selected: pd.DataFrame, value: str = "test_acc") -> pd.DataFrame:
    """Pivot :func:`select_best` output: rows ``network/seed``, columns penalties."""
    if selected.empty:
        return pd.DataFrame()
    sel = selected.copy()
    sel["block"] = sel["network"].astype(str) + "/" + sel["seed"].astype(str)
    return sel.pivot(index="block", columns="penalty", values=value)


def compare(selected: pd.DataFrame, alpha: float = 0.05, penalties: list[str] | None = None) -> Comparison:
    """Friedman + Nemenyi comparison of the penalties over the complete blocks.

    Parameters
    ----------
    selected : DataFrame
        Output of :func:`select_best`.
    alpha : float
        Significance level.
    penalties : list of str, optional
        Column order (default: as found).
    """
    notes: list[str] = []
    acc = accuracy_table(selected, "test_acc")
    wts = accuracy_table(selected, "weight")
    if penalties is not None and not acc.empty:
        cols = [p for p in penalties if p in acc.columns]
        missing = [p for p in penalties if p not in acc.columns]
        if missing:
            notes.append(f"no finished run for penalties {missing}")
        acc, wts = acc[cols], wts[cols]
    if not acc.empty:
        incomplete = acc.index[acc.isna().any(axis=1)].tolist()
        if incomplete:
            notes.append(f"blocks without a result for every penalty were left out: {incomplete}")
        acc = acc.dropna(axis=0, how="any")
        wts = wts.loc[acc.index]
    empty_ranks = pd.Series(dtype=float)
    if acc.empty:
        notes.append("no complete block (network, seed) with a result for every penalty")
        return Comparison(acc, wts, acc.copy(), empty_ranks, alpha=alpha, notes=notes)
    values = acc.to_numpy(dtype=float)
    ranks_arr = np.vstack([scipy.stats.rankdata(-row, method="average") for row in values])
    ranks = pd.DataFrame(ranks_arr, index=acc.index, columns=acc.columns)
    avg = ranks.mean(axis=0).sort_values(kind="stable")
    comp = Comparison(acc, wts, ranks, avg, alpha=alpha, notes=notes)
    k, n = acc.shape[1], acc.shape[0]
    if k < 3:
        notes.append(f"the Friedman test needs at least 3 penalties, got {k}")
        return comp
    if n < 3:
        notes.append(f"the Friedman test needs at least 3 complete blocks (network, seed), got {n}")
        return comp
    if np.all(values == values[:, :1]):
        notes.append("every penalty has the same accuracy in every block: nothing to compare")
        return comp
    stat, p = scipy.stats.friedmanchisquare(*[values[:, j] for j in range(k)])
    if not (math.isfinite(stat) and math.isfinite(p)):
        notes.append("the Friedman statistic is undefined (all ranks tied)")
        return comp
    comp.friedman_statistic, comp.friedman_p = float(stat), float(p)
    comp.significant = bool(p < alpha)
    import scikit_posthocs

    nem = scikit_posthocs.posthoc_nemenyi_friedman(values)
    nem.index = nem.columns = list(acc.columns)
    comp.nemenyi = nem.astype(float)
    comp.cd = critical_difference(k, n, alpha)
    if not comp.significant:
        notes.append(
            f"the Friedman test does not reject equal performance at alpha={alpha} (p={p:.3g}); "
            "the post-hoc p-values are shown for completeness only"
        )
    return comp


def describe(selected: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of the chosen test accuracy per network and penalty (over seeds)."""
    if selected.empty:
        return pd.DataFrame()
    g = selected.groupby(["network", "penalty"])["test_acc"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    return out

