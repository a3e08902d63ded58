"""Which neurons of a trained network are redundant: the minimum spanning tree as a map.

:func:`inspect` runs a model over some batches (evaluation mode, no
gradients), reads the chosen layers by forward hooks exactly as
:class:`topodecorr.Decorrelation` does, and reports, per layer and for the
pooled point cloud of all layers:

* the deaths of the zero-dimensional persistence of the neurons (the edge
  weights of the minimum spanning tree of ``1 - |corr|``), the statistics the
  T1 / T2 regularisers act on;
* the dead neurons (constant over every sample seen);
* the most redundant neuron pairs, named by layer and index, with their
  (signed) correlation;
* the tree itself (``edges``), for users who want to prune or merge neurons.

Correlations are exact Pearson correlations over *all* samples of all
batches (streamed sums in float64, shifted by the first batch's mean), not
an average of per-batch correlations, so the result does not depend on how
the data were batched. A neuron constant over all samples is dead: it gets
correlation 0 with every other neuron (the convention of the rest of the
library), hence deaths of 1.

The most redundant pairs are the tree's shortest edges, in ascending order of
death: the first is always the most correlated pair of the whole cloud; later
entries skip pairs the tree already implies (when a ~ b and b ~ c are both
near-duplicates, a ~ c is not listed a third time).

Figures (:meth:`RedundancyReport.plot_deaths`, :meth:`RedundancyReport.plot_pairs`,
:meth:`RedundancyReport.save`) need matplotlib, imported only when called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .correlation import DISSIMILARITIES, NonFiniteActivationsError, constant_rows
from .correlation import dissimilarity as _dissimilarity
from .monitor import death_summary
from .neurons import MODES, Recorder, resolve_layers, unwrap
from .persistence import mst_deaths

__all__ = ["inspect", "RedundancyReport", "LayerRedundancy", "NeuronPair"]


@dataclass(frozen=True)
class NeuronPair:
    """Two neurons joined by an edge of the tree.

    Attributes
    ----------
    a, b : tuple of (str, int)
        ``(layer name, index of the neuron in that layer's flattened output)``.
    correlation : float
        Pearson correlation of the two neurons over all samples (signed).
    death : float
        The edge's weight, the dissimilarity of the pair (``1 - |corr|`` by default).
    """

    a: tuple[str, int]
    b: tuple[str, int]
    correlation: float
    death: float

    def __str__(self) -> str:
        return f"{self.a[0]}[{self.a[1]}] ~ {self.b[0]}[{self.b[1]}]: corr {self.correlation:+.4f}"


@dataclass(frozen=True, eq=False)
class LayerRedundancy:
    """The redundancy map of one point cloud (one layer, or all layers pooled).

    Attributes
    ----------
    name : str
        The layer's name (``"pooled"`` for the pooled cloud).
    neurons : int
        n, the number of neurons in the cloud.
    dead : int
        Neurons constant over every sample.
    dead_neurons : tuple of (str, int)
        Which ones, as ``(layer, index)``.
    deaths : Tensor, shape (n - 1,)
        MST deaths, ascending (float64, CPU).
    edges : LongTensor, shape (n - 1, 2)
        ``edges[k]`` is the pair of cloud indices whose edge has weight ``deaths[k]``;
        :attr:`labels` names them.
    labels : tuple of (str, int)
        ``labels[i]`` = ``(layer, index)`` of the cloud's i-th neuron.
    pairs : tuple of NeuronPair
        The ``k`` shortest edges (the most redundant pairs first).
    """

    name: str
    neurons: int
    dead: int
    dead_neurons: tuple
    deaths: torch.Tensor
    edges: torch.Tensor
    labels: tuple
    pairs: tuple

    def __repr__(self) -> str:
        top = f", top pair {self.pairs[0]}" if self.pairs else ""
        return f"LayerRedundancy({self.name!r}, neurons={self.neurons}, dead={self.dead}{top})"

    def summary(self) -> dict:
        """``neurons``, ``dead``, ``min/mean/max_death`` (None without deaths) as plain numbers."""
        return {"neurons": self.neurons, "dead": self.dead, **death_summary(self.deaths)}


@dataclass(frozen=True, eq=False)
class RedundancyReport:
    """Result of :func:`inspect`.

    Attributes
    ----------
    layers : tuple of LayerRedundancy
        One per captured layer, in forward order.
    pooled : LayerRedundancy or None
        All layers as one cloud (None with ``pooled=False``, or when the layers do not
        share their samples, e.g. conv layers of different sizes under ``mode="channel"``).
    samples : int
        Rows seen per layer (batch samples; times spatial positions under ``mode="channel"``).
    batches : int
    mode, dissimilarity : str
        The options used.
    """

    layers: tuple
    pooled: LayerRedundancy | None
    samples: int
    batches: int
    mode: str
    dissimilarity: str
    _kept: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        names = ", ".join(repr(l.name) for l in self.layers)
        pooled = "" if self.pooled is None else f", pooled={self.pooled.neurons} neurons"
        return f"RedundancyReport(layers=[{names}]{pooled}, samples={self.samples}, batches={self.batches})"

    def __getitem__(self, name: str) -> LayerRedundancy:
        for layer in self.layers:
            if layer.name == name:
                return layer
        if name == "pooled" and self.pooled is not None:
            return self.pooled
        raise KeyError(f"no layer {name!r}; layers: {[l.name for l in self.layers]}")

    @property
    def clouds(self) -> tuple:
        """The per-layer clouds, then the pooled one (when there is one)."""
        extra = self.pooled is not None and not any(self.pooled is c for c in self.layers)
        return self.layers + ((self.pooled,) if extra else ())

    def activations(self, neuron: tuple[str, int]) -> torch.Tensor:
        """Activations of one neuron on the first samples seen (the ones the scatter plots use)."""
        layer, index = neuron
        return self._kept[layer][:, index]

    # -- rendering -------------------------------------------------------------
    def to_markdown(self, figures: dict | None = None) -> str:
        """The report as Markdown; ``figures`` maps a caption to an image path to embed."""
        formula = "1 - |corr|" if self.dissimilarity == "abs" else "sqrt(1 - corr^2)"
        lines = [
            "# Redundancy report",
            "",
            f"{self.samples} samples from {self.batches} batch(es); neurons: mode `{self.mode}`; "
            f"deaths: minimum spanning tree of d = {formula} (a dead neuron has correlation 0).",
            "",
            "| cloud | neurons | dead | min death | mean death | max death | most redundant pair | corr |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for c in self.clouds:
            s = c.summary()
            top = c.pairs[0] if c.pairs else None
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            pair = "-" if top is None else f"{_name(top.a)} ~ {_name(top.b)}"
            corr = "-" if top is None else f"{top.correlation:+.4f}"
            lines.append(
                f"| {c.name} | {s['neurons']} | {s['dead']} | {fmt(s['min_death'])} | {fmt(s['mean_death'])} "
                f"| {fmt(s['max_death'])} | {pair} | {corr} |"
            )
        for c in self.clouds:
            lines += ["", f"## {c.name}", ""]
            if c.dead:
                shown = ", ".join(_name(x) for x in c.dead_neurons[:20])
                more = f" and {c.dead - 20} more" if c.dead > 20 else ""
                lines += [f"Dead neurons ({c.dead}): {shown}{more}.", ""]
            if not c.pairs:
                lines.append("No pair (fewer than two neurons).")
                continue
            lines += ["| # | neuron | neuron | correlation | death |", "|---:|---|---|---:|---:|"]
            for r, p in enumerate(c.pairs, 1):
                lines.append(f"| {r} | {_name(p.a)} | {_name(p.b)} | {p.correlation:+.4f} | {p.death:.4f} |")
            if any(p.correlation >= 0.99995 for p in c.pairs):
                lines += ["", _ONE_NOTE]
        for caption, path in (figures or {}).items():
            lines += ["", f"![{caption}]({path})"]
        return "\n".join(lines) + "\n"

    def plot_deaths(self, bins: int = 30):
        """One histogram of MST deaths per cloud; returns a matplotlib Figure."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        clouds = self.clouds
        cols = min(3, len(clouds))
        rows = math.ceil(len(clouds) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, c in zip(axes.flat, clouds):
            d = c.deaths.numpy()
            ax.hist(d, bins=bins, range=(0.0, 1.0), color="tab:blue")
            ax.set_title(f"{c.name} (n = {c.neurons}, dead {c.dead})", fontsize=9)
            ax.set_xlabel("MST death")
            ax.set_ylabel("tree edges (of n - 1)")
        for ax in list(axes.flat)[len(clouds):]:
            ax.axis("off")
        fig.tight_layout()
        return fig

    def plot_pairs(self, k: int = 6, cloud: str | None = None):
        """Scatter plots of the ``k`` most redundant pairs' activations; returns a Figure.

        ``cloud``: a layer name, or ``"pooled"`` (the default when there is a pooled cloud).
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        c = self[cloud] if cloud is not None else (self.pooled or self.layers[0])
        pairs = c.pairs[:k]
        cols = max(1, min(3, len(pairs)))
        rows = max(1, math.ceil(len(pairs) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3.2 * rows), squeeze=False)
        for ax, p in zip(axes.flat, pairs):
            ax.scatter(self.activations(p.a).numpy(), self.activations(p.b).numpy(), s=4, alpha=0.5)
            ax.set_xlabel(_name(p.a), fontsize=8)
            ax.set_ylabel(_name(p.b), fontsize=8)
            ax.set_title(f"corr {p.correlation:+.3f}", fontsize=9)
        for ax in list(axes.flat)[len(pairs):]:
            ax.axis("off")
        fig.suptitle(f"most redundant pairs: {c.name}", fontsize=10)
        fig.tight_layout()
        return fig

    def save(self, folder: str | Path, k_scatter: int = 6) -> Path:
        """Write ``inspect.md``, ``deaths.png`` and ``pairs.png`` into ``folder``; returns the .md path."""
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        figures = {}
        for fname, caption, make in (
            ("deaths.png", "MST deaths per layer", lambda: self.plot_deaths()),
            ("pairs.png", "activations of the most redundant pairs", lambda: self.plot_pairs(k_scatter)),
        ):
            fig = make()
            fig.savefig(folder / fname, dpi=110)
            plt.close(fig)
            figures[caption] = fname
        path = folder / "inspect.md"
        path.write_text(self.to_markdown(figures), encoding="utf-8")
        return path


#: Said under a pair table holding a pair printed as "+1.0000".
_ONE_NOTE = (
    "A correlation of +1.0000 is not always a duplicated feature: two near-dead neurons that are zero on "
    "every sample but one (the same one) also correlate at exactly +1. Look at such a pair's activations "
    "(pairs.png, or `report.activations(neuron)`) before pruning either neuron."
)


def _name(neuron: tuple[str, int]) -> str:
    return f"{neuron[0]}[{neuron[1]}]"


# -- streaming correlation -------------------------------------------------------------------------


class _Moments:
    """Exact streamed Pearson correlation of the columns of (rows, n) blocks (float64 sums)."""

    def __init__(self) -> None:
        self.rows = 0
        self.shift = self.sum = self.gram = None
        self.dtype = None  # the input dtype of least precision: it sets the constant-neuron tolerance

    def add(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteActivationsError(
                "the captured activations contain NaN or inf; check the model's weights and the batches"
            )
        if self.dtype is None or torch.finfo(x.dtype).eps > torch.finfo(self.dtype).eps:
            self.dtype = x.dtype
        x = x.to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            n = x.shape[1]
            self.sum = x.new_zeros(n)
            self.gram = x.new_zeros(n, n)
        xc = x - self.shift
        self.sum += xc.sum(dim=0)
        self.gram += xc.T @ xc
        self.rows += x.shape[0]

    def correlation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(corr (n, n) with 1 on the diagonal and 0 for dead neurons, dead (n,) bool)."""
        m = self.sum / self.rows
        cov = self.gram / self.rows - torch.outer(m, m)
        cov = (cov + cov.T) / 2
        var = cov.diagonal().clamp_min(0.0)
        # the pipeline's rule (topodecorr.correlation.constant_rows): the spread is at most the
        # rounding of a constant of the input's precision
        dead = constant_rows((var * self.rows).sqrt(), (self.shift + m).abs(), self.rows, self.dtype)
        var = torch.where(dead, torch.ones_like(var), var)
        corr = cov / torch.outer(var, var).sqrt()
        corr = corr.clamp(-1.0, 1.0)
        corr[dead, :] = 0.0
        corr[:, dead] = 0.0
        corr.fill_diagonal_(1.0)
        return corr, dead


def _cloud(name, corr, dead, labels, k, dissimilarity, backend) -> LayerRedundancy:
    n = corr.shape[0]
    D = _dissimilarity(corr, dissimilarity)
    res = mst_deaths(D.cpu(), backend=backend)
    deaths, edges = res.deaths.detach().cpu(), res.edges.cpu()
    pairs = tuple(
        NeuronPair(labels[int(i)], labels[int(j)], float(corr[i, j]), float(deaths[r]))
        for r, (i, j) in enumerate(edges[:k].tolist())
    )
    dead_idx = dead.nonzero().flatten().tolist()
    return LayerRedundancy(
        name=name, neurons=n, dead=len(dead_idx), dead_neurons=tuple(labels[i] for i in dead_idx),
        deaths=deaths, edges=edges, labels=tuple(labels), pairs=pairs,
    )


def _call(model: nn.Module, batch, device):
    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) and device is not None else t

    if isinstance(batch, torch.Tensor):
        return model(move(batch))
    if isinstance(batch, dict):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(move(batch[0]))  # (inputs, targets, ...): the inputs
    raise TypeError(
        "each batch must be a tensor of inputs, a tuple/list whose first entry is the inputs, "
        f"or a dict of keyword arguments of the model; got {type(batch).__name__}"
    )


def inspect(
    model: nn.Module,
    batches: Iterable,
    layers="auto",
    mode: str | None = None,
    *,
    k: int = 10,
    dissimilarity: str = "abs",
    pooled: bool = True,
    max_neurons: int = 4096,
    keep_samples: int = 512,
    backend: str = "auto",
) -> RedundancyReport:
    """Map the redundant neurons of a trained model: MST deaths, dead neurons, top pairs.

    Parameters
    ----------
    model : nn.Module
        Run in ``eval()`` mode under ``torch.no_grad()`` (its mode is restored after).
    batches : iterable
        Each item a tensor of inputs, a tuple / list ``(inputs, targets, ...)`` or a dict of
        keyword arguments of the model; tensors are moved to the model's device.
    layers : "auto" | list of nn.Module | list of str
        As for :class:`topodecorr.Decorrelation` (``"auto"``: the activation modules and the
        model's output).
    mode : {"flatten", "channel", "features_last"}, optional
        How a layer output becomes (samples, neurons) (see
        :func:`topodecorr.functional.flatten_activation`); by default the rule of
        :class:`topodecorr.Decorrelation` (``"features_last"`` for the transformer blocks
        ``layers="auto"`` finds, ``"flatten"`` otherwise).
    k : int
        Pairs reported per cloud.
    dissimilarity : {"abs", "sqrt"}
    pooled : bool
        Also build the pooled cloud of all layers.
    max_neurons : int
        Refuse clouds above this size (the correlation matrix is n x n float64).
    keep_samples : int
        Rows of activations kept per layer for :meth:`RedundancyReport.activations` and the
        scatter plots.
    backend : str
        MST kernel (see :func:`topodecorr.mst_deaths`).

    Returns
    -------
    RedundancyReport

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    >>> with torch.no_grad():
    ...     net[0].weight[1] = net[0].weight[0]; net[0].bias[1] = net[0].bias[0]   # a duplicate
    >>> report = inspect(net, [torch.randn(64, 4) for _ in range(3)])
    >>> report.pooled.pairs[0].a, report.pooled.pairs[0].b, round(report.pooled.pairs[0].correlation, 6)
    (('1', 0), ('1', 1), 1.0)
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if dissimilarity not in DISSIMILARITIES:
        raise ValueError(f"unknown dissimilarity {dissimilarity!r}; choose one of {DISSIMILARITIES}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k (pairs per cloud) must be a positive integer, got {k!r}")
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches must be an iterable of batches (e.g. [x] or a DataLoader), not one tensor")
    model = unwrap(model)
    chosen = resolve_layers(model, layers, mode)
    stream = _Stream(pooled, max_neurons, keep_samples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Recorder(model, chosen) as recorder:
            param = next(model.parameters(), None)
            for batch in batches:
                _call(model, batch, param.device if param is not None else None)
                stream.add(recorder.take())
    finally:
        model.train(was_training)
    return stream.report(k, dissimilarity, backend, mode or ", ".join(sorted(set(chosen.modes))) or "flatten")


class _Stream:
    """The streamed moments of every cloud over the batches of :func:`inspect`, then the report."""

    def __init__(self, pooled: bool, max_neurons: int, keep_samples: int) -> None:
        self.pooled, self.max_neurons, self.keep_samples = pooled, max_neurons, keep_samples
        self.names: list[str] | None = None
        self.sizes: list[int] = []
        self.moments: list[_Moments] = []
        self.pooled_m: _Moments | None = None
        self.kept: list[list[torch.Tensor]] = []
        self.batches = 0

    def add(self, records) -> None:
        """One batch's records (layer outputs in call order)."""
        if not records:
            raise ValueError(
                "the forward pass produced no tensor at the chosen layers; pass layers= naming modules that "
                "return tensors"
            )
        for r in records:
            if r.tensor.dim() < 2:
                raise ValueError(f"layer output of shape {tuple(r.tensor.shape)} has no batch dimension plus units")
        acts = [r.matrix for r in records]
        if self.names is None:
            self._start([r.name for r in records], acts)
        elif [a.shape[1] for a in acts] != self.sizes:
            raise ValueError(
                f"batch {self.batches} produced layers of different sizes than the first batch: "
                "every batch must run the same layers with the same output shapes"
            )
        if self.pooled_m is not None:
            self.pooled_m.add(torch.cat(acts, dim=1))
        else:
            for m, a in zip(self.moments, acts):
                m.add(a)
        for store, a in zip(self.kept, acts):
            have = sum(x.shape[0] for x in store)
            if have < self.keep_samples:
                store.append(a[: self.keep_samples - have].detach().float().cpu())
        self.batches += 1

    def _start(self, names: list[str], acts: list[torch.Tensor]) -> None:
        self.names, self.sizes = names, [a.shape[1] for a in acts]
        use_pooled = self.pooled and len({a.shape[0] for a in acts}) == 1 and len(acts) > 1
        biggest = sum(self.sizes) if use_pooled else max(self.sizes)
        if biggest > self.max_neurons:
            raise ValueError(
                f"{'the pooled cloud' if use_pooled else 'a layer'} has {biggest} neurons "
                f"(layers {dict(zip(names, self.sizes))}); its correlation matrix would be too "
                f"large for max_neurons={self.max_neurons}: choose fewer layers (layers=[...]), "
                "mode='channel' for conv maps, pooled=False, or raise max_neurons"
            )
        self.moments = [_Moments() for _ in acts]
        self.pooled_m = _Moments() if use_pooled else None
        self.kept = [[] for _ in acts]

    def report(self, k: int, dissimilarity: str, backend: str, mode: str) -> "RedundancyReport":
        if self.batches == 0:
            raise ValueError("batches is empty: pass at least one batch of inputs (e.g. [x] or a DataLoader)")
        rows = self.pooled_m.rows if self.pooled_m is not None else self.moments[0].rows
        if rows < 2:
            raise ValueError(f"only {rows} sample was seen: a correlation needs at least 2 samples")
        labels = [[(name, i) for i in range(size)] for name, size in zip(self.names, self.sizes)]
        clouds, pooled_cloud = [], None
        if self.pooled_m is not None:
            corr, dead = self.pooled_m.correlation()
            start = 0
            for name, lab in zip(self.names, labels):
                sl = slice(start, start + len(lab))
                clouds.append(_cloud(name, corr[sl, sl], dead[sl], lab, k, dissimilarity, backend))
                start += len(lab)
            flat = [x for lab in labels for x in lab]
            pooled_cloud = _cloud("pooled", corr, dead, flat, k, dissimilarity, backend)
        else:
            for name, lab, m in zip(self.names, labels, self.moments):
                corr, dead = m.correlation()
                clouds.append(_cloud(name, corr, dead, lab, k, dissimilarity, backend))
        if len(clouds) == 1 and self.pooled and pooled_cloud is None:
            pooled_cloud = clouds[0]
        kept_by_name = {
            name: torch.cat(store) if store else torch.zeros(0, size)
            for name, store, size in zip(self.names, self.kept, self.sizes)
        }
        return RedundancyReport(
            layers=tuple(clouds), pooled=pooled_cloud, samples=rows, batches=self.batches, mode=mode,
            dissimilarity=dissimilarity, _kept=kept_by_name,
        )
