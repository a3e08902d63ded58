"""One run on two processes (CPU, gloo): DistributedDataParallel training equals one process on the same
global batches; metrics are reduced; only rank 0 writes; ``torchrun -m topodecorr train`` works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port, wait_all
import torch

from topodecorr.experiments import ddp
from topodecorr.experiments.config import TrainConfig
from topodecorr.experiments.train import RunSpec, load_checkpoint, train_run

# a hung collective must fail the test, not the suite; each worker compiles the numba kernels
# on first use, which alone takes 30-50 s on a loaded 2-core machine
TIMEOUT_S = 300

# digits: 1150 training samples = 4 global batches of 256 + 126 (63 per rank), so the two-rank run sees
# exactly the one-process run's batches; 2 epochs = 10 optimiser steps with T1 on every batch.
SPEC = RunSpec(
    dataset="digits", network="mlp", model="mlp", model_params=(("hidden", (48, 24)),), penalty="t1",
    weight=0.05, seed=3, train=TrainConfig(max_epochs=2, patience=5, probe_batch=64),
)

# A minimal launcher (what torchrun does): the torchrun environment, then the training loop with dist=ctx.
WORKER = r"""
import json, sys, torch
torch.set_num_threads(1)
from topodecorr.experiments import ddp, train
spec = train.RunSpec.from_dict(json.loads(sys.argv[1]))
saves, real_save = [], train._save_checkpoint
def counting_save(path, state):
    saves.append(int(state["epoch"]))
    real_save(path, state)
train._save_checkpoint = counting_save
with ddp.distributed(device="cpu", penalty_mode=sys.argv[4]) as ctx:
    res = train.train_run(spec, sys.argv[2], dist=ctx)
    rank = ctx.rank
history = [{k: v for k, v in h.items() if k != "epoch_s"} for h in res["history"]]
out = {k: res[k] for k in ("status", "error", "epochs", "best_epoch", "val_loss", "val_acc", "test_loss", "test_acc")}
out.update(history=history, saves=saves, lingering=ddp.lingering_threads())
with open(f"{sys.argv[3]}.{rank}", "w") as fh:
    json.dump(out, fh)
"""


def _launch_two(tmp_path: Path, spec: RunSpec, mode: str = "global") -> list[dict]:
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-c", WORKER, json.dumps(spec.to_dict()), str(tmp_path / "ddp.pt"),
               str(tmp_path / "result"), mode]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_all(procs, TIMEOUT_S)
    return [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]


def _single(tmp_path: Path, spec: RunSpec, name: str) -> tuple[dict, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train_run(spec, tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    return res, load_checkpoint(tmp_path / name)["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batches(tmp_path):
    ranks = _launch_two(tmp_path, SPEC)
    single, single_w = _single(tmp_path, SPEC, "single.pt")
    ddp_w = load_checkpoint(tmp_path / "ddp.pt")["model"]  # the last epoch's weights, written by rank 0

    # weights after 10 steps agree to float32 rounding (gradient all-reduce, gathered correlations); a
    # mild weight keeps the run away from ReLUs dying, where rounding decides and the two runs would part
    assert _max_diff(ddp_w, single_w) < 2e-5
    # ... and the test can fail: a penalty gradient 1/world_size too small (the Barlow-Twins DDP bug) is
    # what a single process with half the weight computes, and that is far away
    _, half_w = _single(tmp_path, RunSpec.from_dict({**SPEC.to_dict(), "weight": SPEC.weight / 2}), "half.pt")
    assert _max_diff(half_w, single_w) > 50 * _max_diff(ddp_w, single_w)

    # metrics are reduced over the ranks: both ranks report the same numbers, the one-process ones
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["status"] == ranks[1]["status"] == single["status"] == "done"
    for got, want in zip(ranks[0]["history"], single["history"]):
        for key in ("train_loss", "penalty", "val_loss", "val_acc", "mean_death", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for key in ("val_loss", "test_loss", "test_acc", "val_acc"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    # checkpoints come from rank 0 only, once per epoch
    assert ranks[0]["saves"] == [0, 1] and ranks[1]["saves"] == []
    # the process group died inside the teardown: no gloo thread is left to race the peers' exit
    # (before the fix the group, captured by torch.distributed.nn.functional's default arguments,
    # kept 'gloo_tcp_loop' and two 'pt_gloo_runloop' threads alive into interpreter shutdown)
    assert ranks[0]["lingering"] == ranks[1]["lingering"] == []


@pytest.mark.slow
def test_local_penalty_mode_runs_and_differs_from_global(tmp_path):
    ranks = _launch_two(tmp_path, RunSpec.from_dict({**SPEC.to_dict(), "train": {**SPEC.train.to_dict(),
                                                                                  "max_epochs": 1}}), "local")
    assert ranks[0]["status"] == "done" and ranks[0]["history"] == ranks[1]["history"]
    ddp_w = load_checkpoint(tmp_path / "ddp.pt")["model"]
    one = RunSpec.from_dict({**SPEC.to_dict(), "train": {**SPEC.train.to_dict(), "max_epochs": 1}})
    _, single_w = _single(tmp_path, one, "single.pt")
    # per-rank correlations of 128 samples are not those of the 256-sample batch
    assert _max_diff(ddp_w, single_w) > 1e-4


@pytest.mark.slow
def test_torchrun_cli_trains_one_configuration(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:  # pragma: no cover - torch always installs it next to python
        pytest.skip("torchrun not found")
    args = ["train", "--dataset", "digits", "--network", "mlp", "--param", "hidden=[48, 24]", "--penalty", "t1",
            "--weight", "0.05", "--seed", "3", "--max-epochs", "2", "--patience", "5", "--probe-batch", "64",
            "--device", "cpu", "--quiet"]
    cmd = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "topodecorr", *args, "--output", str(tmp_path / "out.json"), "--checkpoint", str(tmp_path / "c.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "outlived its teardown" not in proc.stderr and "terminate called" not in proc.stderr
    assert proc.stdout.count('"status"') == 1  # rank 0 alone prints the result
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["status"] == "done" and out["world_size"] == 2
    single, _ = _single(tmp_path, SPEC, "single.pt")
    assert out["test_acc"] == pytest.approx(single["test_acc"], abs=1e-9)
    assert out["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_setup_without_torchrun_and_bad_batch_size_are_clear_errors(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not ddp.launched_by_torchrun()
    with pytest.raises(RuntimeError, match="torchrun"):
        ddp.setup(device="cpu")
    with pytest.raises(ValueError, match="penalty_mode"):
        ddp.setup(device="cpu", penalty_mode="everywhere")
    ctx = ddp.DistContext(rank=1, world_size=3, local_rank=1, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        list(ctx.batches(torch.arange(10), 256))
    # rank 1 of 3 takes positions 1, 4, 7, ... of the permutation, in chunks of 2 (= 6 / 3); the 10th
    # sample (10 mod 3 = 1 left over) is dropped on every rank
    perm = torch.arange(100, 110)
    assert [b.tolist() for b in ctx.batches(perm, 6)] == [[101, 104], [107]]
    # together the ranks' chunks are the one-process batches perm[0:6], perm[6:9]
    chunks = [list(ddp.DistContext(r, 3, r, torch.device("cpu"), "gloo").batches(perm, 6)) for r in range(3)]
    assert [sorted(sum((c[k].tolist() for c in chunks), [])) for k in range(2)] == [list(range(100, 106)),
                                                                                     list(range(106, 109))]


def test_leave_ends_a_rank_whose_gloo_threads_outlived_teardown(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(ddp.os, "_exit", exits.append)
    monkeypatch.setattr(ddp, "lingering_threads", lambda: [])
    assert ddp.leave(1) == 1 and exits == []  # the normal case: back to the interpreter's own exit
    monkeypatch.setattr(ddp, "lingering_threads", lambda: ["gloo_tcp_loop", "pt_gloo_runloop"])
    ddp.leave(3)
    assert exits == [3]
    assert ("topodecorr: note: the process group's threads outlived its teardown (gloo_tcp_loop, pt_gloo_runloop); "
            "leaving without interpreter shutdown") in capsys.readouterr().err


def test_lingering_threads_names_this_process_gloo_threads_only():
    # a process with no process group has none (the test process: pytest, torch's own pools)
    assert ddp.lingering_threads() == []
