"""The MST kernel registry and each kernel on its own (edges only, no gradient).

Includes the guard that the compiled numba kernel is installed and is what
``backend="auto"`` really runs on the CPU: CI must not silently fall back to
the slow NumPy Prim's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies as S
import topodecorr._kernels as K
from topodecorr import correlation, correlation_deaths, mst_deaths
from topodecorr._kernels.boruvka import boruvka_edges
from topodecorr._kernels.reference import prim_edges_numpy


def _weight(D: np.ndarray, edges) -> float:
    e = np.asarray(edges).reshape(-1, 2)
    return float(D[e[:, 0], e[:, 1]].sum())


def _kruskal_ordered(D: np.ndarray) -> set[tuple[int, int]]:
    """Kruskal with the total order (weight, i, j): the unique tree under that order."""
    n = D.shape[0]
    pairs = sorted((D[i, j], i, j) for i in range(n) for j in range(i + 1, n))
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    out = set()
    for _, i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
            out.add((i, j))
    return out


# --------------------------------------------------------------------------- the guard


def test_numba_kernel_installed_and_chosen_by_auto():
    assert importlib.util.find_spec("numba") is not None, "numba must be installed for the tests (dev extra)"
    assert "numba" in K.available_backends()
    assert K.resolve_backend("auto", torch.device("cpu")).name == "numba"


def test_auto_really_runs_numba_on_cpu(monkeypatch):
    calls = []
    real = K.KERNELS["numba"]

    def spy(M, abs_corr):
        calls.append((tuple(M.shape), abs_corr))
        return real.run(M, abs_corr)

    monkeypatch.setitem(K.KERNELS, "numba", dataclasses.replace(real, run=spy))
    D = torch.from_numpy(S.make_matrix("random", 20, seed=0))
    mst_deaths(D)
    correlation_deaths(torch.randn(16, 9))
    assert calls == [((20, 20), False), ((9, 9), True)], "backend='auto' must use the compiled kernel on CPU"


def test_numba_kernel_is_compiled():
    from numba.core.registry import CPUDispatcher

    from topodecorr._kernels import numba_prim

    # the module holds njit dispatchers, and running the kernel compiles at least one
    numba_prim.prim_min(np.zeros((3, 3)))
    dispatchers = [v for v in vars(numba_prim).values() if isinstance(v, CPUDispatcher)]
    assert dispatchers, "numba_prim defines no compiled (njit) function"
    assert any(d.signatures for d in dispatchers)


# --------------------------------------------------------------------------- registry


def test_registry_contents():
    assert set(K.KERNELS) == {"numba", "numpy", "boruvka"}
    for name, k in K.KERNELS.items():
        assert k.name == name and k.description and callable(k.run)
    assert set(K.available_backends()) <= set(K.KERNELS)
    assert {"numpy", "boruvka"} <= set(K.available_backends())


def test_resolve_backend_auto_on_accelerator_is_boruvka():
    # no accelerator is needed to test the choice itself
    assert K.resolve_backend("auto", torch.device("cuda")).name == "boruvka"
    assert K.resolve_backend("boruvka", torch.device("cuda")).name == "boruvka"


def test_resolve_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*boruvka.*numba.*numpy"):
        K.resolve_backend("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on .*cpu.* but the matrix is on cuda"):
        K.resolve_backend("numba", torch.device("cuda"))
    with pytest.raises(ValueError, match="runs on .*cpu.* but the matrix is on cuda"):
        K.resolve_backend("numpy", torch.device("cuda"))
    off = dataclasses.replace(K.KERNELS["numba"], is_available=lambda: False)
    monkeypatch.setitem(K.KERNELS, "numba", off)
    with pytest.raises(RuntimeError, match="'numba' is not available"):
        K.resolve_backend("numba", torch.device("cpu"))


def test_fallback_without_numba_warns_once(monkeypatch):
    monkeypatch.setattr(K, "_numba_available", lambda: False)
    monkeypatch.setattr(K, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="numba is not installed"):
        k = K.resolve_backend("auto", torch.device("cpu"))
    assert k.name == "numpy"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.resolve_backend("auto", torch.device("cpu")).name == "numpy"  # no second warning


@pytest.mark.slow
def test_core_works_without_numba_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["numba"] = None  # as if numba were not installed
        import torch, topodecorr
        assert "numba" not in topodecorr.available_backends()
        D = torch.tensor([[0.0, 0.2, 0.9], [0.2, 0.0, 0.4], [0.9, 0.4, 0.0]])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            deaths, edges = topodecorr.mst_deaths(D)
        assert any("numba is not installed" in str(x.message) for x in w), w
        assert deaths.tolist() == [0.20000000298023224, 0.4000000059604645], deaths
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("parallel", [False, True])
def test_many_trees_leave_torch_thread_count_alone(parallel):
    """numba's OpenMP layer shares libgomp with torch: launching it set torch's thread count to
    numba's (a one-thread training process ran on two after its first per-layer penalty)."""
    pytest.importorskip("numba")
    code = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        import topodecorr._kernels as K
        K.PARALLEL_TREES = {parallel}
        a = torch.randn(256, 256)
        (a @ a).sum()  # torch's own OpenMP region first, as in training
        mats = [torch.rand(40, 40) for _ in range(3)]
        K.mst_edges_many([(m + m.T) / 2 for m in mats], abs_corr=True)
        print(torch.get_num_threads())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


# --------------------------------------------------------------------------- kernels against each other


@pytest.mark.parametrize("name", ["numba", "numpy", "boruvka"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_edges_min_weight(name, dtype):
    if name not in K.available_backends():
        pytest.skip(f"{name} not installed")
    for family in S.FAMILIES:
        D = S.make_matrix(family, 60, seed=1)
        M = torch.from_numpy(D).to(dtype)
        e = K.mst_edges(M, abs_corr=False, backend=name)
        assert e.dtype == torch.long and e.shape == (59, 2) and e.device == M.device
        assert S.is_spanning_tree(e.numpy(), 60)
        Dd = M.double().numpy()
        assert _weight(Dd, e) == pytest.approx(S.scipy_deaths(Dd).sum(), abs=1e-9)


@pytest.mark.parametrize("name", ["numba", "numpy", "boruvka"])
@given(case=S.activations(min_n=2, max_n=25))
@settings(max_examples=S.examples(25))
def test_kernel_abs_corr_mode(name, case):
    """abs_corr=True on C finds a minimum tree of 1 - |C| (computed implicitly)."""
    if name not in K.available_backends():
        pytest.skip(f"{name} not installed")
    family, seed, A = case
    C = correlation(torch.from_numpy(A))
    W = (1 - C.abs()).numpy()
    e_abs = K.mst_edges(C, abs_corr=True, backend=name)
    assert S.is_spanning_tree(e_abs.numpy(), C.shape[0])
    assert _weight(W, e_abs) == pytest.approx(S.scipy_deaths(W).sum(), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_general_weights_signs_zeros_and_magnitudes(dtype):
    """Kernels order weights exactly: negatives, -0.0 / +0.0, subnormals and huge values."""
    rng = np.random.default_rng(7)
    n = 40
    big = np.finfo(dtype).max / 4
    tiny = np.finfo(dtype).smallest_subnormal
    pool = np.array([-5.0, -1.0, -tiny, -0.0, 0.0, tiny, 1e-30, 0.5, 1.0, 3.0, big, -big], dtype=dtype)
    prob = np.full(pool.size, 0.003)
    prob[pool == big] = 0.97  # mostly huge, so the tree needs all kinds of weights
    prob /= prob.sum()
    A = rng.choice(pool, size=(n, n), p=prob) * rng.choice([1, 1, 1, 0.999], size=(n, n)).astype(dtype)
    W = np.triu(A, 1)
    W = W + W.T
    # the sorted multiset of MST weights is unique: compare it exactly (sums would overflow)
    ref = sorted(float(W[i, j]) for i, j in _kruskal_ordered(W.astype(np.float64)))
    assert ref[0] < 0 and ref[-1] > big / 2  # the tree mixes negative and huge weights
    for name in K.available_backends():
        e = K.mst_edges(torch.from_numpy(W), backend=name).numpy()
        assert S.is_spanning_tree(e, n), name
        assert sorted(float(W[i, j]) for i, j in e) == ref, name


def test_prim_variants_agree_on_generic_input():
    from topodecorr._kernels import numba_prim

    C = correlation(torch.from_numpy(S.make_activations("lowrank", 50, 80, seed=2))).numpy()
    W = 1.0 - np.abs(C)
    sets = [
        S.edge_set(numba_prim.prim_abs_max(C)),
        S.edge_set(numba_prim.prim_min(W)),
        S.edge_set(numba_prim.prim_min(W.astype(np.float32))),
        S.edge_set(prim_edges_numpy(W)),
        S.edge_set(boruvka_edges(torch.from_numpy(W)).numpy()),
    ]
    assert all(s == sets[0] for s in sets)


def test_kernels_accept_non_contiguous_input():
    D = S.make_matrix("random", 40, seed=4)
    big = np.zeros((80, 80))
    big[::2, ::2] = D
    view = torch.from_numpy(big)[::2, ::2]
    assert not view.is_contiguous()
    for name in K.available_backends():
        e = K.mst_edges(view, backend=name)
        assert S.edge_set(e.numpy()) == S.edge_set(prim_edges_numpy(D)), name


def test_reference_prim_order_and_weights():
    D = S.make_matrix("random", 30, seed=5)
    e = prim_edges_numpy(D)
    # Prim's grows one tree from vertex 0: every edge's parent is already in the tree
    seen = {0}
    for p, c in e.tolist():
        assert p in seen and c not in seen
        seen.add(c)
    assert _weight(D, e) == pytest.approx(S.scipy_deaths(D).sum(), abs=1e-12)


# --------------------------------------------------------------------------- Boruvka specifics


@given(S.matrices(min_n=1, max_n=30))
@settings(max_examples=S.examples(40))
def test_boruvka_is_kruskal_under_its_total_order(case):
    """With ties broken by (weight, i, j), as documented, the tree is unique: Kruskal's."""
    family, n, seed, D = case
    e = boruvka_edges(torch.from_numpy(D))
    assert S.edge_set(e.numpy()) == _kruskal_ordered(D)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_boruvka_chunking_does_not_change_edges(chunk_rows):
    for family in S.FAMILIES:
        D = torch.from_numpy(S.make_matrix(family, 30, seed=6))
        ref = boruvka_edges(D)
        got = boruvka_edges(D, chunk_rows=chunk_rows)
        assert torch.equal(got, ref), family


@pytest.mark.slow
def test_boruvka_rounding_asymmetry_still_a_tree():
    """Regression: one-ulp asymmetry plus ties made Boruvka close cycles (or index out of range)."""
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        n = 3 + trial % 20
        W = torch.full((n, n), 0.5) + 3e-8 * torch.randint(0, 3, (n, n), generator=g).float()
        W.fill_diagonal_(0.0)
        e = boruvka_edges(W)
        assert S.is_spanning_tree(e.numpy(), n)
        assert S.edge_set(e.numpy()) == _kruskal_ordered((0.5 * W + 0.5 * W.T).double().numpy())


def test_boruvka_cycle_of_asymmetric_preferences():
    # float32, symmetric within rounding; vertex 0 prefers 2 (row 0), 2 prefers 1 (row 2),
    # and 1 sees all its edges equal: the pre-fix kernel returned the cycle 0-2, 0-1, 1-2
    k = torch.tensor([[0, 2, 0, 2], [2, 0, 2, 2], [2, 0, 0, 0], [2, 2, 2, 0]], dtype=torch.float32)
    W = 0.5 + 3e-8 * k
    W.fill_diagonal_(0.0)
    e = boruvka_edges(W)
    assert S.is_spanning_tree(e.numpy(), 4), e.tolist()


def test_boruvka_does_not_modify_input():
    W = torch.from_numpy(S.make_matrix("random", 20, seed=3))
    W[0, 1] += 1e-9  # slightly asymmetric
    before = W.clone()
    boruvka_edges(W)
    assert torch.equal(W, before)


def test_boruvka_power_of_two_and_odd_sizes():
    for n in [1, 2, 3, 4, 5, 8, 16, 17, 31, 32, 33, 64, 65]:
        D = S.make_matrix("random", n, seed=n)
        e = boruvka_edges(torch.from_numpy(D))
        assert e.shape == (max(n - 1, 0), 2)
        assert S.edge_set(e.numpy()) == _kruskal_ordered(D), n



def _levels(n: int) -> np.ndarray:
    """w(i, j) = bit length of i ^ j: every Boruvka round merges exactly pairs of blocks (log2 n rounds needed)."""
    i = np.arange(n)
    x = i[:, None] ^ i[None, :]
    return np.where(x > 0, np.floor(np.log2(np.maximum(x, 1))) + 1, 0.0)


def _falling_path(n: int) -> np.ndarray:
    """A path 0 - 1 - ... - n-1 with falling weights, all other edges heavy: one hook chain of length n - 1."""
    W = np.full((n, n), 10.0)
    for i in range(n - 1):
        W[i, i + 1] = W[i + 1, i] = 1.0 - i / n
    np.fill_diagonal(W, 0.0)
    return W


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 31, 32, 33, 64, 100])
def test_boruvka_worst_case_rounds_and_hook_chains(n):
    """Round count and pointer-jumping depth are fixed by n alone: check them where they are tight.

    ``_levels`` needs every one of the floor(log2 n) rounds (components exactly halve, heavy ties);
    ``_falling_path`` makes one hook chain through all n vertices in the first round.
    """
    from topodecorr._kernels.boruvka import boruvka_rounds

    assert boruvka_rounds(n) == int(np.floor(np.log2(n)))
    for W in (_levels(n), _falling_path(n), _falling_path(n)[::-1, ::-1].copy()):
        e = boruvka_edges(torch.from_numpy(W))
        assert S.edge_set(e.numpy()) == _kruskal_ordered(W), n


def test_boruvka_batched_matches_single_kruskal_and_prim():
    """Many graphs of different sizes in one padded call: each tree is the single call's, exactly.

    Heavy ties included (quantised, duplicates, levels): the edges are Kruskal's under (weight, i, j),
    the deaths equal the Prim kernel's exactly and SciPy's up to its offset's rounding.
    """
    from topodecorr._kernels import numba_prim
    from topodecorr._kernels.boruvka import boruvka_edges_batched

    mats = [S.make_matrix(f, n, seed=n) for f, n in [("quantised", 17), ("duplicates", 40), ("random", 2),
                                                       ("lowrank", 33), ("quantised", 1), ("duplicates", 9)]]
    mats.append(_levels(24))
    m = max(D.shape[0] for D in mats)
    W = torch.full((len(mats), m, m), -7.0, dtype=torch.float64)  # padding: must never be read
    for l, D in enumerate(mats):
        W[l, : len(D), : len(D)] = torch.from_numpy(D)
    out = boruvka_edges_batched(W, [len(D) for D in mats])
    assert out.shape == (len(mats), m - 1, 2)
    for l, D in enumerate(mats):
        n = len(D)
        e = out[l, : n - 1]
        assert torch.equal(e, boruvka_edges(torch.from_numpy(D))), l  # same slots, same order
        assert S.edge_set(e.numpy()) == _kruskal_ordered(D), l
        en = e.numpy()
        deaths = np.sort(D[en[:, 0], en[:, 1]])
        prim = numba_prim.prim_min(D)
        assert np.array_equal(deaths, np.sort(D[prim[:, 0], prim[:, 1]])), l
        np.testing.assert_allclose(deaths, np.sort(S.scipy_deaths(D)), rtol=0, atol=1e-12)  # SciPy's offset of 1


@given(st.lists(S.matrices(min_n=1, max_n=16), min_size=1, max_size=5))
@settings(max_examples=S.examples(25))
def test_boruvka_batched_is_kruskal_for_every_graph(cases):
    """Any mix of sizes and families (ties included) in one padded call: every tree is Kruskal's."""
    from topodecorr._kernels.boruvka import boruvka_edges_batched

    mats = [D for _, _, _, D in cases]
    m = max(len(D) for D in mats)
    W = torch.zeros((len(mats), m, m), dtype=torch.float64)
    for l, D in enumerate(mats):
        W[l, : len(D), : len(D)] = torch.from_numpy(D)
    out = boruvka_edges_batched(W, [len(D) for D in mats])
    for l, D in enumerate(mats):
        assert S.edge_set(out[l, : len(D) - 1].numpy()) == _kruskal_ordered(D), l


def test_boruvka_gradient_is_that_of_the_ordered_tree():
    """Ties: the gradient of the deaths is fixed by the (weight, i, j) order, not by the schedule."""
    for family in ("quantised", "duplicates"):
        D = torch.from_numpy(S.make_matrix(family, 30, seed=8)).requires_grad_(True)
        mst_deaths(D, backend="boruvka", validate=False).deaths.sum().backward()
        expected = torch.zeros_like(D)
        for i, j in _kruskal_ordered(D.detach().numpy()):
            expected[i, j] = expected[j, i] = 0.5  # each death is (D[i, j] + D[j, i]) / 2
        assert torch.equal(D.grad, expected), family


def test_boruvka_batches_beyond_the_key_range_in_slices(monkeypatch):
    from topodecorr._kernels import boruvka

    W = torch.from_numpy(np.stack([S.make_matrix("quantised", 20, seed=s) for s in range(5)]))
    sizes = [20, 7, 20, 3, 12]
    ref = boruvka.boruvka_edges_batched(W, sizes)
    monkeypatch.setattr(boruvka, "_MAX_VERTICES", 50)  # 2 graphs of 20 per slice
    got = boruvka.boruvka_edges_batched(W, sizes)
    for l, n in enumerate(sizes):
        assert torch.equal(got[l, : n - 1], ref[l, : n - 1])


# --------------------------------------------------------------------------- device residency without a GPU


def test_accelerator_path_stays_on_device_without_host_reads():
    """On a non-CPU device, ``auto`` picks Boruvka and the whole forward and backward stay there.

    The "meta" device holds no data: any copy to the host, ``.item()``, ``bool(tensor)``
    or ``.numpy()`` on the way would raise, so this checks the no-synchronisation
    design of the GPU path on a machine without a GPU.
    """
    from topodecorr import t1

    D = torch.rand(64, 64, device="meta", requires_grad=True)
    res = mst_deaths(D, validate=False)
    assert res.deaths.device.type == "meta" and res.edges.device.type == "meta"
    assert res.deaths.shape == (63,) and res.edges.shape == (63, 2)
    t1(res.deaths).backward()
    assert D.grad.device.type == "meta"
    assert K.mst_edges(D.detach(), abs_corr=True).device.type == "meta"
    many = K.mst_edges_many([torch.rand(k, k, device="meta") for k in (5, 64, 30)], abs_corr=True)
    assert [tuple(e.shape) for e in many] == [(4, 2), (63, 2), (29, 2)]
    assert all(e.device.type == "meta" for e in many)


def test_boruvka_makes_no_data_dependent_host_reads():
    """Under FakeTensorMode every data-dependent host read raises; Boruvka must make none."""
    fake = pytest.importorskip("torch._subclasses.fake_tensor")
    from topodecorr._kernels.boruvka import boruvka_edges_batched

    with fake.FakeTensorMode():
        W = torch.rand(40, 40)
        e = boruvka_edges(W)
        assert e.shape == (39, 2)
        assert boruvka_edges_batched(torch.rand(3, 40, 40), [40, 9, 1]).shape == (3, 39, 2)
        res = mst_deaths(W, backend="boruvka", validate=False)
        assert res.deaths.shape == (39,)


# --------------------------------------------------------------------------- validation statistics


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 65, 200, 257, 520])
def test_matrix_stats_compiled_and_torch_agree_with_numpy(monkeypatch, dtype, n):
    rng = np.random.default_rng(n)
    A = rng.standard_normal((n, n)).astype(dtype)
    A = A + A.T
    i, j = rng.integers(0, n, 2)
    A[i, j] += 0.25  # one asymmetric entry (none when i == j)
    ref = (True, float(A.min()), float(A.max()), float(np.abs(A - A.T).max()))
    compiled = K.matrix_stats(torch.from_numpy(A))
    monkeypatch.setattr(K, "_numba_available", lambda: False)
    fallback = K.matrix_stats(torch.from_numpy(A))
    for got in (compiled, fallback):
        assert got[0] is True
        np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-6 if dtype == np.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("where", [(69, 3), (0, 0), (35, 36), (69, 69)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_matrix_stats_reports_non_finite(monkeypatch, bad, where):
    A = np.random.default_rng(1).standard_normal((70, 70)).astype(np.float32)
    A[where] = bad
    assert K.matrix_stats(torch.from_numpy(A))[0] is False
    monkeypatch.setattr(K, "_numba_available", lambda: False)
    assert K.matrix_stats(torch.from_numpy(A))[0] is False


@pytest.mark.parametrize("n", [255, 256, 257, 600])
def test_asymmetry_pass_sees_every_entry(n):
    """One asymmetric pair at a time, on and off the tile boundaries (tiles of 256): always found exactly."""
    from topodecorr._kernels import numba_prim

    rng = np.random.default_rng(n)
    A = rng.random((n, n))
    A = A + A.T
    spots = [(0, n - 1), (n - 1, 0), (255 % n, 256 % n), (n - 1, n - 2), (n // 2, n // 3), (1, 0)]
    for i, j in spots:
        if i == j:
            continue
        B = A.copy()
        B[i, j] += 1e-3 * (1 + i)
        assert numba_prim._max_asymmetry(B, numba_prim._ASYM_TILE) == np.abs(B - B.T).max() > 0
    assert numba_prim._max_asymmetry(A, numba_prim._ASYM_TILE) == 0.0
