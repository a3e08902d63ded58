"""Neuron sampling: which neurons of each captured layer enter the point cloud.

Strategies (every one keeps the output layer whole, as the paper does):

* ``"all"``: every neuron of every layer (the paper's choice for its MLPs);
* ``"importance"``: per hidden layer the ``max(1, floor(fraction * units))``
  neurons with the largest mean absolute activation over the batch (the
  paper's rule; it used ``fraction = 0.005`` for CIFAR-10 CNNs). The floor of
  one neuron per layer keeps small layers represented;
* ``"fixed"``: per hidden layer the ``count`` most important neurons (same
  ranking as ``"importance"``);
* ``"random"``: per hidden layer ``count`` neurons (or ``fraction`` of them)
  drawn uniformly without replacement from a seeded generator.

Indices are returned sorted so that the pooled neuron order is stable.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from ._checks import SAMPLINGS

__all__ = ["SAMPLINGS", "sampled_units", "select_neurons"]


def sampled_units(units: int, is_output: bool, strategy: str, fraction: float = 1.0, count: int | None = None) -> int:
    """How many of a layer's ``units`` neurons :func:`select_neurons` keeps (the rule without the data).

    >>> sampled_units(1000, False, "importance", fraction=0.005), sampled_units(10, True, "importance", 0.005)
    (5, 10)
    """
    if strategy == "all" or is_output:
        return units
    if strategy == "importance" or count is None:
        return min(units, max(1, math.floor(fraction * units)))
    return min(units, count)


def select_neurons(
    acts: list[torch.Tensor],
    is_output: list[bool],
    strategy: str = "all",
    fraction: float = 1.0,
    count: int | None = None,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor | None]:
    """Pick the neurons of each layer.

    Parameters
    ----------
    acts : list of Tensor, each (B, units_l)
    is_output : list of bool
        True for output layers, which are always kept whole.
    strategy : {"all", "importance", "fixed", "random"}
    fraction : float in (0, 1]
        Share of each hidden layer for ``"importance"`` (and ``"random"`` without ``count``).
    count : int, optional
        Neurons per hidden layer for ``"fixed"`` and ``"random"``.
    generator : torch.Generator, optional
        Source of randomness for ``"random"`` (on the CPU).

    Returns
    -------
    list of (LongTensor (k_l,) sorted | None)
        ``None`` means the whole layer.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[0.0, 5.0, 1.0, -9.0], [0.0, 3.0, 1.0, -7.0]])
    >>> select_neurons([a], [False], "importance", fraction=0.5)
    [tensor([1, 3])]
    """
    _checks.sampling(strategy, fraction, count)
    if len(acts) != len(is_output):
        raise ValueError("acts and is_output must have the same length")
    out: list[torch.Tensor | None] = []
    for a, last in zip(acts, is_output):
        units = a.shape[1]
        k = sampled_units(units, last, strategy, fraction, count)
        if k >= units:
            out.append(None)
            continue
        if strategy in ("importance", "fixed"):
            score = a.detach().abs().mean(dim=0)
            idx = torch.topk(score, k, sorted=False).indices
        else:
            idx = torch.randperm(units, generator=generator)[:k].to(a.device)
        out.append(torch.sort(idx).values)
    return out
