"""Capture neurons from the training forward pass by hooks, and regularise them.

:class:`Decorrelation` attaches forward hooks to a model, keeps the outputs of
the chosen layers during the *training forward pass itself* (there is never a
second forward pass), and turns them into a weighted penalty with the one
pipeline of :mod:`topodecorr.functional`.

Layer selection with ``layers="auto"``:

* **Transformers.** When the model has transformer blocks, ``"auto"`` takes
  one point cloud per block over its feed-forward hidden units, read with
  ``mode="features_last"`` (tokens are samples, the FFN's features the
  neurons) and ``pooled=False`` by default; nothing else is captured (no
  model output, no pooler or head). A block is a smallest module holding an
  attention module (``nn.MultiheadAttention`` or a class whose name contains
  "Attention") and, outside it, an activation module or a dense projection,
  with no 2-D / 3-D convolution inside. In the block the unit read is its
  first activation module (after the nonlinearity; Hugging Face's activation
  classes count, although they are not ``nn.GELU`` subclasses), else its first
  projection (``nn.Linear`` or Hugging Face's ``Conv1D``, before the
  nonlinearity). Checked on real objects with random weights:

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

* **Other models.** Every activation-function module (``nn.ReLU``,
  ``nn.GELU``, ``nn.Tanh``, ...) is a hidden layer, read after its
  nonlinearity (for ``nn.Sequential`` MLPs and CNNs this is exactly the paper's
  rule), and the model's own output is the output layer, read as logits, when
  it is a tensor. A model whose nonlinearities are all functional (``F.relu``
  inside ``forward``) has no activation modules: then every ``nn.Linear`` /
  ``nn.Conv*d`` module's output is captured instead (pre-activation), plus the
  model output. The mode is ``"flatten"`` unless given.

``layers`` may also be a list of modules, or of ``fnmatch`` patterns matched
against ``model.named_modules()`` names (e.g. ``["encoder.*.relu", "head"]``);
pass ``mode=`` for them (default ``"flatten"``). A module called several times
in one forward contributes one layer per call (torchvision's ResNet
``BasicBlock`` calls its ``relu`` twice).

Per-layer point clouds (``pooled=False``) each have their own samples: B
for a (B, n) layer, B x H x W for an NCHW map in ``"channel"`` mode, B x T
for (B, T, F) in ``"features_last"`` mode. One pooled cloud needs the same
samples for every layer; different counts are a ``ValueError`` that suggests
``pooled=False``.

Activations accumulate from every forward pass (training mode, gradients
enabled) until the next :meth:`Decorrelation.penalty`, which uses and then
releases them; run any extra forward (logging, a reference) under
``torch.no_grad()`` or in ``eval()`` so that it is not captured.

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
(``_orig_mod``). **Attach before the first call of the compiled model**:
hooks attached to a model that was already compiled and run are not seen by
the cached graph (checked with the "eager" and "inductor" backends of torch
2.13: nothing is captured and :meth:`Decorrelation.penalty` raises
``RuntimeError``); ``torch._dynamo.reset()`` after attaching makes them
count. Removing hooks (``close()``) is honoured: nothing is captured after it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from . import _checks
from .correlation import NonFiniteActivationsError
from .functional import MODES, PenaltyResult, decorrelation_result, flatten_activation
from .monitor import as_logger

__all__ = ["Decorrelation", "StepStats", "ACTIVATION_MODULES"]

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)
_WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SPATIAL_CONVS = (nn.Conv2d, nn.Conv3d)
# packages whose activation classes are plain nn.Module subclasses
_ACTIVATION_PACKAGES = ("transformers.activations", "timm.layers.activations", "timm.models.layers.activations")


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
class _Layers:
    modules: list
    modes: list
    capture_output: bool
    transformer: bool


@dataclass(frozen=True)
class StepStats:
    """Statistics of the last regularised step (for logging).

    ``neurons`` counts the neurons of all point clouds, ``clouds`` each
    cloud's (one entry when pooled, one per layer otherwise).
    ``min/mean/max_death`` are None for penalties that build no tree.
    """

    step: int
    neurons: int
    dead: int
    min_death: float | None
    mean_death: float | None
    max_death: float | None
    skipped: int
    clouds: tuple[int, ...] = ()


def _is_activation(m: nn.Module) -> bool:
    """An activation-function module: torch's, or one of Hugging Face's / timm's own classes.

    (``transformers.activations.NewGELUActivation`` and friends are plain
    ``nn.Module`` subclasses, not ``nn.GELU``.)
    """
    return isinstance(m, ACTIVATION_MODULES) or type(m).__module__.startswith(_ACTIVATION_PACKAGES)


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()


def _is_projection(m: nn.Module) -> bool:
    """A dense projection: ``nn.Linear`` or Hugging Face's ``Conv1D`` (GPT-2's transposed Linear)."""
    if isinstance(m, nn.Linear):
        return True
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def _ffn_unit(block: nn.Module) -> nn.Module | None:
    """The module whose output is a block's feed-forward hidden units (attention sub-trees skipped).

    The first activation module in registration order, else the first projection.
    """
    acts: list[nn.Module] = []
    projs: list[nn.Module] = []

    def walk(mod: nn.Module) -> None:
        for child in mod.children():
            if _is_attention(child):
                continue
            if _is_activation(child):
                acts.append(child)
            elif _is_projection(child):
                projs.append(child)
            walk(child)

    walk(block)
    return acts[0] if acts else (projs[0] if projs else None)


def _transformer_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(block, feed-forward unit) for every transformer block of ``model``, in registration order.

    A block is a smallest module that holds an attention module, a feed-forward
    unit outside it, and no 2-D / 3-D convolution (which keeps CNNs with
    "attention" gates, e.g. squeeze-excitation, on the CNN rule).
    """
    found: list[tuple[nn.Module, nn.Module]] = []

    def visit(m: nn.Module) -> bool:
        below = False
        for c in m.children():
            if not _is_attention(c) and visit(c):
                below = True
        if below:
            return True
        subs = list(m.modules())[1:]
        if not any(_is_attention(x) for x in subs) or any(isinstance(x, _SPATIAL_CONVS) for x in subs):
            return False
        unit = _ffn_unit(m)
        if unit is None:
            return False
        found.append((m, unit))
        return True

    if not _is_attention(model):
        visit(model)
    return found


def _resolve_layers(model: nn.Module, layers, mode: str | None) -> _Layers:
    """Modules to hook, their modes, whether the model output is captured, and whether it is a transformer."""
    if layers == "auto":
        blocks = _transformer_blocks(model)
        if blocks:
            units = [u for _, u in blocks]
            return _Layers(units, [mode or "features_last"] * len(units), False, True)
        acts = [m for m in model.modules() if _is_activation(m)]
        if not acts:
            acts = [m for m in model.modules() if isinstance(m, _WEIGHTED_MODULES) and m is not model]
        return _Layers(acts, [mode or "flatten"] * len(acts), True, False)
    if isinstance(layers, (nn.Module, str)):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        raise TypeError("layers must be 'auto', a list of modules or a list of name patterns") from None
    if not items:
        raise ValueError("layers is empty: pass 'auto', modules or name patterns")
    named = dict(model.named_modules())
    chosen: list[nn.Module] = []
    for it in items:
        if isinstance(it, nn.Module):
            if not any(it is m for m in named.values()):
                raise ValueError(f"module {type(it).__name__} is not part of the model")
            chosen.append(it)
        elif isinstance(it, str):
            hits = [m for name, m in named.items() if name and fnmatch.fnmatchcase(name, it)]
            if not hits:
                raise ValueError(
                    f"layer pattern {it!r} matches no module; names look like {list(named)[1:6]}"
                )
            chosen.extend(h for h in hits if not any(h is c for c in chosen))
        else:
            raise TypeError(f"a layer must be an nn.Module or a name pattern, got {type(it).__name__}")
    return _Layers(chosen, [mode or "flatten"] * len(chosen), False, False)


class Decorrelation:
    """Hook-based T1 / T2 (or baseline) regulariser for any PyTorch model.

    Parameters
    ----------
    model : nn.Module
    layers : "auto" | list of nn.Module | list of str
        Which layer outputs are neurons (see the module docstring). The
        remaining parameters are keyword-only.
    penalty : {"t1", "t2", "mean_abs_corr", "decov", "none"}
    weight : float
        lambda; :meth:`penalty` returns ``weight * T``.
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
        MST kernel (see :func:`topodecorr.mst_deaths`).
    dead_neurons : {"keep", "drop"}
        Neurons constant over the batch stay in the point cloud with
        correlation 0 (``"keep"``, the paper's convention: each adds a death of
        1, so T1 / T2 reward them) or leave it (``"drop"``); either way
        :attr:`last_stats` counts them as dead.
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
    >>> reg.last_stats.neurons
    19
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._entry = _checks.pipeline(penalty, weight, dissimilarity, sampling, fraction, per_layer_count,
                                       alpha, dead_neurons, max_samples, count_name="per_layer_count")
        if mode is not None:
            _checks.choice("mode", mode, MODES)
        if pooled is not None and not isinstance(pooled, bool):
            raise TypeError(f"pooled must be True, False or None (the default), got {pooled!r}")
        _checks.integer("every", every, 1)
        _checks.integer("refresh_every", refresh_every, 1)
        _checks.choice("distributed", distributed, ("global", "local"))
        _checks.choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
        # torch.compile's wrapper: hooks go on the module it compiled (dynamo honours hooks
        # on the inner modules; a forward hook on the wrapper itself breaks its tracing)
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        self.model = model
        chosen = _resolve_layers(model, layers, mode)
        self.modules, self.modes, self._capture_output = chosen.modules, chosen.modes, chosen.capture_output
        self.mode = mode
        self.pooled = (not chosen.transformer) if pooled is None else pooled
        self.penalty_name = penalty
        self.weight = float(weight)
        # the pipeline's options, passed to decorrelation_result on every regularised step
        self._options = dict(
            dissimilarity=dissimilarity, sampling=sampling, fraction=fraction, count=per_layer_count,
            pooled=self.pooled, alpha=alpha, max_samples=max_samples, dead_neurons=dead_neurons, backend=backend,
        )
        self.every = every
        self.refresh_every = refresh_every
        self.distributed = distributed
        self.on_nonfinite = on_nonfinite
        self.capture_in_eval = capture_in_eval
        self.log = as_logger(log)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # number of penalty() calls
        self.skipped = 0
        self._regularised = 0  # number of steps that computed a penalty
        self._handles: list = []
        self._captured: list[tuple[int, torch.Tensor]] = []
        self._output: torch.Tensor | None = None
        self._used = False  # the last penalty() used the captured activations and nothing was captured since
        self._tree: _TreeCache | None = None
        self._last: tuple[int, PenaltyResult] | None = None

    # -- hooks -----------------------------------------------------------------
    def _active(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        if not (self.model.training or self.capture_in_eval):
            return False
        return (self.step % self.every) == 0

    def _make_hook(self, idx: int):
        def hook(module, inputs, output):
            if self._active() and isinstance(output, torch.Tensor):
                self._captured.append((idx, output))
                self._used = False

        return hook

    def _output_hook(self, module, inputs, output):
        if self._active() and isinstance(output, torch.Tensor):
            # the last hooked module may produce the model output itself (a Sequential ending
            # in a hooked Linear): count that tensor once, as the output layer
            self._captured = [(i, t) for i, t in self._captured if t is not output]
            self._output = output
            self._used = False

    def attach(self) -> "Decorrelation":
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            for i, m in enumerate(self.modules):
                self._handles.append(m.register_forward_hook(self._make_hook(i)))
            if self._capture_output:
                self._handles.append(self.model.register_forward_hook(self._output_hook))
        return self

    def close(self) -> None:
        """Remove the hooks and drop captured tensors."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._release()

    def __enter__(self) -> "Decorrelation":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self) -> None:
        self._captured = []
        self._output = None

    # -- penalty ---------------------------------------------------------------
    def captured_activations(self) -> list[torch.Tensor]:
        """The layer outputs captured since the last penalty, flattened to (samples, neurons)."""
        acts = [flatten_activation(t, self.modes[i]) for i, t in self._captured]
        if self._output is not None:
            acts.append(flatten_activation(self._output, self.mode or "flatten"))
        return acts

    def _penalty_inputs(self) -> tuple[list[torch.Tensor], list[str]]:
        """The captured outputs for the pipeline: channel maps as they are (it reads them without
        the (B * H * W, C) copy), everything else flattened (a view)."""
        pairs = [(t, self.modes[i]) for i, t in self._captured]
        if self._output is not None:
            pairs.append((self._output, self.mode or "flatten"))
        keep = [m == "channel" and isinstance(t, torch.Tensor) and t.dim() > 2 for t, m in pairs]
        acts = [t if k else flatten_activation(t, m) for (t, m), k in zip(pairs, keep)]
        return acts, ["channel" if k else "flatten" for k in keep]

    def penalty(self) -> torch.Tensor:
        """Weighted penalty of the activations captured by the last forward pass.

        Returns a scalar tensor on the model's device (0 on steps skipped by
        ``every``), and releases the captured tensors.
        """
        try:
            if self.step % self.every != 0:
                return self._zero()
            acts, modes = self._penalty_inputs()
            if not acts:
                if not self._handles:
                    raise RuntimeError("Decorrelation is not attached: use `with reg:` or reg.attach()")
                if self._used:
                    raise RuntimeError(
                        "the previous penalty() call already used these activations; run a new forward "
                        "pass before the next penalty() (each forward's activations give one penalty)"
                    )
                raise RuntimeError(
                    "no activations were captured: call penalty() after a forward pass in training mode "
                    "with gradients enabled (or set capture_in_eval=True); with torch.compile, attach "
                    "before the compiled model's first call (or call torch._dynamo.reset() after attaching)"
                )
            is_output = [False] * len(acts)
            if self._output is not None:
                is_output[-1] = True
            acts = self._gather(acts)
            self._used = True
            try:
                return self._compute(acts, is_output, modes)
            except NonFiniteActivationsError:
                return self._nonfinite("the captured activations are not finite (NaN or inf)")
        finally:
            self.step += 1
            self._release()

    def _zero(self) -> torch.Tensor:
        p = next(self.model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def _gather(self, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.distributed != "global":
            return acts
        from .distributed import gather_activations, is_distributed

        if not is_distributed():
            return acts
        return [gather_activations(a) for a in acts]

    def _compute(self, acts, is_output, modes) -> torch.Tensor:
        shape = tuple(a.shape[1] for a in acts)  # neurons per layer (channels of a map)
        tree = self._tree if self._regularised % self.refresh_every != 0 else None
        if tree is not None and tree.shape != shape:
            tree = None  # the layers changed width (another model path): build a new tree
        res = decorrelation_result(
            acts,
            self.penalty_name,
            self.weight,
            output_layers=is_output,
            generator=self.generator,
            indices=tree.indices if tree else None,
            edges=tree.edges if tree else None,
            live=tree.live if tree else None,
            modes=modes,
            **self._options,
        )
        self._regularised += 1
        if tree is None and self.refresh_every > 1 and self._entry.kind == "deaths":
            self._tree = _TreeCache(shape, res.indices, res.edges, res.live)
        value = res.value
        if not bool(torch.isfinite(value)):
            return self._nonfinite(f"the {self.penalty_name} penalty is {value.item()}")
        # keep only detached statistics: the graph of this step is the loss's to free
        self._last = (self.step, res.detached())
        if self.log is not None:
            self.log(self, value)
        return value

    def _nonfinite(self, what: str) -> torch.Tensor:
        """Raise FloatingPointError, or (on_nonfinite="skip") count the step and return 0."""
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{what} at step {self.step}; the activations or weights are probably diverging "
                "(lower the learning rate or the weight), or pass on_nonfinite='skip' to skip such "
                "steps and count them"
            )
        self.skipped += 1
        return self._zero()

    # -- statistics ------------------------------------------------------------
    @property
    def last_stats(self) -> StepStats | None:
        """Statistics of the last regularised step (computed on demand: one host sync)."""
        if self._last is None:
            return None
        step, res = self._last
        if res.deaths:
            d = torch.cat([x.detach().float() for x in res.deaths])
        else:
            d = None
        has = d is not None and d.numel() > 0
        return StepStats(
            step=step,
            neurons=int(res.neurons),
            dead=int(res.dead) if res.dead is not None else 0,
            min_death=float(d.min()) if has else None,
            mean_death=float(d.mean()) if has else None,
            max_death=float(d.max()) if has else None,
            skipped=self.skipped,
            clouds=tuple(int(c) for c in res.clouds),
        )

    @property
    def last_deaths(self) -> torch.Tensor | None:
        """Deaths of the last regularised step (detached, pooled over point clouds)."""
        if self._last is None or not self._last[1].deaths:
            return None
        return torch.cat([x.detach() for x in self._last[1].deaths])
