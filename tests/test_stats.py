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


# -- statistics that match the design ---------------------------------------------------------------


def _nested(effects, datasets=3, networks=3, seeds=5, seed=0, noise=0.005):
    """Chosen-run rows with random data-set, network and seed intercepts and fixed penalty effects."""
    rng = np.random.default_rng(seed)
    rows = []
    for ds in range(datasets):
        dv = rng.normal(0, 0.05)
        for net in range(networks):
            nv = rng.normal(0, 0.02)
            for s in range(seeds):
                sv = rng.normal(0, 0.01)
                for p, e in effects.items():
                    rows.append(dict(dataset=f"d{ds}", network=f"n{net}", seed=s, penalty=p, weight=0.1,
                                     val_acc=0.5, val_loss=1.0, candidates=1,
                                     test_acc=0.8 + dv + nv + sv + e + rng.normal(0, noise)))
    return pd.DataFrame(rows)


@pytest.mark.slow  # imports statsmodels
def test_wilcoxon_holm_agrees_with_scipy_and_statsmodels():
    from statsmodels.stats.multitest import multipletests

    from topodecorr.experiments.stats import wilcoxon_holm

    sel = _nested({"none": 0.0, "a": 0.02, "b": 0.0, "c": -0.004})
    out = wilcoxon_holm(sel, "none", ["a", "b", "c"])
    means = {}
    for p in ("a", "b", "c"):
        wide = sel.pivot_table(index=["dataset", "network", "seed"], columns="penalty", values="test_acc")
        d = (wide[p] - wide["none"]).groupby(level=["dataset", "network"]).mean().to_numpy()
        means[p] = d
        ref = scipy.stats.wilcoxon(d)
        assert out.loc[p, "blocks"] == 9 and out.loc[p, "wins"] == int((d > 0).sum())
        assert out.loc[p, "p"] == pytest.approx(ref.pvalue) and out.loc[p, "statistic"] == pytest.approx(ref.statistic)
        assert out.loc[p, "mean"] == pytest.approx(d.mean())
    holm = multipletests(out["p"].to_numpy(), method="holm")[1]
    np.testing.assert_allclose(out["p_holm"].to_numpy(), holm)
    # Holm by hand: sorted p times (m - i), made monotone, capped at 1
    ps = out["p"].sort_values()
    by_hand = np.minimum(1, np.maximum.accumulate(ps.to_numpy() * np.array([3, 2, 1])))
    np.testing.assert_allclose(out.loc[ps.index, "p_holm"].to_numpy(), by_hand)
    assert bool(out.loc["a", "significant"]) and out.loc["a", "p"] == pytest.approx(2 / 2**9)  # 9 of 9 ahead: exact


@pytest.mark.slow  # imports statsmodels
def test_wilcoxon_holm_leaves_untestable_penalties_out_of_the_correction():
    from topodecorr.experiments.stats import wilcoxon_holm

    sel = _nested({"none": 0.0, "same": 0.0, "a": 0.02}, datasets=1, networks=4, noise=0.0)
    sel.loc[sel["penalty"] == "same", "test_acc"] = sel.loc[sel["penalty"] == "none", "test_acc"].to_numpy()
    out = wilcoxon_holm(sel)
    assert math.isnan(out.loc["same", "p"]) and math.isnan(out.loc["same", "p_holm"])
    assert not out.loc["same", "significant"]
    assert out.loc["a", "p_holm"] == pytest.approx(out.loc["a", "p"])  # the only test in the family
    one = wilcoxon_holm(_nested({"none": 0.0, "a": 0.01}, datasets=1, networks=1))
    assert one.loc["a", "blocks"] == 1 and math.isnan(one.loc["a", "p"])


def test_hierarchical_bootstrap_carries_the_variation_between_blocks():
    from topodecorr.experiments.stats import hierarchical_bootstrap

    # every seed of a block has the same difference, blocks differ: resampling seeds alone sees no spread
    diffs = [0.03, -0.01, 0.02, 0.0, 0.05, -0.02]
    rows = []
    for b, d in enumerate(diffs):
        for s in range(4):
            base = 0.7 + 0.01 * s
            rows += [dict(dataset="d", network=f"n{b}", seed=s, penalty="none", test_acc=base),
                     dict(dataset="d", network=f"n{b}", seed=s, penalty="t1", test_acc=base + d)]
    sel = pd.DataFrame(rows)
    within, _ = differences_to_baseline(sel)
    assert within.loc["t1", "high"] - within.loc["t1", "low"] == pytest.approx(0.0, abs=1e-12)
    hier = hierarchical_bootstrap(sel, n_resamples=20_000)
    assert hier.loc["t1", "mean"] == pytest.approx(np.mean(diffs))
    # here the hierarchical bootstrap is the bootstrap of the block means: scipy's percentile interval
    ref = scipy.stats.bootstrap((np.array(diffs),), np.mean, n_resamples=20_000, method="percentile",
                                random_state=np.random.default_rng(1)).confidence_interval
    assert hier.loc["t1", "low"] == pytest.approx(ref.low, abs=0.003)
    assert hier.loc["t1", "high"] == pytest.approx(ref.high, abs=0.003)
    assert hier.equals(hierarchical_bootstrap(sel, n_resamples=20_000))  # seeded: reproducible
    assert (hier.loc["t1", "blocks"], hier.loc["t1", "pairs"]) == (6, 24)
    with pytest.raises(ValueError, match="confidence"):
        hierarchical_bootstrap(sel, confidence=1.0)


def test_hierarchical_bootstrap_is_wider_than_seeds_alone_on_nested_data():
    from topodecorr.experiments.stats import hierarchical_bootstrap

    sel = _nested({"none": 0.0, "a": 0.01}, seed=3)
    rng = np.random.default_rng(7)
    block_shift = {(d, n): rng.normal(0, 0.01) for d in sel["dataset"].unique() for n in sel["network"].unique()}
    hit = sel["penalty"] == "a"
    sel.loc[hit, "test_acc"] += [block_shift[(d, n)] for d, n in zip(sel.loc[hit, "dataset"], sel.loc[hit, "network"])]
    within, _ = differences_to_baseline(sel)
    hier = hierarchical_bootstrap(sel)
    assert hier.loc["a", "mean"] == pytest.approx(within.loc["a", "mean"])
    assert hier.loc["a", "high"] - hier.loc["a", "low"] > 1.5 * (within.loc["a", "high"] - within.loc["a", "low"])


def test_dataset_comparison_counts_each_data_set_once():
    from topodecorr.experiments.stats import block_means, dataset_comparison

    sel = _nested({"none": 0.0, "a": 0.02, "b": -0.01})
    comp = dataset_comparison(sel, penalties=["none", "a", "b"])
    table, _, _ = block_means(sel, ["none", "a", "b"])
    expected = table.groupby(table.index.str.split("/").str[0]).mean()
    pd.testing.assert_frame_equal(comp.table.sort_index(), expected.sort_index(), check_names=False)
    ref = scipy.stats.friedmanchisquare(*[expected[c].to_numpy() for c in ["none", "a", "b"]])
    assert comp.n == 3 and comp.friedman_p == pytest.approx(ref.pvalue)
    assert list(comp.seeds) == [3, 3, 3]  # blocks per data set


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The MLE may be on the boundary")
def test_mixed_model_agrees_with_statsmodels_and_recovers_the_effects():
    import statsmodels.formula.api as smf

    from topodecorr.experiments.stats import mixed_model

    effects = {"none": 0.0, "a": 0.02, "b": 0.0, "c": -0.01}
    sel = _nested(effects, seed=2)
    got = mixed_model(sel, "none", ["none", "a", "b", "c"])
    df = sel.copy()
    df["net"] = df["dataset"] + "/" + df["network"]
    df["unit"] = df["net"] + "/" + df["seed"].astype(str)
    df["penalty"] = pd.Categorical(df["penalty"], categories=["none", "a", "b", "c"])
    vc = {"network": "0 + C(net)", "seed": "0 + C(unit)"}
    full = smf.mixedlm("test_acc ~ penalty", df, groups=df["dataset"], vc_formula=vc).fit(reml=False, method=["lbfgs"])
    null = smf.mixedlm("test_acc ~ 1", df, groups=df["dataset"], vc_formula=vc).fit(reml=False, method=["lbfgs"])
    for p in ("a", "b", "c"):
        assert got.coefficients.loc[p, "estimate"] == pytest.approx(full.fe_params[f"penalty[T.{p}]"], rel=1e-6)
        assert got.coefficients.loc[p, "se"] == pytest.approx(full.bse_fe[f"penalty[T.{p}]"], rel=1e-4)
        assert got.coefficients.loc[p, "estimate"] == pytest.approx(effects[p], abs=0.003)
    assert got.lr_statistic == pytest.approx(2 * (full.llf - null.llf), rel=1e-6)
    assert got.df == 3 and got.p == pytest.approx(scipy.stats.chi2.sf(got.lr_statistic, 3))
    assert got.p < 1e-6 and "dataset:network:seed" in got.formula
    none_only = mixed_model(sel[sel["penalty"] == "a"])
    assert none_only.coefficients.empty and "not computed" in none_only.notes[0]


def test_two_sweeps_of_one_data_set_are_one_unit():
    """MLPs and CNNs of one data set in two sweeps (labels differ) count as one data set."""
    from topodecorr.experiments.stats import dataset_comparison

    sel = _nested({"none": 0.0, "a": 0.02, "b": -0.01}, datasets=4)
    sel["data"] = sel["dataset"].replace({"d3": "d0"})  # "d3" is a second sweep of data set d0
    comp = dataset_comparison(sel, penalties=["none", "a", "b"])
    assert list(comp.table.index) == ["d0", "d1", "d2"] and list(comp.seeds) == [6, 3, 3]
