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


# -- empty files, permissions, durability ------------------------------------------------------------


def test_empty_database_file_is_refused_not_started_over(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"")
    for create in (True, False):
        with pytest.raises(StoreError) as err:
            ResultStore(path, create=create)
        assert str(err.value) == (
            f"{path} is empty (0 bytes): it holds no results, not even a sweep's tables (an interrupted copy, or "
            "a full disk?). It was left untouched; restore it from a copy, or delete it to start the sweep afresh.")
    assert path.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]


def test_empty_main_file_whose_content_is_in_the_wal_opens(tmp_path):
    # what a kill can leave: every page still in the write-ahead log, the main file not yet written
    src, dst = tmp_path / "a", tmp_path / "b"
    src.mkdir()
    dst.mkdir()
    script = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA wal_autocheckpoint=0')\n"
        "c.execute('CREATE TABLE t (x)'); c.execute('INSERT INTO t VALUES (1)')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(src / "x.sqlite")], check=True, timeout=60)
    assert (src / "x.sqlite-wal").stat().st_size > 0
    (dst / "r.sqlite").write_bytes(b"")
    (dst / "r.sqlite-wal").write_bytes((src / "x.sqlite-wal").read_bytes())
    with pytest.raises(StoreError, match="no topodecorr tables"):  # opened and read, not called empty
        ResultStore(dst / "r.sqlite")


def _read_only(monkeypatch, *paths):
    """Make os.access in the store deny writing to ``paths`` (root ignores permission bits)."""
    import topodecorr.experiments.store as store_module

    real = os.access
    denied = {str(p) for p in paths}
    monkeypatch.setattr(store_module.os, "access",
                        lambda p, mode, **kw: False if str(p) in denied and mode & os.W_OK else real(p, mode, **kw))


def test_read_only_folder_and_file_are_named_not_called_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    _init(path).close()
    before = path.read_bytes()
    with monkeypatch.context() as m:
        _read_only(m, tmp_path)
        with pytest.raises(StoreError) as err:
            ResultStore(path)
    assert str(err.value) == (
        f"the folder {tmp_path} is read-only for this user: the results database needs to write there (SQLite "
        "keeps results.sqlite-wal and results.sqlite-shm next to results.sqlite). "
        f"Make it writable (chmod u+w {tmp_path}), or copy the folder somewhere writable.")
    with monkeypatch.context() as m:
        _read_only(m, path)
        with pytest.raises(StoreError) as err:
            ResultStore(path, create=False)
    assert str(err.value) == (
        f"{path} is read-only for this user: a sweep, a resume and a report all write to it. "
        f"Make it writable (chmod u+w {path}), or copy the folder somewhere writable.")
    assert "not a readable" not in str(err.value) and path.read_bytes() == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user whom permission bits bind")
def test_real_read_only_folder_and_file(tmp_path):
    path = tmp_path / "results.sqlite"
    _init(path).close()
    os.chmod(path, 0o444)
    try:
        with pytest.raises(StoreError, match="is read-only for this user: a sweep, a resume and a report"):
            ResultStore(path)
    finally:
        os.chmod(path, 0o644)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(StoreError, match=f"the folder {tmp_path} is read-only for this user"):
            ResultStore(path, create=False)
    finally:
        os.chmod(tmp_path, 0o755)


_KILLED_WRITER = """
import os, sys
import numpy as np
from topodecorr.experiments.config import parse_sweep
from topodecorr.experiments.store import ResultStore
cfg = parse_sweep({"dataset": "digits", "networks": ["mlp"], "penalties": ["none", "t1"], "weights": [0.1],
                   "seeds": [0, 1]})
store = ResultStore(sys.argv[1])
store.init_sweep(cfg, [(key, {"key": list(key)}) for key in cfg.grid()], {"torch": "x"})
row = store.claim()
store.finish(row["id"], {"status": "done", "epochs": 1, "test_acc": 0.5, "versions": {},
                         "history": [{"epoch": 0, "val_acc": 0.5}], "deaths": np.array([0.25], np.float32)})
store.claim()  # a run in flight when the sweep is killed
os._exit(9)   # killed: no close, no cleanup
"""


@pytest.mark.slow  # a process
def test_a_killed_sweeps_database_file_alone_holds_its_finished_runs(tmp_path):
    path = tmp_path / "results.sqlite"
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], timeout=120)
    # copied without its -wal file (what a user copies, or a backup takes, after a crash)
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(path.read_bytes())
    conn = sqlite3.connect(copy)
    rows = conn.execute("SELECT status, test_acc FROM runs ORDER BY id").fetchall()
    # the whole grid, and the finished run (the claim after it may or may not have reached the main file)
    assert len(rows) == 4 and rows[0] == ("done", 0.5) and {r[0] for r in rows[1:]} <= {"pending", "running"}
    assert conn.execute("SELECT deaths FROM deaths").fetchone()[0] == np.array([0.25], np.float32).tobytes()
    conn.close()


def test_close_and_open_fold_the_wal_into_the_main_file(tmp_path):
    path = tmp_path / "results.sqlite"
    store = _init(path)
    for _ in range(3):
        store.finish(store.claim()["id"], _result())
    store.close()
    wal = tmp_path / "results.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(path.read_bytes())
    assert sqlite3.connect(copy).execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0] == 3
