"""Allocations persisted in SQLite on the node, crash-safe.

WAL journal with synchronous=NORMAL: a committed allocation survives kill -9 of the agent
(the WAL write has completed before COMMIT returns; only the fsync is deferred), an
uncommitted one never happened. A power loss may roll back the last few commits, but it also
ends every pod of the node, so no live pod can lose its address that way. Every change is one
`BEGIN IMMEDIATE` transaction, so concurrent writers (threads or processes) serialize on the
database, and the UNIQUE constraints make a double allocation impossible rather than unlikely.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS allocations (
    ip TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    container_id TEXT NOT NULL,
    ifname TEXT NOT NULL,
    pod_namespace TEXT NOT NULL DEFAULT '',
    pod_name TEXT NOT NULL DEFAULT '',
    mac TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    UNIQUE (container_id, ifname)
);
CREATE TABLE IF NOT EXISTS cursors (pool TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""
# a dual-stack pod's IPv6 address, in the row of its IPv4 one (added to stores made before it)
SCHEMA_IP6 = "CREATE UNIQUE INDEX IF NOT EXISTS allocations_ip6 ON allocations(ip6)"
COLUMNS = "ip, pool, container_id, ifname, pod_namespace, pod_name, mac, COALESCE(ip6, '')"


@dataclass(frozen=True)
class Allocation:
    ip: str
    pool: str
    container_id: str
    ifname: str
    pod_namespace: str
    pod_name: str
    mac: str
    ip6: str = ""  # the IPv6 address of a dual-stack pod (an IPv6-only node's pods hold theirs in `ip`)

    @property
    def ips(self) -> tuple[str, ...]:
        return (self.ip, self.ip6) if self.ip6 else (self.ip,)

    @property
    def v4(self) -> str:
        """The IPv4 address, or "" (a pod of an IPv6-only node)."""
        return "" if ":" in self.ip else self.ip

    @property
    def v6(self) -> str:
        """The IPv6 address (of a dual-stack or an IPv6-only pod), or ""."""
        return self.ip6 or (self.ip if ":" in self.ip else "")

    @property
    def pod(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else f"container {self.container_id}"


class AllocationStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._write_lock = threading.Lock()
        with self._conn() as db:
            db.executescript(SCHEMA)
            if "ip6" not in {row[1] for row in db.execute("PRAGMA table_info(allocations)")}:
                db.execute("ALTER TABLE allocations ADD COLUMN ip6 TEXT")
            db.execute(SCHEMA_IP6)

    @classmethod
    def open_or_replace(cls, path: Path) -> tuple[AllocationStore, Path | None]:
        """The store at `path`; if that file is not a sound SQLite database (a torn write, a disk
        error), it is moved aside (returned, for the log) and an empty store takes its place, for
        the caller to rebuild from what OVSDB records of the node's pods."""
        try:
            store = cls(path)
            if store._conn().execute("PRAGMA quick_check").fetchone()[0] == "ok":
                return store, None
            store.close()
        except sqlite3.DatabaseError:
            pass
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                part.rename(aside.with_name(aside.name + suffix))
        return cls(path), aside

    def restore(self, allocations: list[Allocation]) -> int:
        """Insert allocations rebuilt from elsewhere (OVSDB) that the store does not hold yet."""
        added = 0
        with self.transaction() as txn:
            for alloc in allocations:
                if (all(txn.holder(ip) is None for ip in alloc.ips)
                        and txn.find(alloc.container_id, alloc.ifname) is None):
                    txn.insert(alloc)
                    added += 1
        return added

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def transaction(self) -> Txn:
        # Serialize this process's writers on a mutex: on a busy database SQLite's busy handler
        # sleeps with backoff (up to 100 ms a try), which turned 20 concurrent ADDs into a queue
        # with gaps. Other processes still serialize on SQLite's own lock.
        return Txn(self._conn(), self._write_lock)

    def all(self) -> list[Allocation]:
        rows = self._conn().execute(f"SELECT {COLUMNS} FROM allocations").fetchall()
        return [Allocation(*r) for r in rows]

    def find(self, container_id: str, ifname: str) -> Allocation | None:
        row = self._conn().execute(f"SELECT {COLUMNS} FROM allocations WHERE container_id=? AND ifname=?",
                                   (container_id, ifname)).fetchone()
        return Allocation(*row) if row else None

    def release(self, container_id: str, ifname: str) -> Allocation | None:
        with self.transaction() as txn:
            found = txn.find(container_id, ifname)
            if found:
                txn.db.execute("DELETE FROM allocations WHERE container_id=? AND ifname=?", (container_id, ifname))
            return found

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class Txn:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on an exception)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db = db
        self._lock = lock

    def __enter__(self) -> Txn:
        self._lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self._lock.release()

    def holder(self, ip: str) -> Allocation | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM allocations WHERE ip=? OR ip6=?", (ip, ip)).fetchone()
        return Allocation(*row) if row else None

    def find(self, container_id: str, ifname: str) -> Allocation | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM allocations WHERE container_id=? AND ifname=?",
                              (container_id, ifname)).fetchone()
        return Allocation(*row) if row else None

    def used(self, pool: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT ip FROM allocations WHERE pool=?", (pool,))}

    def used6(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT ip6 FROM allocations WHERE ip6 IS NOT NULL")}

    def cursor(self, pool: str) -> int:
        row = self.db.execute("SELECT last FROM cursors WHERE pool=?", (pool,)).fetchone()
        return int(row[0]) if row else -1

    def set_cursor(self, pool: str, last: int) -> None:
        self.db.execute("INSERT INTO cursors(pool, last) VALUES(?, ?) "
                        "ON CONFLICT(pool) DO UPDATE SET last=excluded.last", (pool, last))

    def insert(self, alloc: Allocation) -> None:
        self.db.execute("INSERT INTO allocations(ip, pool, container_id, ifname, pod_namespace, pod_name, mac, created,"
                        " ip6) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (alloc.ip, alloc.pool, alloc.container_id, alloc.ifname, alloc.pod_namespace,
                         alloc.pod_name, alloc.mac, time.time(), alloc.ip6 or None))
