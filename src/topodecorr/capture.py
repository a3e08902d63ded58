"""Capture neurons from the training forward pass by hooks, and regularise them.

:class:`Decorrelation` attaches forward hooks to a model, keeps the outputs of
the chosen layers during the *training forward pass itself* (there is never a
second forward pass), and turns them into a weighted penalty with the one
pipeline of :mod:`topodecorr.functional`.

Layer selection with ``layers="auto"``:

* every activation-function module (``nn.ReLU``, ``nn.GELU``, ``nn.Tanh``, ...)
  is a hidden layer, read after its nonlinearity (for ``nn.Sequential`` MLPs and
  CNNs this is exactly the paper's rule);
* the model's own output is the output layer, read as logits, when it is a
  tensor;
* a model whose nonlinearities are functional (``F.relu`` inside ``forward``,
  as in ``nn.TransformerEncoderLayer``) has no activation modules: then every
  ``nn.Linear`` / ``nn.Conv*d`` module's output is captured instead
  (pre-activation), plus the model output. Pass ``layers=`` explicitly to choose.

``layers`` may also be a list of modules, or of ``fnmatch`` patterns matched
against ``model.named_modules()`` names (e.g. ``["encoder.*.relu", "head"]``).
A module called several times in one forward contributes one layer per call.

What ``layers="auto"`` captures in ``nn.TransformerEncoderLayer``: its
nonlinearity is functional, so every ``nn.Linear`` is hooked: ``linear1``
(the feed-forward block's hidden units, before the activation), ``linear2``
and the block's output, each flattened over (sequence, features).
``self_attn.out_proj`` is hooked too but never fires: ``nn.MultiheadAttention``
uses its weights without calling it. Pass ``layers=`` to choose otherwise.

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
import math
from dataclasses import dataclass

import torch
from torch import nn

from .correlation import NonFiniteActivationsError
from .functional import DEAD_NEURONS, KINDS, decorrelation_penalty, flatten_activation
from .penalties import lookup
from .sampling import SAMPLINGS

__all__ = ["Decorrelation", "StepStats", "ACTIVATION_MODULES"]

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)
_WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class StepStats:
    """Statistics of the last regularised step (for logging).

    ``min/mean/max_death`` are None for penalties that build no tree.
    """

    step: int
    neurons: int
    dead: int
    min_death: float | None
    mean_death: float | None
    max_death: float | None
    skipped: int


def _resolve_layers(model: nn.Module, layers) -> tuple[list[nn.Module], bool]:
    """Modules to hook, and whether the model's output is captured as the output layer."""
    if layers == "auto":
        acts = [m for m in model.modules() if isinstance(m, ACTIVATION_MODULES)]
        if not acts:
            acts = [m for m in model.modules() if isinstance(m, _WEIGHTED_MODULES) and m is not model]
        return acts, True
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
    return chosen, False


class Decorrelation:
    """Hook-based T1 / T2 (or baseline) regulariser for any PyTorch model.

    Parameters
    ----------
    model : nn.Module
    layers : "auto" | list of nn.Module | list of str
        Which layer outputs are neurons (see the module docstring).
    penalty : {"t1", "t2", "mean_abs_corr", "decov", "none"}
    weight : float
        lambda; :meth:`penalty` returns ``weight * T``.
    dissimilarity : {"abs", "sqrt"}
    sampling : {"all", "importance", "fixed", "random"}
    fraction : float
        p for importance sampling (the paper: 1.0 for MLPs, 0.005 for CNNs).
    per_layer_count : int, optional
        Neurons per hidden layer for ``"fixed"`` / ``"random"`` (alias: ``count``).
    pooled : bool
        One point cloud for all layers (the paper) or one per layer, summed.
    mode : {"flatten", "channel"}
        A conv map's every entry is a neuron, or one neuron per channel.
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
        Seeds the generator of ``sampling="random"``.
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
    count : int, optional
        Alias of ``per_layer_count``.

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
        penalty: str = "t1",
        weight: float = 1e-3,
        dissimilarity: str = "abs",
        sampling: str = "all",
        fraction: float = 1.0,
        per_layer_count: int | None = None,
        pooled: bool = True,
        mode: str = "flatten",
        every: int = 1,
        refresh_every: int = 1,
        alpha: float = 0.5,
        seed: int = 0,
        distributed: str = "global",
        on_nonfinite: str = "raise",
        capture_in_eval: bool = False,
        backend: str = "auto",
        count: int | None = None,
        dead_neurons: str = "keep",
    ):
        if count is not None and per_layer_count is not None and count != per_layer_count:
            raise ValueError("pass per_layer_count or its alias count, not both")
        count = per_layer_count if per_layer_count is not None else count
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._entry = lookup(penalty, KINDS)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha (T2's trade-off) must lie in [0, 1], got {alpha!r}")
        if count is not None and not (isinstance(count, int) and count >= 1):
            raise ValueError(f"per_layer_count must be a positive number of neurons per layer, got {count!r}")
        if dissimilarity not in ("abs", "sqrt"):
            raise ValueError(f"unknown dissimilarity {dissimilarity!r}; choose 'abs' or 'sqrt'")
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        if sampling == "fixed" and count is None:
            raise ValueError("sampling='fixed' needs per_layer_count=<neurons per hidden layer>")
        if mode not in ("flatten", "channel"):
            raise ValueError(f"unknown mode {mode!r}; choose 'flatten' or 'channel'")
        for name, k in (("every", every), ("refresh_every", refresh_every)):
            if not (isinstance(k, int) and k >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
        if distributed not in ("global", "local"):
            raise ValueError(f"distributed must be 'global' or 'local', got {distributed!r}")
        if dead_neurons not in DEAD_NEURONS:
            raise ValueError(f"unknown dead_neurons {dead_neurons!r}; choose one of {DEAD_NEURONS}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        # torch.compile's wrapper: hooks go on the module it compiled (dynamo honours hooks
        # on the inner modules; a forward hook on the wrapper itself breaks its tracing)
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        self.model = model
        self.penalty_name = penalty
        self.weight = float(weight)
        self.dissimilarity = dissimilarity
        self.sampling = sampling
        self.fraction = fraction
        self.count = count
        self.pooled = pooled
        self.mode = mode
        self.every = every
        self.refresh_every = refresh_every
        self.alpha = alpha
        self.distributed = distributed
        self.on_nonfinite = on_nonfinite
        self.capture_in_eval = capture_in_eval
        self.backend = backend
        self.dead_neurons = dead_neurons
        self.generator = torch.Generator().manual_seed(seed)
        self.modules, self._capture_output = _resolve_layers(model, layers)
        self.step = 0  # number of penalty() calls
        self.skipped = 0
        self._regularised = 0  # number of steps that computed a penalty
        self._handles: list = []
        self._captured: list[tuple[int, torch.Tensor]] = []
        self._output: torch.Tensor | None = None
        self._cache_indices = None
        self._cache_edges = None
        self._cache_live = None
        self._cache_shape = None
        self._last = None

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

        return hook

    def _output_hook(self, module, inputs, output):
        if self._active() and isinstance(output, torch.Tensor):
            # the last hooked module may produce the model output itself (a Sequential ending
            # in a hooked Linear): count that tensor once, as the output layer
            self._captured = [(i, t) for i, t in self._captured if t is not output]
            self._output = output

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
        acts = [flatten_activation(t, self.mode) for _, t in self._captured]
        if self._output is not None:
            acts.append(flatten_activation(self._output, "flatten" if self._output.dim() == 2 else self.mode))
        return acts

    def penalty(self) -> torch.Tensor:
        """Weighted penalty of the activations captured by the last forward pass.

        Returns a scalar tensor on the model's device (0 on steps skipped by
        ``every``), and releases the captured tensors.
        """
        try:
            if self.step % self.every != 0:
                return self._zero()
            acts = self.captured_activations()
            if not acts:
                if not self._handles:
                    raise RuntimeError("Decorrelation is not attached: use `with reg:` or reg.attach()")
                raise RuntimeError(
                    "no activations were captured: call penalty() after a forward pass in training mode "
                    "with gradients enabled (or set capture_in_eval=True); with torch.compile, attach "
                    "before the compiled model's first call (or call torch._dynamo.reset() after attaching)"
                )
            is_output = [False] * len(acts)
            if self._output is not None:
                is_output[-1] = True
            acts = self._gather(acts)
            try:
                return self._compute(acts, is_output)
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

    def _compute(self, acts, is_output) -> torch.Tensor:
        shape = tuple(a.shape[1] for a in acts)
        reuse = (
            self._entry.kind == "deaths"
            and self.refresh_every > 1
            and self._cache_edges is not None
            and self._cache_shape == shape
            and self._regularised % self.refresh_every != 0
        )
        res = decorrelation_penalty(
            acts,
            self.penalty_name,
            self.weight,
            dissimilarity=self.dissimilarity,
            sampling=self.sampling,
            fraction=self.fraction,
            count=self.count,
            output_layers=is_output,
            pooled=self.pooled,
            alpha=self.alpha,
            generator=self.generator,
            indices=self._cache_indices if reuse else None,
            edges=self._cache_edges if reuse else None,
            live=self._cache_live if reuse else None,
            dead_neurons=self.dead_neurons,
            backend=self.backend,
            return_result=True,
        )
        self._regularised += 1
        if self._entry.kind == "deaths" and self.refresh_every > 1 and not reuse:
            self._cache_indices, self._cache_edges, self._cache_shape = res.indices, res.edges, shape
            self._cache_live = res.live
        value = res.value
        if not bool(torch.isfinite(value)):
            return self._nonfinite(f"the {self.penalty_name} penalty is {value.item()}")
        # keep only detached statistics: the graph of this step is the loss's to free
        res.deaths = [d.detach() for d in res.deaths]
        self._last = (self.step, res)
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
        )

    @property
    def last_deaths(self) -> torch.Tensor | None:
        """Deaths of the last regularised step (detached, pooled over point clouds)."""
        if self._last is None or not self._last[1].deaths:
            return None
        return torch.cat([x.detach() for x in self._last[1].deaths])
