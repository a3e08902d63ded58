"""Vectorised Boruvka in plain torch: the device-resident kernel (CUDA, also runs on CPU).

Each round, every component picks its lightest outgoing edge; the picked
edges are added and the components merged by pointer jumping. The loop has a
fixed trip count that depends on the shape only and never reads a value back
to the host: no synchronisation, and a fixed sequence of a few hundred torch
operations per tree, whatever the data (the accelerators' cost is the number
of kernel launches, not the flops). ``torch.compile`` traces it as one graph.

* **Rounds.** Components at least halve every round while the graph is not
  yet connected, so at most ``m >> r`` remain at the start of round ``r`` and
  ``floor(log2 m)`` rounds suffice.
* **One masked row minimum per round.** The kernel owns a symmetric copy of
  the weights; each round it sets the entries inside a component to ``inf``
  in place (one comparison of component labels by broadcasting, one
  ``masked_fill_``; chunked in a fixed number of row blocks only when the
  boolean mask would exceed 256 MiB) and takes one ``min`` over the rows.
  Under ``torch.compile`` the masking stays functional instead, so that it
  fuses into the reduction (one read of the matrix per round).
* **Deterministic ties.** Edges are totally ordered by ``(weight, min(i, j),
  max(i, j))``, which keeps Boruvka correct (no cycles) and makes the tree,
  hence the gradient, independent of the schedule: it is Kruskal's tree under
  that order. Within a row that order is ascending ``j`` among equal weights,
  which is what ``min`` returns (the first minimum); across the rows of a
  component it is a two-stage minimum (lightest weight by ``scatter_reduce``,
  then the smallest edge id among the rows attaining it). Both are exact, so
  the order of evaluation never matters.
* **Hooking and pointer jumping.** Each component hooks onto the component at
  the far end of its edge. A mutual pair picked the same edge, so each tree
  of this hook graph ends in one 2-cycle (a self-loop for a component without
  an edge). A round-``r`` tree has at most ``m >> r`` nodes, so a fixed
  ``ceil(log2((m >> r) - 1))`` doubling steps ``P = P[P]`` on one tensor bring
  every node onto its cycle, and the smaller node of the cycle becomes the
  new label. Each row's edge id and far-end label are packed in one int64
  key, ``(lo N + hi) N + label`` (N = L m vertices per call, below 2**21), so
  the second-stage minimum gives the edge and the hook target together.
* **Edges.** Every root that is not the new label records its edge in the slot
  of its root vertex, which happens once in a vertex's life; the slot of the
  final root is dropped at the end with one gather (no compaction, no counters).
* **Padding.** Edges to a padding vertex weigh ``inf``; a padding vertex (no
  finite edge) hooks onto vertex 0's component in round 0 through an ``inf``
  edge recorded in its own slot, after the real edges, and changes nothing else.

Memory: one (L, m, m) copy of the weights (the symmetric part ``W / 2 + W.T /
2``, bitwise symmetric, so that float rounding asymmetry cannot make two
components disagree about an edge), plus the boolean mask, (L, m, m) bytes
(one chunk up to 256 MiB).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_MASK_BYTES = 1 << 28  # the boolean mask of one chunk
_MAX_VERTICES = 1 << 21  # per call: keys (lo N + hi) N + c of N vertices must fit in int64


def boruvka_rounds(m: int) -> int:
    """Rounds the kernel runs on graphs of ``m`` vertices: ``floor(log2 m)`` (0 for m <= 1)."""
    return max(m.bit_length() - 1, 0)


def _jumps(m: int, r: int) -> int:
    """Doubling steps that flatten round ``r``'s hook forest: its trees have at most ``m >> r`` nodes."""
    depth = max((m >> r) - 1, 1)
    return (depth - 1).bit_length()  # ceil(log2(depth))


def _chunks(L: int, m: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    if chunk_rows is None:
        chunk_rows = max(1, _MASK_BYTES // max(L * m, 1))
    chunk_rows = max(1, min(int(chunk_rows), m))
    return [(s, min(s + chunk_rows, m)) for s in range(0, m, chunk_rows)]


def _symmetric(W: torch.Tensor, sizes) -> torch.Tensor:
    """The owned (L, m, m) work matrix: symmetric part, ``inf`` on every edge to a padding vertex."""
    half = W.detach() * 0.5
    S = half + half.transpose(1, 2)
    del half
    m = W.shape[1]
    for l, size in enumerate(sizes if sizes is not None else []):
        if int(size) < m:  # by slices: the sizes never travel to the device (a copy there would synchronise)
            S[l, int(size) :].fill_(float("inf"))
            S[l, :, int(size) :].fill_(float("inf"))
    return S


def _row_minima(S: torch.Tensor, comp: torch.Tensor, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the edges inside components and take each row's first minimum.

    Eagerly the mask is written into ``S`` (in place, for good: components only
    grow). Under ``torch.compile`` it is left functional, so that the label
    comparison and the masking fuse into the reduction: one read of ``S`` per
    round, nothing written.
    """
    if torch.compiler.is_compiling():
        return torch.where(comp[:, :, None] == comp[:, None, :], float("inf"), S).min(dim=2)
    if len(chunks) == 1:
        S.masked_fill_(comp[:, :, None] == comp[:, None, :], float("inf"))
    else:
        for start, stop in chunks:
            S[:, start:stop].masked_fill_(comp[:, start:stop, None] == comp[:, None, :], float("inf"))
    return S.min(dim=2)


class _Work(NamedTuple):
    """Constants and reused buffers of one batched call (flat over the N = L m vertices)."""

    ar: torch.Tensor  # global vertex ids l m + i, also the initial labels
    base: torch.Tensor | None  # l m per vertex (None for one graph)
    inf: torch.Tensor  # inf per vertex: the initial component minima
    top: torch.Tensor  # above every key, ``top % N`` the vertex itself: the initial component keys
    cmin: torch.Tensor  # buffers for the component minima and keys
    ckey: torch.Tensor
    jump: tuple[torch.Tensor, torch.Tensor]  # ping-pong buffers of pointer jumping
    N: int


def _work(L: int, m: int, dtype: torch.dtype, device) -> _Work:
    N = L * m
    ar = torch.arange(N, device=device)
    base = None if L == 1 else torch.div(ar, m, rounding_mode="floor") * m
    inf = torch.full((N,), float("inf"), dtype=dtype, device=device)
    top = ar + (N * N * N - N)
    long = dict(dtype=torch.long, device=device)
    bufs = (torch.empty((N,), dtype=dtype, device=device), torch.empty((N,), **long))
    return _Work(ar, base, inf, top, *bufs, (torch.empty((N,), **long), torch.empty((N,), **long)), N)


def _boruvka_round(S: torch.Tensor, comp: torch.Tensor, out: torch.Tensor, w: _Work, chunks, jumps: int):
    """One round on the flat labels ``comp``: returns the new labels; records edges into ``out``."""
    L, m, N = S.shape[0], S.shape[1], w.N
    v, j = _row_minima(S, comp.view(L, m), chunks)
    v, j = v.view(N), j.view(N)
    if w.base is not None:
        j = j + w.base  # global id of the far end
    # key of a row's edge: (lo N + hi) N + (label at the far end); ordered like (lo, hi)
    eid = torch.add(torch.maximum(w.ar, j), torch.minimum(w.ar, j), alpha=N)
    key = torch.add(comp.index_select(0, j), eid, alpha=N)
    # per component (indexed by its root): the lightest weight, then the smallest key attaining it
    cmin = w.cmin.copy_(w.inf).scatter_reduce_(0, comp, v, "amin")
    key.masked_fill_(v != cmin.index_select(0, comp), N * N * N)  # above top
    ckey = w.ckey.copy_(w.top).scatter_reduce_(0, comp, key, "amin")
    # each root hooks onto the far end's root (itself if it has no edge: its key is still top);
    # a mutual pair picked the same edge and forms the only 2-cycle of its tree
    target = torch.remainder(ckey, N)
    P = target
    for s in range(jumps):  # now P(c) lies on the 2-cycle (or self-loop) of c's tree
        P = torch.index_select(P, 0, P, out=w.jump[s % 2])
    label = torch.minimum(P, target.index_select(0, P))  # the smaller root of the cycle
    torch.where(label != w.ar, ckey, out, out=out)  # every other root records its edge, once
    return label.index_select(0, comp)


def boruvka_edges(W: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Minimum spanning tree edges of the complete graph with weights ``W``.

    Parameters
    ----------
    W : Tensor, shape (n, n)
        Weights on any device; the diagonal is ignored. Not modified. The tree
        is that of the symmetric part ``W / 2 + W.T / 2`` (one temporary copy).
    chunk_rows : int, optional
        Rows masked at once; default keeps the boolean mask at most 256 MiB.

    Returns
    -------
    LongTensor, shape (n - 1, 2), on ``W.device``
        Edges ``(i, j)``, in no particular order.

    Examples
    --------
    >>> W = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 2.0], [4.0, 2.0, 0.0]])
    >>> boruvka_edges(W).tolist()
    [[0, 1], [1, 2]]
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
        Rows masked at once per graph; default keeps the boolean mask at most 256 MiB.

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
    if L * m >= _MAX_VERTICES and L > 1:  # in slices of whole graphs
        step = max(1, (_MAX_VERTICES - 1) // m)
        starts = range(0, L, step)
        parts = [None if sizes is None else sizes[i : i + step] for i in starts]
        return torch.cat([boruvka_edges_batched(W[i : i + step], p, chunk_rows) for i, p in zip(starts, parts)])
    S = _symmetric(W, sizes)
    w = _work(L, m, S.dtype, device)
    out = w.ar * (w.N * w.N + w.N + 1)  # per vertex: the key of the edge it recorded; (v, v) until it does
    comp, chunks = w.ar, _chunks(L, m, chunk_rows)
    for r in range(boruvka_rounds(m)):
        comp = _boruvka_round(S, comp, out, w, chunks, _jumps(m, r))
    return _gather_edges(torch.div(out, w.N, rounding_mode="floor").view(L, m), comp.view(L, m)[:, :1], m)


def _gather_edges(out: torch.Tensor, root: torch.Tensor, m: int) -> torch.Tensor:
    """Drop each graph's final root slot (that of vertex 0's component) and decode the edge ids."""
    L = out.shape[0]
    N = L * m
    k = torch.arange(m - 1, device=out.device)[None, :]
    root_local = root - torch.arange(L, device=out.device)[:, None] * m
    e = out.gather(1, k + (k >= root_local).long())
    lo = torch.div(e, N, rounding_mode="floor")
    hi = e - lo * N
    first = torch.arange(L, device=out.device)[:, None] * m
    return torch.stack([lo - first, hi - first], dim=2)
