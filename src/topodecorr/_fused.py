"""One op from activations to the correlations of the MST edges, with a closed-form backward.

``topodecorr::tree_correlations`` takes the activations of several point clouds
and returns, per cloud, the correlations ``c_e = z_i . z_j`` of the edges of
the maximum-|corr| spanning tree (the minimum spanning tree of ``1 - |corr|``),
sorted by ``|c|`` descending (deaths ascending). The deaths are any decreasing
function of ``|c|`` (:func:`topodecorr.dissimilarity`), applied outside.

Forward, per cloud of ``R`` samples and ``n`` neurons (about six passes over the
activations, all counted in ``benchmarks/architectures.py``'s phase table):

1. ``Zt``, the neuron-major (n, R) buffer, is written once from the activations
   (a transposing copy; in channel layout (B, C, *spatial) straight from the
   map, so no (B * H * W, C) copy is made), then shifted in place by each
   neuron's first sample: ``x - x_0`` is exact in floating point for a large
   offset, so the centring below loses nothing (1e6 + N(0, 1) in float32 stays
   within 1e-4 of float64);
2. the moments: ``sum`` and ``sum of squares`` of each row accumulated in
   float64 (subnormal or huge activations neither underflow nor overflow;
   correlation is scale-free, so a column holding one 1e-40 gives the deaths
   it gives at scale 1), read once each. Constant neurons (dead), finiteness
   and ``inv = 1 / ||x - mean||`` come from them;
3. ``Zt = (Zt - mean) * inv`` in place (in float64 arithmetic where ``inv``
   would leave float32's range);
4. the product ``P = Zt Zt^T`` (:func:`topodecorr.correlation.gram_rows`), the
   tree (:func:`topodecorr._kernels.mst_edges_many`, one call for all clouds)
   and the correlations of its edges read off ``P`` (no second gather).

Backward: for ``g = dL/dc`` the gradient of the activations is
``dX^T = diag(inv) (S - diag(s)) Zt``, where ``S`` is the symmetric sparse
(n, n) matrix holding ``g_e`` at both ends of every edge and
``s_k = sum_{e at k} g_e c_e`` (that is ``z_k . (S Zt)_k``; the usual
``- mean(G)`` term vanishes because every row of ``Zt`` has mean 0). One sparse
product: O(n R), nothing O(n^2). With ``create_graph`` the backward runs the
same formula in differentiable ops (double backward is exact).

Non-finite activations: on the CPU the op raises
:class:`topodecorr.correlation.NonFiniteActivationsError` (found from the
moments, no extra pass). On an accelerator it does not synchronise with the
host: the correlations come out NaN, so the penalty is NaN (which
:class:`topodecorr.Decorrelation` reports as a clear error).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Optional

import torch

from ._kernels import back_to_back, flat_view, mst_edges, mst_edges_many
from .correlation import (_SAFE_NORM, NonFiniteActivationsError, constant_rows, gram_rows, norm_in_float32_range,
                          pow2)

LAYOUTS = ("rows", "channel")

def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 activations, float32 for every other floating dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layout_shape(x: torch.Tensor, layout: str) -> tuple[int, int]:
    """(samples R, neurons n) of ``x`` read in ``layout``."""
    if layout == "channel" and x.dim() > 2:
        return x.numel() // x.shape[1], x.shape[1]
    return x.shape[0], x.shape[1]


def _shifted(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A new neuron-major (n, R) buffer holding ``x - x0`` (x0: every neuron's first sample) and x0 (n, 1).

    The shift is exact in floating point for a large common offset, so the moments
    below lose nothing to it. A channel map is read straight from its (B, C, *spatial)
    layout with the shift in the same pass; a (R, n) matrix is transposed by torch's
    blocked copy, then shifted in place (a fused strided subtraction was slower).
    """
    R, n = layout_shape(x, layout)
    zt = torch.empty((n, R), dtype=stat_dtype(x), device=x.device)
    return zt, _shift_into(zt, x, layout)


def _shift_into(zt: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """Write ``x - x0`` into the (n, R) buffer ``zt`` (contiguous rows); return x0 (n, 1)."""
    n, R = zt.shape
    if layout == "channel" and x.dim() > 2:
        B = x.shape[0]
        xv = x.reshape(B, n, R // B)
        x0 = xv[0, :, :1].to(zt.dtype)
        torch.sub(xv.transpose(0, 1), x0[:, None, :], out=zt.view(n, B, R // B))
        return x0
    zt.copy_(x.T)
    x0 = zt[:, :1].clone()
    zt.sub_(x0)
    return x0


#: clouds of at most this many activations (rows x neurons) that share their row count are
#: normalised as one (n_1 + n_2 + ..., R) buffer: per-neuron work, so exactly the same, but
#: one set of small ops instead of one per cloud (a ResNet's 17 ReLU calls come in 5 row
#: counts); each cloud's part is then copied out (the op's outputs may not alias), a pass
#: that costs less than the small ops it replaces only while the clouds are small
GROUP_MAX = 1 << 19


def normalise(x: torch.Tensor, layout: str = "rows"):
    """``(zt, inv, dead, finite)``: neuron-major normalised activations and their factors (no autograd).

    ``zt`` (n, R) in the statistics dtype; ``inv`` (n,) ``1 / ||x - mean||`` (0 for dead
    neurons); ``dead`` (n,) bool; ``finite`` a 0-dim bool (all activations finite).
    Passes over the activations: the shifted copy, two reads for the moments, one
    in-place ``z = x * inv - mean * inv``.
    """
    zt, inv, dead, finite = _normalise_shifted(*_shifted(x.detach(), layout))
    return zt, inv, dead, finite.all()


def normalise_many(xs: list[torch.Tensor], layouts: list[str]) -> list[tuple]:
    """:func:`normalise` of every cloud; small clouds with one row count share one normalisation."""
    out: list = [None] * len(xs)
    groups: dict = {}
    for k, (x, lay) in enumerate(zip(xs, layouts)):
        R, n = layout_shape(x, lay)
        if n * R <= GROUP_MAX:
            groups.setdefault((R, stat_dtype(x), x.device), []).append(k)
        else:
            out[k] = normalise(x, lay)
    for (R, dt, device), ks in groups.items():
        if len(ks) == 1:
            out[ks[0]] = normalise(xs[ks[0]], layouts[ks[0]])
            continue
        sizes = [layout_shape(xs[k], layouts[k])[1] for k in ks]
        zt = torch.empty((sum(sizes), R), dtype=dt, device=device)
        x0 = torch.empty((sum(sizes), 1), dtype=dt, device=device)
        a = 0
        for k, n in zip(ks, sizes):
            x0[a : a + n] = _shift_into(zt[a : a + n], xs[k].detach(), layouts[k])
            a += n
        zt, inv, dead, finite = _normalise_shifted(zt, x0)
        a = 0
        for k, n in zip(ks, sizes):  # the op's outputs may not alias each other: one copy per cloud
            part = slice(a, a + n)
            out[k] = (zt[part].clone(), inv[part].clone(), dead[part].clone(), finite[part].all())
            a += n
    return out


def _normalise_shifted(zt: torch.Tensor, x0: torch.Tensor):
    """Normalise the shifted rows ``zt`` in place; ``(zt, inv, dead, finite)`` with ``finite`` per row."""
    R = zt.shape[1]
    cpu = zt.device.type == "cpu"
    # accelerators accumulate in float64 (cast on load; no fix-up that would synchronise),
    # the CPU in the data's dtype (a float64 accumulation copies there) and fixes rare rows after
    acc = zt.dtype if cpu else torch.float64
    s1 = zt.sum(dim=1, keepdim=True, dtype=acc)
    ss = torch.linalg.vector_norm(zt, dim=1, keepdim=True, dtype=acc).square()
    finite = torch.isfinite(s1).reshape(-1)  # NaN and inf propagate into the sums
    if cpu and not bool(finite.all()) and bool(torch.isfinite(zt).all()):  # finite, but the sum overflowed
        s1 = zt.sum(dim=1, keepdim=True, dtype=torch.float64)
        finite = torch.ones(zt.shape[0], dtype=torch.bool)
    if cpu and not bool(finite.all()):
        raise NonFiniteActivationsError(
            "activations contain NaN or inf; the network diverged or its inputs are not finite "
            "(check the learning rate and the data) before computing correlations"
        )
    s1, ss = s1.double(), ss.double()
    mean = s1 / R
    centred = ss - s1 * mean  # after the shift the mean is of the order of the spread: little cancels
    norm = centred.clamp_min(0.0).sqrt()
    done = None
    if cpu and not bool(_served(norm, s1, ss, centred).all()):
        done = _rescue(zt, norm, ~_served(norm, s1, ss, centred))
    dead = constant_rows(norm, (x0.to(norm.dtype) + mean).abs(), R, zt.dtype)
    inv = norm.masked_fill(dead, float("inf")).reciprocal()  # 0 for dead neurons
    a, b = inv, -mean * inv
    if done is not None:
        a, b = a.masked_fill(done, 1.0), b.masked_fill(done, 0.0)
    if cpu and zt.dtype != torch.float64 and (done is None or norm_in_float32_range(a, dead)):
        a, b = a.to(zt.dtype), b.to(zt.dtype)  # float32 arithmetic: the factors fit (checked above)
    torch.addcmul(b, zt, a, out=zt)  # (x - x0 - mean) / norm in one pass
    return zt, _representable(inv.reshape(-1).to(zt.dtype), cpu, done is not None), dead.reshape(-1), finite


def _representable(inv: torch.Tensor, cpu: bool, rescued: bool) -> torch.Tensor:
    """``1 / norm`` with the entries that overflow the dtype set to 0 (warned on the CPU).

    A neuron whose activations all lie at a subnormal scale (a column of 1e-40 in
    float32) is normalised as it would be at scale 1, so its correlations are exact,
    but the gradient with respect to its activations is 1 / scale times that at
    scale 1 and overflows: inf, then NaN, in the network's gradient. Such a neuron
    gets no gradient instead (the backward scales by ``inv``); every other neuron's
    gradient is unchanged. On the CPU only rescued rows (norms outside
    ``_SAFE_NORM``) can overflow, so the common step reads nothing back;
    accelerators mask without a host read.
    """
    if not cpu:
        return inv.masked_fill(torch.isinf(inv), 0.0)
    if not rescued:
        return inv
    over = torch.isinf(inv)
    count = int(over.sum())
    if count == 0:
        return inv
    warnings.warn(
        f"{count} neuron(s) have activations at a scale below the normal range of {inv.dtype} "
        "(e.g. every value near 1e-40 in float32): their correlations are computed as at scale 1, "
        "but their gradient (1 / scale times larger) is not representable, so they get none; the "
        "other neurons' gradients are exact. A layer whose outputs collapse towards zero usually "
        "means a too-high learning rate or weight decay, or a bad initialisation",
        RuntimeWarning,
        stacklevel=2,
    )
    return inv.masked_fill(over, 0.0)


def _served(norm, s1, ss, centred):
    """Rows the one-pass moments serve: norm well inside the dtype's range and a mean that does
    not dominate the spread (or exactly zero rows: dead, nothing to do)."""
    lo, hi = _SAFE_NORM
    return ((norm >= lo) & (norm <= hi) & (centred >= ss * 2.0**-10)) | ((ss == 0) & (s1 == 0))


def _rescue(zt, norm, bad):
    """The rows ``bad`` the one-pass moments cannot serve, normalised here in float64, two-pass, rescaled.

    Those whose norm under- or overflows the data's dtype (correlation is scale-free:
    a row holding one 1e-40 in float32 is normalised as it would be at scale 1) and
    those whose mean dominates their spread (``ss - s1 * mean`` would cancel). Sets
    their ``norm`` in place; returns ``bad`` (the rows done).
    """
    idx = bad.reshape(-1).nonzero().reshape(-1)
    rows = zt.index_select(0, idx).double()
    rows = rows - rows.mean(dim=1, keepdim=True)
    _, e = torch.frexp(rows.abs().amax(dim=1, keepdim=True))
    half = -(e // 2)  # two exact power-of-two steps: 2^-e alone can leave float64's range
    rows = rows * pow2(half) * pow2(-e - half)
    rnorm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    live = rnorm > 0
    zt.index_copy_(0, idx, torch.where(live, rows / torch.where(live, rnorm, 1.0), 0.0).to(zt.dtype))
    true = rnorm * pow2(-half) * pow2(e + half)
    norm.index_copy_(0, idx, true)
    return bad


def _edge_corr(P: torch.Tensor, edges: torch.Tensor):
    """Correlations of the tree edges read off ``P`` (symmetrised, clipped), sorted by |c| descending."""
    n = P.shape[0]
    lo = torch.minimum(edges[:, 0], edges[:, 1])
    hi = torch.maximum(edges[:, 0], edges[:, 1])
    flat = P.reshape(-1)
    c = 0.5 * (flat[lo * n + hi] + flat[hi * n + lo])
    return _sort_by_abs(c.clamp(-1.0, 1.0), lo, hi)


def _edge_corr_many(prods: list[torch.Tensor], found: list[torch.Tensor]) -> list[tuple]:
    """:func:`_edge_corr` of every tree; one gather and one sort for all when the products lie
    back to back in one buffer (the CPU's many-clouds layout), in the same order per cloud."""
    if len(prods) < 2 or not back_to_back(prods):
        return [_edge_corr(P, e) for P, e in zip(prods, found)]
    sizes = torch.tensor([P.shape[0] for P in prods])
    edges = torch.cat(found)
    per = sizes - 1  # edges per tree
    n = sizes.repeat_interleave(per)
    start = (torch.cumsum(sizes * sizes, 0) - sizes * sizes).repeat_interleave(per)
    lo = torch.minimum(edges[:, 0], edges[:, 1])
    hi = torch.maximum(edges[:, 0], edges[:, 1])
    flat = flat_view(prods)
    c = (0.5 * (flat[start + lo * n + hi] + flat[start + hi * n + lo])).clamp(-1.0, 1.0)
    # one stable sort by (tree, death): the death 1 - |c| in c's dtype (as _sort_by_abs rounds it)
    # plus twice the tree's index, exact in float64, orders each tree as its own sort would
    tree = torch.arange(len(prods)).repeat_interleave(per)
    order = torch.sort((1.0 - c.abs()).double() + 2.0 * tree, stable=True).indices
    c, pairs = c[order], torch.stack([lo, hi], dim=1)[order]
    counts = per.tolist()  # the op's outputs may not alias each other: a (small) copy per tree
    return [(ck.clone(), pk.clone()) for ck, pk in zip(c.split(counts), pairs.split(counts))]


def _sort_by_abs(c, lo, hi):
    # deaths 1 - |c| ascending, stable: the order the gather of the deaths gave
    order = torch.sort(1.0 - c.abs(), stable=True).indices
    return c[order], torch.stack([lo, hi], dim=1)[order]


def _pair_corr(zt: torch.Tensor, edges: torch.Tensor):
    """Correlations of given edges (a tree reused from an earlier step), by row dot products."""
    lo = torch.minimum(edges[:, 0], edges[:, 1])
    hi = torch.maximum(edges[:, 0], edges[:, 1])
    c = torch.linalg.vecdot(zt.index_select(0, lo), zt.index_select(0, hi), dim=1)
    return _sort_by_abs(c.clamp(-1.0, 1.0), lo, hi)


def _forward(xs, layouts, edges, backend, block):
    """The op's body: see the module docstring."""
    normed = normalise_many(xs, layouts)
    device = xs[0].device
    find = [k for k, (zt, *_ ) in enumerate(normed) if zt.shape[0] > 1 and edges[k] is None]
    prods = gram_rows([normed[k][0] for k in find], block)
    if device.type != "cpu":  # non-finite input must not derail the kernel; its result is poisoned below
        prods = [P.nan_to_num_(0.0, 0.0, 0.0) for P in prods]
    if len(prods) == 1:  # one tree: the single-matrix kernel
        found = [mst_edges(prods[0], abs_corr=True, backend=backend)]
    else:
        found = mst_edges_many(prods, abs_corr=True, backend=backend)
    trees = dict(zip(find, _edge_corr_many(prods, found)))
    corrs, out_edges = [], []
    for k, (zt, inv, dead, finite) in enumerate(normed):
        n = zt.shape[0]
        if n <= 1:
            c, e = zt.new_zeros((0,)), torch.zeros((0, 2), dtype=torch.long, device=device)
        elif k in trees:
            c, e = trees[k]
        else:
            c, e = _pair_corr(zt, edges[k].to(device))
        if device.type != "cpu":
            c = c + torch.where(finite, 0.0, float("nan")).to(c.dtype)
        corrs.append(c)
        out_edges.append(e)
    return corrs, out_edges, [t[0] for t in normed], [t[1] for t in normed], [t[2] for t in normed]


@torch.library.custom_op("topodecorr::tree_correlations", mutates_args=())
def tree_correlations(
    xs: list[torch.Tensor],
    channel: list[bool],
    edges: list[Optional[torch.Tensor]],
    backend: str,
    block: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per cloud: (edge correlations, edges, normalised Zt, 1 / norm, dead flags); see the module docstring.

    ``channel[l]``: cloud ``l`` is a (B, C, *spatial) map read in channel layout.
    ``block``: width for the blocked torch product, 0 for the default (``gram_rows``).
    """
    return _forward(xs, _layouts(channel), edges, backend, block or None)


def _layouts(channel: list[bool]) -> list[str]:
    return ["channel" if c else "rows" for c in channel]


@tree_correlations.register_fake
def _(xs, channel, edges, backend, block):
    corrs, trees, zts, invs, deads = [], [], [], [], []
    for x, lay in zip(xs, _layouts(channel)):
        R, n = layout_shape(x, lay)
        dt = stat_dtype(x)
        corrs.append(x.new_empty((max(n - 1, 0),), dtype=dt))
        trees.append(x.new_empty((max(n - 1, 0), 2), dtype=torch.long))
        zts.append(x.new_empty((n, R), dtype=dt))
        invs.append(x.new_empty((n,), dtype=dt))
        deads.append(x.new_empty((n,), dtype=torch.bool))
    return corrs, trees, zts, invs, deads


def _setup(ctx, inputs, output):
    xs, layouts = inputs[0], _layouts(inputs[1])
    corrs, trees, zts, invs, _ = output
    ctx.meta = [(x.shape, x.dtype, lay) for x, lay in zip(xs, layouts)]
    ctx.save_for_backward(*corrs, *trees, *zts, *invs)
    ctx.clouds = len(xs)
    ctx.all_edges = all(isinstance(e, torch.Tensor) for e in inputs[2])
    ctx.set_materialize_grads(False)  # unused outputs (Zt, 1 / norm) then give None, not zero tensors


def _backward(ctx, g_corrs, g_trees, g_zts, g_invs, g_deads):
    L = ctx.clouds
    saved = ctx.saved_tensors
    corrs, trees, zts, invs = (saved[k * L : (k + 1) * L] for k in range(4))
    grads: list = [None] * L
    groups: dict = {}  # small clouds with one row count: one sparse product for all of them
    for k in range(L):
        gc, gz, gi = g_corrs[k], g_zts[k], g_invs[k]
        n, R = zts[k].shape
        if torch.is_grad_enabled() or gz is not None or gi is not None:
            dxt = _vjp_general(corrs[k], trees[k], zts[k], invs[k], gc, gz, gi)
        elif gc is not None and n > 1 and n * R <= GROUP_MAX:
            groups.setdefault((R, zts[k].dtype, zts[k].device), []).append(k)
            continue
        else:
            dxt = _vjp_sparse(corrs[k], trees[k], zts[k], invs[k], gc)
        grads[k] = _input_grad(dxt, ctx.meta[k], zts[k].device)
    for ks in groups.values():
        if len(ks) == 1:
            k = ks[0]
            dxt = _vjp_sparse(corrs[k], trees[k], zts[k], invs[k], g_corrs[k])
            grads[k] = _input_grad(dxt, ctx.meta[k], zts[k].device)
            continue
        sizes = [zts[k].shape[0] for k in ks]
        starts = [0, *itertools.accumulate(sizes[:-1])]
        zt = torch.cat([zts[k] for k in ks])
        dxt = tree_correlations_vjp(
            torch.cat([corrs[k] for k in ks]),
            torch.cat([trees[k] + a for k, a in zip(ks, starts)]),
            zt,
            torch.cat([invs[k] for k in ks]),
            torch.cat([g_corrs[k] for k in ks]).to(zt.dtype),
        )
        for k, a, n in zip(ks, starts, sizes):
            grads[k] = _input_grad(dxt[a : a + n], ctx.meta[k], zt.device)
    # the inputs' structure: torch.library flattens a list input only when it holds tensors alone
    return grads, None, [None] * L if ctx.all_edges else None, None, None


def _input_grad(dxt, meta, device) -> torch.Tensor:
    """The gradient of one cloud's activations from its (n, R) gradient (None: zeros, as autograd gives)."""
    shape, dtype, layout = meta
    if dxt is None:  # a cloud of one neuron, or no gradient reached it
        return torch.zeros(shape, dtype=dtype, device=device)
    return _to_layout(dxt, shape, layout).to(dtype)


def _vjp_sparse(c, edges, zt, inv, gc):
    """The closed-form gradient (n, R) of the edge correlations, or None (nothing to give)."""
    if gc is None or zt.shape[0] <= 1:
        return None
    return tree_correlations_vjp(c, edges, zt, inv, gc.to(zt.dtype))


@torch.library.custom_op("topodecorr::tree_correlations_vjp", mutates_args=())
def tree_correlations_vjp(
    c: torch.Tensor, edges: torch.Tensor, zt: torch.Tensor, inv: torch.Tensor, gc: torch.Tensor
) -> torch.Tensor:
    """``diag(inv) (S - diag(s)) Zt`` as one sparse (CSR) product; see the module docstring.

    An op of its own so that tracing the backward (``torch.compile``) sees one opaque call.
    """
    n = zt.shape[0]
    lo, hi = edges[:, 0], edges[:, 1]
    s = torch.zeros(n, dtype=zt.dtype, device=zt.device)
    gcc = gc * c
    s.index_add_(0, lo, gcc).index_add_(0, hi, gcc)
    ar = torch.arange(n, device=zt.device)
    rows = torch.cat([lo, hi, ar])
    cols = torch.cat([hi, lo, ar])
    vals = torch.cat([inv[lo] * gc, inv[hi] * gc, -inv * s])
    order = torch.argsort(rows * n + cols)
    # row pointers by a search of the sorted rows (bincount would synchronise on accelerators)
    crow = torch.searchsorted(rows[order], torch.arange(n + 1, device=zt.device))
    M = _csr(crow, cols[order], vals[order], n)
    return torch.sparse.mm(M, zt)


_csr_said = False


def _csr(crow, cols, vals, n):
    """A CSR (n, n) matrix; the first one under a filter for torch's one-time "CSR is beta" warning."""
    global _csr_said
    if _csr_said:
        return torch.sparse_csr_tensor(crow, cols, vals, (n, n), check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        M = torch.sparse_csr_tensor(crow, cols, vals, (n, n), check_invariants=False)
    _csr_said = True
    return M


@tree_correlations_vjp.register_fake
def _(c, edges, zt, inv, gc):
    return torch.empty_like(zt)


def _vjp_general(c, edges, zt, inv, gc, gz, gi):
    """The same gradient in differentiable dense ops, also through the outputs Zt and 1 / norm."""
    n = zt.shape[0]
    G = torch.zeros_like(zt) if gz is None else gz.to(zt.dtype)
    if gc is not None and n > 1:
        gc = gc.to(zt.dtype)[:, None]
        lo, hi = edges[:, 0], edges[:, 1]
        G = G.index_add(0, lo, gc * zt.index_select(0, hi)).index_add(0, hi, gc * zt.index_select(0, lo))
    s = (zt * G).sum(dim=1, keepdim=True)
    dxt = (G - zt * s - G.mean(dim=1, keepdim=True)) * inv[:, None]
    if gi is not None:
        dxt = dxt - (gi.to(zt.dtype) * inv * inv)[:, None] * zt
    return dxt


def _to_layout(dxt: torch.Tensor, shape: torch.Size, layout: str) -> torch.Tensor:
    """The (n, R) gradient in the activations' own layout, contiguous.

    A transposed view would be free here, but every op downstream pays for its
    strides: autograd adds it to the network's own (contiguous) gradient and
    the activation's backward (ReLU, GELU) reads it, both on TensorIterator's
    strided path, several times slower than one transposing copy
    (BENCHMARKS.md, "Architectures").
    """
    if layout == "channel" and len(shape) > 2:
        B, n = shape[0], shape[1]
        return dxt.view(n, B, -1).transpose(0, 1).contiguous().view(shape)
    return dxt.T.contiguous()


tree_correlations.register_autograd(_backward, setup_context=_setup)
