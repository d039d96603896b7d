"""Local pod ports as OVSDB records them (external_ids written when a pod is plugged).

OVSDB is the node-local source of truth for which pods sit on br-int: it survives agent
restarts, so a restarted agent recompiles exactly what was there before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sanderling.model.errors import ModelError
from sanderling.model.network import PodPort
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import PortRecord

log = logging.getLogger(__name__)


def _pod_of(rec: PortRecord, errors: dict[str, str]) -> PodPort | None:
    """The pod a port record describes; a bad record is reported under its port name and skipped."""
    ext = rec.external_ids
    if ovsdb.EXT_POD_NAME not in ext:
        return None
    if rec.effective_ofport <= 0:
        return None  # not opened by ovs-vswitchd yet
    try:
        pod = PodPort.build(ext.get(ovsdb.EXT_POD_NAMESPACE, ""), ext[ovsdb.EXT_POD_NAME], rec.effective_ofport,
                            ext.get(ovsdb.EXT_MAC, ""), ext.get(ovsdb.EXT_IP, ""), ext.get(ovsdb.EXT_INTERFACE, "eth0"))
    except ModelError as exc:
        if errors.get(rec.name) != str(exc):
            log.error("port %s: %s", rec.name, exc)
        errors[rec.name] = str(exc)
        return None
    errors.pop(rec.name, None)
    return pod


class PodsOfPorts:
    """The pods of the replica's port records, read before every sync: a record the
    replica did not read again is the same object as before, so only changed ports are parsed
    again and their pods are the same objects too (the pod flows skip those)."""

    def __init__(self, read: Callable[[], list[PortRecord]], errors: dict[str, str]) -> None:
        self.read = read
        self.errors = errors
        self._seen: dict[int, tuple[PortRecord, PodPort | None]] = {}

    def __call__(self) -> list[PodPort]:
        seen: dict[int, tuple[PortRecord, PodPort | None]] = {}
        pods = []
        for rec in self.read():
            known = self._seen.get(id(rec))
            pod = known[1] if known is not None and known[0] is rec else _pod_of(rec, self.errors)
            seen[id(rec)] = (rec, pod)
            if pod is not None:
                pods.append(pod)
        self._seen = seen
        return pods
