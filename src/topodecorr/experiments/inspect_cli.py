"""``topodecorr inspect``: the redundancy report of a trained model, from the command line.

::

    topodecorr inspect runs/quick/checkpoints/RUN.pt --out inspect/       # a harness run checkpoint
    topodecorr inspect model.pt --dataset digits --unsafe-load --out insp/  # a torch.save'd nn.Module

The model file is read with ``torch.load(..., weights_only=True)``, which
cannot run code. A harness run checkpoint (the epoch checkpoints a sweep or
``topodecorr train --checkpoint`` writes) loads that way: its run
specification names the network and the dataset, and the best epoch's weights
are used (``--weights last`` for the last epoch's). A whole module saved with
``torch.save(model)`` is a pickle that runs code when loaded: it is read only
with ``--unsafe-load``, with a warning, and only for files you trust. A bare
``state_dict`` holds weights but no architecture and is refused.

The model then runs (eval mode, no gradients) over the first ``--samples``
samples of a split of the dataset in batches, with a progress bar, and
:func:`topodecorr.inspect` writes ``OUT/inspect.md``, ``OUT/deaths.png`` and
``OUT/pairs.png``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

from .config import ConfigError

__all__ = ["add_parser", "run", "load_model"]


def add_parser(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """Register the ``inspect`` subcommand on an ``add_subparsers`` object."""
    p = sub.add_parser(
        "inspect", help="redundancy report of a trained model (MST deaths, dead neurons, redundant pairs)",
        formatter_class=formatter_class,
        description="Run a trained model over a dataset split and write OUT/inspect.md with figures: per layer "
                    "and pooled, the MST deaths, the dead neurons and the most redundant neuron pairs.",
    )
    p.add_argument("model", help="a harness run checkpoint, or a torch.save'd nn.Module (needs --unsafe-load)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--split", choices=("train", "val", "test"), default="val", help="which split to run")
    p.add_argument("--samples", type=int, default=2048, help="samples of the split to use (the first ones)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    p.add_argument("--layers", action="append", default=None, metavar="PATTERN",
                   help="module name pattern to read (repeatable; default: the regulariser's 'auto' rule)")
    p.add_argument("--mode", choices=("flatten", "channel", "features_last"), default=None,
                   help="how a layer output becomes neurons (default: the regulariser's rule)")
    p.add_argument("--pairs", type=int, default=10, help="most redundant pairs listed per layer")
    p.add_argument("--weights", choices=("best", "last"), default="best",
                   help="harness checkpoint: the best epoch's weights or the last epoch's")
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow a pickled nn.Module (loading it runs code from the file: only for files you trust)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", default="inspect", help="output folder (inspect.md, deaths.png, pairs.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0].strip() if text else ""


def load_model(path: str | Path, *, weights: str = "best", unsafe: bool = False):
    """Read a model file: ``(module, None)`` for a pickled nn.Module, ``(RunSpec, state_dict)`` for a
    harness run checkpoint; :class:`ConfigError` with what to do otherwise."""
    import torch
    from torch import nn

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower() or not zipfile.is_zipfile(path):
            raise ConfigError(f"{path} is not a file torch.load can read: {_first_line(exc)}") from None
        if not unsafe:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            named = f", here {found.group(1)}" if found else ""
            raise ConfigError(
                f"{path} is not loadable with weights_only=True: it holds pickled objects (e.g. a whole "
                f"nn.Module saved with torch.save(model){named}), and loading them runs code from the file. "
                "Pass --unsafe-load if you trust the file."
            ) from None
        warnings.warn(
            f"loading {path} with weights_only=False (--unsafe-load): this runs code from the file",
            stacklevel=2,
        )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - whatever the unpickled code raised
            raise ConfigError(f"{path}: torch.load failed ({type(exc2).__name__}: {exc2})") from None
    except Exception as exc:  # a corrupt or foreign file fails in many ways (KeyError, EOFError, ...)
        why = _first_line(exc) or type(exc).__name__
        raise ConfigError(f"{path} is not a file torch.load can read ({type(exc).__name__}: {why})") from None
    if isinstance(obj, nn.Module):
        return obj, None
    if isinstance(obj, dict) and "identity" in obj and "model" in obj:
        return _from_checkpoint(path, obj, weights)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"{path} is a state_dict (weights without the architecture), not a model: save the module "
            "itself with torch.save(model) (and pass --unsafe-load), or use a harness run checkpoint"
        )
    raise ConfigError(
        f"{path} holds a {type(obj).__name__}, not a model: pass a harness run checkpoint or a "
        "torch.save'd nn.Module"
    )


def _from_checkpoint(path: Path, state: dict, weights: str):
    from .train import RunSpec

    try:
        spec = RunSpec.from_dict(json.loads(state["identity"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: the checkpoint's run specification is unreadable: {exc}") from None
    best = state.get("best") or {}
    weights_state = best.get("state") if weights == "best" and best.get("state") is not None else state["model"]
    return spec, weights_state


def run(args) -> int:
    """Carry out ``topodecorr inspect`` (argparse namespace from :func:`add_parser`)."""
    import torch

    import topodecorr

    from .data import load_dataset
    from .models import build_model

    if args.samples < 2 or args.batch_size < 1:
        raise ConfigError("--samples must be >= 2 and --batch-size >= 1")
    loaded, extra = load_model(args.model, weights=args.weights, unsafe=args.unsafe_load)
    spec = None
    if isinstance(loaded, torch.nn.Module):
        model = loaded
        if args.dataset is None:
            raise ConfigError("a torch.save'd module does not name its dataset: pass --dataset NAME")
        data = load_dataset(args.dataset, args.data_dir)
    else:  # a harness run checkpoint: build its network, load its weights
        spec, state = loaded, extra
        data = load_dataset(args.dataset or spec.dataset, args.data_dir or spec.data_dir,
                            spec.split_seed, spec.val_fraction)
        try:
            model = build_model(spec.model, data.input_shape, data.num_classes, **dict(spec.model_params))
            model.load_state_dict(state)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"{args.model}: the checkpoint's weights do not fit network {spec.model!r} on "
                              f"{data.name}: {str(exc).splitlines()[0]}") from None
    try:
        device = torch.device(args.device)
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"--device {args.device}: {exc}") from None
    X = getattr(data, args.split)[0][: args.samples]
    batches = [X[i : i + args.batch_size] for i in range(0, len(X), args.batch_size)]
    if not args.quiet:
        from tqdm.auto import tqdm

        # a bar on a terminal only: piped or logged, its carriage returns would run into the output
        batches = tqdm(batches, desc=f"inspect {data.name} {args.split}", unit="batch", leave=False, disable=None)
    try:
        report = topodecorr.inspect(model, batches, layers=args.layers or "auto", mode=args.mode, k=args.pairs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot inspect {args.model} on {data.name}: {exc}") from None
    except RuntimeError as exc:  # the model cannot run on these inputs (shapes, dtypes)
        raise ConfigError(
            f"the model cannot run on {data.name} inputs of shape {tuple(X.shape[1:])}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    path = report.save(Path(args.out))
    for c in report.clouds:
        s = c.summary()
        top = f"  top pair {c.pairs[0]}" if c.pairs else ""
        print(f"{c.name:24s} neurons {s['neurons']:5d}  dead {s['dead']:4d}{top}")
    print(f"report: {path}")
    return 0
