"""The Markdown report of a sweep: ``topodecorr report DIR`` writes ``DIR/report.md``.

Contents: the test-accuracy table at the weight chosen by validation accuracy,
the Friedman / Nemenyi comparison with average ranks and the
critical-difference diagram (:mod:`topodecorr.experiments.stats`), per-penalty
histograms of the MST deaths at the end of training, correlation heat maps of
one network per penalty, training curves, run counts and timings, the exact
configuration and the software versions. Figures go to ``DIR/figures/``.

The report is built from one function per section; each returns its Markdown
lines and reads only the database (through :class:`SweepData`), so the same
database always gives the same report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .stats import Comparison, compare, describe, select_best
from .store import DB_NAME, ResultStore, StoreError

__all__ = ["write_report", "summary_table", "markdown_table", "SweepData"]


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


# -- the data of one sweep -------------------------------------------------------------------


@dataclass
class SweepData:
    """Everything the report reads from one sweep folder's database.

    Attributes
    ----------
    root : Path
        The sweep folder.
    store : ResultStore
        The open database (closed by :meth:`close`); deaths, curves and correlation
        matrices are read from it on demand.
    config, versions, data : dict
        The stored sweep configuration, software versions and data description.
    runs : list of dict
        Every run row, ordered by id.
    counts : dict
        Runs per status.
    selected : DataFrame
        :func:`~topodecorr.experiments.stats.select_best` of ``runs``: the chosen weight
        per (network, seed, penalty).
    """

    root: Path
    store: ResultStore
    config: dict
    versions: dict
    data: dict
    runs: list[dict]
    counts: dict
    selected: pd.DataFrame

    def __post_init__(self) -> None:
        by_key = {(r["network"], r["seed"], r["penalty"], float(r["weight"])): r for r in self.runs}
        self._chosen = {
            (s.network, int(s.seed), s.penalty): by_key[(s.network, int(s.seed), s.penalty, float(s.weight))]
            for s in self.selected.itertuples()
        }

    @classmethod
    def load(cls, root: str | Path) -> "SweepData":
        """Open ``root/results.sqlite`` read-only in spirit (nothing is written).

        Raises
        ------
        StoreError
            ``root`` holds no readable results database.
        """
        root = Path(root)
        db = root / DB_NAME
        if not db.exists():
            raise StoreError(f"no results database {DB_NAME} in {root}; run `topodecorr sweep` into that folder first")
        store = ResultStore(db, create=False)
        try:
            runs = store.runs()
            return cls(
                root=root,
                store=store,
                config=store.sweep_config() or {},
                versions=json.loads(store.meta("versions", "{}") or "{}"),
                data=json.loads(store.meta("data", "{}") or "{}"),
                runs=runs,
                counts=store.counts(),
                selected=select_best(runs),
            )
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    @property
    def name(self) -> str:
        return self.config.get("name", self.root.name)

    @property
    def penalties(self) -> list[str]:
        return list(self.config.get("penalties", sorted({r["penalty"] for r in self.runs})))

    @property
    def networks(self) -> list[str]:
        return [n["label"] for n in self.config.get("networks", [])] or sorted({r["network"] for r in self.runs})

    @property
    def first_block(self) -> tuple[str, int] | None:
        """The (network, seed) whose heat maps and curves are shown: the first of each."""
        if self.networks and self.config.get("seeds"):
            return self.networks[0], int(self.config["seeds"][0])
        return None

    def chosen(self, network: str, seed: int, penalty: str) -> dict | None:
        """The run row of the weight chosen for (network, seed, penalty), or None."""
        return self._chosen.get((network, int(seed), penalty))

    def chosen_runs(self, network: str, penalty: str) -> list[dict]:
        """The chosen run of every seed of (network, penalty), in seed order."""
        keys = sorted(k for k in self._chosen if k[0] == network and k[2] == penalty)
        return [self._chosen[k] for k in keys]


# -- sections -------------------------------------------------------------------------------


def _header(sweep: SweepData) -> list[str]:
    config, counts = sweep.config, sweep.counts
    md = [f"# Sweep `{sweep.name}`: report\n"]
    if config.get("description"):
        md.append(config["description"].strip() + "\n")
    md.append(
        f"Dataset **{config.get('dataset', '?')}**; networks {', '.join(sweep.networks)}; "
        f"penalties {', '.join(sweep.penalties)}; weights {config.get('weights')}; seeds {config.get('seeds')}.\n\n"
        "Runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".\n"
    )
    data = sweep.data
    if data:
        md.append(
            f"Data: {data.get('source')}; samples {data.get('sizes')}, input shape "
            f"{tuple(data.get('input_shape', ()))}, {data.get('num_classes')} classes.\n"
        )
    if counts.get("pending") or counts.get("running"):
        md.append("> **The sweep is incomplete**: the tables below use the finished runs only.\n")
    return md


def _accuracy_section(sweep: SweepData, comp: Comparison, table: str) -> list[str]:
    md = ["## Test accuracy\n"]
    md.append(
        "For every network, seed and penalty the weight with the best validation accuracy is chosen "
        "(diverged runs dropped), as in the paper; the table gives its test accuracy, mean ± std over "
        "seeds, and the average Friedman rank over all (network, seed) blocks (1 = best).\n"
    )
    md.append(table + "\n")
    if not comp.table.empty:
        md.append("Per block (test accuracy, chosen weight in brackets):\n")
        rows = [
            [block] + [f"{comp.table.loc[block, p]:.4f} ({comp.weights.loc[block, p]:g})" for p in comp.table.columns]
            for block in comp.table.index
        ]
        md.append(markdown_table(["network/seed"] + list(comp.table.columns), rows) + "\n")
    return md


def _comparison_section(comp: Comparison, figs: Path, root: Path) -> list[str]:
    from . import plots

    md = ["## Statistical comparison\n", comp.summary() + "\n"]
    md.append(
        "Blocks are (network, seed) pairs. Seeds of one network are not independent data sets (the paper "
        "had one run per network), so with several seeds the p-values are optimistic; the per-network "
        "means above show how much of a difference is seed noise.\n"
    )
    md += [f"- {note}" for note in comp.notes]
    md.append("")
    if comp.nemenyi is not None:
        paths = plots.cd_diagram(comp.average_ranks, comp.nemenyi, comp.cd, figs / "cd_diagram")
        md.append(f"![critical-difference diagram]({_rel(paths[0], root)})\n")
        md.append(f"(SVG: [{_rel(paths[1], root)}]({_rel(paths[1], root)}))\n")
        md.append("Nemenyi post-hoc p-values:\n")
        cols = list(comp.nemenyi.columns)
        md.append(markdown_table([""] + cols, [[r] + [comp.nemenyi.loc[r, c] for c in cols] for r in cols]) + "\n")
    return md


def _deaths_section(sweep: SweepData, figs: Path) -> list[str]:
    """Deaths at the end of training of the chosen runs, pooled over seeds."""
    from . import plots

    deaths: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for p in sweep.penalties:
        per_net: dict[str, np.ndarray] = {}
        for net in sweep.networks:
            arrays = [d for d in (sweep.store.deaths(r["id"]) for r in sweep.chosen_runs(net, p)) if d is not None]
            if arrays:
                per_net[net] = np.concatenate(arrays)
        if per_net:
            deaths[p] = per_net
            allv = np.concatenate(list(per_net.values()))
            rows.append([p, float(allv.min()), float(np.quantile(allv, 0.1)), float(np.median(allv)), float(allv.mean())])
    md = ["## MST deaths at the end of training\n"]
    if not deaths:
        return md + ["No finished run stored its deaths.\n"]
    paths = plots.death_histograms(deaths, figs / "death_histograms")
    md.append(
        "Zero-dimensional persistence deaths (MST edge weights of 1 - |corr|) of the final networks on a fixed "
        "validation probe batch; low deaths are strongly correlated neuron pairs. The bar at 1 holds the "
        "dead neurons (constant on the probe: correlation 0 with every other neuron).\n"
    )
    md.append(f"![death histograms]({_rel(paths[0], sweep.root)})\n")
    md.append(markdown_table(["penalty", "min", "10%", "median", "mean"], rows) + "\n")
    return md


def _heatmap_section(sweep: SweepData, figs: Path) -> list[str]:
    """Correlation heat maps of the first network's first seed at the chosen weight."""
    from . import plots

    md = ["## Correlation heat maps\n"]
    mats: dict[str, np.ndarray] = {}
    block = sweep.first_block
    if block is not None:
        net0, seed0 = block
        for p in sweep.penalties:
            row = sweep.chosen(net0, seed0, p)
            m = sweep.store.correlation(row["id"]) if row else None
            if m is not None:
                mats[p] = m
    if not mats:
        return md + ["No correlation matrix stored.\n"]
    paths = plots.correlation_heatmaps(mats, figs / "correlations", network=f"({net0}, seed {seed0})")
    md.append(
        f"Pearson correlations of up to {max(m.shape[0] for m in mats.values())} neurons spread evenly over "
        f"the layers of `{net0}` (seed {seed0}, chosen weight), ordered by layer.\n"
    )
    md.append(f"![correlation heat maps]({_rel(paths[0], sweep.root)})\n")
    return md


def _curves_section(sweep: SweepData, figs: Path) -> list[str]:
    """Training curves of the first network's first seed at the chosen weights."""
    from . import plots

    md = ["## Training curves\n"]
    curves = {}
    block = sweep.first_block
    if block is not None:
        net0, seed0 = block
        for p in sweep.penalties:
            row = sweep.chosen(net0, seed0, p)
            if row:
                curves[f"{p} ({row['weight']:g})" if p != "none" else p] = sweep.store.epochs(row["id"])
    if not curves:
        return md + ["No finished run to plot.\n"]
    paths = plots.training_curves(curves, figs / "training_curves", title=f"{net0}, seed {seed0}, chosen weights")
    return md + [f"![training curves]({_rel(paths[0], sweep.root)})\n"]


def _runs_section(sweep: SweepData) -> list[str]:
    md = ["## Runs\n"]
    rows = []
    for p in sweep.penalties:
        rs = [r for r in sweep.runs if r["penalty"] == p and r["status"] in ("done", "diverged")]
        if rs:
            ep = [r["epoch_s"] for r in rs if r["epoch_s"] is not None]
            rows.append([
                p, len(rs), sum(r["status"] == "diverged" for r in rs),
                f"{np.mean([r['epochs'] or 0 for r in rs]):.1f}",
                f"{np.median(ep):.3f}" if ep else None,
                f"{sum(r['wall_s'] or 0 for r in rs):.1f}",
            ])
    md.append(markdown_table(["penalty", "runs", "diverged", "mean epochs", "median epoch s", "total wall s"], rows) + "\n")
    bad = [r for r in sweep.runs if r["status"] in ("diverged", "failed")]
    if bad:
        md.append("Diverged or failed runs:\n")
        md.append(markdown_table(
            ["network", "penalty", "weight", "seed", "status", "reason"],
            [[r["network"], r["penalty"], f"{r['weight']:g}", r["seed"], r["status"],
              (r["error"] or "").splitlines()[0][:120] if r["error"] else ""] for r in bad],
        ) + "\n")
    return md


def _provenance_section(sweep: SweepData) -> list[str]:
    return [
        "## Configuration\n",
        "```json\n" + json.dumps(sweep.config, indent=2, sort_keys=True) + "\n```\n",
        "## Software versions\n",
        markdown_table(["package", "version"], [[k, v] for k, v in sorted(sweep.versions.items())]) + "\n",
    ]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


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
    sweep = SweepData.load(out_dir)
    try:
        comp = compare(sweep.selected, alpha=alpha, penalties=sweep.penalties)
        figs = sweep.root / "figures"
        figs.mkdir(exist_ok=True)
        table = summary_table(sweep.selected, comp, sweep.penalties)
        md = (
            _header(sweep)
            + _accuracy_section(sweep, comp, table)
            + _comparison_section(comp, figs, sweep.root)
            + _deaths_section(sweep, figs)
            + _heatmap_section(sweep, figs)
            + _curves_section(sweep, figs)
            + _runs_section(sweep)
            + _provenance_section(sweep)
        )
        path = sweep.root / "report.md"
        _write_text(path, "\n".join(md))
        return path, table + "\n\n" + comp.summary()
    finally:
        sweep.close()
