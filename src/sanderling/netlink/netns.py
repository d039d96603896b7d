"""Netlink sockets inside another network namespace, without forking.

pyroute2's `IPRoute(netns=...)` forks a helper process; in the agent that child inherits the
asyncio signal wake-up fd and its exit reads as SIGTERM to the parent. Instead the calling
thread enters the namespace with setns(2), opens the netlink socket (a socket stays bound to the
namespace it was created in) and returns to its own namespace before doing anything else.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
_cache = threading.local()


def netns_path(ns: str) -> str:
    return ns if ns.startswith("/") else f"/var/run/netns/{ns}"


def enter(ns: str) -> None:
    """Move the calling thread into `ns` for good (a process does this before it starts threads)."""
    fd = os.open(netns_path(ns), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread inside namespace ns for the duration of the block, then back in its own."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(ns), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def open_ipr(ns: str | None) -> IPRoute:
    """A new IPRoute whose socket lives in namespace `ns` (a name or a path; None = this one)."""
    if ns is None:
        return IPRoute()
    with inside(ns):
        return IPRoute()


@contextmanager
def ipr(ns: str | None = None, reuse: bool = False) -> Iterator[IPRoute]:
    """An IPRoute in `ns`. With `reuse`, one handle per thread and namespace is kept (for the
    node's own namespace, used on every request: creating an IPRoute costs more than most
    calls); a handle that saw an error is dropped, not reused."""
    if not reuse:
        handle = open_ipr(ns)
        try:
            yield handle
        finally:
            handle.close()
        return
    handles = getattr(_cache, "handles", None)
    if handles is None:
        handles = _cache.handles = {}
    # keyed by the namespace's identity, not its name: a namespace deleted and created again
    # under the same name is another namespace, and a socket in the old one would be useless
    st = os.stat(netns_path(ns)) if ns is not None else os.stat("/proc/thread-self/ns/net")
    key = (st.st_dev, st.st_ino)
    handle = handles.get(key)
    if handle is None:
        handle = handles[key] = open_ipr(ns)
    try:
        yield handle
    except BaseException:
        handles.pop(key, None)
        handle.close()
        raise


def drop_cached() -> None:
    """Close this thread's cached handles (they keep their namespaces alive after deletion)."""
    handles = getattr(_cache, "handles", None) or {}
    for handle in handles.values():
        handle.close()
    handles.clear()


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call fn with this thread inside namespace ns (e.g. to write its /proc/sys/net files)."""
    with inside(ns):
        return fn()
