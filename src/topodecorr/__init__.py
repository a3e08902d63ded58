"""topodecorr: decorrelating neurons with zero-dimensional persistence, for PyTorch.

Implements the T1 / T2 regularisers of Ballester, Casacuberta and Escalera,
"Decorrelating neurons using persistence" (PMLR 228, 2024), with exact,
differentiable minimum-spanning-tree deaths on CPU and GPU.

The public names are resolved on first use (PEP 562), so ``import topodecorr``
itself does not import torch: the ``topodecorr`` command line lives in this
package and answers ``--help`` without waiting for torch. ``td.t1``,
``from topodecorr import Decorrelation`` and ``from topodecorr import *`` work
as with eager imports.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the submodule defining it
_EXPORTS: dict[str, str] = {
    "NonFiniteActivationsError": "correlation",
    "correlation": "correlation",
    "dissimilarity": "correlation",
    "normalize_activations": "correlation",
    "decov": "penalties",
    "l1": "penalties",
    "l2": "penalties",
    "mean_abs_correlation": "penalties",
    "t1": "penalties",
    "t2": "penalties",
    "Deaths": "persistence",
    "correlation_deaths": "persistence",
    "correlation_deaths_many": "persistence",
    "mst_deaths": "persistence",
    "available_backends": "_kernels",
    "Decorrelation": "capture",
    "StepStats": "capture",
    "decorrelation_penalty": "functional",
    "decorrelation_result": "functional",
    "PenaltyResult": "functional",
    "select_neurons": "sampling",
    "LayerRedundancy": "inspection",
    "NeuronPair": "inspection",
    "RedundancyReport": "inspection",
    "inspect": "inspection",
}

__all__ = [
    "__version__",
    "Deaths",
    "NonFiniteActivationsError",
    "Decorrelation",
    "StepStats",
    "decorrelation_penalty",
    "decorrelation_result",
    "PenaltyResult",
    # `inspect` itself is left out of __all__: `from topodecorr import *` must not shadow
    # the standard library's inspect module; use td.inspect or import it by name
    "RedundancyReport",
    "LayerRedundancy",
    "NeuronPair",
    "select_neurons",
    "available_backends",
    "correlation",
    "correlation_deaths",
    "correlation_deaths_many",
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

if TYPE_CHECKING:  # the eager form, for type checkers and editors
    from ._kernels import available_backends
    from .capture import Decorrelation, StepStats
    from .correlation import NonFiniteActivationsError, correlation, dissimilarity, normalize_activations
    from .functional import PenaltyResult, decorrelation_penalty, decorrelation_result
    from .inspection import LayerRedundancy, NeuronPair, RedundancyReport, inspect
    from .penalties import decov, l1, l2, mean_abs_correlation, t1, t2
    from .persistence import Deaths, correlation_deaths, correlation_deaths_many, mst_deaths
    from .sampling import select_neurons


class _Package(_types.ModuleType):
    """The package module: public names load their submodule on first access."""

    def __getattr__(self, name: str) -> object:
        where = _EXPORTS.get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(f"{self.__name__}.{where}"), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: object) -> None:
        # Importing a submodule binds it on the package; `correlation` is both a submodule
        # and a public function, and the function must win (as with eager imports).
        if name in _EXPORTS and isinstance(value, _types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS))


_sys.modules[__name__].__class__ = _Package
