"""Statistics of a sweep: weight selection, Friedman test, Nemenyi post-hoc test, bootstrap intervals.

Following the paper (and Demsar, JMLR 7, 2006), with one change the paper did not
need (it had one run per network):

1. **Weight selection.** For every (dataset, network, seed) and penalty the weight
   with the best validation accuracy is chosen (diverged and failed runs are
   dropped; ties go to the lower validation loss, then the smaller weight) and its
   test accuracy is kept (:func:`select_best`). The choice is made per seed, as a
   user with one training run would make it.
2. **Blocks.** Seeds of one network are not independent data sets, so a block is a
   (dataset, network) pair and its value the mean over seeds of the chosen test
   accuracies (:func:`block_means`). Only seeds with a result for every penalty
   count (the means are paired); a block without such a seed is left out.
   Within a block the penalties are ranked (rank 1 = best, ties averaged).
3. **Friedman test** (:func:`scipy.stats.friedmanchisquare`) over the ``N`` blocks
   and ``k`` penalties; Nemenyi post-hoc p-values
   (:func:`scikit_posthocs.posthoc_nemenyi_friedman`); the critical difference

       CD = q_alpha * sqrt(k (k + 1) / (6 N)),   q_alpha = Q_{1-alpha}(k, inf) / sqrt(2)

   with ``Q`` the studentized range distribution
   (:data:`scipy.stats.studentized_range`). Two penalties whose average ranks
   differ by more than CD differ significantly at level alpha.
4. **Effect sizes** (:func:`differences_to_baseline`): per penalty, the test-accuracy
   difference to ``none`` paired by seed, averaged over seeds and then over
   blocks, with a percentile bootstrap interval that resamples seeds within each
   block (a seeded generator: the same data give the same interval).

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

__all__ = [
    "select_best",
    "block_means",
    "critical_difference",
    "Comparison",
    "compare",
    "friedman_nemenyi",
    "accuracy_table",
    "describe",
    "differences_to_baseline",
    "wilcoxon_holm",
    "hierarchical_bootstrap",
    "dataset_comparison",
    "MixedModel",
    "mixed_model",
]

#: The keys of one choice of weight; a block is (dataset, network).
_CHOICE = ["dataset", "network", "seed", "penalty"]


def select_best(runs: Iterable[dict]) -> pd.DataFrame:
    """Choose, per (dataset, network, seed, penalty), the weight with the best validation accuracy.

    Parameters
    ----------
    runs : iterable of dict
        Run rows with ``network, seed, penalty, weight, status, val_acc, val_loss, test_acc``
        and optionally ``dataset`` (missing: ``""``). Only ``status == "done"`` rows with
        a finite validation and test accuracy count.

    Returns
    -------
    DataFrame
        One row per (dataset, network, seed, penalty): ``weight, val_acc, val_loss, test_acc``
        and ``candidates`` (how many weights competed).
    """
    df = pd.DataFrame(list(runs))
    cols = _CHOICE + ["weight", "val_acc", "val_loss", "test_acc", "candidates"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    if "dataset" not in df.columns:
        df["dataset"] = ""
    df = df[(df["status"] == "done") & df["val_acc"].notna() & df["test_acc"].notna()].copy()
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["val_loss"] = df["val_loss"].fillna(math.inf)
    df = df.sort_values(_CHOICE + ["val_acc", "val_loss", "weight"],
                        ascending=[True, True, True, True, False, True, True])
    counts = df.groupby(_CHOICE).size().rename("candidates")
    best = df.groupby(_CHOICE, as_index=False).first()
    best = best.merge(counts.reset_index(), on=_CHOICE)
    return best[cols].reset_index(drop=True)


def _block_labels(selected: pd.DataFrame) -> pd.Series:
    """``network`` when all rows share one dataset, else ``dataset/network``."""
    if selected["dataset"].nunique() <= 1:
        return selected["network"].astype(str)
    return selected["dataset"].astype(str) + "/" + selected["network"].astype(str)


def block_means(selected: pd.DataFrame, penalties: list[str] | None = None,
                value: str = "test_acc") -> tuple[pd.DataFrame, pd.Series, list[str]]:
    """Seed-mean of the chosen ``value`` per block (dataset, network) and penalty.

    Parameters
    ----------
    selected : DataFrame
        Output of :func:`select_best`.
    penalties : list of str, optional
        The columns (default: every penalty found, sorted).
    value : str
        The column averaged.

    Returns
    -------
    table : DataFrame
        Rows blocks (``network``, or ``dataset/network`` when there are several datasets),
        columns penalties; only blocks with at least one seed that has a result for every
        penalty, averaged over exactly those seeds.
    seeds : Series
        Number of seeds averaged per block.
    notes : list of str
        Blocks and seeds that were left out, and why.

    Examples
    --------
    >>> sel = select_best([dict(network="a", seed=s, penalty=p, weight=0.1, status="done",
    ...                         val_acc=0.5, val_loss=1.0, test_acc=acc)
    ...                    for s, accs in enumerate([(0.8, 0.9), (0.6, 0.7), (0.7, None)])
    ...                    for p, acc in zip("xy", accs) if acc is not None])
    >>> table, seeds, notes = block_means(sel, ["x", "y"])
    >>> table.round(3).to_dict("records"), int(seeds["a"])
    ([{'x': 0.7, 'y': 0.8}], 2)
    >>> notes
    ['a: seeds [2] left out (no result for every penalty)']
    """
    notes: list[str] = []
    if selected.empty:
        return pd.DataFrame(columns=penalties or []), pd.Series(dtype=int), notes
    sel = selected.assign(block=_block_labels(selected))
    cols = list(penalties) if penalties is not None else sorted(sel["penalty"].unique())
    rows, counts = {}, {}
    for block in dict.fromkeys(sel.sort_values(["dataset", "network"])["block"]):
        per_seed = sel[sel["block"] == block].pivot(index="seed", columns="penalty", values=value)
        per_seed = per_seed.reindex(columns=cols)
        complete = per_seed.dropna(axis=0, how="any")
        if complete.empty:
            missing = [p for p in cols if per_seed[p].isna().all()]
            why = f"no result for {missing}" if missing else "no seed with a result for every penalty"
            notes.append(f"block {block} left out: {why}")
            continue
        dropped = [int(s) for s in per_seed.index if s not in complete.index]
        if dropped:
            notes.append(f"{block}: seeds {dropped} left out (no result for every penalty)")
        rows[block] = complete.mean(axis=0)
        counts[block] = len(complete)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=cols) if rows else pd.DataFrame(columns=cols)
    return table.astype(float), pd.Series(counts, dtype=int), notes


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
    """The result of :func:`compare` / :func:`friedman_nemenyi`.

    Attributes
    ----------
    table : DataFrame
        Seed-mean test accuracy of the chosen weights; rows are blocks (``network``, or
        ``dataset/network`` over several datasets), columns penalties (complete blocks only).
    seeds : Series
        Seeds averaged per block.
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
        Human-readable remarks (dropped blocks, degenerate cases, few blocks).
    """

    table: pd.DataFrame
    seeds: pd.Series
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
    """Pivot :func:`select_best` output: rows ``block/seed``, columns penalties (one row per run)."""
    if selected.empty:
        return pd.DataFrame()
    sel = selected.sort_values(["dataset", "network", "seed"])
    sel = sel.assign(row=_block_labels(sel) + "/" + sel["seed"].astype(str))
    table = sel.pivot(index="row", columns="penalty", values=value)
    return table.loc[list(dict.fromkeys(sel["row"]))]


def friedman_nemenyi(table: pd.DataFrame, alpha: float = 0.05, seeds: pd.Series | None = None,
                     notes: list[str] | None = None) -> Comparison:
    """Friedman + Nemenyi comparison of the columns of a complete blocks x penalties table.

    Parameters
    ----------
    table : DataFrame
        One row per block, one column per penalty, no missing values; larger is better.
    alpha : float
        Significance level.
    seeds : Series, optional
        Seeds behind each block's value (kept in the result).
    notes : list of str, optional
        Remarks to start the result's notes with.
    """
    notes = list(notes or [])
    seeds = pd.Series(dtype=int) if seeds is None else seeds
    if table.empty:
        notes.append("no complete block (dataset, network) with a result for every penalty")
        return Comparison(table, seeds, table.copy(), pd.Series(dtype=float), alpha=alpha, notes=notes)
    values = table.to_numpy(dtype=float)
    ranks_arr = np.vstack([scipy.stats.rankdata(-row, method="average") for row in values])
    ranks = pd.DataFrame(ranks_arr, index=table.index, columns=table.columns)
    avg = ranks.mean(axis=0).sort_values(kind="stable")
    comp = Comparison(table, seeds, ranks, avg, alpha=alpha, notes=notes)
    k, n = table.shape[1], table.shape[0]
    if k < 3:
        notes.append(f"the Friedman test needs at least 3 penalties, got {k}")
        return comp
    if n < 3:
        notes.append(f"the Friedman test needs at least 3 complete blocks (dataset, network), got {n}")
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
    nem.index = nem.columns = list(table.columns)
    comp.nemenyi = nem.astype(float)
    comp.cd = critical_difference(k, n, alpha)
    if not comp.significant:
        notes.append(
            f"the Friedman test does not reject equal performance at alpha={alpha} (p={p:.3g}); "
            "the post-hoc p-values are shown for completeness only"
        )
    if n < 10:
        notes.append(
            f"with N={n} blocks the test has little power and its chi-square approximation is rough "
            "(Demsar suggests N > 10): read the ranks as descriptive"
        )
    return comp


def compare(selected: pd.DataFrame, alpha: float = 0.05, penalties: list[str] | None = None) -> Comparison:
    """Friedman + Nemenyi comparison over the (dataset, network) blocks of seed-mean test accuracy.

    Parameters
    ----------
    selected : DataFrame
        Output of :func:`select_best`.
    alpha : float
        Significance level.
    penalties : list of str, optional
        Column order (default: every penalty found, sorted). A penalty without any
        finished run is left out (and said so in the notes).
    """
    notes: list[str] = []
    found = set(selected["penalty"]) if not selected.empty else set()
    cols = sorted(found) if penalties is None else [p for p in penalties if p in found]
    if penalties is not None and found:
        missing = [p for p in penalties if p not in found]
        if missing:
            notes.append(f"no finished run for penalties {missing}")
    table, seeds, block_notes = block_means(selected, cols)
    return friedman_nemenyi(table, alpha=alpha, seeds=seeds, notes=notes + block_notes)


def describe(selected: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of the chosen test accuracy per block and penalty (over seeds).

    Columns ``block, dataset, network, penalty, mean, std, count``.
    """
    if selected.empty:
        return pd.DataFrame()
    sel = selected.assign(block=_block_labels(selected))
    g = sel.groupby(["block", "dataset", "network", "penalty"], sort=False)["test_acc"]
    return g.agg(["mean", "std", "count"]).reset_index()


# -- effect sizes -------------------------------------------------------------------------------


def _bootstrap_means(groups: list[np.ndarray], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of the mean over groups of each group's mean, resampling within each group.

    Returns shape (n_resamples,).
    """
    total = np.zeros(n_resamples)
    for g in groups:
        idx = rng.integers(0, len(g), size=(n_resamples, len(g)))
        total += g[idx].mean(axis=1)
    return total / len(groups)


def differences_to_baseline(
    selected: pd.DataFrame,
    baseline: str = "none",
    penalties: list[str] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test-accuracy difference of each penalty to ``baseline``, paired by seed, with bootstrap intervals.

    For penalty ``p`` and block ``b`` (dataset, network) the differences
    ``d_s = acc(p, s) - acc(baseline, s)`` over the seeds ``s`` that have both are
    averaged; the pooled value is the mean of the block means (every block weighs
    the same, as in the rank comparison). The interval is the percentile bootstrap
    of that statistic, resampling seeds with replacement within each block
    (``n_resamples`` replicates from ``numpy.random.default_rng(seed)``, fresh for
    every penalty and block, so the result does not depend on their order). With a
    handful of seeds the interval is approximate and tends to be narrow: it cannot
    show more seed variation than the seeds at hand.

    Parameters
    ----------
    selected : DataFrame
        Output of :func:`select_best`.
    baseline : str
        The reference penalty.
    penalties : list of str, optional
        Penalties to compare (default: all found but the baseline); the baseline is skipped.
    confidence : float
        Coverage of the interval, in (0, 1).
    n_resamples : int
        Bootstrap replicates.
    seed : int
        Seed of the bootstrap's generator.

    Returns
    -------
    pooled : DataFrame
        Index penalty; columns ``mean, low, high, blocks, pairs`` (``low``/``high`` NaN
        when no block has two paired seeds).
    per_block : DataFrame
        One row per (block, penalty) with a paired seed: columns ``block, penalty, mean,
        low, high, pairs`` (``low``/``high`` NaN with a single pair).

    Raises
    ------
    ValueError
        ``confidence`` outside (0, 1) or ``n_resamples < 1``.

    Examples
    --------
    >>> sel = select_best([dict(network="a", seed=s, penalty=p, weight=0.1, status="done",
    ...                         val_acc=0.5, val_loss=1.0, test_acc=base + (0.02 if p == "t1" else 0.0))
    ...                    for s, base in enumerate([0.7, 0.8, 0.9]) for p in ("none", "t1")])
    >>> pooled, _ = differences_to_baseline(sel)
    >>> [round(float(pooled.loc["t1", c]), 6) for c in ("mean", "low", "high")]  # paired: seed noise cancels
    [0.02, 0.02, 0.02]
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive number of bootstrap replicates, got {n_resamples}")
    pooled_cols = ["mean", "low", "high", "blocks", "pairs"]
    block_cols = ["block", "penalty", "mean", "low", "high", "pairs"]
    if selected.empty or baseline not in set(selected["penalty"]):
        return pd.DataFrame(columns=pooled_cols), pd.DataFrame(columns=block_cols)
    sel = selected.assign(block=_block_labels(selected))
    found = list(dict.fromkeys(sel["penalty"]))
    pens = [p for p in (penalties if penalties is not None else sorted(found)) if p != baseline and p in found]
    blocks = list(dict.fromkeys(sel.sort_values(["dataset", "network"])["block"]))
    acc = {b: sel[sel["block"] == b].pivot(index="seed", columns="penalty", values="test_acc") for b in blocks}
    q = (1.0 - confidence) / 2.0
    pooled_rows, block_rows = {}, []
    for p in pens:
        groups = []
        for b in blocks:
            t = acc[b]
            if p not in t.columns or baseline not in t.columns:
                continue
            d = (t[p] - t[baseline]).dropna().to_numpy(dtype=float)
            if d.size == 0:
                continue
            groups.append(d)
            lo = hi = math.nan
            if d.size > 1:
                reps = _bootstrap_means([d], n_resamples, np.random.default_rng(seed))
                lo, hi = (float(v) for v in np.quantile(reps, [q, 1.0 - q]))
            block_rows.append([b, p, float(d.mean()), lo, hi, int(d.size)])
        if not groups:
            continue
        mean = float(np.mean([g.mean() for g in groups]))
        lo = hi = math.nan
        if any(g.size > 1 for g in groups):
            reps = _bootstrap_means(groups, n_resamples, np.random.default_rng(seed))
            lo, hi = (float(v) for v in np.quantile(reps, [q, 1.0 - q]))
        pooled_rows[p] = [mean, lo, hi, len(groups), int(sum(g.size for g in groups))]
    pooled = pd.DataFrame.from_dict(pooled_rows, orient="index", columns=pooled_cols)
    return pooled, pd.DataFrame(block_rows, columns=block_cols)


# -- statistics that match the design ------------------------------------------------------------
#
# Seeds are nested in (dataset, network) blocks and blocks in data sets; the tests below
# take each level as what it is: the omnibus test has the data set as its unit (or a mixed
# model with random effects for the levels), each penalty against the baseline is a
# signed-rank test over blocks with Holm's correction, and the intervals resample blocks and
# then seeds within them.

def _paired_groups(selected: pd.DataFrame, baseline: str, penalties: list[str] | None
                   ) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    """penalty -> [(dataset, block, seed differences to ``baseline``)], blocks in a fixed order."""
    if selected.empty or baseline not in set(selected["penalty"]):
        return {}
    sel = selected.assign(block=_block_labels(selected))
    found = list(dict.fromkeys(sel["penalty"]))
    pens = [p for p in (penalties if penalties is not None else sorted(found)) if p != baseline and p in found]
    order = sel.sort_values(["dataset", "network"])[["block", "dataset"]].drop_duplicates("block")
    out: dict[str, list[tuple[str, str, np.ndarray]]] = {p: [] for p in pens}
    for block, dataset in order.itertuples(index=False):
        t = sel[sel["block"] == block].pivot(index="seed", columns="penalty", values="test_acc")
        for p in pens:
            if p in t.columns and baseline in t.columns:
                d = (t[p] - t[baseline]).dropna().to_numpy(dtype=float)
                if d.size:
                    out[p].append((str(dataset), str(block), d))
    return {p: g for p, g in out.items() if g}


def wilcoxon_holm(selected: pd.DataFrame, baseline: str = "none", penalties: list[str] | None = None,
                  alpha: float = 0.05) -> pd.DataFrame:
    """Each penalty against ``baseline``: Wilcoxon signed-rank test over blocks, Holm-corrected.

    A block's value is its seed-mean test-accuracy difference to the baseline (seeds
    paired); the two-sided test (:func:`scipy.stats.wilcoxon`, exact for small samples)
    asks whether these differences are centred on 0, and Holm's step-down correction
    (:func:`statsmodels.stats.multitest.multipletests`) holds the family-wise error over
    the penalties at ``alpha``.

    Returns
    -------
    DataFrame
        Index penalty; columns ``blocks, mean, median, wins, statistic, p, p_holm, significant``
        (``wins``: blocks where the penalty is ahead). ``p`` is NaN (and the penalty left out
        of the correction) with fewer than 2 blocks or all differences 0.
    """
    from statsmodels.stats.multitest import multipletests

    cols = ["blocks", "mean", "median", "wins", "statistic", "p", "p_holm", "significant"]
    rows = {}
    for p, groups in _paired_groups(selected, baseline, penalties).items():
        d = np.array([g.mean() for _, _, g in groups])
        stat = pval = math.nan
        if d.size >= 2 and np.any(d != 0):
            res = scipy.stats.wilcoxon(d)
            stat, pval = float(res.statistic), float(res.pvalue)
        rows[p] = [d.size, float(d.mean()), float(np.median(d)), int((d > 0).sum()), stat, pval, math.nan, False]
    out = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    tested = out["p"].notna() if not out.empty else pd.Series(dtype=bool)
    if tested.any():
        reject, corrected, _, _ = multipletests(out.loc[tested, "p"].to_numpy(), alpha=alpha, method="holm")
        out.loc[tested, "p_holm"] = corrected
        out.loc[tested, "significant"] = reject
    return out.astype({"blocks": int, "wins": int, "significant": bool}) if not out.empty else out


def _hierarchical_replicates(groups: list[np.ndarray], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of the mean over blocks of the seed means: blocks drawn with replacement, then seeds within each."""
    b = len(groups)
    picks = rng.integers(0, b, size=(n_resamples, b))
    means = np.empty((n_resamples, b))
    for k, g in enumerate(groups):
        mask = picks == k
        idx = rng.integers(0, g.size, size=(int(mask.sum()), g.size))
        means[mask] = g[idx].mean(axis=1)
    return means.mean(axis=1)


def hierarchical_bootstrap(selected: pd.DataFrame, baseline: str = "none", penalties: list[str] | None = None,
                           confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Difference to ``baseline`` with a percentile interval that resamples blocks, then seeds.

    The statistic is that of :func:`differences_to_baseline` (the mean over blocks of
    the seed-mean paired differences); each replicate draws the blocks with replacement
    and, within every drawn block, its seeds with replacement, so the interval carries
    the variation between blocks as well as between seeds. A generator
    ``numpy.random.default_rng(seed)`` fresh for every penalty makes it reproducible.

    Returns
    -------
    DataFrame
        Index penalty; columns ``mean, low, high, blocks, pairs`` (``low``/``high`` NaN with one block).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive number of bootstrap replicates, got {n_resamples}")
    q = (1.0 - confidence) / 2.0
    rows = {}
    for p, groups in _paired_groups(selected, baseline, penalties).items():
        arrays = [g for _, _, g in groups]
        lo = hi = math.nan
        if len(arrays) > 1:
            reps = _hierarchical_replicates(arrays, n_resamples, np.random.default_rng(seed))
            lo, hi = (float(v) for v in np.quantile(reps, [q, 1.0 - q]))
        rows[p] = [float(np.mean([a.mean() for a in arrays])), lo, hi, len(arrays), int(sum(a.size for a in arrays))]
    return pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "low", "high", "blocks", "pairs"])


def dataset_comparison(selected: pd.DataFrame, alpha: float = 0.05, penalties: list[str] | None = None) -> Comparison:
    """Friedman / Nemenyi with the data set as the unit: each data set valued by the mean of its blocks.

    Blocks (dataset, network) of one data set share their data, so they are not
    independent; this omnibus test counts each data set once (with 3 data sets it has
    little power, and says so). The data set of a row is its ``data`` column where
    present (sweeps of one data set under different labels), else ``dataset``.
    """
    found = set(selected["penalty"]) if not selected.empty else set()
    cols = sorted(found) if penalties is None else [p for p in penalties if p in found]
    table, _, notes = block_means(selected, cols)
    if table.empty:
        return friedman_nemenyi(table, alpha=alpha, notes=notes)
    sel = selected.assign(block=_block_labels(selected))
    of_block = dict(zip(sel["block"], _data_sets(sel)))
    grouped = table.groupby(table.index.map(of_block), sort=False)
    per_dataset = grouped.mean()
    blocks = grouped.size()
    return friedman_nemenyi(per_dataset, alpha=alpha, seeds=blocks, notes=notes)


def _data_sets(selected: pd.DataFrame) -> pd.Series:
    """The data set of each row: the ``data`` column where present (two sweeps of one data set, e.g. MLPs and
    CNNs, have distinct ``dataset`` labels but one data set), else ``dataset``."""
    col = "data" if "data" in selected.columns else "dataset"
    return selected[col].astype(str)


@dataclass
class MixedModel:
    """The result of :func:`mixed_model`.

    Attributes
    ----------
    coefficients : DataFrame
        Index penalty; columns ``estimate, se, p``: the fixed effect of each penalty
        against the baseline (test-accuracy difference), Wald p-values.
    lr_statistic, df, p : float or None
        Likelihood-ratio test of "no penalty effect" (both models fitted by maximum likelihood).
    formula : str
        The model, in lme4 notation.
    converged : bool
    notes : list of str
    """

    coefficients: pd.DataFrame
    lr_statistic: float | None = None
    df: int | None = None
    p: float | None = None
    formula: str = ""
    converged: bool = False
    notes: list[str] = field(default_factory=list)


def _mixed_data(selected: pd.DataFrame, cols: list[str]) -> tuple[pd.DataFrame, str, dict[str, str], str]:
    """Model rows and the grouping: data sets as groups when there are several, else networks."""
    df = selected[selected["penalty"].isin(cols)].copy()
    df["network"] = df["dataset"].astype(str) + "/" + df["network"].astype(str)
    df["dataset"] = _data_sets(df)
    df["unit"] = df["network"] + "/" + df["seed"].astype(str)
    df["penalty"] = pd.Categorical(df["penalty"], categories=cols)
    if df["dataset"].nunique() >= 2:
        return df, "dataset", {"network": "0 + C(network)", "seed": "0 + C(unit)"}, \
            "accuracy ~ penalty + (1 | dataset) + (1 | dataset:network) + (1 | dataset:network:seed)"
    return df, "network", {"seed": "0 + C(unit)"}, "accuracy ~ penalty + (1 | network) + (1 | network:seed)"


def mixed_model(selected: pd.DataFrame, baseline: str = "none", penalties: list[str] | None = None) -> MixedModel:
    """Linear mixed model of the chosen test accuracies (:class:`statsmodels.regression.mixed_linear_model.MixedLM`).

    ``accuracy ~ penalty + (1 | dataset) + (1 | dataset:network) + (1 | dataset:network:seed)``:
    the penalty a fixed effect (treatment coding against ``baseline``), random intercepts
    for the data set, the network within it and the seed within the network (a seed's
    runs share their initialisation and split, so they are paired). With one data set the
    network is the top group. The penalty effect is tested by a likelihood ratio against
    the model without it (maximum-likelihood fits, chi-square with k - 1 degrees of freedom).
    Failures and convergence warnings are reported in ``notes``, never raised.
    """
    import warnings

    import statsmodels.formula.api as smf

    found = list(dict.fromkeys(selected["penalty"])) if not selected.empty else []
    cols = [p for p in (penalties if penalties is not None else sorted(found)) if p in found]
    empty = pd.DataFrame(columns=["estimate", "se", "p"])
    if baseline not in cols or len(cols) < 2:
        return MixedModel(empty, notes=[f"not computed: needs `{baseline}` and at least one other penalty"])
    cols = [baseline] + [p for p in cols if p != baseline]
    df, groups, vc, formula = _mixed_data(selected, cols)
    if df[groups].nunique() < 2:
        return MixedModel(empty, formula=formula, notes=["not computed: needs at least two networks or data sets"])
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            full = smf.mixedlm("test_acc ~ C(penalty)", df, groups=df[groups], re_formula="1",
                               vc_formula=vc).fit(reml=False, method=["lbfgs"])
            null = smf.mixedlm("test_acc ~ 1", df, groups=df[groups], re_formula="1",
                               vc_formula=vc).fit(reml=False, method=["lbfgs"])
    except (ValueError, np.linalg.LinAlgError) as exc:
        return MixedModel(empty, formula=formula, notes=[f"not computed: the fit failed ({exc})"])
    for w in caught:
        msg = str(w.message).splitlines()[0]
        if msg not in notes:
            notes.append(msg)
    rows = {}
    for p in cols[1:]:
        name = f"C(penalty)[T.{p}]"
        rows[p] = [float(full.fe_params[name]), float(full.bse_fe[name]), float(full.pvalues[name])]
    lr = max(0.0, 2.0 * (float(full.llf) - float(null.llf)))
    k = len(cols) - 1
    return MixedModel(pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "se", "p"]),
                      lr_statistic=lr, df=k, p=float(scipy.stats.chi2.sf(lr, k)), formula=formula,
                      converged=bool(full.converged and null.converged), notes=notes)
