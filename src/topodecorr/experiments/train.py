"""One training run under the paper's protocol.

Protocol (defaults in :class:`~topodecorr.experiments.config.TrainConfig`):
SGD with Nesterov momentum, staircase exponential learning-rate decay
``lr * lr_decay ** floor(step / decay_steps)``, mini-batches of ``batch_size``
reshuffled every epoch, cross-entropy task loss plus ``weight * penalty`` on
*every* batch, early stopping on the validation loss with ``patience`` epochs
and the best epoch's weights restored, at most ``max_epochs`` epochs.

The decorrelation penalties (T1, T2, mean |corr|, DeCov) read the activations
of the training forward pass itself through :class:`topodecorr.Decorrelation`
hooks (no second forward pass); L1 and L2 act on all trainable parameters.

A non-finite loss (task or penalty, or a non-finite output) ends the run with
status ``diverged``; the paper drops such runs and so do the statistics, but
they stay in the results. After every epoch a checkpoint (model, optimiser,
scheduler, random-number states, early-stopping state, curves) is written
atomically with :func:`torch.save`; it is read back with
``torch.load(..., weights_only=True)``, so a checkpoint cannot run code, and
a killed run resumes at its last finished epoch with the same result as an
uninterrupted one (on the same machine and thread count).

Death statistics: after every epoch the network (eval mode) is run on a fixed
probe of ``probe_batch`` validation samples; the outputs of its activation
modules (hidden neurons after the nonlinearity, importance-sampled like the
regulariser) and its logits are pooled and the MST deaths of
``1 - |corr|`` computed with :func:`topodecorr.correlation_deaths`. The same
probe, for every penalty, gives the end-of-training death histograms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import topodecorr
from topodecorr import penalties
from topodecorr.monitor import death_summary
from topodecorr.neurons import Recorder, resolve_layers
from topodecorr.penalties import Penalty
from topodecorr.sampling import select_neurons

from .config import PENALTIES, PENALTY_VARIANTS, ConfigError, TrainConfig
from .store import StoreError

__all__ = [
    "CheckpointError",
    "RunSpec",
    "train_run",
    "penalty_of",
    "cached_dataset",
    "software_versions",
    "load_checkpoint",
    "resolve_device",
    "probe_deaths",
]

#: Largest correlation matrix kept for heat maps (neurons); float16 storage.
CORR_MAX_NEURONS = 192



@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; picklable and JSON-serialisable (for workers, Ray, the database).

    Attributes
    ----------
    dataset, data_dir, split_seed, val_fraction :
        The data (see :func:`topodecorr.experiments.data.load_dataset`).
    network : str
        The network's label in the sweep.
    model : str
        A name of :data:`topodecorr.experiments.models.MODELS`.
    model_params : tuple of (str, value)
        Keyword arguments of the model builder.
    penalty : str
        One of :data:`topodecorr.experiments.config.PENALTIES`.
    weight : float
        Penalty weight lambda (0 for ``none``).
    seed : int
        Seeds initialisation, batch order and dropout.
    train : TrainConfig
    keep_correlation : bool
        Also return a small correlation matrix of the final network (for heat maps).
    """

    dataset: str
    network: str
    model: str
    penalty: str
    weight: float
    seed: int
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model_params: tuple = ()
    data_dir: str | None = None
    split_seed: int = 0
    val_fraction: float = 0.2
    keep_correlation: bool = False

    def __post_init__(self) -> None:
        if self.penalty not in PENALTIES:
            raise ConfigError(f"penalty: unknown penalty {self.penalty!r}; choose from {list(PENALTIES)}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ConfigError(f"weight: must be a finite number, got {self.weight!r}")
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0, got {self.weight}")
        if self.penalty != "none" and self.weight == 0:
            raise ConfigError(f"weight: penalty {self.penalty!r} needs a weight > 0 (use penalty 'none' for no penalty)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {self.seed!r}")

    @property
    def key(self) -> tuple[str, str, float, int]:
        return (self.network, self.penalty, float(self.weight), self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        d["model_params"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_params}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        d = dict(d)
        d["train"] = TrainConfig.from_dict(d.get("train", {}))
        params = d.get("model_params", {}) or {}
        if isinstance(params, dict):
            params = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
        d["model_params"] = tuple(tuple(p) for p in params)
        return cls(**d)


def software_versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform(), "topodecorr": topodecorr.__version__}
    for name in ("torch", "numpy", "numba", "scipy", "scikit-learn", "scikit-posthocs", "matplotlib", "mnist1d"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    out["torch_threads"] = str(torch.get_num_threads())
    return out


def resolve_device(name: str) -> torch.device:
    """``"auto"`` becomes CUDA when available, else CPU; a missing CUDA raises a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device = \"cpu\"")
    return dev


@lru_cache(maxsize=4)
def cached_dataset(name: str, data_dir: str | None, split_seed: int, val_fraction: float):
    """:func:`topodecorr.experiments.data.load_dataset`, cached per process (the last four splits)."""
    from .data import load_dataset

    return load_dataset(name, data_dir=data_dir, split_seed=split_seed, val_fraction=val_fraction)


def _subset(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` of ``range(n)`` drawn by a seeded permutation, sorted (all of them when size >= n)."""
    if size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


# -- activations of the probe -----------------------------------------------------------------


def _probe_activations(model: nn.Module, x: torch.Tensor, sampling: str, fraction: float,
                       mode: str = "flatten") -> list[torch.Tensor]:
    """Per layer (samples, units) activations by the training rule (:mod:`topodecorr.neurons`, ``"auto"``).

    The layers :class:`topodecorr.Decorrelation` regularises in training, read
    the same way (for the harness's networks: every activation module's output,
    then the logits; with ``mode="channel"`` a convolutional map gives
    (B x positions, channels)). Hidden layers are sampled by the training API's
    own rule (:func:`topodecorr.sampling.select_neurons`; the output layer whole).
    """
    layers = resolve_layers(model, "auto", mode)
    with Recorder(model, layers) as recorder:
        model(x)
        records = recorder.take()
    acts = [r.matrix.detach() for r in records]
    picks = select_neurons(acts, [r.is_output for r in records], sampling, fraction)
    return [a if idx is None else a[:, idx] for a, idx in zip(acts, picks)]


@torch.no_grad()
def probe_deaths(model: nn.Module, x: torch.Tensor, cfg: TrainConfig, keep_correlation: bool = False) -> dict:
    """MST death statistics of ``model`` on the probe batch ``x`` (eval mode, no gradient).

    Returns
    -------
    dict
        ``neurons``, ``widths`` (sampled neurons per layer, in order), ``dead``
        (constant neurons), ``min_death``, ``mean_death``, ``max_death``
        (:func:`topodecorr.monitor.death_summary`), ``deaths`` (float32 array of
        shape (neurons - 1,); in ``"channel"`` mode the deaths of each layer's tree,
        (neurons - layers,)) and, with ``keep_correlation``, ``correlation``: the
        (m, m) correlation matrix of at most :data:`CORR_MAX_NEURONS` neurons spread
        evenly over the pooled set (in ``"channel"`` mode: the first layer's channels).
    """
    was_training = model.training
    model.eval()
    try:
        layers = _probe_activations(model, x, cfg.sampling, cfg.fraction, cfg.mode)
    finally:
        model.train(was_training)
    # one cloud of every layer side by side; in "channel" mode one per layer (their samples differ),
    # whose deaths are put together
    clouds = [torch.cat(layers, dim=1).float()] if cfg.mode != "channel" else [a.float() for a in layers]
    acts = clouds[0]
    out: dict[str, Any] = {"neurons": int(sum(c.shape[1] for c in clouds)),
                           "widths": [int(a.shape[1]) for a in layers]}
    if not all(torch.isfinite(c).all() for c in clouds):
        out.update(dead=None, deaths=None, **death_summary(None))
        return out
    dead = sum(int(topodecorr.normalize_activations(c)[1].sum()) for c in clouds)
    d = np.concatenate([topodecorr.correlation_deaths(c, kind=cfg.dissimilarity).deaths.cpu().numpy()
                        for c in clouds]).astype(np.float32)
    out.update(dead=dead, deaths=d, **death_summary(d))
    if keep_correlation:
        n = acts.shape[1]
        idx = torch.linspace(0, n - 1, min(n, CORR_MAX_NEURONS)).round().long().unique()
        out["correlation"] = topodecorr.correlation(acts[:, idx]).cpu().numpy()
    return out


# -- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over (X, y), eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, X.shape[0], batch):
            out = model(X[start : start + batch])
            yb = y[start : start + batch]
            total_loss += float(F.cross_entropy(out.float(), yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = max(1, X.shape[0])
    return total_loss / n, correct / n


# -- checkpoints ---------------------------------------------------------------------------


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a run checkpoint safely (``torch.load(..., weights_only=True)``: no code runs)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


class CheckpointError(StoreError):
    """A run checkpoint cannot be written (the message names the file and the reason)."""


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:  # opened here, so that a refusal names the file
            torch.save(state, fh)
        os.replace(tmp, path)  # atomic: a kill leaves the old or the new checkpoint, never half of one
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {exc.strerror or exc}; make the folder {path.parent} "
            "writable, or choose another place for the checkpoints"
        ) from None


#: The keys of a run checkpoint (see ``_Run.save``).
_CHECKPOINT_KEYS = ("identity", "epoch", "model", "optimizer", "scheduler", "rng", "history", "best")


def _read_checkpoint(path: Path, device: torch.device, set_aside: bool, log: Callable[[str], None]) -> dict | None:
    """The checkpoint at ``path``, or None when it is missing or unreadable.

    An unreadable checkpoint (empty, truncated, garbage, or not a run's) is set aside,
    renamed and never deleted (by the process that writes checkpoints: ``set_aside``),
    and the run restarts from scratch; ``log`` says so, naming both files.
    """
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path, map_location=device)
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"not a run checkpoint: no {', '.join(missing)}")
        return state
    except FileNotFoundError:  # set aside meanwhile by the rank that writes checkpoints
        return None
    except Exception as exc:  # torch.load raises EOFError, RuntimeError, UnpicklingError, ... on a bad file
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
        if set_aside:
            aside = _set_aside(path, "unreadable")
            log(f"checkpoint {path} is unreadable ({why}); set aside as {aside.name}, and the run restarts "
                "from scratch")
        return None


def _set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``path.WHY-YYYYmmdd-HHMMSS[-k]`` (a name not taken yet) and return it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        aside = path.with_name(f"{path.name}.{why}-{stamp}" + (f"-{k}" if k else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise CheckpointError(f"cannot set {path} aside: too many set-aside copies next to it; remove some")


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batches"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- the run ------------------------------------------------------------------------------


class _Diverged(Exception):
    pass


def penalty_of(label: str) -> tuple[Penalty | None, str]:
    """The registry entry (:data:`topodecorr.penalties.REGISTRY`) and dead-neuron policy of
    a sweep penalty label; ``(None, "keep")`` for ``none``, which adds no term at all.

    Examples
    --------
    >>> entry, dead = penalty_of("t2_live"); entry.name, entry.kind, dead
    ('t2', 'deaths', 'drop')
    >>> penalty_of("l1")[0].kind
    'parameters'
    """
    if label not in PENALTIES:
        raise ConfigError(f"penalty: unknown penalty {label!r}; choose from {list(PENALTIES)}")
    if label == "none":
        return None, "keep"
    name, dead = PENALTY_VARIANTS.get(label, (label, "keep"))
    return penalties.lookup(name), dead


class _PenaltyTerm:
    """The weighted penalty term of one run, read after every training forward pass.

    Activation and death penalties read the activations of that very forward pass
    through :class:`topodecorr.Decorrelation` hooks, attached once for the run
    (:meth:`hooks`); parameter penalties (L1, L2) read the model's weights.
    """

    def __init__(self, model: nn.Module, spec: RunSpec, penalty_mode: str) -> None:
        self.model, self.weight = model, float(spec.weight)
        self.entry, dead = penalty_of(spec.penalty)
        self.reg = None
        if self.entry is not None and self.entry.kind != "parameters":
            cfg = spec.train
            self.reg = topodecorr.Decorrelation(
                model,
                layers="auto",
                penalty=self.entry.name,
                dead_neurons=dead,
                weight=self.weight,
                dissimilarity=cfg.dissimilarity,
                sampling=cfg.sampling,
                fraction=cfg.fraction,
                # "channel": every channel a neuron and one tree per layer (layers differ in samples)
                **({"mode": "channel", "pooled": False} if cfg.mode == "channel" else {}),
                **({"max_samples": cfg.max_samples} if cfg.max_samples else {}),
                seed=spec.seed,
                on_nonfinite="raise",
                distributed=penalty_mode,  # under DDP: penalty of the gathered global batch, or per rank
                **({"alpha": cfg.t2_alpha} if self.entry.uses_alpha else {}),
            )

    def hooks(self) -> contextlib.AbstractContextManager:
        """Attach the capture hooks for the duration of a ``with`` block (nothing to attach otherwise)."""
        return self.reg if self.reg is not None else contextlib.nullcontext()

    def __call__(self, epoch: int) -> torch.Tensor | None:
        """The weighted penalty of the last forward pass, or None for ``none``."""
        if self.reg is not None:
            try:
                return self.reg.penalty()
            except FloatingPointError as exc:  # non-finite activations or penalty
                raise _Diverged(f"epoch {epoch}: {exc}") from None
        if self.entry is not None:
            return self.weight * self.entry(self.model)
        return None


def _device_splits(spec: RunSpec, data, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(Xtr, ytr, Xva, yva, Xte, yte) on ``device``, labels int64, with the budget subsets applied."""
    cfg = spec.train
    Xtr, ytr = (torch.as_tensor(a) for a in data.train)
    Xva, yva = (torch.as_tensor(a) for a in data.val)
    Xte, yte = (torch.as_tensor(a) for a in data.test)
    # budget subsets: the same seeded random samples for every run of a sweep (split_seed)
    if cfg.train_samples:
        keep = _subset(Xtr.shape[0], cfg.train_samples, spec.split_seed)
        Xtr, ytr = Xtr[keep], ytr[keep]
    if cfg.val_samples:
        keep = _subset(Xva.shape[0], cfg.val_samples, spec.split_seed + 1)
        Xva, yva = Xva[keep], yva[keep]
    Xtr, ytr, Xva, yva, Xte, yte = (t.to(device) for t in (Xtr, ytr, Xva, yva, Xte, yte))
    return Xtr, ytr.long(), Xva, yva.long(), Xte, yte.long()


class _Run:
    """One run's state: its data on the device, the model, optimiser and schedule, the
    curves and the early-stopping state. ``train_run`` drives it epoch by epoch."""

    def __init__(self, spec: RunSpec, data, ctx) -> None:
        from .models import build_model

        cfg = spec.train
        self.spec, self.cfg, self.ctx = spec, cfg, ctx
        self.Xtr, self.ytr, self.Xva, self.yva, self.Xte, self.yte = _device_splits(spec, data, ctx.device)
        self.probe_x = self.Xva[: cfg.probe_batch]
        torch.manual_seed(spec.seed)
        self.model = build_model(spec.model, data.input_shape, data.num_classes, **dict(spec.model_params))
        self.model.to(ctx.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov)
        # staircase exponential decay, stepped once per batch: lr * lr_decay ** floor(step / decay_steps)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.decay_steps, gamma=cfg.lr_decay)
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.penalty = _PenaltyTerm(self.model, spec, ctx.penalty_mode)
        # DDP: `net` trains (gradients averaged over ranks); `model`, the same weights, is evaluated and saved
        self.net = ctx.wrap(self.model)
        self.identity = json.dumps(spec.to_dict(), sort_keys=True)
        self.history: list[dict] = []
        self.best: dict[str, Any] = {"val_loss": math.inf, "epoch": -1, "state": None, "bad_epochs": 0}
        self.start_epoch, self.resumed_from, self.wall_before = 0, None, 0.0

    @property
    def stopped(self) -> bool:
        """Early stopping: ``patience`` epochs without a lower validation loss."""
        return self.best["bad_epochs"] >= self.cfg.patience

    def evaluate(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return self.ctx.evaluate(_evaluate, self.model, X, y)

    # -- the steps --------------------------------------------------------------------------

    def resume(self, path: Path | None, log: Callable[[str], None]) -> None:
        """Continue from the checkpoint at ``path`` when it exists and belongs to this run; one that
        cannot be read, or belongs to another run, is set aside (renamed) and the run starts afresh."""
        if path is None:
            return
        state = _read_checkpoint(path, self.ctx.device, self.ctx.is_main, log)
        if state is None:
            return
        if state["identity"] != self.identity:
            if self.ctx.is_main:
                aside = _set_aside(path, "other-run")
                log(f"checkpoint {path} belongs to another run (another configuration); set aside as "
                    f"{aside.name}, and this run starts from scratch")
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.gen, self.ctx.device)
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = self.resumed_from = int(state["epoch"]) + 1
        self.wall_before = float(state.get("wall_s", 0.0))

    def epoch(self, epoch: int) -> dict:
        """Train one epoch, score it (validation loss and accuracy, death statistics) and
        update the early-stopping state; returns the epoch's record."""
        spec, cfg, ctx = self.spec, self.cfg, self.ctx
        t0 = time.perf_counter()
        self.model.train()
        perm = torch.randperm(self.Xtr.shape[0], generator=self.gen).to(ctx.device)
        ctx.seed_epoch(spec.seed, epoch)
        lr_now = self.optimizer.param_groups[0]["lr"]
        sum_task = sum_pen = 0.0
        seen = batches = 0
        for idx in ctx.batches(perm, cfg.batch_size):  # this rank's share of each global batch
            task, term = self._step(idx, epoch)
            # running sums stay on the device: no extra host synchronisation per step
            sum_task = sum_task + task.detach().double() * idx.numel()
            if term is not None and spec.weight > 0:
                sum_pen = sum_pen + term.detach().double() / spec.weight
            seen += idx.numel()
            batches += 1
        sum_task, sum_pen, seen, batches = ctx.all_reduce_sum([float(sum_task), float(sum_pen), seen, batches])
        val_loss, val_acc = self.evaluate(self.Xva, self.yva)
        if not math.isfinite(val_loss):
            raise _Diverged(f"non-finite validation loss at epoch {epoch}")
        probe = probe_deaths(self.model, self.probe_x, cfg)
        record = {
            "epoch": epoch,
            "lr": lr_now,
            "train_loss": sum_task / max(1, seen),
            "penalty": sum_pen / max(1, batches) if spec.penalty != "none" else None,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "neurons": probe["neurons"],
            "dead": probe["dead"],
            "min_death": probe["min_death"],
            "mean_death": probe["mean_death"],
            "max_death": probe["max_death"],
            "epoch_s": time.perf_counter() - t0,
        }
        self.history.append(record)
        if val_loss < self.best["val_loss"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"val_loss": val_loss, "epoch": epoch, "state": state, "bad_epochs": 0}
        else:
            self.best["bad_epochs"] += 1
        return record

    def _step(self, idx: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimiser step on the samples ``idx``; returns the task loss and the penalty term."""
        xb, yb = self.Xtr[idx], self.ytr[idx]
        out = self.net(xb)  # the penalty's hooks capture this very forward pass
        if not self.ctx.all_finite(out):  # under DDP all ranks stop together
            raise _Diverged(f"non-finite network output at epoch {epoch}")
        task = F.cross_entropy(out, yb)
        term = self.penalty(epoch)
        loss = task if term is None else task + term
        if not self.ctx.all_finite(loss):
            raise _Diverged(f"non-finite loss at epoch {epoch} (task loss {task.item():.4g})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return task, term

    def save(self, path: Path, elapsed: float) -> None:
        """Checkpoint after the last finished epoch (``elapsed``: seconds of this invocation)."""
        _save_checkpoint(
            path,
            {
                "identity": self.identity,
                "epoch": self.history[-1]["epoch"],
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.gen, self.ctx.device),
                "history": self.history,
                "best": self.best,
                "wall_s": self.wall_before + elapsed,
            },
        )

    def finish(self, status: str, error: str | None) -> dict[str, Any]:
        """The result: on success the best epoch's weights are restored and scored."""
        result: dict[str, Any] = {
            "status": status,
            "error": error,
            "history": self.history,
            "epochs": len(self.history),
            "resumed_from": self.resumed_from,
            "versions": software_versions(),
            "deaths": None,
            "correlation": None,
        }
        if status == "done" and self.best["state"] is None:
            result.update(status="diverged", error="no finished epoch")
        elif status == "done":
            self.model.load_state_dict(self.best["state"])  # the paper keeps the best weights
            tr_loss, tr_acc = self.evaluate(self.Xtr, self.ytr)
            va_loss, va_acc = self.evaluate(self.Xva, self.yva)
            te_loss, te_acc = self.evaluate(self.Xte, self.yte)
            probe = probe_deaths(self.model, self.probe_x, self.cfg, keep_correlation=self.spec.keep_correlation)
            result.update(
                best_epoch=self.best["epoch"],
                train_loss=tr_loss,
                val_loss=va_loss,
                val_acc=va_acc,
                test_loss=te_loss,
                test_acc=te_acc,
                deaths=probe["deaths"],
                correlation=probe.get("correlation"),
                metrics={"train_acc": tr_acc, "neurons": probe["neurons"], "dead": probe["dead"],
                         "mean_death": probe["mean_death"], "min_death": probe["min_death"],
                         "layer_widths": probe["widths"]},
            )
        times = [h["epoch_s"] for h in self.history]
        result["epoch_s"] = float(np.mean(times)) if times else None
        return result


class _Progress:
    """Epoch progress of one run: a tqdm bar on a terminal; elsewhere (a log file, CI) one
    line per epoch on stderr when ``lines`` is set, else nothing."""

    def __init__(self, spec: RunSpec, start_epoch: int, lines: bool) -> None:
        self.label = f"{spec.network} {spec.penalty} {spec.weight:g} s{spec.seed}"
        self.total = spec.train.max_epochs
        self.bar = None
        self.lines = lines and not _is_terminal(sys.stderr)
        if _is_terminal(sys.stderr):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start_epoch, desc=self.label, unit="epoch", leave=False,
                            dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(val_acc=f"{record['val_acc']:.3f}", val_loss=f"{record['val_loss']:.3f}",
                                 refresh=False)
        elif self.lines:
            print(
                f"{self.label}: epoch {record['epoch'] + 1}/{self.total} train loss {record['train_loss']:.4f} "
                f"val loss {record['val_loss']:.4f} val acc {record['val_acc']:.3f} ({record['epoch_s']:.1f} s)",
                file=sys.stderr, flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _log_stderr(msg: str) -> None:
    print(f"topodecorr: {msg}", file=sys.stderr, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def train_run(
    spec: RunSpec,
    checkpoint: str | Path | None = None,
    *,
    data=None,
    progress: bool = False,
    epoch_lines: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    dist=None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train one network under the protocol and return its result.

    Parameters
    ----------
    spec : RunSpec
    checkpoint : path, optional
        Epoch checkpoint file: resumed from when it exists and matches ``spec``,
        rewritten after every epoch. Left in place; the caller deletes it. One that
        cannot be read (empty, truncated, garbage) or belongs to another run is set
        aside (renamed ``NAME.unreadable-DATE`` or ``NAME.other-run-DATE``, never
        deleted) and the run starts from scratch, said through ``log``.
    data : DatasetSplits, optional
        Preloaded data (default: loaded and cached per process).
    progress : bool
        Show the epochs: a tqdm bar when stderr is a terminal, else one line per
        epoch on stderr (see ``epoch_lines``).
    epoch_lines : bool
        Without a terminal, print those lines (``False``: nothing, as in sweeps,
        which print one line per run).
    on_epoch : callable, optional
        Called with each epoch's metrics dict (e.g. a heartbeat).
    dist : topodecorr.experiments.ddp.DistContext, optional
        This process's rank in a ``torchrun`` job: the model is wrapped in
        DistributedDataParallel, each global batch of ``batch_size`` is split
        over the ranks, metrics are all-reduced and only rank 0 writes the
        checkpoint (see :mod:`topodecorr.experiments.ddp`). Default: a
        :class:`~topodecorr.experiments.ddp.LocalContext` on ``spec.train.device``.
    log : callable, optional
        Receives one-line notes (a checkpoint set aside); default: printed to stderr.

    Returns
    -------
    dict
        ``status`` (``done`` or ``diverged``), ``history`` (per-epoch dicts), the
        best epoch's ``val_loss``/``val_acc``/``test_loss``/``test_acc``/``train_loss``,
        ``epochs``, ``best_epoch``, ``wall_s``, ``epoch_s`` (mean), ``resumed_from``,
        ``deaths`` (float32 array of the final network's MST deaths on the probe),
        ``correlation`` (or None), ``metrics`` (extra numbers), ``versions``, ``error``.
    """
    from .ddp import LocalContext

    t_start = time.perf_counter()
    cfg = spec.train
    ctx = dist if dist is not None else LocalContext(resolve_device(cfg.device))
    if data is None:
        data = cached_dataset(spec.dataset, spec.data_dir, spec.split_seed, float(spec.val_fraction))
    run = _Run(spec, data, ctx)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    run.resume(ckpt_path, log if log is not None else _log_stderr)
    shown = _Progress(spec, run.start_epoch, epoch_lines) if progress and ctx.is_main else None
    status, error = "done", None
    try:
        with run.penalty.hooks():  # attached once for the whole run
            for epoch in range(run.start_epoch, cfg.max_epochs):
                if run.stopped:
                    break
                record = run.epoch(epoch)
                if ckpt_path is not None and ctx.is_main:
                    run.save(ckpt_path, time.perf_counter() - t_start)
                if shown is not None:
                    shown.update(record)
                if on_epoch is not None:
                    on_epoch(record)
    except _Diverged as exc:
        status, error = "diverged", str(exc)
    finally:
        if shown is not None:
            shown.close()
    result = run.finish(status, error)
    result["wall_s"] = run.wall_before + time.perf_counter() - t_start  # over all invocations
    return result
