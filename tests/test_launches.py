"""The accelerator path measured without an accelerator (issue 20).

Operations and host synchronisations per tree are properties of the code
path, counted by the torch profiler on CPU tensors
(:mod:`topodecorr._kernels.launches`); ``torch.compile`` of the tree function
must trace it as one graph and give the compiled Prim kernel's edges.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import strategies as S
from topodecorr._kernels import mst_edges, mst_edges_many
from topodecorr._kernels.boruvka import boruvka_edges, boruvka_edges_batched
from topodecorr._kernels.launches import count_ops, is_view

OPS_TARGET = 600  # per tree and per batch of trees
MANY_LAYERS = [64, 96, 128, 128, 160, 192, 256, 256, 256, 320, 384, 384, 448, 512, 512, 512, 512]


def _sym(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    W = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return W + W.T


# --------------------------------------------------------------------------- the counter itself


def test_count_ops_separates_views_operations_and_syncs():
    x = torch.arange(12.0)

    def views_only():
        return x.view(3, 4).t()[1:].unsqueeze(0).reshape(1, 3, 3, 1)

    def copying_reshape():
        return x.view(3, 4).t().reshape(12)  # not contiguous: the reshape copies

    def three_ops():
        y = x * x  # one op
        return (y + x).neg_()  # two more (tensor operands: a Python scalar would add a conversion)

    def syncs():
        return float(x.sum()), x.nonzero(), bool((x > 3).any())

    assert count_ops(views_only).ops == 0
    assert count_ops(copying_reshape).by_name.get("copy_") == 1
    c = count_ops(three_ops)
    assert (c.ops, c.top, c.syncs) == (3, 3, 0), c.by_name
    c = count_ops(syncs)
    assert c.syncs == 3, c.by_name  # float(), nonzero, bool(): each once, however deep it dispatches
    assert is_view("as_strided") and is_view("split") and is_view("to")
    assert not is_view("copy_") and not is_view("index_select") and not is_view("no_such_operator")


# --------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("n", [64, 256] + [pytest.param(n, marks=pytest.mark.slow) for n in (1024, 4096)])
def test_boruvka_operations_per_tree_are_few_fixed_and_never_wait(n):
    W, C = _sym(n, 0), _sym(n, 1).double() - 1
    a = count_ops(lambda: boruvka_edges(W))
    b = count_ops(lambda: mst_edges(C, abs_corr=True, backend="boruvka"))
    assert a.syncs == 0 and b.syncs == 0, (a.by_name, b.by_name)
    assert a.ops <= OPS_TARGET and b.ops <= OPS_TARGET, (a.ops, b.ops)
    # the sequence depends on the shape only: other data (ties, float64) issues the same operations
    ties = torch.from_numpy(S.make_matrix("quantised", n, seed=2)).float()
    assert count_ops(lambda: boruvka_edges(ties)).by_name == a.by_name


@pytest.mark.slow
def test_many_trees_in_one_batch_stay_within_one_tree_budget():
    mats = [_sym(k, k) for k in MANY_LAYERS]
    c = count_ops(lambda: mst_edges_many(mats, backend="boruvka"))
    assert c.syncs == 0 and c.ops <= OPS_TARGET, (c.ops, c.by_name)
    one = count_ops(lambda: mst_edges(mats[-1], backend="boruvka"))
    assert c.ops < 2 * one.ops  # 17 trees cost less than two single calls


# --------------------------------------------------------------------------- compiled


def _needs_inductor():
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")


@pytest.mark.slow
def test_compiled_tree_function_is_one_graph_with_prims_edges():
    """``torch.compile(mode="reduce-overhead", fullgraph=True)``: no graph break, the compiled Prim's edges."""
    _needs_inductor()
    from topodecorr._kernels import numba_prim

    compiled = torch.compile(boruvka_edges, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):  # generic weights: the tree is unique
        W = _sym(12, seed, torch.float64)
        assert S.edge_set(compiled(W).numpy()) == S.edge_set(numba_prim.prim_min(W.numpy())), seed
    ties = torch.from_numpy(S.make_matrix("quantised", 12, seed=5))
    assert torch.equal(compiled(ties), boruvka_edges(ties))  # ties: the eager kernel's tree, slot for slot


@pytest.mark.slow
def test_compiled_batched_kernel_matches_eager():
    _needs_inductor()
    W = torch.stack([torch.from_numpy(S.make_matrix(f, 10, seed=3)) for f in S.FAMILIES])
    sizes = [10, 4, 7, 1]
    compiled = torch.compile(boruvka_edges_batched, fullgraph=True)
    got, ref = compiled(W, sizes), boruvka_edges_batched(W, sizes)
    for l, n in enumerate(sizes):
        assert torch.equal(got[l, : n - 1], ref[l, : n - 1]), l
        assert np.all(got[l, : n - 1].numpy() < n)
