"""Neuron sampling: the paper's importance rule, fixed counts, seeded random draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from topodecorr.sampling import select_neurons


def test_importance_keeps_floor_p_units_by_mean_abs_activation_and_output_whole():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 200, generator=g) * torch.linspace(0.1, 3.0, 200)
    out = torch.randn(50, 10, generator=g)
    sel = select_neurons([hidden, out], [False, True], "importance", fraction=0.05)
    k = math.floor(0.05 * 200)
    score = hidden.abs().mean(0).numpy()
    expected = np.sort(np.argsort(-score)[:k])
    assert sel[1] is None
    assert sel[0].tolist() == expected.tolist()


def test_importance_keeps_at_least_one_neuron_per_layer():
    a = torch.randn(8, 30)
    (idx,) = select_neurons([a], [False], "importance", fraction=0.005)
    assert idx.numel() == 1 and int(idx) == int(a.abs().mean(0).argmax())


def test_all_and_fraction_one_keep_everything():
    a = torch.randn(8, 5)
    assert select_neurons([a, a], [False, True], "all") == [None, None]
    assert select_neurons([a], [False], "importance", fraction=1.0) == [None]


def test_fixed_count_is_top_count_and_clipped_to_layer_size():
    a = torch.tensor([[1.0, -4.0, 0.5, 3.0]]).repeat(3, 1)
    assert select_neurons([a], [False], "fixed", count=2)[0].tolist() == [1, 3]
    assert select_neurons([a], [False], "fixed", count=10) == [None]


def test_random_is_seeded_sorted_and_distinct():
    a = torch.randn(4, 100)
    s1 = select_neurons([a], [False], "random", count=20, generator=torch.Generator().manual_seed(3))[0]
    s2 = select_neurons([a], [False], "random", count=20, generator=torch.Generator().manual_seed(3))[0]
    s3 = select_neurons([a], [False], "random", count=20, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert s1.unique().numel() == 20 and torch.equal(s1, s1.sort().values)


def test_random_draws_are_uniform():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 10)
    counts = torch.zeros(10)
    for _ in range(2000):
        counts[select_neurons([a], [False], "random", count=3, generator=g)[0]] += 1
    # each unit chosen with probability 3/10: 600 expected, sd ~ 20
    assert (counts - 600).abs().max() < 100


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(strategy="best"), "unknown sampling"),
        (dict(strategy="importance", fraction=0.0), "fraction"),
        (dict(strategy="fixed"), "needs count"),
        (dict(strategy="random", count=0), "count"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        select_neurons([torch.randn(3, 4)], [False], **kw)
