"""Argument checks shared by the pipeline, the hooks and the sampling (one wording everywhere).

Each check raises a ``ValueError`` (``TypeError`` for a wrong type) that names
the argument, what it got and what it takes. Choices come from the modules
that define them (the penalty registry, :data:`topodecorr.correlation.DISSIMILARITIES`, ...).
"""

from __future__ import annotations

import math

from .correlation import DISSIMILARITIES
from .penalties import lookup

#: Penalty kinds the activation pipeline computes (the registry's "parameters" ones act on a model).
PIPELINE_KINDS = ("deaths", "activations")

#: Neuron sampling strategies (see :mod:`topodecorr.sampling`).
SAMPLINGS = ("all", "importance", "fixed", "random")
#: What happens to neurons constant over the batch: the paper's convention, or out of the cloud.
DEAD_NEURONS = ("keep", "drop")
#: Where the penalty of a DDP run is computed: on the gathered global batch, or per rank.
DISTRIBUTED = ("global", "local")


def choice(name: str, value, choices: tuple) -> None:
    """``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


def integer(name: str, value, minimum: int, what: str = "") -> int:
    """``value`` must be an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{what}, got {value!r}")
    return value


def weight(value) -> float:
    """The penalty weight lambda: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {value!r}")
    return float(value)


def alpha(value) -> float:
    """T2's trade-off: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha (T2's trade-off) must lie in [0, 1], got {value!r}")
    return float(value)


def sampling(strategy, fraction, count, count_name: str = "count") -> None:
    """Neuron sampling: a known strategy, fraction in (0, 1], count a positive int (needed by "fixed")."""
    choice("sampling", strategy, SAMPLINGS)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if count is not None:
        integer(count_name, count, 1, " (neurons per hidden layer)")
    if strategy == "fixed" and count is None:
        raise ValueError(f"sampling='fixed' needs {count_name}=<neurons per hidden layer>")


def max_samples(value) -> int | None:
    """Rows drawn per point cloud and step: None (all rows) or an int >= 2 (a correlation needs two)."""
    if value is None:
        return None
    return integer("max_samples", value, 2, " (a correlation needs at least two samples) or None for all rows")


def backend(value) -> str:
    """An MST kernel name: "auto" or a kernel of the registry (available here or not: that is checked at use)."""
    from ._kernels import KERNELS

    names = ("auto", *sorted(KERNELS))
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"unknown backend {value!r}; choose one of {names} (topodecorr.available_backends() "
                         "lists the ones usable here)")
    return value


def pipeline(*, penalty, weight, dissimilarity, sampling, fraction, count, alpha, dead_neurons, max_samples,
             backend="auto", count_name: str = "count"):
    """Every option of the pipeline at once (by keyword); returns the penalty's registry entry."""
    entry = lookup(penalty, PIPELINE_KINDS)
    _weight(weight)
    choice("dissimilarity", dissimilarity, DISSIMILARITIES)
    _sampling(sampling, fraction, count, count_name)
    _alpha(alpha)
    choice("dead_neurons", dead_neurons, DEAD_NEURONS)
    _max_samples(max_samples)
    _backend(backend)
    return entry


_weight, _sampling, _alpha, _max_samples, _backend = weight, sampling, alpha, max_samples, backend
