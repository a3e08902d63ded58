"""Figures of the report (matplotlib, Agg backend; PNG, plus SVG for the CD diagram).

Every function takes plain data (arrays, dicts) and a path stem, writes the
files and returns their paths, so it can be used outside the report too.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["cd_diagram", "death_histograms", "correlation_heatmaps", "training_curves"]


def _save(fig, stem: Path, svg: bool = False) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png")]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    if svg:
        paths.append(stem.with_suffix(".svg"))
        fig.savefig(paths[1], bbox_inches="tight")
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

    Parameters
    ----------
    deaths : dict penalty -> dict network -> 1-D array
        Deaths pooled over the seeds of the chosen runs.
    """
    penalties = list(deaths)
    rows, cols = _grid(len(penalties))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharex=True)
    bins = np.linspace(0.0, 1.0, 41)
    networks = sorted({net for per in deaths.values() for net in per})
    colours = {net: plt.cm.tab10(i % 10) for i, net in enumerate(networks)}
    for ax, penalty in zip(axes.flat, penalties):
        for net, d in deaths[penalty].items():
            if d is not None and len(d):
                ax.hist(d, bins=bins, density=True, histtype="step", lw=1.4, color=colours[net], label=net)
        ax.set_title(penalty, fontsize=10)
        ax.set_xlim(0, 1)
    for ax in list(axes.flat)[len(penalties):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("death = 1 - |corr| of an MST edge", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize=8, frameon=False)
    fig.suptitle("MST deaths at the end of training (chosen weight, probe batch)", fontsize=11)
    fig.tight_layout()
    return _save(fig, stem)


def correlation_heatmaps(matrices: dict[str, np.ndarray], stem: Path, network: str = "") -> list[Path]:
    """Correlation matrices of one network per penalty (neurons ordered by layer)."""
    penalties = list(matrices)
    rows, cols = _grid(len(penalties))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), squeeze=False)
    im = None
    for ax, penalty in zip(axes.flat, penalties):
        im = ax.imshow(matrices[penalty], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(penalty, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(penalties):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="Pearson correlation")
    fig.suptitle(f"Neuron correlations at the end of training {network}".strip(), fontsize=11)
    return _save(fig, stem)


def training_curves(curves: dict[str, list[dict]], stem: Path, title: str = "") -> list[Path]:
    """Validation accuracy, training loss and mean MST death per epoch, one line per penalty."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("val_acc", "validation accuracy"), ("train_loss", "training loss (task)"), ("mean_death", "mean MST death (probe)")]
    for penalty, epochs in curves.items():
        x = [e["epoch"] + 1 for e in epochs]
        for ax, (key, _) in zip(axes, panels):
            y = [np.nan if e.get(key) is None else e[key] for e in epochs]
            ax.plot(x, y, lw=1.3, label=penalty)
    for ax, (key, label) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, stem)
