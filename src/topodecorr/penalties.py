"""Penalties on MST deaths (T1, T2) and the baselines the paper compares with.

With deaths ``d_1 .. d_{n-1}`` of the zero-dimensional persistence of the
neurons (see :mod:`topodecorr.persistence`):

* T1 = sum_k (1 - d_k)  (minimising it maximises the total MST weight);
* T2 = alpha * std(d) - (1 - alpha) * mean(d), population std, alpha = 0.5.

Baselines: the mean absolute off-diagonal correlation (the paper's naive
decorrelation), DeCov (Cogswell et al., ICLR 2016) and L1 / L2 on all
trainable parameters.

The registry
------------
:data:`REGISTRY` is the one list of penalty names: name -> :class:`Penalty`
(its *kind*, i.e. what it reads, and the function). Everything that accepts
a penalty name (:func:`topodecorr.decorrelation_penalty`,
:class:`topodecorr.Decorrelation`, the experiment harness) looks it up here:

=================  =============  ==============================================
name               kind           value
=================  =============  ==============================================
``none``           activations    0, with a graph (a control that still captures)
``t1``             deaths         :func:`t1` of the MST deaths
``t2``             deaths         :func:`t2` of the MST deaths (uses ``alpha``)
``mean_abs_corr``  activations    :func:`mean_abs_correlation` of the correlation
``decov``          activations    :func:`decov` of the (samples, neurons) matrix
``l1``             parameters     :func:`l1` of the trainable parameters
``l2``             parameters     :func:`l2` of the trainable parameters
``decov_layer``    activations    :func:`decov` per hidden layer, summed (no logits)
``act_l2``         activations    :func:`act_l2`: ||A||_F^2 / B (a scale control)
=================  =============  ==============================================

``"deaths"`` penalties need a spanning tree of the neurons, ``"activations"``
ones the (samples, neurons) matrix, ``"parameters"`` ones the model.

Reference: Ballester, Casacuberta, Escalera, "Decorrelating neurons using
persistence", PMLR 228 (2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = [
    "KINDS",
    "Penalty",
    "REGISTRY",
    "lookup",
    "names",
    "t1",
    "t2",
    "mean_abs_correlation",
    "decov",
    "l1",
    "l2",
]


def _check_deaths(deaths: torch.Tensor) -> None:
    if not isinstance(deaths, torch.Tensor) or deaths.dim() != 1:
        shape = tuple(deaths.shape) if isinstance(deaths, torch.Tensor) else type(deaths).__name__
        raise ValueError(f"deaths must be a 1-D tensor (n - 1,), got {shape}")


def t1(deaths: torch.Tensor) -> torch.Tensor:
    """T1 = sum(1 - deaths). Zero deaths (one neuron) give 0.

    Examples
    --------
    >>> import torch
    >>> t1(torch.tensor([0.25, 0.5, 1.0]))
    tensor(1.2500)
    """
    _check_deaths(deaths)
    return (1.0 - deaths).sum()


def t2(deaths: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """T2 = alpha * std(deaths) - (1 - alpha) * mean(deaths), population std.

    The std's gradient is finite when all deaths are equal (the square root's
    argument is floored at a tiny epsilon, which changes the value by < 1e-6).
    No deaths (one neuron) give 0. Half-precision deaths are evaluated (and
    returned) in float32.

    Examples
    --------
    >>> import torch
    >>> t2(torch.tensor([0.2, 0.6]))
    tensor(-0.1000)
    """
    _check_deaths(deaths)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if deaths.dtype not in (torch.float32, torch.float64):
        # half precision: the epsilon below would underflow to 0 and the std's gradient
        # at equal deaths would become NaN, so the statistics are taken in float32
        deaths = deaths.float()
    if deaths.numel() == 0:
        return deaths.sum()
    mean = deaths.mean()
    var = ((deaths - mean) ** 2).mean()
    tiny = 1e-12 if deaths.dtype == torch.float32 else 1e-24
    std = torch.sqrt(var + tiny) - tiny**0.5
    return alpha * std - (1.0 - alpha) * mean


def mean_abs_correlation(corr: torch.Tensor) -> torch.Tensor:
    """Mean |corr| over the off-diagonal pairs of an (n, n) correlation matrix.

    Constant (dead) neurons count with correlation 0. Fewer than two neurons give 0.

    Examples
    --------
    >>> import torch
    >>> mean_abs_correlation(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    tensor(0.5000)
    """
    if not isinstance(corr, torch.Tensor):
        raise TypeError(f"corr must be a torch.Tensor of shape (n, n), got {type(corr).__name__}")
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f"corr must be a square (n, n) matrix, got shape {tuple(corr.shape)}")
    n = corr.shape[0]
    if n < 2:
        return corr.sum() * 0
    # (sum - trace) / (n (n - 1)): the same value as a masked mean, without the boolean-mask
    # gather and its scatter backward (2.5x faster fwd+bwd at n = 1010, B = 256)
    a = corr.abs()
    return (a.sum() - torch.diagonal(a).sum()) / (n * (n - 1))


def decov(acts: torch.Tensor) -> torch.Tensor:
    """DeCov (Cogswell et al., 2016): 0.5 * (||Cov||_F^2 - ||diag(Cov)||^2).

    ``Cov`` is the (n, n) batch covariance of ``acts`` of shape (B, n), with
    the 1/B normalisation of the original paper. Computed in float32 under autocast.

    Examples
    --------
    >>> import torch
    >>> decov(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    tensor(1.)
    """
    if not isinstance(acts, torch.Tensor):
        raise TypeError(f"acts must be a torch.Tensor of shape (batch, neurons), got {type(acts).__name__}")
    if acts.dim() != 2:
        raise ValueError(f"acts must have shape (batch, neurons), got {tuple(acts.shape)}")
    with torch.autocast(device_type=acts.device.type, enabled=False):
        x = acts.double() if acts.dtype == torch.float64 else acts.float()
        b, n = x.shape
        xc = x - x.mean(dim=0, keepdim=True)
        if b >= n:
            cov = xc.T @ xc / b
            return 0.5 * ((cov**2).sum() - (torch.diagonal(cov) ** 2).sum())
        # fewer samples than neurons (the usual case: batch 256, 1000 neurons): the squared
        # Frobenius norm of Xc^T Xc equals that of the (B, B) Gram Xc Xc^T (both are
        # trace((Xc^T Xc)^2)), which costs B/n of the (n, n) product; the diagonal of the
        # covariance is the columns' squared norms
        gram = xc @ xc.T
        var = (xc * xc).sum(dim=0)
        return 0.5 * ((gram**2).sum() - (var**2).sum()) / (b * b)


def _params(module: nn.Module):
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    return [p for p in module.parameters() if p.requires_grad]


def l1(module: nn.Module) -> torch.Tensor:
    """Sum of |w| over all trainable parameters (biases included, as in the paper's code).

    Examples
    --------
    >>> from torch import nn
    >>> lin = nn.Linear(2, 1)
    >>> _ = nn.init.constant_(lin.weight, -2.0); _ = nn.init.constant_(lin.bias, 1.0)
    >>> l1(lin)
    tensor(5., grad_fn=<AddBackward0>)
    """
    ps = _params(module)
    total = torch.zeros((), device=ps[0].device if ps else None)
    for p in ps:
        total = total + p.abs().sum()
    return total


def l2(module: nn.Module) -> torch.Tensor:
    """Sum of w^2 over all trainable parameters (biases included).

    Examples
    --------
    >>> from torch import nn
    >>> lin = nn.Linear(2, 1)
    >>> _ = nn.init.constant_(lin.weight, -2.0); _ = nn.init.constant_(lin.bias, 1.0)
    >>> l2(lin)
    tensor(9., grad_fn=<AddBackward0>)
    """
    ps = _params(module)
    total = torch.zeros((), device=ps[0].device if ps else None)
    for p in ps:
        total = total + (p * p).sum()
    return total


# --------------------------------------------------------------------------- the registry

#: What a penalty reads: MST deaths (n - 1,), activations (samples, neurons), or a module.
KINDS = ("deaths", "activations", "parameters")


@dataclass(frozen=True)
class Penalty:
    """One entry of :data:`REGISTRY`.

    Attributes
    ----------
    name : str
    kind : {"deaths", "activations", "parameters"}
        What ``fn`` takes: a 1-D tensor of deaths, a (samples, neurons)
        activation matrix, or an ``nn.Module``.
    fn : callable
        ``fn(x)`` (or ``fn(x, alpha=...)`` when ``uses_alpha``) -> scalar tensor.
    uses_alpha : bool
        Whether ``fn`` takes T2's trade-off ``alpha``.
    """

    name: str
    kind: str
    fn: Callable[..., torch.Tensor]
    uses_alpha: bool = False

    def __call__(self, x, alpha: float = 0.5) -> torch.Tensor:
        """The unweighted penalty of ``x`` (deaths, activations or a module, see ``kind``).

        Examples
        --------
        >>> import torch
        >>> REGISTRY["t2"](torch.tensor([0.2, 0.6]), alpha=0.5)
        tensor(-0.1000)
        """
        return self.fn(x, alpha=alpha) if self.uses_alpha else self.fn(x)


def _mean_abs_corr_of(acts: torch.Tensor) -> torch.Tensor:
    from .correlation import correlation  # correlation imports nothing from here; lazy keeps the layers plain

    return mean_abs_correlation(correlation(acts))


def _zero_of(acts: torch.Tensor) -> torch.Tensor:
    # 0 that still depends on the activations: the "none" control keeps a graph
    return acts.sum() * 0.0


#: name -> :class:`Penalty`, read-only. The one place penalty names are defined.
REGISTRY: Mapping[str, Penalty] = MappingProxyType(
    {
        p.name: p
        for p in (
            Penalty("none", "activations", _zero_of),
            Penalty("t1", "deaths", t1),
            Penalty("t2", "deaths", t2, uses_alpha=True),
            Penalty("mean_abs_corr", "activations", _mean_abs_corr_of),
            Penalty("decov", "activations", decov),
            Penalty("l1", "parameters", l1),
            Penalty("l2", "parameters", l2),
        )
    }
)


def names(*kinds: str) -> tuple[str, ...]:
    """Registered penalty names of the given kinds (all names when none given), in registry order.

    Examples
    --------
    >>> names("deaths")
    ('t1', 't2')
    >>> names("deaths", "activations")
    ('none', 't1', 't2', 'mean_abs_corr', 'decov', 'decov_layer', 'act_l2')
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown penalty kind {k!r}; choose from {KINDS}")
    return tuple(n for n, p in REGISTRY.items() if not kinds or p.kind in kinds)


def lookup(name: str, kinds: tuple[str, ...] = KINDS, where: str = "penalty") -> Penalty:
    """The registry entry of ``name``; a clear ``ValueError`` for unknown names or the wrong kind.

    Parameters
    ----------
    name : str
    kinds : tuple of str
        The kinds the caller can compute (e.g. the activation pipeline takes
        ``("deaths", "activations")``).
    where : str
        The caller's name for the argument, used in the message.

    Examples
    --------
    >>> lookup("t1").kind
    'deaths'
    >>> lookup("l1", kinds=("deaths", "activations"))
    Traceback (most recent call last):
    ...
    ValueError: penalty 'l1' acts on the model's parameters, not on activations: compute it as topodecorr.l1(model); here choose one of ('none', 't1', 't2', 'mean_abs_corr', 'decov', 'decov_layer', 'act_l2')
    """
    allowed = names(*kinds)
    entry = REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown {where} {name!r}; choose one of {allowed}")
    if entry.kind not in kinds:
        if entry.kind == "parameters":
            raise ValueError(
                f"{where} {name!r} acts on the model's parameters, not on activations: compute it as "
                f"topodecorr.{entry.fn.__name__}(model); here choose one of {allowed}"
            )
        raise ValueError(f"{where} {name!r} is a {entry.kind} penalty; here choose one of {allowed}")
    return entry


# --------------------------------------------------------------------------- DeCov per layer, activation L2
#
# Two entries added to the registry after the paper's comparison was first run:
#
# * ``decov_layer``: DeCov as Cogswell et al. define it, on the hidden layers only and
#   one layer at a time (the sum over hidden layers of each layer's DeCov). ``decov``
#   above is the same function of whatever cloud it is given, which in the pipeline's
#   default pooled cloud means all hidden layers *and the logits* side by side, so it
#   also penalises covariances across layers and of the output.
# * ``act_l2``: a scale control. It shrinks the activations without asking them to
#   decorrelate; a penalty that helps only as much as ``act_l2`` does, helps by shrinking.

__all__ += ["act_l2", "PER_HIDDEN_LAYER"]


def act_l2(acts: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the squared L2 norm of the activation vector: ``||A||_F^2 / B``.

    ``acts`` is a (B, n) matrix. The value is additive over neurons, so one pooled cloud
    and one cloud per layer give the same sum. Computed in float32 under autocast.

    Examples
    --------
    >>> import torch
    >>> act_l2(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))   # (1 + 4 + 9 + 0) / 2
    tensor(7.)
    """
    if not isinstance(acts, torch.Tensor):
        raise TypeError(f"acts must be a torch.Tensor of shape (batch, neurons), got {type(acts).__name__}")
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"acts must have shape (batch, neurons) with batch >= 1, got {tuple(acts.shape)}")
    with torch.autocast(device_type=acts.device.type, enabled=False):
        x = acts.double() if acts.dtype == torch.float64 else acts.float()
        return (x * x).sum() / x.shape[0]


#: Penalties the pipeline (:func:`topodecorr.decorrelation_result`) applies to each hidden
#: layer on its own: one point cloud per layer whatever ``pooled`` says, and output layers
#: (the logits) contribute nothing.
PER_HIDDEN_LAYER = frozenset({"decov_layer"})

REGISTRY = MappingProxyType(
    {
        **REGISTRY,
        "decov_layer": Penalty("decov_layer", "activations", decov),
        "act_l2": Penalty("act_l2", "activations", act_l2),
    }
)
