"""Which tensors are neurons: the layer rule, layer resolution, and the recorder of one forward.

This module is the one home of the rule that turns a model into point clouds.
:class:`topodecorr.Decorrelation`, :func:`topodecorr.inspect`, both training
callbacks and the experiment harness's death probe all call it.

**The rule** of ``layers="auto"`` (:func:`resolve_layers`):

* **Transformers.** When the model has transformer blocks, ``"auto"`` takes
  one point cloud per block over its feed-forward hidden units, read with
  ``mode="features_last"`` (tokens are samples, the FFN's features the
  neurons); nothing else is captured (no model output, no pooler or head). A
  block is a smallest module holding an attention module
  (``nn.MultiheadAttention`` or a class whose name contains "Attention") and,
  outside it, an activation module or a dense projection, with no 2-D / 3-D
  convolution inside. In the block the unit read is its first activation
  module (after the nonlinearity; Hugging Face's and timm's activation classes
  count, although they are not ``nn.GELU`` subclasses), else its first
  projection (``nn.Linear`` or Hugging Face's ``Conv1D``, before the
  nonlinearity).
* **Other models.** Every activation-function module (:data:`ACTIVATION_MODULES`
  and the activation classes of Hugging Face and timm) is a hidden layer, read
  after its nonlinearity, and the model's own output is the output layer, read
  as logits, when it is a tensor. A model without activation modules (only
  ``F.relu`` in ``forward``) has every ``nn.Linear`` / ``nn.Conv*d`` output
  captured instead, plus the model output.

``layers`` may also name modules: module objects, or ``fnmatch`` patterns
matched against ``model.named_modules()`` names (``["encoder.*.relu", "head"]``);
:func:`check_layers` validates such a list without a model (the callbacks use it
when they are built). A ``torch.compile`` wrapper is unwrapped
(:func:`unwrap`): the hooks go on the module it compiled.

**The recorder** (:class:`Recorder`) attaches forward hooks and keeps the
outputs of the chosen layers, with their names (a module called twice in one
forward, like torchvision's ``BasicBlock.relu``, gives ``"layer1.0.relu"`` and
``"layer1.0.relu#2"``). What it keeps, and what it refuses:

* only forwards its ``when()`` accepts (for :class:`topodecorr.Decorrelation`:
  training mode, gradients enabled, a step that ``every`` selects);
* nothing from a forward *recomputed by activation checkpointing*
  (``torch.utils.checkpoint``, reentrant or not, and Hugging Face's
  ``gradient_checkpointing_enable``): a recompute runs inside the autograd
  engine's backward (``torch._C._current_graph_task_id() != -1``), which no
  training forward does. Under non-reentrant checkpointing the original
  forward is recorded with its graph. Reentrant checkpointing runs the
  original forward without gradients: its layers are recorded as leaves, the
  penalty's gradient collects in them, and the recompute adds it to the
  recomputed layers' gradient (:class:`_Reentrant`). Either way the penalty
  and its gradients equal those without checkpointing. Keep the hooks
  attached until ``backward()`` has run (a gradient that arrives after they
  were removed is a ``RuntimeError``). Any other captured layer running
  without gradients inside a training forward (a frozen part under
  ``torch.no_grad()``) is a ``RuntimeError``: leave it out with ``layers=``;
* nothing from a forward of the model that raised: its partial record is
  dropped when the exception leaves the model;
* a second training forward of the model before the record was taken
  (:meth:`Recorder.take`, which :meth:`topodecorr.Decorrelation.penalty`
  calls) is a ``RuntimeError``: the two forwards' rows are different samples
  and cannot share one point cloud. Call ``penalty()`` after each forward, or
  run the extra forward under ``torch.no_grad()`` or in ``eval()``.

Forward boundaries are the calls of the model the recorder was given. Calling
one of its submodules directly (``model.encoder(x)``) is recorded too, but the
two checks above then cannot see where one forward ends.

Examples
--------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> layers = resolve_layers(net, "auto")
>>> layers.names, layers.capture_output
(('1',), True)
>>> with Recorder(net, layers) as rec:
...     _ = net(torch.randn(5, 4))
...     [(r.name, tuple(r.matrix.shape)) for r in rec.take()]
[('1', (5, 8)), ('output', (5, 2))]
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "ACTIVATION_MODULES",
    "MODES",
    "Layers",
    "Record",
    "Recorder",
    "check_layers",
    "dynamo_has_compiled",
    "flatten_activation",
    "is_activation",
    "resolve_layers",
    "unwrap",
]

from .functional import MODES, flatten_activation  # noqa: E402  (the modes and the flattening live with the pipeline)

#: torch's activation-function modules (the rule also takes Hugging Face's and timm's own classes).
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)
_WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SPATIAL_CONVS = (nn.Conv2d, nn.Conv3d)
# packages whose activation classes are plain nn.Module subclasses
_ACTIVATION_PACKAGES = ("transformers.activations", "timm.layers.activations", "timm.models.layers.activations")
#: the name of the model's own output in a record
OUTPUT = "output"


# -- the rule ------------------------------------------------------------------------------------


def is_activation(m: nn.Module) -> bool:
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
            if is_activation(child):
                acts.append(child)
            elif _is_projection(child):
                projs.append(child)
            walk(child)

    walk(block)
    return acts[0] if acts else (projs[0] if projs else None)


def transformer_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
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


# -- resolution ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Layers:
    """The layers of a model that are neurons.

    Attributes
    ----------
    modules : tuple of nn.Module
        The hooked modules, in registration order.
    names : tuple of str
        Their names in ``model.named_modules()`` (the class name for the model itself).
    modes : tuple of str
        How each module's output becomes (samples, neurons) (see :func:`flatten_activation`).
    capture_output : bool
        Whether the model's own output is the output layer.
    output_mode : str
        The mode of the model's output.
    transformer : bool
        Whether the transformer rule of ``"auto"`` chose them (one cloud per block by default).
    """

    modules: tuple
    names: tuple
    modes: tuple
    capture_output: bool
    output_mode: str
    transformer: bool


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiled (the model itself otherwise).

    Hooks go on it: dynamo honours hooks on the modules inside a compiled
    model, while a forward hook on the wrapper itself breaks its tracing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def dynamo_has_compiled() -> bool:
    """Whether ``torch.compile`` (dynamo) compiled any code in this process since its last ``torch._dynamo.reset()``.

    Then a graph compiled without hooks may be reused for a model hooked now
    (see :mod:`topodecorr.capture`, ``torch.compile``). Reads dynamo's record of
    the code objects it compiled; False when dynamo was never imported.
    """
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    seen = getattr(getattr(convert_frame, "input_codes", None), "seen_ids", None)
    return bool(seen)


def check_layers(layers) -> "str | tuple":
    """Validate a ``layers`` option without a model: ``"auto"``, or a tuple of modules / name patterns.

    Raises ``TypeError`` / ``ValueError`` naming what is wrong; the callbacks
    call it when they are built, long before they see the model.
    """
    if isinstance(layers, str) and layers == "auto":
        return "auto"
    if isinstance(layers, (nn.Module, str)):
        layers = [layers]
    try:
        items = tuple(layers)
    except TypeError:
        raise TypeError(
            f"layers must be 'auto', a list of modules or a list of name patterns, got {type(layers).__name__}"
        ) from None
    if not items:
        raise ValueError("layers is empty: pass 'auto', modules or name patterns")
    for it in items:
        if not isinstance(it, (nn.Module, str)):
            raise TypeError(f"a layer must be an nn.Module or a name pattern, got {type(it).__name__}")
        if isinstance(it, str) and not it:
            raise ValueError("a layer name pattern is empty: pass a module name such as 'net.1' or 'blocks.*.act'")
    return items


def resolve_layers(model: nn.Module, layers="auto", mode: str | None = None) -> Layers:
    """The modules of ``model`` that are neurons, their names and modes (the rule of this module).

    ``model`` is unwrapped first (:func:`unwrap`). ``mode`` (``None``: the
    rule's default) applies to every chosen layer.
    """
    model = unwrap(model)
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    spec = check_layers(layers)
    named = list(model.named_modules())
    if spec == "auto":
        blocks = transformer_blocks(model)
        if blocks:
            chosen = [u for _, u in blocks]
            return _layers(named, chosen, mode or "features_last", False, mode, True)
        chosen = [m for m in model.modules() if is_activation(m)]
        if not chosen:
            chosen = [m for m in model.modules() if isinstance(m, _WEIGHTED_MODULES) and m is not model]
        return _layers(named, chosen, mode or "flatten", True, mode, False)
    chosen = []
    for it in spec:
        if isinstance(it, nn.Module):
            if not any(it is m for _, m in named):
                raise ValueError(
                    f"module {type(it).__name__} is not part of the model ({type(model).__name__}); pass "
                    "modules of the model the regulariser is attached to, or their names"
                )
            hits = [it]
        else:
            hits = [m for name, m in named if name and fnmatch.fnmatchcase(name, it)]
            if not hits:
                raise ValueError(
                    f"layer pattern {it!r} matches no module of {type(model).__name__}; names look like "
                    f"{[n for n, _ in named[1:6]]}"
                )
        chosen.extend(h for h in hits if not any(h is c for c in chosen))
    return _layers(named, chosen, mode or "flatten", False, mode, False)


def _layers(named, chosen, mode, capture_output, given_mode, transformer) -> Layers:
    names = {id(m): (name or type(m).__name__) for name, m in named}
    return Layers(
        modules=tuple(chosen), names=tuple(names[id(m)] for m in chosen), modes=(mode,) * len(chosen),
        capture_output=capture_output, output_mode=given_mode or "flatten", transformer=transformer,
    )


# -- recording -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Record:
    """One captured layer output of one forward.

    ``tensor`` is the layer output as the model produced it (with its graph);
    ``matrix`` the (samples, neurons) view the pipeline reads; ``step`` the
    recorded forward it belongs to (:attr:`Recorder.step`).
    """

    name: str
    layer: int  # index into Layers.modules; len(modules) for the model output
    tensor: torch.Tensor
    mode: str
    is_output: bool
    step: int = 0

    @property
    def matrix(self) -> torch.Tensor:
        return flatten_activation(self.tensor, self.mode)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (an activation-checkpointing recompute)."""
    return torch._C._current_graph_task_id() != -1


class Recorder:
    """Forward hooks that record the chosen layers' outputs of one forward at a time.

    Parameters
    ----------
    model : nn.Module
        The model whose calls delimit a forward (unwrapped from ``torch.compile``).
    layers : Layers
        From :func:`resolve_layers`.
    when : callable, optional
        ``when()`` is asked at the start of every forward (and for every layer
        output outside a forward of ``model``): record it or not. Default: always.
    needs_grad : bool
        Record only forwards run with gradients enabled (training); a captured
        layer running without gradients inside such a forward is an error (see
        the module docstring). False for inspection under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, layers: Layers, when: Callable[[], bool] | None = None,
                 needs_grad: bool = False):
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(_DATA_PARALLEL)
        self.model = unwrap(model)
        self.layers = layers
        self.when = when
        self.needs_grad = needs_grad
        self._handles: list = []
        self._records: list[Record] = []
        self._open = False  # a recorded forward of the model is running
        self.forwards = 0  # recorded forwards of the model since construction
        self._seen = False  # the open forward's finishing hook ran (it did not raise)
        self._reentrant = _Reentrant(self)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> "Recorder":
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        for i, m in enumerate(self.layers.modules):
            self._handles.append(m.register_forward_hook(self._layer_hook(i)))
        self._handles.append(self.model.register_forward_pre_hook(self._begin))
        self._handles.append(self.model.register_forward_hook(self._end))
        # runs even when the forward raised: drops what that forward left behind
        self._handles.append(self.model.register_forward_hook(self._cleanup, always_call=True))
        return self

    def detach(self) -> None:
        """Remove the hooks and drop everything recorded."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "Recorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def clear(self) -> None:
        self._records = []
        self._open = self._seen = False

    @property
    def step(self) -> int:
        """The recorded forward the current records belong to: 0 for the first forward of the model
        that was recorded, 1 for the next, ... (a forward that was not recorded, under ``no_grad``
        or not ``when``, does not count)."""
        return max(self.forwards - 1, 0)

    @property
    def records(self) -> tuple[Record, ...]:
        """What was recorded and not taken yet (a snapshot; :meth:`take` removes them)."""
        return tuple(self._records)

    def take(self) -> list[Record]:
        """The records of the last forward (in call order), removed from the recorder."""
        out = self._records
        self.clear()
        return out

    # -- hooks ---------------------------------------------------------------------------------
    def _wanted(self) -> bool:
        if self.needs_grad and not torch.is_grad_enabled():
            return False
        return self.when is None or bool(self.when())

    def _begin(self, module, args) -> None:
        if getattr(module, "_is_replica", False):
            raise RuntimeError(_DATA_PARALLEL)
        if torch.compiler.is_compiling() or _in_backward():
            return
        if not self._wanted():
            self._open = False
            return
        if self._records:
            self.clear()
            raise RuntimeError(
                "a second training forward of the model ran before penalty() used the first one's activations; "
                "each forward's activations give one penalty (two forwards' rows are different samples and "
                "cannot share a point cloud): call penalty() after every training forward, or run the extra "
                "forward under torch.no_grad() or in eval() so that it is not captured"
            )
        self._open, self._seen = True, False
        self.forwards += 1
        self._reentrant.clear()  # the previous forward's backward is over

    def _end(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            if self.layers.capture_output and self._wanted():
                self._add_output(output)
            return
        if not self._open or _in_backward():
            return
        self._seen = True
        if self.layers.capture_output:
            self._add_output(output)

    def _cleanup(self, module, args, output) -> None:
        if torch.compiler.is_compiling() or not self._open or _in_backward():
            return
        if self._seen:
            self._open = False
        else:  # the forward raised before it finished: leave nothing behind
            self.clear()

    def _add_output(self, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        mode = self.layers.output_mode
        for k, r in enumerate(self._records):
            if r.tensor is output:  # the last hooked module produced the model output (a Sequential
                # ending in a Tanh): that tensor is counted once, under its layer's name, as the output layer
                self._records[k] = Record(r.name, r.layer, output, mode, True, self.step)
                return
        self._records.append(Record(OUTPUT, len(self.layers.modules), output, mode, True, self.step))

    def _layer_hook(self, index: int):
        def hook(module, inputs, output):
            if getattr(module, "_is_replica", False):  # a copy nn.DataParallel made for one of its devices
                raise RuntimeError(_DATA_PARALLEL)
            if not isinstance(output, torch.Tensor):
                return None
            if torch.compiler.is_compiling():
                if self._wanted():
                    self._add(index, output)
                return None
            if _in_backward():  # recomputed by activation checkpointing: the original forward was recorded
                return self._reentrant.inject(index, output)
            if self._open:
                if self.needs_grad and not torch.is_grad_enabled():
                    if not _in_reentrant_checkpoint():
                        self.clear()
                        raise RuntimeError(_NO_GRAD_INSIDE.format(name=self.layers.names[index]))
                    output = self._reentrant.leaf(index, output)
                self._add(index, output)
            elif self._wanted():  # a submodule called directly, outside a forward of the model
                self._add(index, output)
            return None

        return hook

    def _add(self, index: int, output: torch.Tensor) -> None:
        base = self.layers.names[index]
        calls = sum(1 for r in self._records if r.layer == index)
        name = base if calls == 0 else f"{base}#{calls + 1}"
        self._records.append(Record(name, index, output, self.layers.modes[index], False, self.step))


_DATA_PARALLEL = (
    "nn.DataParallel runs a copy of the model per device, each on its own thread and its own slice of the "
    "batch: their activations cannot make one point cloud per step. Use DistributedDataParallel (one process "
    "per GPU, launched with torchrun; the penalty gathers the batch across ranks, docs/scaling.md) or train "
    "on one device"
)


# -- reentrant activation checkpointing ----------------------------------------------------------


def _in_reentrant_checkpoint() -> bool:
    """Whether torch.utils.checkpoint's reentrant variant is running its block (a frame of its forward)."""
    from torch.utils.checkpoint import CheckpointFunction

    code = CheckpointFunction.forward.__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class _Reentrant:
    """The layers a reentrant checkpoint ran without gradients, and their gradients in its recompute.

    The original forward of a reentrant checkpoint runs without gradients, so the
    recorded output is a leaf (``leaf``): the penalty is computed from it, and the
    backward of the loss leaves the penalty's gradient in ``leaf.grad``. The
    checkpoint's backward then recomputes the block with gradients (inside the
    autograd engine); there each recomputed output of the same layer, in the
    same order, gets an identity whose backward adds that gradient (``inject``),
    and it flows into the block's weights as without checkpointing.
    """

    def __init__(self, recorder: "Recorder") -> None:
        self.recorder = recorder
        self.leaves: dict[int, list[torch.Tensor]] = {}

    def clear(self) -> None:
        self.leaves = {}

    def leaf(self, index: int, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        self.leaves.setdefault(index, []).append(leaf)
        leaf.register_hook(self._check_attached)
        return leaf

    def _check_attached(self, grad: torch.Tensor) -> None:
        if not self.recorder.attached:  # the recompute will not be seen: its gradient would be lost
            raise RuntimeError(
                "the penalty's gradient reached a layer of a reentrant activation checkpoint after the "
                "regulariser's hooks were removed: keep it attached until backward() has run (e.g. call "
                "backward() inside `with reg:`), or use use_reentrant=False"
            )

    def inject(self, index: int, output: torch.Tensor) -> torch.Tensor | None:
        waiting = self.leaves.get(index)
        if not waiting or not torch.is_grad_enabled():
            return None  # a non-reentrant recompute: its original forward was recorded with its graph
        leaf = waiting.pop(0)
        if leaf.shape != output.shape:
            raise RuntimeError(
                f"the recompute of a reentrant activation checkpoint gave layer {index} an output of shape "
                f"{tuple(output.shape)}, the original forward {tuple(leaf.shape)}: the recompute does not "
                "repeat the forward; use use_reentrant=False"
            )
        return _AddGrad.apply(output, leaf)


class _AddGrad(torch.autograd.Function):
    """Identity whose backward adds the penalty's gradient, left in ``leaf.grad`` by the loss's backward."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        extra = ctx.leaf.grad
        if extra is None:
            raise RuntimeError(
                "a reentrant activation checkpoint recomputed a regularised layer before the penalty's gradient "
                "reached it (or the penalty is not part of the loss): add penalty() to the loss that is "
                "back-propagated, or use use_reentrant=False"
            )
        ctx.leaf = None
        return grad + extra.to(grad.dtype), None


_NO_GRAD_INSIDE = (
    "layer {name!r} ran without gradients inside a training forward of the model (under torch.no_grad(), "
    "e.g. a frozen part of the network), so its activations cannot be regularised: leave it out with "
    "layers=[...], or run it with gradients"
)
