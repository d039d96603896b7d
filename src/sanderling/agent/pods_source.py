"""Local pod ports as OVSDB records them (external_ids written when a pod is plugged).

OVSDB is the node-local source of truth for which pods sit on br-int: it survives agent
restarts, so a restarted agent recompiles exactly what was there before.
"""

from __future__ import annotations

import logging

from sanderling.model.errors import ModelError
from sanderling.model.network import PodPort
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import PortRecord

log = logging.getLogger(__name__)


def pods_from_ports(records: list[PortRecord], errors: dict[str, str]) -> list[PodPort]:
    """Convert port records to PodPorts; a bad record is reported under its port name and skipped."""
    pods = []
    for rec in records:
        ext = rec.external_ids
        if ovsdb.EXT_POD_NAME not in ext:
            continue
        if rec.effective_ofport <= 0:
            continue  # not opened by ovs-vswitchd yet
        try:
            pods.append(PodPort.build(ext.get(ovsdb.EXT_POD_NAMESPACE, ""), ext[ovsdb.EXT_POD_NAME],
                                      rec.effective_ofport, ext.get(ovsdb.EXT_MAC, ""), ext.get(ovsdb.EXT_IP, ""),
                                      ext.get(ovsdb.EXT_INTERFACE, "eth0")))
            errors.pop(rec.name, None)
        except ModelError as exc:
            if errors.get(rec.name) != str(exc):
                log.error("port %s: %s", rec.name, exc)
            errors[rec.name] = str(exc)
    return pods
