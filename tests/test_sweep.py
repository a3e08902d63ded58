"""Sweeps: grid into the database, skipping finished runs, parallel workers, kill and resume."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from topodecorr.experiments.config import parse_sweep
from topodecorr.experiments.store import ResultStore
from topodecorr.experiments.sweep import DB_NAME, LocalExecutor, checkpoint_name, execute_run, run_specs, run_sweep
from topodecorr.experiments.train import RunSpec

TINY = {
    "name": "tiny",
    "dataset": "digits",
    "networks": ["mlp"],
    "penalties": ["none", "l2", "t1"],
    "weights": [1e-3],
    "seeds": [0, 1],
    "train": {"max_epochs": 2, "patience": 5, "probe_batch": 64},
}


def _final(path: Path) -> dict:
    """Comparable content of a results database: per run key, status and metrics; epoch-row counts."""
    with ResultStore(path, create=False) as store:
        out = {}
        for r in store.runs():
            key = (r["network"], r["penalty"], r["weight"], r["seed"])
            n_epochs = store.conn.execute("SELECT COUNT(*) FROM epochs WHERE run_id=?", (r["id"],)).fetchone()[0]
            out[key] = (r["status"], r["epochs"], n_epochs, r["best_epoch"], r["val_loss"], r["val_acc"], r["test_acc"])
        return out


@pytest.mark.slow
def test_sweep_fills_the_database_and_skips_finished_runs(tmp_path):
    cfg = parse_sweep(TINY)
    counts = run_sweep(cfg, tmp_path, workers=1, progress=False, log=lambda m: None)
    assert counts["done"] == len(cfg.grid()) == 6
    first = _final(tmp_path / DB_NAME)
    assert all(v[0] == "done" and v[1] == v[2] == 2 for v in first.values())
    messages = []
    run_sweep(cfg, tmp_path, workers=1, progress=False, log=messages.append)
    assert "6 finished, 0 new" in messages[0]
    assert _final(tmp_path / DB_NAME) == first
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # removed once a run finished
    assert json.loads((tmp_path / "sweep.json").read_text())["penalties"] == ["none", "l2", "t1"]


@pytest.mark.slow
def test_execute_run_is_a_picklable_entry_point(tmp_path):
    spec = run_specs(parse_sweep(TINY))[1]
    assert pickle.loads(pickle.dumps(execute_run)) is execute_run
    payload = json.loads(json.dumps(spec.to_dict()))  # a plain, JSON-able dict
    res = execute_run(payload, tmp_path)
    assert res["status"] == "done" and (tmp_path / "mlp__l2__0.001__s0.pt").exists()


@pytest.mark.slow
def test_parallel_workers_agree_with_the_inline_run(tmp_path):
    cfg = parse_sweep(dict(TINY, seeds=[0]))
    run_sweep(cfg, tmp_path / "inline", workers=1, progress=False, log=lambda m: None)
    ex = LocalExecutor(2)
    assert ex.threads == max(1, (len(os.sched_getaffinity(0))) // 2)
    run_sweep(cfg, tmp_path / "pool", executor=ex, progress=False, log=lambda m: None)
    a, b = _final(tmp_path / "inline" / DB_NAME), _final(tmp_path / "pool" / DB_NAME)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][:4] == b[key][:4]
        assert a[key][4] == pytest.approx(b[key][4], rel=1e-4)  # thread counts differ: rounding only


def _sweep_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "topodecorr", "sweep", str(config), "--out", str(out), "--workers", "1",
            "--quiet", "--no-report"]


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(
        'dataset = "digits"\nnetworks = ["mlp"]\npenalties = ["none", "l2", "t2"]\nweights = [1e-3]\nseeds = [0, 1]\n'
        "[train]\nmax_epochs = 6\npatience = 20\nprobe_batch = 64\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads in both sweeps
    ref = subprocess.run(_sweep_cmd(config, tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_sweep_cmd(config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = out / "checkpoints"
    deadline = time.time() + 120
    # kill it in the middle of a run: after one finished run, once a checkpoint of the next exists
    while time.time() < deadline:
        done, running = 0, []
        if (out / DB_NAME).exists():
            try:
                with sqlite3.connect(out / DB_NAME, timeout=5) as conn:
                    done = conn.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]
                    running = [r[0] for r in conn.execute("SELECT config FROM runs WHERE status='running'")]
            except sqlite3.OperationalError:
                pass
        names = [checkpoint_name(RunSpec.from_dict(json.loads(c))) for c in running]
        if done >= 1 and any((ckpt_dir / n).exists() for n in names):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with sqlite3.connect(out / DB_NAME) as conn:
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
    assert statuses.get("running", 0) == 1 and statuses.get("done", 0) < 6  # really stopped part-way
    again = subprocess.run(_sweep_cmd(config, out), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "reclaimed from a dead worker" in again.stderr
    assert _final(out / DB_NAME) == _final(tmp_path / "ref" / DB_NAME)
    with sqlite3.connect(out / DB_NAME) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 6
        resumed = conn.execute("SELECT COUNT(*) FROM runs WHERE resumed_from IS NOT NULL").fetchone()[0]
    assert resumed == 1
