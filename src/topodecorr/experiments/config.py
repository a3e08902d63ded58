"""Configuration of the reproduction: the paper's protocol as frozen dataclasses.

Every number of the protocol lives in :class:`TrainConfig` with the paper's
default (Ballester, Casacuberta, Escalera, "Decorrelating neurons using
persistence", PMLR 228, 2024, Sec. 5 and the published configuration files).
A sweep is the grid ``networks x penalties x weights x seeds`` described by
:class:`SweepConfig`; sweeps are written as TOML files (parsed with
:mod:`tomllib`, never evaluated) or taken from the named presets shipped in
``topodecorr/experiments/presets/``.

The learning rate follows the paper's staircase exponential decay::

    lr(it) = lr * lr_decay ** floor(it / decay_steps)

where ``it`` counts optimiser steps (batches) from the start of training.

A sweep file looks like this (every key optional except ``dataset``)::

    name = "my-sweep"
    dataset = "digits"
    networks = ["mlp", "mlp-deep", { label = "vgg-small", model = "vgg", params = { depth = 2 } }]
    penalties = ["none", "l2", "t1"]
    weights = [1e-3, 1e-1]
    seeds = [0, 1, 2]
    [train]
    max_epochs = 50
    patience = 5

Two-stage sweeps
----------------
A grid of all of the paper's weights on every seed costs more than it tells. With a
``[stages]`` table a sweep runs in two stages into the same folder, one command each
(both resume like any sweep):

* **stage 1** (``stages.run = 1``, the default): every weight of ``weights`` on the
  ``wide_seeds`` only;
* **stage 2** (``--set stages.run=2``): every seed at, per network and penalty, the
  weight with the best mean validation accuracy over the wide seeds and its
  ``neighbours`` nearest weights of the grid on each side
  (:func:`stage_two_weights`). The runs of stage 1 are kept; the choice per seed is
  then made among those weights only (:func:`selection_weights`).

``split_per_seed = true`` draws the train / validation split afresh for every seed
(split seed ``split_seed + seed``), so that seeds also sample the split.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "ConfigError",
    "PENALTIES",
    "DECORRELATION_PENALTIES",
    "PENALTY_VARIANTS",
    "PAPER_WEIGHTS",
    "NetworkSpec",
    "Stages",
    "TrainConfig",
    "SweepConfig",
    "parse_network",
    "check_dataset_name",
    "check_network",
    "parse_sweep",
    "stage_two_weights",
    "selection_weights",
    "apply_override",
    "load_sweep",
    "list_presets",
    "preset_path",
    "load_preset",
]


class ConfigError(ValueError):
    """A sweep or training configuration is invalid (the message says which key and why)."""


#: Penalties compared in a sweep. ``none`` is the unregularised baseline (one run,
#: weight 0); ``l1``/``l2`` act on all trainable parameters; the others act on the
#: activations of the training batch through :class:`topodecorr.Decorrelation`.
#: ``t2_live`` is T2 with ``dead_neurons="drop"``: neurons constant over the batch leave the
#: point cloud instead of counting as uncorrelated (the paper's convention). There is no
#: ``t1_live``: dead neurons join the tree with deaths of 1 and add 1 - 1 = 0 to T1, so T1's
#: value and gradient are the same under both policies (tests/test_functional.py).
#: ``decov`` is DeCov of one cloud of the hidden layers and the logits; ``decov_layer`` is
#: DeCov as its paper defines it (each hidden layer on its own, summed, no logits);
#: ``act_l2`` (``||A||^2 / B`` of the same neurons as ``decov``) is a scale control: it
#: shrinks activations and logits without decorrelating them.
PENALTIES: tuple[str, ...] = (
    "none", "l1", "l2", "mean_abs_corr", "decov", "decov_layer", "act_l2", "t1", "t2", "t2_live"
)

#: Penalties computed from the captured activations (the rest act on weights).
DECORRELATION_PENALTIES: tuple[str, ...] = ("mean_abs_corr", "decov", "decov_layer", "act_l2", "t1", "t2", "t2_live")

#: Sweep penalty label -> (library penalty, dead-neuron policy) for the labels that differ.
PENALTY_VARIANTS: dict[str, tuple[str, str]] = {"t2_live": ("t2", "drop")}

#: The paper's regulariser-weight grid lambda.
PAPER_WEIGHTS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 100.0)


@dataclass(frozen=True)
class TrainConfig:
    """The training protocol; defaults are the paper's.

    Attributes
    ----------
    lr : float
        SGD learning rate (paper: 0.01).
    momentum : float
        SGD momentum (paper: 0.9).
    nesterov : bool
        Nesterov momentum (paper: yes).
    lr_decay : float
        Staircase exponential decay factor of the learning rate (paper: 0.95).
    decay_steps : int
        Optimiser steps between two decays (paper: 3520, i.e. about 18.7 epochs
        of 188 batches on the 48k MNIST training split).
    batch_size : int
        Training batch size; also the batch the regulariser sees (paper: 256).
    patience : int
        Early stopping: epochs without a lower validation loss before stopping
        (paper: 20). The weights of the best epoch are restored.
    max_epochs : int
        Hard limit on epochs (paper: 1200).
    sampling : str
        Neuron sampling of the decorrelation penalties: ``"all"`` or the paper's
        ``"importance"`` (keep the top ``fraction`` of each hidden layer by mean
        |activation|; the output layer is always kept).
    fraction : float
        Fraction ``p`` for importance sampling (paper: 1.0 for the MLPs, 0.005 for
        the CIFAR-10 CNNs).
    dissimilarity : str
        ``"abs"`` (1 - |corr|, the paper's) or ``"sqrt"`` (sqrt(1 - corr^2)).
    t2_alpha : float
        Weight of the std term in T2 (paper: 0.5).
    probe_batch : int
        Validation samples used, after every epoch and at the end, to measure the
        MST deaths of the network (the same for every penalty, so comparable).
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (``"auto"``: CUDA when available).
    train_samples, val_samples : int
        Use only N samples of the training / validation split (a seeded random subset,
        the same for every run of a sweep);
        0 (default) uses the whole split. A budget knob, not the paper's protocol:
        a report of such a sweep must say so. The test split is never reduced.
    mode : str
        How a convolutional layer's output becomes neurons: ``"flatten"`` (every
        channel x position a neuron, all layers in one point cloud: the paper's, with
        importance sampling for CNNs) or ``"channel"`` (every channel a neuron, its
        positions samples, one point cloud and tree per layer). Dense layers are the
        same in both.
    max_samples : int
        Rows (samples) per point cloud the penalty correlates, drawn afresh at every
        step (0, the default: every row). A convolutional layer in ``"channel"`` mode
        has batch x positions rows (200,704 for a 28x28 map at batch 256); a few
        thousand estimate its channels' correlations to about ``1 / sqrt(max_samples)``.
    """

    lr: float = 0.01  # paper: SGD learning rate 0.01
    momentum: float = 0.9  # paper: momentum 0.9
    nesterov: bool = True  # paper: Nesterov momentum
    lr_decay: float = 0.95  # paper: staircase exponential decay 0.95 ...
    decay_steps: int = 3520  # ... every 3520 optimiser steps
    batch_size: int = 256  # paper: batch 256 (the regulariser sees the same batch)
    patience: int = 20  # paper: early stopping on validation loss, patience 20
    max_epochs: int = 1200  # paper: at most 1200 epochs
    sampling: str = "all"  # paper: all neurons for the MLPs ("importance" for CNNs)
    fraction: float = 1.0  # paper: p = 1.0 (MLPs), p = 0.005 (CIFAR-10 CNNs)
    dissimilarity: str = "abs"  # paper: d = 1 - |corr|
    t2_alpha: float = 0.5  # paper: T2 = 0.5 std - 0.5 mean
    probe_batch: int = 256  # ours: validation samples for the death statistics
    device: str = "cpu"  # ours: where to train ("auto" = CUDA when available)
    train_samples: int = 0  # ours: 0 = the whole training split (the paper); N = a fixed random subset
    val_samples: int = 0  # ours: 0 = the whole validation split (the paper); N = a fixed random subset
    mode: str = "flatten"  # paper: flattened maps; "channel": every channel a neuron, a tree per layer
    max_samples: int = 0  # ours: 0 = every row of a cloud; N = N rows drawn per step

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"train.{key}: {why}")

        for key in ("lr", "momentum", "lr_decay", "fraction", "t2_alpha"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(key, f"must be a finite number, got {value!r}")
        for key in ("decay_steps", "batch_size", "patience", "max_epochs", "probe_batch", "train_samples", "val_samples",
                    "max_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(key, f"must be an integer, got {value!r}")
        if not isinstance(self.nesterov, bool):
            raise bad("nesterov", f"must be true or false, got {self.nesterov!r}")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", f"must lie in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise bad("nesterov", "Nesterov momentum needs momentum > 0")
        if not 0 < self.lr_decay <= 1:
            raise bad("lr_decay", f"must lie in (0, 1], got {self.lr_decay}")
        if self.decay_steps < 1:
            raise bad("decay_steps", f"must be >= 1, got {self.decay_steps}")
        if self.batch_size < 2:
            raise bad("batch_size", f"must be >= 2 (correlations need two samples), got {self.batch_size}")
        if self.patience < 1:
            raise bad("patience", f"must be >= 1, got {self.patience}")
        if self.max_epochs < 1:
            raise bad("max_epochs", f"must be >= 1, got {self.max_epochs}")
        if self.probe_batch < 2:
            raise bad("probe_batch", f"must be >= 2, got {self.probe_batch}")
        for key in ("train_samples", "val_samples"):
            if getattr(self, key) < 0 or getattr(self, key) == 1:
                raise bad(key, f"must be 0 (the whole split) or >= 2 samples, got {getattr(self, key)}")
        if self.sampling not in ("all", "importance"):
            raise bad("sampling", f"must be 'all' or 'importance', got {self.sampling!r}")
        if not 0 < self.fraction <= 1:
            raise bad("fraction", f"must lie in (0, 1], got {self.fraction}")
        if self.max_samples < 0 or self.max_samples == 1:
            raise bad("max_samples", f"must be 0 (every row) or >= 2 rows, got {self.max_samples}")
        if self.mode not in ("flatten", "channel"):
            raise bad("mode", f"must be 'flatten' or 'channel', got {self.mode!r}")
        if self.dissimilarity not in ("abs", "sqrt"):
            raise bad("dissimilarity", f"must be 'abs' or 'sqrt', got {self.dissimilarity!r}")
        if not 0 <= self.t2_alpha <= 1:
            raise bad("t2_alpha", f"must lie in [0, 1], got {self.t2_alpha}")
        if not isinstance(self.device, str) or not (
            self.device in ("cpu", "auto", "cuda", "mps") or self.device.startswith("cuda:")
        ):
            raise bad("device", f"must be 'cpu', 'auto', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "train") -> "TrainConfig":
        """Build from a mapping, rejecting unknown keys; ints are accepted for floats."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        values = {}
        for key, value in data.items():
            default = known[key].default
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # defaults of keys added later are left out, so that earlier sweeps' stored protocol still matches
        for key, default in (("mode", "flatten"), ("max_samples", 0)):
            if d[key] == default:
                del d[key]
        return d


@dataclass(frozen=True)
class NetworkSpec:
    """One network of a sweep: a unique ``label``, a model name of
    :data:`topodecorr.experiments.models.MODELS`, keyword parameters for it and
    ``train``, overrides of the sweep's :class:`TrainConfig` for this network only
    (e.g. ``{mode = "channel"}`` for a CNN beside MLPs)."""

    label: str
    model: str
    params: tuple[tuple[str, Any], ...] = ()
    train: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        # lists, as JSON stores them: a stored network compares equal to the same one parsed again
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}
        return {"label": self.label, "model": self.model, "params": params,
                **({"train": dict(self.train)} if self.train else {})}


def parse_network(item: Any, where: str = "networks[0]") -> NetworkSpec:
    """A :class:`NetworkSpec` from a model name or a ``{label, model, params}`` table.

    ``where`` names the entry in error messages (``networks[2]``, ``--network``).

    Examples
    --------
    >>> parse_network({"model": "vgg", "params": {"depth": 2}, "label": "v"})
    NetworkSpec(label='v', model='vgg', params=(('depth', 2),), train=())
    """
    if isinstance(item, str):
        return NetworkSpec(label=item, model=item)
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a model name or a table, got {item!r}")
    unknown = sorted(set(item) - {"label", "model", "params", "train"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: ['label', 'model', 'params', 'train']")
    if "model" not in item:
        raise ConfigError(f"{where}: a network table needs a 'model' key")
    model = item["model"]
    label = item.get("label", model)
    params = item.get("params", {})
    if not isinstance(model, str) or not isinstance(label, str) or not label:
        raise ConfigError(f"{where}: 'model' and 'label' must be non-empty strings")
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params: expected a table, got {params!r}")
    frozen = tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    train = item.get("train", {})
    if not isinstance(train, Mapping):
        raise ConfigError(f"{where}.train: expected a table of [train] keys, got {train!r}")
    TrainConfig.from_dict(train, where=f"{where}.train")  # unknown keys and bad values fail here, named
    return NetworkSpec(label=label, model=model, params=frozen, train=tuple(sorted(train.items())))


def check_dataset_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a dataset of :data:`topodecorr.experiments.data.DATASETS`."""
    from .data import DATASETS

    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")


def check_network(net: NetworkSpec) -> None:
    """Raise :class:`ConfigError` unless ``net`` names a known model with parameters it accepts."""
    from .models import MODELS, model_defaults

    if net.model not in MODELS:
        raise ConfigError(f"unknown network {net.model!r}; choose from {sorted(MODELS)}")
    accepted = model_defaults(net.model)
    unknown = sorted(set(net.kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for model {net.model!r}; accepted: {sorted(accepted)}")


@dataclass(frozen=True)
class Stages:
    """The two-stage plan of a sweep (see the module docstring).

    Attributes
    ----------
    wide_seeds : tuple of int
        Seeds of stage 1 (every weight); a subset of the sweep's seeds.
    neighbours : int
        Weights of the grid taken on each side of the stage-1 best in stage 2.
    run : int
        The stage this command runs (1 or 2); not part of the stored protocol.
    """

    wide_seeds: tuple[int, ...]
    neighbours: int = 1
    run: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.wide_seeds, tuple) or not self.wide_seeds:
            raise ConfigError("stages.wide_seeds: at least one seed is needed for stage 1")
        for s in self.wide_seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"stages.wide_seeds: every seed must be a non-negative integer, got {s!r}")
        if len(set(self.wide_seeds)) != len(self.wide_seeds):
            raise ConfigError(f"stages.wide_seeds: duplicates in {list(self.wide_seeds)}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise ConfigError(f"stages.neighbours: must be an integer >= 0, got {self.neighbours!r}")
        if self.run not in (1, 2) or isinstance(self.run, bool):
            raise ConfigError(f"stages.run: the stage to run is 1 or 2, got {self.run!r}")

    @classmethod
    def from_dict(cls, data: Any) -> "Stages":
        if not isinstance(data, Mapping):
            raise ConfigError(f"stages: expected a table, got {data!r}")
        unknown = sorted(set(data) - {"wide_seeds", "neighbours", "run"})
        if unknown:
            raise ConfigError(f"stages: unknown key(s) {unknown}; known keys: ['neighbours', 'run', 'wide_seeds']")
        if "wide_seeds" not in data or not isinstance(data["wide_seeds"], list):
            raise ConfigError("stages.wide_seeds: expected a list of the stage-1 seeds, e.g. [0, 1]")
        return cls(tuple(data["wide_seeds"]), data.get("neighbours", 1), data.get("run", 1))

    def to_dict(self) -> dict[str, Any]:
        """The stored protocol: without ``run`` (both stages write one database)."""
        return {"wide_seeds": list(self.wide_seeds), "neighbours": self.neighbours}


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: ``networks x penalties x weights x seeds`` on one dataset.

    The ``none`` penalty runs once per (network, seed) with weight 0, whatever
    ``weights`` says; every other penalty runs once per weight.

    Attributes
    ----------
    name : str
        Name of the sweep (used in the report).
    dataset : str
        A name of :data:`topodecorr.experiments.data.DATASETS`.
    networks : tuple of NetworkSpec
        The networks (paper: the three MNIST MLPs; eight CIFAR-10 CNNs).
    penalties : tuple of str
        A subset of :data:`PENALTIES`.
    weights : tuple of float
        The penalty weights lambda (paper: :data:`PAPER_WEIGHTS`).
    seeds : tuple of int
        Seeds of the weight initialisation, batch order and dropout.
    train : TrainConfig
        The training protocol.
    data_dir : str or None
        Where the dataset files are (None: the dataset's default places).
    split_seed : int
        Seed of the train/validation split (fixed across runs so all see the same data).
    val_fraction : float
        Fraction of the training set held out for validation (paper: 0.2).
    description : str
        Free text shown in the report.
    split_per_seed : bool
        Draw the split afresh for every seed (split seed ``split_seed + seed``); the
        penalties of one seed still share it, so their comparison stays paired.
    stages : Stages or None
        A two-stage plan (None: the whole grid at once).
    """

    dataset: str
    name: str = "sweep"
    networks: tuple[NetworkSpec, ...] = (
        NetworkSpec("mlp", "mlp"),
        NetworkSpec("mlp-dropout", "mlp-dropout"),
        NetworkSpec("mlp-deep", "mlp-deep"),
    )
    penalties: tuple[str, ...] = PENALTIES
    weights: tuple[float, ...] = PAPER_WEIGHTS
    seeds: tuple[int, ...] = (0,)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str | None = None
    split_seed: int = 0  # one split for the whole sweep
    val_fraction: float = 0.2  # paper: 80/20 train/validation split
    description: str = ""
    split_per_seed: bool = False  # True: each seed its own split (split_seed + seed)
    stages: Stages | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name: must be a non-empty string")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("dataset: must be a dataset name, e.g. 'digits'")
        if not self.networks:
            raise ConfigError("networks: the sweep needs at least one network")
        labels = [n.label for n in self.networks]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ConfigError(f"networks: duplicate label(s) {dupes}; give each network a unique 'label'")
        if not self.penalties:
            raise ConfigError("penalties: the sweep needs at least one penalty")
        for p in self.penalties:
            if p not in PENALTIES:
                raise ConfigError(f"penalties: unknown penalty {p!r}; choose from {list(PENALTIES)}")
        if len(set(self.penalties)) != len(self.penalties):
            raise ConfigError(f"penalties: duplicates in {list(self.penalties)}")
        if any(p != "none" for p in self.penalties) and not self.weights:
            raise ConfigError("weights: at least one weight is needed for penalties other than 'none'")
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"weights: {w!r} is not a finite number")
            if w <= 0:
                raise ConfigError(f"weights: every weight must be > 0 (got {w}); the 'none' penalty is the unregularised run")
        if len(set(self.weights)) != len(self.weights):
            raise ConfigError(f"weights: duplicates in {list(self.weights)}")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed is needed")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"seeds: every seed must be a non-negative integer, got {s!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: duplicates in {list(self.seeds)}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise ConfigError(f"split_seed: must be a non-negative integer, got {self.split_seed!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must lie in (0, 1), got {self.val_fraction!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ConfigError(f"data_dir: must be a path string, got {self.data_dir!r}")
        if not isinstance(self.split_per_seed, bool):
            raise ConfigError(f"split_per_seed: must be true or false, got {self.split_per_seed!r}")
        if self.stages is not None:
            if not isinstance(self.stages, Stages):
                raise ConfigError(f"stages: expected a [stages] table, got {self.stages!r}")
            extra = [s for s in self.stages.wide_seeds if s not in self.seeds]
            if extra:
                raise ConfigError(f"stages.wide_seeds: {extra} not among the sweep's seeds {list(self.seeds)}")

    def train_for(self, label: str) -> TrainConfig:
        """The training protocol of network ``label``: the sweep's, with the network's overrides."""
        overrides = dict(self.network(label).train)
        return TrainConfig.from_dict({**self.train.to_dict(), **overrides}, where=f"network {label!r}.train")

    def split_seed_of(self, seed: int) -> int:
        """The split seed of the runs of ``seed``: ``split_seed``, plus ``seed`` with ``split_per_seed``."""
        return self.split_seed + seed if self.split_per_seed else self.split_seed

    def validate_names(self) -> None:
        """Check dataset and model names (and model parameters) against the experiment registries.

        Kept apart from ``__post_init__`` so that a configuration can be parsed and
        shown before the registries are consulted.
        """
        try:
            check_dataset_name(self.dataset)
        except ConfigError as exc:
            raise ConfigError(f"dataset: {exc}") from None
        for i, net in enumerate(self.networks):
            try:
                check_network(net)
            except ConfigError as exc:
                where = f"networks[{i}]" + (f" (label {net.label!r})" if net.label != net.model else "")
                raise ConfigError(f"{where}: {exc}") from None

    def grid(self, runs: Sequence[Mapping[str, Any]] | None = None) -> list[tuple[str, str, float, int]]:
        """The runs as ``(network label, penalty, weight, seed)``, in a fixed order.

        Seeds vary slowest so that a partial sweep already holds complete blocks.
        With :attr:`stages`: stage 1 is every weight on the wide seeds; stage 2 every
        seed at the weights :func:`stage_two_weights` picks from ``runs`` (the
        database's run rows, which stage 2 needs).
        """
        seeds, chosen = self.seeds, None
        if self.stages is not None and self.stages.run == 1:
            seeds = tuple(s for s in self.seeds if s in self.stages.wide_seeds)
        elif self.stages is not None:
            if runs is None:
                raise ConfigError("stage 2 picks its weights from the stage-1 results: pass the database's runs")
            chosen = stage_two_weights(self, runs)
        out = []
        for seed in seeds:
            for net in self.networks:
                for penalty in self.penalties:
                    if penalty == "none":
                        weights: Sequence[float] = (0.0,)
                    else:
                        weights = self.weights if chosen is None else chosen[(net.label, penalty)]
                    for weight in weights:
                        out.append((net.label, penalty, float(weight), seed))
        return out

    def network(self, label: str) -> NetworkSpec:
        for net in self.networks:
            if net.label == label:
                return net
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "networks": [n.to_dict() for n in self.networks],
            "penalties": list(self.penalties),
            "weights": [float(w) for w in self.weights],
            "seeds": list(self.seeds),
            "train": self.train.to_dict(),
            # written only when set, so that the databases of earlier sweeps keep their protocol
            **({"split_per_seed": True} if self.split_per_seed else {}),
            **({"stages": self.stages.to_dict()} if self.stages is not None else {}),
        }

    def replace(self, **changes: Any) -> "SweepConfig":
        return dataclasses.replace(self, **changes)


_SWEEP_KEYS = (
    "name", "description", "dataset", "data_dir", "split_seed", "val_fraction",
    "networks", "penalties", "weights", "seeds", "train", "split_per_seed", "stages",
)


def parse_sweep(data: Mapping[str, Any], source: str = "<config>") -> SweepConfig:
    """Build a :class:`SweepConfig` from parsed TOML (or JSON), rejecting unknown keys.

    Examples
    --------
    >>> cfg = parse_sweep({"dataset": "digits", "networks": ["mlp"], "penalties": ["none", "t1"],
    ...                    "weights": [0.1, 1], "seeds": [0, 1], "train": {"max_epochs": 3}})
    >>> len(cfg.grid()), cfg.train.max_epochs, cfg.train.lr
    (6, 3, 0.01)
    """
    try:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table at the top level, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SWEEP_KEYS))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown}; known keys: {sorted(_SWEEP_KEYS)}")
        if "dataset" not in data:
            raise ConfigError("missing key 'dataset' (e.g. dataset = \"digits\")")
        kwargs: dict[str, Any] = {}
        for key in ("name", "description", "dataset", "data_dir", "split_seed", "val_fraction", "split_per_seed"):
            if key in data:
                kwargs[key] = data[key]
        for key in ("penalties", "weights", "seeds", "networks"):
            if key in data and not isinstance(data[key], list):
                raise ConfigError(f"{key}: expected a list, got {data[key]!r}")
        if "networks" in data:
            kwargs["networks"] = tuple(parse_network(item, f"networks[{i}]") for i, item in enumerate(data["networks"]))
        if "penalties" in data:
            kwargs["penalties"] = tuple(data["penalties"])
        if "weights" in data:
            kwargs["weights"] = tuple(
                float(w) if isinstance(w, int) and not isinstance(w, bool) else w for w in data["weights"]
            )
        if "seeds" in data:
            kwargs["seeds"] = tuple(data["seeds"])
        if "train" in data:
            kwargs["train"] = TrainConfig.from_dict(data["train"])
        if "stages" in data:
            kwargs["stages"] = Stages.from_dict(data["stages"])
        return SweepConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # wrong value types deep inside
        raise ConfigError(f"{source}: {exc}") from None


def _stage_one_scores(config: SweepConfig, runs: Sequence[Mapping[str, Any]]) -> tuple[dict, list[str]]:
    """(network, penalty) -> [(-mean val acc, mean val loss, weight)] over the wide seeds, and what is missing."""
    wide = config.stages.wide_seeds if config.stages is not None else config.seeds
    rows = {(r["network"], r["penalty"], float(r["weight"]), int(r["seed"])): r for r in runs}
    scores: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    missing = []
    for net in config.networks:
        for penalty in config.penalties:
            if penalty == "none":
                continue
            for w in config.weights:
                accs, losses = [], []
                for seed in wide:
                    r = rows.get((net.label, penalty, float(w), seed))
                    if r is None or r.get("status") not in ("done", "diverged"):
                        missing.append(f"{net.label} {penalty} {w:g} seed {seed}")
                        continue
                    done = r["status"] == "done" and r.get("val_acc") is not None
                    accs.append(float(r["val_acc"]) if done else 0.0)  # a diverged run counts as accuracy 0
                    losses.append(float(r["val_loss"]) if done and r.get("val_loss") is not None else math.inf)
                if len(accs) == len(wide):
                    scores.setdefault((net.label, penalty), []).append(
                        (-sum(accs) / len(accs), sum(losses) / len(losses), float(w)))
    return scores, missing


def stage_two_weights(config: SweepConfig, runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[float, ...]]:
    """Stage 2's weights per (network, penalty): the stage-1 best and its neighbours in the grid.

    The best weight has the highest mean validation accuracy over the wide seeds (a
    diverged run counts as accuracy 0); ties go to the lower mean validation loss, then
    the smaller weight. Its ``neighbours`` nearest weights of the sorted grid on each
    side join it (fewer at an end of the grid).

    Parameters
    ----------
    config : SweepConfig
        With a :attr:`~SweepConfig.stages` plan.
    runs : sequence of mapping
        Run rows (``network, penalty, weight, seed, status, val_acc, val_loss``).

    Raises
    ------
    ConfigError
        A stage-1 run has not finished (done or diverged).

    Examples
    --------
    >>> cfg = parse_sweep({"dataset": "digits", "networks": ["mlp"], "penalties": ["none", "t1"],
    ...                    "weights": [1e-3, 1e-2, 0.1, 1.0], "seeds": [0, 1, 2],
    ...                    "stages": {"wide_seeds": [0], "neighbours": 1, "run": 2}})
    >>> runs = [dict(network="mlp", penalty="t1", weight=w, seed=0, status="done", val_acc=a, val_loss=1.0)
    ...         for w, a in [(1e-3, 0.8), (1e-2, 0.9), (0.1, 0.85), (1.0, 0.1)]]
    >>> stage_two_weights(cfg, runs)
    {('mlp', 't1'): (0.001, 0.01, 0.1)}
    """
    if config.stages is None:
        raise ConfigError("stage_two_weights needs a sweep with a [stages] table")
    scores, missing = _stage_one_scores(config, runs)
    if missing:
        raise ConfigError(
            f"stage 2 needs every stage-1 run finished; {len(missing)} are not (e.g. {', '.join(missing[:3])}): "
            "run the stage-1 command again (stages.run = 1) until it completes"
        )
    grid = sorted(float(w) for w in config.weights)
    k = config.stages.neighbours
    out = {}
    for key, rows in scores.items():
        best = min(rows)[2]
        i = grid.index(best)
        out[key] = tuple(grid[max(0, i - k): i + k + 1])
    return out


def selection_weights(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[float, ...]] | None:
    """The weights the validation choice may pick per (network, penalty), or None for all of them.

    ``config`` is a stored sweep configuration (:meth:`SweepConfig.to_dict`). For a
    two-stage sweep whose stage 2 has begun (a run of a seed outside the wide seeds
    exists), the stage-2 weights (:func:`stage_two_weights`), for every seed alike;
    otherwise None (a one-stage sweep, or stage 1 alone: every weight competes).
    """
    stages = config.get("stages")
    if not stages:
        return None
    wide = set(stages["wide_seeds"])
    if not any(int(r["seed"]) not in wide for r in runs):
        return None
    sweep = parse_sweep({k: v for k, v in config.items() if k in _SWEEP_KEYS and k != "data_dir"},
                        source="stored sweep")
    return stage_two_weights(sweep.replace(stages=dataclasses.replace(sweep.stages, run=2)), runs)


def apply_override(data: dict, assignment: str, flag: str = "--set") -> None:
    """Apply ``KEY=VALUE`` to the parsed TOML ``data`` in place; VALUE is a TOML value.

    A dotted KEY reaches into tables (``train.max_epochs=50``); a VALUE that is not
    valid TOML is taken as a bare string (``dataset=digits``). ``flag`` names the
    command-line option in error messages.

    Examples
    --------
    >>> d = {"dataset": "digits"}
    >>> apply_override(d, "train.max_epochs=5"); apply_override(d, "seeds=[0, 1]"); d
    {'dataset': 'digits', 'train': {'max_epochs': 5}, 'seeds': [0, 1]}
    """
    if "=" not in assignment:
        raise ConfigError(f"{flag} expects KEY=VALUE (e.g. {'depth=2' if flag == '--param' else 'train.max_epochs=50'}), "
                          f"got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is taken as a string
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{flag} {assignment}: {part!r} is not a table")
    node[parts[-1]] = value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _configure(
    data: dict[str, Any], source: str, overrides: Sequence[str], data_dir: str | None, check_names: bool
) -> SweepConfig:
    """Parse ``data`` with the ``--set`` assignments and ``data_dir`` applied.

    An error that the file alone does not have is blamed on the ``--set`` that
    causes it (the first one that fails on its own, else all of them).
    """

    def build(d: dict[str, Any]) -> SweepConfig:
        config = parse_sweep(d, source=source)
        if check_names:
            try:
                config.validate_names()
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        return config

    def changed(assignments: Sequence[str]) -> dict[str, Any]:
        d = copy.deepcopy(data)
        for assignment in assignments:
            apply_override(d, assignment)
        return d

    full = changed(overrides)
    if data_dir is not None:
        full["data_dir"] = data_dir
    try:
        return build(full)
    except ConfigError as exc:
        if not overrides:
            raise
        try:
            build(data)
        except ConfigError:
            raise exc from None  # the file itself is wrong: blame it, as without --set
        culprits = list(overrides)
        for assignment in overrides:
            try:
                build(changed([assignment]))
            except ConfigError:
                culprits = [assignment]
                break
        detail = str(exc).removeprefix(f"{source}: ")
        raise ConfigError(f"{' '.join('--set ' + a for a in culprits)}: {detail}") from None


def load_sweep(
    path: str | Path, overrides: Sequence[str] = (), data_dir: str | None = None, check_names: bool = False
) -> SweepConfig:
    """Read and validate a TOML sweep file (parsed with :mod:`tomllib`, never evaluated).

    Parameters
    ----------
    path : path
        The TOML file.
    overrides : sequence of str
        ``KEY=VALUE`` assignments applied before validation (see :func:`apply_override`).
    data_dir : str, optional
        Replaces the file's ``data_dir``.
    check_names : bool
        Also check dataset and network names against the registries
        (:meth:`SweepConfig.validate_names`), the error naming the file.
    """
    path = Path(path)
    return _configure(_read_toml(path), str(path), overrides, data_dir, check_names)


def _presets_dir():
    return resources.files("topodecorr.experiments") / "presets"


def list_presets() -> dict[str, str]:
    """Names of the shipped presets mapped to their one-line descriptions."""
    out = {}
    for entry in sorted(_presets_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            lines = str(data.get("description", "")).strip().splitlines()
            out[entry.name[:-5]] = lines[0] if lines else ""
    return out


def preset_path(name: str):
    """The TOML file of a shipped preset (a :mod:`importlib.resources` traversable)."""
    entry = _presets_dir() / f"{name}.toml"
    if not entry.is_file():
        raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(list_presets())}")
    return entry


def load_preset(
    name: str, overrides: Sequence[str] = (), data_dir: str | None = None, check_names: bool = False
) -> SweepConfig:
    """Load a shipped preset by name (see ``topodecorr presets``); arguments as :func:`load_sweep`."""
    data = tomllib.loads(preset_path(name).read_text(encoding="utf-8"))
    return _configure(data, f"preset {name!r}", overrides, data_dir, check_names)
