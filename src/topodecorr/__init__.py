"""topodecorr: decorrelating neurons with zero-dimensional persistence, for PyTorch.

Implements the T1 / T2 regularisers of Ballester, Casacuberta and Escalera,
"Decorrelating neurons using persistence" (PMLR 228, 2024), with exact,
differentiable minimum-spanning-tree deaths on CPU and GPU.
"""

from .correlation import NonFiniteActivationsError, correlation, dissimilarity, normalize_activations
from .penalties import decov, l1, l2, mean_abs_correlation, t1, t2
from .persistence import Deaths, correlation_deaths, mst_deaths
from ._kernels import available_backends
from .capture import Decorrelation, StepStats
from .functional import decorrelation_penalty
from .sampling import select_neurons
from .inspection import LayerRedundancy, NeuronPair, RedundancyReport, inspect

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Deaths",
    "NonFiniteActivationsError",
    "Decorrelation",
    "StepStats",
    "decorrelation_penalty",
    # `inspect` itself is left out of __all__: `from topodecorr import *` must not shadow
    # the standard library's inspect module; use td.inspect or import it by name
    "RedundancyReport",
    "LayerRedundancy",
    "NeuronPair",
    "select_neurons",
    "available_backends",
    "correlation",
    "correlation_deaths",
    "decov",
    "dissimilarity",
    "l1",
    "l2",
    "mean_abs_correlation",
    "mst_deaths",
    "normalize_activations",
    "t1",
    "t2",
]
