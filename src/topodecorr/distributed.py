"""Global-batch statistics under torch.distributed (DDP).

In ``"global"`` mode every rank gathers the activations of all ranks with
``torch.distributed.nn.functional.all_gather`` (differentiable: its backward
sums the gradients of each shard from every rank back to its owner), so each
rank computes the same correlations, the same tree and the same penalty as a
single process on the concatenated batch.

Why the gradients come out right under DDP: every rank holds the same penalty
P(global batch). Rank r's local activations receive sum over ranks of
dP/dacts_r = world_size * dP/dacts_r through the gather's backward, and DDP
then *averages* parameter gradients over ranks, which cancels that factor:
the penalty's parameter gradient equals the single-process one. (The task
loss, a mean over each local batch, is averaged by DDP into the global mean.)
"""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "gather_activations"]


def is_distributed() -> bool:
    """True when torch.distributed is available, initialised and has more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_activations(acts: torch.Tensor) -> torch.Tensor:
    """Concatenate the (B_r, n) activations of every rank along the batch, with gradient.

    All ranks must pass the same number of neurons and the same batch size
    (use ``drop_last=True`` in the DistributedSampler / DataLoader).
    """
    if not is_distributed():
        return acts
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(acts.contiguous())
    # the gather's backward on gloo (an all_to_all) ships raw storage: a strided gradient
    # (the correlation's backward gives a column-major one) would arrive scrambled
    return torch.cat([_ContiguousGrad.apply(p) for p in parts], dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous copy of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
