"""Object storage for the lab's Kubernetes API: SQLite, one global resourceVersion, watch history.

Every write bumps the global resourceVersion, stores the object and appends a watch event.
Old events are compacted away; a watch asking for a resourceVersion older than the oldest kept
event gets 410 Gone, as from a real API server, so clients exercise their relist path.
"""

from __future__ import annotations

import builtins
import copy
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    rv INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (resource, namespace, name));
CREATE TABLE IF NOT EXISTS events (
    rv INTEGER PRIMARY KEY, resource TEXT NOT NULL, namespace TEXT NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class ApiError(Exception):
    """Becomes a Kubernetes Status object with this HTTP code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    resource: str
    namespace: str
    type: str
    body: dict[str, Any]


class Store:
    def __init__(self, path: Path, keep_events: int = 10_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self.keep_events = keep_events
        row = self._db.execute("SELECT value FROM meta WHERE key='rv'").fetchone()
        self.rv = int(row[0]) if row else 1
        self.listeners: list[Any] = []
        # admission(resource, namespace, new body, current body or None, store, subresource) runs under
        # the write lock
        # before every create and non-status update; it may fill fields in or raise ApiError
        self.admission: Any = None

    # ---- reads ---------------------------------------------------------------------------

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        row = self._db.execute("SELECT body FROM objects WHERE resource=? AND namespace=? AND name=?",
                               (resource, namespace, name)).fetchone()
        if row is None:
            raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
        return json.loads(row[0])

    def list(self, resource: str, namespace: str | None) -> tuple[builtins.list[dict[str, Any]], int]:
        with self._lock:
            return self.list_unlocked(resource, namespace), self.rv

    def list_unlocked(self, resource: str, namespace: str | None) -> builtins.list[dict[str, Any]]:
        """For admission hooks, which already hold the write lock."""
        if namespace is None:
            rows = self._db.execute("SELECT body FROM objects WHERE resource=? ORDER BY namespace, name",
                                    (resource,)).fetchall()
        else:
            rows = self._db.execute("SELECT body FROM objects WHERE resource=? AND namespace=? ORDER BY name",
                                    (resource, namespace)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def oldest_event_rv(self) -> int:
        row = self._db.execute("SELECT MIN(rv) FROM events").fetchone()
        return int(row[0]) if row and row[0] is not None else self.rv

    def events_since(self, resource: str, namespace: str | None, rv: int) -> builtins.list[WatchEvent]:
        rows = self._db.execute("SELECT rv, resource, namespace, type, body FROM events WHERE rv>? AND resource=? "
                                "ORDER BY rv", (rv, resource)).fetchall()
        return [WatchEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows
                if namespace is None or r[2] == namespace]

    # ---- writes --------------------------------------------------------------------------

    def _commit(self, resource: str, namespace: str, event_type: str, body: dict[str, Any]) -> dict[str, Any]:
        """Under the lock and in a transaction: stamp, store, record the event, notify."""
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)
        name = body["metadata"]["name"]
        text = json.dumps(body)
        if event_type == "DELETED":
            self._db.execute("DELETE FROM objects WHERE resource=? AND namespace=? AND name=?",
                             (resource, namespace, name))
        else:
            self._db.execute("INSERT OR REPLACE INTO objects(resource, namespace, name, rv, body) VALUES(?,?,?,?,?)",
                             (resource, namespace, name, self.rv, text))
        self._db.execute("INSERT INTO events(rv, resource, namespace, type, body) VALUES(?,?,?,?,?)",
                         (self.rv, resource, namespace, event_type, text))
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('rv', ?)", (self.rv,))
        if self.rv % 500 == 0:
            self._db.execute("DELETE FROM events WHERE rv <= ?", (self.rv - self.keep_events,))
        event = WatchEvent(self.rv, resource, namespace, event_type, copy.deepcopy(body))
        for listener in list(self.listeners):
            listener(event)
        return body

    def _write(self, resource: str, namespace: str, event_type: str, body: dict[str, Any]) -> dict[str, Any]:
        """One write in one SQLite transaction (the caller holds the lock)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out = self._commit(resource, namespace, event_type, body)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return out

    def create(self, resource: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise ApiError(422, "Invalid", "metadata.name: Required value")
        with self._lock:
            exists = self._db.execute("SELECT 1 FROM objects WHERE resource=? AND namespace=? AND name=?",
                                      (resource, namespace, meta["name"])).fetchone()
            if exists:
                raise ApiError(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists')
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if namespace:
                meta["namespace"] = namespace
            if self.admission is not None:
                self.admission(resource, namespace, body, None, self, None)
            return self._write(resource, namespace, "ADDED", body)

    def update(self, resource: str, namespace: str, name: str, body: dict[str, Any],
               subresource: str | None = None) -> dict[str, Any]:
        with self._lock:
            current = self.get(resource, namespace, name)
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and str(wanted_rv) != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object '
                                                f"has been modified; please apply your changes to the latest version "
                                                f"and try again")
            new = copy.deepcopy(body)
            if subresource == "status":
                new = {**current, "status": body.get("status", {})}
                if resource == "/pods":  # pods/status may change labels and annotations (as in Kubernetes)
                    meta = body.get("metadata") or {}
                    new["metadata"] = {**current["metadata"], **{k: meta[k] for k in ("labels", "annotations")
                                                                 if k in meta}}
            elif "status" in current and "status" not in new:
                new["status"] = current["status"]
            meta = new.setdefault("metadata", {})
            for keep in ("uid", "creationTimestamp", "namespace", "name"):
                if keep in current["metadata"]:
                    meta[keep] = current["metadata"][keep]
            if self.admission is not None:  # status writes are validated like any other
                self.admission(resource, namespace, new, current, self, subresource)
            return self._write(resource, namespace, "MODIFIED", new)

    def patch(self, resource: str, namespace: str, name: str, patch: dict[str, Any],
              subresource: str | None = None) -> dict[str, Any]:
        with self._lock:
            current = self.get(resource, namespace, name)
        merged = merge_patch(current, patch)
        merged["metadata"]["resourceVersion"] = (patch.get("metadata") or {}).get(
            "resourceVersion", current["metadata"]["resourceVersion"])
        return self.update(resource, namespace, name, merged, subresource)

    def delete(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        with self._lock:
            current = self.get(resource, namespace, name)
            return self._write(resource, namespace, "DELETED", current)

    def compact(self) -> None:
        """Forget the whole watch history (tests use it to force 410 Gone)."""
        with self._lock:
            self._db.execute("DELETE FROM events")

    def close(self) -> None:
        self._db.close()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
