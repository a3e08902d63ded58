"""Figures of the report (matplotlib, Agg backend; PNG, plus SVG for the CD diagram).

Every function takes plain data (arrays, dicts) and a path stem, writes the
files and returns their paths, so it can be used outside the report too. The
files are reproducible: the same data give the same bytes (no creation date in
the SVG, a fixed SVG id salt).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: Deaths at least this close to 1 belong to dead neurons (correlation 0 with every other neuron).
DEAD_DEATH = 1.0 - 1e-6

__all__ = ["cd_diagram", "death_histograms", "correlation_heatmaps", "training_curves", "forest_plot"]


def _save(fig, stem: Path, svg: bool = False, tight: bool = True) -> list[Path]:
    """Write ``stem.png`` (and ``stem.svg``); ``tight`` crops to the drawn content (one more draw: a
    figure laid out by ``tight_layout`` does without)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png")]
    with matplotlib.rc_context({"svg.hashsalt": "topodecorr"}):
        fig.savefig(paths[0], dpi=130, bbox_inches="tight" if tight else None, metadata={"Software": None})
        if svg:
            paths.append(stem.with_suffix(".svg"))
            fig.savefig(paths[1], bbox_inches="tight" if tight else None, metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return paths


def cd_diagram(average_ranks, nemenyi, cd: float | None, stem: Path, title: str = "") -> list[Path]:
    """Critical-difference diagram (scikit-posthocs) of average ranks, PNG and SVG.

    Parameters
    ----------
    average_ranks : pandas Series
        Average rank per penalty (1 = best).
    nemenyi : pandas DataFrame
        Pairwise Nemenyi p-values; penalties joined by a bar do not differ at alpha.
    cd : float or None
        The critical difference, shown in the title.
    """
    import scikit_posthocs

    k = len(average_ranks)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * k))
    scikit_posthocs.critical_difference_diagram(average_ranks.to_dict(), nemenyi, ax=ax)
    # the rank scale runs from 1 to k whatever the ranks came out as: scikit-posthocs crops the
    # axis to the ranks drawn, so the best possible rank, 1, had no tick
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.9), max(hi, k + 0.1))
    ax.set_xticks(range(1, k + 1))
    label = "average rank (1 = best)"
    if cd is not None:
        label += f"; Nemenyi CD = {cd:.2f}"
    ax.set_title(title or label, fontsize=10)
    if title:
        ax.set_xlabel(label, fontsize=9)
    return _save(fig, stem, svg=True)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def death_histograms(deaths: dict[str, dict[str, np.ndarray]], stem: Path) -> list[Path]:
    """Histograms of end-of-training MST deaths, one panel per penalty, one colour per network.

    Deaths below 1 fall into 40 bins on [0, 1); the deaths of dead neurons (exactly 1)
    get a bar of their own to the right, set apart from the axis edge, so neither hides
    the other. Heights are the share of each network's deaths (they add up to 1).

    Parameters
    ----------
    deaths : dict penalty -> dict network -> 1-D array
        Deaths pooled over the seeds of the chosen runs.
    """
    penalties = list(deaths)
    rows, cols = _grid(len(penalties))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, sharex=True)
    bins = np.linspace(0.0, 1.0, 41)
    dead_x, dead_w = 1.1, 0.05  # the dead neurons' bar: [1.075, 1.125]
    networks = sorted({net for per in deaths.values() for net in per})
    colours = {net: plt.cm.tab10(i % 10) for i, net in enumerate(networks)}
    offsets = {net: (i - (len(networks) - 1) / 2) * dead_w / max(1, len(networks)) for i, net in enumerate(networks)}
    for ax, penalty in zip(axes.flat, penalties):
        live_top, dead_bars = 0.0, []
        for net, d in deaths[penalty].items():
            if d is None or not len(d):
                continue
            d = np.asarray(d, dtype=float)
            dead = d >= DEAD_DEATH
            live = d[~dead]
            share = np.full(live.shape, 1.0 / d.size)
            heights, _, _ = ax.hist(live, bins=bins, weights=share, histtype="step", lw=1.4, color=colours[net],
                                    label=net)
            live_top = max(live_top, float(np.max(heights, initial=0.0)))
            if dead.any():
                dead_bars.append((dead_x + offsets[net], float(dead.mean()), colours[net]))
                ax.bar(dead_bars[-1][0], dead_bars[-1][1], width=dead_w / max(1, len(networks)),
                       color=colours[net], alpha=0.8)
        if live_top > 0 and dead_bars and max(h for _, h, _ in dead_bars) > 2.5 * live_top:
            # a tall dead-neuron bar would flatten the live histogram: cut it and print its height
            top = 1.45 * live_top
            ax.set_ylim(0, top)
            for i, (x, h, colour) in enumerate(dead_bars):
                if h > top:
                    ax.text(x, top * (0.97 - 0.1 * i), f"{h:.2f}", color=colour, fontsize=6, ha="right", va="top")
        ax.axvline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_title(penalty, fontsize=10)
        ax.set_xlim(0, dead_x + 0.75 * dead_w)
        ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0, dead_x])
        ax.set_xticklabels(["0", ".25", ".5", ".75", "1", "dead"], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(penalties):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("death = 1 - |corr| of an MST edge", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of deaths", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("MST deaths at the end of training (chosen weight, probe batch)", fontsize=11)
    if handles:  # one row of networks under the panels, never over one
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 / rows, 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, stem, tight=False)


def correlation_heatmaps(matrices: dict[str, np.ndarray], stem: Path, network: str = "",
                         boundaries: dict[str, list[int]] | None = None,
                         layer_names: dict[str, list[str]] | None = None) -> list[Path]:
    """Correlation matrices of one network per penalty (neurons ordered by layer).

    Parameters
    ----------
    matrices : dict penalty -> (m, m) array
    boundaries : dict penalty -> list of int, optional
        Indices where a new layer starts (0 < b < m); drawn as lines.
    layer_names : dict penalty -> list of str, optional
        One name per layer (``len(boundaries) + 1``), written along the left edge of the
        panels in the first column.
    """
    penalties = list(matrices)
    rows, cols = _grid(len(penalties))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.02, top=0.86, wspace=0.12, hspace=0.22)
    im = None
    for i, (ax, penalty) in enumerate(zip(axes.flat, penalties)):
        m = matrices[penalty]
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(penalty, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        cuts = list((boundaries or {}).get(penalty) or [])
        for b in cuts:
            ax.axhline(b - 0.5, color="k", lw=0.7)
            ax.axvline(b - 0.5, color="k", lw=0.7)
        names = (layer_names or {}).get(penalty)
        if names and len(names) == len(cuts) + 1 and i % cols == 0:  # first column only: labels cost time
            edges = [0] + cuts + [m.shape[0]]
            ax.set_yticks([(lo + hi - 1) / 2 for lo, hi in zip(edges[:-1], edges[1:])])
            ax.set_yticklabels(names, fontsize=6)
            ax.tick_params(axis="y", length=0, pad=1)
    for ax in list(axes.flat)[len(penalties):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="Pearson correlation")
    fig.suptitle(f"Neuron correlations at the end of training {network}".strip(), fontsize=11)
    return _save(fig, stem, tight=False)


def training_curves(curves: dict[str, list[dict]], stem: Path, title: str = "", baseline: str = "none") -> list[Path]:
    """Validation accuracy, training loss and mean MST death per epoch, one line per penalty.

    The curve named ``baseline`` (the unregularised run) is drawn on top, black and dashed.
    """
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("val_acc", "validation accuracy"), ("train_loss", "training loss (task)"),
              ("mean_death", "mean MST death (probe)")]
    # the unregularised baseline is drawn last, black, thick and dashed, so no curve hides it
    order = sorted(curves, key=lambda name: name == baseline)
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(n for n in curves if n != baseline)}
    for penalty in order:
        epochs = curves[penalty]
        x = [e["epoch"] + 1 for e in epochs]
        if penalty == baseline:
            style = dict(color="k", lw=2.2, ls="--", zorder=5)
        else:
            style = dict(color=colours[penalty], lw=1.2)
        for ax, (key, _) in zip(axes, panels):
            y = [np.nan if e.get(key) is None else e[key] for e in epochs]
            ax.plot(x, y, label=penalty, **style)
    for ax, (key, label) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, stem, tight=False)


def forest_plot(per_block, stem: Path, baseline: str = "none") -> list[Path]:
    """Effect sizes per block: the difference to ``baseline`` with its interval, one panel per penalty (PNG).

    Parameters
    ----------
    per_block : pandas DataFrame
        Columns ``block, penalty, mean, low, high`` (accuracy differences; NaN bounds draw a point only),
        as :func:`topodecorr.experiments.stats.differences_to_baseline` returns.
    """
    penalties = list(dict.fromkeys(per_block["penalty"]))
    blocks = list(dict.fromkeys(per_block["block"]))
    rows, cols = _grid(len(penalties))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.9 + 0.28 * len(blocks) * rows),
                             sharey=True, sharex=True, squeeze=False)
    y = {b: len(blocks) - 1 - i for i, b in enumerate(blocks)}
    for k, ax in enumerate(axes.flat):
        if k >= len(penalties):
            ax.axis("off")
            continue
        part = per_block[per_block["penalty"] == penalties[k]]
        ys = np.array([y[b] for b in part["block"]])
        mean = 100 * part["mean"].to_numpy(dtype=float)
        low, high = 100 * part["low"].to_numpy(dtype=float), 100 * part["high"].to_numpy(dtype=float)
        err = np.vstack([np.where(np.isfinite(low), mean - low, 0), np.where(np.isfinite(high), high - mean, 0)])
        ax.errorbar(mean, ys, xerr=err, fmt="o", ms=3, lw=1, color="C0")
        ax.axvline(0, color="0.5", lw=0.8, ls="--")
        ax.set_title(penalties[k], fontsize=9)
        ax.set_yticks(range(len(blocks)), list(reversed(blocks)), fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        if k // cols == rows - 1:
            ax.set_xlabel(f"test accuracy - {baseline} (points)", fontsize=8)
    fig.tight_layout()
    return _save(fig, stem, tight=False)
