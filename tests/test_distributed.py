"""Decorrelation under DistributedDataParallel: two CPU processes on gloo.

* ``distributed="global"``: every rank's penalty equals one process's penalty
  on the concatenated batch, and the parameter gradients after DDP's
  averaging equal the single-process gradients (penalty alone, and task loss
  + penalty). This also checks the gradient factor argued in
  ``topodecorr.distributed``: the gather's backward sums world_size copies of
  the penalty's gradient, DDP divides by world_size.
* ``distributed="local"``: each rank's penalty is the penalty of its own shard,
  and the averaged gradient is the mean of the per-shard gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port, wait_all
import torch
import torch.nn.functional as F
from torch import nn

import topodecorr as td

TIMEOUT_S = 120  # a hung collective fails the test instead of hanging the suite
WORLD = 2
B = 24  # per rank

WORKER = r"""
import sys, torch
import torch.distributed as dist
import torch.nn.functional as F
torch.set_num_threads(1)
import topodecorr as td
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[2])
from test_distributed import make_model, make_data, B
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=int(sys.argv[3]), world_size=2)
rank = dist.get_rank()
x, y = make_data()
xs, ys = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
out = {}
for mode in ("global", "local"):
    for task in (False, True):
        for penalty in ("t1", "t2", "mean_abs_corr"):
            model = DDP(make_model())
            with td.Decorrelation(model, penalty=penalty, weight=0.7, distributed=mode) as reg:
                logits = model(xs)
                p = reg.penalty()
                loss = p + (F.cross_entropy(logits, ys) if task else 0.0 * logits.sum())
                loss.backward()
            out[(mode, task, penalty)] = (p.detach(), [q.grad.clone() for q in model.parameters()])
torch.save(out, sys.argv[4] + "." + str(rank))
dist.destroy_process_group()
"""


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, 6, generator=g), torch.randint(0, 3, (WORLD * B,), generator=g)


def _single(x, y, penalty, task):
    model = make_model()
    with td.Decorrelation(model, penalty=penalty, weight=0.7) as reg:
        logits = model(x)
        p = reg.penalty()
        loss = p + (F.cross_entropy(logits, y) if task else 0.0 * logits.sum())
        loss.backward()
    return p.detach(), [q.grad.clone() for q in model.parameters()]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    port = str(free_port())
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, port, here, str(r), str(tmp / "res")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    wait_all(procs, TIMEOUT_S)
    return [torch.load(tmp / f"res.{r}") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("task", [False, True], ids=["penalty", "task+penalty"])
@pytest.mark.parametrize("penalty", ["t1", "t2", "mean_abs_corr"])
def test_global_mode_equals_one_process_on_the_global_batch(ddp_results, penalty, task):
    x, y = make_data()
    ref_p, ref_g = _single(x, y, penalty, task)
    assert any(float(g.abs().max()) > 0 for g in ref_g)
    for r in range(WORLD):
        p, g = ddp_results[r][("global", task, penalty)]
        torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(g, ref_g):
            # a missing or doubled world-size factor would be off by 2x
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("task", [False, True], ids=["penalty", "task+penalty"])
@pytest.mark.parametrize("penalty", ["t1", "t2", "mean_abs_corr"])
def test_local_mode_is_per_rank(ddp_results, penalty, task):
    x, y = make_data()
    shards = [_single(x[r * B:(r + 1) * B], y[r * B:(r + 1) * B], penalty, task) for r in range(WORLD)]
    mean_g = [sum(s[1][k] for s in shards) / WORLD for k in range(len(shards[0][1]))]
    for r in range(WORLD):
        p, g = ddp_results[r][("local", task, penalty)]
        torch.testing.assert_close(p, shards[r][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(g, mean_g):  # DDP averages the per-rank gradients
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ddp_results[0][("local", task, penalty)][0], ddp_results[1][("local", task, penalty)][0])
    # and neither is the global-batch penalty
    glob = ddp_results[0][("global", task, penalty)][0]
    assert all(abs(float(s[0]) - float(glob)) > 1e-4 for s in shards)


def test_gather_is_identity_without_process_group():
    from topodecorr.distributed import gather_activations, is_distributed

    assert not is_distributed()
    a = torch.randn(4, 3)
    assert gather_activations(a) is a
