"""The results database of a sweep: one SQLite file (WAL mode) per sweep.

Tables
------
``meta``          key/value: schema version, the sweep configuration (JSON), creation time.
``runs``          one row per (network, penalty, weight, seed) -- the unique key -- with its
                  status (pending, running, done, diverged, failed), configuration (JSON),
                  owner (host, pid) and heartbeat while running, final metrics, timings,
                  software versions and the error message of a failed run. ``metrics`` (JSON)
                  holds ``layer_widths``, the probed neurons per layer in the order of the
                  stored deaths and correlation matrix (absent in databases from before it).
``epochs``        per-epoch curves of every run (train loss, penalty, validation loss and
                  accuracy, learning rate, death statistics, epoch time).
``deaths``        the MST deaths of each finished network at the end of training (float32).
``correlations``  an optional small correlation matrix (float16) of some networks.

Concurrency rule
----------------
Every statement that changes the database runs in its own short ``BEGIN IMMEDIATE``
transaction, so any number of processes may share the file (SQLite serialises the
writers; readers never block in WAL mode). A run is claimed atomically with
``UPDATE runs SET status='running' ... WHERE id=? AND status='pending'`` inside such a
transaction: two workers never get the same run. The sweep driver is the only writer
in the local executor; workers only compute and return results. A ``running`` row whose
owner died (same host and its pid gone, or no heartbeat for ``stale_after`` seconds) is
put back to ``pending`` by :meth:`ResultStore.reclaim_stale`.

A file that is not a readable topodecorr results database (corrupt, foreign, empty)
raises :class:`StoreError` and is never modified; so does a database in a read-only file
or folder (the message says which).

Durability
----------
SQLite's write-ahead log (``results.sqlite-wal``) holds recent commits until they are
checkpointed into ``results.sqlite``. The store checkpoints when it opens a database (a
killed sweep's log), after the grid is written, after every finished run and when it
closes: ``results.sqlite`` alone holds every finished run, except while another process
keeps the log busy. To copy a database while a sweep writes to it, copy the three files
``results.sqlite``, ``-wal`` and ``-shm`` together (or ``sqlite3 results.sqlite ".backup copy.sqlite"``).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["StoreError", "ResultStore", "STATUSES", "FINISHED", "SCHEMA_VERSION", "DB_NAME"]

#: File name of the results database inside a sweep folder.
DB_NAME = "results.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "diverged", "failed")
#: Statuses that a re-run of the sweep skips.
FINISHED = ("done", "diverged")
_MAGIC = b"SQLite format 3\x00"
_KIND = "topodecorr-results"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY,
    network     TEXT    NOT NULL,
    penalty     TEXT    NOT NULL,
    weight      REAL    NOT NULL,
    seed        INTEGER NOT NULL,
    status      TEXT    NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    config      TEXT    NOT NULL,
    owner_host  TEXT,
    owner_pid   INTEGER,
    heartbeat   REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  REAL,
    finished_at REAL,
    epochs      INTEGER,
    best_epoch  INTEGER,
    train_loss  REAL,
    val_loss    REAL,
    val_acc     REAL,
    test_loss   REAL,
    test_acc    REAL,
    wall_s      REAL,
    epoch_s     REAL,
    resumed_from INTEGER,
    metrics     TEXT,
    versions    TEXT,
    error       TEXT,
    UNIQUE (network, penalty, weight, seed)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id     INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch      INTEGER NOT NULL,
    lr         REAL,
    train_loss REAL,
    penalty    REAL,
    val_loss   REAL,
    val_acc    REAL,
    neurons    INTEGER,
    dead       INTEGER,
    min_death  REAL,
    mean_death REAL,
    max_death  REAL,
    epoch_s    REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS deaths (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    n      INTEGER NOT NULL,
    deaths BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS correlations (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    n      INTEGER NOT NULL,
    matrix BLOB    NOT NULL
);
"""

_EPOCH_COLUMNS = (
    "epoch", "lr", "train_loss", "penalty", "val_loss", "val_acc",
    "neurons", "dead", "min_death", "mean_death", "max_death", "epoch_s",
)
_RESULT_COLUMNS = (
    "epochs", "best_epoch", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc",
    "wall_s", "epoch_s", "resumed_from",
)


class StoreError(RuntimeError):
    """The results database cannot be used (corrupt, foreign, or from a different sweep)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


class ResultStore:
    """One sweep's SQLite database.

    Parameters
    ----------
    path : str or Path
        The database file; created (with its folder) when missing and ``create`` is true.
    create : bool
        Whether a missing file may be created.

    Raises
    ------
    StoreError
        The file exists but is not a readable topodecorr results database (it is left
        untouched), or it is missing and ``create`` is false.
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        exists = self._existing()
        if not exists and not create:
            raise StoreError(f"no results database at {self.path}; run a sweep into that folder first")
        if exists and self.path.stat().st_size > 0:
            self._check_header()  # (a database whose content is still all in its -wal has no header yet)
        elif not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder {self.path.parent}: {exc.strerror or exc}; "
                                 "choose an output folder you can write to") from None
        self._check_writable(exists)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            if exists:
                self._check_contents()
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            if not exists:
                self._create_schema()
            self.checkpoint("PASSIVE")  # a killed sweep's WAL goes into the main file now (never waits)
        except sqlite3.DatabaseError as exc:
            self._check_writable(exists)  # a permission problem seen only by SQLite (e.g. a read-only mount)
            if "readonly" in str(exc) or "unable to open" in str(exc):
                raise StoreError(f"cannot write to {self.path} ({exc}); check that the file and its folder "
                                 "are writable, or choose another output folder") from None
            raise StoreError(self._corrupt_message(str(exc))) from None

    # -- opening and checking ------------------------------------------------------------

    def _corrupt_message(self, why: str) -> str:
        return (
            f"{self.path} is not a readable topodecorr results database ({why}). "
            "It was left untouched; move it away or choose another output folder."
        )

    def _existing(self) -> bool:
        """Whether the database exists; an empty file (with no WAL holding its content) is refused."""
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a results database; move it away or choose "
                             "another output folder")
        if not self.path.exists():
            return False
        wal = self.path.with_name(self.path.name + "-wal")
        if self.path.stat().st_size == 0 and not (wal.exists() and wal.stat().st_size > 0):
            raise StoreError(
                f"{self.path} is empty (0 bytes): it holds no results, not even a sweep's tables (an interrupted "
                "copy, or a full disk?). It was left untouched; restore it from a copy, or delete it to start the "
                "sweep afresh."
            )
        return True

    def _check_writable(self, exists: bool) -> None:
        """Raise :class:`StoreError` naming what is read-only: the folder or the database file.

        Every use writes: a sweep its results, a report or resume at least the WAL checkpoint,
        and SQLite keeps ``results.sqlite-wal`` and ``-shm`` next to the database.
        """
        folder = self.path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(
                f"the folder {folder} is read-only for this user: the results database needs to write there "
                f"(SQLite keeps {self.path.name}-wal and {self.path.name}-shm next to {self.path.name}). "
                f"Make it writable (chmod u+w {folder}), or copy the folder somewhere writable."
            )
        if exists and not os.access(self.path, os.W_OK):
            raise StoreError(
                f"{self.path} is read-only for this user: a sweep, a resume and a report all write to it. "
                f"Make it writable (chmod u+w {self.path}), or copy the folder somewhere writable."
            )

    def checkpoint(self, mode: str = "TRUNCATE") -> None:
        """Copy the write-ahead log into the main file (``PRAGMA wal_checkpoint``).

        After it, ``results.sqlite`` alone holds every committed result. ``TRUNCATE`` also
        empties the ``-wal`` file; ``PASSIVE`` never waits for other connections. A busy
        database (another process reading or writing) is checkpointed as far as it allows.
        """
        try:
            self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.OperationalError:  # busy or read-only: the WAL stays valid as it is
            pass

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(len(_MAGIC))
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if head != _MAGIC:
            raise StoreError(self._corrupt_message("no SQLite header"))

    def _check_contents(self) -> None:
        row = self.conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise StoreError(self._corrupt_message(f"integrity check says {row[0] if row else 'nothing'}"))
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables or "runs" not in tables:
            raise StoreError(self._corrupt_message("it has no topodecorr tables"))
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("kind") != _KIND:
            raise StoreError(self._corrupt_message("its meta table is not a topodecorr one"))
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer topodecorr (schema {version} > {SCHEMA_VERSION}); upgrade topodecorr"
            )

    def _create_schema(self) -> None:
        # executescript commits on its own; the schema is idempotent (IF NOT EXISTS).
        self.conn.executescript(_SCHEMA)
        with self._write():
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('kind', ?)", (_KIND,))
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),))

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
            return False

    def _write(self) -> "ResultStore._Tx":
        return ResultStore._Tx(self.conn)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        self.checkpoint()
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sweep configuration ---------------------------------------------------------------

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def sweep_config(self) -> dict[str, Any] | None:
        """The stored sweep configuration (a dict), or None before :meth:`init_sweep`."""
        text = self.meta("sweep")
        return None if text is None else json.loads(text)

    def init_sweep(self, config, run_configs: Iterable[tuple[tuple[str, str, float, int], dict]], versions: dict) -> int:
        """Record the sweep and insert its missing runs as ``pending``.

        Parameters
        ----------
        config : SweepConfig
        run_configs : iterable of ((network, penalty, weight, seed), config dict)
        versions : dict
            Software versions, stored with the sweep.

        Returns
        -------
        int
            Number of runs added.

        Raises
        ------
        StoreError
            The database holds a sweep whose protocol (dataset, split, networks,
            training configuration) differs: mixing them would make the comparison
            meaningless. The grid (penalties, weights, seeds) may grow.
        """
        stored = self.sweep_config()
        new = config.to_dict()
        if stored is not None:
            old_protocol = {k: v for k, v in stored.items() if k not in _GRID_KEYS}
            new_protocol = {k: v for k, v in new.items() if k not in _GRID_KEYS}
            if old_protocol != new_protocol:
                diff = sorted(k for k in set(old_protocol) | set(new_protocol) if old_protocol.get(k) != new_protocol.get(k))
                raise StoreError(
                    f"{self.path} holds a sweep with a different protocol (differs in: {', '.join(diff)}); "
                    "its results were left untouched. Use another output folder, or restore the original configuration."
                )
            old_nets = {n["label"]: n for n in stored["networks"]}
            changed = [n["label"] for n in new["networks"] if n["label"] in old_nets and old_nets[n["label"]] != n]
            if changed:
                raise StoreError(
                    f"{self.path} holds network(s) {changed} with a different model or parameters; "
                    "its results were left untouched. Give changed networks a new label or use another output folder."
                )
            merged = dict(new)
            for key in ("penalties", "weights", "seeds"):
                merged[key] = list(stored[key]) + [v for v in new[key] if v not in stored[key]]
            stored_labels = [n["label"] for n in stored["networks"]]
            merged["networks"] = stored["networks"] + [n for n in new["networks"] if n["label"] not in stored_labels]
            new = merged
        added = 0
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES ('sweep', ?)", (json.dumps(new, sort_keys=True),))
            c.execute("INSERT OR REPLACE INTO meta VALUES ('versions', ?)", (json.dumps(versions, sort_keys=True),))
            for (network, penalty, weight, seed), cfg in run_configs:
                cur = c.execute(
                    "INSERT OR IGNORE INTO runs (network, penalty, weight, seed, config) VALUES (?, ?, ?, ?, ?)",
                    (network, penalty, float(weight), int(seed), json.dumps(cfg, sort_keys=True)),
                )
                added += cur.rowcount
        self.checkpoint("PASSIVE")  # the tables and the grid are in the main file from the start
        return added

    # -- the run life cycle -----------------------------------------------------------------

    def claim(self, owner_pid: int | None = None, owner_host: str | None = None) -> dict | None:
        """Atomically take the next ``pending`` run (lowest id) and mark it ``running``.

        Returns the run row as a dict, or None when no run is pending.
        """
        pid = os.getpid() if owner_pid is None else owner_pid
        host = socket.gethostname() if owner_host is None else owner_host
        now = time.time()
        with self._write() as c:
            row = c.execute("SELECT id FROM runs WHERE status='pending' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            cur = c.execute(
                "UPDATE runs SET status='running', owner_host=?, owner_pid=?, heartbeat=?, "
                "started_at=COALESCE(started_at, ?), attempts=attempts+1, error=NULL "
                "WHERE id=? AND status='pending'",
                (host, pid, now, now, row[0]),
            )
            if cur.rowcount != 1:  # cannot happen inside BEGIN IMMEDIATE, kept as a guard
                return None
            return dict(c.execute("SELECT * FROM runs WHERE id=?", (row[0],)).fetchone())

    def heartbeat(self, run_ids: Iterable[int]) -> None:
        ids = list(run_ids)
        if not ids:
            return
        with self._write() as c:
            c.executemany(
                "UPDATE runs SET heartbeat=? WHERE id=? AND status='running'", [(time.time(), i) for i in ids]
            )

    def release(self, run_ids: Iterable[int]) -> None:
        """Put runs this process owns back to ``pending`` (an interrupted sweep)."""
        with self._write() as c:
            c.executemany(
                "UPDATE runs SET status='pending', owner_host=NULL, owner_pid=NULL WHERE id=? AND status='running'",
                [(i,) for i in run_ids],
            )

    def reset_failed(self) -> int:
        """Put ``failed`` runs back to ``pending`` so a new invocation retries them."""
        with self._write() as c:
            return c.execute("UPDATE runs SET status='pending' WHERE status='failed'").rowcount

    def reclaim_stale(self, stale_after: float = 1800.0) -> int:
        """Put back to ``pending`` the ``running`` runs whose owner is gone.

        An owner is gone when it ran on this host and its pid no longer exists, or
        when its heartbeat is older than ``stale_after`` seconds (other hosts).
        """
        host = socket.gethostname()
        now = time.time()
        stale = []
        for row in self.conn.execute("SELECT id, owner_host, owner_pid, heartbeat FROM runs WHERE status='running'"):
            if row["owner_host"] == host and row["owner_pid"] is not None:
                dead = not _pid_alive(int(row["owner_pid"]))
            else:
                dead = row["heartbeat"] is None or now - row["heartbeat"] > stale_after
            if dead:
                stale.append(row["id"])
        if stale:
            with self._write() as c:
                c.executemany(
                    "UPDATE runs SET status='pending', owner_host=NULL, owner_pid=NULL WHERE id=? AND status='running'",
                    [(i,) for i in stale],
                )
        return len(stale)

    def finish(self, run_id: int, result: dict) -> None:
        """Store a run's result (from :func:`topodecorr.experiments.sweep.execute_run`).

        ``result["status"]`` is ``done``, ``diverged`` or ``failed``; its curves,
        deaths and correlation matrix are written in the same transaction.
        """
        status = result.get("status")
        if status not in ("done", "diverged", "failed"):
            raise ValueError(f"result status must be done, diverged or failed, got {status!r}")
        values = {k: _finite_or_none(result.get(k)) for k in _RESULT_COLUMNS}
        metrics = result.get("metrics")
        with self._write() as c:
            c.execute("DELETE FROM epochs WHERE run_id=?", (run_id,))
            c.execute("DELETE FROM deaths WHERE run_id=?", (run_id,))
            c.execute("DELETE FROM correlations WHERE run_id=?", (run_id,))
            c.execute(
                "UPDATE runs SET status=?, finished_at=?, owner_host=NULL, owner_pid=NULL, error=?, versions=?, metrics=?, "
                + ", ".join(f"{k}=?" for k in _RESULT_COLUMNS)
                + " WHERE id=?",
                (
                    status,
                    time.time(),
                    result.get("error"),
                    json.dumps(result.get("versions", {}), sort_keys=True),
                    None if metrics is None else json.dumps(metrics, sort_keys=True),
                    *[values[k] for k in _RESULT_COLUMNS],
                    run_id,
                ),
            )
            rows = [
                tuple(_finite_or_none(e.get(k)) for k in _EPOCH_COLUMNS) for e in result.get("history", [])
            ]
            c.executemany(
                f"INSERT INTO epochs (run_id, {', '.join(_EPOCH_COLUMNS)}) VALUES (?, {', '.join('?' * len(_EPOCH_COLUMNS))})",
                [(run_id, *r) for r in rows],
            )
            deaths = result.get("deaths")
            if deaths is not None:
                arr = np.ascontiguousarray(np.asarray(deaths, dtype=np.float32))
                c.execute("INSERT INTO deaths VALUES (?, ?, ?)", (run_id, int(arr.size), arr.tobytes()))
            corr = result.get("correlation")
            if corr is not None:
                arr = np.ascontiguousarray(np.asarray(corr, dtype=np.float16))
                c.execute("INSERT INTO correlations VALUES (?, ?, ?)", (run_id, int(arr.shape[0]), arr.tobytes()))
        self.checkpoint("PASSIVE")  # a copy of results.sqlite alone holds every finished run

    # -- reading ------------------------------------------------------------------------------

    def runs(self, status: str | Iterable[str] | None = None) -> list[dict]:
        """All runs (optionally of some statuses) as dicts, ordered by id."""
        if status is None:
            rows = self.conn.execute("SELECT * FROM runs ORDER BY id").fetchall()
        else:
            wanted = [status] if isinstance(status, str) else list(status)
            marks = ", ".join("?" * len(wanted))
            rows = self.conn.execute(f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY id", wanted).fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for status, n in self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            out[status] = n
        return out

    def epochs(self, run_id: int) -> list[dict]:
        rows = self.conn.execute(
            f"SELECT {', '.join(_EPOCH_COLUMNS)} FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)
        ).fetchall()
        return [dict(r) for r in rows]

    def deaths(self, run_id: int) -> np.ndarray | None:
        row = self.conn.execute("SELECT n, deaths FROM deaths WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return None
        return np.frombuffer(row["deaths"], dtype=np.float32, count=row["n"]).copy()

    def correlation(self, run_id: int) -> np.ndarray | None:
        row = self.conn.execute("SELECT n, matrix FROM correlations WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return None
        n = row["n"]
        return np.frombuffer(row["matrix"], dtype=np.float16, count=n * n).reshape(n, n).astype(np.float32)


_GRID_KEYS = ("name", "description", "penalties", "weights", "seeds", "networks", "data_dir")
