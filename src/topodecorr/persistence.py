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

from ._kernels import matrix_stats, mst_edges, mst_edges_many
from .correlation import (
    correlation_product,
    correlation_products,
    dissimilarity,
    normalize_activations,
    pair_correlations,
)

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
) -> Deaths:
    """Activations to MST deaths, back-propagating only through the n - 1 tree edges.

    Equal in value and gradient to
    ``mst_deaths(dissimilarity(correlation(acts), kind))`` (up to the order of
    tied deaths), but the (n, n) correlation matrix is built once *without*
    gradient to find the tree; only the n - 1 selected correlations are
    recomputed, with gradient, from the normalised activations. The backward
    pass is O(n B) instead of O(n^2 B), and no n x n matrix is kept for it.

    Parameters
    ----------
    acts : Tensor, shape (B, n)
        Activations (B samples, n neurons); statistics in float32 under autocast.
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
        product (symmetry) with torch, ``>= n`` for one full product; ``None``
        picks a measured default (see :func:`topodecorr.correlation.correlation_product`:
        NumPy's syrk on the CPU).

    Returns
    -------
    Deaths

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
    z, _dead = normalize_activations(acts)
    n = z.shape[1]
    if n <= 1:
        return _empty(z)
    if edges is None:
        edges = mst_edges(correlation_product(z, block=gram_block), abs_corr=True, backend=backend)
    else:
        edges = _given_edges(edges, n, z.device)
    return _tree_deaths(z, edges, kind)


def _given_edges(edges: torch.Tensor, n: int, device: torch.device, what: str = "edges") -> torch.Tensor:
    if edges.shape != (n - 1, 2):
        raise ValueError(f"{what} must have shape ({n - 1}, 2) for {n} neurons, got {tuple(edges.shape)}")
    return edges.to(device)


def _tree_deaths(z: torch.Tensor, edges: torch.Tensor, kind: str) -> Deaths:
    """Deaths of the tree ``edges`` recomputed with gradient from the normalised activations ``z``."""
    lo, hi = _ordered_pairs(edges)
    with torch.autocast(device_type=z.device.type, enabled=False):
        d = dissimilarity(pair_correlations(z, lo, hi), kind)
    return _sorted(d, lo, hi)


def correlation_deaths_many(
    acts: list[torch.Tensor],
    kind: str = "abs",
    backend: str = "auto",
    edges: list[torch.Tensor | None] | None = None,
) -> list[Deaths]:
    """:func:`correlation_deaths` of many point clouds (one per layer) with one kernel call.

    Each result equals ``correlation_deaths(acts[l], kind, backend, edges[l])``
    in edges, deaths and gradient. What is shared: the MST kernel runs once for
    all trees (numba: one parallel call over the layers, ``prange`` with torch's
    thread count; accelerators: one batched Boruvka), and on accelerators the
    correlation products of layers with the same (B, n) share one ``bmm``.

    Parameters
    ----------
    acts : list of Tensor, shapes (B_l, n_l)
        Activations of each cloud, all on one device; sample counts may differ.
    kind, backend
        As in :func:`correlation_deaths`.
    edges : list of (LongTensor (n_l - 1, 2) or None), optional
        Trees to reuse per cloud (``None`` entries are found).

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
    zs = [normalize_activations(a)[0] for a in acts]
    devices = {z.device for z in zs}
    if len(devices) > 1:
        raise ValueError(f"all activations must be on one device, got {sorted(map(str, devices))}")
    given = edges if edges is not None else [None] * len(zs)
    find = [l for l, z in enumerate(zs) if z.shape[1] > 1 and given[l] is None]
    found = dict(zip(find, mst_edges_many(correlation_products([zs[l] for l in find]), True, backend)))
    out = []
    for l, z in enumerate(zs):
        n = z.shape[1]
        if n <= 1:
            out.append(_empty(z))
            continue
        e = found[l] if l in found else _given_edges(given[l], n, z.device, what=f"edges[{l}]")
        out.append(_tree_deaths(z, e, kind))
    return out
