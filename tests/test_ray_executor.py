"""Sweeps on Ray: a local 2-CPU Ray instance gives the local executor's results; a killed worker's run is
retried, resumes from its checkpoint and is stored exactly once; clear errors without Ray or with bad requests."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402

from topodecorr.experiments.config import parse_sweep  # noqa: E402
from topodecorr.experiments.store import ResultStore  # noqa: E402
from topodecorr.experiments.sweep import DB_NAME, InlineExecutor, checkpoint_name, execute_run, run_sweep  # noqa: E402
from topodecorr.experiments.train import RunSpec  # noqa: E402

TINY = {
    "name": "tiny-ray",
    "dataset": "digits",
    "networks": [{"label": "mlp", "model": "mlp", "params": {"hidden": [32, 16]}}],
    "penalties": ["none", "t1"],
    "weights": [1e-2],
    "seeds": [0],
    "train": {"max_epochs": 3, "patience": 5, "probe_batch": 64},
}
KILL_AFTER_EPOCH = 1  # the doomed attempt dies after this epoch's checkpoint is on disk


@pytest.fixture(scope="module")
def local_ray():
    """One private 2-CPU Ray instance for the module (started once: it costs seconds)."""
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def killed_once(spec: dict, checkpoint_dir: str) -> dict:
    """Task body: on the first attempt of the ``t1`` run SIGKILL the worker mid-run, after an epoch's
    checkpoint; every other attempt (Ray's retry included) is a plain :func:`execute_run`."""
    marker = Path(checkpoint_dir).parent / f"killed-{checkpoint_name(RunSpec.from_dict(spec))}"
    if spec["penalty"] != "t1" or marker.exists():
        return execute_run(spec, checkpoint_dir)

    def die(record: dict) -> None:
        if record["epoch"] == KILL_AFTER_EPOCH:
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return execute_run(spec, checkpoint_dir, on_epoch=die)


def _rows(path: Path) -> dict:
    """Per run key: everything stored except timings, hosts and versions; plus the epoch curves."""
    timing = {"id", "owner_host", "owner_pid", "heartbeat", "started_at", "finished_at", "wall_s", "epoch_s",
              "versions", "resumed_from"}
    with ResultStore(path, create=False) as store:
        out = {}
        for r in store.runs():
            row = {k: r[k] for k in r.keys() if k not in timing}
            curves = store.conn.execute(
                "SELECT epoch, lr, train_loss, penalty, val_loss, val_acc, min_death, mean_death FROM epochs "
                "WHERE run_id=? ORDER BY epoch", (r["id"],)).fetchall()
            deaths = store.conn.execute("SELECT deaths FROM deaths WHERE run_id=?", (r["id"],)).fetchone()
            row["curves"] = [tuple(c) for c in curves]
            row["deaths"] = bytes(deaths[0]) if deaths else None
            out[(r["network"], r["penalty"], r["weight"], r["seed"])] = (row, r["resumed_from"])
        return out


@pytest.mark.slow
def test_ray_sweep_matches_local_and_survives_a_killed_worker(tmp_path, local_ray):
    from topodecorr.experiments.ray_executor import RayExecutor

    cfg = parse_sweep(TINY)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    ex = RayExecutor(num_cpus=1, max_retries=2, task=killed_once)
    assert ex.capacity == 2 and not ex._owns_ray  # 2 CPUs / 1 per run; reuses the running instance
    counts = run_sweep(cfg, tmp_path / "ray", executor=ex, progress=False, log=lambda m: None)
    assert counts["done"] == 2 and sum(counts.values()) == 2

    # the reference: the local executor in this process, with the Ray tasks' single torch thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(cfg, tmp_path / "local", executor=InlineExecutor(), progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)

    killed = list((tmp_path / "ray").glob("killed-*"))
    assert len(killed) == 1 and "t1" in killed[0].name  # the t1 run's first worker really died

    ray_rows, local_rows = _rows(tmp_path / "ray" / DB_NAME), _rows(tmp_path / "local" / DB_NAME)
    assert ray_rows.keys() == local_rows.keys()
    for key in ray_rows:
        (ray_row, ray_resumed), (local_row, local_resumed) = ray_rows[key], local_rows[key]
        assert ray_row["status"] == "done" and ray_row["attempts"] == 1  # claimed once, finished once
        assert len(ray_row["curves"]) == ray_row["epochs"] == TINY["train"]["max_epochs"]  # no duplicate epoch
        assert ray_row == local_row, key  # bit-identical metrics, curves and deaths
        assert local_resumed is None
        # the killed run resumed from the checkpoint of the epoch it died after
        assert ray_resumed == (KILL_AFTER_EPOCH + 1 if key[1] == "t1" else None)
    assert not list((tmp_path / "ray" / "checkpoints").glob("*.pt"))  # the driver removed finished checkpoints


@pytest.mark.slow
def test_requests_beyond_the_cluster_and_bad_values_are_refused(local_ray):
    from topodecorr.experiments.ray_executor import RayExecutor

    with pytest.raises(ValueError, match="GPU"):
        RayExecutor(num_cpus=1, num_gpus=1)
    with pytest.raises(ValueError, match="cluster has 2 CPU"):
        RayExecutor(num_cpus=3)
    with pytest.raises(ValueError, match="num_cpus"):
        RayExecutor(num_cpus=-1)
    with pytest.raises(ValueError, match="max_retries"):
        RayExecutor(max_retries=-2)
    assert ray.is_initialized()  # a refused request leaves a running instance it did not start alone
    assert RayExecutor(num_cpus=0.5).capacity == 4 and RayExecutor(max_in_flight=7).capacity == 7


def test_missing_ray_is_a_clear_error(monkeypatch):
    import builtins

    from topodecorr.experiments import ray_executor

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"topodecorr\[ray\]"):
        ray_executor.RayExecutor()


@pytest.mark.slow
def test_cli_sweep_with_the_ray_executor(tmp_path, local_ray, capsys):
    from topodecorr.experiments.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text('name = "cli-ray"\ndataset = "digits"\nnetworks = [{ label = "mlp", model = "mlp", '
                      'params = { hidden = [16] } }]\npenalties = ["none"]\nseeds = [0, 1]\n'
                      '[train]\nmax_epochs = 1\nprobe_batch = 32\n')
    shared = tmp_path / "shared-checkpoints"
    argv = ["sweep", str(config), "--out", str(tmp_path / "out"), "--executor", "ray", "--cpus-per-run", "1",
            "--checkpoint-dir", str(shared), "--keep-checkpoints", "--no-report", "--quiet"]
    assert main(argv) == 0
    assert "2 done" in capsys.readouterr().out
    with ResultStore(tmp_path / "out" / DB_NAME, create=False) as store:
        assert [r["status"] for r in store.runs()] == ["done", "done"]
    assert len(list(shared.glob("*.pt"))) == 2  # the runs checkpointed where they were told to
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert ray.is_initialized()  # the CLI joined the running instance and left it running

    # a request the cluster cannot satisfy is a one-line error, exit status 2, nothing run
    assert main(["sweep", str(config), "--out", str(tmp_path / "out2"), "--executor", "ray", "--cpus-per-run", "4"]) == 2
    assert "cluster has 2 CPU" in capsys.readouterr().err
