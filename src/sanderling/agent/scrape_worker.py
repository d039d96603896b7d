"""The Service endpoint counters of a scrape, read and written in a process of their own.

At 10,000 Services x 10 endpoints a scrape decodes 2 MB of OVS group statistics and writes
100,000 samples (14 MB of text). Done in the agent, that is ~0.2 s of Python on the agent's
event loop and half a million short-lived objects whose garbage collections stop it for tens of
milliseconds at a time: a Service change arriving during a scrape waited for them (its p99 went
from 1 ms to 10 ms). Here the agent keeps only what it alone knows, which endpoint each bucket
of each group stands for, and hands the changes of that map to a worker process; the worker
keeps its own OpenFlow session to the bridge (the bridge's management socket takes several),
reads the group statistics, sums them per endpoint label and writes the family's text, which
the agent streams to the scraper without looking at it.

Frames on the worker's stdin/stdout: a 4-byte length and a pickle (both ends are this package,
in processes of one user). Agent -> worker: `("labels", {group id: [label or None per bucket] or
None to forget})`, `("scrape",)`. Worker -> agent, per scrape: text chunks (bytes), then `b""`;
or `("error", why)`. The worker exits when its stdin closes (the agent is gone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger(__name__)

FAMILY = "sanderling_service_endpoint_connections"
HEADER = (f"# HELP {FAMILY}_total Connections this node's load balancing sent to each endpoint\n"
          f"# TYPE {FAMILY}_total counter\n")
CHUNK_LINES = 5000  # samples per text chunk sent back
LENGTH = struct.Struct("!I")


def frame(obj: Any) -> bytes:
    data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    return await reader.readexactly(length)


def render(labels: dict[int, list[str | None]], counts: dict[int, list[int]]) -> list[bytes]:
    """The family's text in chunks: each endpoint's connections summed over the groups that
    name it (a Service port's cluster-wide and node-local groups share endpoints)."""
    acc: dict[str, int] = {}
    for gid, names in labels.items():
        for label, packets in zip(names, counts.get(gid, ()), strict=False):
            if label is not None:
                acc[label] = acc.get(label, 0) + packets
    items = list(acc.items())
    chunks = [HEADER.encode()]
    for start in range(0, len(items), CHUNK_LINES):
        chunks.append("".join(f"{FAMILY}_total{{{label}}} {float(value)}\n"
                              for label, value in items[start:start + CHUNK_LINES]).encode())
    return chunks


class Worker:
    """The worker's side: the label map, a session to the bridge, one scrape at a time."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.labels: dict[int, list[str | None]] = {}
        self.conn: Any = None

    async def counts(self) -> dict[int, list[int]]:
        from sanderling.openflow.connection import Connection, ConnectionLost

        for attempt in (1, 2):  # a session lost since the last scrape (OVS restarted) is opened again
            if self.conn is None:
                self.conn = await Connection.open(self.target, timeout=5.0)
            try:
                return {g.group_id: g.bucket_packets for g in await self.conn.group_stats()}
            except ConnectionLost:
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def serve(self, reader: asyncio.StreamReader, write: Any) -> None:
        while True:
            try:
                message = pickle.loads(await read_frame(reader))
            except asyncio.IncompleteReadError:
                return  # the agent is gone
            if message[0] == "labels":
                for gid, names in message[1].items():
                    if names is None:
                        self.labels.pop(gid, None)
                    else:
                        self.labels[gid] = names
            elif message[0] == "scrape":
                try:
                    chunks = render(self.labels, await self.counts())
                except Exception as exc:  # noqa: BLE001 - said to the agent, which logs it
                    write(frame(("error", f"{type(exc).__name__}: {exc}")))
                    continue
                for chunk in chunks:
                    write(frame(chunk))
                write(frame(b""))


async def _main(target: str) -> None:
    # the lowest CPU class there is: on a busy node the agent and ovs-vswitchd always run first,
    # and a scrape takes what is left over
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    await Worker(target).serve(reader, write)


class ScrapeWorker:
    """The agent's side: starts the worker on first use (again if it died), sends it the label
    changes, and passes its text on chunk by chunk."""

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.generation = 0  # processes started: a new one knows no label

    async def started(self) -> asyncio.subprocess.Process:
        if self.proc is None or self.proc.returncode is not None:
            if self.proc is not None:
                log.warning("metrics: the scrape worker exited (code %s); starting another", self.proc.returncode)
                self._release(self.proc)
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sanderling.agent.scrape_worker", self.target,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**26)
            self.generation += 1
        return self.proc

    async def send_labels(self, changes: dict[int, list[str | None] | None]) -> None:
        proc = await self.started()
        assert proc.stdin is not None
        proc.stdin.write(frame(("labels", changes)))
        await proc.stdin.drain()

    async def scrape(self) -> AsyncIterator[bytes]:
        """The family's text, chunk by chunk; a worker that fails or hangs is stopped (the next
        scrape starts a new one, which gets every label again)."""
        proc = await self.started()
        assert proc.stdin is not None and proc.stdout is not None
        finished = False
        try:
            proc.stdin.write(frame(("scrape",)))
            await proc.stdin.drain()
            while True:
                data = await asyncio.wait_for(read_frame(proc.stdout), self.timeout)
                if data == b"":
                    finished = True
                    return
                if data[:1] == b"\x80":  # a pickle: the worker's error (text starts with '#' or 's')
                    finished = True
                    raise RuntimeError(pickle.loads(data)[1])
                yield data
        except (OSError, asyncio.IncompleteReadError) as exc:  # TimeoutError is an OSError
            raise RuntimeError(f"scrape worker: {exc or type(exc).__name__}") from None
        finally:
            if not finished:  # broken, hung, or the scraper went away mid-answer: its frames are stale
                self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            self._release(self.proc)
        self.proc = None

    async def close(self) -> None:
        """Stop the worker and wait for it (its pipes closed while the loop still runs)."""
        proc = self.proc
        self.stop()
        if proc is not None:
            await proc.wait()

    @staticmethod
    def _release(proc: asyncio.subprocess.Process) -> None:
        """Close our end of its stdin: once it is dead and its stdout at EOF, asyncio lets go
        of the process (instead of finalising it later, maybe after the loop closed)."""
        if proc.stdin is not None:
            proc.stdin.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
