"""Shared test set-up: helper-module path, hypothesis profiles, backend fixtures.

* ``tests/`` is put on ``sys.path`` so test files can ``import strategies``
  (pytest runs with ``--import-mode=importlib``, which does not do that).
* Hypothesis runs derandomised (the same examples every run, so CI is
  reproducible) with no per-example deadline (timings on a shared 2-core
  machine are noisy). For a soak run, ``HYPOTHESIS_PROFILE=thorough`` draws
  fresh random examples every run and ``HYPOTHESIS_SCALE=20`` multiplies every
  test's example count (see ``strategies.examples``).
* ``backend`` parametrises a test over every MST kernel available here (its
  Borůvka runs are marked slow).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    settings = None

if settings is not None:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("default", derandomize=True, max_examples=40, **_common)
    settings.register_profile("thorough", derandomize=False, max_examples=1000, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

from topodecorr._kernels import available_backends  # noqa: E402

BACKENDS = available_backends()


# The batched Boruvka kernel is the accelerators' one: on a CPU it runs several times slower
# than numba, so its CPU runs of the backend-parametrised tests count as slow (they run in
# `make test`; the quick `-m "not slow"` run checks it through test_kernels' own tests).
_BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.slow) if b == "boruvka" else b for b in BACKENDS]


# session scope: hypothesis refuses function-scoped fixtures in @given tests
@pytest.fixture(scope="session", params=_BACKEND_PARAMS)
def backend(request) -> str:
    """Every MST kernel usable in this environment (CPU)."""
    return request.param
