"""The agent's one sync loop: the only owner of the OpenFlow session to br-int and of the realizer.

Producers of flows (the node's own pipeline and pods, the kube-proxy replacement, NetworkPolicy,
NodePort steering) never see the realizer or the connection. Each asks for a `ScopedState`, a
narrow desired-state interface restricted to one key namespace (`pod/`, `service/`, ...): it can
only set or remove its own objects, and every change wakes the loop. The loop then

- coalesces: a burst of changes from several producers goes out as one bundle, at most one
  bundle per `min_interval` for background changes, while a caller that must know its change is
  installed (a CNI ADD) awaits `flush()`, which joins whatever sync covers its request;
- retries: an object the switch refused is sent again on its own schedule (0.5 s, 1 s, 2 s ...
  up to 30 s), not only when its producer changes it; a refusal often depends on another object
  (a group not there yet) that a later change brings;
- gates: after a restart the previous generation keeps serving until every informer the node's
  flows depend on has listed (`gate`); until then only the objects the agent knows for certain
  go out (its pods, its pipeline, routes to other nodes), nothing is swept, and the API-fed
  objects (Services, NetworkPolicies) stay pending; then one resync installs them all and sweeps
  the previous generation in the same bundle, so a restart never refuses a live Service
  connection for want of its EndpointSlices, nor opens a policy hole for want of a policy;
- reconnects: when the session drops (ovs-vswitchd restarted) it reconnects with a short backoff
  and replays the whole desired state (meters first).

The clock is injectable so the retry schedule and the coalescing interval are tested without
waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from sanderling.agent.reject import reject_reply
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection, ConnectionLost, OpenFlowError
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer

log = logging.getLogger(__name__)

GATED_PREFIXES = ("service", "policy")  # fed by the API: installed only once it has been listed


def ungated(key: str) -> bool:
    return not key.startswith(GATED_PREFIXES)


class DesiredState(Protocol):
    """What a producer of flows may do: set or remove its own objects (a Realizer also fits)."""

    def set_object(self, key: str, flows: Iterable[ir.Flow], groups: Iterable[ir.Group] = ()) -> None: ...

    def remove_object(self, key: str) -> None: ...


class ScopedState:
    """One producer's window on the desired state: keys under its prefix only."""

    def __init__(self, realizer: Realizer, prefix: str, wake: Callable[[], None]) -> None:
        self.prefix = prefix
        self._realizer = realizer
        self._wake = wake

    def _check(self, key: str) -> None:
        if not key.startswith(self.prefix):
            raise ValueError(f"object {key!r} is outside this producer's namespace {self.prefix!r}")

    def set_object(self, key: str, flows: Iterable[ir.Flow], groups: Iterable[ir.Group] = ()) -> None:
        self._check(key)
        if self._realizer.set_object(key, flows, groups):  # an unchanged object wakes nobody
            self._wake()

    def remove_object(self, key: str) -> None:
        self.set_object(key, ())


class RetrySchedule:
    """When each refused object is due to be sent again: doubling from `base` to `cap` seconds."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self._due: dict[str, tuple[float, float]] = {}  # key -> (when, current delay)

    def update(self, failed: Iterable[str], now: float) -> None:
        """`failed`: the objects refused as of now; a new one is due after `base`, one that failed
        again after twice its last delay; one no longer failing is forgotten."""
        failed = set(failed)
        for key in list(self._due):
            if key not in failed:
                del self._due[key]
        for key in failed - self._due.keys():
            self._due[key] = (now + self.base, self.base)

    def take_due(self, now: float) -> list[str]:
        """The objects to retry now; each is rescheduled with its delay doubled."""
        due = sorted(k for k, (when, _) in self._due.items() if when <= now)
        for key in due:
            delay = min(self._due[key][1] * 2, self.cap)
            self._due[key] = (now + delay, delay)
        return due

    def next_due(self) -> float | None:
        return min((when for when, _ in self._due.values()), default=None)

    def __contains__(self, key: str) -> bool:
        return key in self._due


class SyncLoop:
    def __init__(self, name: str, target: str, realizer: Realizer, *, min_interval: float = 0.01,
                 poll_interval: float = 0.2, clock: Callable[[], float] = time.monotonic,
                 retry: RetrySchedule | None = None) -> None:
        self.name = name  # the node, for log lines
        self.target = target
        self.realizer = realizer
        self.min_interval = min_interval
        self.poll_interval = poll_interval
        self.clock = clock
        self.retry = retry or RetrySchedule()
        self.gate: asyncio.Event | None = None  # set once the informers have listed (None: nothing to wait for)
        self.swept = False  # the previous generation is gone: the complete desired state is installed
        self.before_sync: list[Callable[[], None]] = []  # producers that poll (pods: the OVSDB replica)
        self.on_connect: list[Callable[[Connection], None]] = []  # each new session, before its resync
        self.packet_in_hooks: list[Callable[[int, int, bytes], None]] = []
        self.meters: list[ir.Meter] = []  # installed after every (re)connect, before the flows
        self.conn: Connection | None = None
        self.connected = asyncio.Event()
        self.resyncs = 0
        self.bundles = 0
        # (seconds, objects sent, objects refused) after every bundle: the metrics' histogram
        self.sync_observers: list[Callable[[float, int, int], None]] = []
        self.packet_ins: dict[int, int] = {}  # table id -> packet-ins received
        self._scopes: list[str] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._requested = 0
        self._completed = 0
        self._last_sync = float("-inf")

    # ---- what producers and the CNI side see ------------------------------------------------

    def scope(self, prefix: str) -> ScopedState:
        """The desired-state interface of one producer: the keys starting with `prefix` (the
        policy producer's "policy" covers its "policy-pod/" and "policy-flow/" objects too);
        each namespace has one owner."""
        for taken in self._scopes:
            if taken.startswith(prefix) or prefix.startswith(taken):
                raise ValueError(f"namespace {prefix!r} overlaps {taken!r}, which another producer owns")
        self._scopes.append(prefix)
        return ScopedState(self.realizer, prefix, self.kick)

    def kick(self) -> None:
        self._wake.set()

    def installed(self, key: str) -> bool:
        return self.realizer.is_installed(key)

    def error(self, key: str) -> str | None:
        return self.realizer.errors.get(key)

    def gate_open(self) -> bool:
        return self.gate is None or self.gate.is_set()

    async def flush(self) -> None:
        """Push every change made before this call; return once the switch has it (or raise
        ConnectionLost). Concurrent callers share syncs: one whose request is covered by a sync
        that started after it asked returns when that one ends, so 20 CNI ADDs cost a few syncs."""
        self._requested += 1
        ticket = self._requested
        async with self._lock:
            if self._completed >= ticket:
                return
            covers = self._requested
            for poll in self.before_sync:
                poll()
            conn = self.conn
            if conn is None:
                raise ConnectionLost(f"not connected to {self.target}")
            for key in self.retry.take_due(self.clock()):
                self.realizer.retry(key)
            started = time.perf_counter()
            if not self.swept and self.gate_open():
                await self._resync(conn)
                self._observe(started, len(self.realizer.keys()), len(self.realizer.errors))
            elif self.realizer.pending:
                result = await self.realizer.sync(conn, only=None if self.swept else ungated)
                self.bundles += 1
                self._observe(started, result.applied, len(result.failed))
            self.retry.update(self.realizer.errors, self.clock())
            self._last_sync = self.clock()
            self._completed = covers

    # ---- the loop ----------------------------------------------------------------------------

    async def _resync(self, conn: Connection) -> None:
        if self.gate_open():
            await self.realizer.resync(conn)
            if not self.swept:
                log.info("node %s: desired state complete, previous generation swept", self.name)
            self.swept = True
        else:
            log.info("node %s: waiting for the informers to list before sweeping the previous generation; "
                     "it keeps serving meanwhile", self.name)
            await self.realizer.resync(conn, sweep=False, only=ungated)
        self.bundles += 1

    def _observe(self, started: float, sent: int, refused: int) -> None:
        seconds = time.perf_counter() - started
        for observer in self.sync_observers:
            try:
                observer(seconds, sent, refused)
            except Exception:  # metrics must never stop the dataplane
                log.exception("sync observer failed")

    def _packet_in(self, pin: Any) -> None:
        self.packet_ins[pin.table_id] = self.packet_ins.get(pin.table_id, 0) + 1
        for hook in self.packet_in_hooks:  # e.g. policy logging
            try:
                hook(pin.table_id, pin.cookie, pin.data)
            except Exception:
                log.exception("packet-in handler failed")
        if pin.table_id != PIPELINE["Reject"] or self.conn is None:
            return
        reply = reject_reply(pin.data)
        in_port = next((value for name, value, _mask in pin.match.items if name == "in_port"), None)
        if reply is None or in_port is None:
            return
        asyncio.ensure_future(self.conn.packet_out(reply, (ir.Output(ir.IN_PORT),), in_port))

    async def _install_meters(self, conn: Connection) -> None:
        from sanderling.openflow import encoder as E

        for meter in self.meters:  # delete + add: the same whether or not it existed
            conn.send(E.meter_mod(meter, conn.next_xid(), E.OFPMC_DELETE))
            conn.send(E.meter_mod(meter, conn.next_xid(), E.OFPMC_ADD))
        if self.meters:
            await conn.barrier()

    async def _connect(self) -> Connection:
        delay = 0.05
        while not self._stop.is_set():
            try:
                return await Connection.open(self.target, timeout=2.0)
            except (TimeoutError, OSError, ConnectionLost) as exc:
                log.debug("connect %s failed: %s; retry in %.2fs", self.target, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise asyncio.CancelledError

    def _wait_s(self) -> float:
        """How long the loop may sleep: the poll interval, or less when a retry is due sooner."""
        due = self.retry.next_due()
        if due is None:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, due - self.clock()))

    async def run(self) -> None:
        while not self._stop.is_set():
            conn = await self._connect()
            self.conn = conn
            stop_task = asyncio.ensure_future(self._stop.wait())
            conn.packet_in_handlers.append(self._packet_in)
            for hook in self.on_connect:
                hook(conn)
            log.info("connected to %s (datapath %016x)", self.target, conn.datapath_id)
            try:
                async with self._lock:
                    for poll in self.before_sync:
                        poll()
                    await self._install_meters(conn)  # before the flows that use them
                    await self._resync(conn)
                    self.retry.update(self.realizer.errors, self.clock())
                self.resyncs += 1
                self.connected.set()
                while not self._stop.is_set() and not conn.closed.done():
                    await self.flush()
                    wake = asyncio.ensure_future(self._wake.wait())
                    waiters: set[asyncio.Future[Any]] = {conn.closed, stop_task, wake}
                    await asyncio.wait(waiters, timeout=self._wait_s(), return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    self._wake.clear()
                    # coalesce: changes that keep coming are sent at most once per min_interval
                    rest = self._last_sync + self.min_interval - self.clock()
                    if rest > 0:
                        await asyncio.sleep(rest)
            except (ConnectionLost, OSError) as exc:
                log.warning("lost %s: %s; reconnecting", self.target, exc)
            except OpenFlowError as exc:
                log.error("switch refused the resync: %s; retrying", exc)
                await asyncio.sleep(0.5)
            except Exception:  # a bug must not take the node's network down: log, resync, go on
                log.exception("sync loop failed; reconnecting and resyncing")
                await asyncio.sleep(0.5)
            finally:
                stop_task.cancel()
                self.connected.clear()
                conn.close()
                self.conn = None

    def stop(self) -> None:
        self._stop.set()
