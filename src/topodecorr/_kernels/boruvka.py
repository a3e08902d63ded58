"""Vectorised Boruvka in plain torch: the device-resident kernel (CUDA, also runs on CPU).

Each round, every component picks its lightest outgoing edge; the picked
edges are added and the components merged by pointer jumping. The number of
components at least halves every round, so ``ceil(log2 n)`` rounds always
suffice: the loop has a fixed trip count and never reads a value back to
the host (no synchronisation at all, let alone one per edge). The matrix
never leaves its device.

Edges are totally ordered by ``(weight, min(i, j), max(i, j))``, which keeps
Boruvka correct (no cycles) and deterministic under ties. Within a row ``i``
that order is simply ascending ``j`` among equal weights, which is what
``argmin`` returns (the first minimum).

Memory: one (n, n) copy holding the symmetric part of the input (so that
float rounding asymmetry cannot make two components disagree about an edge);
each round then builds a masked copy in chunks of rows (``chunk_rows`` x n).
"""

from __future__ import annotations

import math

import torch


def _row_minima(W: torch.Tensor, comp: torch.Tensor, chunk_rows: int):
    """Per row i: the lightest edge (i, j) with comp[j] != comp[i] (first j on ties)."""
    n = W.shape[0]
    inf = torch.tensor(float("inf"), dtype=W.dtype, device=W.device)
    vals = torch.empty(n, dtype=W.dtype, device=W.device)
    idx = torch.empty(n, dtype=torch.long, device=W.device)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        same = comp[start:stop, None] == comp[None, :]
        masked = torch.where(same, inf, W[start:stop])
        v, j = masked.min(dim=1)
        vals[start:stop] = v
        idx[start:stop] = j
    return vals, idx


def boruvka_edges(W: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Minimum spanning tree edges of the complete graph with weights ``W``.

    Parameters
    ----------
    W : Tensor, shape (n, n)
        Weights on any device; the diagonal is ignored. Not modified. The tree
        is that of the symmetric part ``(W + W.T) / 2`` (one temporary copy).
    chunk_rows : int, optional
        Rows masked at once; default keeps the temporary near 256 MiB.

    Returns
    -------
    LongTensor, shape (n - 1, 2), on ``W.device``
        Edges ``(i, j)``, in no particular order.
    """
    n = W.shape[0]
    device = W.device
    if n <= 1:
        return torch.empty((0, 2), dtype=torch.long, device=device)
    # Each component reads an edge's weight from its own rows. If W[i, j] and W[j, i]
    # differ by even one ulp (a float matrix product is not bitwise symmetric), two
    # components can disagree about the order of edges, pick edges that close a cycle,
    # and the result is not a tree. So work on the symmetric part, which is bitwise
    # symmetric (addition commutes) and is what mst_deaths differentiates.
    half = W.detach() * 0.5
    W = half + half.T
    del half
    if chunk_rows is None:
        chunk_rows = max(1, min(n, (1 << 26) // max(n, 1)))
    arange = torch.arange(n, device=device)
    comp = arange.clone()  # component label of each vertex = its root vertex
    out = torch.zeros((n, 2), dtype=torch.long, device=device)  # row n-1 is a dump slot
    count = torch.zeros((), dtype=torch.long, device=device)
    big = torch.iinfo(torch.long).max
    rounds = max(1, math.ceil(math.log2(n)))
    for _ in range(rounds):
        vals, jmin = _row_minima(W, comp, chunk_rows)
        # per component: the lightest weight, then the smallest edge id among rows attaining it
        cmin = torch.full((n,), float("inf"), dtype=W.dtype, device=device)
        cmin = cmin.scatter_reduce(0, comp, vals, reduce="amin", include_self=True)
        lo = torch.minimum(arange, jmin)
        hi = torch.maximum(arange, jmin)
        eid = lo * n + hi
        attains = (vals == cmin[comp]) & torch.isfinite(vals)
        cand = torch.where(attains, eid, torch.full_like(eid, big))
        ceid = torch.full((n,), big, dtype=torch.long, device=device)
        ceid = ceid.scatter_reduce(0, comp, cand, reduce="amin", include_self=True)
        # active components: roots with an outgoing edge
        is_root = comp == arange
        active = is_root & (ceid != big)
        safe_eid = torch.where(active, ceid, torch.zeros_like(ceid))
        a = safe_eid // n
        b = safe_eid % n
        ca = comp[a]
        other = torch.where(ca == arange, comp[b], ca)  # the component at the far end
        target = torch.where(active, other, arange)
        # mutual picks (c -> c', c' -> c) are the same edge: keep it once, from the smaller root
        mutual = active & (target[target] == arange) & (target != arange)
        record = active & ~(mutual & (arange > target))
        pos = count + torch.cumsum(record.long(), 0) - 1
        pos = torch.where(record, pos, torch.full_like(pos, n - 1))
        out.index_put_((pos,), torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1))
        count = count + record.long().sum()
        # merge: the smaller root of a mutual pair becomes the root; then pointer jumping
        parent = torch.where(mutual & (arange < target), arange, target)
        for _ in range(rounds + 1):
            parent = parent[parent]
        comp = parent[comp]
    return out[: n - 1]
