"""The one pipeline every entry point calls: rows -> neurons -> clouds -> deaths -> penalty.

:func:`decorrelation_penalty` (the weighted scalar) and
:func:`decorrelation_result` (the same value with what produced it, a frozen
:class:`PenaltyResult`) work on a list of activation matrices, one
(samples, neurons) tensor per layer (see :func:`flatten_activation`); the
hook-based :class:`topodecorr.Decorrelation` captures those tensors from the
training forward pass and calls the same function. One step:

1. **rows** (``max_samples``): a layer with more samples than ``max_samples``
   keeps that many rows drawn without replacement (the same rows for every
   layer of a pooled cloud), before anything is correlated;
2. **neurons** (``sampling``): which columns of each layer enter (see
   :mod:`topodecorr.sampling`; output layers stay whole);
3. **clouds** (``pooled``): all layers side by side in one point cloud (they
   must share their samples), or each layer its own cloud with its own samples;
4. **dead neurons** (``dead_neurons``): constant columns stay (the paper) or leave;
5. **penalty**: per cloud, the registry's function (:data:`topodecorr.penalties.REGISTRY`)
   of the MST deaths or of the activations; the clouds' values are summed and weighted.
   Several per-layer clouds get their trees from one batched call
   (:func:`topodecorr.persistence.correlation_deaths_many`).

Penalties (``lam`` is the weight):

* ``"t1"``: lam * sum_k (1 - d_k) over the MST deaths d of the sampled neurons;
* ``"t2"``: lam * (alpha * std(d) - (1 - alpha) * mean(d));
* ``"mean_abs_corr"``: lam * mean |corr| over off-diagonal pairs (the paper's naive baseline);
* ``"decov"``: lam * DeCov of the sampled neurons (Cogswell et al., 2016);
* ``"decov_layer"``: lam * the sum over hidden layers of each layer's DeCov (the
  original paper's form: one cloud per layer whatever ``pooled`` says, no logits);
* ``"act_l2"``: lam * ||A||_F^2 / B, a scale control that shrinks without decorrelating;
* ``"none"``: 0 (a control that still runs capture and sampling).

Dead neurons (constant over the batch, e.g. a ReLU that never fires) have no
defined correlation. ``dead_neurons="keep"`` is the paper's convention: they
stay in the cloud with correlation 0 to every other neuron, so each adds a
death of 1 and T1 / T2 *reward* them. ``dead_neurons="drop"`` takes them out
of the point cloud after sampling (they are counted in ``PenaltyResult.dead``);
a cloud with fewer than two live neurons contributes 0 with no gradient.

Row subsampling (``max_samples``) estimates each correlation from fewer rows:
the deaths move by about ``1 / sqrt(max_samples)`` (measured in BENCHMARKS.md,
"Row subsampling"); the dead count and the live sets then refer to the rows used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import _checks
from ._checks import DEAD_NEURONS, PIPELINE_KINDS as KINDS
from . import _fused
from .penalties import PER_HIDDEN_LAYER, names
from .persistence import _deaths_of as tree_deaths
from .sampling import select_neurons

__all__ = [
    "MODES",
    "PENALTIES",
    "PenaltyResult",
    "decorrelation_penalty",
    "decorrelation_result",
    "flatten_activation",
]

#: Penalty names the pipeline takes (the registry's "deaths" and "activations" kinds).
PENALTIES = names(*KINDS)
#: How a layer output (B, ...) becomes (samples, neurons); see :func:`flatten_activation`.
MODES = ("flatten", "channel", "features_last")


@dataclass(frozen=True, eq=False)
class PenaltyResult:
    """The weighted penalty of one step and what produced it (immutable).

    Attributes
    ----------
    value : Tensor, scalar
        ``weight`` times the sum over point clouds; float32 (float64 for float64 input).
    deaths : tuple of Tensor (n_c - 1,)
        Sorted MST deaths per cloud (empty for penalties that build no tree).
    edges : tuple of LongTensor (n_c - 1, 2)
        The spanning tree of each cloud, in cloud column indices.
    indices : tuple of (LongTensor | None)
        The neurons sampled from each layer (None: all of them).
    live : tuple of (LongTensor | None)
        With ``dead_neurons="drop"``, the columns of each cloud that were kept
        (None: all); None per cloud with ``"keep"``.
    clouds : tuple of int
        Neurons per point cloud (after dropping dead ones).
    dropped : int
        Dead neurons taken out of the clouds.
    dead : Tensor (0-dim, int64) or None
        Neurons constant over the rows used, over all clouds, dropped ones
        included; read off the moments the pipeline computed anyway (no copy of
        the clouds is kept, and reading it is the only host synchronisation).
    rows : tuple of (LongTensor | None)
        The rows drawn per cloud by ``max_samples`` (None: every row).

    ``neurons`` is the sum of ``clouds``.
    """

    value: torch.Tensor
    deaths: tuple[torch.Tensor, ...] = ()
    edges: tuple[torch.Tensor, ...] = ()
    indices: tuple[torch.Tensor | None, ...] = ()
    live: tuple[torch.Tensor | None, ...] = ()
    clouds: tuple[int, ...] = ()
    dropped: int = 0
    dead: torch.Tensor | None = field(default=None, repr=False)
    rows: tuple[torch.Tensor | None, ...] = ()

    @property
    def neurons(self) -> int:
        """Neurons in all point clouds."""
        return sum(self.clouds)

    def detached(self) -> "PenaltyResult":
        """The same result with the value and deaths detached (for statistics kept past the step)."""
        return replace(self, value=self.value.detach(), deaths=tuple(d.detach() for d in self.deaths))


def flatten_activation(x: torch.Tensor, mode: str = "flatten") -> torch.Tensor:
    """Turn a layer output into a (samples, neurons) matrix.

    Parameters
    ----------
    x : Tensor, shape (B, ...)
        A layer output with the batch first.
    mode : {"flatten", "channel", "features_last"}
        * ``"flatten"``: (B, ...) -> (B, prod(...)): every entry of a sample is a
          neuron (the paper's rule for MLPs and its CNNs);
        * ``"channel"``: (B, C, *spatial) -> (B * prod(spatial), C): one neuron
          per channel of an NCHW (or NCL, NCDHW) map, positions are extra samples;
        * ``"features_last"``: (B, ..., F) -> (B * prod(...), F): one neuron per
          feature of the last dimension, tokens or positions are extra samples
          (a transformer's (batch, tokens, features), a channels-last map).

        A (B, n) tensor is (B, n) in every mode.

    Returns
    -------
    Tensor, shape (samples, neurons)

    Examples
    --------
    >>> import torch
    >>> x = torch.zeros(4, 7, 16)  # (batch, tokens, features)
    >>> flatten_activation(x, "features_last").shape
    torch.Size([28, 16])
    >>> flatten_activation(x, "channel").shape  # dim 1 (the tokens) would be the neurons
    torch.Size([64, 7])
    """
    _check_layer(x, mode)
    if mode == "flatten" or x.dim() == 2:
        return x.reshape(x.shape[0], -1)
    if mode == "channel":
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _check_layer(x: torch.Tensor, mode: str) -> None:
    """The errors of :func:`flatten_activation`, without flattening."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"a captured layer output must be a tensor, got {type(x).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if x.dim() < 2:
        need = {"flatten": "(batch, ...)", "channel": "(batch, channels, *spatial)",
                "features_last": "(batch, ..., features)"}[mode]
        raise ValueError(
            f"mode={mode!r} needs a layer output of shape {need} with a batch dimension and at least "
            f"one unit, got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"a layer output of shape {tuple(x.shape)} has no entries: nothing to correlate")


def _trees(groups, layouts, empty, entry, kind, backend, edges) -> dict:
    """(Deaths, dead flags) of every non-empty cloud for a deaths penalty: one op call for all clouds."""
    if entry.kind != "deaths":
        return {}
    todo = [g_i for g_i, skip in enumerate(empty) if not skip]
    if not todo:
        return {}
    prev = [edges[g_i] if edges is not None else None for g_i in todo]
    res = tree_deaths([groups[g_i] for g_i in todo], kind, backend, prev, None, [layouts[g_i] for g_i in todo])
    return dict(zip(todo, res))


def decorrelation_penalty(
    acts: list[torch.Tensor] | torch.Tensor,
    penalty: str = "t1",
    weight: float = 1.0,
    **options,
) -> torch.Tensor:
    """Weighted decorrelation penalty of a list of layer activations (no hooks): a scalar tensor.

    The value of :func:`decorrelation_result` (same arguments), for a loss.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(32, 6, generator=g).relu()
    >>> out = torch.randn(32, 3, generator=g)
    >>> p = decorrelation_penalty([h, out], "t1", weight=0.1)
    >>> bool(p > 0)
    True
    """
    return decorrelation_result(acts, penalty, weight, **options).value


def decorrelation_result(
    acts: list[torch.Tensor] | torch.Tensor,
    penalty: str = "t1",
    weight: float = 1.0,
    *,
    dissimilarity: str = "abs",
    sampling: str = "all",
    fraction: float = 1.0,
    count: int | None = None,
    output_layers: list[bool] | None = None,
    pooled: bool = True,
    alpha: float = 0.5,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
    indices: list[torch.Tensor | None] | None = None,
    edges: list[torch.Tensor] | None = None,
    live: list[torch.Tensor | None] | None = None,
    dead_neurons: str = "keep",
    backend: str = "auto",
    modes: list[str] | None = None,
) -> PenaltyResult:
    """Weighted decorrelation penalty of a list of layer activations, with its deaths and trees.

    Parameters
    ----------
    acts : Tensor (S, n) or list of Tensor (S_l, n_l)
        Activations of each layer as (samples, neurons) (see :func:`flatten_activation`).
        With ``pooled=True`` every layer needs the same samples (S_l = S);
        with ``pooled=False`` each layer is its own cloud with its own S_l.
    penalty : {"t1", "t2", "mean_abs_corr", "decov", "none"}
        A name of the registry (:data:`topodecorr.penalties.REGISTRY`) of kind
        "deaths" or "activations".
    weight : float
        lambda >= 0.
    dissimilarity : {"abs", "sqrt"}
        See :data:`topodecorr.correlation.DISSIMILARITIES`.
    sampling, fraction, count
        See :func:`topodecorr.sampling.select_neurons`.
    output_layers : list of bool, optional
        Which entries are output layers (always kept whole); default: the last one.
    pooled : bool
        One point cloud for all layers (True; they must share their samples)
        or one per layer, each with its own samples, summed (False).
    alpha : float
        T2's trade-off.
    max_samples : int >= 2, optional
        Keep at most this many rows per cloud (drawn without replacement from
        ``generator``, the same rows for all layers of a pooled cloud) before
        correlating. None: every row.
    generator : torch.Generator, optional
        Source of the row draws and of ``sampling="random"`` (on the CPU).
    indices, edges, live : optional
        Reuse a previous step's sampling, spanning trees and live-neuron sets
        (``refresh_every``): the deaths of those edges are recomputed with
        gradient, no MST is built.
    dead_neurons : {"keep", "drop"}
        Constant neurons stay in the cloud with correlation 0 (the paper's
        convention; they add deaths of 1) or leave it (counted as dead).
    backend : str
        MST kernel (see :func:`topodecorr.mst_deaths`).
    modes : list of {"flatten", "channel", "features_last"}, optional
        ``acts`` are raw layer outputs, each to be read as
        :func:`flatten_activation` with its mode says. A ``"channel"`` map then
        enters the fused op in its own (B, C, *spatial) layout, without the
        (B * spatial, C) copy, whenever nothing needs that copy (no row draw, no
        neuron sampling but ``"all"``, a penalty of deaths); ``"features_last"`` and
        ``"flatten"`` are views already.

    Returns
    -------
    PenaltyResult

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> maps = [torch.randn(512, 8, generator=g), torch.randn(128, 16, generator=g)]  # two resolutions
    >>> r = decorrelation_result(maps, "t1", pooled=False, max_samples=256, generator=g)
    >>> r.clouds, [tuple(d.shape) for d in r.deaths]
    ((8, 16), [(7,), (15,)])
    """
    if isinstance(acts, torch.Tensor):
        acts = [acts]
    acts = list(acts)
    if not acts:
        raise ValueError("no activations to regularise: pass at least one (samples, units) tensor")
    entry = _checks.pipeline(penalty=penalty, weight=weight, dissimilarity=dissimilarity, sampling=sampling,
                             fraction=fraction, count=count, alpha=alpha, dead_neurons=dead_neurons,
                             max_samples=max_samples, backend=backend)
    acts, layouts = _layer_layouts(acts, modes, entry.kind == "deaths" and sampling == "all" and indices is None)
    per_layer = entry.name in PER_HIDDEN_LAYER  # decov_layer: one cloud per hidden layer, no logits
    pooled = pooled and not per_layer
    if pooled:
        _check_same_samples(acts, layouts)
    if output_layers is None:
        output_layers = [False] * (len(acts) - 1) + [True]
    acts, layouts, rows = _draw_rows(acts, layouts, max_samples, pooled, generator)
    sel = select_neurons(acts, output_layers, sampling, fraction, count, generator) if indices is None else indices
    picked = [a if i is None else a[:, i] for a, i in zip(acts, sel)]
    if pooled and (len(set(layouts)) > 1 or len({a.shape[:1] + a.shape[2:] for a in picked}) > 1):
        # a channel map pooled with a (samples, units) layer, or maps of different shapes: flatten them
        picked = [flatten_activation(a, "channel") if lay == "channel" else a for a, lay in zip(picked, layouts)]
        layouts = ["rows"] * len(picked)
    groups = [picked[0] if len(picked) == 1 else torch.cat(picked, dim=1)] if pooled else picked
    layouts = layouts[:1] if pooled else layouts
    rows = rows[:1] if pooled else rows
    live, dropped, pre_dead = _drop_dead(groups, layouts, live, dead_neurons)
    # fewer than two (live) neurons: no pair, no correlation; 0 with no gradient path
    empty = [(dead_neurons == "drop" and g.shape[1] < 2) or (per_layer and output_layers[g_i])
             for g_i, g in enumerate(groups)]
    many = _trees(groups, layouts, empty, entry, dissimilarity, backend, edges)
    values, deaths, trees, dead = [], [], [], []
    for g_i, g in enumerate(groups):
        if g_i in many:
            (d, e), dd = many[g_i]
            values.append(entry(d, alpha=alpha))
            deaths.append(d)
            trees.append(e)
            dead.append(dd.sum())
            continue
        dead.append(_dead_flags(g, layouts[g_i]).sum())
        if empty[g_i]:
            values.append(g.sum() * 0.0)
            if entry.kind == "deaths":
                deaths.append(g.new_zeros(0))
                trees.append(torch.zeros(0, 2, dtype=torch.long, device=g.device))
        else:
            values.append(entry(flatten_activation(g, "channel") if layouts[g_i] == "channel" else g, alpha=alpha))
    value = weight * torch.stack([v.float() if v.dtype != torch.float64 else v for v in values]).sum()
    return PenaltyResult(
        value=value,
        deaths=tuple(deaths),
        edges=tuple(trees),
        indices=tuple(sel),
        live=tuple(live),
        clouds=tuple(g.shape[1] for g in groups),
        dropped=dropped,
        dead=torch.stack(dead).sum() + pre_dead,
        rows=tuple(rows),
    )


def _layer_layouts(acts, modes, keep_channel):
    """Each layer as (tensor, layout): 2-D (samples, units) or, kept as it is, a channel map."""
    if modes is None:
        for k, a in enumerate(acts):
            if not isinstance(a, torch.Tensor) or a.dim() != 2:
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(
                    f"activation {k} must be (samples, units); flatten it first (flatten_activation) "
                    f"or pass modes=, got {shape}"
                )
        return acts, ["rows"] * len(acts)
    if len(modes) != len(acts):
        raise ValueError(f"modes must have one entry per activation: {len(acts)} activations, {len(modes)} modes")
    out, layouts = [], []
    for a, mode in zip(acts, modes):
        if mode == "channel" and keep_channel and isinstance(a, torch.Tensor) and a.dim() > 2:
            _check_layer(a, mode)
            out.append(a)
            layouts.append("channel")
        else:
            out.append(flatten_activation(a, mode))
            layouts.append("rows")
    return out, layouts


def _samples(a: torch.Tensor, layout: str) -> int:
    return a.numel() // a.shape[1] if layout == "channel" else a.shape[0]


def _drop_dead(groups, layouts, live, dead_neurons):
    """``dead_neurons="drop"``: take the constant columns out of every cloud (in place in ``groups``)."""
    if dead_neurons != "drop":
        return [None] * len(groups), 0, 0
    if live is None:
        live = [_live_columns(g, lay) for g, lay in zip(groups, layouts)]
    dropped = 0
    for g_i, keep in enumerate(live):
        if keep is not None:
            dropped += groups[g_i].shape[1] - keep.numel()
            groups[g_i] = groups[g_i][:, keep]
    return live, dropped, dropped


def _draw_rows(acts, layouts, max_samples, pooled, generator):
    """At most ``max_samples`` rows per cloud, without replacement (shared by the layers of a pooled cloud).

    Returns the layers, their layouts (a channel map that loses rows becomes (samples, units))
    and the rows drawn per cloud (None: all).
    """
    if max_samples is None:
        return acts, layouts, [None] * len(acts)

    def draw(rows, device):
        idx = torch.randperm(rows, generator=generator)[:max_samples]
        return torch.sort(idx).values.to(device)

    def take(a, lay, idx):
        return (flatten_activation(a, "channel") if lay == "channel" else a).index_select(0, idx)

    if pooled:
        rows = _samples(acts[0], layouts[0])
        if rows <= max_samples:
            return acts, layouts, [None] * len(acts)
        idx = draw(rows, acts[0].device)
        return [take(a, lay, idx) for a, lay in zip(acts, layouts)], ["rows"] * len(acts), [idx] * len(acts)
    out, outl, drawn = [], [], []
    for a, lay in zip(acts, layouts):
        rows = _samples(a, lay)
        idx = None if rows <= max_samples else draw(rows, a.device)
        out.append(a if idx is None else take(a, lay, idx))
        outl.append(lay if idx is None else "rows")
        drawn.append(idx)
    return out, outl, drawn


def _check_same_samples(acts: list[torch.Tensor], layouts: list[str]) -> None:
    rows = [_samples(a, lay) for a, lay in zip(acts, layouts)]
    for k, r in enumerate(rows):
        if r != rows[0]:
            raise ValueError(
                f"pooled=True puts all layers in one point cloud, whose neurons need the same samples, but "
                f"activation {k} has {r} samples (rows) and activation 0 has {rows[0]} (samples per layer: "
                f"{rows}; in channel or features_last mode each layer has batch x positions samples, which "
                "differ between resolutions); pass pooled=False for one point cloud per layer"
            )


def _dead_flags(g: torch.Tensor, layout: str = "rows") -> torch.Tensor:
    """The constant columns of ``g`` by the fused op's rule (its moments, without gradient)."""
    with torch.no_grad():
        return _fused.normalise(g, layout)[2]


def _live_columns(g: torch.Tensor, layout: str = "rows") -> torch.Tensor | None:
    """Indices of the non-constant columns of ``g`` (None when all are live: nothing to drop)."""
    dead = _dead_flags(g, layout)
    if not bool(dead.any()):
        return None
    return (~dead).nonzero().squeeze(1)
