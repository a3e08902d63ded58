"""Benchmark of the MST-death kernels and the activations -> deaths -> T1 pipeline.

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/kernel.py                 # n = 256 ... 4096, 7 repeats
    .venv/bin/python benchmarks/kernel.py --quick         # n = 256, 1024; 3 repeats; no slow references
    .venv/bin/python benchmarks/kernel.py --sizes 1024 4096 --repeats 5
    .venv/bin/python benchmarks/kernel.py --counts        # launch proxy: ops and syncs per tree
    .venv/bin/python benchmarks/kernel.py --cuda-only     # the GPU rows only (benchmarks/cuda_session.sh)

What is timed, per number of neurons n (float32, B = 256 samples):

* ``floor``: one streaming pass over the (n, n) matrix (``D.sum()``), the
  memory-bound floor of any exact dense MST (it must read every entry once).
* MST kernels: the edges alone (``mst_edges``) and ``mst_deaths`` forward +
  backward (``deaths.sum().backward()``), per backend, with and without input
  validation; two alternative CPU layouts for comparison: the previous numba
  kernel (remaining vertices compacted, rows gathered) and, when a C++
  compiler is found, the current layout written in C++ (``g++ -O3 -march=native``,
  loaded with ctypes).
* References, on the same matrix: giotto-ph ``ripser_parallel`` (precomputed,
  maxdim 0, with generators; the engine the paper's code used; 1 thread, its
  default, and all threads), gudhi (``RipsComplex`` + dimension-0 persistence),
  ripser.py (``distance_matrix=True, maxdim=0``) and SciPy's
  ``minimum_spanning_tree``. These take seconds at n = 4096, so they run at
  most ``--slow-repeats`` times.
* The pipeline activations -> correlation -> deaths -> T1 -> backward: fused
  (``correlation_deaths``) and naive (``mst_deaths(dissimilarity(correlation(acts)))``),
  against the forward correlation alone (``correlation(acts)`` without grad) and
  the bare product ``Z^T Z``; the upper-triangle block product used by the
  fused path is timed for several block widths.
* On CUDA (if available): the Boruvka backend on the GPU, up to n = 16384:
  its edges against the CPU numba kernel's, a check that it and the fused
  pipeline never synchronise (``torch.cuda.set_sync_debug_mode("error")``),
  eager and ``torch.compile(mode="reduce-overhead")`` (one CUDA graph) times.
* ``--counts``: the launch proxy of the accelerator path (issue 20), on CPU
  tensors: non-view aten operations and host synchronisations per call of the
  Boruvka kernel (n = 1024, 4096, 16384), of the 17-layer many-trees call, and
  of the whole correlation -> deaths pipeline, counted by the torch profiler
  (:mod:`topodecorr._kernels.launches`), against the previous kernel; plus the
  CPU time of both kernels side by side. Counts depend on the shapes only.
  Results: ``benchmarks/out/kernel_counts.{json,csv,md}``; exit status 1 if
  the kernel misses its target (600 ops, 0 syncs per tree and per batch).

Fast candidates are timed interleaved (round-robin) so that the machine's
background load hits them alike; ratios are taken within one run. Results:
``benchmarks/out/kernel.{json,csv,md}``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Timer, machine_info, markdown_table, time_interleaved, write_results  # noqa: E402

import topodecorr as td  # noqa: E402
from topodecorr._kernels import matrix_stats, mst_edges, mst_edges_many  # noqa: E402
from topodecorr._kernels.boruvka import boruvka_edges  # noqa: E402
from topodecorr._kernels.launches import count_ops  # noqa: E402
from topodecorr.persistence import check_dissimilarity  # noqa: E402
from topodecorr.correlation import correlation_product  # noqa: E402

B = 256


# --------------------------------------------------------------------------- data


def make_acts(n: int, seed: int = 0) -> torch.Tensor:
    """(B, n) float32 activations: 16 shared factors plus noise, so correlations are spread."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(B, 16, generator=g)
    loadings = 0.5 * torch.randn(16, n, generator=g)
    return factors @ loadings + torch.randn(B, n, generator=g)


# --------------------------------------------------------------------------- alternative CPU kernels


def _compacted_prim():
    """The previous numba kernel: remaining vertices compacted, row entries gathered."""
    from numba import njit

    @njit(nogil=True, boundscheck=False)
    def prim(W):  # pragma: no cover - compiled
        n = W.shape[0]
        out = np.empty((max(n - 1, 0), 2), dtype=np.int64)
        if n <= 1:
            return out
        m = n - 1
        rem = np.empty(m, dtype=np.int64)
        key = np.empty(m, dtype=W.dtype)
        par = np.zeros(m, dtype=np.int64)
        for k in range(m):
            rem[k] = k + 1
            key[k] = W[0, k + 1]
        for it in range(n - 1):
            best = key[0]
            bi = 0
            for k in range(1, m):
                if key[k] < best:
                    best = key[k]
                    bi = k
            v = rem[bi]
            out[it, 0] = par[bi]
            out[it, 1] = v
            m -= 1
            rem[bi] = rem[m]
            key[bi] = key[m]
            par[bi] = par[m]
            row = W[v]
            for k in range(m):
                d = row[rem[k]]
                if d < key[k]:
                    key[k] = d
                    par[k] = v
        return out

    return prim


@functools.lru_cache(maxsize=None)
def _previous_matrix_stats():
    """The previous validation pass (before issue 9.5b), kept for the side-by-side timing.

    NumPy min and max, then 64 x 64 tiles whose mirror tile is transposed into a
    small buffer element by element before the comparison.
    """
    from numba import njit

    @njit(nogil=True, boundscheck=False, fastmath={"nnan", "ninf", "nsz"})
    def asym64(A, tile):  # pragma: no cover - compiled
        n = A.shape[0]
        buf = np.empty((tile, tile), dtype=A.dtype)
        asym = A[0, 0] - A[0, 0]
        for i0 in range(0, n, tile):
            i1 = min(i0 + tile, n)
            for j0 in range(i0, n, tile):
                j1 = min(j0 + tile, n)
                for j in range(j0, j1):
                    for i in range(i0, i1):
                        buf[i - i0, j - j0] = A[j, i]
                for i in range(i0, i1):
                    row = A[i, j0:j1]
                    b = buf[i - i0, : j1 - j0]
                    for k in range(j1 - j0):
                        asym = max(asym, abs(row[k] - b[k]))
        return asym

    def stats(A):
        lo, hi = float(A.min()), float(A.max())
        return np.isfinite(lo) and np.isfinite(hi), lo, hi, float(asym64(A, 64))

    return stats


_CPP_SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <vector>
// Same layout as the numba kernel (minimise weights given as order-preserving int bits):
// branch-free full-row update with fused min reduction, then locate the first best key.
extern "C" void prim_min_f32(const float* Wf, int64_t n, int64_t* out) {
    const int32_t* W = reinterpret_cast<const int32_t*>(Wf);
    const int32_t HI = 0x7fffffff, LOW = 0x7fffffff;
    std::vector<int32_t> key(n, HI), tm(n, INT32_MIN), par(n, 0);
    tm[0] = HI;
    int64_t u = 0;
    for (int64_t it = 0; it < n - 1; ++it) {
        const int32_t* row = W + u * n;
        int32_t* __restrict k_ = key.data();
        int32_t* __restrict p_ = par.data();
        const int32_t* __restrict t_ = tm.data();
        const int32_t uu = (int32_t)u;
        int32_t m = HI;
        for (int64_t k = 0; k < n; ++k) {
            int32_t x = row[k];
            x = x ^ (x < 0 ? LOW : 0);
            x = x > t_[k] ? x : t_[k];
            int32_t kk = k_[k];
            int32_t p = p_[k];
            int32_t nk = x < kk ? x : kk;
            p_[k] = x < kk ? uu : p;
            k_[k] = nk;
            m = nk < m ? nk : m;
        }
        int64_t s = 0;
        while (k_[s] != m) ++s;
        out[2 * it] = p_[s];
        out[2 * it + 1] = s;
        tm[s] = HI;
        key[s] = HI;
        u = s;
    }
}
"""


def _cpp_prim(build_dir: Path):
    """Compile the C++ variant with g++ if one is found; None otherwise."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler"
    src = build_dir / "prim.cpp"
    lib = build_dir / "prim.so"
    src.write_text(_CPP_SOURCE)
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17"]
    try:
        subprocess.run([cxx, *flags, str(src), "-o", str(lib)], check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"compile failed: {exc}"
    so = ctypes.CDLL(str(lib))
    so.prim_min_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    so.prim_min_f32.restype = None

    def prim(W: np.ndarray) -> np.ndarray:
        W = np.ascontiguousarray(W, dtype=np.float32)
        n = W.shape[0]
        out = np.empty((max(n - 1, 0), 2), dtype=np.int64)
        if n > 1:
            so.prim_min_f32(W.ctypes.data, n, out.ctypes.data)
        return out

    return prim, " ".join([Path(cxx).name, *flags[:2]])


# --------------------------------------------------------------------------- the previous Boruvka kernel


def previous_boruvka(W: torch.Tensor) -> torch.Tensor:
    """The Boruvka kernel before issue 20, kept for the side-by-side counts and timings.

    ceil(log2 n) rounds; each masks a temporary copy in row chunks, reduces per component
    in two stages, records edges through a cumulative sum, and flattens the hook forest
    with rounds + 1 doubling steps.
    """
    import math

    L, m = 1, W.shape[0]
    device = W.device
    half = W.detach()[None] * 0.5
    W = half + half.transpose(1, 2)
    del half
    chunk_rows = max(1, min(m, (1 << 26) // max(L * m, 1)))
    N = L * m
    arange = torch.arange(N, device=device)
    local = arange % m
    base = arange - local
    comp = arange.clone()
    out = torch.zeros((N, 2), dtype=torch.long, device=device)
    count = torch.zeros(L, dtype=torch.long, device=device)
    big = torch.iinfo(torch.long).max
    rounds = max(1, math.ceil(math.log2(m)))
    inf = torch.tensor(float("inf"), dtype=W.dtype, device=device)
    for _ in range(rounds):
        c2 = comp.view(L, m)
        vals = torch.empty((L, m), dtype=W.dtype, device=device)
        jmin = torch.empty((L, m), dtype=torch.long, device=device)
        for start in range(0, m, chunk_rows):
            stop = min(start + chunk_rows, m)
            v, j = torch.where(c2[:, start:stop, None] == c2[:, None, :], inf, W[:, start:stop]).min(dim=2)
            vals[:, start:stop] = v
            jmin[:, start:stop] = j
        vals, jmin = vals.reshape(N), jmin.reshape(N)
        cmin = torch.full((N,), float("inf"), dtype=W.dtype, device=device)
        cmin = cmin.scatter_reduce(0, comp, vals, reduce="amin", include_self=True)
        lo, hi = torch.minimum(local, jmin), torch.maximum(local, jmin)
        eid = base * m + lo * m + hi
        cand = torch.where((vals == cmin[comp]) & torch.isfinite(vals), eid, torch.full_like(eid, big))
        ceid = torch.full((N,), big, dtype=torch.long, device=device)
        ceid = ceid.scatter_reduce(0, comp, cand, reduce="amin", include_self=True)
        active = (comp == arange) & (ceid != big)
        safe_eid = torch.where(active, ceid, torch.zeros_like(ceid))
        g0 = (safe_eid // (m * m)) * m
        a, b = g0 + (safe_eid // m) % m, g0 + safe_eid % m
        ca = comp[a]
        target = torch.where(active, torch.where(ca == arange, comp[b], ca), arange)
        mutual = active & (target[target] == arange) & (target != arange)
        record = active & ~(mutual & (arange > target))
        rec = record.long().view(L, m)
        pos = (count[:, None] + torch.cumsum(rec, 1) - 1).reshape(N)
        pos = base + torch.where(record, pos, torch.full_like(pos, m - 1))
        out.index_put_((pos,), torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 1) - g0[:, None])
        count = count + rec.sum(1)
        parent = torch.where(mutual & (arange < target), arange, target)
        for _ in range(rounds + 1):
            parent = parent[parent]
        comp = parent[comp]
    return out.view(L, m, 2)[0, : m - 1]


# --------------------------------------------------------------------------- references


def ref_giotto(D: np.ndarray, threads: int):
    from gph import ripser_parallel

    return ripser_parallel(D, metric="precomputed", maxdim=0, return_generators=True, n_threads=threads)


def ref_gudhi(D: np.ndarray):
    import gudhi

    st = gudhi.RipsComplex(distance_matrix=D).create_simplex_tree(max_dimension=1)
    st.compute_persistence()
    return st.persistence_intervals_in_dimension(0)


def ref_ripser(D: np.ndarray):
    from ripser import ripser

    return ripser(D, distance_matrix=True, maxdim=0)


def ref_scipy(D: np.ndarray):
    from scipy.sparse.csgraph import minimum_spanning_tree

    return minimum_spanning_tree(D)


# --------------------------------------------------------------------------- measurements


def _fwd_bwd_mst(D: torch.Tensor, backend: str, validate: bool):
    Dl = D.detach().requires_grad_(True)

    def run():
        Dl.grad = None
        td.mst_deaths(Dl, backend=backend, validate=validate).deaths.sum().backward()

    return run


def _forward_mst(D: torch.Tensor, backend: str):
    def run():
        with torch.no_grad():
            td.mst_deaths(D, backend=backend, validate=False)

    return run


def _check_exact(D: torch.Tensor, results: dict[str, np.ndarray]) -> None:
    """All kernels give the same deaths multiset (exactness check before timing)."""
    Dn = D.numpy()
    ref = None
    for name, e in results.items():
        d = np.sort(Dn[e[:, 0], e[:, 1]])
        if ref is None:
            ref = (name, d)
        elif not np.array_equal(d, ref[1]):
            raise AssertionError(f"{name} deaths differ from {ref[0]}")


def bench_kernels(n: int, args, timer: Timer, extra_kernels: dict) -> list[dict]:
    acts = make_acts(n)
    with torch.no_grad():
        D = td.dissimilarity(td.correlation(acts)).contiguous()
    Dn = D.numpy()
    rows: list[dict] = []
    # exactness of every CPU kernel on this matrix
    checks = {"numba": mst_edges(D, backend="numba").numpy(), "boruvka": None}
    checks["boruvka"] = mst_edges(D, backend="boruvka").numpy() if n <= 2048 else checks["numba"]
    for name, fn in extra_kernels.items():
        checks[name] = fn(Dn)
    _check_exact(D, checks)
    prev_stats = _previous_matrix_stats()
    if prev_stats(Dn) != matrix_stats(D):
        raise AssertionError("the previous and the current validation pass disagree")

    fast = {
        "floor: D.sum() (torch)": lambda: D.sum(),
        "floor: one pass (numpy, 1 thread)": lambda: np.add.reduce(Dn, axis=None),
        "mst_edges numba": lambda: mst_edges(D, backend="numba"),
        "mst_deaths forward numba": _forward_mst(D, "numba"),
        "mst_deaths fwd+bwd numba": _fwd_bwd_mst(D, "numba", validate=False),
        "mst_deaths fwd+bwd numba, validate": _fwd_bwd_mst(D, "numba", validate=True),
        "validation: check_dissimilarity": lambda: check_dissimilarity(D),
        "validation: previous pass (64-tiles, element-wise transpose)": lambda: prev_stats(Dn),
    }
    for name, fn in extra_kernels.items():
        fast[f"variant: {name}"] = lambda fn=fn: fn(Dn)
    res = time_interleaved(fast, repeats=timer.repeats, warmup=timer.warmup)
    rows += [timer.row(k, v, n=n, group="kernel") for k, v in res.items()]

    slow_reps = args.slow_repeats
    slow = [("mst_deaths fwd+bwd boruvka (CPU)", _fwd_bwd_mst(D, "boruvka", validate=False), 4096)]
    if n <= 2048:
        slow.append(("mst_deaths fwd+bwd numpy", _fwd_bwd_mst(D, "numpy", validate=False), 2048))
    if not args.quick:
        slow += [
            ("giotto-ph ripser_parallel (1 thread)", lambda: ref_giotto(Dn, 1), 1 << 30),
            ("giotto-ph ripser_parallel (all threads)", lambda: ref_giotto(Dn, -1), 1 << 30),
            ("gudhi RipsComplex dim 0", lambda: ref_gudhi(Dn), args.max_slow_n),
            ("ripser.py maxdim 0", lambda: ref_ripser(Dn), args.max_slow_n),
            ("scipy minimum_spanning_tree", lambda: ref_scipy(Dn), args.max_slow_n),
        ]
    for name, fn, max_n in slow:
        if n > max_n:
            continue
        reps = timer.repeats if n <= 1024 else slow_reps
        times = time_interleaved({name: fn}, repeats=reps, warmup=1 if n <= 1024 else 0)[name]
        rows.append(timer.row(name, times, n=n, group="reference" if "numba" not in name else "kernel"))
    return rows


def bench_pipeline(n: int, args, timer: Timer, threads: int) -> list[dict]:
    acts0 = make_acts(n, seed=1)
    acts = acts0.clone().requires_grad_(True)
    z, _ = td.normalize_activations(acts0)
    z = z.contiguous()

    def fused():
        acts.grad = None
        td.t1(td.correlation_deaths(acts).deaths).backward()

    def fused_forward():
        with torch.no_grad():
            td.correlation_deaths(acts0)

    def naive():
        acts.grad = None
        td.t1(td.mst_deaths(td.dissimilarity(td.correlation(acts))).deaths).backward()

    def corr_forward():
        with torch.no_grad():
            td.correlation(acts0)

    fns = {
        "forward correlation(acts), no grad": corr_forward,
        "bare product Z^T Z": lambda: z.T @ z,
        "fused correlation_deaths -> T1, fwd+bwd": fused,
        "fused correlation_deaths, forward only": fused_forward,
        "naive dense mst_deaths(dissimilarity(correlation)) -> T1, fwd+bwd": naive,
    }
    res = time_interleaved(fns, repeats=timer.repeats, warmup=timer.warmup)
    rows = [timer.row(k, v, n=n, group="pipeline", threads=threads) for k, v in res.items()]
    # the symmetric product: full vs upper-triangle blocks (what gram_block chooses between)
    grams = {"gram: full Z^T Z": lambda: z.T @ z}
    for blk in (128, 256, 512, 1024, 2048):
        if blk < n:
            grams[f"gram: upper blocks of {blk}"] = lambda blk=blk: correlation_product(z, block=blk)
    res = time_interleaved(grams, repeats=timer.repeats, warmup=timer.warmup)
    rows += [timer.row(k, v, n=n, group="gram", threads=threads) for k, v in res.items()]
    return rows


MANY_LAYERS = [64, 96, 128, 128, 160, 192, 256, 256, 256, 320, 384, 384, 448, 512, 512, 512, 512]  # 17 layers


def bench_many(timer: Timer, threads: int, device: str = "cpu") -> list[dict]:
    """17 point clouds of 64 ... 512 neurons (B = 256): one correlation_deaths_many vs a loop, fwd + bwd."""
    acts = [make_acts(n, seed=k).to(device).requires_grad_(True) for k, n in enumerate(MANY_LAYERS)]
    for r, a in zip(td.correlation_deaths_many(acts), acts):  # same trees before timing
        if not torch.equal(r.edges, td.correlation_deaths(a).edges):
            raise AssertionError("correlation_deaths_many and the loop disagree")

    def clear():
        for a in acts:
            a.grad = None

    def batched():
        clear()
        sum(td.t1(r.deaths) for r in td.correlation_deaths_many(acts)).backward()

    def loop():
        clear()
        sum(td.t1(td.correlation_deaths(a).deaths) for a in acts).backward()

    def batched_fwd():
        with torch.no_grad():
            td.correlation_deaths_many(acts)

    def loop_fwd():
        with torch.no_grad():
            for a in acts:
                td.correlation_deaths(a)

    fns = {
        "many: correlation_deaths_many -> T1, fwd+bwd": batched,
        "many: loop of correlation_deaths -> T1, fwd+bwd": loop,
        "many: correlation_deaths_many, forward": batched_fwd,
        "many: loop of correlation_deaths, forward": loop_fwd,
    }
    t = Timer(timer.repeats, timer.warmup, device=device if device != "cpu" else None)
    return t.measure_many(fns, n=sum(MANY_LAYERS), group="many", threads=threads, device=device)


def _cuda_sync_free(fn) -> str:
    """Run ``fn`` once with CUDA's sync debug mode set to error: "ok" or what synchronised."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        return f"syncs: {str(exc).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return "ok"


def bench_cuda(sizes: list[int], timer: Timer, dev: str = "cuda", always=(4096, 16384)) -> list[dict]:
    """The Boruvka backend on the GPU: exactness, host synchronisations, eager and compiled times."""
    rows = []
    compiled = torch.compile(boruvka_edges, mode="reduce-overhead", fullgraph=True)
    for n in sorted(set(sizes) | set(always)):
        acts = make_acts(n).to(dev)
        with torch.no_grad():
            D = td.dissimilarity(td.correlation(acts)).contiguous()
        exact = _edge_set(mst_edges(D, backend="boruvka").cpu()) == _edge_set(mst_edges(D.cpu(), backend="numba"))
        tags = dict(n=n, group="cuda", exact_vs_numba=exact)
        tags["sync_free"] = _cuda_sync_free(lambda: mst_edges(D, backend="boruvka"))
        if n == max(always or sizes):  # the many-trees call too: padded batch, no sizes on the device
            mats = [D[:k, :k] for k in MANY_LAYERS]
            tags["many_sync_free"] = _cuda_sync_free(lambda: mst_edges_many(mats, backend="boruvka"))
        t = Timer(timer.repeats, 2, device=dev)
        rows.append(t.measure("cuda boruvka mst_edges", lambda: mst_edges(D, backend="boruvka"), **tags))
        try:  # one CUDA graph per shape; the first calls record it
            same = _edge_set(compiled(D).cpu()) == _edge_set(mst_edges(D, backend="boruvka").cpu())
            t3 = Timer(timer.repeats, 3, device=dev)
            rows.append(t3.measure("cuda boruvka, torch.compile reduce-overhead", lambda: compiled(D).clone(),
                                   n=n, group="cuda", same_edges_as_eager=same))
        except Exception as exc:  # noqa: BLE001 - recorded, the other measurements go on
            rows.append({"name": "cuda boruvka, torch.compile reduce-overhead", "n": n, "group": "cuda",
                         "median_ms": None, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"})
        rows.append(t.measure("cuda floor: D.sum()", lambda: D.sum(), n=n, group="cuda"))
        acts_g = acts.clone().requires_grad_(True)

        def fused():
            acts_g.grad = None
            td.t1(td.correlation_deaths(acts_g).deaths).backward()

        sync = _cuda_sync_free(fused)
        rows.append(t.measure("cuda fused correlation_deaths -> T1, fwd+bwd", fused, n=n, group="cuda", sync_free=sync))
    return rows


# --------------------------------------------------------------------------- launch proxy: operations and syncs


COUNT_SIZES = [1024, 4096, 16384]
OPS_TARGET = 600  # issue 20: at most 600 kernels and 0 host synchronisations per tree (and per batch)


def _count_row(name: str, n, fn, trees: int, **tags) -> dict:
    c = count_ops(fn, warmup=isinstance(n, str) or n <= 4096)  # counts depend on the shape only
    row = {"name": name, "n": n, "trees": trees, **c.as_dict(), "group": "counts", **tags}
    row["ops per tree"] = c.ops / trees
    top = list(c.by_name.items())[:6]
    row["most frequent"] = ", ".join(f"{k} {v}" for k, v in top)
    print(f"  {name}, n = {n}: {c.ops} ops ({c.top} top-level), {c.syncs} syncs", flush=True)
    return row


def _meta_ok(fn) -> str:
    """Run on meta tensors, where any read of data on the host raises."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"fails: {type(exc).__name__}"
    return "ok"


def bench_counts(sizes: list[int], previous_max_n: int) -> list[dict]:
    """Non-view aten operations and host synchronisations per call (torch profiler, CPU tensors)."""
    rows = []
    for n in sizes:
        W = torch.rand(n, n, generator=torch.Generator().manual_seed(n))
        W = W + W.T
        meta = _meta_ok(lambda: boruvka_edges(torch.empty(n, n, device="meta")))
        rows.append(_count_row("boruvka_edges", n, lambda: boruvka_edges(W), 1, meta=meta))
        rows.append(_count_row("mst_edges(abs_corr=True, backend='boruvka')", n,
                               lambda: mst_edges(W, abs_corr=True, backend="boruvka"), 1))
        if n <= previous_max_n:
            rows.append(_count_row("previous boruvka kernel", n, lambda: previous_boruvka(W), 1))
        acts = make_acts(n)
        meta = _meta_ok(lambda: td.correlation_deaths(torch.empty(B, n, device="meta"), backend="boruvka"))
        rows.append(_count_row("pipeline: correlation_deaths(backend='boruvka')", n,
                               lambda: td.correlation_deaths(acts, backend="boruvka"), 1, meta=meta))
        del W
    mats = [torch.rand(k, k, generator=torch.Generator().manual_seed(k)) for k in MANY_LAYERS]
    label = f"{len(MANY_LAYERS)} layers, {min(MANY_LAYERS)}-{max(MANY_LAYERS)}"
    meta_mats = [torch.empty(k, k, device="meta") for k in MANY_LAYERS]
    meta = _meta_ok(lambda: mst_edges_many(meta_mats, backend="boruvka"))
    rows.append(_count_row("many: mst_edges_many(backend='boruvka')", label,
                           lambda: mst_edges_many(mats, backend="boruvka"), len(mats), meta=meta))
    acts = [make_acts(k, seed=i) for i, k in enumerate(MANY_LAYERS)]
    meta_acts = [torch.empty(B, k, device="meta") for k in MANY_LAYERS]
    meta = _meta_ok(lambda: td.correlation_deaths_many(meta_acts, backend="boruvka"))
    rows.append(_count_row("many: pipeline correlation_deaths_many(backend='boruvka')", label,
                           lambda: td.correlation_deaths_many(acts, backend="boruvka"), len(acts), meta=meta))
    return rows


def bench_previous_boruvka(sizes: list[int], timer: Timer) -> list[dict]:
    """CPU wall time of the current and the previous Boruvka kernel, interleaved in one run."""
    rows = []
    for n in sizes:
        D = torch.rand(n, n, generator=torch.Generator().manual_seed(n))
        D = D + D.T
        if _edge_set(boruvka_edges(D)) != _edge_set(previous_boruvka(D)):
            raise AssertionError("the current and the previous Boruvka kernel disagree")
        fns = {
            "boruvka_edges (CPU)": lambda: boruvka_edges(D),
            "previous boruvka kernel (CPU)": lambda: previous_boruvka(D),
        }
        res = time_interleaved(fns, repeats=timer.repeats, warmup=timer.warmup)
        rows += [timer.row(k, v, n=n, group="boruvka cpu") for k, v in res.items()]
    return rows


def _edge_set(e: torch.Tensor) -> set:
    return {tuple(sorted(p)) for p in e.tolist()}


def counts_markdown(rows: list[dict]) -> str:
    g = [r for r in rows if r["group"] == "counts"]
    cols = ["name", "n", "trees", "ops", "ops per tree", "top", "syncs", "meta", "most frequent"]
    md = [
        "## Launch proxy: operations and host synchronisations per call (CPU tensors)",
        "",
        "`ops`: non-view aten operations at every nesting level (allocations and copies included: an upper "
        "bound on the kernel launches on an accelerator); `top`: those issued at top level; `syncs`: host "
        "reads of data (`.item()`, `nonzero`, ...); `meta`: the call on meta tensors (any other host read "
        f"raises there). Target (issue 20): at most {OPS_TARGET} ops and 0 syncs per tree and per batch. "
        "Counts depend on the shapes only, not on the data or the machine's load. The pipeline's syncs are its "
        "CPU-only input checks (a clear error for NaN/inf); `meta` ok shows its accelerator path reads nothing.",
        "",
        markdown_table(g, cols, floatfmt="{:.0f}"),
        "",
    ]
    t = [r for r in rows if r["group"] == "boruvka cpu"]
    if t:
        ratios = []
        for n in sorted({r["n"] for r in t}):
            new = _get(t, "boruvka_edges (CPU)", n)
            old = _get(t, "previous boruvka kernel (CPU)", n)
            ratios.append({"n": n, "current ms": new, "previous ms": old, "previous / current": old / new})
        md += ["## Boruvka on CPU tensors: current vs previous kernel (interleaved, same run)", "",
               markdown_table(ratios, ["n", "current ms", "previous ms", "previous / current"]), ""]
    return "\n".join(md)


# --------------------------------------------------------------------------- summary


def _get(rows, name, n, threads=None):
    for r in rows:
        if r["name"] == name and r["n"] == n and (threads is None or r.get("threads") == threads):
            return r["median_ms"]
    return None


def summarise(rows: list[dict], sizes: list[int], threads: list[int]) -> tuple[list[dict], str]:
    ratios = []
    for n, th in [(n, th) for th in threads for n in sizes]:
        floor = _get(rows, "floor: D.sum() (torch)", n)
        floor1 = _get(rows, "floor: one pass (numpy, 1 thread)", n)
        mst = _get(rows, "mst_edges numba", n)
        fb = _get(rows, "mst_deaths fwd+bwd numba", n)
        fwd = _get(rows, "mst_deaths forward numba", n)
        gph = _get(rows, "giotto-ph ripser_parallel (1 thread)", n)
        gphall = _get(rows, "giotto-ph ripser_parallel (all threads)", n)
        corr = _get(rows, "forward correlation(acts), no grad", n, th)
        prod = _get(rows, "bare product Z^T Z", n, th)
        fused = _get(rows, "fused correlation_deaths -> T1, fwd+bwd", n, th)
        naive = _get(rows, "naive dense mst_deaths(dissimilarity(correlation)) -> T1, fwd+bwd", n, th)
        compact = _get(rows, "variant: numba Prim, compacted gather (previous)", n)
        val = _get(rows, "validation: check_dissimilarity", n)
        val_prev = _get(rows, "validation: previous pass (64-tiles, element-wise transpose)", n)

        def ratio(a, b):
            return None if a is None or b is None else a / b

        ratios.append(
            {
                "n": n,
                "torch threads (pipeline)": th,
                "mst / floor (torch pass)": ratio(mst, floor),
                "mst / floor (1-thread pass)": ratio(mst, floor1),
                "mst fwd+bwd / floor": ratio(fb, floor),
                "previous kernel / mst": ratio(compact, mst),
                "validation / mst": ratio(val, mst),
                "previous validation / mst": ratio(val_prev, mst),
                "giotto-ph (1 thr) / mst_deaths fwd": ratio(gph, fwd),
                "giotto-ph (1 thr) / mst fwd+bwd": ratio(gph, fb),
                "giotto-ph (all thr) / mst fwd+bwd": ratio(gphall, fb),
                "fused fwd+bwd / product Z^T Z": ratio(fused, prod),
                "fused fwd+bwd / correlation() fwd": ratio(fused, corr),
                "naive fwd+bwd / product Z^T Z": ratio(naive, prod),
            }
        )
    cols = list(ratios[0]) if ratios else ["n"]
    md = ["## Ratios (medians, same run)", "", markdown_table(ratios, cols), ""]
    parts = [("kernel", None), ("reference", None), ("cuda", None)] + [("many", th) for th in threads]
    parts += [(grp, th) for th in threads for grp in ("pipeline", "gram")]
    for group, th in parts:
        g = [r for r in rows if r["group"] == group and (th is None or r.get("threads") == th)]
        if not g:
            continue
        names = list(dict.fromkeys(r["name"] for r in g))
        ns = sorted({r["n"] for r in g})
        table = []
        for name in names:
            row = {"median ms": name}
            for n in ns:
                row[f"n={n}"] = _get(g, name, n)
            table.append(row)
        title = f"{group}, torch threads = {th}" if th is not None else f"{group}, torch threads = 1"
        md += [f"## {title} (median ms)", "", markdown_table(table, ["median ms"] + [f"n={n}" for n in ns]), ""]
    checks = [r for r in rows if r["group"] == "cuda" and ({"exact_vs_numba", "sync_free", "error"} & set(r))]
    if checks:
        cols = ["name", "n", "exact_vs_numba", "sync_free", "many_sync_free", "same_edges_as_eager", "error"]
        md += ["## cuda checks", "", markdown_table(checks, cols), ""]
    return ratios, "\n".join(md)


def main_counts(args) -> int:
    timer = Timer(repeats=args.repeats, warmup=1)
    torch.set_num_threads(1)
    print("launch proxy ...", flush=True)
    rows = bench_counts(args.count_sizes, args.previous_max_n)
    rows += bench_previous_boruvka([n for n in args.count_sizes if n <= min(4096, args.previous_max_n)], timer)
    info = machine_info()
    head = [
        "# Boruvka launch proxy (generated by benchmarks/kernel.py --counts)",
        "",
        f"{info['date_utc']}; torch {info['torch_version']}, 1 thread, load average {info.get('load_average')}; "
        f"CPU tensors; timings: medians of {args.repeats}, interleaved.",
        "",
    ]
    md = "\n".join(head) + counts_markdown(rows)
    failing = [r for r in rows if r["group"] == "counts" and "pipeline" not in r["name"] and "previous" not in r["name"]
               and (r["ops"] / r["trees"] > OPS_TARGET or r["syncs"] or r.get("meta", "ok") != "ok")]
    settings = {"count_sizes": args.count_sizes, "ops_target": OPS_TARGET, "repeats": args.repeats}
    paths = write_results(args.name or "kernel_counts", rows, settings=settings, markdown=md)
    print(md)
    print("written:", ", ".join(str(p) for p in paths.values()))
    if failing:
        print("over target:", ", ".join(f"{r['name']} n={r['n']}" for r in failing))
    return 1 if failing else 0


def main_cuda(args) -> int:
    if not torch.cuda.is_available():
        print("--cuda-only: no CUDA device here", file=sys.stderr)
        return 2
    timer = Timer(repeats=args.repeats, warmup=1)
    rows = bench_many(timer, torch.get_num_threads(), device="cuda")
    rows += bench_cuda(args.sizes or [], timer)
    _, md = summarise(rows, [], [torch.get_num_threads()])
    info = machine_info()
    head = f"# Kernel benchmark on CUDA (benchmarks/kernel.py --cuda-only)\n\n{info['date_utc']}; {info.get('cuda')}\n\n"
    paths = write_results(args.name or "kernel_cuda", rows, settings=vars(args), markdown=head + md)
    print(head + md)
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="default 256 ... 4096 (--quick: 256, 1024)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--slow-repeats", type=int, default=3, help="repeats of the second-long references at n > 1024")
    p.add_argument("--max-slow-n", type=int, default=4096, help="largest n for gudhi, ripser.py and SciPy")
    p.add_argument("--quick", action="store_true", help="n = 256, 1024; 3 repeats; no external references")
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--many-only", action="store_true", help="only the many-trees comparison (17 layers, 64-512 neurons)")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch thread counts for the pipeline; kernels and references always run with 1",
    )
    p.add_argument("--name", default=None, help="results file stem under benchmarks/out/ (kernel, kernel_counts)")
    p.add_argument(
        "--counts",
        action="store_true",
        help="only the launch proxy: ops and syncs per tree (--count-sizes) and per batch, and the CPU time of "
        "the current vs the previous Boruvka kernel (n <= 4096)",
    )
    p.add_argument("--cuda-only", action="store_true", help="only the GPU measurements (--sizes, plus 4096, 16384)")
    p.add_argument("--count-sizes", type=int, nargs="+", default=COUNT_SIZES)
    p.add_argument("--previous-max-n", type=int, default=16384, help="largest n for the previous kernel's counts")
    args = p.parse_args(argv)
    if args.counts:
        return main_counts(args)
    if args.cuda_only:
        return main_cuda(args)
    args.name = args.name or "kernel"
    if args.sizes is None:
        args.sizes = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    if args.quick:
        args.repeats = 3
    timer = Timer(repeats=args.repeats, warmup=1)

    extra = {"numba Prim, compacted gather (previous)": _compacted_prim()}
    build = Path(tempfile.mkdtemp(prefix="topodecorr-bench-"))
    cpp, cpp_note = _cpp_prim(build)
    if cpp is not None:
        extra["C++ full-row (same layout)"] = cpp
    print(f"C++ variant: {cpp_note}", flush=True)

    rows: list[dict] = []
    default_threads = torch.get_num_threads()
    for th in args.threads:
        print(f"many trees, {th} torch threads ...", flush=True)
        torch.set_num_threads(th)
        rows += bench_many(timer, th)
    if torch.cuda.is_available():
        rows += bench_many(timer, default_threads, device="cuda")
    for n in [] if args.many_only else args.sizes:
        print(f"n = {n}: kernels ...", flush=True)
        torch.set_num_threads(1)  # the kernels are single-threaded: so are the floor and the references
        rows += bench_kernels(n, args, timer, extra)
        if not args.no_pipeline:
            for th in args.threads:
                print(f"n = {n}: pipeline, {th} torch threads ...", flush=True)
                torch.set_num_threads(th)
                rows += bench_pipeline(n, args, timer, th)
    torch.set_num_threads(default_threads)
    if torch.cuda.is_available() and not args.many_only:
        rows += bench_cuda(args.sizes, timer)
    shutil.rmtree(build, ignore_errors=True)

    ratios, md = summarise(rows, args.sizes, [1] if args.no_pipeline else args.threads)
    info = machine_info()
    head = [
        "# Kernel benchmark (generated by benchmarks/kernel.py)",
        "",
        f"{info['date_utc']}; {info['cpu']}, {info['cpu_count']} CPUs, load average {info.get('load_average')}; "
        f"torch {info['torch_version']} (kernels and references with 1 thread, pipeline with {args.threads}), numba {info['numba_version']}, "
        f"numpy {info['numpy_version']}; CUDA: {info.get('cuda') or 'not available (GPU path unmeasured)'}; "
        f"C++ variant: {cpp_note}. float32, B = {B}; medians of {args.repeats} "
        f"(second-long references: {args.slow_repeats} at n > 1024).",
        "",
    ]
    settings = {k: v for k, v in vars(args).items()}
    settings.update({"B": B, "dtype": "float32", "cpp_variant": cpp_note})
    paths = write_results(args.name, rows, settings=settings, extra={"ratios": ratios}, markdown="\n".join(head) + md)
    print("\n".join(head) + md)
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
