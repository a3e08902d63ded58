"""Penalties on MST deaths (T1, T2) and the baselines the paper compares with.

With deaths ``d_1 .. d_{n-1}`` of the zero-dimensional persistence of the
neurons (see :mod:`topodecorr.persistence`):

* T1 = sum_k (1 - d_k)  (minimising it maximises the total MST weight);
* T2 = alpha * std(d) - (1 - alpha) * mean(d), population std, alpha = 0.5.

Baselines: the mean absolute off-diagonal correlation (the paper's naive
decorrelation), DeCov (Cogswell et al., ICLR 2016) and L1 / L2 on all
trainable parameters.

Reference: Ballester, Casacuberta, Escalera, "Decorrelating neurons using
persistence", PMLR 228 (2024).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["t1", "t2", "mean_abs_correlation", "decov", "l1", "l2"]


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
        xc = x - x.mean(dim=0, keepdim=True)
        cov = xc.T @ xc / x.shape[0]
        return 0.5 * ((cov**2).sum() - (torch.diagonal(cov) ** 2).sum())


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
