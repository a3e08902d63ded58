"""Dense Prim's algorithm compiled with numba: the CPU kernel.

O(n^2) time, O(n) extra memory, one streaming read of each row of the
matrix in the order Prim's algorithm adds vertices (n^2 reads in all).

Layout of one step, after vertex ``u`` joined the tree:

1. *Update* (one vectorised loop over the full, contiguous row ``u``):
   ``key[k] = best(key[k], w(u, k))`` for every vertex ``k`` not in the tree,
   ``par[k] = u`` where the key strictly improved, and the running best of all
   keys is reduced in SIMD lanes in the same loop. Vertices already in the
   tree are masked with one OR / MAX per lane (``tm``), not skipped, so the
   loop has no branches and reads the row contiguously.
2. *Locate* the first vertex whose key equals that best: chunks of 64 keys
   are tested with a vectorised count, then one chunk is scanned.

The comparisons run on the IEEE-754 bit patterns as integers, which is exact
(no rounding, no fast-math) and vectorises in numba where a float argmin does
not: for ``|c|`` the bits ``b & 0x7fff...`` order like ``|c|``; for a weight
``w`` the map ``b ^ (0x7fff... if b < 0 else 0)`` orders like ``w`` (with
``-0.0`` just below ``+0.0``, a harmless refinement of a tie).

Ties are broken deterministically: the vertex added next is the one with the
smallest index among those with the best key, and its parent is the first
tree vertex (in order of addition) that attained that key.

Two modes share one driver: ``prim_min`` minimises the weights of ``W``;
``prim_abs_max`` maximises ``|C|`` of a correlation matrix ``C``, i.e.
minimises ``1 - |C|`` without materialising that matrix (same tree, and no
rounding of ``1 - |c|`` that could merge distinct correlations into a tie).

BENCHMARKS.md ("Kernels") compares this layout with the previous one
(remaining vertices compacted, rows gathered) and with one streaming pass
over the matrix.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["prim_min", "prim_abs_max", "prim_many"]

_MODE_MIN = 0
_MODE_ABS_MAX = 1

# per integer width: [low 31/63 bits, unused, most negative, most positive]
_C32 = np.array([0x7FFFFFFF, 31, -(2**31), 2**31 - 1], dtype=np.int32)
_C64 = np.array([0x7FFFFFFFFFFFFFFF, 63, -(2**63), 2**63 - 1], dtype=np.int64)

_CHUNK = 64  # keys tested per vectorised count while locating the best one


@njit(cache=True, nogil=True, boundscheck=False, inline="never")
def _update_abs_max(row, tm, key, par, u, low, lo):  # pragma: no cover - compiled
    """Maximise |row| into key (bits), record parent u, return the new max key."""
    zero = low - low
    ones = ~zero
    m = lo
    for k in range(key.shape[0]):
        x = (row[k] & low) | tm[k]  # |row[k]| bits, negative for tree vertices
        kk = key[k]
        p = par[k]
        sel = ones if x > kk else zero
        nk = max(x, kk)
        key[k] = nk
        par[k] = p ^ ((p ^ u) & sel)  # branch-free select, stored unconditionally
        m = max(m, nk)
    return m


@njit(cache=True, nogil=True, boundscheck=False, inline="never")
def _update_min(row, tm, key, par, u, low, hi):  # pragma: no cover - compiled
    """Minimise row (order-preserving bits) into key, record parent u, return the new min key."""
    zero = low - low
    ones = ~zero
    m = hi
    for k in range(key.shape[0]):
        x = row[k]
        x = max(x ^ (low if x < zero else zero), tm[k])  # tm = hi for tree vertices
        kk = key[k]
        p = par[k]
        sel = ones if x < kk else zero
        nk = min(x, kk)
        key[k] = nk
        par[k] = p ^ ((p ^ u) & sel)
        m = min(m, nk)
    return m


@njit(cache=True, nogil=True, boundscheck=False, inline="never")
def _count_equal(key, best):  # pragma: no cover - compiled
    c = 0
    for k in range(key.shape[0]):
        c += 1 if key[k] == best else 0
    return c


@njit(cache=True, nogil=True, boundscheck=False)
def _first_equal(key, best):  # pragma: no cover - compiled
    n = key.shape[0]
    s = 0
    while s + _CHUNK < n and _count_equal(key[s : s + _CHUNK], best) == 0:
        s += _CHUNK
    while key[s] != best:
        s += 1
    return s


@njit(cache=True, nogil=True, boundscheck=False)
def _prim(Wi, mode, consts):  # pragma: no cover - compiled
    """Prim's on the integer view ``Wi`` (n, n) of a float matrix; edges (n - 1, 2) int64."""
    n = Wi.shape[0]
    out = np.empty((max(n - 1, 0), 2), dtype=np.int64)
    if n <= 1:
        return out
    low = consts[0]
    lo = consts[2]
    hi = consts[3]
    # key and tm in one buffer, offset so that equal indices of the work arrays
    # do not share an address modulo 4 KiB (4K aliasing stalls loads behind stores)
    pad = 200
    buf = np.empty(2 * n + 3 * pad, dtype=Wi.dtype)
    key = buf[pad : pad + n]
    tm = buf[n + 2 * pad : 2 * n + 2 * pad]
    pbuf = np.zeros(n + pad, dtype=np.int32)
    par = pbuf[pad // 2 : pad // 2 + n]
    if mode == _MODE_ABS_MAX:
        tm[:] = 0
        mark = lo
    else:
        tm[:] = lo
        mark = hi
    tm[0] = mark
    key[:] = mark
    u = 0
    for it in range(n - 1):
        if mode == _MODE_ABS_MAX:
            best = _update_abs_max(Wi[u], tm, key, par, np.int32(u), low, lo)
        else:
            best = _update_min(Wi[u], tm, key, par, np.int32(u), low, hi)
        u = _first_equal(key, best)
        out[it, 0] = par[u]
        out[it, 1] = u
        tm[u] = mark
        key[u] = mark
    return out


def _bits(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    A = np.ascontiguousarray(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square (n, n) matrix, got shape {A.shape}")
    if A.dtype == np.float32:
        return A.view(np.int32), _C32
    if A.dtype == np.float64:
        return A.view(np.int64), _C64
    raise TypeError(f"expected a float32 or float64 matrix, got dtype {A.dtype}")


def prim_min(W: np.ndarray) -> np.ndarray:
    """MST edges minimising ``W``.

    Parameters
    ----------
    W : ndarray, shape (n, n), float32 or float64
        Weights; only the rows are read (row ``u`` gives the weights from ``u``),
        the diagonal is ignored.

    Returns
    -------
    ndarray, shape (n - 1, 2), int64
        ``(parent, child)`` in the order Prim's algorithm adds the children.
    """
    Wi, consts = _bits(W)
    return _prim(Wi, _MODE_MIN, consts)


def prim_abs_max(C: np.ndarray) -> np.ndarray:
    """MST edges minimising ``1 - |C|`` (equivalently maximising ``|C|``).

    Parameters and returns as in :func:`prim_min`.
    """
    Ci, consts = _bits(C)
    return _prim(Ci, _MODE_ABS_MAX, consts)


def _prim_many_body(flat, offsets, sizes, eoff, order, mode, consts):  # pragma: no cover - compiled
    """Prim's on each matrix of a batch, in parallel over the matrices in the ``parallel=True`` build.

    Matrix ``l`` is ``flat[offsets[l]: offsets[l] + n * n]`` viewed as (n, n),
    ``n = sizes[l]``; its ``n - 1`` edges go to ``out[eoff[l]: eoff[l + 1]]``.
    ``order`` lists the matrices largest first, so that the threads, handed one
    matrix at a time, finish together.
    """
    L = sizes.shape[0]
    out = np.empty((eoff[L], 2), dtype=np.int64)
    for t in prange(L):
        l = order[t]
        n = sizes[l]
        if n > 1:
            W = flat[offsets[l] : offsets[l] + n * n].reshape((n, n))
            out[eoff[l] : eoff[l + 1]] = _prim(W, mode, consts)
    return out


# one compiled call for all trees; the parallel build only when more than one thread is wanted:
# on one thread numba's pool would only add its wake-ups (and, with an OpenMP threading layer,
# spinning threads that slow torch's own ops down)
_prim_many_parallel = njit(cache=True, nogil=True, parallel=True)(_prim_many_body)
_prim_many_serial = njit(cache=True, nogil=True)(_prim_many_body)


def prim_many(mats: list[np.ndarray], abs_corr: bool, parallel: bool = True,
              flat: np.ndarray | None = None) -> list[np.ndarray]:
    """:func:`prim_abs_max` (``abs_corr``) or :func:`prim_min` of every matrix, in one parallel call.

    Parameters
    ----------
    mats : list of ndarray, shapes (n_l, n_l)
        One dtype for all (float32 or float64); copied once into one buffer.
    abs_corr : bool
    parallel : bool
        Spread the trees over numba's threads (``prange``); else one thread.
    flat : ndarray, optional
        The matrices already back to back in one 1-d array (no copy is made).

    Returns
    -------
    list of ndarray, shapes (n_l - 1, 2), int64
        Exactly the edges the single-matrix kernel gives, in its order.
    """
    if not mats:
        return []
    for A in mats:
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected square (n, n) matrices, got shape {A.shape}")
    dtypes = {A.dtype for A in mats}
    if len(dtypes) != 1:
        raise TypeError(f"all matrices must share one dtype, got {sorted(map(str, dtypes))}")
    sizes = np.array([A.shape[0] for A in mats], dtype=np.int64)
    offsets = np.zeros(len(mats) + 1, dtype=np.int64)
    np.cumsum(sizes * sizes, out=offsets[1:])
    eoff = np.zeros(len(mats) + 1, dtype=np.int64)
    np.cumsum(np.maximum(sizes - 1, 0), out=eoff[1:])
    if flat is None:
        flat = np.concatenate([A.reshape(-1) for A in mats])
    if flat.dtype == np.float32:
        bits, consts = flat.view(np.int32), _C32
    elif flat.dtype == np.float64:
        bits, consts = flat.view(np.int64), _C64
    else:
        raise TypeError(f"expected float32 or float64 matrices, got dtype {flat.dtype}")
    order = np.argsort(-sizes, kind="stable")
    kernel = _prim_many_parallel if parallel else _prim_many_serial
    out = kernel(bits, offsets[:-1], sizes, eoff, order, _MODE_ABS_MAX if abs_corr else _MODE_MIN, consts)
    return [out[eoff[l] : eoff[l + 1]] for l in range(len(mats))]


_ASYM_TILE = 256  # rows and columns per tile of the asymmetry pass (measured: 64 was 2x slower)


@njit(cache=True, nogil=True, boundscheck=False, fastmath={"nnan", "ninf", "nsz"}, inline="never")
def _tile_asymmetry(A, buf, i0, i1, j0, j1, asym):  # pragma: no cover - compiled
    """max(asym, |A[j, i] - buf[i - i0, j - j0]|) over the tile; buf holds A[i0:i1, j0:j1]."""
    h = i1 - i0
    for jj in range(j1 - j0):
        row = A[j0 + jj, i0:i1]  # a contiguous piece of the mirror row
        for ii in range(h):
            asym = max(asym, abs(row[ii] - buf[ii, jj]))
    return asym


@njit(cache=True, nogil=True, boundscheck=False)
def _max_asymmetry(A, tile):  # pragma: no cover - compiled
    """max |A[i, j] - A[j, i]| over a matrix known to be finite, tile by tile.

    For each tile on or above the diagonal, its rows are copied (contiguous
    reads) into a small buffer whose row stride is padded, so that its columns
    do not all fall into the same cache set; the mirror tile is then read row
    by row, contiguously, and compared with the buffer's columns. Each entry
    of the matrix is read once, in pieces of ``tile`` contiguous entries.
    """
    n = A.shape[0]
    buf = np.empty((tile, tile + 16), dtype=A.dtype)
    asym = A[0, 0] - A[0, 0]
    for i0 in range(0, n, tile):
        i1 = min(i0 + tile, n)
        for j0 in range(i0, n, tile):
            j1 = min(j0 + tile, n)
            for ii in range(i1 - i0):
                buf[ii, : j1 - j0] = A[i0 + ii, j0:j1]
            asym = _tile_asymmetry(A, buf, i0, i1, j0, j1, asym)
    return asym


def max_asymmetry(A: np.ndarray) -> float:
    """``max |A - A.T|`` of a square, finite float matrix in one tiled pass (:func:`_max_asymmetry`)."""
    return float(_max_asymmetry(np.ascontiguousarray(A), _ASYM_TILE))
