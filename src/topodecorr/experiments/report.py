"""The Markdown report of a sweep: ``topodecorr report DIR`` writes ``DIR/report.md``.

Contents: warnings (runs at the epoch cap, near chance, diverged or failed), the
test-accuracy table at the weight chosen by validation accuracy, the difference
to ``none`` with bootstrap intervals, the Friedman / Nemenyi comparison over
(dataset, network) blocks with average ranks and the critical-difference diagram
(:mod:`topodecorr.experiments.stats`), per-penalty histograms of the MST deaths
at the end of training, correlation heat maps of one network per penalty,
training curves, run counts and timings, the exact configuration and the
software versions. Figures go to ``DIR/figures/``.

:func:`write_combined_report` (``topodecorr report --combine DIR... --out OUT``)
pools several sweeps into one comparison: blocks are their (dataset, network)
pairs.

The report is built from one function per section; each returns its Markdown
lines and reads only the database (through :class:`SweepData`): the same
database gives the same report, byte for byte (no clock, seeded bootstrap,
reproducible figures).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .stats import Comparison, accuracy_table, compare, describe, differences_to_baseline, select_best
from .stats import dataset_comparison, hierarchical_bootstrap, mixed_model, wilcoxon_holm
from .store import DB_NAME, ResultStore, StoreError

__all__ = ["write_report", "write_combined_report", "summary_table", "markdown_table", "SweepData", "run_warnings"]

#: A finished run whose test accuracy is at most this multiple of chance (1 / classes) is flagged.
CHANCE_FACTOR = 1.5
#: Rows shown in a warnings list; the rest are counted.
MAX_LISTED = 25
#: The unregularised baseline of the differences.
BASELINE = "none"


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
    """Mean test accuracy (± std over seeds) per block and penalty, plus average ranks.

    A block is a network, or ``dataset/network`` when ``selected`` spans several datasets.
    """
    desc = describe(selected)
    cols = [p for p in penalties if not desc.empty and p in set(desc["penalty"])]
    rows = []
    blocks = sorted(desc["block"].unique()) if not desc.empty else []
    for block in blocks:
        row: list[Any] = [block]
        for p in cols:
            hit = desc[(desc["block"] == block) & (desc["penalty"] == p)]
            if hit.empty:
                row.append("–")
            else:
                m, s = hit["mean"].iloc[0], hit["std"].iloc[0]
                row.append(f"{m:.4f}" + (f" ± {s:.4f}" if isinstance(s, float) and math.isfinite(s) else ""))
        rows.append(row)
    if len(comp.average_ranks):
        rows.append(["**average rank**"] + [_fmt(comp.average_ranks.get(p), 2) for p in cols])
    label = "network" if desc.empty or desc["dataset"].nunique() <= 1 else "dataset/network"
    return markdown_table([label] + cols, rows)


def _n(count: int, word: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{count} {word}" + ("" if count == 1 else "s")


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
        Every run row, ordered by id, with ``dataset`` set to ``label``.
    counts : dict
        Runs per status.
    label : str
        The name of this sweep's blocks' dataset in a comparison (default: the dataset).
    selected : DataFrame
        :func:`~topodecorr.experiments.stats.select_best` of ``runs``: the chosen weight
        per (dataset, network, seed, penalty); in a two-stage sweep whose stage 2 has begun,
        among the stage-2 weights only (``selection``).
    selection : dict or None
        (network, penalty) -> the weights the choice may pick, or None for every weight
        (:func:`~topodecorr.experiments.config.selection_weights`).
    """

    root: Path
    store: ResultStore
    config: dict
    versions: dict
    data: dict
    runs: list[dict]
    counts: dict
    label: str = ""
    selected: pd.DataFrame = field(init=False)
    selection: dict | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.label = self.label or str(self.config.get("dataset", ""))
        for r in self.runs:
            r["dataset"] = self.label
        self.selection = _selection(self.config, self.runs)
        self.selected = select_best(self.candidates())
        # the data set itself, for the tests whose unit it is (labels differ when two sweeps share one)
        self.selected["data"] = str(self.config.get("dataset", self.label))
        by_key = {(r["network"], r["seed"], r["penalty"], float(r["weight"])): r for r in self.runs}
        self._chosen = {
            (s.network, int(s.seed), s.penalty): by_key[(s.network, int(s.seed), s.penalty, float(s.weight))]
            for s in self.selected.itertuples()
        }

    @classmethod
    def load(cls, root: str | Path, label: str = "") -> "SweepData":
        """Open ``root/results.sqlite`` (nothing is written to it).

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
            return cls(
                root=root,
                store=store,
                config=store.sweep_config() or {},
                versions=json.loads(store.meta("versions", "{}") or "{}"),
                data=json.loads(store.meta("data", "{}") or "{}"),
                runs=store.runs(),
                counts=store.counts(),
                label=label,
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
    def num_classes(self) -> int | None:
        n = self.data.get("num_classes")
        return int(n) if n else None

    @property
    def first_block(self) -> tuple[str, int] | None:
        """The (network, seed) whose heat maps and curves are shown: the first of each."""
        if self.networks and self.config.get("seeds"):
            return self.networks[0], int(self.config["seeds"][0])
        return None

    def max_epochs(self, run: dict) -> int | None:
        """The epoch cap of ``run`` (its stored configuration, else the sweep's)."""
        train = json.loads(run.get("config") or "{}").get("train") or self.config.get("train") or {}
        cap = train.get("max_epochs")
        return int(cap) if cap is not None else None

    def chosen(self, network: str, seed: int, penalty: str) -> dict | None:
        """The run row of the weight chosen for (network, seed, penalty), or None."""
        return self._chosen.get((network, int(seed), penalty))

    def chosen_runs(self, network: str, penalty: str) -> list[dict]:
        """The chosen run of every seed of (network, penalty), in seed order."""
        keys = sorted(k for k in self._chosen if k[0] == network and k[2] == penalty)
        return [self._chosen[k] for k in keys]

    def is_chosen(self, run: dict) -> bool:
        return self._chosen.get((run["network"], int(run["seed"]), run["penalty"])) is run

    def grid_of(self, network: str, penalty: str) -> list[float]:
        """The weights the choice of (network, penalty) may pick: the stage-2 ones or the sweep's grid."""
        if self.selection is not None and (network, penalty) in self.selection:
            return sorted(self.selection[(network, penalty)])
        return sorted(float(w) for w in self.config.get("weights", []))

    def candidates(self) -> list[dict]:
        """The runs the validation choice reads: all, or in stage 2 those at the stage-2 weights."""
        if self.selection is None:
            return self.runs
        return [r for r in self.runs if r["penalty"] == "none"
                or float(r["weight"]) in self.selection.get((r["network"], r["penalty"]), ())]


def _selection(config: dict, runs: list[dict]) -> dict | None:
    from .config import ConfigError, selection_weights

    try:
        return selection_weights(config, runs)
    except ConfigError:  # stage 2 rows without a finished stage 1: every weight competes
        return None


# -- warnings ---------------------------------------------------------------------------------


def run_warnings(sweep: SweepData) -> list[dict]:
    """Every finished run with its warning flags.

    Returns
    -------
    list of dict
        One per run that is ``done``, ``diverged`` or ``failed``, in id order, with the run's
        ``dataset, network, penalty, weight, seed, status, test_acc, epochs, error`` and the
        flags ``capped`` (done, and trained for the whole epoch cap: early stopping never
        ended it, so it may be under-trained), ``chance`` (done with test accuracy at most
        :data:`CHANCE_FACTOR` / classes; False when the number of classes is not stored),
        ``diverged``, ``failed`` and ``chosen`` (its weight is the one the tables use).
    """
    out = []
    classes = sweep.num_classes
    for r in sweep.runs:
        if r["status"] not in ("done", "diverged", "failed"):
            continue
        done = r["status"] == "done"
        cap = sweep.max_epochs(r)
        out.append({
            **{k: r.get(k) for k in ("dataset", "network", "penalty", "weight", "seed", "status", "test_acc",
                                     "epochs", "best_epoch", "error")},
            "capped": bool(done and cap is not None and r["epochs"] is not None and r["epochs"] >= cap),
            "chance": bool(done and classes and r["test_acc"] is not None
                           and r["test_acc"] <= CHANCE_FACTOR / classes),
            "diverged": r["status"] == "diverged",
            "failed": r["status"] == "failed",
            "chosen": sweep.is_chosen(r),
        })
    return out


def _listed(header: list[str], rows: list[list[Any]]) -> list[str]:
    md = [markdown_table(header, rows[:MAX_LISTED]) + "\n"]
    if len(rows) > MAX_LISTED:
        md.append(f"(and {len(rows) - MAX_LISTED} more)\n")
    return md


def _warnings_section(sweeps: list[SweepData]) -> list[str]:
    flags = [f for s in sweeps for f in run_warnings(s)]
    penalties = list(dict.fromkeys(p for s in sweeps for p in s.penalties))
    several = len(sweeps) > 1
    md = ["## Warnings\n"]
    if not flags:
        return md + ["No run has finished yet.\n"]
    kinds = ("capped", "chance", "diverged", "failed")
    unknown = [s.name for s in sweeps if s.num_classes is None]
    skipped = (f"- Near-chance check skipped for {', '.join(unknown)}: the database does not store the number "
               "of classes.\n") if unknown else None
    if not any(f[k] for f in flags for k in kinds):
        md.append(f"No run hit the epoch cap{'' if unknown else ', ended near chance'}, diverged or failed.\n")
        return md + ([skipped] if skipped else [])
    rows = []
    for p in penalties:
        fs = [f for f in flags if f["penalty"] == p]
        if fs:
            rows.append([p, len(fs)] + [sum(f[k] for f in fs) for k in kinds])
    md.append(markdown_table(["penalty", "finished runs", "at epoch cap", "near chance", "diverged", "failed"],
                             rows) + "\n")
    capped = [f for f in flags if f["capped"]]
    if capped:
        caps = sorted({c for s in sweeps for c in (s.max_epochs(r) for r in s.runs) if c is not None})
        improving = sum(f["best_epoch"] is not None and f["best_epoch"] >= f["epochs"] - 1 for f in capped)
        md.append(
            f"- **At the epoch cap** ({len(capped)} of {len(flags)} finished runs; cap {', '.join(map(str, caps))} "
            f"epochs): training ended at the cap, not by early stopping, so these runs may be under-trained; "
            f"{improving} of them had their best validation loss in the last epoch, and "
            f"{sum(f['chosen'] for f in capped)} are chosen weights that enter the tables below."
        )
    if skipped:
        md.append(skipped.rstrip("\n"))
    chance = [f for f in flags if f["chance"]]
    classes = sorted({s.num_classes for s in sweeps if s.num_classes})
    if chance:
        md.append(
            f"- **Near chance** ({_n(len(chance), 'run')}, {sum(f['chosen'] for f in chance)} of them chosen): "
            "test accuracy "
            f"at most {CHANCE_FACTOR:g} × chance (chance = 1 / {', '.join(map(str, classes))} classes); such a run "
            "learned (almost) nothing, and is not counted as diverged.\n"
        )
        header = (["dataset"] if several else []) + ["network", "penalty", "weight", "seed", "test acc", "chosen"]
        md += _listed(header, [([f["dataset"]] if several else [])
                               + [f["network"], f["penalty"], f"{f['weight']:g}", f["seed"], f["test_acc"],
                                  "yes" if f["chosen"] else ""] for f in chance])
    bad = [f for f in flags if f["diverged"] or f["failed"]]
    if bad:
        md.append(f"- **Diverged or failed** ({_n(len(bad), 'run')}): dropped from the statistics.\n")
        header = (["dataset"] if several else []) + ["network", "penalty", "weight", "seed", "status", "reason"]
        md += _listed(header, [([f["dataset"]] if several else [])
                               + [f["network"], f["penalty"], f"{f['weight']:g}", f["seed"], f["status"],
                                  (f["error"] or "").splitlines()[0][:120] if f["error"] else ""] for f in bad])
    md.append("")
    return md


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
    if config.get("split_per_seed"):
        md.append(f"Each seed draws its own split (split seed {config.get('split_seed', 0)} + seed); the data line "
                  "above describes the split of the first split seed, the sizes are those of every seed.\n")
    if counts.get("pending") or counts.get("running"):
        md.append("> **The sweep is incomplete**: the tables below use the finished runs only.\n")
    return md


_SELECTION = (
    "For every network, seed and penalty the weight with the best validation accuracy is chosen "
    "(diverged runs dropped), as in the paper; the table gives its test accuracy, mean ± std over "
    "seeds. The average rank is the Friedman rank over the (dataset, network) blocks, each block "
    "valued by the seed-mean test accuracy (1 = best).\n"
)


def _accuracy_section(sweep: SweepData, table: str) -> list[str]:
    md = ["## Test accuracy\n", _SELECTION, table + "\n"]
    per_run = accuracy_table(sweep.selected[sweep.selected["penalty"].isin(sweep.penalties)])
    if not per_run.empty:
        weights = accuracy_table(sweep.selected, "weight")
        cols = [p for p in sweep.penalties if p in per_run.columns]
        md.append("Per network and seed (test accuracy, chosen weight in brackets):\n")
        rows = [
            [key] + [("–" if pd.isna(per_run.loc[key, p])
                      else f"{per_run.loc[key, p]:.4f} ({weights.loc[key, p]:g})") for p in cols]
            for key in per_run.index
        ]
        md.append(markdown_table(["network/seed"] + cols, rows) + "\n")
    return md


def _signed(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.4f}"


def _interval(lo: float, hi: float) -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:+.4f}, {hi:+.4f}]"


def _difference_section(selected: pd.DataFrame, penalties: list[str]) -> list[str]:
    md = [f"## Difference to `{BASELINE}`\n"]
    pooled, per_block = differences_to_baseline(selected, BASELINE, penalties)
    if pooled.empty:
        return md + [f"Not computed: no block has finished runs of both `{BASELINE}` and another penalty.\n"]
    nblocks = per_block["block"].nunique()
    md.append(
        f"Test accuracy of the chosen weight minus that of `{BASELINE}`, paired by seed (same network, same "
        f"seed), averaged over the seeds of each block (dataset, network) and then over the blocks; in "
        "brackets the 95% percentile bootstrap interval, resampling seeds within each block (10,000 "
        "replicates, generator seed 0, so the report is reproducible). With a handful of seeds the interval "
        "is approximate and tends to be narrow; one that contains 0 shows no effect distinguishable from "
        "seed noise.\n"
    )
    rows = [[p, _signed(r["mean"]), _interval(r["low"], r["high"]), int(r["blocks"]), int(r["pairs"])]
            for p, r in pooled.iterrows()]
    md.append(markdown_table(["penalty", "mean difference", "95% interval", "blocks", "seed pairs"], rows) + "\n")
    if nblocks > 1:
        cols = list(pooled.index)
        md.append("Per block (mean difference [95% interval]):\n")
        rows = []
        for block in dict.fromkeys(per_block["block"]):
            hit = per_block[per_block["block"] == block].set_index("penalty")
            rows.append([block] + [
                "–" if p not in hit.index
                else f"{_signed(hit.loc[p, 'mean'])} {_interval(hit.loc[p, 'low'], hit.loc[p, 'high'])}"
                for p in cols])
        md.append(markdown_table(["block"] + cols, rows) + "\n")
    return md


def _comparison_section(comp: Comparison, figs: Path, root: Path) -> list[str]:
    from . import plots

    md = ["## Statistical comparison\n", comp.summary() + "\n"]
    seeds = sorted({int(v) for v in comp.seeds.values}) if len(comp.seeds) else []
    md.append(
        "Blocks are (dataset, network) pairs, each valued by the seed-mean test accuracy of the chosen weights"
        + (f" ({' or '.join(map(str, seeds))} {'seed' if seeds == [1] else 'seeds'} per block)" if seeds else "")
        + ". Seeds are not blocks: they are repeated runs of one network on one data set, not independent "
        "data sets, and counting them as blocks would make the p-values optimistic. With few blocks the test "
        "has little power; `topodecorr report --combine DIR... --out OUT` pools several sweeps into one comparison.\n"
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


# -- convergence, grid edges and the tests that match the design --------------------------------

#: The ends of the paper's weight grid: a choice at an end of a grid that stops short of them is flagged.
GRID_ENDS = (1e-6, 100.0)


def choice_flags(sweep: SweepData) -> list[dict]:
    """Every run chosen by validation, with ``capped`` (it trained to its epoch cap) and ``edge``.

    ``edge`` is ``"low"`` / ``"high"`` when the chosen weight is the smallest / largest of
    its grid (:meth:`SweepData.grid_of`) and that grid stops short of 1e-6 / 100 (so a
    better weight may lie beyond it), else ``""`` (always for ``none``).
    """
    out = []
    for s in sweep.selected.itertuples():
        run = sweep.chosen(s.network, s.seed, s.penalty)
        cap = sweep.max_epochs(run)
        edge = ""
        if s.penalty != BASELINE:
            grid, w = sweep.grid_of(s.network, s.penalty), float(s.weight)
            if grid and math.isclose(w, grid[0], rel_tol=1e-9) and grid[0] > GRID_ENDS[0] * (1 + 1e-9):
                edge = "low"
            elif grid and math.isclose(w, grid[-1], rel_tol=1e-9) and grid[-1] < GRID_ENDS[1] * (1 - 1e-9):
                edge = "high"
        out.append({"dataset": sweep.label, "network": s.network, "seed": int(s.seed), "penalty": s.penalty,
                    "weight": float(s.weight), "edge": edge,
                    "capped": bool(cap is not None and run["epochs"] is not None and run["epochs"] >= cap)})
    return out


def _stages_lines(sweep: SweepData) -> list[str]:
    stages = sweep.config.get("stages")
    if not stages:
        return []
    k = stages["neighbours"]
    md = [f"Weights in two stages (`{sweep.name}`): stage 1 ran every weight of the grid "
          f"{sweep.config.get('weights')} on seed(s) {stages['wide_seeds']}; stage 2 runs every seed at, per "
          f"network and penalty, the stage-1 best weight (highest mean validation accuracy over those seeds) "
          f"and its {k} nearest weight(s) of the grid on each side, and each seed's weight is chosen among them."]
    if sweep.selection is None:
        md[0] += " **Stage 2 has not begun**: every weight of the grid competes in the tables below."
    else:
        md[0] += " Stage-2 weights:"
        for (net, pen), ws in sorted(sweep.selection.items()):
            md.append(f"- {net} / {pen}: {', '.join(f'{w:g}' for w in ws)}")
    return md + [""]


def _convergence_section(sweeps: list[SweepData]) -> list[str]:
    flags = [f for s in sweeps for f in choice_flags(s)]
    md = ["## Convergence and grid edges\n"]
    if not flags:
        return md + ["No run has been chosen yet.\n"]
    n, capped = len(flags), sum(f["capped"] for f in flags)
    edges = [f for f in flags if f["edge"]]
    md.append(
        f"Of the {n} runs chosen by validation, **{capped} ({capped / n:.1%}) stopped at their epoch cap** and "
        f"**{len(edges)} chose a weight at an edge of a grid that stops short of {GRID_ENDS[0]:g} or "
        f"{GRID_ENDS[1]:g}**. A run at its cap may be under-trained (the goal: at most 5% of the chosen runs); "
        "a weight at such an edge says that the grid did not bracket the best weight, so the penalty may do "
        "better beyond it.\n"
    )
    rows = []
    for p in dict.fromkeys(p for s in sweeps for p in s.penalties):
        fs = [f for f in flags if f["penalty"] == p]
        if fs:
            rows.append([p, len(fs), sum(f["capped"] for f in fs), sum(f["edge"] == "low" for f in fs),
                         sum(f["edge"] == "high" for f in fs)])
    md.append(markdown_table(["penalty", "chosen runs", "at epoch cap", "at the low edge", "at the high edge"],
                             rows) + "\n")
    for s in sweeps:
        md += _stages_lines(s)
    return md


def _design_section(selected: pd.DataFrame, penalties: list[str], figs: Path, root: Path) -> list[str]:
    from . import plots

    md = ["## Tests that match the design\n",
          "Seeds are nested in (dataset, network) blocks and blocks in data sets. Each penalty against "
          f"`{BASELINE}`: a two-sided Wilcoxon signed-rank test over the blocks (a block's value is its seed-mean "
          "paired difference), Holm-corrected over the penalties; the interval is a hierarchical bootstrap that "
          "draws blocks with replacement and then seeds within each drawn block (10,000 replicates, generator "
          "seed 0), so it carries the variation between blocks as well as between seeds.\n"]
    tests = wilcoxon_holm(selected, BASELINE, penalties)
    if tests.empty:
        return md + [f"Not computed: no block has finished runs of both `{BASELINE}` and another penalty.\n"]
    boot = hierarchical_bootstrap(selected, BASELINE, penalties)
    rows = [[p, int(r["blocks"]), f"{int(r['wins'])} of {int(r['blocks'])}", _diff(r["mean"]),
             _interval(boot.loc[p, "low"], boot.loc[p, "high"]), _p(r["p"]), _p(r["p_holm"])]
            for p, r in tests.iterrows()]
    md.append(markdown_table(["penalty", "blocks", "ahead in", "mean difference", "hierarchical 95% interval",
                              "Wilcoxon p", "Holm p"], rows) + "\n")
    comp = dataset_comparison(selected, penalties=penalties)
    md.append("**The data set as the unit.** " + (
        comp.summary().replace("blocks", "data sets", 1) if comp.friedman_p is not None
        else f"Friedman test over data sets not computed ({comp.n} data set{'' if comp.n == 1 else 's'}; it needs "
             "at least 3 and 3 penalties).") + "\n")
    mm = mixed_model(selected, BASELINE, penalties)
    md.append(f"**Mixed model** `{mm.formula or 'accuracy ~ penalty + ...'}` (statsmodels MixedLM, maximum "
              "likelihood): " + (
                  f"likelihood-ratio test of the penalty effect chi2 = {mm.lr_statistic:.1f}, df = {mm.df}, "
                  f"p = {_p(mm.p)}{'' if mm.converged else ' (the fit did not converge)'}."
                  if mm.p is not None else "; ".join(mm.notes)) + "\n")
    if not mm.coefficients.empty:
        md.append(markdown_table(["penalty", f"effect vs `{BASELINE}`", "std. error", "Wald p"],
                                 [[p, _diff(r["estimate"]), f"{r['se']:.4f}", _p(r["p"])]
                                  for p, r in mm.coefficients.iterrows()]) + "\n")
        md.append("The model gives every penalty one effect in all blocks; where the effects differ between "
                  "blocks (the forest plot below) its Wald p-values are optimistic. The Wilcoxon tests over "
                  "blocks above do not assume a common effect: read them first.\n")
        md += [f"- {note}" for note in mm.notes if mm.p is not None]
        md.append("")
    _, per_block = differences_to_baseline(selected, BASELINE, penalties)
    if per_block["block"].nunique() > 1:
        path = plots.forest_plot(per_block, figs / "forest", BASELINE)[0]
        md.append("Effect per block (seed-mean difference with its 95% bootstrap interval over seeds), beside the "
                  "ranks above:\n")
        md.append(f"![effect sizes per block]({_rel(path, root)})\n")
    return md


def _diff(x: float) -> str:
    """A signed difference to 4 decimals; one that rounds to zero is 0.0000 (no "-0.0000")."""
    return _signed(round(x, 4) + 0.0) if x is not None and math.isfinite(x) else "–"


def _p(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2g}"


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
            rows.append([p, float(allv.min()), float(np.quantile(allv, 0.1)), float(np.median(allv)),
                         float(allv.mean()), f"{np.mean(allv < 5e-5):.1%}", f"{np.mean(allv >= plots.DEAD_DEATH):.1%}"])
    md = ["## MST deaths at the end of training\n"]
    if not deaths:
        return md + ["No finished run stored its deaths.\n"]
    paths = plots.death_histograms(deaths, figs / "death_histograms")
    md.append(
        "Zero-dimensional persistence deaths (MST edge weights of 1 - |corr|) of the final networks on a fixed "
        "validation probe batch; low deaths are strongly correlated neuron pairs. The separate bar right of 1 "
        "holds the dead neurons (constant on the probe: correlation 0 with every other neuron, death 1).\n"
    )
    md.append(f"![death histograms]({_rel(paths[0], sweep.root)})\n")
    md.append(markdown_table(["penalty", "min", "10%", "median", "mean", "share 0", "share 1 (dead)"], rows) + "\n")
    md.append(
        "A min of 0.0000 means at least one pair of neurons is perfectly correlated on the probe batch (|corr| = 1 "
        "to four decimals): duplicate neurons, e.g. two ReLUs that fire on the same few probe samples only; "
        "`share 0` counts such deaths. Dead neurons do not cause it: their death is 1 (`share 1`).\n"
    )
    return md


@lru_cache(maxsize=16)
def _probe_widths(model: str, params_json: str, shape: tuple[int, ...], classes: int, sampling: str,
                  fraction: float) -> tuple[int, ...] | str:
    """Neurons per probed layer (hidden layers, then logits) of a freshly built network, or why not."""
    try:
        import torch

        from .models import build_model
        from .train import _probe_activations
    except ImportError as exc:  # pragma: no cover - torch is part of every install
        return f"the layer sizes cannot be rebuilt without torch ({exc})"
    try:
        with torch.random.fork_rng(devices=[]):
            net = build_model(model, shape, classes, **json.loads(params_json))
            acts = _probe_activations(net, torch.zeros(2, *shape), sampling, fraction)
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"rebuilding network {model!r} failed ({exc})"
    return tuple(int(a.shape[1]) for a in acts)


def _stored_widths(row: dict) -> tuple[int, ...] | None:
    """The sampled neurons per probed layer the run recorded (``metrics["layer_widths"]``), or None."""
    widths = json.loads(row.get("metrics") or "{}").get("layer_widths")
    return tuple(int(w) for w in widths) if widths else None


def _layer_layout(row: dict, data: dict, m: int) -> tuple[list[int], list[str]] | str:
    """Where the layers start in a stored correlation matrix of ``m`` neurons, or why that is unknown.

    The layer sizes are those the run recorded with its metrics (``layer_widths``); a
    database written before runs recorded them has them rebuilt from the run's network
    configuration (the probe's own layer rule). Either way they are accepted only when
    they add up to the stored neuron count and give ``m`` sampled neurons.
    """
    widths = _stored_widths(row)
    if widths is None:  # a database written before the runs recorded their layer widths
        cfg = json.loads(row.get("config") or "{}")
        train = cfg.get("train") or {}
        shape, classes = data.get("input_shape"), data.get("num_classes")
        if not cfg.get("model") or not shape or not classes:
            return "the database lacks the network configuration or the data shape"
        widths = _probe_widths(cfg["model"], json.dumps(cfg.get("model_params") or {}, sort_keys=True),
                               tuple(int(v) for v in shape), int(classes), str(train.get("sampling", "all")),
                               float(train.get("fraction", 1.0)))
        if isinstance(widths, str):
            return widths
    import torch

    from .train import CORR_MAX_NEURONS

    n = sum(widths)
    stored = json.loads(row.get("metrics") or "{}").get("neurons")
    if stored is not None and int(stored) != n:
        return f"the rebuilt layers hold {n} neurons, the run stored {stored}"
    # the probe's own choice of the stored neurons (train.probe_deaths)
    idx = torch.linspace(0, n - 1, min(n, CORR_MAX_NEURONS)).round().long().unique().numpy()
    if len(idx) != m:
        return f"the rebuilt layers give {len(idx)} sampled neurons, the matrix has {m}"
    cuts = [int(np.searchsorted(idx, c)) for c in np.cumsum(widths)[:-1]]
    names = [f"h{i + 1}" for i in range(len(widths) - 1)] + ["out"]
    return cuts, names


def _heatmap_section(sweep: SweepData, figs: Path) -> list[str]:
    """Correlation heat maps of the first network's first seed at the chosen weight, layers marked."""
    from . import plots

    md = ["## Correlation heat maps\n"]
    mats: dict[str, np.ndarray] = {}
    cuts: dict[str, list[int]] = {}
    names: dict[str, list[str]] = {}
    unknown: dict[str, list[str]] = {}
    block = sweep.first_block
    recorded = True  # every matrix's layer widths come from the database
    if block is not None:
        net0, seed0 = block
        for p in sweep.penalties:
            row = sweep.chosen(net0, seed0, p)
            m = sweep.store.correlation(row["id"]) if row else None
            if m is None:
                continue
            mats[p] = m
            layout = _layer_layout(row, sweep.data, m.shape[0])
            recorded = recorded and _stored_widths(row) is not None
            if isinstance(layout, str):
                unknown.setdefault(layout, []).append(p)
            else:
                cuts[p], names[p] = layout
    if not mats:
        return md + ["No correlation matrix stored.\n"]
    paths = plots.correlation_heatmaps(mats, figs / "correlations", network=f"({net0}, seed {seed0})",
                                       boundaries=cuts, layer_names=names)
    md.append(
        f"Pearson correlations of up to {max(m.shape[0] for m in mats.values())} neurons spread evenly over "
        f"the layers of `{net0}` (seed {seed0}, chosen weight), ordered by layer (h1 = first hidden layer, "
        + ("out = logits). The black lines are the layer widths each run recorded, checked against the stored "
           "neuron count.\n" if recorded else
           "out = logits). The database stores the matrix without layer sizes: the black lines are rebuilt from "
           "the network's configuration and checked against the stored neuron count.\n")
    )
    for why, pens in unknown.items():
        md.append(f"Layer boundaries not drawn for {', '.join(pens)}: {why}.\n")
    md.append(f"![correlation heat maps]({_rel(paths[0], sweep.root)})\n")
    return md


def _curves_section(sweep: SweepData, figs: Path) -> list[str]:
    """Training curves of the first network's first seed at the chosen weights."""
    from . import plots

    md = ["## Training curves\n"]
    curves = {}
    block = sweep.first_block
    recorded = True  # every matrix's layer widths come from the database
    if block is not None:
        net0, seed0 = block
        for p in sweep.penalties:
            row = sweep.chosen(net0, seed0, p)
            if row:
                curves[f"{p} ({row['weight']:g})" if p != BASELINE else p] = sweep.store.epochs(row["id"])
    if not curves:
        return md + ["No finished run to plot.\n"]
    paths = plots.training_curves(curves, figs / "training_curves", title=f"{net0}, seed {seed0}, chosen weights",
                                  baseline=BASELINE)
    return md + [f"`{BASELINE}` is the black dashed line.\n", f"![training curves]({_rel(paths[0], sweep.root)})\n"]


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
    header = ["penalty", "runs", "diverged", "mean epochs", "median s per epoch", "total run time s"]
    md.append(markdown_table(header, rows) + "\n")
    md.append("Times are those measured during the sweep (on its machine, under its load); "
              "the warnings above list the diverged and failed runs.\n")
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
            + _convergence_section([sweep])
            + _warnings_section([sweep])
            + _accuracy_section(sweep, table)
            + _difference_section(sweep.selected, sweep.penalties)
            + _comparison_section(comp, figs, sweep.root)
            + _design_section(sweep.selected, sweep.penalties, figs, sweep.root)
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


# -- several sweeps ---------------------------------------------------------------------------


def _load_all(dirs: list[str | Path]) -> list[SweepData]:
    """Open every sweep; label blocks by dataset, or by dataset and sweep name where datasets repeat."""
    seen: dict[Path, str] = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen:
            raise StoreError(f"sweep folder {d} is given twice (also as {seen[key]}); give each sweep once")
        seen[key] = str(d)
    sweeps: list[SweepData] = []
    try:
        for d in dirs:
            sweeps.append(SweepData.load(d))
        datasets = [s.label for s in sweeps]
        labels = [f"{s.label} ({s.name})" if datasets.count(s.label) > 1 else s.label for s in sweeps]
        if len(set(labels)) < len(labels):
            dup = sorted({lab for lab in labels if labels.count(lab) > 1})
            raise StoreError(f"sweeps {dup} share dataset and name; rename one (its `name`) to combine them")
        for i, (s, lab) in enumerate(zip(sweeps, labels)):
            if lab != s.label:
                sweeps[i] = SweepData(root=s.root, store=s.store, config=s.config, versions=s.versions, data=s.data,
                                      runs=s.runs, counts=s.counts, label=lab)
        return sweeps
    except BaseException:
        for s in sweeps:
            s.close()
        raise


def _combined_header(sweeps: list[SweepData], out: Path, penalties: list[str], left_out: list[str]) -> list[str]:
    md = [f"# Combined report of {len(sweeps)} sweeps\n"]
    md.append(
        "One comparison over the (dataset, network) blocks of all sweeps below, as the paper pooled its "
        "MNIST and CIFAR-10 networks. Each sweep's own report has its figures, curves and configuration.\n"
    )
    rows = []
    for s in sweeps:
        caps = sorted({c for c in (s.max_epochs(r) for r in s.runs) if c is not None})
        link = Path(os.path.relpath(s.root / "report.md", out)).as_posix()
        rows.append([f"`{s.name}`", s.label, ", ".join(s.networks), len(s.config.get("seeds") or []),
                     ", ".join(map(str, caps)) or "–",
                     ", ".join(f"{v} {k}" for k, v in s.counts.items() if v), f"[report]({link})"])
    md.append(markdown_table(["sweep", "dataset", "networks", "seeds", "epoch cap", "runs", "report"], rows) + "\n")
    md.append(f"Penalties compared: {', '.join(penalties)}.\n")
    if left_out:
        md.append(f"Left out (not in every sweep): {', '.join(left_out)}.\n")
    if any(s.counts.get("pending") or s.counts.get("running") for s in sweeps):
        md.append("> **Some sweeps are incomplete**: the tables below use the finished runs only.\n")
    return md


def _combined_versions(sweeps: list[SweepData]) -> list[str]:
    packages = sorted({k for s in sweeps for k in s.versions})
    rows = [[k] + [s.versions.get(k, "–") for s in sweeps] for k in packages]
    return ["## Software versions\n", markdown_table(["package"] + [f"`{s.name}`" for s in sweeps], rows) + "\n"]


def write_combined_report(dirs: list[str | Path], out_dir: str | Path, alpha: float = 0.05) -> tuple[Path, str]:
    """Pool several sweeps into one comparison and write ``out_dir/report.md``.

    Blocks are the (dataset, network) pairs of all sweeps; only penalties present in
    every sweep are compared. Figures go to ``out_dir/figures/``.

    Parameters
    ----------
    dirs : list of path
        Sweep folders, each holding ``results.sqlite``.
    out_dir : path
        Folder of the combined report (created); must not be one of ``dirs``.
    alpha : float
        Significance level.

    Returns
    -------
    (Path, str)
        The report's path and the summary table (Markdown) for printing.

    Raises
    ------
    StoreError
        A folder holds no readable database, is given twice, or is ``out_dir``.
    """
    if not dirs:
        raise StoreError("--combine needs at least one sweep folder")
    out = Path(out_dir)
    if any(out.resolve() == Path(d).resolve() for d in dirs):
        raise StoreError(f"the combined report would overwrite the report of sweep {out}; choose another --out folder")
    sweeps = _load_all(list(dirs))
    try:
        common = [p for p in sweeps[0].penalties if all(p in s.penalties for s in sweeps[1:])]
        left_out = sorted({p for s in sweeps for p in s.penalties} - set(common))
        selected = pd.concat([s.selected for s in sweeps], ignore_index=True)
        selected = selected[selected["penalty"].isin(common)]
        comp = compare(selected, alpha=alpha, penalties=common)
        figs = out / "figures"
        figs.mkdir(parents=True, exist_ok=True)
        table = summary_table(selected, comp, common)
        md = (
            _combined_header(sweeps, out, common, left_out)
            + _convergence_section(sweeps)
            + _warnings_section(sweeps)
            + ["## Test accuracy\n", _SELECTION, table + "\n"]
            + _difference_section(selected, common)
            + _comparison_section(comp, figs, out)
            + _design_section(selected, common, figs, out)
            + _combined_versions(sweeps)
        )
        path = out / "report.md"
        _write_text(path, "\n".join(md))
        return path, table + "\n\n" + comp.summary()
    finally:
        for s in sweeps:
            s.close()
