"""Reference Prim's algorithm in NumPy: the oracle, and the fallback without numba.

O(n^2) time, n vectorised NumPy steps. Deterministic: among equal keys the
smallest vertex index is taken (``np.argmin`` returns the first minimum).
"""

from __future__ import annotations

import numpy as np


def prim_edges_numpy(W: np.ndarray) -> np.ndarray:
    """Minimum spanning tree edges of the complete graph with weights ``W``.

    Parameters
    ----------
    W : ndarray, shape (n, n)
        Symmetric weights; the diagonal is ignored.

    Returns
    -------
    ndarray of int64, shape (n - 1, 2)
        Edges ``(parent, child)`` in the order Prim's algorithm adds them.
    """
    n = W.shape[0]
    out = np.empty((max(n - 1, 0), 2), dtype=np.int64)
    if n <= 1:
        return out
    in_tree = np.zeros(n, dtype=bool)
    key = np.full(n, np.inf, dtype=np.float64)
    parent = np.zeros(n, dtype=np.int64)
    v = 0
    for it in range(n - 1):
        in_tree[v] = True
        row = W[v].astype(np.float64, copy=False)
        better = (row < key) & ~in_tree
        key[better] = row[better]
        parent[better] = v
        masked = np.where(in_tree, np.inf, key)
        v = int(np.argmin(masked))
        out[it, 0] = parent[v]
        out[it, 1] = v
    return out
