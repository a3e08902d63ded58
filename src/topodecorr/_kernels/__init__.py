"""Kernel registry for minimum spanning tree edges.

Kernels supply only the non-differentiable part of persistence: the indices
of the MST edges. The deaths (and their gradient) come from one shared
gather in :mod:`topodecorr.persistence`, so every kernel has the same gradient.

Each kernel takes a dense (n, n) tensor and a flag ``abs_corr``. With
``abs_corr=False`` the tensor holds weights to minimise; with ``abs_corr=True``
it holds correlations and the weight is ``1 - |C|`` (computed implicitly
where the kernel can). It returns a LongTensor (n - 1, 2) on the input's device.

``backend="auto"`` chooses ``"boruvka"`` for tensors on an accelerator (the
matrix never leaves the device), and on the CPU ``"numba"`` when numba is
installed, else ``"numpy"`` (much slower; a warning says so once).

:func:`matrix_stats` gives the statistics input validation needs (finite,
min, max, largest asymmetry) by the fastest passes available for the tensor:
on the CPU with numba, one ``torch.aminmax`` pass and one compiled tiled pass
for the asymmetry; otherwise torch reductions read back with one host
synchronisation.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["KERNELS", "Kernel", "available_backends", "resolve_backend", "mst_edges", "mst_edges_many", "matrix_stats"]


@dataclass(frozen=True)
class Kernel:
    name: str
    devices: tuple[str, ...]  # device types it accepts; "*" = any
    description: str
    is_available: Callable[[], bool]
    run: Callable[[torch.Tensor, bool], torch.Tensor]
    #: many trees in one call: list of (n_l, n_l) on one device -> list of (n_l - 1, 2)
    run_many: Callable[[list[torch.Tensor], bool], list[torch.Tensor]]


def _numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def _host_array(M: torch.Tensor) -> np.ndarray:
    M = M.detach()
    if M.dtype not in (torch.float32, torch.float64):
        M = M.float()
    return M.contiguous().numpy()


def _run_numba(M: torch.Tensor, abs_corr: bool) -> torch.Tensor:
    from . import numba_prim

    a = _host_array(M)
    e = numba_prim.prim_abs_max(a) if abs_corr else numba_prim.prim_min(a)
    return torch.from_numpy(e)


# numba's default thread pool ("workqueue") must not be entered from two Python threads at once
_parallel_lock = threading.Lock()

#: Spread the trees of many clouds over numba's own threads (``prange``, as many as torch
#: uses). Off by default: that is a second thread pool working while torch's OpenMP team
#: spins, which slowed whole training steps down (issue 18); the serial compiled loop runs
#: in the calling thread. ``benchmarks/architectures.py --parallel-trees`` measures both.
PARALLEL_TREES = False


def back_to_back(mats: list[torch.Tensor]) -> bool:
    """Whether the contiguous CPU float matrices follow each other in one storage, with no gap."""
    first = mats[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return False
    ptr, at = first.untyped_storage().data_ptr(), first.storage_offset()
    for M in mats:
        if (not M.is_contiguous() or M.dtype != first.dtype or M.untyped_storage().data_ptr() != ptr
                or M.storage_offset() != at):
            return False
        at += M.numel()
    return True


def flat_view(mats: list[torch.Tensor]) -> torch.Tensor:
    """The back-to-back matrices (:func:`back_to_back`) as one 1-d view, without a copy."""
    return mats[0].as_strided((sum(M.numel() for M in mats),), (1,))


def _run_numba_many(mats: list[torch.Tensor], abs_corr: bool) -> list[torch.Tensor]:
    import numba

    from . import numba_prim

    arrays = [_host_array(M) for M in mats]
    groups: dict = {}  # one call per dtype (each tree keeps the precision the single call has)
    for l, a in enumerate(arrays):
        groups.setdefault(a.dtype, []).append(l)
    out: list = [None] * len(arrays)
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)) if PARALLEL_TREES else 1
    if threads == 1:  # the serial kernel: numba's parallel API (and its thread pool) left untouched
        # the fused op writes its products back to back: the kernel reads that buffer in place
        flat = flat_view(mats).numpy() if len(groups) == 1 and back_to_back(mats) else None
        for idx in groups.values():
            for l, e in zip(idx, numba_prim.prim_many([arrays[l] for l in idx], abs_corr, False, flat)):
                out[l] = torch.from_numpy(e)
        return out
    with _parallel_lock:
        try:
            numba.set_num_threads(threads)
            with numba.parallel_chunksize(1):  # hand out one tree at a time, largest first
                for idx in groups.values():
                    for l, e in zip(idx, numba_prim.prim_many([arrays[l] for l in idx], abs_corr, True)):
                        out[l] = torch.from_numpy(e)
        finally:
            # numba's OpenMP layer shares libgomp with torch: launching it sets the calling
            # thread's OpenMP team size to numba's, which is torch's thread count too
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
    return out


def _run_numpy(M: torch.Tensor, abs_corr: bool) -> torch.Tensor:
    from .reference import prim_edges_numpy

    a = _host_array(M)
    if abs_corr:
        a = 1.0 - np.abs(a)
    return torch.from_numpy(prim_edges_numpy(a))


def _run_boruvka(M: torch.Tensor, abs_corr: bool) -> torch.Tensor:
    from .boruvka import boruvka_edges

    W = M.detach()
    if abs_corr:
        W = 1.0 - W.abs()
    return boruvka_edges(W)


def _run_boruvka_many(mats: list[torch.Tensor], abs_corr: bool) -> list[torch.Tensor]:
    from .boruvka import boruvka_edges_batched

    sizes = [M.shape[0] for M in mats]
    m = max(sizes)
    dtype = functools.reduce(torch.promote_types, [M.dtype for M in mats])
    if all(s == m for s in sizes):
        W = torch.stack([M.detach().to(dtype) for M in mats])
    else:  # padded to the largest tree; the batched kernel never reads the padding
        W = torch.zeros((len(mats), m, m), dtype=dtype, device=mats[0].device)
        for l, M in enumerate(mats):
            W[l, : M.shape[0], : M.shape[0]] = M.detach()
    if abs_corr:
        W = 1.0 - W.abs()
    out = boruvka_edges_batched(W, sizes)
    return [out[l, : s - 1] for l, s in enumerate(sizes)]


def _one_by_one(run: Callable[[torch.Tensor, bool], torch.Tensor]):
    def run_many(mats: list[torch.Tensor], abs_corr: bool) -> list[torch.Tensor]:
        return [run(M, abs_corr) for M in mats]

    return run_many


KERNELS: dict[str, Kernel] = {
    "numba": Kernel(
        "numba", ("cpu",), "compiled dense Prim's, O(n^2)", _numba_available, _run_numba, _run_numba_many
    ),
    "numpy": Kernel(
        "numpy", ("cpu",), "NumPy Prim's (reference and fallback)", lambda: True, _run_numpy, _one_by_one(_run_numpy)
    ),
    "boruvka": Kernel(
        "boruvka", ("*",), "vectorised torch Boruvka, one batch for many trees", lambda: True, _run_boruvka,
        _run_boruvka_many,
    ),
}

_warned_fallback = False


def available_backends() -> list[str]:
    """Names of the kernels usable in this environment."""
    return [k.name for k in KERNELS.values() if k.is_available()]


def resolve_backend(backend: str, device: torch.device) -> Kernel:
    """Pick the kernel for ``device``; ``"auto"`` follows the module docstring."""
    global _warned_fallback
    if backend == "auto":
        if device.type != "cpu":
            return KERNELS["boruvka"]
        if _numba_available():
            return KERNELS["numba"]
        if not _warned_fallback:
            warnings.warn(
                "numba is not installed: topodecorr falls back to a much slower NumPy Prim's kernel; "
                "install it with `pip install topodecorr[fast]`",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return KERNELS["numpy"]
    if backend not in KERNELS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(KERNELS)}")
    k = KERNELS[backend]
    if not k.is_available():
        raise RuntimeError(f"backend {backend!r} is not available here (is its package installed?)")
    if "*" not in k.devices and device.type not in k.devices:
        raise ValueError(
            f"backend {backend!r} runs on {k.devices} but the matrix is on {device.type}; "
            "move the matrix or use backend='auto'"
        )
    return k


def mst_edges(M: torch.Tensor, abs_corr: bool = False, backend: str = "auto") -> torch.Tensor:
    """Indices of a minimum spanning tree's edges, LongTensor (n - 1, 2) on ``M.device``."""
    kernel = resolve_backend(backend, M.device)
    return kernel.run(M, abs_corr).to(M.device)


def mst_edges_many(mats: list[torch.Tensor], abs_corr: bool = False, backend: str = "auto") -> list[torch.Tensor]:
    """:func:`mst_edges` of every matrix in one kernel call (matrices on one device, any sizes).

    Matrices with fewer than two rows get an empty (0, 2) tree; the others the
    same edges :func:`mst_edges` gives for each (up to order for Boruvka).
    """
    if not mats:
        return []
    device = mats[0].device
    if any(M.device != device for M in mats):
        raise ValueError(f"all matrices must be on one device, got {sorted({str(M.device) for M in mats})}")
    kernel = resolve_backend(backend, device)
    out: list[torch.Tensor] = [torch.empty((0, 2), dtype=torch.long, device=device) for _ in mats]
    todo = [l for l, M in enumerate(mats) if M.shape[0] > 1]
    if todo:
        for l, e in zip(todo, kernel.run_many([mats[l] for l in todo], abs_corr)):
            out[l] = e.to(device)
    return out


def matrix_stats(M: torch.Tensor) -> tuple[bool, float, float, float]:
    """``(all finite, min, max, max |M - M.T|)`` of a square float matrix, as Python scalars.

    The asymmetry is meaningless (possibly ``nan``) when the matrix is not finite.
    """
    M = M.detach()
    if M.device.type == "cpu" and M.dtype in (torch.float32, torch.float64) and _numba_available() and M.numel():
        from . import numba_prim

        M = M.contiguous()
        # min and max in one pass (NaN propagates and inf shows, so they double as the
        # finiteness test; measured 6 ms against NumPy's min + max 10.5 ms at n = 4096),
        # then the asymmetry in numba's tiled pass, only for a finite matrix
        low, high = (float(v) for v in torch.aminmax(M))
        finite = math.isfinite(low) and math.isfinite(high)
        asym = numba_prim.max_asymmetry(M.numpy()) if finite else float("nan")
        return finite, low, high, asym
    # every statistic in one tensor, read back with a single host synchronisation
    finite, low, high, asym = torch.stack(
        [torch.isfinite(M).all().to(M.dtype), M.min(), M.max(), (M - M.T).abs().max()]
    ).tolist()
    return bool(finite), low, high, asym
