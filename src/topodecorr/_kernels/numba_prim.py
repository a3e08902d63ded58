"""Dense Prim's algorithm compiled with numba: the CPU kernel.

One pass over the rows of the matrix, O(n^2) time and O(n) extra memory.
Vertices not yet in the tree are kept in a compacted array so that each
step scans only the remaining ones (n^2 / 2 reads in total).

Two variants share one loop: ``prim_min`` minimises the weights of ``W``;
``prim_abs_max`` maximises ``|C|`` of a correlation matrix ``C``, i.e.
minimises ``1 - |C|`` without materialising that matrix.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, boundscheck=False)
def _prim(W, use_abs):  # pragma: no cover - compiled
    n = W.shape[0]
    out = np.empty((max(n - 1, 0), 2), dtype=np.int64)
    if n <= 1:
        return out
    m = n - 1
    # remaining vertices (compacted), their best key and the tree vertex it comes from
    rem = np.empty(m, dtype=np.int64)
    key = np.empty(m, dtype=W.dtype)
    par = np.zeros(m, dtype=np.int64)
    for k in range(m):
        rem[k] = k + 1
    v = 0
    row = W[0]
    for k in range(m):
        if use_abs:
            key[k] = -abs(row[k + 1])
        else:
            key[k] = row[k + 1]
    for it in range(n - 1):
        # argmin over the remaining keys; ties go to the first position
        best = key[0]
        bi = 0
        for k in range(1, m):
            if key[k] < best:
                best = key[k]
                bi = k
        v = rem[bi]
        out[it, 0] = par[bi]
        out[it, 1] = v
        # remove position bi by moving the last remaining vertex there
        m -= 1
        rem[bi] = rem[m]
        key[bi] = key[m]
        par[bi] = par[m]
        row = W[v]
        if use_abs:
            for k in range(m):
                d = -abs(row[rem[k]])
                if d < key[k]:
                    key[k] = d
                    par[k] = v
        else:
            for k in range(m):
                d = row[rem[k]]
                if d < key[k]:
                    key[k] = d
                    par[k] = v
    return out


def prim_min(W: np.ndarray) -> np.ndarray:
    """MST edges minimising ``W`` (shape (n, n), float32 or float64, C-contiguous)."""
    return _prim(np.ascontiguousarray(W), False)


def prim_abs_max(C: np.ndarray) -> np.ndarray:
    """MST edges minimising ``1 - |C|`` (equivalently maximising ``|C|``)."""
    return _prim(np.ascontiguousarray(C), True)
