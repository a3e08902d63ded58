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
    """Per row (l, i): the lightest edge (i, j) of tree l with comp[l, j] != comp[l, i] (first j on ties).

    ``W`` is (L, m, m), ``comp`` (L, m) holds global component labels.
    """
    L, m = comp.shape
    inf = torch.tensor(float("inf"), dtype=W.dtype, device=W.device)
    vals = torch.empty((L, m), dtype=W.dtype, device=W.device)
    idx = torch.empty((L, m), dtype=torch.long, device=W.device)
    for start in range(0, m, chunk_rows):
        stop = min(start + chunk_rows, m)
        same = comp[:, start:stop, None] == comp[:, None, :]
        masked = torch.where(same, inf, W[:, start:stop])
        v, j = masked.min(dim=2)
        vals[:, start:stop] = v
        idx[:, start:stop] = j
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
    if n <= 1:
        return torch.empty((0, 2), dtype=torch.long, device=W.device)
    return boruvka_edges_batched(W[None], chunk_rows=chunk_rows)[0]


def boruvka_edges_batched(W: torch.Tensor, sizes=None, chunk_rows: int | None = None) -> torch.Tensor:
    """Minimum spanning trees of L graphs at once, one fixed sequence of batched torch ops.

    Parameters
    ----------
    W : Tensor, shape (L, m, m)
        Weights of L complete graphs on any device; graph ``l`` has ``sizes[l]``
        vertices, the leading block ``W[l, :sizes[l], :sizes[l]]`` (the rest is
        ignored and may hold anything). The diagonal is ignored. Not modified;
        one (L, m, m) temporary holds the symmetric parts, padded with ``inf``.
    sizes : sequence of int, optional
        Vertices per graph, each in 1 ... m; default all ``m``.
    chunk_rows : int, optional
        Rows masked at once per graph; default keeps the temporary near 256 MiB.

    Returns
    -------
    LongTensor, shape (L, m - 1, 2), on ``W.device``
        ``out[l, :sizes[l] - 1]`` are the edges ``(i, j)`` of tree ``l``, in no
        particular order; the rows after them are unspecified.
    """
    L, m = W.shape[0], W.shape[1]
    device = W.device
    if m <= 1 or L == 0:
        return torch.empty((L, max(m - 1, 0), 2), dtype=torch.long, device=device)
    # Each component reads an edge's weight from its own rows. If W[i, j] and W[j, i]
    # differ by even one ulp (a float matrix product is not bitwise symmetric), two
    # components can disagree about the order of edges, pick edges that close a cycle,
    # and the result is not a tree. So work on the symmetric part, which is bitwise
    # symmetric (addition commutes) and is what mst_deaths differentiates.
    half = W.detach() * 0.5
    W = half + half.transpose(1, 2)
    del half
    if sizes is not None and any(int(s) != m for s in sizes):
        # vertices beyond a graph's size: every edge to them weighs inf, so they are
        # never picked (their own components stay inactive: no finite outgoing edge)
        live = torch.arange(m, device=device)[None, :] < torch.as_tensor(list(sizes), device=device)[:, None]
        W = W.masked_fill_(~(live[:, :, None] & live[:, None, :]), float("inf"))
    if chunk_rows is None:
        chunk_rows = max(1, min(m, (1 << 26) // max(L * m, 1)))
    N = L * m
    arange = torch.arange(N, device=device)  # global vertex id v = l * m + i
    local = arange % m
    base = arange - local  # l * m
    comp = arange.clone()  # component label of each vertex = its root vertex (global id)
    out = torch.zeros((N, 2), dtype=torch.long, device=device)  # per graph m slots, the last a dump slot
    count = torch.zeros(L, dtype=torch.long, device=device)
    big = torch.iinfo(torch.long).max
    rounds = max(1, math.ceil(math.log2(m)))
    for _ in range(rounds):
        vals, jmin = _row_minima(W, comp.view(L, m), chunk_rows)
        vals, jmin = vals.reshape(N), jmin.reshape(N)
        # per component: the lightest weight, then the smallest edge id among rows attaining it;
        # edge id (l, lo, hi) -> l m^2 + lo m + hi orders edges of one graph by (lo, hi)
        cmin = torch.full((N,), float("inf"), dtype=W.dtype, device=device)
        cmin = cmin.scatter_reduce(0, comp, vals, reduce="amin", include_self=True)
        lo = torch.minimum(local, jmin)
        hi = torch.maximum(local, jmin)
        eid = base * m + lo * m + hi
        attains = (vals == cmin[comp]) & torch.isfinite(vals)
        cand = torch.where(attains, eid, torch.full_like(eid, big))
        ceid = torch.full((N,), big, dtype=torch.long, device=device)
        ceid = ceid.scatter_reduce(0, comp, cand, reduce="amin", include_self=True)
        # active components: roots with an outgoing edge
        is_root = comp == arange
        active = is_root & (ceid != big)
        safe_eid = torch.where(active, ceid, torch.zeros_like(ceid))
        g0 = (safe_eid // (m * m)) * m  # the graph's first global vertex
        a = g0 + (safe_eid // m) % m
        b = g0 + safe_eid % m
        ca = comp[a]
        other = torch.where(ca == arange, comp[b], ca)  # the component at the far end
        target = torch.where(active, other, arange)
        # mutual picks (c -> c', c' -> c) are the same edge: keep it once, from the smaller root
        mutual = active & (target[target] == arange) & (target != arange)
        record = active & ~(mutual & (arange > target))
        rec = record.long().view(L, m)
        pos = (count[:, None] + torch.cumsum(rec, 1) - 1).reshape(N)
        pos = base + torch.where(record, pos, torch.full_like(pos, m - 1))
        out.index_put_((pos,), torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1) - g0[:, None])
        count = count + rec.sum(1)
        # merge: the smaller root of a mutual pair becomes the root; then pointer jumping
        parent = torch.where(mutual & (arange < target), arange, target)
        for _ in range(rounds + 1):
            parent = parent[parent]
        comp = parent[comp]
    return out.view(L, m, 2)[:, : m - 1]
