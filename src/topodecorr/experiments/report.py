"""The Markdown report of a sweep: ``topodecorr report DIR`` writes ``DIR/report.md``.

Contents: the test-accuracy table at the weight chosen by validation accuracy,
the Friedman / Nemenyi comparison with average ranks and the
critical-difference diagram (:mod:`topodecorr.experiments.stats`), per-penalty
histograms of the MST deaths at the end of training, correlation heat maps of
one network per penalty, training curves, run counts and timings, the exact
configuration and the software versions. Figures go to ``DIR/figures/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .stats import Comparison, compare, describe, select_best
from .store import ResultStore, StoreError
from .sweep import DB_NAME

__all__ = ["write_report", "summary_table", "markdown_table"]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    Examples
    --------
    >>> print(markdown_table(["a", "b"], [[1, 0.5]]))
    | a | b |
    |---|---|
    | 1 | 0.5000 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def summary_table(selected: pd.DataFrame, comp: Comparison, penalties: list[str]) -> str:
    """Mean test accuracy (± std over seeds) per network and penalty, plus average ranks."""
    desc = describe(selected)
    cols = [p for p in penalties if not desc.empty and p in set(desc["penalty"])]
    rows = []
    for net in (sorted(desc["network"].unique()) if not desc.empty else []):
        row: list[Any] = [net]
        for p in cols:
            hit = desc[(desc["network"] == net) & (desc["penalty"] == p)]
            if hit.empty:
                row.append("–")
            else:
                m, s = hit["mean"].iloc[0], hit["std"].iloc[0]
                row.append(f"{m:.4f}" + (f" ± {s:.4f}" if isinstance(s, float) and math.isfinite(s) else ""))
        rows.append(row)
    if len(comp.average_ranks):
        rows.append(["**average rank**"] + [_fmt(comp.average_ranks.get(p), 2) for p in cols])
    return markdown_table(["network"] + cols, rows)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def write_report(out_dir: str | Path, alpha: float = 0.05) -> tuple[Path, str]:
    """Write ``out_dir/report.md`` (and figures) from the sweep's database.

    Returns
    -------
    (Path, str)
        The report's path and the summary table (Markdown) for printing.

    Raises
    ------
    StoreError
        ``out_dir`` holds no readable results database.
    """
    from . import plots

    root = Path(out_dir)
    db = root / DB_NAME
    if not db.exists():
        raise StoreError(f"no results database {DB_NAME} in {root}; run `topodecorr sweep` into that folder first")
    store = ResultStore(db, create=False)
    try:
        config = store.sweep_config() or {}
        versions = json.loads(store.meta("versions", "{}") or "{}")
        runs = store.runs()
        penalties = list(config.get("penalties", sorted({r["penalty"] for r in runs})))
        networks = [n["label"] for n in config.get("networks", [])] or sorted({r["network"] for r in runs})
        selected = select_best(runs)
        comp = compare(selected, alpha=alpha, penalties=penalties)
        figs = root / "figures"
        figs.mkdir(exist_ok=True)
        chosen = {
            (r.network, int(r.seed), r.penalty): float(r.weight) for r in selected.itertuples()
        } if not selected.empty else {}
        by_key = {(r["network"], r["seed"], r["penalty"], float(r["weight"])): r for r in runs}

        md: list[str] = []
        name = config.get("name", root.name)
        md.append(f"# Sweep `{name}`: report\n")
        if config.get("description"):
            md.append(config["description"].strip() + "\n")
        counts = store.counts()
        md.append(
            f"Dataset **{config.get('dataset', '?')}**; networks {', '.join(networks)}; "
            f"penalties {', '.join(penalties)}; weights {config.get('weights')}; seeds {config.get('seeds')}.\n\n"
            "Runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".\n"
        )
        data_meta = json.loads(store.meta("data", "{}") or "{}")
        if data_meta:
            md.append(
                f"Data: {data_meta.get('source')}; samples {data_meta.get('sizes')}, input shape "
                f"{tuple(data_meta.get('input_shape', ()))}, {data_meta.get('num_classes')} classes.\n"
            )
        if counts.get("pending") or counts.get("running"):
            md.append("> **The sweep is incomplete**: the tables below use the finished runs only.\n")

        md.append("## Test accuracy\n")
        md.append(
            "For every network, seed and penalty the weight with the best validation accuracy is chosen "
            "(diverged runs dropped), as in the paper; the table gives its test accuracy, mean ± std over "
            "seeds, and the average Friedman rank over all (network, seed) blocks (1 = best).\n"
        )
        table = summary_table(selected, comp, penalties)
        md.append(table + "\n")
        if not comp.table.empty:
            md.append("Per block (test accuracy, chosen weight in brackets):\n")
            rows = []
            for block in comp.table.index:
                rows.append([block] + [f"{comp.table.loc[block, p]:.4f} ({comp.weights.loc[block, p]:g})" for p in comp.table.columns])
            md.append(markdown_table(["network/seed"] + list(comp.table.columns), rows) + "\n")

        md.append("## Statistical comparison\n")
        md.append(comp.summary() + "\n")
        md.append(
            "Blocks are (network, seed) pairs. Seeds of one network are not independent data sets (the paper "
            "had one run per network), so with several seeds the p-values are optimistic; the per-network "
            "means above show how much of a difference is seed noise.\n"
        )
        for note in comp.notes:
            md.append(f"- {note}")
        md.append("")
        if comp.nemenyi is not None:
            paths = plots.cd_diagram(comp.average_ranks, comp.nemenyi, comp.cd, figs / "cd_diagram")
            md.append(f"![critical-difference diagram]({_rel(paths[0], root)})\n")
            md.append(f"(SVG: [{_rel(paths[1], root)}]({_rel(paths[1], root)}))\n")
            md.append("Nemenyi post-hoc p-values:\n")
            cols = list(comp.nemenyi.columns)
            md.append(markdown_table([""] + cols, [[r] + [comp.nemenyi.loc[r, c] for c in cols] for r in cols]) + "\n")

        # deaths at the end of training, for the chosen weight, pooled over seeds
        deaths: dict[str, dict[str, np.ndarray]] = {}
        death_rows = []
        for p in penalties:
            per_net: dict[str, np.ndarray] = {}
            for net in networks:
                arrays = []
                for (n_, seed, p_), w in chosen.items():
                    if n_ == net and p_ == p:
                        row = by_key.get((net, seed, p, w))
                        d = store.deaths(row["id"]) if row else None
                        if d is not None:
                            arrays.append(d)
                if arrays:
                    per_net[net] = np.concatenate(arrays)
            if per_net:
                deaths[p] = per_net
                allv = np.concatenate(list(per_net.values()))
                death_rows.append([p, float(allv.min()), float(np.quantile(allv, 0.1)), float(np.median(allv)), float(allv.mean())])
        md.append("## MST deaths at the end of training\n")
        if deaths:
            paths = plots.death_histograms(deaths, figs / "death_histograms")
            md.append(
                "Zero-dimensional persistence deaths (MST edge weights of 1 - |corr|) of the final networks on a fixed "
                "validation probe batch; low deaths are strongly correlated neuron pairs. The bar at 1 holds the "
                "dead neurons (constant on the probe: correlation 0 with every other neuron).\n"
            )
            md.append(f"![death histograms]({_rel(paths[0], root)})\n")
            md.append(markdown_table(["penalty", "min", "10%", "median", "mean"], death_rows) + "\n")
        else:
            md.append("No finished run stored its deaths.\n")

        # correlation heat maps: the first network's first seed, chosen weight
        md.append("## Correlation heat maps\n")
        mats: dict[str, np.ndarray] = {}
        if networks and config.get("seeds"):
            net0, seed0 = networks[0], int(config["seeds"][0])
            for p in penalties:
                w = chosen.get((net0, seed0, p))
                row = by_key.get((net0, seed0, p, w)) if w is not None else None
                m = store.correlation(row["id"]) if row else None
                if m is not None:
                    mats[p] = m
            if mats:
                paths = plots.correlation_heatmaps(mats, figs / "correlations", network=f"({net0}, seed {seed0})")
                md.append(
                    f"Pearson correlations of up to {max(m.shape[0] for m in mats.values())} neurons spread evenly over "
                    f"the layers of `{net0}` (seed {seed0}, chosen weight), ordered by layer.\n"
                )
                md.append(f"![correlation heat maps]({_rel(paths[0], root)})\n")
        if not mats:
            md.append("No correlation matrix stored.\n")

        md.append("## Training curves\n")
        curves_written = False
        if networks and config.get("seeds"):
            net0, seed0 = networks[0], int(config["seeds"][0])
            curves = {}
            for p in penalties:
                w = chosen.get((net0, seed0, p))
                row = by_key.get((net0, seed0, p, w)) if w is not None else None
                if row:
                    curves[f"{p} ({w:g})" if p != "none" else p] = store.epochs(row["id"])
            if curves:
                paths = plots.training_curves(curves, figs / "training_curves", title=f"{net0}, seed {seed0}, chosen weights")
                md.append(f"![training curves]({_rel(paths[0], root)})\n")
                curves_written = True
        if not curves_written:
            md.append("No finished run to plot.\n")

        md.append("## Runs\n")
        timing_rows = []
        for p in penalties:
            rs = [r for r in runs if r["penalty"] == p and r["status"] in ("done", "diverged")]
            if rs:
                ep = [r["epoch_s"] for r in rs if r["epoch_s"] is not None]
                timing_rows.append([
                    p, len(rs), sum(r["status"] == "diverged" for r in rs),
                    f"{np.mean([r['epochs'] or 0 for r in rs]):.1f}",
                    f"{np.median(ep):.3f}" if ep else None,
                    f"{sum(r['wall_s'] or 0 for r in rs):.1f}",
                ])
        md.append(markdown_table(["penalty", "runs", "diverged", "mean epochs", "median epoch s", "total wall s"], timing_rows) + "\n")
        bad = [r for r in runs if r["status"] in ("diverged", "failed")]
        if bad:
            md.append("Diverged or failed runs:\n")
            md.append(markdown_table(
                ["network", "penalty", "weight", "seed", "status", "reason"],
                [[r["network"], r["penalty"], f"{r['weight']:g}", r["seed"], r["status"],
                  (r["error"] or "").splitlines()[0][:120] if r["error"] else ""] for r in bad],
            ) + "\n")

        md.append("## Configuration\n")
        md.append("```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```\n")
        md.append("## Software versions\n")
        md.append(markdown_table(["package", "version"], [[k, v] for k, v in sorted(versions.items())]) + "\n")
        path = root / "report.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text("\n".join(md), encoding="utf-8")
        tmp.replace(path)
        printed = table + "\n\n" + comp.summary()
        return path, printed
    finally:
        store.close()
