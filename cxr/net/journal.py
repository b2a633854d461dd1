"""The DICOM node's spool and journal: what makes an acknowledged instance survive a `kill -9`.

An instance is written to `SPOOL/instances/<SOP Instance UID>.dcm` (temporary name, fsync, rename,
fsync of the folder) and then recorded in `SPOOL/journal.db` (SQLite, WAL, synchronous=FULL) before
the C-STORE success status goes back. Only then does the sender consider it delivered.

Each row moves through
    received -> indexed (read, stored in the archive, SR + SC written to the outbox) -> sent
or ends as `done` (nothing to send: refused by the quality gate, unreadable, or no destination).
Each step is idempotent, so a restart simply redoes the step that was in flight:
* the archive refuses a second row of the same content and model (its unique key), so an
  instance whose archive write committed just before a crash is recognised, not stored again;
* the SR + SC are written to `SPOOL/outbox/<SOP UID>/` before the archive write, so such an
  instance still has its results to send without being read again;
* a destination given the same SR twice (a crash between sending and marking `sent`) keeps one:
  a PACS files objects by SOP Instance UID.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import replacing
from ..errors import CxrError

STATES = ("received", "indexed", "sent", "done")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid     TEXT PRIMARY KEY,
    sop_class   TEXT NOT NULL,
    path        TEXT NOT NULL,
    calling_ae  TEXT,
    received_at REAL NOT NULL,
    state       TEXT NOT NULL DEFAULT 'received',
    reads       INTEGER NOT NULL DEFAULT 0,   -- times the Reader started on it (crash redo: 2)
    archive_id  INTEGER,
    outbox      TEXT,                         -- folder of the SR + SC to send
    error       TEXT,
    sends       INTEGER NOT NULL DEFAULT 0,   -- failed send attempts so far
    done_at     REAL
);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
"""


@dataclass
class Pending:
    sop_uid: str
    path: str
    outbox: str | None = None


class Journal:
    """The spool folder and its journal. Thread-safe: the association threads record, the worker
    reads and marks, under one lock (SQLite allows one writer anyway)."""

    def __init__(self, spool: str | Path):
        self.spool = Path(spool).expanduser().absolute()
        self.instances = self.spool / "instances"
        self.outbox = self.spool / "outbox"
        try:
            self.instances.mkdir(parents=True, exist_ok=True)
            self.outbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CxrError(f"cannot make the spool folder ({exc.strerror})", self.spool) from None
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.spool / "journal.db", check_same_thread=False,
                                  isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged row survives power loss too
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- receiving (association threads) ---------------------------------------------------
    def spool_path(self, sop_uid: str) -> Path:
        return self.instances / f"{sop_uid}.dcm"

    def known(self, sop_uid: str) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM instances WHERE sop_uid=?",
                                   (sop_uid,)).fetchone() is not None

    def receive(self, sop_uid: str, sop_class: str, write, calling_ae: str) -> bool:
        """Spool one instance durably (`write(file)` writes its bytes) and record it. False when
        this SOP Instance UID was received before (kept as first received: sent once)."""
        if self.known(sop_uid):
            return False
        with replacing(self.spool_path(sop_uid), durable=True) as tmp, open(tmp, "wb") as f:
            write(f)
        with self._lock:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO instances(sop_uid, sop_class, path, calling_ae, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (sop_uid, sop_class, str(self.spool_path(sop_uid)), calling_ae, time.time()))
            return cur.rowcount == 1

    # -- the worker -------------------------------------------------------------------------
    def next_batch(self, n: int) -> list[Pending]:
        """Up to n received instances, oldest first; their read count goes up before reading."""
        with self._lock:
            rows = self.db.execute("SELECT sop_uid, path FROM instances WHERE state='received' "
                                   "ORDER BY rowid LIMIT ?", (n,)).fetchall()
            if rows:
                self.db.executemany("UPDATE instances SET reads=reads+1 WHERE sop_uid=?",
                                    [(r[0],) for r in rows])
        return [Pending(*r) for r in rows]

    def mark(self, updates: list[tuple[str, str, int | None, str | None, str | None]]) -> None:
        """(sop_uid, state, archive_id, outbox, error) for many rows, in one transaction."""
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(
                    "UPDATE instances SET state=?, archive_id=COALESCE(?, archive_id), outbox=COALESCE(?, outbox), "
                    "error=?, done_at=? WHERE sop_uid=?",
                    [(state, aid, outbox, err, now, uid) for uid, state, aid, outbox, err in updates])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def to_send(self, n: int, retry_after_s: float = 10.0) -> list[Pending]:
        """Indexed instances whose results wait to be sent (a failed send waits a while)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT sop_uid, path, outbox FROM instances WHERE state='indexed' AND "
                "(sends=0 OR done_at < ?) ORDER BY rowid LIMIT ?",
                (time.time() - retry_after_s, n)).fetchall()
        return [Pending(*r) for r in rows]

    def sent(self, sop_uids: list[str]) -> None:
        self.mark([(u, "sent", None, None, None) for u in sop_uids])

    def send_failed(self, sop_uids: list[str], error: str) -> None:
        with self._lock:
            self.db.executemany("UPDATE instances SET sends=sends+1, error=?, done_at=? "
                                "WHERE sop_uid=?", [(error[:500], time.time(), u) for u in sop_uids])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | dict(rows)


def journal_counts(spool: str | Path) -> dict:
    """Counts of a journal from outside the node (tests, the load benchmark): per state, the
    number of instances and the reads they took."""
    db = sqlite3.connect(f"file:{Path(spool) / 'journal.db'}?mode=ro", uri=True, timeout=30)
    try:
        per_state = dict(db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state"))
        reads = dict(db.execute("SELECT reads, COUNT(*) FROM instances GROUP BY reads"))
        total = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    finally:
        db.close()
    return {"instances": total, "states": {s: per_state.get(s, 0) for s in STATES},
            "reads": {int(k): v for k, v in reads.items()}}
