"""correlation, dissimilarity and normalize_activations against NumPy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import strategies as S
from topodecorr import correlation, dissimilarity, normalize_activations


def _numpy_corr(A: np.ndarray) -> np.ndarray:
    """Pearson correlation with NumPy; constant columns get 0 off the diagonal and 1 on it."""
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[1]
    const = np.ptp(A, axis=0) == 0
    C = np.eye(n)
    live = np.flatnonzero(~const)
    if live.size:
        C[np.ix_(live, live)] = np.atleast_2d(np.corrcoef(A[:, live], rowvar=False))
    return C


# --------------------------------------------------------------------------- values


@given(S.activations(min_n=1, max_n=20))
@settings(max_examples=S.examples(60))
def test_correlation_matches_numpy(case):
    family, seed, A = case
    C = correlation(torch.from_numpy(A))
    assert C.dtype == torch.float64 and C.shape == (A.shape[1],) * 2
    np.testing.assert_allclose(C.numpy(), _numpy_corr(A), rtol=0, atol=1e-12)
    assert torch.equal(C, C.T), "correlation must be exactly symmetric"
    assert torch.all(torch.diagonal(C) == 1)
    assert C.abs().max() <= 1


@given(S.activations(min_n=1, max_n=20))
@settings(max_examples=S.examples(30))
def test_correlation_float32_close_to_float64(case):
    family, seed, A = case
    C32 = correlation(torch.from_numpy(A).float())
    assert C32.dtype == torch.float32
    assert torch.equal(C32, C32.T)
    assert C32.abs().max() <= 1, "rounding above 1 is clipped"
    np.testing.assert_allclose(C32.double().numpy(), _numpy_corr(A.astype(np.float32)), rtol=0, atol=2e-5)


def test_correlation_invariant_to_affine_maps_and_sign():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 6, generator=g, dtype=torch.float64)
    scale = torch.tensor([2.0, -3.0, 0.5, 1.0, -1.0, 10.0], dtype=torch.float64)
    shift = torch.randn(6, generator=g, dtype=torch.float64) * 5
    C0 = correlation(A)
    C1 = correlation(A * scale + shift)
    sign = torch.sign(scale)
    torch.testing.assert_close(C1, C0 * sign[:, None] * sign[None, :], rtol=0, atol=1e-12)


def test_normalize_activations_unit_columns_and_dead_flags():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(20, 5, generator=g, dtype=torch.float64)
    A[:, 2] = 3.5  # dead ReLU-like constant
    A[:, 4] = 0.0  # exactly zero
    z, dead = normalize_activations(A)
    assert dead.tolist() == [False, False, True, False, True]
    torch.testing.assert_close(z.sum(0)[~dead], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.norm(dim=0)[~dead], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(z[:, dead] == 0)


def test_constant_in_float32_rounding_counts_as_dead():
    # a column that is constant but whose float32 mean is not exactly representable
    A = torch.full((256, 3), 0.1)
    A[:, 0] = torch.linspace(-1, 1, 256)
    A[:, 2] = 1e4 / 3.0
    _, dead = normalize_activations(A)
    assert dead.tolist() == [False, True, True]
    C = correlation(A)
    assert torch.equal(C, torch.eye(3))


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e20, 1e30, 1e37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scales_exact_and_finite(scale, dtype):
    """Correlation is scale-free: huge or tiny activations must neither overflow nor underflow."""
    g = torch.Generator().manual_seed(10)
    base = torch.randn(64, 5, generator=g, dtype=torch.float64)
    base[:, 4] = 1.0  # a constant neuron stays constant at every scale
    acts = (base * scale).to(dtype).requires_grad_(True)
    C = correlation(acts)
    ref = torch.from_numpy(_numpy_corr(base.numpy())).to(dtype)
    torch.testing.assert_close(C, ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    (dissimilarity(C) ** 2).sum().backward()
    assert torch.isfinite(acts.grad).all()
    acts.grad = None
    from topodecorr import correlation_deaths

    correlation_deaths(acts).deaths.sum().backward()
    assert torch.isfinite(acts.grad).all()


# --------------------------------------------------------------------------- dead neurons, degenerate batches


def test_dead_neuron_zero_correlation_finite_gradient():
    g = torch.Generator().manual_seed(2)
    A = torch.relu(torch.randn(16, 6, generator=g, dtype=torch.float64))
    A[:, 3] = 0.0  # a dead ReLU
    A.requires_grad_(True)
    C = correlation(A)
    assert torch.all(C[3, torch.arange(6) != 3] == 0) and C[3, 3] == 1
    # the other neurons' correlations are those of the matrix without the dead column
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(C.detach()[keep][:, keep], correlation(A.detach()[:, keep]), rtol=0, atol=1e-15)
    (dissimilarity(C) ** 2).sum().backward()
    assert torch.isfinite(A.grad).all()
    assert torch.all(A.grad[:, 3] == 0)
    assert A.grad[:, keep].abs().sum() > 0


@pytest.mark.parametrize("kind", ["abs", "sqrt"])
def test_constant_batch_identity_and_finite_backward(kind):
    A = (torch.arange(5.0) * 2 - 3).repeat(8, 1).requires_grad_(True)  # every neuron constant
    C = correlation(A)
    assert torch.equal(C, torch.eye(5))
    D = dissimilarity(C, kind)
    D.sum().backward()
    assert torch.isfinite(A.grad).all() and torch.all(A.grad == 0)


def test_batch_size_two():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    A[:, 5] = 1.0  # one constant neuron
    A.requires_grad_(True)
    C = correlation(A)
    off = C[:5, :5].detach()
    torch.testing.assert_close(off.abs(), torch.ones(5, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(C[5, :5] == 0)
    for kind in ("abs", "sqrt"):
        A.grad = None
        dissimilarity(C if kind == "abs" else correlation(A), kind).sum().backward()
        assert torch.isfinite(A.grad).all()


def test_duplicate_neurons_float32_clipped_no_nan():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 1, generator=g)
    A = torch.cat([x, x, 3 * x + 1, -x, torch.randn(256, 2, generator=g)], dim=1).requires_grad_(True)
    C = correlation(A)
    assert C.abs().max() <= 1
    for kind in ("abs", "sqrt"):
        D = dissimilarity(C, kind)
        assert D.min() >= 0
        assert D[0, 1] < 1e-3 and D[0, 3] < 1e-3
        A.grad = None
        D.sum().backward(retain_graph=True)
        assert torch.isfinite(A.grad).all()


@pytest.mark.slow
@given(S.activations(min_batch=2, max_batch=12, min_n=1, max_n=12))
@settings(max_examples=S.examples(40))
def test_no_nan_forward_or_backward(case):
    family, seed, A = case
    for dtype in (torch.float32, torch.float64):
        acts = torch.from_numpy(A).to(dtype).requires_grad_(True)
        C = correlation(acts)
        assert torch.isfinite(C).all()
        for kind in ("abs", "sqrt"):
            acts.grad = None
            D = dissimilarity(correlation(acts), kind)
            assert torch.isfinite(D).all() and D.min() >= 0 and D.max() <= 1
            (D * torch.linspace(0, 1, D.numel(), dtype=dtype).view_as(D)).sum().backward()
            assert torch.isfinite(acts.grad).all()


# --------------------------------------------------------------------------- autocast, dtypes


def test_autocast_bfloat16_gives_float32():
    g = torch.Generator().manual_seed(5)
    acts = torch.randn(64, 10, generator=g).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = correlation(acts)
        z, _ = normalize_activations(acts)
    assert C.dtype == torch.float32 and z.dtype == torch.float32
    ref = correlation(acts.detach().float())
    torch.testing.assert_close(C, ref, rtol=0, atol=1e-6)
    C.sum().backward()
    assert torch.isfinite(acts.grad.float()).all()


def test_float64_under_autocast_stays_float64():
    acts = torch.randn(16, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = correlation(acts)
    assert C.dtype == torch.float64
    np.testing.assert_allclose(C.numpy(), _numpy_corr(acts.numpy()), rtol=0, atol=1e-12)


def test_float16_input_gives_float32():
    acts = torch.randn(32, 4).half()
    assert correlation(acts).dtype == torch.float32


# --------------------------------------------------------------------------- gradients


def test_gradcheck_correlation():
    g = torch.Generator().manual_seed(6)
    acts = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(correlation, (acts,))
    assert torch.autograd.gradgradcheck(correlation, (acts,))


def test_gradcheck_correlation_with_dead_neuron():
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(8, 4, generator=g, dtype=torch.float64)
    acts[:, 1] = 2.0
    dead_col = acts[:, 1:2].clone()  # gradcheck perturbs its input in place: keep a copy
    acts.requires_grad_(True)

    # the live columns vary; the dead one stays constant, so its correlations stay 0
    def out(a):
        return correlation(torch.cat([a[:, :1], dead_col, a[:, 2:]], dim=1))

    assert torch.autograd.gradcheck(out, (acts,))
    C = out(acts)
    assert torch.all(C[1, [0, 2, 3]] == 0)


@pytest.mark.parametrize("kind", ["abs", "sqrt"])
def test_gradcheck_dissimilarity(kind):
    g = torch.Generator().manual_seed(8)
    mag = torch.rand(12, generator=g, dtype=torch.float64) * 0.7 + 0.15  # |c| in [0.15, 0.85]
    sign = torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0).double()
    c = (mag * sign).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: dissimilarity(c, kind), (c,))
    # second order too (a custom backward must itself be differentiable)
    assert torch.autograd.gradgradcheck(lambda c: dissimilarity(c, kind), (c,))


def test_dissimilarity_closed_forms():
    c = torch.linspace(-1, 1, 41, dtype=torch.float64)
    cn = c.numpy()
    np.testing.assert_allclose(dissimilarity(c, "abs").numpy(), 1 - np.abs(cn), rtol=0, atol=1e-15)
    np.testing.assert_allclose(dissimilarity(c, "sqrt").numpy(), np.sqrt(1 - cn**2), rtol=0, atol=1e-7)
    assert dissimilarity(c).dtype == torch.float64  # default kind is the paper's "abs"
    torch.testing.assert_close(dissimilarity(c), dissimilarity(c, "abs"))


def test_dissimilarities_are_increasing_in_one_minus_abs():
    c = torch.linspace(-1, 1, 201, dtype=torch.float64)
    key = 1 - c.abs()
    order = torch.argsort(key, stable=True)
    for kind in ("abs", "sqrt"):
        d = dissimilarity(c, kind)[order]
        assert torch.all(torch.diff(d) >= 0)


def test_sqrt_gradient_finite_at_plus_minus_one():
    c = torch.tensor([1.0, -1.0, 1.0 - 1e-9, 0.5], dtype=torch.float64, requires_grad=True)
    dissimilarity(c, "sqrt").sum().backward()
    g = c.grad
    assert torch.isfinite(g).all()
    assert g[0] < 0 and g[1] > 0, "the gradient points towards decorrelation"
    assert g.abs().max() <= 1e3 + 1e-9
    torch.testing.assert_close(g[3], torch.tensor(-0.5 / np.sqrt(0.75), dtype=torch.float64))


def test_abs_rounding_above_one_clamped_value_gradient_kept():
    c = torch.tensor([1.0 + 2e-7, -1.0 - 2e-7], dtype=torch.float32, requires_grad=True)
    d = dissimilarity(c, "abs")
    assert torch.equal(d.detach(), torch.zeros(2))
    d.sum().backward()
    assert c.grad.tolist() == [-1.0, 1.0]


def test_correlation_rounding_clip_keeps_gradient():
    # identical neurons: c rounds to ~1 and is clipped, but the gradient path stays connected
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 1, generator=g)
    A = torch.cat([x, x * 1.0000001 + 0.3, torch.randn(64, 1, generator=g)], 1).requires_grad_(True)
    C = correlation(A)
    assert C.grad_fn is not None
    w = torch.zeros(3, 3)
    w[0, 2] = 1.0
    (C * w).sum().backward()
    assert A.grad[:, 0].abs().sum() > 0 and A.grad[:, 2].abs().sum() > 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "acts,exc,match",
    [
        (torch.zeros(5), ValueError, r"shape \(batch, neurons\)"),
        (torch.zeros(2, 3, 4), ValueError, r"shape \(batch, neurons\).*flatten"),
        (torch.zeros(1, 4), ValueError, "batch size 1"),
        (torch.zeros(0, 4), ValueError, "batch size 0"),
        (torch.zeros(4, 3, dtype=torch.int64), TypeError, "floating-point"),
        (np.zeros((4, 3)), TypeError, "torch.Tensor"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 2.0]]), ValueError, "NaN or inf"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), ValueError, "NaN or inf"),
    ],
    ids=["1-D", "3-D", "batch-1", "batch-0", "integer", "numpy", "inf", "nan"],
)
def test_correlation_errors(acts, exc, match):
    with pytest.raises(exc, match=match):
        correlation(acts)
    with pytest.raises(exc, match=match):
        normalize_activations(acts)


def test_dissimilarity_bad_kind():
    with pytest.raises(ValueError, match=r"unknown dissimilarity kind 'one_minus'.*abs.*sqrt"):
        dissimilarity(torch.zeros(3), kind="one_minus")


# --------------------------------------------------------------------------- package-internal products


@pytest.mark.parametrize("block", [None, 1, 4, 7, 100])
def test_correlation_product_every_path_equals_numpy(block):
    from topodecorr.correlation import correlation_product

    z, _ = normalize_activations(torch.from_numpy(S.make_activations("lowrank", 30, 23, seed=2)))
    C = correlation_product(z, block=block)
    ref = z.numpy().T @ z.numpy()
    np.testing.assert_allclose(C.numpy(), ref, rtol=0, atol=1e-12)
    if block is not None and block < 23:
        off = torch.ones(23, 23, dtype=torch.bool)
        for s in range(0, 23, block):
            off[s : s + block, s : s + block] = False  # the diagonal blocks come from mm as they are
        assert torch.equal(C[off], C.T[off]), "off the diagonal blocks the product is an exact mirror"


@pytest.mark.parametrize("block", [0, -1])
def test_correlation_product_rejects_non_positive_block(block):
    from topodecorr.correlation import correlation_product

    with pytest.raises(ValueError, match="block must be a positive width"):
        correlation_product(torch.randn(8, 5), block=block)


def test_numpy_blas_follows_torch_thread_count_inside_the_product_only():
    """The CPU product runs NumPy's BLAS on torch's thread count and restores NumPy's own after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import importlib

    corr_mod = importlib.import_module("topodecorr.correlation")  # the module, not the function

    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("NumPy has no BLAS that threadpoolctl controls here")
    before = [lib.num_threads for lib in blas.lib_controllers]
    inside = []
    with corr_mod._numpy_blas_threads(1):
        inside = [lib.num_threads for lib in blas.lib_controllers]
    assert inside == [1] * len(before)
    assert [lib.num_threads for lib in blas.lib_controllers] == before
    z = torch.randn(16, 5, dtype=torch.float64)
    np.testing.assert_allclose(corr_mod.correlation_product(z).numpy(), (z.T @ z).numpy(), rtol=1e-12)


def test_cpu_product_is_syrk_on_one_thread_and_torch_mm_on_more(monkeypatch):
    """One torch thread: NumPy's syrk (one BLAS thread); two or more: torch's own mm. Same deaths either way."""
    import importlib

    pytest.importorskip("threadpoolctl")
    corr_mod = importlib.import_module("topodecorr.correlation")
    if corr_mod._numpy_blas() is None:
        pytest.skip("NumPy has no BLAS that threadpoolctl controls here")
    from topodecorr import correlation_deaths

    calls = []
    real = corr_mod._syrk_one_thread
    monkeypatch.setattr(corr_mod, "_syrk_one_thread", lambda zt, out=None: calls.append(zt.shape) or real(zt, out))
    acts = torch.from_numpy(S.make_activations("lowrank", 64, 600, seed=3)).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = correlation_deaths(acts)
        assert calls == [(600, 64)]
        torch.set_num_threads(2)
        two = correlation_deaths(acts)
        assert calls == [(600, 64)], "with two torch threads the product is torch.mm"
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two.deaths, one.deaths, rtol=0, atol=1e-5)
