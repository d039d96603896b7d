"""Small process helpers shared by every layer: stop a pid, wait for a shutdown signal."""

from __future__ import annotations

import asyncio
import os
import signal
import time


def terminate(pid: int, timeout: float = 10.0, hard: bool = False) -> None:
    """SIGTERM (or SIGKILL when hard) and wait; SIGKILL if it is still there after timeout."""
    if pid <= 0:
        return
    try:
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def terminate_all(pids: list[int], timeout: float = 5.0, hard: bool = False) -> None:
    """`terminate` for many processes at once: every one signalled first, then all waited for
    together (one after another, a lab's dozen processes took ~20 s to stop)."""
    live = []
    for pid in (p for p in pids if p > 0):
        try:
            os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
            live.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        still = []
        for pid in live:
            try:
                os.kill(pid, 0)
                still.append(pid)
            except ProcessLookupError:
                pass
        live = still
        if live:
            time.sleep(0.02)
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def until_signalled() -> None:
    """Print `ready` (parents wait for that line) and return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


def kill_netns_processes(netns_name: str) -> None:
    """SIGKILL every process inside a named network namespace (a sandbox's workload, whoever
    started it: a kubelet restarted since no longer holds its handle). Deleting the namespace
    alone would leave them running, detached, forever."""
    import subprocess

    pids = subprocess.run(["ip", "netns", "pids", netns_name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
