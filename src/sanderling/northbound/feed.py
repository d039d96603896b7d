"""Keeps an external controller's copy of the cluster equal to the cluster: puts, deletes, resyncs.

The watcher hands `Feed.set(path, body_or_None)` every document that changed; the feed's one task
sends what differs from what the controller is believed to hold. Any failed request (the
controller down, restarting, refusing) marks the controller's copy unknown: the next successful
contact is a full resync (`Target.resync`: PUT everything, DELETE what it holds that no longer
exists), with exponential backoff until it succeeds. Changes made meanwhile are not lost: the
desired state is kept whole, only its delivery waits.

Two targets: `RestconfTarget` (OpenDaylight's RESTCONF config datastore, the COE models) and
`WebhookTarget` (a vendor-neutral JSON feed, README "Northbound feed").
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class TargetError(Exception):
    """The controller did not take a request; the message says which and why."""


class Target(Protocol):
    name: str

    async def put(self, path: str, body: dict[str, Any]) -> None: ...

    async def delete(self, path: str) -> None: ...

    async def resync(self, desired: dict[str, dict[str, Any]]) -> tuple[int, int]:
        """Make the controller hold exactly `desired`; (puts, deletes) made."""
        ...


@dataclass
class Feed:
    target: Target
    max_backoff: float = 10.0
    desired: dict[str, dict[str, Any]] = field(default_factory=dict)
    pushed: dict[str, dict[str, Any]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    need_resync: bool = True   # the first contact is a resync: the controller may hold anything
    ready: bool = False        # the watcher has the whole cluster (before that, a resync would delete too much)

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self.in_sync = asyncio.Event()

    def set(self, path: str, body: dict[str, Any] | None) -> None:
        if body is None:
            if self.desired.pop(path, None) is None and path not in self.pushed:
                return
        elif self.desired.get(path) == body:
            return
        else:
            self.desired[path] = body
        self.dirty.add(path)
        self.in_sync.clear()
        self._wake.set()

    def start(self) -> None:
        """The watcher has listed everything: from now on the desired state is the cluster."""
        self.ready = True
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.ready:
                continue
            try:
                if self.need_resync:
                    await self._resync()
                await self._drain()
                backoff = 0.2
                if not self.dirty and not self.need_resync:
                    self.in_sync.set()
            except TargetError as exc:
                self.counts["failures"] += 1
                if not self.need_resync:
                    log.warning("%s: %s; its copy of the cluster is now unknown: resync when it answers",
                                self.target.name, exc)
                else:
                    log.info("%s: still failing (%s); retrying in %.1f s", self.target.name, exc, backoff)
                self.need_resync = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                self._wake.set()

    async def _resync(self) -> None:
        snapshot = dict(self.desired)
        self.dirty.clear()
        puts, deletes = await self.target.resync(snapshot)
        self.pushed = snapshot
        self.need_resync = False
        self.counts.update(resyncs=1, puts=puts, deletes=deletes)
        # changes that came in while the resync ran are in dirty again (set() adds them)
        log.info("%s: resynced: %d documents put, %d deleted", self.target.name, puts, deletes)

    async def _drain(self) -> None:
        while self.dirty:
            path = self.dirty.pop()
            body = self.desired.get(path)
            try:
                if body is None:
                    if path in self.pushed:
                        await self.target.delete(path)
                        self.pushed.pop(path, None)
                        self.counts["deletes"] += 1
                elif self.pushed.get(path) != body:
                    await self.target.put(path, body)
                    self.pushed[path] = body
                    self.counts["puts"] += 1
            except TargetError:
                self.dirty.add(path)
                raise
