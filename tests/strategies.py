"""Hypothesis generators and independent references shared by the tests.

Imported as a plain module (``import strategies``): ``tests/conftest.py`` puts
this folder on ``sys.path``.

Generators
----------
Every matrix generator draws a family, a size and a seed, and builds the data
with a seeded NumPy generator, so a failing example is reproduced exactly from
the three numbers hypothesis prints. Families:

* ``"random"``: i.i.d. uniform dissimilarities (generic: no ties);
* ``"lowrank"``: ``1 - |corr|`` of activations driven by a few latent factors
  (strongly correlated clusters, like real layers);
* ``"quantised"``: dissimilarities rounded to a handful of levels (heavy ties);
* ``"duplicates"``: ``1 - |corr|`` of activations with repeated (and
  sign-flipped, rescaled) neurons, so some off-diagonal entries are exactly 0.

References
----------
Deaths from ``scipy.sparse.csgraph.minimum_spanning_tree`` (which treats
entries <= 1e-8 as missing edges, so an offset of 1 is added to every
off-diagonal weight and removed afterwards), from gudhi's and giotto-ph's
dimension-0 diagrams (which drop zero-length bars, so the diagram is padded
with zeros to n - 1 deaths), and a union-find spanning-tree check.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import strategies as st

# ``HYPOTHESIS_SCALE=20 make test`` multiplies every test's example count (a long soak run).
_SCALE = max(1, int(os.environ.get("HYPOTHESIS_SCALE", "1")))


def examples(k: int) -> int:
    """The number of hypothesis examples for a test: ``k`` times ``$HYPOTHESIS_SCALE``."""
    return k * _SCALE


FAMILIES = ("random", "lowrank", "quantised", "duplicates")
GENERIC_FAMILIES = ("random", "lowrank")  # no ties with probability 1

# --------------------------------------------------------------------------- builders


def _symmetrise(A: np.ndarray) -> np.ndarray:
    D = 0.5 * (A + A.T)
    np.fill_diagonal(D, 0.0)
    return D


def lowrank_activations(n: int, seed: int, batch: int = 32, rank: int = 3, noise: float = 0.3) -> np.ndarray:
    """Activations (batch, n) driven by ``rank`` latent factors plus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((batch, rank))
    mix = rng.standard_normal((rank, n))
    return latent @ mix + noise * rng.standard_normal((batch, n))


def duplicate_activations(n: int, seed: int, batch: int = 32) -> np.ndarray:
    """Activations (batch, n) in which many neurons repeat another one.

    Repeats are exact copies, negated copies and affine copies ``a * x + b``
    (all with correlation +-1), so ``1 - |corr|`` has zeros off the diagonal
    up to rounding.
    """
    rng = np.random.default_rng(seed)
    k = max(1, (n + 1) // 2)
    base = rng.standard_normal((batch, k))
    cols = []
    for c in range(n):
        src = base[:, rng.integers(k)] if c >= k else base[:, c]
        how = rng.integers(3) if c >= k else 0
        if how == 0:
            cols.append(src.copy())
        elif how == 1:
            cols.append(-src)
        else:
            cols.append(rng.uniform(0.5, 2.0) * src + rng.uniform(-1.0, 1.0))
    return np.stack(cols, axis=1)


def abs_corr_dissimilarity(acts: np.ndarray) -> np.ndarray:
    """``1 - |corr|`` in float64 with NumPy, exact zeros on the diagonal, clipped at 0."""
    C = np.corrcoef(acts, rowvar=False)
    C = np.atleast_2d(C)
    D = np.clip(1.0 - np.abs(C), 0.0, None)
    return _symmetrise(D)


def make_matrix(family: str, n: int, seed: int) -> np.ndarray:
    """A symmetric (n, n) float64 dissimilarity matrix with a zero diagonal."""
    rng = np.random.default_rng(seed)
    if family == "random":
        return _symmetrise(rng.random((n, n)))
    if family == "quantised":
        levels = rng.integers(1, 5)  # 1 to 4 distinct off-diagonal values: heavy ties
        return _symmetrise(np.round(rng.random((n, n)) * levels) / levels)
    if family == "lowrank":
        return abs_corr_dissimilarity(lowrank_activations(n, seed))
    if family == "duplicates":
        D = abs_corr_dissimilarity(duplicate_activations(n, seed))
        # rounding leaves duplicates at ~1e-16: make them exact zeros, as the issue asks
        D[D < 1e-12] = 0.0
        return D
    raise ValueError(f"unknown family {family!r}")


def planted_tree(n: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """A matrix whose unique MST is a random planted tree.

    Tree edges get distinct weights in [0.01, 0.2); every other pair gets a
    weight in [0.5, 1). Returns the matrix and the planted edge set ``{(i, j), i < j}``.
    """
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.5, 1.0, size=(n, n))
    D = _symmetrise(A)
    order = rng.permutation(n)
    edges = set()
    weights = rng.uniform(0.01, 0.2, size=max(n - 1, 0))
    for k in range(1, n):
        child = int(order[k])
        parent = int(order[rng.integers(k)])  # attach to a vertex already in the tree
        i, j = min(child, parent), max(child, parent)
        D[i, j] = D[j, i] = weights[k - 1]
        edges.add((i, j))
    return D, edges


# --------------------------------------------------------------------------- strategies


@st.composite
def matrices(draw, min_n: int = 1, max_n: int = 30, families=FAMILIES):
    """(family, n, seed, D): a symmetric float64 dissimilarity matrix of a drawn family."""
    family = draw(st.sampled_from(families))
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    return family, n, seed, make_matrix(family, n, seed)


@st.composite
def planted(draw, min_n: int = 2, max_n: int = 30):
    """(n, seed, D, planted_edges) from :func:`planted_tree`."""
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    D, edges = planted_tree(n, seed)
    return n, seed, D, edges


ACT_FAMILIES = ("gaussian", "lowrank", "dead", "duplicates")


def make_activations(family: str, batch: int, n: int, seed: int) -> np.ndarray:
    """Activations (batch, n) of a family; "dead" has constant (dead-ReLU) columns."""
    rng = np.random.default_rng(seed)
    if family == "gaussian":
        return rng.standard_normal((batch, n))
    if family == "lowrank":
        return lowrank_activations(n, seed, batch=batch)
    if family == "duplicates":
        return duplicate_activations(n, seed, batch=batch)
    if family == "dead":
        X = np.maximum(rng.standard_normal((batch, n)), 0.0)
        dead = rng.random(n) < 0.4
        X[:, dead] = rng.uniform(-1.0, 1.0, size=int(dead.sum()))  # constant per column
        return X
    raise ValueError(f"unknown activation family {family!r}")


@st.composite
def activations(draw, min_batch: int = 2, max_batch: int = 40, min_n: int = 1, max_n: int = 25, families=ACT_FAMILIES):
    """(family, seed, acts): a float64 array of shape (batch, n)."""
    family = draw(st.sampled_from(families))
    batch = draw(st.integers(min_batch, max_batch))
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    return family, seed, make_activations(family, batch, n, seed)


# --------------------------------------------------------------------------- references


def scipy_deaths(D: np.ndarray) -> np.ndarray:
    """Sorted MST weights from scipy, robust to zero and tiny weights (offset by 1)."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    n = D.shape[0]
    if n <= 1:
        return np.zeros(0)
    W = np.asarray(D, dtype=np.float64) + 1.0
    np.fill_diagonal(W, 0.0)
    T = minimum_spanning_tree(W).tocoo()
    assert T.nnz == n - 1, "scipy returned a forest: the offset must keep every edge present"
    return np.sort(T.data - 1.0)


def _pad_zeros(finite_deaths: np.ndarray, n: int) -> np.ndarray:
    d = np.sort(np.asarray(finite_deaths, dtype=np.float64))
    assert d.size <= n - 1
    return np.concatenate([np.zeros(n - 1 - d.size), d])


def gudhi_deaths(D: np.ndarray) -> np.ndarray:
    """Finite dimension-0 deaths of gudhi's Rips complex, padded with zeros to n - 1."""
    import gudhi

    n = D.shape[0]
    if n <= 1:
        return np.zeros(0)
    st_ = gudhi.RipsComplex(distance_matrix=D).create_simplex_tree(max_dimension=1)
    st_.compute_persistence()
    bars = st_.persistence_intervals_in_dimension(0)
    finite = bars[np.isfinite(bars[:, 1]), 1] if len(bars) else np.zeros(0)
    return _pad_zeros(finite, n)


def giotto_deaths(D: np.ndarray) -> np.ndarray:
    """Finite dimension-0 deaths of giotto-ph's ``ripser_parallel``, padded with zeros to n - 1."""
    from gph import ripser_parallel

    n = D.shape[0]
    if n <= 1:
        return np.zeros(0)
    dgm = ripser_parallel(D, metric="precomputed", maxdim=0, n_threads=1)["dgms"][0]
    finite = dgm[np.isfinite(dgm[:, 1]), 1]
    return _pad_zeros(finite, n)


def is_spanning_tree(edges, n: int) -> bool:
    """True when ``edges`` (n - 1 pairs of vertex ids in [0, n)) connect n vertices without a cycle."""
    edges = np.asarray(edges).reshape(-1, 2)
    if edges.shape[0] != max(n - 1, 0):
        return False
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges.tolist():
        if not (0 <= a < n and 0 <= b < n) or a == b:
            return False
        ra, rb = find(a), find(b)
        if ra == rb:
            return False
        parent[ra] = rb
    return True


def edge_set(edges) -> set[tuple[int, int]]:
    """Edges as a set of sorted pairs."""
    return {(min(a, b), max(a, b)) for a, b in np.asarray(edges).reshape(-1, 2).tolist()}
