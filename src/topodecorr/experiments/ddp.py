"""One run on several processes (GPUs): DistributedDataParallel under ``torchrun``.

``torchrun --nproc-per-node K -m topodecorr train ...`` starts K copies of the
``train`` command; each finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in its environment, and :func:`setup` turns
them into a process group (NCCL on CUDA, gloo on CPU) and a
:class:`DistContext` that the training loop
(:func:`topodecorr.experiments.train.train_run`, argument ``dist``) talks to;
a one-process run talks to a :class:`LocalContext` with the same interface.

What a K-process run computes
-----------------------------
``batch_size`` stays the *global* batch B (the paper's 256): every rank draws
the same epoch permutation ``perm`` from the run's seeded generator, a
:class:`torch.utils.data.DistributedSampler` (``shuffle=False``,
``drop_last=True``) gives rank r the positions ``r, r + K, r + 2K, ...`` of
``perm``, and rank r's k-th batch is the k-th chunk of ``B / K`` of them. The
union of the K chunks is exactly ``perm[k B : (k + 1) B]``: the single-process
run's k-th batch (in another row order, to which correlations and the mean
cross-entropy are indifferent). Only when the training set size is not a
multiple of K are its last ``n mod K`` samples of the epoch left out.

Gradients. Rank r minimises ``L_r = mean_{i in b_r} CE_i + lambda * P`` where
every rank computes the same penalty ``P`` from the activations gathered over
the global batch (``distributed="global"``, the default). DDP averages the
gradients: ``g = (1/K) sum_r grad L_r``. The task term gives
``(1/K) sum_r grad mean_{b_r} CE = grad mean_{b} CE`` because the K local
batches have equal size. For the penalty, the differentiable all-gather sums
the K ranks' (identical) gradients with respect to the gathered rows back into
each rank's own rows, so rank r holds ``K * dP/dA_r * dA_r/dtheta`` and the
average over ranks is ``sum_r dP/dA_r * dA_r/dtheta = dP/dtheta``: the
single-process gradient. (A gather whose backward kept only the local rows'
gradient would leave the penalty's gradient K times too small.) With
``distributed="local"`` each rank penalises its own B/K rows, and the
average of the K local penalties is optimised instead.

Metrics are sums all-reduced over ranks (train loss, penalty, validation and
test loss and accuracy on sharded evaluation sets), so every rank takes the
same early-stopping decision. Checkpoints (and any file or database write)
come from rank 0 only (:attr:`DistContext.is_main`); every rank reads the
checkpoint back when a run resumes, so it must sit on storage all ranks see.
Dropout: rank 0 keeps the run's random stream (a one-process run and a
one-rank run are the same); ranks > 0 reseed theirs from (seed, rank, epoch) at
the start of every epoch, so a resumed run repeats the masks of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["DistContext", "LocalContext", "launched_by_torchrun", "setup", "teardown", "leave", "lingering_threads",
           "distributed", "PENALTY_MODES"]

#: How the decorrelation penalty treats the batch under DDP.
PENALTY_MODES = ("global", "local")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class DistContext:
    """This process's place in a multi-process run.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global rank, number of processes, rank on this node.
    device : torch.device
        Where this rank trains (``cuda:LOCAL_RANK`` on GPUs, else the CPU).
    backend : str
        ``"nccl"`` or ``"gloo"``.
    penalty_mode : str
        ``"global"`` (penalty on the gathered global batch, the default) or ``"local"``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    penalty_mode: str = "global"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, results and logs."""
        return self.rank == 0

    # -- model and data --------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` (already on :attr:`device`) wrapped in DistributedDataParallel.

        DDP broadcasts rank 0's parameters and buffers at construction, so all
        ranks start from the same weights; it all-reduces (averages) the
        gradients during ``backward``.
        """
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def check_batch_size(self, batch_size: int) -> int:
        """Per-rank batch size ``batch_size // world_size``; raises unless it divides exactly."""
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size {batch_size} is the global batch and must be a multiple of the number of "
                f"processes ({self.world_size}); choose e.g. {batch_size - batch_size % self.world_size or self.world_size}"
            )
        return batch_size // self.world_size

    def batches(self, perm: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """This rank's share of every global batch of the epoch permutation ``perm``.

        Parameters
        ----------
        perm : Tensor of shape (n,)
            The epoch's sample order, identical on every rank.
        batch_size : int
            The global batch size B (a multiple of ``world_size``).

        Yields
        ------
        idx : Tensor of shape (b,)
            Sample indices of this rank's part: ``b = B / world_size``, except in the
            last, shorter batch (the same ``b`` on every rank, so collectives match).
            A batch is left out, on every rank, when the penalty would see fewer than
            two samples (the global batch in ``"global"`` mode, ``b`` in ``"local"``).
        """
        from torch.utils.data import DistributedSampler

        local_bs = self.check_batch_size(batch_size)
        sampler = DistributedSampler(
            range(perm.numel()), num_replicas=self.world_size, rank=self.rank, shuffle=False, drop_last=True
        )
        positions = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
        mine = perm[positions.to(perm.device)]
        for start in range(0, mine.numel(), local_bs):
            idx = mine[start : start + local_bs]
            seen_by_penalty = idx.numel() * (self.world_size if self.penalty_mode == "global" else 1)
            if seen_by_penalty >= 2:  # correlations need two samples
                yield idx

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Reseed this rank's random stream (dropout) for ``epoch``; rank 0 keeps its own."""
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank * 7_919 + epoch) % (2**63))

    # -- collectives -----------------------------------------------------------------------

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether every tensor is finite on *every* rank (so all ranks stop together)."""
        import torch.distributed as dist

        ok = all(bool(torch.isfinite(t).all()) for t in tensors)
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return float(flag.item()) == 0.0

    def evaluate(
        self,
        fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[float, float]],
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[float, float]:
        """``fn``'s mean loss and accuracy over (X, y), each rank scoring the rows ``rank::world_size``.

        ``fn(model, X, y) -> (mean loss, accuracy)`` runs on this rank's shard;
        the sums are all-reduced, so every rank returns the same two numbers.
        """
        Xs, ys = X[self.rank :: self.world_size], y[self.rank :: self.world_size]
        n = int(ys.shape[0])
        loss, acc = fn(model, Xs, ys) if n else (0.0, 0.0)
        total_loss, correct, count = self.all_reduce_sum([loss * n, acc * n, n])
        count = max(count, 1.0)
        return total_loss / count, correct / count

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class LocalContext:
    """One process on its own, with :class:`DistContext`'s interface.

    The training loop talks to one context either way: here the model is not
    wrapped, collectives return their input, evaluation runs on the whole set,
    and the batches are the consecutive chunks of the epoch permutation.

    Attributes
    ----------
    device : torch.device
        Where the run trains.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    penalty_mode: str = "global"

    @property
    def is_main(self) -> bool:
        """Always true: the one process writes checkpoints and results."""
        return True

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself."""
        return model

    def batches(self, perm: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of ``batch_size`` of ``perm``; a trailing single sample is left out
        (it has no correlation).

        Examples
        --------
        >>> ctx = LocalContext(torch.device("cpu"))
        >>> [b.tolist() for b in ctx.batches(torch.arange(7), 3)]
        [[0, 1, 2], [3, 4, 5]]
        """
        for start in range(0, perm.numel(), batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() >= 2:
                yield idx

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Nothing to do: the process keeps the run's own random stream."""

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """``values`` as floats."""
        return [float(v) for v in values]

    def all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether every tensor is finite."""
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def evaluate(
        self,
        fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[float, float]],
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[float, float]:
        """``fn(model, X, y)``: mean loss and accuracy over the whole set."""
        return fn(model, X, y)


def setup(
    device: str = "auto",
    backend: str | None = None,
    penalty_mode: str = "global",
    timeout_s: float = 1800.0,
) -> DistContext:
    """Join the process group described by the ``torchrun`` environment variables.

    Parameters
    ----------
    device : str
        ``"auto"`` (this node's GPU ``LOCAL_RANK`` when CUDA is available, else the CPU),
        ``"cuda"`` (GPU ``LOCAL_RANK``; an error without CUDA), ``"cuda:N"`` (taken
        literally) or ``"cpu"``.
    backend : str, optional
        ``"nccl"`` or ``"gloo"`` (default: NCCL for CUDA devices, else gloo).
    penalty_mode : str
        ``"global"`` or ``"local"`` (see the module docstring).
    timeout_s : float
        Collective timeout: a rank that waits this long for the others fails.

    Returns
    -------
    DistContext

    Raises
    ------
    RuntimeError
        When a ``torchrun`` variable is missing or ``torch.distributed`` is not available.
    ValueError
        For an unknown ``penalty_mode`` or a CUDA device without CUDA.
    """
    import torch.distributed as dist

    if penalty_mode not in PENALTY_MODES:
        raise ValueError(f"penalty_mode must be one of {PENALTY_MODES}, got {penalty_mode!r}")
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi-process training needs the torchrun environment; {', '.join(missing)} not set. "
            "Start with `torchrun --nproc-per-node K -m topodecorr train ...`."
        )
    if not dist.is_available():  # pragma: no cover - every official torch build has it
        raise RuntimeError("this torch build has no torch.distributed")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        _import_collectives_before_init()
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend,
                       penalty_mode=penalty_mode)


def _import_collectives_before_init() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated when the
    module is first imported. Imported after ``init_process_group`` (by DDP's constructor,
    or by the differentiable all-gather of the penalty), that default is the live
    process group itself: ``destroy_process_group`` then cannot free it, and its gloo
    threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) run on into interpreter shutdown,
    where the group is torn down while the peers exit and close their sockets. That race
    made a rank abort at exit now and then ("terminate called without an active
    exception", SIGABRT). Imported first, the default is ``None`` (the default group,
    looked up at each call) and the group dies inside :func:`teardown`.
    """
    import torch.distributed.nn.functional  # noqa: F401


def lingering_threads() -> list[str]:
    """Names of this process's native gloo threads (Linux; ``[]`` elsewhere).

    After :func:`teardown` the list is empty unless something still holds the process group.
    """
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                name = fh.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(("pt_gloo", "gloo")):
            names.append(name)
    return sorted(names)


def teardown(synchronize: bool = False) -> None:
    """Leave the process group (a no-op when none is initialised).

    With ``synchronize`` (a normal exit) the ranks first meet at a barrier, so that no
    rank closes its gloo connections while a peer still uses them. After an error there
    is no barrier (a dead peer would hang it). Garbage (a DDP model or an autograd graph
    in a reference cycle) is collected before the group is destroyed, so that nothing
    holds the group afterwards and its threads end here, not at interpreter shutdown.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def leave(status: int) -> int:
    """Return ``status``, or end the process at once if gloo threads outlived :func:`teardown`.

    A rank whose process group is still alive after its teardown (something captured it)
    would destroy it during interpreter shutdown, racing its peers' exit; such a rank
    flushes its output and leaves with ``os._exit(status)``, so no destructor runs.
    """
    threads = lingering_threads()
    if not threads:
        return status
    import sys

    print(f"topodecorr: note: the process group's threads outlived its teardown ({', '.join(threads)}); "
          "leaving without interpreter shutdown", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


@contextlib.contextmanager
def distributed(device: str = "auto", backend: str | None = None, penalty_mode: str = "global"):
    """``with distributed() as ctx:`` -- :func:`setup` on entry, :func:`teardown` on exit."""
    ctx = setup(device=device, backend=backend, penalty_mode=penalty_mode)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        teardown(synchronize=ok)
