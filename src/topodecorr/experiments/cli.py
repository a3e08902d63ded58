"""The ``topodecorr`` command line: reproduce, sweep, report, train, presets.

Examples::

    topodecorr presets
    topodecorr reproduce --preset quick                  # -> runs/quick/report.md
    topodecorr sweep my-sweep.toml --out runs/mine --workers 2
    topodecorr report runs/mine
    topodecorr train --dataset digits --network mlp --penalty t1 --weight 0.01 --max-epochs 20

Errors in the input (configuration, data, results folder) print one clear line
and exit with status 2; a sweep in which some run failed (an error; a diverged
run is a result) exits with status 1 and names the failed runs; an interrupted
sweep exits with 130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import (
    PENALTIES,
    ConfigError,
    TrainConfig,
    apply_override,
    check_network,
    list_presets,
    load_preset,
    load_sweep,
    parse_network,
)

__all__ = ["main", "build_parser"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default == [] or action.default is False:
            return text
        return super()._get_help_string(action)


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="parallel worker processes; 0 = one per CPU core (torch threads are divided among them)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset files (default: the dataset's usual places)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set train.max_epochs=50 --set 'seeds=[0,1]' "
                        "(repeatable; VALUE is a TOML value)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the Friedman/Nemenyi tests")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the last checkpoint of finished runs")
    p.add_argument("--stale-after", type=float, default=1800.0,
                   help="seconds without heartbeat after which another host's running run is taken over")
    p.add_argument("--max-runs", type=int, default=None, help="stop after starting this many runs (partial sweep)")
    p.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (else bars on a terminal, one line per finished run otherwise)")
    g = p.add_argument_group("scaling out (docs/scaling.md)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where runs execute: local processes, or Ray tasks on this machine or a Ray cluster "
                        "(needs topodecorr[ray]); with ray, --workers caps the runs in flight")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto', HOST:6379, ray://HOST:10001); default: a private local instance")
    g.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs (and torch threads) each Ray task asks for")
    g.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray task asks for (fractions share one)")
    g.add_argument("--max-retries", type=int, default=3,
                   help="Ray retries of a run whose worker died; the retry resumes from its last epoch checkpoint")
    g.add_argument("--checkpoint-dir", default=None,
                   help="folder of the epoch checkpoints (default: OUT/checkpoints); with Ray on several machines "
                        "it must be storage every node can reach")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with the paper's defaults (reused by the DDP entry point)."""
    g = p.add_argument_group("training protocol (defaults: the paper's)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=f.name)
        else:
            typ = {"float": float, "int": int, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            g.add_argument(flag, dest=f.name, type=typ, default=f.default, help=_TRAIN_HELP.get(f.name, f.name))


_TRAIN_HELP = {
    "lr": "SGD learning rate",
    "momentum": "SGD momentum",
    "lr_decay": "staircase exponential decay factor of the learning rate",
    "decay_steps": "optimiser steps between two learning-rate decays",
    "batch_size": "training batch size (the regulariser sees the same batch)",
    "patience": "early stopping: epochs without a lower validation loss",
    "max_epochs": "maximum number of epochs",
    "sampling": "neuron sampling: all | importance",
    "fraction": "fraction p of each hidden layer kept by importance sampling",
    "dissimilarity": "abs (1 - |corr|) | sqrt (sqrt(1 - corr^2))",
    "t2_alpha": "weight of the std term in T2",
    "probe_batch": "validation samples of the death-statistics probe",
    "device": "cpu | cuda | cuda:N | auto",
    "train_samples": "use a fixed random subset of N training samples (0: all; a budget knob, not the paper's)",
    "val_samples": "use a fixed random subset of N validation samples (0: all)",
    "mode": "conv layers as neurons: flatten (channel x position, one cloud) | channel (a tree per layer)",
    "max_samples": "rows per point cloud the penalty correlates, drawn each step (0: every row)",
}


_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; building it imports no torch (the name lists come from plain tuples)."""
    from .data import DATASETS
    from .models import MODELS

    parser = argparse.ArgumentParser(
        prog="topodecorr",
        description="Reproduce 'Decorrelating neurons using persistence' (Ballester et al., 2024): "
                    "sweeps of penalties on networks, a results database, statistics and a report.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reproduce", help="run a named preset end to end and write its report",
                       formatter_class=_Formatter,
                       description="Run a preset sweep (resuming a previous attempt) and write OUT/report.md.")
    p.add_argument("--preset", required=True, help="preset name (see `topodecorr presets`)")
    p.add_argument("--out", default=None, help="output folder (default: runs/PRESET/)")
    _add_sweep_options(p)

    p = sub.add_parser("sweep", help="run a sweep described by a TOML file", formatter_class=_Formatter,
                       description="Run (or resume) the sweep in CONFIG into OUT; finished runs are skipped.")
    p.add_argument("config", help="TOML sweep file")
    p.add_argument("--out", required=True, help="output folder (results.sqlite, checkpoints/, report.md)")
    _add_sweep_options(p)

    p = sub.add_parser("report", help="write report.md of a sweep folder, or one report pooling several",
                       formatter_class=_Formatter,
                       description="Statistics and figures of the sweep in DIR, written to DIR/report.md. "
                                   "With --combine DIR... --out OUT: one comparison pooling several sweeps "
                                   "(blocks = their (dataset, network) pairs), written to OUT/report.md.")
    p.add_argument("dir", nargs="?", help="sweep folder holding results.sqlite")
    p.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                   help="sweep folders to pool into one comparison (needs --out)")
    p.add_argument("--out", default=None, help="folder of the combined report (with --combine)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the Friedman/Nemenyi tests")

    p = sub.add_parser("train", help="train a single run", formatter_class=_Formatter,
                       description="Train one network with one penalty under the paper's protocol; "
                                   "print (and optionally save) its result. Epochs count from 1 "
                                   "(best_epoch, the history), as in the progress lines.")
    p.add_argument("--dataset", default="digits", choices=DATASETS, metavar="NAME",
                   help="dataset: " + " | ".join(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the dataset's usual places)")
    p.add_argument("--network", default="mlp", choices=MODELS, metavar="NAME",
                   help="network: " + " | ".join(MODELS) + " (parameters: --param)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="model parameter, e.g. --param depth=2 --param 'hidden=[64, 32]' (repeatable; TOML value)")
    p.add_argument("--penalty", default="none", choices=PENALTIES, metavar="NAME",
                   help="penalty: " + " | ".join(PENALTIES))
    p.add_argument("--weight", type=float, default=0.0, help="penalty weight lambda (> 0 unless --penalty none)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order, dropout")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction of the training set")
    p.add_argument("--checkpoint", default=None, help="epoch checkpoint file (resumed from when present)")
    p.add_argument("--output", default=None, help="write the result (JSON) to this file")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (else a bar on a terminal, one line per epoch on stderr otherwise)")
    p.add_argument("--distributed-penalty", choices=("global", "local"), default="global",
                   help="under torchrun (DDP): the penalty of the global batch gathered from all ranks, or per rank")
    _add_train_options(p)

    sub.add_parser("presets", help="list the shipped presets", formatter_class=_Formatter,
                   description="List the shipped presets with their descriptions.")
    from .inspect_cli import add_parser as _add_inspect  # torch is imported only when it runs

    _add_inspect(sub, _Formatter)
    return parser


def _print_error(msg: str) -> None:
    print(f"topodecorr: error: {msg}", file=sys.stderr)


def _check_sweep_options(args) -> None:
    """Refuse option values that make no sense, before anything is read or written."""
    if args.workers < 0:
        raise ConfigError(f"--workers: the number of worker processes must be 0 (one per CPU core) or more, "
                          f"got {args.workers}")
    if args.max_runs is not None and args.max_runs < 1:
        raise ConfigError(f"--max-runs: the number of runs to start must be 1 or more, got {args.max_runs} "
                          "(leave the option out to run every run)")
    if not args.stale_after > 0:
        raise ConfigError(f"--stale-after: seconds without heartbeat must be positive, got {args.stale_after:g}")
    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha: the significance level must lie in (0, 1), got {args.alpha:g}")


def _say_failed(counts, out: Path) -> int:
    """Name the failed runs on stderr; the exit status: 1 when some run failed, else 0."""
    if not counts.failed:
        return 0
    total = sum(counts.values())
    lines = [f"{len(counts.failed)} of {total} runs failed (an error, unlike a diverged run, which is a result):"]
    lines += [f"  {label}: {error}" for label, error in counts.failed]
    lines.append(f"Their tracebacks are in {out / 'results.sqlite'} (table runs, column error); "
                 "run the same command again to retry them.")
    _print_error("\n".join(lines))
    return 1


def _sweep(args, config, out: Path) -> int:
    from .report import write_report
    from .sweep import cpu_count, run_sweep

    _check_sweep_options(args)
    workers = args.workers if args.workers > 0 else max(1, min(cpu_count(), len(config.grid())))
    executor = None
    if args.executor == "ray":
        from .ray_executor import RayExecutor

        try:
            executor = RayExecutor(args.ray_address, num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run,
                                   max_retries=args.max_retries, max_in_flight=args.workers if args.workers > 0 else None)
        except (ImportError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        workers = executor.capacity
    t0 = time.perf_counter()
    try:
        counts = run_sweep(config, out, workers=workers, executor=executor, progress=not args.quiet,
                           stale_after=args.stale_after, keep_checkpoints=args.keep_checkpoints,
                           max_runs=args.max_runs, checkpoint_dir=args.checkpoint_dir)
    finally:
        if executor is not None:
            executor.shutdown()
    elapsed = time.perf_counter() - t0
    print(f"runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" ({elapsed:.1f} s, {workers} worker(s))")
    if args.keep_checkpoints and counts.ran == 0:
        print("topodecorr: note: --keep-checkpoints kept nothing: no run was re-run (every run of this sweep had "
              "finished before); checkpoints are kept only for runs that train in this invocation "
              "(use a new --out to train them again)", file=sys.stderr)
    if not args.no_report:
        path, table = write_report(out, alpha=args.alpha)
        print(table)
        print(f"report: {path}")
    sys.stdout.flush()
    return _say_failed(counts, out)


def _as_option(message: str) -> str:
    """A configuration error worded for ``train``'s options: ``train.max_epochs: ...`` -> ``--max-epochs: ...``."""
    key, sep, rest = message.partition(": ")
    if sep and key.startswith("train."):
        key = key[len("train."):]
    if sep and (key in _TRAIN_FIELDS or key in ("penalty", "weight", "seed")):
        return f"--{key.replace('_', '-')}: {rest}"
    if message.startswith("unknown parameter"):
        return f"--param: {message}"
    return message


def _cmd_train(args) -> int:
    from .train import RunSpec

    params: dict = {}
    for assignment in args.params:
        apply_override(params, assignment, flag="--param")
    net = parse_network({"model": args.network, "params": params}, "--network")
    try:
        check_network(net)  # the name itself is one of argparse's choices
        spec = RunSpec(
            dataset=args.dataset, network=args.network, model=args.network, model_params=net.params,
            penalty=args.penalty, weight=float(args.weight), seed=args.seed,
            train=TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}),
            data_dir=args.data_dir, split_seed=args.split_seed, val_fraction=args.val_fraction,
        )
    except ConfigError as exc:
        raise ConfigError(_as_option(str(exc))) from None
    _build_or_refuse(spec)
    from . import ddp
    from .train import train_run

    ctx = None
    if ddp.launched_by_torchrun():  # this process is one rank of a DistributedDataParallel run
        ctx = ddp.setup(device=args.device, penalty_mode=args.distributed_penalty)
        finished = False
        try:
            ctx.check_batch_size(spec.train.batch_size)
            result = train_run(spec, args.checkpoint, progress=not args.quiet, dist=ctx)
            finished = True
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        finally:
            ddp.teardown(synchronize=finished)
        if not ctx.is_main:  # rank 0 alone prints and writes
            return ddp.leave(0 if result["status"] == "done" else 1)
    else:
        result = train_run(spec, args.checkpoint, progress=not args.quiet)
    _count_epochs_from_one(result)
    shown = {k: result.get(k) for k in ("status", "epochs", "best_epoch", "train_loss", "val_loss", "val_acc",
                                         "test_loss", "test_acc", "wall_s", "error")}
    print(json.dumps(shown, indent=2))
    if args.output:
        payload = {k: v for k, v in result.items() if k not in ("deaths", "correlation")}
        payload["spec"] = spec.to_dict()
        payload["world_size"] = 1 if ctx is None else ctx.world_size
        if result.get("deaths") is not None:
            payload["deaths"] = [float(x) for x in result["deaths"]]
        Path(args.output).write_text(json.dumps(payload, indent=2, default=float) + "\n")
    status = 0 if result["status"] == "done" else 1
    return status if ctx is None else ddp.leave(status)


def _count_epochs_from_one(result: dict) -> None:
    """Number the epochs of ``train``'s output from 1, as its progress lines do ("epoch 3/3"):
    ``best_epoch`` and the ``epoch`` of every history record (the results database, like
    :func:`~topodecorr.experiments.train.train_run`, keeps the 0-based index)."""
    if result.get("best_epoch") is not None:
        result["best_epoch"] = int(result["best_epoch"]) + 1
    result["history"] = [{**h, "epoch": int(h["epoch"]) + 1} for h in result.get("history", [])]


def _build_or_refuse(spec) -> None:
    """Build the network once for the dataset (read here, cached for the run): a parameter
    the model refuses is an option error before any training."""
    from .models import build_model
    from .train import cached_dataset

    data = cached_dataset(spec.dataset, spec.data_dir, spec.split_seed, float(spec.val_fraction))
    try:
        build_model(spec.model, data.input_shape, data.num_classes, **dict(spec.model_params))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--param: {exc}") from None


def _cmd_report(args) -> int:
    from .report import write_combined_report, write_report

    if args.combine is None:
        if args.dir is None or args.out is not None:
            raise ConfigError("report: give one sweep folder DIR, or --combine DIR... --out OUT")
        path, table = write_report(Path(args.dir), alpha=args.alpha)
    else:
        if args.dir is not None or args.out is None:
            raise ConfigError("report --combine DIR...: name the output folder with --out OUT "
                              "(and list every sweep folder after --combine)")
        path, table = write_combined_report([Path(d) for d in args.combine], Path(args.out), alpha=args.alpha)
    print(table)
    print(f"report: {path}")
    return 0


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the kill test in a subprocess
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``topodecorr`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .store import StoreError  # also the train module's CheckpointError

    try:
        from .data import DataError
    except ImportError:  # pragma: no cover
        DataError = ConfigError  # type: ignore[misc,assignment]
    if argv is None:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "presets":
            for name, desc in list_presets().items():
                print(f"{name:22s} {desc}")
            return 0
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "inspect":
            from .inspect_cli import run as _inspect

            return _inspect(args)
        if args.command == "reproduce":
            config = load_preset(args.preset, args.sets, args.data_dir, check_names=True)
            out = Path(args.out) if args.out else Path("runs") / args.preset
            return _sweep(args, config, out)
        if args.command == "sweep":
            config = load_sweep(args.config, args.sets, args.data_dir, check_names=True)
            return _sweep(args, config, Path(args.out))
    except (ConfigError, StoreError, DataError) as exc:
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        _print_error("interrupted; run the same command again to resume (finished runs are kept)")
        return 130
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            _print_error("terminated; run the same command again to resume (finished runs are kept)")
        raise
    parser.error(f"unknown command {args.command!r}")
    return 2

