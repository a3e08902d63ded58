"""Pearson correlation between neurons and the dissimilarities built on it.

A neuron is one column of an activation matrix ``acts`` of shape ``(B, n)``
(B samples, n neurons). With ``z_k = (x_k - mean(x_k)) / ||x_k - mean(x_k)||``
the correlation matrix is the single product ``C = Z^T Z`` of shape ``(n, n)``.

Ballester, Casacuberta, Escalera, "Decorrelating neurons using persistence",
PMLR 228 (2024), use the dissimilarity ``d = 1 - |corr|``.

Conventions
-----------
* Statistics are computed in float32 even under :func:`torch.autocast`
  (float64 inputs stay float64, which is what ``gradcheck`` needs).
* A neuron that is constant over the batch (a dead ReLU) has no defined
  correlation. It is given correlation 0 with every other neuron and 1 with
  itself; its activations receive no gradient from the correlation (there is
  none to give), and nothing becomes NaN or inf.
* Values that float rounding pushes just outside ``[-1, 1]`` are clipped in
  value only: the gradient passes straight through, so a near-duplicate pair
  of neurons never has its gradient silently zeroed.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

__all__ = ["NonFiniteActivationsError", "normalize_activations", "correlation", "dissimilarity", "DISSIMILARITIES"]


class NonFiniteActivationsError(ValueError, FloatingPointError):
    """Activations contain NaN or inf.

    A ``ValueError`` (bad input to the statistics) and a ``FloatingPointError``
    (in a training loop it means divergence), so either kind of handler catches it.
    """

#: Names accepted by :func:`dissimilarity`.
DISSIMILARITIES = ("abs", "sqrt")

# A neuron counts as constant when its centred norm is at most this many machine
# epsilons times sqrt(B) times the magnitude of its mean (its standard deviation at most
# 2 eps |mean|): below that level the "variation" is the rounding of a computed constant
# (at most an ulp or so), not signal. An exact constant gives exactly 0 after the shift by
# the first sample. (8 was too many: 1e6 + N(0, 1) in float32 has a deviation of ~8.4 eps |mean|.)
_CONSTANT_RTOL_ULPS = 2.0

# float32 arithmetic for the normalisation only while the centred norms stay within these
# bounds (their reciprocals then stay far inside float32's range); float64 otherwise
_SAFE_NORM = (2.0**-60, 2.0**60)

# Gradient floor for sqrt(1 - c^2): the derivative -c / sqrt(1 - c^2) is
# evaluated with sqrt(1 - c^2) >= _SQRT_GRAD_FLOOR, so it is at most 1e3.
_SQRT_GRAD_FLOOR = 1e-3


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_acts(acts: torch.Tensor, name: str = "acts") -> None:
    if not isinstance(acts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, neurons), got {type(acts).__name__}")
    if acts.dim() != 2:
        raise ValueError(
            f"{name} must have shape (batch, neurons), got shape {tuple(acts.shape)}; "
            "flatten each sample first, e.g. acts.flatten(1)"
        )
    if acts.shape[0] < 2:
        raise ValueError(
            f"{name} has batch size {acts.shape[0]}: a correlation needs at least 2 samples per neuron"
        )
    if not acts.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {acts.dtype}")


def normalize_activations(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and normalise every neuron (column) to unit Euclidean norm.

    Parameters
    ----------
    acts : Tensor, shape (B, n)
        Activations, one column per neuron. Any floating dtype; computed in
        float32 (float64 stays float64), autocast disabled.

    Returns
    -------
    z : Tensor, shape (B, n)
        Normalised activations; the column of a constant neuron is all zeros.
    dead : Tensor of bool, shape (n,)
        True for neurons that are constant over the batch.

    Examples
    --------
    >>> import torch
    >>> z, dead = normalize_activations(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    >>> z
    tensor([[-0.7071,  0.0000],
            [ 0.7071,  0.0000]])
    >>> dead
    tensor([False,  True])
    """
    _check_acts(acts)
    dtype = _stat_dtype(acts)
    with torch.autocast(device_type=acts.device.type, enabled=False):
        x = acts.to(dtype)
        # shift by the first sample (exact for a large common offset), then centre and scale
        x0 = x[:1].detach()
        xs = x - x0
        mean, inv, dead, finite = moments(xs.detach(), x0, dim=0)
        if not bool(finite):
            raise NonFiniteActivationsError(
                "activations contain NaN or inf; the network diverged or its inputs are not finite "
                "(check the learning rate and the data) before computing correlations"
            )
        if not norm_in_float32_range(inv, dead):
            xs = _scaled_wide(xs)  # subnormal or huge activations: their squares would leave the range
        xc = xs - xs.mean(dim=0, keepdim=True)
        norm = torch.linalg.vector_norm(xc, dim=0)
        # per-column factors on the (n,) vector, then one (B, n) product
        inv = torch.where(dead, torch.zeros_like(norm), torch.where(dead, torch.ones_like(norm), norm).reciprocal())
        z = (xc * inv).to(dtype)
    return z, dead


def _scaled_wide(xs: torch.Tensor) -> torch.Tensor:
    """``xs`` in float64 times a power of two per column (a constant): column maxima near 1.

    Exact, and harmless to z (scale-free, in value and gradient).
    """
    wide = xs.double()
    with torch.no_grad():
        _, e = torch.frexp(wide.abs().amax(dim=0, keepdim=True))
        half = -(e // 2)  # two exact steps: 2^-e alone can leave float64's range
        f1, f2 = pow2(half), pow2(-e - half)
    return wide * f1 * f2


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2 ** e`` exactly, in float64, for an integer tensor ``e`` (package-internal)."""
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float64, device=e.device), e)


def moments(xs: torch.Tensor, x0: torch.Tensor, dim: int):
    """Centring and scaling factors of shifted activations ``xs = x - x0`` along ``dim``, without gradient.

    Package-internal. The sum and the sum of squares are accumulated in float64.
    Because ``x0`` is one of the samples, the mean of ``xs`` is of the order of
    the spread and ``ss - s1 * mean`` loses little to cancellation.

    Returns ``(mean, inv, dead, finite)``: float64 (n,) mean of ``xs`` and
    ``1 / ||x - mean(x)||`` (0 for dead neurons), the dead flags
    (:func:`constant_rows`) and a 0-dim bool (all activations finite).
    """
    with torch.no_grad():
        B = xs.shape[dim]
        s1 = xs.sum(dim=dim, dtype=torch.float64)
        ss = torch.linalg.vector_norm(xs, dim=dim, dtype=torch.float64).square()
        mean = s1 / B
        norm = (ss - s1 * mean).clamp_min(0.0).sqrt()
        finite = torch.isfinite(ss).all() & torch.isfinite(s1).all()
        level = (x0.detach().to(torch.float64).reshape(-1) + mean).abs()
        # a norm that underflowed although the column moves (float64 subnormals): not dead,
        # and an infinite 1 / norm sends the caller to its rescaled path
        moves = (norm < _SAFE_NORM[0]) & (s1 != 0)
        dead = constant_rows(norm, level, B, xs.dtype) & ~moves
        inv = torch.where(dead, 0.0, 1.0 / torch.where(dead, 1.0, norm))
    return mean, inv, dead, finite


def constant_rows(norm: torch.Tensor, level: torch.Tensor, samples: int, dtype: torch.dtype) -> torch.Tensor:
    """Dead (constant) neurons: centred norm 0 or at most ``2 eps sqrt(B)`` times ``|mean|`` (``level``).

    Below that level the "variation" is the rounding of a constant in ``dtype``, not signal.
    """
    tol = _CONSTANT_RTOL_ULPS * torch.finfo(dtype).eps * (samples**0.5)
    return (norm <= tol * level) | (norm == 0)


def norm_in_float32_range(inv: torch.Tensor, dead: torch.Tensor) -> bool:
    """Whether every live ``1 / norm`` lies within :data:`_SAFE_NORM` (float32 arithmetic suffices); syncs."""
    live = inv[~dead]
    if live.numel() == 0:
        return True
    lo, hi = torch.aminmax(live)
    return bool((lo >= 1.0 / _SAFE_NORM[1]) & (hi <= 1.0 / _SAFE_NORM[0]))


def clip_unit(c: torch.Tensor) -> torch.Tensor:
    """Clip values to [-1, 1] in value only: the gradient passes straight through.

    Package-internal (not in ``__all__``): the pipelines use it on correlations
    recomputed from normalised activations, which rounding can push past +-1.
    """
    return c + (c.detach().clamp(-1.0, 1.0) - c.detach())


def correlation_product(z: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The raw product ``Z^T Z`` (n, n) of normalised activations, without gradient.

    Package-internal (not in ``__all__``): what the fused pipeline hands to the
    MST kernel. Not symmetrised, not clipped: the kernels read it as correlations.

    Parameters
    ----------
    z : Tensor, shape (B, n)
        Normalised activations (:func:`normalize_activations`).
    block : int, optional
        Block width for computing only the blocks on and above the diagonal with
        torch (symmetry), ``block >= n`` for one full product. ``None`` picks the
        measured default of :func:`gram_rows` (on the CPU with one torch thread
        NumPy's syrk on one BLAS thread from 512 neurons on, else ``torch.mm``;
        never a second pool).

    Returns
    -------
    Tensor, shape (n, n), on ``z.device``, in ``z.dtype``.
    """
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        zd = z.detach()
        if block is None and zd.device.type != "cpu":
            return zd.T @ zd
        return _gram_one(zd.T, block)


@functools.lru_cache(maxsize=1)
def _numpy_blas():
    """threadpoolctl's handle on NumPy's BLAS, or None without threadpoolctl (the ``fast`` extra)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None


def _numpy_blas_threads(n: int):
    """Run NumPy's BLAS on ``n`` threads inside the block (the products use 1: no second pool).

    NumPy's OpenBLAS starts one thread per core whatever ``torch.set_num_threads``
    says, and its threads and torch's OpenMP team spin against each other (issue 18:
    a 2-thread MLP step took 38-94 ms against 17 ms with passive waiting). A no-op
    without threadpoolctl.
    """
    blas = _numpy_blas()
    if blas is None or all(lib.num_threads == n for lib in blas.lib_controllers):
        return contextlib.nullcontext()
    return blas.limit(limits=n)


# Below this many neurons torch.mm (torch's threads) beats NumPy's syrk on one thread
# (BENCHMARKS.md, "Kernels": the product side by side); from it on syrk's half of the flops wins.
_SYRK_MIN_NEURONS = 512


def gram_rows(zts: list[torch.Tensor], block: int | None = None) -> list[torch.Tensor]:
    """``Zt Zt^T`` (n, n) of neuron-major normalised activations (n, R), per cloud, without gradient.

    Package-internal: the products the fused op hands to the MST kernel. On the
    CPU each runs in the calling thread or on torch's own threads, never on a
    second pool: with one torch thread NumPy's syrk (half the flops, exactly
    symmetric) pinned to one BLAS thread for ``n >= 512`` when threadpoolctl can
    pin it; else ``torch.mm`` (from two threads on, torch's multi-threaded ``mm``
    is as fast as syrk on one: BENCHMARKS.md, "Architectures").
    On accelerators the clouds with equal (n, R) and dtype share one ``bmm``.
    ``block`` forces the blocked upper-half torch product (:func:`_upper_gram`).
    """
    if not zts:
        return []
    with torch.no_grad(), torch.autocast(device_type=zts[0].device.type, enabled=False):
        if zts[0].device.type != "cpu" and block is None:
            return _bmm_rows(zts)
        if block is None and len(zts) > 1 and len({zt.dtype for zt in zts}) == 1:
            return _gram_back_to_back(zts)
        return [_gram_one(zt, block) for zt in zts]


def _gram_back_to_back(zts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The CPU products of many clouds written back to back into one buffer (views of it returned):
    the many-trees kernel then reads them in place instead of concatenating them (a copy of every
    product, 1-2 ms for a ResNet's 17 clouds)."""
    sizes = [zt.shape[0] for zt in zts]
    flat = torch.empty(sum(n * n for n in sizes), dtype=zts[0].dtype)
    out, at = [], 0
    for zt, n in zip(zts, sizes):
        P = flat[at : at + n * n].view(n, n)
        at += n * n
        if _syrk_pays(zt):
            _syrk_one_thread(zt, out=P)
        else:
            torch.mm(zt, zt.T, out=P)
        out.append(P)
    return out


def _bmm_rows(zts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``Zt Zt^T`` per cloud, one ``torch.bmm`` per group of clouds with equal (n, R, dtype)."""
    out: list[torch.Tensor | None] = [None] * len(zts)
    groups: dict[tuple, list[int]] = {}
    for l, zt in enumerate(zts):
        groups.setdefault((tuple(zt.shape), zt.dtype), []).append(l)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = zts[idx[0]] @ zts[idx[0]].T
            continue
        Z = torch.stack([zts[l] for l in idx])  # (G, n, R)
        P = torch.bmm(Z, Z.transpose(1, 2))
        for k, l in enumerate(idx):
            out[l] = P[k]
    return out  # type: ignore[return-value]


def _gram_one(zt: torch.Tensor, block: int | None) -> torch.Tensor:
    n = zt.shape[0]
    if block is not None:
        if block < 1:
            raise ValueError(f"block must be a positive width, got {block}")
        return zt @ zt.T if block >= n else _upper_gram(zt.T, block)
    if _syrk_pays(zt):
        return _syrk_one_thread(zt)
    return torch.mm(zt, zt.T)  # on torch's own threads: from 2 of them as fast as syrk on one


def _syrk_pays(zt: torch.Tensor) -> bool:
    """Whether NumPy's syrk on one BLAS thread is the faster CPU product (measured: one torch thread, n >= 512)."""
    return (zt.device.type == "cpu" and zt.shape[0] >= _SYRK_MIN_NEURONS and torch.get_num_threads() == 1
            and _numpy_blas() is not None)


def _syrk_one_thread(zt: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Zt Zt^T`` by NumPy's syrk on one BLAS thread, in the calling thread (into ``out`` if given)."""
    a = zt.contiguous().numpy()
    with _numpy_blas_threads(1):  # no second pool
        if out is None:
            return torch.from_numpy(a @ a.T)
        np.matmul(a, a.T, out=out.numpy())
        return out


def _upper_gram(z: torch.Tensor, block: int) -> torch.Tensor:
    """Z^T Z computing only the blocks on and above the diagonal, mirrored below.

    Each block row is written straight into its place (no temporary); the
    blocks off the diagonal are exact mirrors, the diagonal blocks are whatever
    ``mm`` gives (symmetric up to rounding). Saves ~40% of the flops but pays a transposed
    copy of the lower half, so it wins only when B is large (BENCHMARKS.md).
    """
    n = z.shape[1]
    C = torch.empty((n, n), dtype=z.dtype, device=z.device)
    for s in range(0, n, block):
        e = min(s + block, n)
        torch.mm(z[:, s:e].T, z[:, s:], out=C[s:e, s:])
        if e < n:
            C[e:, s:e] = C[s:e, e:].T
    return C


def correlation(acts: torch.Tensor) -> torch.Tensor:
    """Pearson correlation matrix of the neurons (columns) of ``acts``.

    One matrix product on centred, normalised activations, in float32 even
    under autocast. Constant neurons get correlation 0 with the others.

    Parameters
    ----------
    acts : Tensor, shape (B, n)

    Returns
    -------
    Tensor, shape (n, n)
        Exactly (bitwise) symmetric, unit diagonal, entries in [-1, 1].

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 3.0], [2.0, -1.0, 3.0]])
    >>> correlation(x).round(decimals=4)
    tensor([[ 1., -1.,  0.],
            [-1.,  1.,  0.],
            [ 0.,  0.,  1.]])
    """
    z, _ = normalize_activations(acts)
    with torch.autocast(device_type=z.device.type, enabled=False):
        c = _CorrelationOfNormalized.apply(z)
    return c


class _CorrelationOfNormalized(torch.autograd.Function):
    """The correlation matrix ``C`` of shape (n, n) from normalised activations ``Z`` (B, n).

    Forward: ``P = Z^T Z`` (:func:`correlation_product`), then ``(P + P^T) / 2`` (a float matrix product is not
    bitwise symmetric, and ``sqrt(1 - c^2)`` would amplify a one-ulp asymmetry near
    ``|c| = 1`` to ~1e-8), clipped to [-1, 1], unit diagonal (also for dead neurons).
    Backward: ``Z (G + G^T)`` with the diagonal of ``G + G^T`` zeroed: one matrix
    product, where autograd through ``Z.T @ Z`` takes two (one per operand). The clip
    passes the gradient straight through (a near-duplicate pair keeps its gradient);
    the diagonal, a constant, gets none. The backward is made of differentiable ops,
    so double backward works.
    """

    @staticmethod
    def forward(ctx, z):  # noqa: D102
        ctx.save_for_backward(z)
        p = correlation_product(z)  # on the CPU NumPy's syrk: half the flops of z.T @ z
        c = torch.add(p, p.T).mul_(0.5).clamp_(-1.0, 1.0)
        c.fill_diagonal_(1.0)
        return c

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (z,) = ctx.saved_tensors
        g = grad + grad.T
        return z @ g.fill_diagonal_(0.0)


class _SqrtOneMinusSquare(torch.autograd.Function):
    """sqrt(1 - c^2) with the derivative's denominator floored (finite at |c| = 1)."""

    @staticmethod
    def forward(ctx, c):  # noqa: D102
        ctx.save_for_backward(c)
        return (1.0 - c * c).clamp_min(0.0).sqrt()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (c,) = ctx.saved_tensors
        # recomputed from c with differentiable ops, so that double backward is right too
        denom = (1.0 - c * c).clamp_min(_SQRT_GRAD_FLOOR**2).sqrt()
        return grad * (-c / denom)


def dissimilarity(corr: torch.Tensor, kind: str = "abs") -> torch.Tensor:
    """Turn correlations into dissimilarities between neurons.

    Parameters
    ----------
    corr : Tensor, any shape
        Correlations in [-1, 1] (a matrix or a vector of selected pairs).
    kind : {"abs", "sqrt"}
        ``"abs"``: ``1 - |corr|`` (the paper's). ``"sqrt"``: ``sqrt(1 - corr^2)``,
        whose gradient is kept finite at ``corr = +-1`` (the denominator of
        ``-corr / sqrt(1 - corr^2)`` is floored at 1e-3). Both are strictly
        increasing functions of ``1 - |corr|`` and so select the same minimum
        spanning tree; they differ in the scale of the deaths.

    Returns
    -------
    Tensor, same shape, values in [0, 1].

    Examples
    --------
    >>> import torch
    >>> dissimilarity(torch.tensor([1.0, -0.5, 0.0]))
    tensor([0.0000, 0.5000, 1.0000])
    >>> dissimilarity(torch.tensor([0.6, -0.8]), kind="sqrt")
    tensor([0.8000, 0.6000])
    """
    if kind == "abs":
        d = 1.0 - corr.abs()
        # rounding can give |corr| slightly above 1: clip the value, keep the gradient
        return d + (d.detach().clamp_min(0.0) - d.detach())
    if kind == "sqrt":
        return _SqrtOneMinusSquare.apply(corr)
    raise ValueError(f"unknown dissimilarity kind {kind!r}; choose one of {DISSIMILARITIES}")
