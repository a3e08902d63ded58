"""Zero-dimensional persistence of a dissimilarity matrix, exactly and differentiably.

For the Vietoris-Rips filtration of the complete graph on n points with edge
weights ``D``, every point is born at 0 and the n - 1 finite death times are
the edge weights of a minimum spanning tree (MST) (Kruskal: each edge that
merges two components kills one). The multiset of deaths is unique even when
the tree is not. Each death comes with its edge, the persistence pair.

Differentiation: away from ties the tree is locally constant, so
``death_k = D[i_k, j_k]`` and its gradient lands on that entry only.
Convention: a death is read as ``(D[i, j] + D[j, i]) / 2``, so for a
symmetric ``D`` its value is ``D[i, j]`` and its gradient is split equally
between the two symmetric entries (the derivative of the deaths of the
symmetric part of ``D``). Kernels only pick the edges; this module does the
gather, so every kernel has the same gradient.

Reference: Ballester, Casacuberta, Escalera, "Decorrelating neurons using
persistence", PMLR 228 (2024).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _fused
from ._kernels import matrix_stats, mst_edges, resolve_backend
from .correlation import DISSIMILARITIES, _check_acts, dissimilarity

__all__ = ["Deaths", "mst_deaths", "correlation_deaths", "correlation_deaths_many", "check_dissimilarity"]


class Deaths(NamedTuple):
    """Finite deaths of a zero-dimensional persistence diagram and their edges.

    Attributes
    ----------
    deaths : Tensor, shape (n - 1,)
        Sorted ascending; differentiable.
    edges : LongTensor, shape (n - 1, 2)
        ``edges[k] = (i, j)`` with ``i < j``: the MST edge whose weight is ``deaths[k]``.
    """

    deaths: torch.Tensor
    edges: torch.Tensor


def _tolerance(D: torch.Tensor, scale: float) -> float:
    return 64.0 * torch.finfo(D.dtype).eps * max(1.0, scale)


def check_dissimilarity(D: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``D`` is a square, finite, non-negative, symmetric matrix.

    Negatives and asymmetries within float rounding (64 machine epsilons,
    relative to ``max(1, max |D|)``) are accepted.
    """
    if not isinstance(D, torch.Tensor):
        raise TypeError(f"D must be a torch.Tensor, got {type(D).__name__}")
    if D.dim() != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D must be a square (n, n) dissimilarity matrix, got shape {tuple(D.shape)}")
    if not D.is_floating_point():
        raise ValueError(f"D must be a floating-point matrix, got dtype {D.dtype}")
    if D.shape[0] == 0:
        raise ValueError("D is empty (0 x 0): there must be at least one point")
    Dd = D.detach()
    finite, low, high, asym = matrix_stats(Dd)
    scale = max(abs(low), abs(high))
    if not finite:
        bad = (~torch.isfinite(Dd)).nonzero()[0].tolist()
        raise ValueError(f"D contains a non-finite value (NaN or inf), first at index {tuple(bad)}")
    tol = _tolerance(Dd, scale)
    if low < -tol:
        raise ValueError(
            f"D has a negative entry ({low:.3g}); dissimilarities must be >= 0 "
            f"(tiny negatives down to -{tol:.1g} from rounding are clamped to 0)"
        )
    if asym > tol:
        raise ValueError(
            f"D is not symmetric: max |D - D.T| = {asym:.3g} > tolerance {tol:.1g}; "
            "pass (D + D.T) / 2 if the asymmetry is intended noise"
        )


def _empty(like: torch.Tensor) -> Deaths:
    """The result for fewer than two points: no deaths, still attached to ``like``'s graph."""
    return Deaths(like.new_zeros((0,)) + like.sum() * 0, torch.zeros((0, 2), dtype=torch.long, device=like.device))


def _ordered_pairs(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = edges[:, 0], edges[:, 1]
    return torch.minimum(i, j), torch.maximum(i, j)


def _sorted(d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> Deaths:
    """Deaths ``d`` of the edges ``(lo, hi)`` (lo < hi), sorted ascending (stable)."""
    order = torch.sort(d.detach(), stable=True).indices
    return Deaths(d[order], torch.stack([lo, hi], dim=1)[order])


def _edge_weights(D: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``(D[lo, hi] + D[hi, lo]) / 2``, clamped at 0 in value only."""
    if D.is_contiguous():
        # one gather of both symmetric entries: the backward then builds one dense
        # (n, n) gradient instead of two plus their sum (measured ~2x faster at n = 4096)
        n, m = D.shape[0], lo.shape[0]
        both = D.reshape(-1)[torch.cat([lo * n + hi, hi * n + lo])]
        d = 0.5 * (both[:m] + both[m:])
    else:
        d = 0.5 * (D[lo, hi] + D[hi, lo])
    return d + (d.detach().clamp_min(0.0) - d.detach())


def mst_deaths(D: torch.Tensor, backend: str = "auto", validate: bool = True) -> Deaths:
    """Finite deaths of the Vietoris-Rips zero-dimensional persistence of ``D``.

    Parameters
    ----------
    D : Tensor, shape (n, n)
        Symmetric dissimilarity matrix (diagonal ignored) on any device.
        Zero off-diagonal entries (duplicate points) are valid and give zero deaths.
    backend : {"auto", "numba", "numpy", "boruvka"}
        MST kernel; ``"auto"`` runs on ``D``'s device (see :mod:`topodecorr._kernels`).
    validate : bool
        Check shape, finiteness, sign and symmetry first (one host synchronisation).

    Returns
    -------
    Deaths
        ``deaths`` (n - 1,) ascending and differentiable w.r.t. ``D``; ``edges`` (n - 1, 2).
        Ties are broken deterministically: the same input gives the same edges.

    Raises
    ------
    ValueError
        If ``D`` is not square, has a non-finite entry, a clearly negative entry,
        or is clearly not symmetric.

    Examples
    --------
    >>> import torch
    >>> D = torch.tensor([[0.0, 0.2, 0.9], [0.2, 0.0, 0.4], [0.9, 0.4, 0.0]])
    >>> deaths, edges = mst_deaths(D)
    >>> deaths
    tensor([0.2000, 0.4000])
    >>> edges
    tensor([[0, 1],
            [1, 2]])
    """
    if validate:
        check_dissimilarity(D)
    if D.shape[0] <= 1:
        return _empty(D)
    lo, hi = _ordered_pairs(mst_edges(D.detach(), abs_corr=False, backend=backend))
    return _sorted(_edge_weights(D, lo, hi), lo, hi)


def correlation_deaths(
    acts: torch.Tensor,
    kind: str = "abs",
    backend: str = "auto",
    edges: torch.Tensor | None = None,
    gram_block: int | None = None,
    layout: str = "rows",
) -> Deaths:
    """Activations to MST deaths in one op, back-propagating only through the n - 1 tree edges.

    Equal in value and gradient to
    ``mst_deaths(dissimilarity(correlation(acts), kind))`` (up to the order of
    tied deaths and float rounding), but the (n, n) correlation matrix is built
    once *without* gradient to find the tree, and the deaths are read off it.
    The backward pass is one sparse product, O(n B): nothing O(n^2) and no
    n x n matrix is kept for it (:mod:`topodecorr._fused`, the op
    ``torch.ops.topodecorr.tree_correlations``, which ``torch.compile`` traces
    without a graph break).

    Parameters
    ----------
    acts : Tensor, shape (B, n), or (B, C, *spatial) with ``layout="channel"``
        Activations (B samples, n neurons); statistics in float32 (float64 stays float64).
    kind : {"abs", "sqrt"}
        Dissimilarity (see :func:`topodecorr.dissimilarity`); both select the same tree.
    backend : str
        MST kernel, as in :func:`mst_deaths`.
    edges : LongTensor (n - 1, 2), optional
        Reuse a tree found earlier (``refresh_every`` in the training API): the
        deaths of these edges are recomputed, the matrix and MST are skipped.
        This is an approximation once the activations have moved.
    gram_block : int, optional
        Block width for computing only the upper half of the correlation
        product with torch, ``>= n`` for one full product; ``None`` picks the
        measured default (:func:`topodecorr.correlation.gram_rows`).
    layout : {"rows", "channel"}
        ``"channel"``: ``acts`` is a (B, C, *spatial) map whose C channels are the
        neurons and whose B x spatial positions are the samples (what
        ``flatten_activation(acts, "channel")`` gives, without making that copy).

    Returns
    -------
    Deaths

    Notes
    -----
    Correlation is scale-free, and so are the deaths: a neuron whose activations
    lie at a subnormal scale (1e-40 in float32) gets the deaths it would have at
    scale 1. Its gradient, 1 / scale times larger, is not representable; such a
    neuron gets no gradient and a ``RuntimeWarning`` says how many there were
    (the other neurons' gradients are exact). NaN or inf activations raise
    :class:`~topodecorr.correlation.NonFiniteActivationsError` on the CPU.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> acts = torch.randn(64, 5, generator=g, requires_grad=True)
    >>> fused = correlation_deaths(acts)
    >>> from topodecorr import correlation, dissimilarity
    >>> dense = mst_deaths(dissimilarity(correlation(acts)))
    >>> torch.allclose(fused.deaths, dense.deaths, atol=1e-6)
    True
    """
    if edges is not None and not isinstance(edges, torch.Tensor):
        raise TypeError(f"edges must be a LongTensor (n - 1, 2) or None, got {type(edges).__name__}")
    return _deaths_of([acts], kind, backend, [edges], gram_block, [layout], single=True)[0][0]


def correlation_deaths_many(
    acts: list[torch.Tensor],
    kind: str = "abs",
    backend: str = "auto",
    edges: list[torch.Tensor | None] | None = None,
    layouts: list[str] | None = None,
) -> list[Deaths]:
    """:func:`correlation_deaths` of many point clouds (one per layer) in one op and one kernel call.

    Each result equals ``correlation_deaths(acts[l], kind, backend, edges[l])``
    in edges, deaths and gradient. What is shared: the MST kernel runs once for
    all trees (numba: one compiled loop over the trees in the calling thread;
    accelerators: one batched Boruvka), and on accelerators the correlation
    products of clouds with the same shape share one ``bmm``.

    Parameters
    ----------
    acts : list of Tensor, shapes (B_l, n_l) (or channel maps, see ``layouts``)
        Activations of each cloud, all on one device; sample counts may differ.
    kind, backend
        As in :func:`correlation_deaths`.
    edges : list of (LongTensor (n_l - 1, 2) or None), optional
        Trees to reuse per cloud (``None`` entries are found).
    layouts : list of {"rows", "channel"}, optional
        Per cloud, as ``layout`` in :func:`correlation_deaths`; default all ``"rows"``.

    Returns
    -------
    list of Deaths, one per cloud.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> layers = [torch.randn(32, 6, generator=g), torch.randn(32, 4, generator=g)]
    >>> many = correlation_deaths_many(layers)
    >>> [torch.equal(r.deaths, correlation_deaths(a).deaths) for r, a in zip(many, layers)]
    [True, True]
    """
    if not isinstance(acts, (list, tuple)) or not acts:
        raise ValueError("acts must be a non-empty list of (batch, neurons) tensors, one per point cloud")
    if edges is not None and len(edges) != len(acts):
        raise ValueError(f"edges must have one entry (or None) per cloud: {len(acts)} clouds, {len(edges)} entries")
    if layouts is not None and len(layouts) != len(acts):
        raise ValueError(f"layouts must have one entry per cloud: {len(acts)} clouds, {len(layouts)} entries")
    given = list(edges) if edges is not None else [None] * len(acts)
    out = _deaths_of(list(acts), kind, backend, given, None, layouts or ["rows"] * len(acts), single=False)
    return [d for d, _ in out]


def _deaths_of(acts, kind, backend, edges, block, layouts, single=False) -> list[tuple[Deaths, torch.Tensor]]:
    """Check the inputs, run the fused op once for all clouds, turn correlations into deaths.

    Package-internal (the pipeline's entry): per cloud its Deaths and its dead flags (n,).
    """
    if kind not in DISSIMILARITIES:
        raise ValueError(f"unknown dissimilarity kind {kind!r}; choose one of {DISSIMILARITIES}")
    for l, (a, lay) in enumerate(zip(acts, layouts)):
        _check_cloud(a, lay, "acts" if single else f"acts[{l}]")
    devices = {a.device for a in acts}
    if len(devices) > 1:
        raise ValueError(f"all activations must be on one device, got {sorted(map(str, devices))}")
    device = acts[0].device
    resolve_backend(backend, device)  # an unknown or unusable backend fails here, clearly
    for l, e in enumerate(edges):
        if e is not None:
            n = _fused.layout_shape(acts[l], layouts[l])[1]
            edges[l] = _given_edges(e, n, device, what="edges" if single else f"edges[{l}]")
    if block is not None and block < 1:
        raise ValueError(f"block must be a positive width, got {block}")
    corrs, trees, _, _, dead = torch.ops.topodecorr.tree_correlations(
        acts, [lay == "channel" for lay in layouts], edges, backend, block or 0
    )
    return [(Deaths(dissimilarity(c, kind), e), dd) for c, e, dd in zip(corrs, trees, dead)]


def _check_cloud(a: torch.Tensor, layout: str, name: str) -> None:
    if layout not in _fused.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} for {name}; choose one of {_fused.LAYOUTS}")
    if layout == "rows" or not isinstance(a, torch.Tensor) or a.dim() <= 2:
        _check_acts(a, name)
        return
    if not a.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {a.dtype}")
    samples = a.numel() // a.shape[1] if a.shape[1] else 0
    if samples < 2:
        raise ValueError(
            f"{name} of shape {tuple(a.shape)} has {samples} samples per channel: a correlation needs at least 2"
        )


def _given_edges(edges: torch.Tensor, n: int, device: torch.device, what: str = "edges") -> torch.Tensor:
    if edges.shape != (n - 1, 2):
        raise ValueError(f"{what} must have shape ({n - 1}, 2) for {n} neurons, got {tuple(edges.shape)}")
    return edges.to(device)
