"""Capture neurons from the training forward pass by hooks, and regularise them.

:class:`Decorrelation` attaches forward hooks to a model, keeps the outputs of
the chosen layers during the *training forward pass itself* (there is never a
second forward pass), and turns them into a weighted penalty with the one
pipeline of :mod:`topodecorr.functional`.

Which layer outputs are neurons is the rule of :mod:`topodecorr.neurons`
(shared with :func:`topodecorr.inspect`, the training callbacks and the
experiment harness). With ``layers="auto"``:

* **Transformers**: one point cloud per block over its feed-forward hidden
  units, read with ``mode="features_last"`` (tokens are samples) and
  ``pooled=False`` by default. Checked on real objects with random weights:

  - ``nn.TransformerEncoderLayer`` (and each layer of ``nn.TransformerEncoder``):
    ``linear1``, the FFN's hidden units before the activation (the default
    activation is the function ``F.relu``, not a module); with
    ``activation=nn.GELU()`` (a module) its ``activation``, after it;
  - Hugging Face GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``): ``transformer.h.N.mlp.act``
    (``NewGELUActivation``, after the nonlinearity; 4 x n_embd neurons per block);
  - Hugging Face BERT (``BertModel``): ``encoder.layer.N.intermediate.intermediate_act_fn``
    (``GELUActivation``, intermediate_size neurons per block); the pooler's
    ``Tanh`` is outside the blocks and not captured;
  - timm ViT (``vit_tiny_patch16_224``): ``blocks.N.mlp.act`` (``nn.GELU``,
    mlp_ratio x embed_dim neurons per block, the class token counted as a
    sample like the patches).

* **Other models**: every activation-function module (``nn.ReLU``,
  ``nn.GELU``, ``nn.Tanh``, ...) is a hidden layer, read after its
  nonlinearity (for ``nn.Sequential`` MLPs and CNNs this is exactly the
  paper's rule), and the model's own output is the output layer, read as
  logits. Without activation modules (``F.relu`` in ``forward``) every
  ``nn.Linear`` / ``nn.Conv*d`` output is captured instead. The mode is
  ``"flatten"`` unless given.

``layers`` may also be a list of modules, or of ``fnmatch`` patterns matched
against ``model.named_modules()`` names (e.g. ``["encoder.*.relu", "head"]``);
pass ``mode=`` for them (default ``"flatten"``). A module called several times
in one forward contributes one layer per call (torchvision's ResNet
``BasicBlock`` calls its ``relu`` twice).

**CNNs**: every entry of a conv map is a neuron in ``"flatten"`` mode, so
torchvision's resnet18 pooled is 47,114 neurons (an 8.9 GB correlation matrix
per step). A cloud above ``max_neurons`` (default 8192, after sampling) is a
``ValueError`` at the first :meth:`Decorrelation.penalty` that names the
remedies: ``mode="channel"`` (one neuron per channel, positions are samples)
with ``pooled=False``, fewer layers (``layers=[...]``), the paper's
``sampling="importance"`` with a small ``fraction``, or a larger
``max_neurons``.

Per-layer point clouds (``pooled=False``) each have their own samples: B
for a (B, n) layer, B x H x W for an NCHW map in ``"channel"`` mode, B x T
for (B, T, F) in ``"features_last"`` mode. One pooled cloud needs the same
samples for every layer; different counts are a ``ValueError`` that suggests
``pooled=False``.

**One forward, one penalty.** The activations of a training forward (training
mode, gradients enabled) are kept until the next :meth:`Decorrelation.penalty`,
which uses and then releases them. A second training forward of the model
before that is a ``RuntimeError`` (two forwards' rows are different samples);
run any extra forward (logging, a reference) under ``torch.no_grad()`` or in
``eval()``. A forward that raised leaves nothing behind. ``nn.DataParallel``
over several devices is refused (its per-device copies run on slices of the
batch in threads); use DistributedDataParallel. Under activation
checkpointing (``torch.utils.checkpoint``) the recompute in ``backward()`` is
not captured again, and the penalty and gradients equal those without
checkpointing, reentrant or not (see :mod:`topodecorr.neurons`; keep the
regulariser attached until ``backward()`` has run).

A batch of 2 or 3 samples is warned about (every correlation is then +-1 or
near it, every death near 0), and so is the first step on which every
captured neuron is dead (constant over the batch: T1 / T2 then see only
deaths of 1).

Mixed precision: under ``torch.autocast`` the captured tensors may be
float16 / bfloat16; correlations, deaths and the returned penalty are
float32. Under DDP see :mod:`topodecorr.distributed` (``distributed="global"``
gives every rank the penalty of the global batch, with the single-process
gradient after DDP's averaging).

Non-finite values: captured activations with NaN / inf, or a non-finite
penalty, raise ``FloatingPointError`` (the run is diverging); with
``on_nonfinite="skip"`` the step's penalty is 0 (no gradient) and
:attr:`Decorrelation.skipped` counts it. Nothing is silently zeroed.

``torch.compile``: hooks on the modules inside a compiled model are honoured
by dynamo (it traces them into the graph), so
``Decorrelation(torch.compile(model))`` and ``Decorrelation(model)`` used with
the compiled ``torch.compile(model)`` both capture the training forward pass;
given the compiled wrapper, the hooks are put on the module it wraps
(``_orig_mod``). Dynamo does not see hooks attached after it compiled a
forward: not after the compiled model's first call, and not after *another
instance of the same class* was compiled and run in the process (its cached
graph is reused, and none of the new hooks runs). Then nothing is captured
and :meth:`Decorrelation.penalty` raises ``RuntimeError``. Given the compiled
wrapper, :meth:`Decorrelation.attach` sees the trap coming: when dynamo
already holds compiled graphs in the process it warns (``RuntimeWarning``)
with the remedy. The remedy: attach before compiling anything, or call
``torch._dynamo.reset()`` right after attaching (it drops every compiled graph
of the process; they are recompiled on their next call).
Removing hooks (``close()``) is honoured: nothing is captured after it.

Settings are fixed when the regulariser is built (they shaped its hooks and
its pipeline), and assigning one is an ``AttributeError``; only
:attr:`Decorrelation.weight` may change between steps (a schedule). They are
all in :attr:`Decorrelation.settings`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import _checks
from .correlation import NonFiniteActivationsError
from .functional import MODES, PenaltyResult, decorrelation_result
from .monitor import as_logger, death_summary
from .neurons import ACTIVATION_MODULES, Recorder, check_layers, dynamo_has_compiled, resolve_layers, unwrap
from .sampling import sampled_units

__all__ = ["Decorrelation", "Settings", "StepStats", "ACTIVATION_MODULES", "check_options"]

#: Largest point cloud :class:`Decorrelation` builds by default (neurons, after sampling):
#: its (n, n) correlation matrix is 256 MiB in float32.
MAX_NEURONS = 8192
#: A cloud with this many samples or fewer is warned about: its correlations are +-1 or near it.
FEW_SAMPLES = 3


@dataclass(frozen=True)
class Settings:
    """Every option of :class:`Decorrelation` but the model, checked (see its parameters).

    Building one validates the options without a model; :func:`check_options`
    does it for the training callbacks. ``layers`` is ``"auto"`` or a tuple.
    """

    layers: Any = "auto"
    penalty: str = "t1"
    weight: float = 1e-3
    dissimilarity: str = "abs"
    sampling: str = "all"
    fraction: float = 1.0
    per_layer_count: int | None = None
    pooled: bool | None = None
    mode: str | None = None
    max_samples: int | None = None
    max_neurons: int | None = MAX_NEURONS
    every: int = 1
    refresh_every: int = 1
    alpha: float = 0.5
    seed: int = 0
    dead_neurons: str = "keep"
    distributed: str = "global"
    on_nonfinite: str = "raise"
    capture_in_eval: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        _checks.pipeline(
            penalty=self.penalty, weight=self.weight, dissimilarity=self.dissimilarity, sampling=self.sampling,
            fraction=self.fraction, count=self.per_layer_count, alpha=self.alpha, dead_neurons=self.dead_neurons,
            max_samples=self.max_samples, backend=self.backend, count_name="per_layer_count",
        )
        object.__setattr__(self, "layers", check_layers(self.layers))
        object.__setattr__(self, "weight", float(self.weight))
        if self.mode is not None:
            _checks.choice("mode", self.mode, MODES)
        if self.pooled is not None and not isinstance(self.pooled, bool):
            raise TypeError(f"pooled must be True, False or None (the default), got {self.pooled!r}")
        if self.max_neurons is not None:
            _checks.integer("max_neurons", self.max_neurons, 2, " (neurons per point cloud) or None for no limit")
        _checks.integer("every", self.every, 1)
        _checks.integer("refresh_every", self.refresh_every, 1)
        _checks.integer("seed", self.seed, 0)
        _checks.choice("distributed", self.distributed, _checks.DISTRIBUTED)
        _checks.choice("on_nonfinite", self.on_nonfinite, ("raise", "skip"))
        if not isinstance(self.capture_in_eval, bool):
            raise TypeError(f"capture_in_eval must be True or False, got {self.capture_in_eval!r}")


def check_options(**options) -> Settings:
    """Validate keyword options of :class:`Decorrelation` without a model (unknown keywords: TypeError).

    ``layers`` names or patterns are checked for their form here and against
    the model when the regulariser is built.

    Examples
    --------
    >>> check_options(penalty="t2", layers=["net.1"], mode="channel").layers
    ('net.1',)
    """
    if "model" in options:
        raise TypeError("the model is not an option: it is the one the regulariser is attached to; drop model=")
    return Settings(**options)


@dataclass(frozen=True)
class _TreeCache:
    """What ``refresh_every`` reuses between tree rebuilds: the sampling, trees and live sets of one step.

    ``shape`` (neurons per captured layer) must match for the reuse to apply.
    """

    shape: tuple[int, ...]
    indices: tuple
    edges: tuple
    live: tuple


@dataclass(frozen=True)
class StepStats:
    """Statistics of one regularised step: the one shape the regulariser, the logger and the callbacks share.

    ``penalty`` is the weighted value :meth:`Decorrelation.penalty` returned;
    ``neurons`` counts the neurons of all point clouds, ``clouds`` each cloud's
    (one entry when pooled, one per layer otherwise). ``min/mean/max_death``
    are None for penalties that build no tree.
    """

    step: int
    neurons: int
    dead: int
    min_death: float | None
    mean_death: float | None
    max_death: float | None
    skipped: int
    clouds: tuple[int, ...] = ()
    penalty: float | None = None

    #: the statistics :meth:`as_dict` reports, in this order
    KEYS = ("penalty", "neurons", "dead", "min_death", "mean_death", "max_death", "skipped")

    def as_dict(self) -> dict[str, float]:
        """The scalar statistics (:attr:`KEYS`) as Python numbers; entries that are None are left out."""
        out = {k: getattr(self, k) for k in self.KEYS}
        return {k: v for k, v in out.items() if v is not None}


_READ_ONLY = frozenset({
    "model", "modules", "modes", "mode", "pooled", "penalty_name", "every", "refresh_every", "distributed",
    "on_nonfinite", "capture_in_eval", "settings", "layers",
})


def _penalty_inputs(records) -> tuple[list[torch.Tensor], list[str]]:
    """The recorded outputs for the pipeline: channel maps as they are (it reads them without
    the (B * H * W, C) copy), everything else flattened (a view)."""
    keep = [r.mode == "channel" and r.tensor.dim() > 2 for r in records]
    acts = [r.tensor if k else r.matrix for r, k in zip(records, keep)]
    return acts, ["channel" if k else "flatten" for k in keep]


class Decorrelation:
    """Hook-based T1 / T2 (or baseline) regulariser for any PyTorch model.

    Parameters
    ----------
    model : nn.Module
    layers : "auto" | list of nn.Module | list of str
        Which layer outputs are neurons (see the module docstring and
        :mod:`topodecorr.neurons`). The remaining parameters are keyword-only.
    penalty : {"t1", "t2", "mean_abs_corr", "decov", "none"}
    weight : float
        lambda; :meth:`penalty` returns ``weight * T``. The one setting that may
        change between steps.
    dissimilarity : {"abs", "sqrt"}
    sampling : {"all", "importance", "fixed", "random"}
    fraction : float
        p for importance sampling (the paper: 1.0 for MLPs, 0.005 for CNNs).
    per_layer_count : int, optional
        Neurons per hidden layer for ``"fixed"`` / ``"random"``.
    pooled : bool, optional
        One point cloud for all layers (the paper; the layers must have the
        same number of samples) or one per layer, each with its own samples,
        summed. Default: one per block for the transformer rule of
        ``layers="auto"``, pooled otherwise.
    mode : {"flatten", "channel", "features_last"}, optional
        How a layer output becomes (samples, neurons) (see
        :func:`topodecorr.functional.flatten_activation`): every entry is a
        neuron, one neuron per channel of an NCHW map, or one per feature of
        the last dimension (transformers). Default: ``"features_last"`` for the
        transformer rule of ``layers="auto"``, ``"flatten"`` otherwise; a mode
        given here applies to every captured layer.
    max_samples : int >= 2, optional
        Rows (samples) drawn per point cloud and step, without replacement
        from the seeded generator, before correlating: for layers with huge
        sample counts (a 64-channel 32 x 32 map in channel mode has B x 1024
        rows). None: every row. See BENCHMARKS.md "Row subsampling" for how
        close the deaths stay.
    max_neurons : int, optional
        Largest point cloud allowed, in neurons after sampling (default
        8192: a 256 MiB correlation matrix); a larger one is a ``ValueError``
        naming the remedies. None: no limit.
    every : int
        Regularise on every k-th step only; other steps return 0 and capture nothing.
    refresh_every : int
        Rebuild the spanning tree (and the sampling) every k regularised steps;
        in between, the deaths of the current tree's edges are recomputed with
        gradient from the new batch. This approximates the exact deaths by the
        weights of a tree that was minimal a few steps ago: an upper bound on
        each exact MST weight sum, exact when the tree has not changed.
    alpha : float
        T2's trade-off.
    seed : int
        Seeds the generator of ``sampling="random"`` and of ``max_samples``.
    dead_neurons : {"keep", "drop"}
        Neurons constant over the batch stay in the point cloud with
        correlation 0 (``"keep"``, the paper's convention: each adds a death of
        1, so T1 / T2 reward them) or leave it (``"drop"``); either way
        :attr:`last_stats` counts them as dead.
    distributed : {"global", "local"}
        Under ``torch.distributed``: gather the activations of every rank (with
        gradient) and compute the penalty on the global batch, identical on all
        ranks; or per rank. Ignored when not initialised.
    on_nonfinite : {"raise", "skip"}
        A non-finite penalty raises ``FloatingPointError``; with ``"skip"`` the
        step's penalty is 0 and :attr:`skipped` counts it.
    capture_in_eval : bool
        Also capture when the model is in ``eval()`` mode.
    backend : str
        MST kernel: ``"auto"`` or a name of :func:`topodecorr.available_backends`
        (see :func:`topodecorr.mst_deaths`); an unknown name is refused here.
    log : SummaryWriter, callable or topodecorr.monitor.StatsLogger, optional
        Receives every regularised step's statistics (penalty, neurons, dead,
        min / mean / max death): a ``StatsLogger(sink, every=k)`` logs every k
        steps; a bare writer or callable ``sink(step, stats)`` every step (see
        :mod:`topodecorr.monitor`).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> with Decorrelation(model, penalty="t1", weight=1e-3) as reg:
    ...     loss = nn.functional.cross_entropy(model(x), y) + reg.penalty()
    ...     loss.backward()
    >>> reg.last_stats.neurons, reg.attached
    (19, False)
    """

    def __init__(
        self,
        model: nn.Module,
        layers="auto",
        *,
        penalty: str = "t1",
        weight: float = 1e-3,
        dissimilarity: str = "abs",
        sampling: str = "all",
        fraction: float = 1.0,
        per_layer_count: int | None = None,
        pooled: bool | None = None,
        mode: str | None = None,
        max_samples: int | None = None,
        max_neurons: int | None = MAX_NEURONS,
        every: int = 1,
        refresh_every: int = 1,
        alpha: float = 0.5,
        seed: int = 0,
        dead_neurons: str = "keep",
        distributed: str = "global",
        on_nonfinite: str = "raise",
        capture_in_eval: bool = False,
        backend: str = "auto",
        log=None,
    ):
        options = {k: v for k, v in locals().items() if k not in ("self", "model", "log", "__class__")}
        settings = Settings(**options)
        compiled = unwrap(model) is not model
        model = unwrap(model)  # torch.compile's wrapper: the hooks go on the module it compiled
        chosen = resolve_layers(model, settings.layers, mode)
        if pooled is None:
            settings = replace(settings, pooled=not chosen.transformer)
        d = self.__dict__  # the read-only settings are set once, here
        d["settings"], d["model"], d["layers"] = settings, model, chosen
        self.log = as_logger(log)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # number of penalty() calls
        self.skipped = 0
        self._regularised = 0  # number of steps that computed a penalty
        self._recorder = Recorder(model, chosen, when=self._due, needs_grad=True)
        self._used = False  # the last penalty() used the recorded activations and nothing was recorded since
        self._tree: _TreeCache | None = None
        self._last: tuple[int, PenaltyResult] | None = None
        self._warned: set[str] = set()
        self._compiled = compiled

    # -- settings (read-only but the weight) -----------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if name in _READ_ONLY:
            raise AttributeError(
                f"Decorrelation.{name} is fixed when the regulariser is built (its hooks and pipeline were set "
                f"up with it); build a new Decorrelation with {name}=... instead (only weight may change)"
            )
        super().__setattr__(name, value)

    @property
    def weight(self) -> float:
        """lambda, the factor of the penalty; may be assigned between steps (a schedule), checked."""
        return self.settings.weight

    @weight.setter
    def weight(self, value: float) -> None:
        self.__dict__["settings"] = replace(self.settings, weight=_checks.weight(value))

    penalty_name = property(lambda self: self.settings.penalty, doc="The penalty's registry name.")
    pooled = property(lambda self: self.settings.pooled, doc="One point cloud for all layers, or one per layer.")
    mode = property(lambda self: self.settings.mode, doc="The mode given (None: the layer rule's default).")
    every = property(lambda self: self.settings.every)
    refresh_every = property(lambda self: self.settings.refresh_every)
    distributed = property(lambda self: self.settings.distributed)
    on_nonfinite = property(lambda self: self.settings.on_nonfinite)
    capture_in_eval = property(lambda self: self.settings.capture_in_eval)
    modules = property(lambda self: list(self.layers.modules), doc="The hooked modules (a copy).")
    modes = property(lambda self: list(self.layers.modes), doc="Their modes (a copy).")

    # -- hooks -----------------------------------------------------------------------------------
    def _due(self) -> bool:
        """Whether a forward now is one to capture (training mode or capture_in_eval, a step `every` selects)."""
        if not (self.model.training or self.settings.capture_in_eval):
            return False
        return (self.step % self.settings.every) == 0

    @property
    def attached(self) -> bool:
        """Whether the forward hooks are registered."""
        return self._recorder.attached

    def attach(self) -> "Decorrelation":
        """Register the forward hooks (idempotent).

        Given a ``torch.compile`` wrapper while dynamo holds compiled graphs, warns
        (once) that a graph compiled without these hooks may be reused (see the
        module docstring) and names the remedy.
        """
        if not self.attached and self._compiled and dynamo_has_compiled():
            self._warn_once("compile", (
                "Decorrelation was attached to a torch.compile'd model while dynamo already holds compiled "
                "graphs in this process: a graph compiled without these hooks (for this model, or for another "
                "instance of its class) is reused and captures nothing. Call torch._dynamo.reset() right after "
                "attaching (it drops every compiled graph; they recompile on their next call), or attach "
                "before compiling anything"
            ), stacklevel=3)
        self._recorder.attach()
        return self

    def close(self) -> None:
        """Remove the hooks and drop captured tensors."""
        self._recorder.detach()

    def __enter__(self) -> "Decorrelation":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- penalty ---------------------------------------------------------------------------------
    def captured_activations(self) -> list[torch.Tensor]:
        """The layer outputs captured since the last penalty, flattened to (samples, neurons)."""
        return [r.matrix for r in self._recorder.records]

    def penalty(self) -> torch.Tensor:
        """Weighted penalty of the activations captured by the last forward pass.

        Returns a scalar tensor on the model's device (0 on steps skipped by
        ``every``), and releases the captured tensors.
        """
        try:
            if self.step % self.settings.every != 0:
                return self._zero()
            records = self._recorder.take()
            if not records:
                raise self._nothing_captured()
            acts, modes = _penalty_inputs(records)
            is_output = [r.is_output for r in records]
            self._check_clouds(acts, is_output, [r.name for r in records])
            acts = self._gather(acts)
            self._warn_few_samples(acts, modes)
            self._used = True
            try:
                return self._compute(acts, is_output, modes)
            except NonFiniteActivationsError:
                return self._nonfinite("the captured activations are not finite (NaN or inf)")
        finally:
            self.step += 1
            self._recorder.clear()

    def _nothing_captured(self) -> RuntimeError:
        if not self.attached:
            return RuntimeError("Decorrelation is not attached: use `with reg:` or reg.attach()")
        if self._used:
            return RuntimeError(
                "the previous penalty() call already used these activations; run a new forward "
                "pass before the next penalty() (each forward's activations give one penalty)"
            )
        return RuntimeError(
            "no activations were captured: call penalty() after a forward pass in training mode "
            "with gradients enabled (or set capture_in_eval=True); with torch.compile, attach "
            "before compiling anything, or call torch._dynamo.reset() right after attaching (dynamo "
            "reuses a graph compiled without the hooks, also one of another instance of the same class)"
        )

    def _check_clouds(self, acts, is_output, names) -> None:
        """Refuse a point cloud above max_neurons (after sampling) before anything is computed."""
        limit = self.settings.max_neurons
        if limit is None:
            return
        s = self.settings
        widths = [sampled_units(a.shape[1], out, s.sampling, s.fraction, s.per_layer_count)
                  for a, out in zip(acts, is_output)]
        biggest = sum(widths) if self.pooled else max(widths)
        if biggest <= limit:
            return
        what = "the pooled point cloud" if self.pooled else "a per-layer point cloud"
        gb = 4 * biggest * biggest / 1e9
        raise ValueError(
            f"{what} has {biggest} neurons after sampling (layers: {dict(zip(names, widths))}): its correlation "
            f"matrix would take {gb:.1f} GB and O(n^2) work every step, above max_neurons={limit}. For conv "
            "maps pass mode='channel' (one neuron per channel) with pooled=False; or choose fewer layers "
            "(layers=[...]); or sample neurons (sampling='importance', fraction=0.005 as the paper does for "
            "CNNs); or raise max_neurons (None: no limit)."
        )

    def _warn_once(self, key: str, message: str, stacklevel: int = 4) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _warn_few_samples(self, acts, modes) -> None:
        rows = min(a.shape[0] * (math.prod(a.shape[2:]) if m == "channel" else 1) for a, m in zip(acts, modes))
        if self.settings.max_samples is not None:
            rows = min(rows, self.settings.max_samples)
        if rows <= FEW_SAMPLES:
            self._warn_once("samples", (
                f"a point cloud has only {rows} samples at step {self.step}: with 2 samples every correlation "
                "is +1 or -1 (every death 0), with 3 nearly so, and the penalty says nothing about the "
                "network; use batches of at least 16 samples (or mode='channel' / 'features_last', whose "
                "positions or tokens are samples too)"
            ))

    def _zero(self) -> torch.Tensor:
        p = next(self.model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def _gather(self, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.settings.distributed != "global":
            return acts
        from .distributed import gather_activations, is_distributed

        if not is_distributed():
            return acts
        return [gather_activations(a) for a in acts]

    def _compute(self, acts, is_output, modes) -> torch.Tensor:
        s = self.settings
        shape = tuple(a.shape[1] for a in acts)  # neurons per layer (channels of a map)
        tree = self._tree if self._regularised % s.refresh_every != 0 else None
        if tree is not None and tree.shape != shape:
            tree = None  # the layers changed width (another model path): build a new tree
        res = decorrelation_result(
            acts, s.penalty, s.weight, output_layers=is_output, generator=self.generator,
            indices=tree.indices if tree else None, edges=tree.edges if tree else None,
            live=tree.live if tree else None, modes=modes, dissimilarity=s.dissimilarity, sampling=s.sampling,
            fraction=s.fraction, count=s.per_layer_count, pooled=s.pooled, alpha=s.alpha,
            max_samples=s.max_samples, dead_neurons=s.dead_neurons, backend=s.backend,
        )
        self._regularised += 1
        if tree is None and s.refresh_every > 1 and res.deaths:
            self._tree = _TreeCache(shape, res.indices, res.edges, res.live)
        value = res.value
        # one host synchronisation per step: is the value finite, and could every neuron be dead
        # (all deaths 1, or a zero value without deaths)
        lows = [d.detach().min().float() for d in res.deaths if d.numel()]
        v, *lows = torch.stack([value.detach().float(), *lows]).tolist()
        if not math.isfinite(v):
            return self._nonfinite(f"the {s.penalty} penalty is {v}")
        if (min(lows) >= 1.0 if lows else v == 0.0 and s.weight > 0) and s.penalty != "none":
            self._check_all_dead(res)
        # keep only detached statistics: the graph of this step is the loss's to free
        self._last = (self.step, res.detached())
        if self.log is not None:
            self.log(self, value)
        return value

    def _check_all_dead(self, res: PenaltyResult) -> None:
        """A zero penalty: warn (once) when every captured neuron is dead."""
        dead = res.dead
        if dead is not None and int(dead) >= res.neurons + res.dropped and res.neurons + res.dropped > 0:
            self._warn_once("dead", (
                f"every captured neuron ({int(dead)}) is dead at step {self.step} (constant over the batch, e.g. "
                "ReLUs that never fire): there is no correlation to penalise and the penalty is 0; check the "
                "layers (layers=...), the initialisation and the learning rate (warned once)"
            ))

    def _nonfinite(self, what: str) -> torch.Tensor:
        """Raise FloatingPointError, or (on_nonfinite="skip") count the step and return 0."""
        if self.settings.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{what} at step {self.step}; the activations or weights are probably diverging "
                "(lower the learning rate or the weight), or pass on_nonfinite='skip' to skip such "
                "steps and count them"
            )
        self.skipped += 1
        return self._zero()

    # -- statistics ------------------------------------------------------------------------------
    @property
    def last_stats(self) -> StepStats | None:
        """Statistics of the last regularised step (computed on demand: one host sync)."""
        if self._last is None:
            return None
        step, res = self._last
        deaths = torch.cat([x.detach().float() for x in res.deaths]) if res.deaths else None
        return StepStats(
            step=step,
            neurons=int(res.neurons),
            dead=int(res.dead) if res.dead is not None else 0,
            skipped=self.skipped,
            clouds=tuple(int(c) for c in res.clouds),
            penalty=float(res.value),
            **death_summary(deaths),
        )

    @property
    def last_deaths(self) -> torch.Tensor | None:
        """Deaths of the last regularised step (detached, pooled over point clouds)."""
        if self._last is None or not self._last[1].deaths:
            return None
        return torch.cat([x.detach() for x in self._last[1].deaths])
