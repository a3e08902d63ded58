"""Benchmark of scaling out: sweep throughput per executor, and the step time of a DDP run.

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/scaling.py                # sweeps: local x1, local x2, Ray (2 CPUs); 3 rounds
    .venv/bin/python benchmarks/scaling.py --rounds 1     # one round (quicker, noisier)
    .venv/bin/python benchmarks/scaling.py --ddp          # also: DDP step time with torchrun (GPUs if any)

Sweep throughput. The same small sweep (the ``quick`` preset cut to one
network, one weight, two seeds and 5 epochs: 14 runs of the paper's MLP on
digits) is run into a fresh folder by each executor:

* ``local-1``: ``--workers 1``, runs in the driver's process (torch uses every core);
* ``local-1t``: the same with one torch thread (on a shared machine a team of OpenMP threads
  stalls whenever another job holds one of its cores; this separates that effect);
* ``local-2``: ``--workers 2``, two spawned processes with ``cores / 2`` threads each;
* ``ray-2``: ``--executor ray``, a local Ray instance with 2 CPUs, one CPU (one thread) per run.

Throughput is runs per minute of wall time from the call of ``run_sweep`` to
its return, worker start-up included (Ray's own start-up, ``ray.init``, is
reported apart; the throughput with it is given too). The executors are run
round-robin, ``--rounds`` times, and the medians reported, so the background
load of a shared machine hits all of them alike.

DDP step time (``--ddp``). ``torchrun --nproc-per-node K -m topodecorr train``
on the paper's MLP (784-450-350-200-10 shape on digits' 64 inputs, all 1020
neurons, T1, global batch 256) for K = 1 and K = number of GPUs (CUDA, NCCL),
or K = 1, 2 on the CPU (gloo, one thread per process) when there is no GPU; the
median epoch time over the run's epochs, per optimiser step. In global-batch
mode every rank computes the same spanning tree of all neurons, so only the
network's forward and backward are divided among the ranks.

Results: ``benchmarks/out/scaling.{json,csv,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, markdown_table, write_results  # noqa: E402

import torch  # noqa: E402

from topodecorr.experiments.config import load_preset  # noqa: E402
from topodecorr.experiments.sweep import InlineExecutor, LocalExecutor, run_sweep  # noqa: E402


def small_sweep(epochs: int):
    """The ``quick`` preset cut down: one MLP, all seven penalties, one weight, two seeds."""
    cfg = load_preset("quick")
    train = cfg.train.__class__(**{**cfg.train.to_dict(), "max_epochs": epochs, "patience": epochs})
    return cfg.replace(name="scaling-bench", networks=cfg.networks[:1], weights=(1e-2,), seeds=(0, 1), train=train)


def time_sweep(kind: str, cfg, root: Path) -> dict:
    """Run the sweep with one executor into a fresh folder; seconds and counts."""
    out = root / f"{kind}-{time.monotonic_ns()}"
    quiet = dict(progress=False, log=lambda m: None)
    ray_init_s = None
    if kind in ("local-1", "local-1t"):
        threads = torch.get_num_threads()
        if kind == "local-1t":
            torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            counts = run_sweep(cfg, out, executor=InlineExecutor(), **quiet)
        finally:
            torch.set_num_threads(threads)
    elif kind == "local-2":
        t0 = time.perf_counter()
        counts = run_sweep(cfg, out, executor=LocalExecutor(2), **quiet)
    elif kind == "ray-2":
        from topodecorr.experiments.ray_executor import RayExecutor

        t_init = time.perf_counter()
        ex = RayExecutor(num_cpus=1, local_cpus=2, init_kwargs={"log_to_driver": False})
        ray_init_s = time.perf_counter() - t_init
        t0 = time.perf_counter()
        counts = run_sweep(cfg, out, executor=ex, **quiet)  # shuts the private Ray instance down at the end
    else:  # pragma: no cover
        raise ValueError(kind)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    runs = sum(counts.values())
    if counts.get("done", 0) + counts.get("diverged", 0) != runs:
        raise RuntimeError(f"{kind}: not every run finished: {counts}")
    return {"wall_s": wall, "ray_init_s": ray_init_s, "runs": runs}


def bench_sweeps(rounds: int, epochs: int) -> list[dict]:
    cfg = small_sweep(epochs)
    kinds = ["local-1", "local-1t", "local-2", "ray-2"]
    raw: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        for r in range(rounds):
            for kind in kinds:
                m = time_sweep(kind, cfg, Path(tmp))
                raw[kind].append(m)
                print(f"round {r + 1}/{rounds} {kind}: {m['runs']} runs in {m['wall_s']:.1f} s"
                      + (f" (+ ray.init {m['ray_init_s']:.1f} s)" if m["ray_init_s"] is not None else ""), flush=True)
    rows = []
    for kind in kinds:
        walls = [m["wall_s"] for m in raw[kind]]
        inits = [m["ray_init_s"] for m in raw[kind] if m["ray_init_s"] is not None]
        runs = raw[kind][0]["runs"]
        wall = statistics.median(walls)
        init = statistics.median(inits) if inits else None
        rows.append({
            "name": "sweep", "executor": kind, "runs": runs, "epochs": epochs,
            "median_wall_s": wall, "runs_per_min": 60.0 * runs / wall,
            "ray_init_s": init, "runs_per_min_with_init": 60.0 * runs / (wall + init) if init is not None else None,
            "walls_s": [round(w, 3) for w in walls],
        })
    base = rows[0]["runs_per_min"]
    for row in rows:
        row["speedup_vs_local_1"] = row["runs_per_min"] / base
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_ddp(epochs: int, rounds: int) -> list[dict]:
    """Median step time of a torchrun DDP run for K = 1 and K = GPUs (or 2 CPU processes).

    The K values alternate ``rounds`` times; the median is over every epoch but each run's first.
    """
    from topodecorr.experiments.data import load_dataset

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    counts = sorted({1, gpus}) if gpus else [1, 2]
    n_train = load_dataset("digits").sizes["train"]
    times: dict[int, list[float]] = {k: [] for k in counts}
    accs: dict[int, float] = {}
    steps = 1
    with tempfile.TemporaryDirectory(prefix="scaling-ddp-") as tmp:
        for r in range(rounds):
            for k in counts:
                out = Path(tmp) / f"k{k}-{r}.json"
                cmd = [torchrun, "--nproc-per-node", str(k), "--master-addr", "127.0.0.1", "--master-port",
                       str(_free_port()), "-m", "topodecorr", "train", "--dataset", "digits", "--network", "mlp",
                       "--penalty", "t1", "--weight", "0.001", "--max-epochs", str(epochs), "--patience",
                       str(epochs), "--device", device, "--quiet", "--output", str(out)]
                # one thread per process on the CPU (torchrun's default for K > 1), so that K = 1 and
                # K = 2 differ only in the number of processes
                env = dict(os.environ, OMP_NUM_THREADS="1" if device == "cpu" else str(max(1, (os.cpu_count() or 1) // k)))
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"torchrun K={k} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                result = json.loads(out.read_text())
                steps = math.ceil(n_train / result["spec"]["train"]["batch_size"])  # optimiser steps per epoch
                times[k] += [h["epoch_s"] for h in result["history"]][1:]  # the first epoch warms up
                accs[k] = result.get("test_acc")
                print(f"round {r + 1}/{rounds} DDP K={k} on {device}: median "
                      f"{1e3 * statistics.median(times[k]) / steps:.2f} ms per step so far", flush=True)
    rows = []
    for k in counts:
        med = statistics.median(times[k])
        rows.append({"name": "ddp", "device": device, "processes": k, "epochs_timed": len(times[k]),
                     "median_epoch_ms": 1e3 * med, "median_step_ms": 1e3 * med / steps,
                     "step_ratio_vs_1": None, "test_acc": accs[k]})
    for row in rows:
        row["step_ratio_vs_1"] = row["median_step_ms"] / rows[0]["median_step_ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repetitions of the three sweeps")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per run of the benchmark sweep")
    ap.add_argument("--ddp", action="store_true", help="also time a torchrun DDP run")
    ap.add_argument("--ddp-epochs", type=int, default=8, help="epochs of each DDP timing run")
    args = ap.parse_args()

    rows = bench_sweeps(args.rounds, args.epochs)
    if args.ddp:
        rows += bench_ddp(args.ddp_epochs, args.rounds)
    sweep_rows = [r for r in rows if r["name"] == "sweep"]
    md = ["# Scaling benchmark", "", f"Machine: {machine_info()['cpu']}, {os.cpu_count()} CPUs; "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}.", "",
          f"Sweep throughput ({sweep_rows[0]['runs']} runs x {args.epochs} epochs, median of {args.rounds} "
          "round-robin rounds):", "",
          markdown_table(sweep_rows, ["executor", "runs", "median_wall_s", "runs_per_min", "speedup_vs_local_1",
                                      "ray_init_s", "runs_per_min_with_init"]), ""]
    ddp_rows = [r for r in rows if r["name"] == "ddp"]
    if ddp_rows:
        if ddp_rows[0]["device"] == "cpu":
            md += ["DDP on GPUs: not measured (no GPU on this machine); below, the same torchrun path on the CPU.", ""]
        md += ["DDP step time (torchrun, the paper's MLP shape on digits, T1, global batch 256):", "",
               markdown_table(ddp_rows, ["device", "processes", "median_step_ms", "step_ratio_vs_1", "median_epoch_ms",
                                          "epochs_timed", "test_acc"]), ""]
    else:
        md += ["DDP step time: not measured (run with --ddp).", ""]
    paths = write_results("scaling", rows, settings=vars(args), markdown="\n".join(md))
    print("\n".join(md))
    print("written:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
