"""Global-batch penalty under DDP: two gloo processes equal one process on the concatenated batch.

Rank r holds batch shard x_r; with ``distributed="global"`` every rank gathers all
shards (with gradient) and computes the penalty P(x_0 ++ x_1). Each rank's
activations then receive world_size * dP/dx_r through the gather's backward,
and DDP *averages* parameter gradients over ranks, which divides that factor
back out: the DDP parameter gradient of the penalty equals the single-process
gradient of P on the concatenated batch (no 1/world_size factor).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import topodecorr as td
from topodecorr import distributed as tdd

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * 10, 5, generator=g)


def _worker(rank, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x = _data().chunk(WORLD)[rank]
        with td.Decorrelation(model, penalty="t1", weight=1.0, distributed=mode) as reg:
            ddp(x)
            p = reg.penalty()
            p.backward()
        torch.save(
            {"p": p.detach(), "grads": [q.grad.clone() for q in model.parameters()]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, mode):
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path), mode), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):  # False until every worker has ended
        if time.monotonic() > deadline:  # pragma: no cover - hang guard
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 90 s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single(x):
    model = _model()
    with td.Decorrelation(model, penalty="t1", weight=1.0) as reg:
        model(x)
        p = reg.penalty()
        p.backward()
    return p.detach(), [q.grad.clone() for q in model.parameters()]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_global_batch_penalty_and_gradients_equal_single_process(tmp_path):
    res = _run(tmp_path, "global")
    p_ref, g_ref = _single(_data())
    for r in res:
        torch.testing.assert_close(r["p"], p_ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(r["grads"], g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max())))
    # sanity: the per-rank ("local") penalties differ from the global one
    p_local = [_single(xr)[0] for xr in _data().chunk(WORLD)]
    assert all(abs(float(pl) - float(p_ref)) > 1e-4 for pl in p_local)


def test_gather_is_identity_without_process_group():
    x = torch.randn(4, 3)
    assert not tdd.is_distributed()
    assert tdd.gather_activations(x) is x
