"""Running a sweep: claim runs from the database, execute them, store the results.

The driver (:func:`run_sweep`) is the single writer of the results database in
the local executor: it claims a ``pending`` run atomically, hands its
:class:`~topodecorr.experiments.train.RunSpec` (as a plain dict) to an
executor, and writes the returned result. Workers only compute.

:func:`execute_run` is the one picklable entry point a worker calls -- a
process of the local pool today, a Ray task later -- and needs only the spec
and a checkpoint folder (shared storage when workers live on other hosts).

Executors implement the small :class:`Executor` protocol: ``capacity`` (how
many runs may be in flight), ``submit(spec_dict, checkpoint_dir) -> Future``
and ``shutdown(cancel)``. :class:`InlineExecutor` runs in the driver's process
(``--workers 1``); :class:`LocalExecutor` runs ``N`` spawned processes with
``torch.set_num_threads(max(1, cpus // N))`` each.

Interruption: a killed sweep loses at most the epochs in flight. Every run
checkpoints after each epoch; on restart :meth:`ResultStore.reclaim_stale`
returns the dead owner's ``running`` rows to ``pending`` and the runs resume
from their checkpoints. Finished runs (``done``, ``diverged``) are skipped;
``failed`` runs are retried.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Protocol

from .config import ConfigError, SweepConfig
from .store import DB_NAME, FINISHED, ResultStore, StoreError
from .train import RunSpec, cached_dataset, software_versions, train_run

__all__ = [
    "DB_NAME",
    "Executor",
    "InlineExecutor",
    "LocalExecutor",
    "execute_run",
    "checkpoint_name",
    "run_specs",
    "run_sweep",
    "cpu_count",
    "SweepCounts",
    "build_networks",
]


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def checkpoint_name(spec: RunSpec) -> str:
    """A stable, file-system-safe checkpoint name for a run's key."""
    raw = f"{spec.network}__{spec.penalty}__{spec.weight!r}__s{spec.seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", raw) + ".pt"


def execute_run(
    spec: RunSpec | dict,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    progress: bool = False,
    parent_pid: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train one run and return its result dict (see :func:`~topodecorr.experiments.train.train_run`).

    A pure, picklable entry point for any executor (process pool, Ray): it reads
    the data itself (cached per process), resumes from
    ``checkpoint_dir/<checkpoint_name>`` when present and never touches the
    results database. With ``parent_pid`` the worker exits as soon as that
    process has gone (an orphan of a killed sweep must not keep training).
    """
    if isinstance(spec, dict):
        spec = RunSpec.from_dict(spec)
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / checkpoint_name(spec)

    def epoch_hook(record: dict) -> None:
        if parent_pid is not None and os.getppid() != parent_pid:
            os._exit(3)  # the sweep driver died; its restart resumes from our checkpoint
        if on_epoch is not None:
            on_epoch(record)

    # a sweep shows one line per run, not per epoch, when there is no terminal
    return train_run(spec, ckpt, progress=progress, epoch_lines=False, on_epoch=epoch_hook)


class Executor(Protocol):
    """Where runs execute. ``submit`` returns a Future whose result is
    :func:`execute_run`'s dict; at most ``capacity`` runs are in flight."""

    capacity: int

    def submit(self, spec: dict, checkpoint_dir: str) -> Future: ...

    def shutdown(self, cancel: bool = False) -> None: ...


class InlineExecutor:
    """Runs each run synchronously in the calling process (one worker).

    ``on_epoch`` (set by the driver) is called after every epoch, e.g. for heartbeats.
    """

    capacity = 1

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress
        self.on_epoch: Callable[[dict], None] | None = None

    def submit(self, spec: dict, checkpoint_dir: str) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(execute_run(spec, checkpoint_dir, progress=self.progress, on_epoch=self.on_epoch))
        except Exception as exc:  # reported as a failed run by the driver
            fut.set_exception(exc)
        return fut

    def shutdown(self, cancel: bool = False) -> None:
        pass


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # the driver handles Ctrl-C; workers ignore it and are shut down by the driver
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalExecutor:
    """``workers`` spawned processes on this machine, torch threads divided among them.

    Parameters
    ----------
    workers : int
        Number of processes (and runs in flight).
    threads : int, optional
        Torch threads per worker (default ``max(1, cpu_count() // workers)``).
    """

    def __init__(self, workers: int, threads: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.capacity = workers
        self.threads = threads if threads is not None else max(1, cpu_count() // workers)
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads,),
        )

    def submit(self, spec: dict, checkpoint_dir: str) -> Future:
        return self._pool.submit(execute_run, spec, checkpoint_dir, parent_pid=os.getpid())

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            # terminate workers now: their runs restart from the last checkpoint
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.terminate()
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


def run_specs(config: SweepConfig, runs: list[dict] | None = None) -> list[RunSpec]:
    """The sweep's runs as specs, in grid order (stage 2 of a two-stage sweep reads
    ``runs``, the database's rows, see :meth:`SweepConfig.grid`).

    A small correlation matrix is kept for the first seed of the first network
    (one network per penalty and weight), for the report's heat maps.
    """
    first_net, first_seed = config.networks[0].label, config.seeds[0]
    specs = []
    for network, penalty, weight, seed in config.grid(runs):
        net = config.network(network)
        specs.append(
            RunSpec(
                dataset=config.dataset,
                network=network,
                model=net.model,
                model_params=net.params,
                penalty=penalty,
                weight=weight,
                seed=seed,
                train=config.train_for(network),
                data_dir=config.data_dir,
                split_seed=config.split_seed_of(seed),
                val_fraction=float(config.val_fraction),
                keep_correlation=(network == first_net and seed == first_seed),
            )
        )
    return specs


def _failure(exc: BaseException) -> dict:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}\n{text[-4000:]}", "versions": software_versions()}


def run_sweep(
    config: SweepConfig,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    executor: Executor | None = None,
    progress: bool = True,
    stale_after: float = 1800.0,
    heartbeat_s: float = 30.0,
    keep_checkpoints: bool = False,
    max_runs: int | None = None,
    log: Callable[[str], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> "SweepCounts":
    """Run (or resume) a sweep into ``out_dir``; return the run counts by status
    (a :class:`SweepCounts`, which also names the failed runs).

    Parameters
    ----------
    config : SweepConfig
    out_dir : path
        The sweep folder: ``results.sqlite``, ``checkpoints/``, ``sweep.json``.
    workers : int
        Parallel worker processes (1: in this process). Ignored with ``executor``.
    executor : Executor, optional
        Where runs execute (default: inline for 1 worker, else :class:`LocalExecutor`).
    progress : bool
        Show progress bars (hidden anyway when stderr is not a terminal).
    stale_after : float
        Seconds without heartbeat after which another host's ``running`` row is reclaimed.
    heartbeat_s : float
        How often the driver refreshes the heartbeat of its runs in flight.
    keep_checkpoints : bool
        Keep the final checkpoint of each finished run (default: deleted).
    max_runs : int, optional
        Stop after claiming this many runs (for tests and partial sweeps).
    log : callable, optional
        Receives one-line messages (default: print to stderr).
    checkpoint_dir : path, optional
        Where runs keep their epoch checkpoints (default ``out_dir/checkpoints``); with
        workers on other machines (Ray) a folder every node can reach.
    """
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

    config.validate_names()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"max_runs must be >= 1 (or None: every run), got {max_runs}")
    out = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoints"
    _writable_folder(out, "output folder", "choose another output folder")
    # fail fast (clear error, nothing written to the runs) when the data cannot be read
    data = cached_dataset(config.dataset, config.data_dir, config.split_seed, float(config.val_fraction))
    build_networks(config, data)  # ... or a network cannot be built
    _writable_folder(ckpt_dir, "checkpoint folder", "choose another with --checkpoint-dir")
    store = ResultStore(out / DB_NAME)
    try:
        total, finished = _prepare(store, config, data, out, stale_after, log)
        if executor is None:
            executor = InlineExecutor(progress=progress) if workers == 1 else LocalExecutor(workers)
        shown = _RunProgress(total, finished, progress, log)
        try:
            claimed = _drive(store, executor, ckpt_dir, shown, max_runs, heartbeat_s, keep_checkpoints)
        finally:
            shown.close()
        executor.shutdown()
        return SweepCounts(store.counts(), ran=claimed, failed=[
            (_label(r), (r["error"] or "").split("\n")[0]) for r in store.runs("failed")
        ])
    finally:
        store.close()  # checkpoints the WAL: results.sqlite alone is the whole of the results


def _drive(store: ResultStore, executor: Executor, ckpt_dir: Path, shown: "_RunProgress", max_runs: int | None,
           heartbeat_s: float, keep_checkpoints: bool) -> int:
    """Claim, submit and store runs until none is pending (or ``max_runs`` were claimed);
    returns the number claimed. Interrupted, it hands its runs back and stops the executor."""
    in_flight: dict[Future, int] = {}
    claimed = 0
    try:
        while True:
            while len(in_flight) < executor.capacity and (max_runs is None or claimed < max_runs):
                row = store.claim()
                if row is None:
                    break
                claimed += 1
                if hasattr(executor, "on_epoch"):
                    executor.on_epoch = _heartbeat_hook(store, row["id"], heartbeat_s)
                fut = executor.submit(json.loads(row["config"]), str(ckpt_dir))
                in_flight[fut] = row["id"]
            if not in_flight:
                return claimed
            done, _ = wait(list(in_flight), timeout=heartbeat_s, return_when=FIRST_COMPLETED)
            store.heartbeat(in_flight.values())
            for fut in done:
                run_id = in_flight.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    result = _failure(exc)
                _store_result(store, run_id, result, ckpt_dir, keep_checkpoints, shown)
    except BaseException:
        # interrupted (Ctrl-C, SIGTERM): hand our runs back; their checkpoints stay
        store.release(in_flight.values())
        executor.shutdown(cancel=True)
        raise


def _label(run) -> str:
    """``network penalty weight sSEED`` of a run row or spec."""
    get = run.__getitem__ if isinstance(run, dict) else lambda k: getattr(run, k)
    return f"{get('network')} {get('penalty')} {get('weight'):g} s{get('seed')}"


def _prepare(store: ResultStore, config: SweepConfig, data, out: Path, stale_after: float,
             log: Callable[[str], None]) -> tuple[int, int]:
    """Record the sweep and its runs, put back the runs of dead workers and the failed ones,
    say so; returns (number of runs, number finished)."""
    specs = run_specs(config, store.runs() if config.stages is not None else None)
    added = store.init_sweep(config, [(s.key, s.to_dict()) for s in specs], software_versions())
    store.set_meta("data", json.dumps({"source": str(data.source), "sizes": dict(data.sizes),
                                       "input_shape": list(data.input_shape), "num_classes": data.num_classes}))
    (out / "sweep.json").write_text(json.dumps(store.sweep_config(), indent=2, sort_keys=True) + "\n")
    reclaimed = store.reclaim_stale(stale_after)
    retried = store.reset_failed()
    counts = store.counts()
    total = sum(counts.values())
    finished = sum(counts[s] for s in FINISHED)
    log(
        f"sweep {config.name!r}: {total} runs, {finished} finished, {added} new"
        + (f", {reclaimed} reclaimed from a dead worker" if reclaimed else "")
        + (f", {retried} failed runs retried" if retried else "")
        + f" -> {out / DB_NAME}"
    )
    return total, finished


def _store_result(store: ResultStore, run_id: int, result: dict, ckpt_dir: Path, keep_checkpoints: bool,
                  shown: "_RunProgress") -> None:
    """Write one run's result, drop its checkpoint once finished, show it."""
    store.finish(run_id, result)
    row = store.conn.execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
    spec = RunSpec.from_dict(json.loads(row[0]))
    if result["status"] in FINISHED and not keep_checkpoints:
        (ckpt_dir / checkpoint_name(spec)).unlink(missing_ok=True)
    if result["status"] == "failed":
        shown.log(f"run {spec.key} failed: {result['error'].splitlines()[0]}")
    acc = result.get("test_acc")
    shown.update(
        f"{_label(spec)}: {result['status']}"
        + (f" test {acc:.3f}" if acc is not None else "")
        + (f" ({result.get('epochs')} epochs)" if result.get("epochs") is not None else "")
    )


class _RunProgress:
    """A sweep's progress: a bar of runs on a terminal, else one line per finished run
    (with ``progress``); messages printed while the bar is up go above it."""

    def __init__(self, total: int, finished: int, progress: bool, log: Callable[[str], None]) -> None:
        self.total, self.finished, self.progress, self._log = total, finished, progress, log
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=finished, desc="runs", unit="run", disable=None, dynamic_ncols=True)
            self.bar = None if bar.disable else bar

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.clear()
            self._log(msg)
            self.bar.refresh()
        else:
            self._log(msg)

    def update(self, line: str) -> None:
        self.finished += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(line, refresh=False)
        elif self.progress:  # no terminal (CI, a log file): one line per finished run
            self._log(f"[{self.finished}/{self.total}] {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SweepCounts(dict):
    """Run counts by status (a dict), plus what this invocation did.

    Attributes
    ----------
    ran : int
        Runs started by this invocation (0: every run had finished before).
    failed : list of (str, str)
        The failed runs, as ``("network penalty weight sSEED", first line of the error)``.
    """

    def __init__(self, counts: dict[str, int], ran: int = 0, failed: list | None = None) -> None:
        super().__init__(counts)
        self.ran = ran
        self.failed = list(failed or [])


def _writable_folder(folder: Path, what: str, remedy: str) -> None:
    """Create ``folder`` if needed; raise :class:`StoreError` unless this user can write in it."""
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"the {what} {folder} is a file, not a folder; {remedy}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the {what} {folder}: {exc.strerror or exc}; {remedy}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"the {what} {folder} is read-only for this user; make it writable "
                         f"(chmod u+w {folder}) or {remedy}")


def build_networks(config: SweepConfig, data) -> None:
    """Build every network of the sweep once, for ``data``'s input shape and classes.

    A parameter the model refuses (``hidden = "oops"``) is a :class:`ConfigError` naming
    the network, raised before the results database is created or touched.
    """
    from .models import build_model

    for net in config.networks:
        try:
            build_model(net.model, data.input_shape, data.num_classes, **net.kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"network {net.label!r} (model {net.model!r}) cannot be built: {exc}; "
                              "fix the sweep file (nothing was written)") from None


def _heartbeat_hook(store: ResultStore, run_id: int, every: float) -> Callable[[dict], None]:
    last = [time.monotonic()]

    def hook(_record: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            store.heartbeat([run_id])
            last[0] = now

    return hook
