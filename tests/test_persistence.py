"""mst_deaths and correlation_deaths against independent references, on every kernel.

References: scipy's minimum spanning tree, gudhi's and giotto-ph's dimension-0
diagrams (padded with the zero-length bars they drop), planted trees,
invariances, finite differences (gradcheck) and closed forms.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies as S
import topodecorr as td
from topodecorr import correlation, correlation_deaths, dissimilarity, mst_deaths, normalize_activations
from topodecorr.persistence import Deaths

ATOL = 1e-12


def _check_structure(D: np.ndarray, res: Deaths) -> None:
    """Shapes, dtypes, sorting, i < j, spanning tree, and deaths == D[edges]."""
    n = D.shape[0]
    deaths, edges = res
    assert deaths.shape == (max(n - 1, 0),)
    assert edges.shape == (max(n - 1, 0), 2)
    assert edges.dtype == torch.long
    d = deaths.detach().numpy()
    e = edges.numpy()
    assert np.all(np.diff(d) >= 0), "deaths must be sorted ascending"
    assert np.all(e[:, 0] < e[:, 1]), "edges must be stored as (i, j) with i < j"
    assert S.is_spanning_tree(e, n), "edges must form a spanning tree"
    np.testing.assert_allclose(d, D[e[:, 0], e[:, 1]], rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- references, small n


@given(S.matrices(min_n=1, max_n=30))
@settings(max_examples=S.examples(60))
def test_small_matches_scipy_and_gudhi(backend, case):
    family, n, seed, D = case
    res = mst_deaths(torch.from_numpy(D), backend=backend)
    _check_structure(D, res)
    d = res.deaths.numpy()
    np.testing.assert_allclose(d, S.scipy_deaths(D), rtol=0, atol=1e-12)
    np.testing.assert_allclose(d, S.gudhi_deaths(D), rtol=0, atol=1e-12)


@pytest.mark.slow
@given(S.matrices(min_n=2, max_n=30, families=("duplicates",)))
@settings(max_examples=S.examples(25))
def test_duplicates_give_zero_deaths_never_dropped(backend, case):
    family, n, seed, D = case
    res = mst_deaths(torch.from_numpy(D), backend=backend)
    assert res.deaths.shape == (n - 1,)
    # zero deaths = n - (number of groups of neurons at distance 0): count groups with union-find
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i, j in zip(*np.nonzero(np.triu(D == 0, 1))):
        parent[find(i)] = find(j)
    groups = len({find(a) for a in range(n)})
    assert int((res.deaths == 0).sum()) == n - groups
    # giotto-ph drops exactly those bars; padded, it agrees
    np.testing.assert_allclose(res.deaths.numpy(), S.giotto_deaths(D), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- references, large n

LARGE = [("random", 2000), ("lowrank", 700), ("quantised", 1500), ("duplicates", 1200)]


@functools.lru_cache(maxsize=None)
def _large_case(family: str, n: int):
    D = S.make_matrix(family, n, seed=n)
    return D, S.scipy_deaths(D), S.giotto_deaths(D)


@pytest.mark.slow
@pytest.mark.parametrize("family,n", LARGE, ids=[f"{f}-{n}" for f, n in LARGE])
def test_large_matches_scipy_and_giotto(backend, family, n):
    D, ref_scipy, ref_giotto = _large_case(family, n)
    res = mst_deaths(torch.from_numpy(D), backend=backend)
    _check_structure(D, res)
    d = res.deaths.numpy()
    np.testing.assert_allclose(d, ref_scipy, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d, ref_giotto, rtol=1e-6, atol=1e-6)  # giotto-ph works in float32
    np.testing.assert_allclose(d.sum(), ref_scipy.sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_agree(backend, dtype):
    D = S.make_matrix("random", 200, seed=3)
    res = mst_deaths(torch.from_numpy(D).to(dtype), backend=backend)
    assert res.deaths.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(res.deaths.double().numpy(), S.scipy_deaths(D), rtol=0, atol=tol)


# --------------------------------------------------------------------------- planted answers, invariances


@given(S.planted(min_n=2, max_n=40))
@settings(max_examples=S.examples(40))
def test_planted_tree_is_found(backend, case):
    n, seed, D, planted = case
    res = mst_deaths(torch.from_numpy(D), backend=backend)
    assert S.edge_set(res.edges) == planted
    expected = np.sort([D[i, j] for i, j in planted])
    np.testing.assert_array_equal(res.deaths.numpy(), expected)


@pytest.mark.slow
@given(S.matrices(min_n=2, max_n=30), st.randoms(use_true_random=False))
@settings(max_examples=S.examples(40))
def test_relabelling_permutes_edges_keeps_deaths(backend, case, rnd):
    family, n, seed, D = case
    perm = np.array(rnd.sample(range(n), n))
    Dp = D[np.ix_(perm, perm)]  # new vertex a is old vertex perm[a]
    r0 = mst_deaths(torch.from_numpy(D), backend=backend)
    r1 = mst_deaths(torch.from_numpy(Dp), backend=backend)
    np.testing.assert_array_equal(r0.deaths.numpy(), r1.deaths.numpy())
    if family in S.GENERIC_FAMILIES:  # unique tree: the edges map onto each other
        mapped = {(min(perm[a], perm[b]), max(perm[a], perm[b])) for a, b in r1.edges.tolist()}
        assert mapped == S.edge_set(r0.edges)


_MONOTONE = {
    "cube+linear": lambda x: x**3 + 0.5 * x,
    "sqrt": np.sqrt,
    "expm1": np.expm1,
    "scale": lambda x: 7.0 * x,
}


@pytest.mark.parametrize("fname", list(_MONOTONE))
@given(case=S.matrices(min_n=2, max_n=30))
@settings(max_examples=S.examples(25))
def test_increasing_map_keeps_edges(backend, fname, case):
    family, n, seed, D = case
    if family == "quantised":
        # map the few levels exactly so ties stay ties
        D = np.round(D * 4) / 4
    f = _MONOTONE[fname]
    FD = f(D)
    np.fill_diagonal(FD, 0.0)
    r0 = mst_deaths(torch.from_numpy(D), backend=backend)
    r1 = mst_deaths(torch.from_numpy(FD), backend=backend)
    if family in S.GENERIC_FAMILIES or family == "quantised":
        # generic: the unique tree; quantised: the same deterministic tie-break on the same order
        assert S.edge_set(r1.edges) == S.edge_set(r0.edges)
    np.testing.assert_allclose(r1.deaths.numpy(), np.sort(f(r0.deaths.numpy())), rtol=1e-12, atol=1e-12)


@given(S.matrices(min_n=2, max_n=40, families=("quantised", "duplicates")))
@settings(max_examples=S.examples(30))
def test_deterministic_under_ties(backend, case):
    family, n, seed, D = case
    T = torch.from_numpy(D)
    r0 = mst_deaths(T, backend=backend)
    r1 = mst_deaths(T.clone(), backend=backend)
    r2 = mst_deaths(T.T, backend=backend)  # same values, transposed (non-contiguous) memory
    for r in (r1, r2):
        assert torch.equal(r.edges, r0.edges)
        assert torch.equal(r.deaths, r0.deaths)


def test_all_equal_weights_deterministic(backend):
    n = 50
    D = torch.ones(n, n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64)
    r0 = mst_deaths(D, backend=backend)
    assert S.is_spanning_tree(r0.edges.numpy(), n)
    assert torch.equal(r0.deaths, torch.ones(n - 1, dtype=torch.float64))
    for _ in range(3):
        assert torch.equal(mst_deaths(D, backend=backend).edges, r0.edges)


def test_backends_agree_on_generic_edges():
    from topodecorr._kernels import available_backends

    D = torch.from_numpy(S.make_matrix("lowrank", 300, seed=11))
    sets = {b: S.edge_set(mst_deaths(D, backend=b).edges) for b in available_backends()}
    first = next(iter(sets.values()))
    assert all(s == first for s in sets.values()), "on generic input every kernel must find the unique MST"


# --------------------------------------------------------------------------- gradients


def _sym(A: torch.Tensor) -> torch.Tensor:
    S_ = 0.5 * (A + A.T)
    return S_ - torch.diag(torch.diagonal(S_))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_gradcheck_mst_deaths(backend, n):
    g = torch.Generator().manual_seed(n)
    A = torch.rand(n, n, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda A: mst_deaths(_sym(A), backend=backend).deaths, (A,))
    if n <= 3:  # second order goes through the shared gather only; keep it cheap
        assert torch.autograd.gradgradcheck(lambda A: mst_deaths(_sym(A), backend=backend).deaths, (A,))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_gradient_lands_on_edge_entries_split_half(backend, layout):
    base = np.zeros((24, 24))
    base[::2, ::2] = S.make_matrix("random", 12, seed=5)
    leaf = torch.from_numpy(base).requires_grad_(True)
    D = leaf[::2, ::2] if layout == "strided" else leaf[::2, ::2].contiguous()
    assert D.is_contiguous() == (layout == "contiguous")
    res = mst_deaths(D, backend=backend)
    w = torch.arange(1.0, 12.0, dtype=torch.float64)  # a different weight per death
    (w * res.deaths).sum().backward()
    expected = torch.zeros(12, 12, dtype=torch.float64)
    for k, (i, j) in enumerate(res.edges.tolist()):
        expected[i, j] += 0.5 * w[k]
        expected[j, i] += 0.5 * w[k]
    assert torch.equal(leaf.grad[::2, ::2], expected)
    assert float(leaf.grad.abs().sum()) == float(expected.abs().sum())


def test_negative_rounding_clamped_value_zero_gradient_kept(backend):
    # float32 rounding of a duplicate pair: D[0, 1] slightly negative (within tolerance)
    D = torch.tensor([[0.0, 0.5, 0.7], [0.5, 0.0, 0.6], [0.7, 0.6, 0.0]], dtype=torch.float32)
    D[0, 2] = D[2, 0] = -3e-7
    D.requires_grad_(True)
    res = mst_deaths(D, backend=backend)
    assert res.deaths.shape == (2,)
    assert res.deaths[0].item() == 0.0, "tiny negatives are clamped to 0 in value"
    assert res.edges[0].tolist() == [0, 2]
    res.deaths[0].backward()
    assert D.grad[0, 2].item() == 0.5 and D.grad[2, 0].item() == 0.5, "the clamp must not zero the gradient"
    assert float(D.grad.abs().sum()) == 1.0


@given(S.matrices(min_n=1, max_n=25))
@settings(max_examples=S.examples(30))
def test_backward_finite_everywhere(backend, case):
    family, n, seed, D = case
    T = torch.from_numpy(D).float().requires_grad_(True)
    res = mst_deaths(T, backend=backend)
    assert torch.isfinite(res.deaths).all()
    (res.deaths.sum() + (res.deaths**2).sum()).backward()
    assert T.grad is not None and torch.isfinite(T.grad).all()
    assert float(T.grad.sum()) == pytest.approx(float((1 + 2 * res.deaths.detach()).sum()), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- edge cases


def test_n_equals_one_gives_empty_outputs(backend):
    D = torch.zeros(1, 1, requires_grad=True)
    deaths, edges = mst_deaths(D, backend=backend)
    assert deaths.shape == (0,) and edges.shape == (0, 2) and edges.dtype == torch.long
    deaths.sum().backward()  # still part of the graph: no error, zero gradient
    assert torch.equal(D.grad, torch.zeros(1, 1))


def test_n_equals_two(backend):
    D = torch.tensor([[0.0, 0.3], [0.3, 0.0]])
    deaths, edges = mst_deaths(D, backend=backend)
    assert deaths.tolist() == [pytest.approx(0.3)]
    assert edges.tolist() == [[0, 1]]


def test_all_zero_matrix_gives_zero_deaths(backend):
    deaths, edges = mst_deaths(torch.zeros(7, 7), backend=backend)
    assert torch.equal(deaths, torch.zeros(6))
    assert S.is_spanning_tree(edges.numpy(), 7)


def test_diagonal_is_ignored(backend):
    D = S.make_matrix("random", 15, seed=2)
    D2 = D.copy()
    np.fill_diagonal(D2, 0.9)  # a non-zero diagonal changes nothing
    r0 = mst_deaths(torch.from_numpy(D), backend=backend)
    r1 = mst_deaths(torch.from_numpy(D2), backend=backend)
    assert torch.equal(r0.edges, r1.edges) and torch.equal(r0.deaths, r1.deaths)


def test_validate_false_skips_checks_but_same_answer(backend):
    D = torch.from_numpy(S.make_matrix("random", 20, seed=9))
    r0 = mst_deaths(D, backend=backend)
    r1 = mst_deaths(D, backend=backend, validate=False)
    assert torch.equal(r0.edges, r1.edges) and torch.equal(r0.deaths, r1.deaths)


def test_float_rounding_asymmetry_accepted_and_tree_valid(backend):
    # symmetric up to a few ulps (as a float32 matrix product gives), with heavy ties
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 5 + trial
        D = torch.full((n, n), 0.5) + 3e-8 * torch.randint(0, 3, (n, n), generator=g).float()
        D.fill_diagonal_(0.0)
        res = mst_deaths(D, backend=backend)
        assert S.is_spanning_tree(res.edges.numpy(), n), f"not a spanning tree for n={n}"
        assert torch.allclose(res.deaths, torch.full((n - 1,), 0.5), atol=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "D,match",
    [
        (torch.zeros(3, 4), "square"),
        (torch.zeros(3), "square"),
        (torch.zeros(2, 3, 3), "square"),
        (torch.zeros(0, 0), "empty"),
        (torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]]), "non-finite"),
        (torch.tensor([[0.0, float("inf")], [float("inf"), 0.0]]), "non-finite"),
        (torch.tensor([[0.0, -0.1], [-0.1, 0.0]]), "negative"),
        (torch.tensor([[0.0, 0.2], [0.3, 0.0]]), "not symmetric"),
        (torch.zeros(3, 3, dtype=torch.long), "floating-point"),
    ],
    ids=["non-square", "1-D", "3-D", "empty", "nan", "inf", "negative", "asymmetric", "integer"],
)
def test_errors_say_which(D, match):
    with pytest.raises(ValueError, match=match):
        mst_deaths(D)


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        mst_deaths(np.zeros((3, 3)))


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        mst_deaths(torch.zeros(3, 3), backend="nope")


@pytest.mark.parametrize("name", ["numba", "numpy"])
def test_host_backend_on_device_matrix_raises(name):
    # a data-less "meta" matrix stands in for one on an accelerator
    with pytest.raises(ValueError, match=f"backend '{name}' runs on .* but the matrix is on meta"):
        mst_deaths(torch.zeros(3, 3, device="meta"), backend=name, validate=False)


# --------------------------------------------------------------------------- the fused pipeline


def _dense(acts, kind, backend):
    return mst_deaths(dissimilarity(correlation(acts), kind), backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["abs", "sqrt"])
@given(case=S.activations(min_n=1, max_n=20))
@settings(max_examples=S.examples(25))
def test_fused_equals_dense_in_value(backend, kind, case):
    family, seed, A = case
    acts = torch.from_numpy(A)
    fused = correlation_deaths(acts, kind=kind, backend=backend)
    dense = _dense(acts, kind, backend)
    n = A.shape[1]
    assert fused.deaths.shape == (n - 1,) and fused.edges.shape == (n - 1, 2)
    assert S.is_spanning_tree(fused.edges.numpy(), n)
    # sqrt(1 - c^2) turns a rounding error e of c near +-1 into sqrt(2e): looser there
    torch.testing.assert_close(fused.deaths, dense.deaths, rtol=0, atol=1e-9 if kind == "abs" else 1e-7)
    # and both equal the MST of an independent NumPy 1 - |corr| (for "abs")
    if kind == "abs" and family != "dead":
        ref = S.scipy_deaths(S.abs_corr_dissimilarity(A))
        np.testing.assert_allclose(fused.deaths.numpy(), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["abs", "sqrt"])
@pytest.mark.parametrize("family", ["gaussian", "lowrank", "dead"])
def test_fused_equals_dense_in_gradient(backend, kind, family):
    A = S.make_activations(family, 24, 15, seed=4)
    a1 = torch.from_numpy(A).requires_grad_(True)
    a2 = torch.from_numpy(A).requires_grad_(True)
    f = correlation_deaths(a1, kind=kind, backend=backend)
    d = _dense(a2, kind, backend)
    assert torch.equal(f.edges, d.edges), "generic input: both pipelines pick the unique tree"
    w = torch.linspace(1.0, 2.0, f.deaths.numel(), dtype=torch.float64)
    (w * f.deaths).sum().backward()
    (w * d.deaths).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(a1.grad).all()
    if family == "dead":
        dead = np.ptp(A, axis=0) == 0
        assert dead.any()
        assert torch.all(a1.grad[:, torch.from_numpy(dead)] == 0)


@pytest.mark.slow
def test_fused_gradient_of_a_death_touches_only_its_two_neurons(backend):
    A = torch.from_numpy(S.make_activations("gaussian", 20, 10, seed=5)).requires_grad_(True)
    res = correlation_deaths(A, backend=backend)
    for k in (0, 4, 8):
        A.grad = None
        res.deaths[k].backward(retain_graph=True)
        touched = torch.nonzero(A.grad.abs().sum(0)).flatten().tolist()
        assert touched == sorted(res.edges[k].tolist())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["abs", "sqrt"])
def test_gradcheck_correlation_deaths(backend, kind):
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: correlation_deaths(a, kind=kind, backend=backend).deaths, (acts,))
    if backend == "numpy":  # second order does not depend on the kernel (edges are constants)
        assert torch.autograd.gradgradcheck(lambda a: correlation_deaths(a, kind=kind, backend=backend).deaths, (acts,))


def test_fused_float32_matches_float64(backend):
    A = S.make_activations("lowrank", 64, 40, seed=8)
    d64 = correlation_deaths(torch.from_numpy(A), backend=backend).deaths
    d32 = correlation_deaths(torch.from_numpy(A).float(), backend=backend).deaths
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), d64, rtol=0, atol=2e-5)


def test_fused_duplicates_no_nan_and_zero_deaths(backend):
    A = S.make_activations("duplicates", 32, 20, seed=2)  # 10 distinct neurons, 10 repeats
    acts = torch.from_numpy(A).float().requires_grad_(True)
    res = correlation_deaths(acts, backend=backend)
    assert res.deaths.shape == (19,)
    assert (res.deaths >= 0).all()
    assert int((res.deaths < 1e-5).sum()) == 10, "each repeat gives one (near-)zero death, none dropped"
    t = (1 - res.deaths).sum()
    t.backward()
    assert torch.isfinite(acts.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_neurons_duplicates_give_n_minus_one_zero_deaths(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, generator=g, dtype=dtype)
    scale = torch.linspace(-3, 3, 12, dtype=dtype)
    scale = scale[scale != 0]
    acts = (x * scale + torch.arange(scale.numel(), dtype=dtype)).requires_grad_(True)  # all +-affine copies
    n = acts.shape[1]
    for res in (correlation_deaths(acts, backend=backend), _dense(acts, "abs", backend)):
        assert res.deaths.shape == (n - 1,), "zero-length bars are never dropped"
        assert torch.all(res.deaths >= 0), "rounding above |corr| = 1 is clamped, never negative"
        # ~ zero: |corr| = 1 up to the rounding of the dtype (the exact value depends on BLAS)
        assert res.deaths.max() <= 8 * torch.finfo(dtype).eps
        assert S.is_spanning_tree(res.edges.numpy(), n)


def test_clamped_zero_deaths_keep_their_gradient(backend):
    """float32 duplicates: |corr| rounds above 1, d is clamped to 0, the gradient must survive."""
    g = torch.Generator().manual_seed(4)
    C = torch.rand(6, 6, generator=g) * 0.8 - 0.4
    C = 0.5 * (C + C.T)
    C.fill_diagonal_(1.0)
    over = 1.0 + 2 * torch.finfo(torch.float32).eps  # what rounding gives for duplicate neurons
    C[0, 1] = C[1, 0] = over
    C[2, 4] = C[4, 2] = -over
    C.requires_grad_(True)
    res = mst_deaths(dissimilarity(C), backend=backend)
    zero = res.deaths == 0
    assert int(zero.sum()) == 2
    res.deaths[zero].sum().backward()
    for i, j in res.edges[zero].tolist():
        sign = float(torch.sign(C.detach()[i, j]))
        assert C.grad[i, j].item() == -0.5 * sign and C.grad[j, i].item() == -0.5 * sign
    assert float(C.grad.abs().sum()) == 2.0


@given(case=S.activations(min_n=2, max_n=20))
@settings(max_examples=S.examples(20))
def test_fused_deterministic_and_relabelling(backend, case):
    family, seed, A = case
    acts = torch.from_numpy(A).float()
    r0 = correlation_deaths(acts, backend=backend)
    r1 = correlation_deaths(acts.clone(), backend=backend)
    assert torch.equal(r0.edges, r1.edges) and torch.equal(r0.deaths, r1.deaths)
    n = A.shape[1]
    perm = np.random.default_rng(seed).permutation(n)
    rp = correlation_deaths(acts[:, torch.from_numpy(perm)], backend=backend)
    torch.testing.assert_close(rp.deaths, r0.deaths, rtol=0, atol=1e-5)
    if family in ("gaussian", "lowrank") and A.shape[0] >= 6:  # (B = 2 makes every |corr| 1: ties)
        mapped = {(min(perm[a], perm[b]), max(perm[a], perm[b])) for a, b in rp.edges.tolist()}
        assert mapped == S.edge_set(r0.edges)


def test_fused_constant_batch(backend):
    acts = torch.ones(16, 6) * torch.arange(6.0)  # every neuron constant
    acts.requires_grad_(True)
    res = correlation_deaths(acts, backend=backend)
    assert torch.equal(res.deaths, torch.ones(5)), "dead neurons are uncorrelated: d = 1"
    res.deaths.sum().backward()
    assert torch.equal(acts.grad, torch.zeros_like(acts))


def test_fused_batch_size_two(backend):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    res = correlation_deaths(acts, backend=backend)
    # with two samples every non-constant pair has corr +-1: all deaths 0
    torch.testing.assert_close(res.deaths, torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12)
    res.deaths.sum().backward()
    assert torch.isfinite(acts.grad).all()


def test_fused_n_equals_one(backend):
    acts = torch.randn(5, 1, requires_grad=True)
    res = correlation_deaths(acts, backend=backend)
    assert res.deaths.shape == (0,) and res.edges.shape == (0, 2)
    res.deaths.sum().backward()
    assert torch.equal(acts.grad, torch.zeros_like(acts))


def test_reused_edges_backward_equals_the_dense_gather():
    """A tree passed in (refresh_every): value and gradient of its deaths, single and many clouds."""
    A = torch.from_numpy(S.make_activations("gaussian", 30, 12, seed=6))
    B = torch.from_numpy(S.make_activations("gaussian", 30, 12, seed=7))
    tree = correlation_deaths(A).edges
    b1, b2, b3 = (B.clone().requires_grad_(True) for _ in range(3))
    r1 = correlation_deaths(b1, edges=tree)
    r2 = td.correlation_deaths_many([b2], edges=[tree])[0]
    C = 1 - correlation(b3).abs()
    ref = torch.sort(C[tree[:, 0], tree[:, 1]]).values
    w = torch.linspace(1.0, 2.0, 11, dtype=torch.float64)
    for r, b in ((r1, b1), (r2, b2)):
        torch.testing.assert_close(r.deaths, ref.detach(), rtol=0, atol=1e-12)
        (w * r.deaths).sum().backward()
    (w * ref).sum().backward()
    torch.testing.assert_close(b1.grad, b3.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b2.grad, b3.grad, rtol=1e-9, atol=1e-12)
    # a tree for one cloud, none for the other: both backward
    b4, a4 = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    mixed = td.correlation_deaths_many([b4, a4], edges=[tree, None])
    (w * mixed[0].deaths).sum().backward()
    torch.testing.assert_close(b4.grad, b3.grad, rtol=1e-9, atol=1e-12)


def test_fused_reuses_given_edges():
    A = torch.from_numpy(S.make_activations("gaussian", 30, 12, seed=6))
    r = correlation_deaths(A)
    again = correlation_deaths(A, edges=r.edges.flip(0))
    # read off the product once, recomputed as row dot products when reused: equal up to rounding
    torch.testing.assert_close(again.deaths, r.deaths, rtol=0, atol=1e-14)
    assert S.edge_set(again.edges) == S.edge_set(r.edges)
    # stale edges: the deaths of those (now non-minimal) edges are recomputed from the new acts
    B = torch.from_numpy(S.make_activations("gaussian", 30, 12, seed=7))
    stale = correlation_deaths(B, edges=r.edges)
    C = 1 - correlation(B).abs()
    expected = torch.sort(C[r.edges[:, 0], r.edges[:, 1]]).values
    torch.testing.assert_close(stale.deaths, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="edges must have shape"):
        correlation_deaths(A, edges=r.edges[:-1])


@pytest.mark.slow
def test_fused_large_n_default_blocked_product(backend):
    """Large n, with the default product and with the blocked symmetric one, against giotto-ph."""
    A = torch.from_numpy(S.make_activations("lowrank", 48, 2100, seed=12))
    ref = _fused_large_reference()
    for block in (None, 512):
        res = correlation_deaths(A, backend=backend, gram_block=block)
        assert S.is_spanning_tree(res.edges.numpy(), 2100)
        np.testing.assert_allclose(res.deaths.numpy(), ref, rtol=1e-6, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _fused_large_reference():
    return S.giotto_deaths(S.abs_corr_dissimilarity(S.make_activations("lowrank", 48, 2100, seed=12)))


@pytest.mark.parametrize("block", [1, 5, 13, 64])
def test_fused_blocked_gram_matches(block):
    A = torch.from_numpy(S.make_activations("lowrank", 40, 37, seed=3))
    r0 = correlation_deaths(A)
    r1 = correlation_deaths(A, gram_block=block)
    assert torch.equal(r0.edges, r1.edges)
    torch.testing.assert_close(r0.deaths, r1.deaths, rtol=0, atol=1e-12)


def test_fused_autocast_bfloat16_gives_float32():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(64, 20, generator=g).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = correlation_deaths(acts)
    assert res.deaths.dtype == torch.float32
    ref = correlation_deaths(acts.detach().float())
    torch.testing.assert_close(res.deaths, ref.deaths, rtol=0, atol=1e-6)
    res.deaths.sum().backward()
    assert acts.grad.dtype == torch.bfloat16 and torch.isfinite(acts.grad.float()).all()


@pytest.mark.parametrize(
    "acts,exc,match",
    [
        (torch.zeros(5), ValueError, "batch, neurons"),
        (torch.zeros(1, 4), ValueError, "batch size 1"),
        (torch.zeros(4, 3, dtype=torch.long), TypeError, "floating-point"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), ValueError, "NaN or inf"),
    ],
    ids=["1-D", "batch-1", "integer", "nan"],
)
def test_fused_errors(acts, exc, match):
    with pytest.raises(exc, match=match):
        correlation_deaths(acts)


def test_fused_bad_kind_and_backend():
    acts = torch.randn(8, 4)
    with pytest.raises(ValueError, match="unknown dissimilarity kind 'cosine'"):
        correlation_deaths(acts, kind="cosine")
    with pytest.raises(ValueError, match="unknown backend"):
        correlation_deaths(acts, backend="gpu-magic")


# --------------------------------------------------------------------------- many trees in one call


def _layers(spec, dtype=torch.float64, seed=0):
    """(B, n) activations per layer; lowrank families give spread, generic correlations."""
    return [
        torch.from_numpy(S.make_activations("lowrank" if n > 2 else "gaussian", B, n, seed=seed + k)).to(dtype)
        for k, (B, n) in enumerate(spec)
    ]


# differing sample counts and sizes, two layers of equal shape (one bmm group on devices), n = 1 and 2
MANY = [(40, 12), (40, 12), (25, 1), (64, 2), (33, 30), (40, 7), (50, 64)]


def test_many_equals_single_in_edges_deaths_and_gradient(backend):
    acts_many = [a.requires_grad_(True) for a in _layers(MANY)]
    acts_one = [a.detach().clone().requires_grad_(True) for a in acts_many]
    many = td.correlation_deaths_many(acts_many, backend=backend)
    assert len(many) == len(MANY)
    total_many, total_one = 0.0, 0.0
    for (B, n), a1, r in zip(MANY, acts_one, many):
        one = correlation_deaths(a1, backend=backend)
        assert r.deaths.shape == (n - 1,) and r.edges.shape == (n - 1, 2)
        assert torch.equal(r.edges, one.edges), f"layer with n = {n}: same tree as the single call"
        assert torch.equal(r.deaths, one.deaths)
        if n > 2:  # independent reference: SciPy's MST of an independent NumPy 1 - |corr|
            ref = S.scipy_deaths(S.abs_corr_dissimilarity(a1.detach().numpy()))
            np.testing.assert_allclose(r.deaths.detach().numpy(), ref, rtol=0, atol=1e-9)
        w = torch.linspace(1.0, 2.0, max(n - 1, 1), dtype=torch.float64)[: n - 1]
        total_many = total_many + (w * r.deaths).sum()
        total_one = total_one + (w * one.deaths).sum()
    total_many.backward()
    total_one.backward()
    for a, b in zip(acts_many, acts_one):
        assert torch.equal(a.grad, b.grad), "the gradients equal the single-tree ones"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["abs", "sqrt"])
def test_many_gradcheck(kind):
    acts = [a.requires_grad_(True) for a in _layers([(9, 5), (7, 4)], seed=3)]

    def f(a, b):
        return torch.cat([r.deaths for r in td.correlation_deaths_many([a, b], kind=kind)])

    assert torch.autograd.gradcheck(f, tuple(acts))


def test_many_float32_and_dead_neurons(backend):
    acts = _layers([(48, 20), (30, 9)], dtype=torch.float32, seed=5)
    acts[1][:, 3] = 2.0  # a dead neuron: correlation 0 with every other one
    acts = [a.requires_grad_(True) for a in acts]
    many = td.correlation_deaths_many(acts, backend=backend)
    for a, r in zip(acts, many):
        one = correlation_deaths(a.detach(), backend=backend)
        assert torch.equal(r.edges, one.edges) and torch.equal(r.deaths, one.deaths)
    sum(r.deaths.sum() for r in many).backward()
    assert torch.isfinite(acts[1].grad).all() and torch.all(acts[1].grad[:, 3] == 0)


def test_many_reuses_given_edges_per_cloud():
    acts = _layers([(30, 10), (30, 8)], seed=7)
    first = td.correlation_deaths_many(acts)
    later = _layers([(30, 10), (30, 8)], seed=9)
    again = td.correlation_deaths_many(later, edges=[first[0].edges, None])
    assert torch.equal(again[0].deaths, correlation_deaths(later[0], edges=first[0].edges).deaths)
    assert torch.equal(again[1].edges, correlation_deaths(later[1]).edges)
    with pytest.raises(ValueError, match=r"edges\[1\] must have shape \(7, 2\)"):
        td.correlation_deaths_many(later, edges=[None, first[1].edges[:-1]])
    with pytest.raises(ValueError, match="one entry .* per cloud"):
        td.correlation_deaths_many(later, edges=[None])


def test_many_errors():
    with pytest.raises(ValueError, match="non-empty list"):
        td.correlation_deaths_many([])
    with pytest.raises(ValueError, match="non-empty list"):
        td.correlation_deaths_many(torch.randn(8, 3))
    with pytest.raises(ValueError, match="batch size 1"):
        td.correlation_deaths_many([torch.randn(8, 3), torch.randn(1, 3)])
    with pytest.raises(ValueError, match="unknown backend"):
        td.correlation_deaths_many([torch.randn(8, 3)], backend="nope")


def test_many_device_products_batch_equal_shapes_on_cpu():
    """The accelerator product path (one bmm per (n, R) group), run on CPU tensors."""
    from topodecorr.correlation import _bmm_rows

    zts = [normalize_activations(a)[0].T.contiguous() for a in _layers(MANY, seed=11)]
    for zt, P in zip(zts, _bmm_rows(zts)):
        np.testing.assert_allclose(P.numpy(), zt.numpy() @ zt.numpy().T, rtol=0, atol=1e-12)


def test_many_mixed_dtypes_keep_each_precision(backend):
    acts = _layers([(40, 15), (40, 15)], seed=13)
    acts[1] = acts[1].float()
    many = td.correlation_deaths_many(acts, backend=backend)
    for a, r in zip(acts, many):
        assert r.deaths.dtype == a.dtype
        assert torch.equal(r.edges, correlation_deaths(a, backend=backend).edges)


# --------------------------------------------------------------------------- the fused op (torch.library)


def test_op_passes_torch_library_opcheck():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(24, 6, generator=g, dtype=torch.float64)
    maps = torch.randn(3, 5, 2, 4, generator=g, dtype=torch.float64)
    one = torch.randn(9, 1, generator=g, dtype=torch.float64)
    args = ([rows, maps, one], [False, True, False], [None, None, None], "auto", 0)
    torch.library.opcheck(torch.ops.topodecorr.tree_correlations.default, args)


@pytest.mark.slow
def test_op_traces_under_torch_compile_without_a_graph_break():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(32, 7, generator=g, dtype=torch.float64)

    def t1_of(x):
        return td.t1(correlation_deaths(x).deaths)

    compiled = torch.compile(t1_of, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
    x1, x2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    v1, v2 = compiled(x1), t1_of(x2)
    v1.backward()
    v2.backward()
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-14)


def test_op_on_meta_tensors_gives_the_shapes():
    res = correlation_deaths(torch.empty(16, 9, device="meta"))
    assert res.deaths.device.type == "meta" and res.deaths.shape == (8,) and res.edges.shape == (8, 2)
    many = td.correlation_deaths_many([torch.empty(4, 6, 3, 3, device="meta"), torch.empty(5, 2, device="meta")],
                                      layouts=["channel", "rows"])
    assert [tuple(r.deaths.shape) for r in many] == [(5,), (1,)]


@pytest.mark.slow
def test_gradgradcheck_many_clouds_and_channel_layout():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def f(a, m):
        r = td.correlation_deaths_many([a, m], kind="sqrt", layouts=["rows", "channel"])
        return torch.cat([r[0].deaths, r[1].deaths])

    assert torch.autograd.gradcheck(f, (a, m))
    assert torch.autograd.gradgradcheck(f, (a, m))


@pytest.mark.parametrize("shape", [(4, 5, 3, 3), (6, 7, 5), (3, 4, 2, 2, 2)])
def test_channel_layout_equals_the_flattened_copy(shape):
    from topodecorr.functional import flatten_activation

    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    r1 = correlation_deaths(x1, layout="channel")
    r2 = correlation_deaths(flatten_activation(x2, "channel"))
    assert torch.equal(r1.edges, r2.edges)
    torch.testing.assert_close(r1.deaths, r2.deaths, rtol=0, atol=1e-14)
    w = torch.linspace(1.0, 2.0, r1.deaths.numel(), dtype=torch.float64)
    (w * r1.deaths).sum().backward()
    (w * r2.deaths).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-13)
    assert x1.grad.shape == x.shape


def test_backward_keeps_nothing_quadratic():
    """What the graph keeps for the backward is O(n B): no (n, n) matrix."""
    n, B = 60, 8
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t

    acts = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = correlation_deaths(acts)
    assert kept and max(kept) <= n * B < n * n
    res.deaths.sum().backward()
    assert torch.isfinite(acts.grad).all()


@pytest.mark.filterwarnings("error")  # the rescue paths warn about nothing else
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_neuron_gives_the_deaths_of_scale_one(dtype):
    """Correlation is scale-free: one 1e-40 (a float32 subnormal) in a column is that column at scale 1."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(64, 6, generator=g, dtype=dtype)
    tiny, unit = base.clone(), base.clone()
    tiny[:, 2] = 0.0
    unit[:, 2] = 0.0
    tiny[17, 2] = 1e-40 if dtype == torch.float32 else 1e-310
    unit[17, 2] = 1.0
    with pytest.warns(RuntimeWarning, match=r"1 neuron\(s\) have activations at a scale below"):
        rt = correlation_deaths(tiny)  # its gradient is not representable: said, and withheld
    ru = correlation_deaths(unit)
    assert torch.isfinite(rt.deaths).all()
    assert torch.equal(rt.edges, ru.edges)
    torch.testing.assert_close(rt.deaths, ru.deaths, rtol=0, atol=1e-5)
    torch.testing.assert_close(correlation(tiny), correlation(unit), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("error")  # the rescue paths warn about nothing
def test_large_offset_in_float32_stays_within_1e_4_of_float64():
    g = torch.Generator().manual_seed(7)
    x = (1e6 + torch.randn(256, 30, generator=g)) * torch.linspace(0.5, 2.0, 30)  # float32 data
    d32 = correlation_deaths(x).deaths
    d64 = correlation_deaths(x.double()).deaths  # the same numbers, computed in float64
    assert float((d32.double() - d64).abs().max()) < 1e-4
    assert float((correlation(x).double() - correlation(x.double())).abs().max()) < 1e-4


@pytest.mark.filterwarnings("error")  # the rescue paths warn about nothing
def test_huge_activations_do_not_overflow():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(50, 5, generator=g)
    big = x.clone()
    big[:, 1] *= 1e30  # squares overflow float32
    torch.testing.assert_close(correlation_deaths(big).deaths, correlation_deaths(x).deaths, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("error")  # the rescue paths warn about nothing
def test_first_sample_outlier_still_centred_accurately():
    """Shifted by an outlying first sample, the mean dominates the spread: those rows take the two-pass path."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4096, 12, generator=g)
    x[0, :6] = 1e4  # the shift: mean of x - x0 ~ -1e4, deviation ~ 160
    d32 = correlation_deaths(x).deaths
    d64 = correlation_deaths(x.double()).deaths
    assert float((d32.double() - d64).abs().max()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_op_on_cuda_equals_cpu_without_a_host_synchronisation():
    g = torch.Generator().manual_seed(10)
    a = torch.randn(256, 300, generator=g)
    maps = torch.randn(8, 40, 6, 6, generator=g)
    ref = correlation_deaths(a.requires_grad_(True))
    ref.deaths.sum().backward()
    x = a.detach().cuda().requires_grad_(True)
    m = maps.cuda().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        r = correlation_deaths(x, backend="boruvka")
        rm = td.correlation_deaths_many([m], layouts=["channel"])[0]
        (r.deaths.sum() + rm.deaths.sum()).backward()
        bad = correlation_deaths(torch.full((16, 5), float("nan"), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(r.deaths.cpu(), ref.deaths, rtol=0, atol=1e-5)
    assert S.edge_set(r.edges.cpu()) == S.edge_set(ref.edges)
    torch.testing.assert_close(x.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5)
    flat = correlation_deaths(maps.movedim(1, -1).reshape(-1, 40))
    torch.testing.assert_close(rm.deaths.cpu(), flat.deaths, rtol=0, atol=1e-5)
    assert bool(torch.isnan(bad.deaths).all()), "non-finite input: NaN deaths on accelerators, no error, no sync"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_neuron_gets_no_gradient_with_a_warning_and_the_others_exact(dtype):
    """Its gradient (1 / scale times that at scale 1) overflows: none for it, said once, never NaN."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(64, 6, generator=g, dtype=dtype)
    tiny, unit = base.clone(), base.clone()
    scale = 1e-40 if dtype == torch.float32 else 1e-310
    col = torch.randn(64, generator=g, dtype=dtype)
    tiny[:, 2], unit[:, 2] = col * scale, col
    grads = []
    for x in (tiny, unit):
        x = x.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            (1 - correlation_deaths(x).deaths).sum().backward()
        grads.append((x.grad, [str(w.message) for w in seen]))
    (gt, said), (gu, quiet) = grads
    assert torch.isfinite(gt).all()
    assert torch.equal(gt[:, 2], torch.zeros(64, dtype=dtype))
    assert not quiet and len(said) == 1 and "1 neuron(s) have activations at a scale below" in said[0]
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(gt[:, keep], gu[:, keep], rtol=1e-4, atol=1e-6)


def test_many_small_clouds_share_one_gather_and_sort_with_the_order_of_their_own():
    """Back-to-back products (the CPU's many-clouds layout): one gather and one sort for every tree give
    each tree's correlations in the order its own sort gives, ties included (duplicated neurons)."""
    import importlib

    from topodecorr._kernels import back_to_back, mst_edges_many

    fused = importlib.import_module("topodecorr._fused")
    corr_mod = importlib.import_module("topodecorr.correlation")

    g = torch.Generator().manual_seed(11)
    clouds = []
    for n in (5, 9, 2, 17, 9):
        x = torch.randn(40, n, generator=g)
        x[:, n // 2] = x[:, 0]  # a duplicate: |c| = 1 ties
        if n > 4:
            x[:, 1] = -x[:, 2]
        clouds.append(x)
    zts = [fused.normalise(x)[0] for x in clouds]
    prods = corr_mod.gram_rows(zts)
    assert back_to_back(prods)
    found = mst_edges_many(prods, abs_corr=True)
    batched = fused._edge_corr_many(prods, found)
    for P, e, (c, pairs) in zip(prods, found, batched):
        c1, pairs1 = fused._edge_corr(P, e)
        assert torch.equal(c, c1) and torch.equal(pairs, pairs1)


def test_clouds_sharing_a_row_count_across_layouts_equal_their_single_calls():
    """A channel map and row matrices with one row count are normalised (and back-propagated) as one
    buffer: edges, deaths and gradients equal those of each cloud on its own, exactly."""
    g = torch.Generator().manual_seed(12)
    maps = torch.randn(4, 6, 3, 5, generator=g)  # 60 positions x 6 channels
    rows = [torch.randn(60, n, generator=g) for n in (9, 4)]
    many_in = [maps.clone().requires_grad_(True)] + [r.clone().requires_grad_(True) for r in rows]
    one_in = [t.detach().clone().requires_grad_(True) for t in many_in]
    many = td.correlation_deaths_many(many_in, layouts=["channel", "rows", "rows"])
    ones = [correlation_deaths(one_in[0], layout="channel")] + [correlation_deaths(t) for t in one_in[1:]]
    for r, o in zip(many, ones):
        assert torch.equal(r.edges, o.edges) and torch.equal(r.deaths, o.deaths)
    sum((1 - r.deaths).sum() for r in many).backward()
    sum((1 - o.deaths).sum() for o in ones).backward()
    for a, b in zip(many_in, one_in):
        assert torch.equal(a.grad, b.grad)
