"""An asyncio OpenFlow 1.3 session with one bridge.

Handshake, echo keepalive, request/reply by xid, barriers, atomic bundles, statistics and
packet-in delivery. OpenFlow error replies become `OpenFlowError`s that carry a readable
description of the message that caused them (the realizer passes the flow's ovs-ofctl text).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sanderling.openflow import decoder as D
from sanderling.openflow import encoder as E

log = logging.getLogger(__name__)


class OpenFlowError(Exception):
    """The switch refused something; `errors` pairs each error with what caused it."""

    def __init__(self, summary: str, errors: Sequence[tuple[D.ErrorMsg, str]] = ()) -> None:
        self.errors = list(errors)
        lines = [summary] + [f"  {err.describe()}: {what}" for err, what in self.errors]
        super().__init__("\n".join(lines))


class ConnectionLost(Exception):
    """The session ended before a reply came."""


@dataclass
class _BundleWatch:
    first_xid: int
    last_xid: int
    errors: list[D.ErrorMsg] = field(default_factory=list)


def parse_target(target: str) -> tuple[str, str | tuple[str, int]]:
    """'unix:/run/openvswitch/br-int.mgmt', 'tcp:127.0.0.1:6653' or a bare path."""
    if target.startswith("unix:"):
        return "unix", target[5:]
    if target.startswith("tcp:"):
        host, port = target[4:].rsplit(":", 1)
        return "tcp", (host, int(port))
    return "unix", target


class Connection:
    """One OpenFlow session; build with `await Connection.open(target)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._xids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._multipart: dict[int, list[bytes]] = {}
        self._multipart_waiters: dict[int, asyncio.Future[list[bytes]]] = {}
        self._bundles: list[_BundleWatch] = []
        self._bundle_ids = itertools.count(1)
        self.packet_in_handlers: list[Callable[[D.PacketIn], None]] = []
        self.port_status_handlers: list[Callable[[D.PortStatus], None]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader_task: asyncio.Task[None] | None = None
        self._echo_task: asyncio.Task[None] | None = None
        self.datapath_id = 0
        self.decode_errors = 0  # messages from the switch that did not parse (logged and dropped)

    @classmethod
    async def open(cls, target: str, timeout: float = 5.0, echo_interval: float = 2.0) -> Connection:
        kind, address = parse_target(target)
        if kind == "unix":
            assert isinstance(address, str)
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(address, limit=1 << 24), timeout)
        else:
            assert isinstance(address, tuple)
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*address, limit=1 << 24), timeout)
        # a deep write buffer lets encoding run ahead of the switch instead of in lockstep
        writer.transport.set_write_buffer_limits(high=8 << 20, low=1 << 20)
        conn = cls(reader, writer, target)
        try:
            await asyncio.wait_for(conn._handshake(), timeout)
        except BaseException:
            conn.close()
            raise
        conn._echo_task = asyncio.create_task(conn._keepalive(echo_interval))
        return conn

    def next_xid(self) -> int:
        return next(self._xids)

    async def _read_message(self) -> bytes:
        head = await self._reader.readexactly(8)
        length = struct.unpack_from("!H", head, 2)[0]
        if length < 8:
            raise ConnectionLost(f"{self.name}: malformed OpenFlow header (length {length})")
        return head + (await self._reader.readexactly(length - 8) if length > 8 else b"")

    async def _handshake(self) -> None:
        self._writer.write(E.hello(self.next_xid()))
        msg = await self._read_message()
        version, mtype = msg[0], msg[1]
        if mtype != E.OFPT_HELLO:
            raise ConnectionLost(f"{self.name}: expected HELLO, got type {mtype}")
        if version < E.OFP_VERSION:
            raise ConnectionLost(f"{self.name}: switch speaks OpenFlow version {version}, need 1.3 (0x04)")
        self._reader_task = asyncio.create_task(self._read_loop())
        reply = await self.request(E.features_request, "features request")
        self.datapath_id = D.parse_features(reply)
        # service (.mgmt) connections receive packet-ins only with a non-zero miss_send_len
        self.send(E.set_config(self.next_xid()))
        await self.barrier()

    # ---- sending --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.closed.done():
            raise ConnectionLost(f"{self.name}: connection closed")
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"{self.name}: {exc}") from exc

    async def _await(self, fut: asyncio.Future[bytes], what: str, timeout: float) -> bytes:
        waiters: set[asyncio.Future[Any]] = {fut, self.closed}
        done, _ = await asyncio.wait(waiters, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        if self.closed in done:
            raise ConnectionLost(f"{self.name}: connection lost waiting for {what}")
        raise ConnectionLost(f"{self.name}: no reply to {what} within {timeout}s")

    async def request(self, build: Callable[[int], bytes], what: str, timeout: float = 10.0) -> bytes:
        xid = self.next_xid()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[xid] = fut
        try:
            self.send(build(xid))
            await self.drain()
            return await self._await(fut, what, timeout)
        finally:
            self._pending.pop(xid, None)

    async def barrier(self, timeout: float = 30.0) -> None:
        await self.request(E.barrier_request, "barrier", timeout)

    async def echo(self, timeout: float = 5.0) -> None:
        await self.request(E.echo_request, "echo", timeout)

    async def multipart(self, build: Callable[[int], bytes], what: str, timeout: float = 30.0) -> list[bytes]:
        xid = self.next_xid()
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._multipart_waiters[xid] = fut
        self._multipart[xid] = []
        try:
            self.send(build(xid))
            await self.drain()
            waiters: set[asyncio.Future[Any]] = {fut, self.closed}
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            raise ConnectionLost(f"{self.name}: no complete reply to {what}")
        finally:
            self._multipart_waiters.pop(xid, None)
            self._multipart.pop(xid, None)

    async def send_checked(self, messages: Sequence[tuple[int, bytes]], describe: Callable[[int], str]) -> None:
        """Send messages outside a bundle, then a barrier; raise if any was refused."""
        if not messages:
            return
        watch = _BundleWatch(messages[0][0], messages[-1][0])
        self._bundles.append(watch)
        try:
            self.send(b"".join(data for _, data in messages))
            await self.drain()
            await self.barrier()
        finally:
            self._bundles.remove(watch)
        if watch.errors:
            raise OpenFlowError(f"{self.name}: switch refused {len(watch.errors)} message(s)",
                                [(e, describe(e.xid)) for e in watch.errors])

    async def bundle(self, messages: Iterable[tuple[int, bytes]], describe: Callable[[int], str],
                     timeout: float = 120.0) -> int:
        """Apply messages (xid, encoded) atomically: all of them or, on any error, none.

        `messages` may be a generator: they are streamed to the switch while the caller is
        still encoding, so Python encoding and OVS processing overlap. Two phases, so a refused
        message can never leave a partial commit: open + adds + barrier; then commit only if no
        add was refused, otherwise discard. Returns the number of messages applied.
        """
        bundle_id = next(self._bundle_ids) & 0xFFFFFFFF
        watch = _BundleWatch(self._peek_xid(), 0xFFFFFFFF)
        self._bundles.append(watch)
        count = 0
        try:
            chunk: list[bytes] = [E.bundle_control(self.next_xid(), bundle_id, E.BUNDLE_OPEN_REQUEST)]
            size = 0
            try:
                for xid, data in messages:
                    if xid < watch.first_xid:
                        watch.first_xid = xid
                    chunk.append(E.bundle_add(xid, bundle_id, data))
                    size += len(data)
                    count += 1
                    if size > 128 * 1024:
                        self.send(b"".join(chunk))
                        chunk, size = [], 0
                        # Yield so the loop moves buffered bytes into the socket while we keep
                        # encoding; drain() only blocks once far ahead of the switch.
                        await asyncio.sleep(0)
                        await self.drain()
            except Exception:
                # a message could not be encoded: what was sent stays uncommitted
                self.send(b"".join(chunk) + E.bundle_control(self.next_xid(), bundle_id, E.BUNDLE_DISCARD_REQUEST))
                raise
            if count == 0:
                self.send(E.bundle_control(self.next_xid(), bundle_id, E.BUNDLE_DISCARD_REQUEST))
                return 0
            if chunk:
                self.send(b"".join(chunk))
            await self.drain()
            watch.last_xid = self._peek_xid()
            await self.barrier(timeout)
            if watch.errors:
                self.send(E.bundle_control(self.next_xid(), bundle_id, E.BUNDLE_DISCARD_REQUEST))
                raise OpenFlowError(f"{self.name}: bundle refused, nothing applied",
                                    [(e, describe(e.xid)) for e in watch.errors])
            try:
                await self.request(lambda x: E.bundle_control(x, bundle_id, E.BUNDLE_COMMIT_REQUEST),
                                   "bundle commit", timeout)
            except OpenFlowError as exc:
                errors = [(e, describe(e.xid)) for e in watch.errors] + exc.errors
                raise OpenFlowError(f"{self.name}: bundle commit failed, nothing applied", errors) from None
            return count
        finally:
            self._bundles.remove(watch)

    def _peek_xid(self) -> int:
        """The next xid that will be handed out, without taking it."""
        nxt = next(self._xids)
        self._xids = itertools.count(nxt)
        return nxt

    # ---- receiving ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ConnectionLost) as exc:
            log.info("openflow %s: connection closed (%s)", self.name, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            self._mark_closed()

    def _dispatch(self, msg: bytes) -> None:
        """Hand one message to whoever waits for it; a message that does not parse is logged with
        its type and dropped (a waiter for its xid gets the error), and the session goes on."""
        _, mtype, _, xid = D.parse_header(msg)
        try:
            self._dispatch_parsed(msg, mtype, xid)
        except D.DecodeError as exc:
            self.decode_errors += 1
            log.warning("openflow %s: message type %d xid %d ignored: %s", self.name, mtype, xid, exc)
            for waiters in (self._pending, self._multipart_waiters):
                fut = waiters.get(xid)
                if fut is not None and not fut.done():
                    fut.set_exception(exc)

    def _dispatch_parsed(self, msg: bytes, mtype: int, xid: int) -> None:
        if mtype == E.OFPT_ECHO_REQUEST:
            self._writer.write(E.echo_reply(xid, msg[8:]))
        elif mtype == E.OFPT_ERROR:
            err = D.parse_error(msg)
            for watch in self._bundles:
                if watch.first_xid <= xid <= watch.last_xid:
                    watch.errors.append(err)
                    return
            fut = self._pending.get(xid)
            if fut is not None and not fut.done():
                fut.set_exception(OpenFlowError(f"{self.name}: request refused", [(err, "request")]))
            elif xid in self._multipart_waiters:
                self._multipart_waiters[xid].set_exception(
                    OpenFlowError(f"{self.name}: stats request refused", [(err, "stats request")]))
            else:
                log.warning("openflow %s: unsolicited error xid=%d %s", self.name, xid, err.describe())
        elif mtype == E.OFPT_MULTIPART_REPLY:
            parts = self._multipart.get(xid)
            if parts is None:
                return
            parts.append(msg)
            _, more = D.multipart_header(msg)
            if not more:
                waiter = self._multipart_waiters.get(xid)
                if waiter is not None and not waiter.done():
                    waiter.set_result(parts)
        elif mtype == E.OFPT_PORT_STATUS:
            self._deliver("port-status", self.port_status_handlers, D.parse_port_status(msg))
        elif mtype == E.OFPT_PACKET_IN:
            self._deliver("packet-in", self.packet_in_handlers, D.parse_packet_in(msg))
        else:
            fut = self._pending.get(xid)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _deliver(self, what: str, handlers: Sequence[Callable[[Any], None]], message: Any) -> None:
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # a faulty handler must not end the session
                log.exception("openflow %s: %s handler failed", self.name, what)

    async def _keepalive(self, interval: float) -> None:
        try:
            while not self.closed.done():
                await asyncio.sleep(interval)
                try:
                    await self.echo(timeout=max(interval * 3, 5.0))
                except ConnectionLost:
                    log.warning("openflow %s: echo unanswered, closing", self.name)
                    self.close()
                    return
                except OpenFlowError:
                    pass
        except asyncio.CancelledError:
            pass

    def _mark_closed(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(ConnectionLost(f"{self.name}: connection closed"))
        try:
            self._writer.close()
        except Exception:  # already torn down by the peer
            pass

    def close(self) -> None:
        current = asyncio.current_task()
        for task in (self._reader_task, self._echo_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
        self._mark_closed()

    # ---- statistics -----------------------------------------------------------------------

    async def flow_stats(self, table: int = E.OFPTT_ALL, cookie: int = 0, cookie_mask: int = 0) -> list[D.FlowStats]:
        replies = await self.multipart(lambda x: E.flow_stats_request(x, table, cookie, cookie_mask), "flow stats")
        return [s for r in replies for s in D.parse_flow_stats(r)]

    async def port_stats(self) -> list[D.PortStats]:
        replies = await self.multipart(E.port_stats_request, "port stats")
        return [s for r in replies for s in D.parse_port_stats(r)]

    async def group_stats(self) -> list[D.GroupStats]:
        replies = await self.multipart(E.group_stats_request, "group stats")
        return [s for r in replies for s in D.parse_group_stats(r)]

    async def table_stats(self) -> list[D.TableStats]:
        replies = await self.multipart(E.table_stats_request, "table stats")
        return [s for r in replies for s in D.parse_table_stats(r)]

    async def meter_stats(self) -> list[D.MeterStats]:
        replies = await self.multipart(E.meter_stats_request, "meter stats")
        return [s for r in replies for s in D.parse_meter_stats(r)]

    async def packet_out(self, data: bytes, actions: tuple, in_port: int = 0xFFFFFFFD) -> None:
        self.send(E.packet_out(data, actions, self.next_xid(), in_port))
        await self.drain()
