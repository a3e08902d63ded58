"""The public namespace: every exported name exists, and the core stays light."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import textwrap

import pytest

import topodecorr


def test_all_is_a_list_of_unique_existing_names():
    names = topodecorr.__all__
    assert isinstance(names, (list, tuple))
    assert all(isinstance(n, str) and n.isidentifier() for n in names), "each entry must be one name"
    assert len(set(names)) == len(names), "duplicate names in __all__"
    for name in names:
        assert hasattr(topodecorr, name), f"topodecorr.__all__ lists {name!r} but it is not defined"


def test_star_import_gives_exactly_all():
    ns: dict = {}
    exec("from topodecorr import *", ns)
    exported = {k for k in ns if k != "__builtins__"}
    assert exported == set(topodecorr.__all__)


@pytest.mark.parametrize(
    "name",
    [
        "correlation",
        "dissimilarity",
        "normalize_activations",
        "mst_deaths",
        "correlation_deaths",
        "Deaths",
        "t1",
        "t2",
        "mean_abs_correlation",
        "decov",
        "l1",
        "l2",
        "available_backends",
    ],
)
def test_core_names_exported_and_documented(name):
    assert name in topodecorr.__all__
    obj = getattr(topodecorr, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 20, f"{name} needs a docstring"


def test_version_matches_installed_metadata():
    assert topodecorr.__version__ == importlib.metadata.version("topodecorr")


def test_deaths_is_a_named_tuple():
    assert topodecorr.Deaths._fields == ("deaths", "edges")


_OPTIONAL = ["numba", "scipy", "gudhi", "gph", "ripser", "sklearn", "matplotlib", "hypothesis", "mnist1d", "ray"]


@pytest.mark.slow
def test_core_import_is_light_and_never_imports_experiments():
    code = textwrap.dedent(
        f"""
        import sys
        import torch, numpy  # the core dependencies themselves
        before = set(sys.modules)
        import topodecorr
        new = sorted(set(sys.modules) - before)
        bad = [m for m in new if m.startswith("topodecorr.experiments")
               or m.split(".")[0] in {_OPTIONAL!r}]
        print(repr(bad))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"`import topodecorr` imported {out.stdout.strip()}"


@pytest.mark.slow
def test_core_runs_with_optional_packages_blocked():
    """The core needs only torch and numpy: block every optional package and run the pipeline."""
    code = textwrap.dedent(
        f"""
        import sys, warnings
        for name in {_OPTIONAL!r}:
            sys.modules[name] = None  # import of these now fails
        warnings.simplefilter("ignore", RuntimeWarning)  # the slow-fallback notice
        import torch, topodecorr
        acts = torch.randn(32, 6, requires_grad=True)
        res = topodecorr.correlation_deaths(acts)
        loss = topodecorr.t1(res.deaths) + topodecorr.t2(res.deaths)
        loss.backward()
        assert torch.isfinite(acts.grad).all()
        print(res.deaths.shape[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
