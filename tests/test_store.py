"""The SQLite results store: schema, atomic claims, stale reclaim, corrupt files untouched."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from topodecorr.experiments.config import parse_sweep
from topodecorr.experiments.store import ResultStore, StoreError


def _config(**over):
    data = {"dataset": "digits", "networks": ["mlp"], "penalties": ["none", "t1"], "weights": [0.1, 1.0],
            "seeds": [0, 1]}
    data.update(over)
    return parse_sweep(data)


def _init(path, cfg=None):
    cfg = cfg or _config()
    store = ResultStore(path)
    store.init_sweep(cfg, [(key, {"key": list(key)}) for key in cfg.grid()], {"torch": "x"})
    return store


def _result(status="done", acc=0.9):
    return {
        "status": status, "epochs": 2, "best_epoch": 1, "val_acc": acc, "test_acc": acc - 0.1, "val_loss": 0.3,
        "test_loss": float("nan"), "wall_s": 1.0, "epoch_s": 0.5, "versions": {"torch": "x"},
        "history": [{"epoch": 0, "val_acc": 0.5, "train_loss": 1.0}, {"epoch": 1, "val_acc": acc, "train_loss": 0.5}],
        "deaths": np.array([0.1, 0.2, 0.7], dtype=np.float32),
        "correlation": np.eye(3),
    }


def test_init_finish_and_read_back(tmp_path):
    store = _init(tmp_path / "r.sqlite")
    assert store.counts()["pending"] == 6
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = store.claim()
    assert row["status"] == "running" and row["owner_pid"] == os.getpid() and row["attempts"] == 1
    store.finish(row["id"], _result())
    done = store.runs("done")
    assert len(done) == 1 and done[0]["val_acc"] == 0.9 and done[0]["test_loss"] is None  # NaN stored as NULL
    assert [e["epoch"] for e in store.epochs(row["id"])] == [0, 1]
    np.testing.assert_array_equal(store.deaths(row["id"]), np.array([0.1, 0.2, 0.7], dtype=np.float32))
    np.testing.assert_array_equal(store.correlation(row["id"]), np.eye(3, dtype=np.float32))
    # re-initialising adds nothing and keeps finished runs
    cfg = _config()
    assert store.init_sweep(cfg, [(k, {}) for k in cfg.grid()], {}) == 0
    assert store.counts()["done"] == 1
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("INSERT INTO runs (network, penalty, weight, seed, config) VALUES ('mlp','t1',0.1,0,'{}')")
    store.close()


def test_grid_may_grow_but_protocol_may_not_change(tmp_path):
    store = _init(tmp_path / "r.sqlite")
    bigger = _config(seeds=[0, 1, 2])
    assert store.init_sweep(bigger, [(k, {}) for k in bigger.grid()], {}) == 3
    assert store.sweep_config()["seeds"] == [0, 1, 2]
    changed = _config(train={"max_epochs": 3})
    with pytest.raises(StoreError, match="different protocol.*train"):
        store.init_sweep(changed, [(k, {}) for k in changed.grid()], {})
    assert sum(store.counts().values()) == 9


_CLAIM_ALL = """
import json, sys
from topodecorr.experiments.store import ResultStore
store = ResultStore(sys.argv[1])
got = []
while (row := store.claim()) is not None:
    got.append(row["id"])
print(json.dumps(got))
"""


@pytest.mark.slow
def test_concurrent_claims_never_share_a_run(tmp_path):
    path = tmp_path / "r.sqlite"
    cfg = _config(weights=[float(w) for w in np.logspace(-3, 1, 20)], seeds=list(range(5)))
    _init(path, cfg).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _CLAIM_ALL, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    claims = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    flat = [i for c in claims for i in c]
    assert len(flat) == len(set(flat)) == len(cfg.grid())


@pytest.mark.slow
def test_stale_running_rows_are_reclaimed(tmp_path):
    store = _init(tmp_path / "r.sqlite")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a = store.claim(owner_pid=dead.pid)  # owner on this host, pid gone
    b = store.claim()  # owned by us, alive
    c = store.claim(owner_pid=1, owner_host="elsewhere")  # other host, fresh heartbeat
    assert store.reclaim_stale(stale_after=3600) == 1
    status = {r["id"]: r["status"] for r in store.runs()}
    assert status[a["id"]] == "pending" and status[b["id"]] == "running" and status[c["id"]] == "running"
    store.conn.execute("UPDATE runs SET heartbeat = heartbeat - 7200 WHERE id=?", (c["id"],))
    assert store.reclaim_stale(stale_after=3600) == 1
    store.release([b["id"]])
    assert store.counts()["running"] == 0


@pytest.mark.parametrize("content", [b"this is not a database at all" * 10, None])
def test_corrupt_or_foreign_database_is_refused_and_untouched(tmp_path, content):
    path = tmp_path / "r.sqlite"
    if content is None:  # a valid SQLite file that is not ours
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
    else:
        path.write_bytes(content)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match="not a readable topodecorr results database.*left untouched"):
        ResultStore(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not (tmp_path / "r.sqlite-wal").exists()


def test_truncated_database_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    store = _init(path)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\x00" * 200 + data[300:2048])
    before = path.read_bytes()
    with pytest.raises(StoreError):
        ResultStore(path).runs()
    assert path.read_bytes() == before


def test_missing_database_without_create(tmp_path):
    with pytest.raises(StoreError, match="no results database"):
        ResultStore(tmp_path / "nope.sqlite", create=False)
