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

import torch

__all__ = ["NonFiniteActivationsError", "normalize_activations", "correlation", "dissimilarity", "DISSIMILARITIES"]


class NonFiniteActivationsError(ValueError, FloatingPointError):
    """Activations contain NaN or inf.

    A ``ValueError`` (bad input to the statistics) and a ``FloatingPointError``
    (in a training loop it means divergence), so either kind of handler catches it.
    """

#: Names accepted by :func:`dissimilarity`.
DISSIMILARITIES = ("abs", "sqrt")

# A neuron counts as constant when its centred norm is below this many
# machine epsilons times its largest absolute activation (times sqrt(B)):
# below that level the "variation" is float rounding of the mean, not signal.
_CONSTANT_RTOL_ULPS = 8.0

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
        if not torch.isfinite(x).all():
            raise NonFiniteActivationsError(
                "activations contain NaN or inf; the network diverged or its inputs are not finite "
                "(check the learning rate and the data) before computing correlations"
            )
        # Divide each column by its largest |activation| first (a constant, so z is
        # unchanged in value and gradient): the mean and the squares in the norm then
        # can neither overflow (float32 activations above ~1e19) nor underflow.
        scale = x.detach().abs().amax(dim=0)
        x = x * torch.where(scale > 0, scale, torch.ones_like(scale)).reciprocal()
        xc = x - x.mean(dim=0, keepdim=True)
        norm = torch.linalg.vector_norm(xc, dim=0)
        tol = _CONSTANT_RTOL_ULPS * torch.finfo(dtype).eps * (x.shape[0] ** 0.5)
        dead = (norm.detach() <= tol) | (scale == 0)
        # per-column factors on the (n,) vector, then one (B, n) product: fewer passes over
        # the activations forward and backward than masking the (B, n) matrix itself
        inv = torch.where(dead, torch.zeros_like(norm), torch.where(dead, torch.ones_like(norm), norm).reciprocal())
        z = xc * inv
    return z, dead


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
        measured default: on the CPU, NumPy's ``A.T @ A`` (BLAS syrk, upper half
        only, exactly symmetric; 3-4x faster than torch's ``mm`` at n = 1010,
        B = 256 on one thread); elsewhere blocks of 512 when ``n >= 2048`` and
        either ``B >= 512`` or torch runs one CPU thread, else one full product
        (BENCHMARKS.md, "Kernels").

    Returns
    -------
    Tensor, shape (n, n), on ``z.device``, in ``z.dtype``.
    """
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        zd = z.detach()
        n = zd.shape[1]
        if block is None:
            if zd.device.type == "cpu":
                a = zd.contiguous().numpy()
                with _numpy_blas_threads(torch.get_num_threads()):
                    return torch.from_numpy(a.T @ a)
            wide = zd.shape[0] >= 512
            block = 512 if (wide and n >= 2048) else n
        if block < 1:
            raise ValueError(f"block must be a positive width, got {block}")
        return zd.T @ zd if block >= n else _upper_gram(zd, block)


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
    """Run NumPy's BLAS on ``n`` threads inside the block: torch's thread count, not NumPy's own.

    NumPy's OpenBLAS starts one thread per core whatever ``torch.set_num_threads``
    says; in a one-thread training process (a sweep worker) that oversubscribes the
    cores, and on this 2-core machine the syrk at n = 1010, B = 256 took 16 ms on 2
    threads against 8.6 ms on one. A no-op without threadpoolctl.
    """
    blas = _numpy_blas()
    if blas is None or all(lib.num_threads == n for lib in blas.lib_controllers):
        return contextlib.nullcontext()
    return blas.limit(limits=n)


def correlation_products(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`correlation_product` of every layer, batched where shapes allow.

    Package-internal. On the CPU each product is NumPy's syrk (half the flops;
    a batched full product would be slower); on other devices layers with the
    same (B, n) and dtype share one ``torch.bmm`` (:func:`_bmm_products`).

    Parameters
    ----------
    zs : list of Tensor, shapes (B_l, n_l)
        Normalised activations, all on one device.

    Returns
    -------
    list of Tensor, shapes (n_l, n_l), without gradient.
    """
    if zs and zs[0].device.type != "cpu":
        return _bmm_products(zs)
    return [correlation_product(z) for z in zs]


def _bmm_products(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``Z^T Z`` per layer, one ``torch.bmm`` per group of layers with equal (B, n, dtype)."""
    out: list[torch.Tensor | None] = [None] * len(zs)
    groups: dict[tuple, list[int]] = {}
    for l, z in enumerate(zs):
        groups.setdefault((tuple(z.shape), z.dtype), []).append(l)
    with torch.no_grad(), torch.autocast(device_type=zs[0].device.type if zs else "cpu", enabled=False):
        for idx in groups.values():
            if len(idx) == 1:
                z = zs[idx[0]].detach()
                out[idx[0]] = z.T @ z
                continue
            Z = torch.stack([zs[l].detach() for l in idx])  # (G, B, n)
            P = torch.bmm(Z.transpose(1, 2), Z)
            for k, l in enumerate(idx):
                out[l] = P[k]
    return out  # type: ignore[return-value]


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


def pair_correlations(z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Correlations ``z[:, lo[k]] . z[:, hi[k]]`` of chosen pairs, with gradient, clipped in value.

    Package-internal (not in ``__all__``). Gathers neuron rows of a contiguous
    (n, B) copy of ``z``: contiguous reads, and a row scatter in the backward
    (measured ~2x faster than column gathers at n = 4096).

    Parameters
    ----------
    z : Tensor, shape (B, n)
    lo, hi : LongTensor, shape (m,)

    Returns
    -------
    Tensor, shape (m,)
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        zt = z.T.contiguous()
        c = (zt.index_select(0, lo) * zt.index_select(0, hi)).sum(dim=1)
        return clip_unit(c)


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
