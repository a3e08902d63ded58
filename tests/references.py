"""Independent per-cloud references for the pipeline tests: SciPy's MST on 1 - |corr| in float64.

The tree is found by ``scipy.sparse.csgraph.minimum_spanning_tree`` on a NumPy
float64 dissimilarity matrix (no topodecorr code), and the deaths are then read
off a plain torch correlation (centre, normalise, Z^T Z) at those edges, so the
value and its gradient come from formulas written out here.
"""

from __future__ import annotations

import numpy as np
import torch


def scipy_mst_edges(acts: np.ndarray, kind: str = "abs") -> np.ndarray:
    """(n - 1, 2) edges of SciPy's minimum spanning tree of the neurons (columns) of ``acts``."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    x = np.asarray(acts, dtype=np.float64)
    x = x - x.mean(0)
    norm = np.linalg.norm(x, axis=0)
    z = x / np.where(norm > 0, norm, 1.0)
    c = np.clip(z.T @ z, -1.0, 1.0)
    d = 1.0 - np.abs(c) if kind == "abs" else np.sqrt(1.0 - c**2)
    # SciPy reads 0 as "no edge": shift every weight by a constant (the MST does not change)
    tree = minimum_spanning_tree(np.triu(d + 1.0, 1)).tocoo()
    return np.stack([tree.row, tree.col], 1)


def torch_deaths(acts: torch.Tensor, edges: np.ndarray, kind: str = "abs") -> torch.Tensor:
    """Dissimilarities of ``acts``' neurons at ``edges``, with gradient (no dead columns assumed)."""
    x = acts.double()
    x = x - x.mean(0)
    z = x / x.norm(dim=0)
    c = z.T @ z
    e = torch.as_tensor(edges, dtype=torch.long)
    ce = c[e[:, 0], e[:, 1]]
    return 1.0 - ce.abs() if kind == "abs" else torch.sqrt(1.0 - ce**2)


def reference_penalty(clouds, penalty: str = "t1", alpha: float = 0.5, kind: str = "abs") -> torch.Tensor:
    """Sum over point clouds (each a (samples, neurons) tensor) of T1 or T2 of SciPy's MST deaths."""
    total = torch.zeros((), dtype=torch.float64)
    for a in clouds:
        d = torch_deaths(a, scipy_mst_edges(a.detach().double().numpy(), kind), kind)
        if penalty == "t1":
            total = total + (1.0 - d).sum()
        else:
            total = total + alpha * d.std(unbiased=False) - (1.0 - alpha) * d.mean()
    return total
