"""Run a sweep's runs as Ray tasks, on this machine or on a Ray cluster.

``topodecorr sweep CONFIG --out DIR --executor ray [--ray-address ADDRESS]``
uses :class:`RayExecutor` in place of the local process pool. Nothing else of
the sweep changes:

* The driver (the ``topodecorr sweep`` process) stays the *single writer* of
  ``DIR/results.sqlite``: it claims a run, submits
  :func:`~topodecorr.experiments.sweep.execute_run` as a Ray task, and writes
  the result the task returns. Tasks only compute.
* Each task declares its resources, ``num_cpus`` (default 1) and ``num_gpus``
  (default 0; a fraction such as 0.5 packs two runs per GPU). Ray places it on
  a node with those resources free and sets ``CUDA_VISIBLE_DEVICES``, so a run
  with ``device = "auto"`` trains on the GPU Ray gave it. Torch uses
  ``num_cpus`` threads in the task.
* At most ``capacity`` runs are in flight: the cluster's CPUs (or GPUs) divided
  by the per-run request, read when the executor starts (``max_in_flight``
  overrides it, e.g. to keep nodes that join later busy).
* A task whose worker process dies (killed, out of memory, node lost) is
  retried by Ray up to ``max_retries`` times. The retry finds the run's last
  epoch checkpoint in ``checkpoint_dir`` and resumes there, so the checkpoint
  folder must be on storage every node can reach (NFS, a cluster file
  system; the default ``DIR/checkpoints`` is right on one machine or when
  ``DIR`` itself is shared). An exception raised by the training code is not
  retried: the run is recorded as ``failed`` and retried by the next
  invocation of the sweep, like in the local executor.

Without ``address`` a private Ray instance is started on this machine (and
shut down at the end); ``address="auto"`` or ``"HOST:6379"`` joins a running
cluster (``ray start --head`` / ``ray start --address HOST:6379``, see
``docs/scaling.md``).

Ray is an optional dependency (``pip install topodecorr[ray]``), imported
only when a :class:`RayExecutor` is built.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["RayExecutor", "require_ray"]


def require_ray():
    """Import and return the ``ray`` module, or raise an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "the Ray executor needs Ray, which is not installed: pip install 'topodecorr[ray]' "
            "(or pip install 'ray>=2.9'); the default local executor needs no Ray"
        ) from exc
    return ray


def _run_task(spec: dict, checkpoint_dir: str, threads: int, task: Callable[..., dict] | None) -> dict:
    """Body of every Ray task: set the thread count, then train (resuming from a checkpoint)."""
    import torch

    torch.set_num_threads(max(1, threads))
    if task is None:
        from .sweep import execute_run as task
    return task(spec, checkpoint_dir)


class RayExecutor:
    """Executor running each run as a Ray task with declared resources.

    Parameters
    ----------
    address : str, optional
        A running cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``); default:
        start a local Ray instance (reused when this process already called ``ray.init``).
    num_cpus : float
        CPUs each run requests (and torch threads it uses, at least 1).
    num_gpus : float
        GPUs each run requests (0: CPU only; fractions share a GPU).
    max_retries : int
        How often Ray reruns a task whose worker died; each retry resumes from the
        run's last epoch checkpoint.
    max_in_flight : int, optional
        Runs submitted at once (default: what the cluster's resources hold at start).
    local_cpus : int, optional
        CPUs of a locally started instance (default: all of this machine's).
    task : callable, optional
        Replaces :func:`~topodecorr.experiments.sweep.execute_run` as the task body
        (``task(spec_dict, checkpoint_dir) -> result dict``; picklable). For tests
        and wrappers.
    init_kwargs : dict, optional
        Extra keyword arguments for ``ray.init`` (e.g. ``runtime_env``).

    Raises
    ------
    ImportError
        Ray is not installed.
    ValueError
        A resource request is negative, or asks for more than the cluster has.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 3,
        max_in_flight: int | None = None,
        local_cpus: int | None = None,
        task: Callable[..., dict] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if num_cpus == 0 and num_gpus == 0:
            raise ValueError("each run must request some resource: num_cpus > 0 or num_gpus > 0")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        ray = require_ray()
        from .sweep import cpu_count

        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": True}
            if address is None:  # a private instance: no dashboard (no open port), this machine's CPUs
                kwargs.update(include_dashboard=False,
                              num_cpus=local_cpus if local_cpus is not None else cpu_count())
            else:  # a running cluster brings its own resources and settings
                kwargs["address"] = address
            kwargs.update(init_kwargs or {})
            ray.init(**kwargs)
            self._owns_ray = True
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if num_cpus > cpus or num_gpus > gpus:
            if self._owns_ray:
                ray.shutdown()
            raise ValueError(
                f"each run asks for {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s) but the Ray cluster has "
                f"{cpus:g} CPU(s) and {gpus:g} GPU(s); lower --cpus-per-run / --gpus-per-run"
            )
        slots = [int(cpus // num_cpus)] if num_cpus > 0 else []
        if num_gpus > 0:
            slots.append(int(gpus // num_gpus))
        self.capacity = max_in_flight if max_in_flight is not None else max(1, min(slots))
        self.num_cpus, self.num_gpus, self.max_retries = num_cpus, num_gpus, max_retries
        self._task = task
        self._remote = ray.remote(_run_task).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False,
            name="topodecorr-run",
        )
        self._refs: dict[Future, Any] = {}

    def submit(self, spec: dict, checkpoint_dir: str) -> Future:
        """Start one run as a Ray task; the Future resolves to its result dict (or raises its error)."""
        threads = max(1, int(self.num_cpus))
        # absolute: a task's working directory is not the driver's
        ref = self._remote.remote(spec, os.path.abspath(checkpoint_dir), threads, self._task)
        fut = ref.future()
        self._refs[fut] = ref
        fut.add_done_callback(lambda f: self._refs.pop(f, None))
        return fut

    def shutdown(self, cancel: bool = False) -> None:
        """Cancel the tasks in flight when ``cancel``; stop a Ray instance this executor started."""
        if cancel:
            for ref in list(self._refs.values()):
                try:
                    self._ray.cancel(ref, force=True)
                except Exception:  # already finished or its node is gone
                    pass
        self._refs.clear()
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_ray = False
