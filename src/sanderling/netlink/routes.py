"""Kernel routes the agent owns in the node (routed mode): one per remote destination.

They carry their own routing protocol number, so the agent recognizes its routes after a
restart, replaces what changed and removes what is no longer wanted, and never touches a
route it did not make.
"""

from __future__ import annotations

import logging

from sanderling.netlink.netns import ipr

log = logging.getLogger(__name__)

RTPROT_SANDERLING = 83  # unassigned in /etc/iproute2/rt_protos
MAIN_TABLE = 254


def sync_routes(netns: str | None, wanted: dict[str, str], prune: bool = True) -> tuple[int, int]:
    """Make the node's Sanderling routes exactly `wanted` (dst CIDR -> gateway); return (set, removed).
    prune=False only adds: routes a previous agent set stay until the cluster says otherwise."""
    changed = removed = 0
    with ipr(netns) as h:
        current: dict[str, str] = {}
        for route in h.get_routes(family=2, table=MAIN_TABLE, proto=RTPROT_SANDERLING):
            dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            current[dst] = route.get_attr("RTA_GATEWAY") or ""
        for dst, via in wanted.items():
            if current.get(dst) != via:
                h.route("replace", dst=dst, gateway=via, proto=RTPROT_SANDERLING, table=MAIN_TABLE)
                changed += 1
        for dst in current.keys() - wanted.keys() if prune else ():
            h.route("del", dst=dst, proto=RTPROT_SANDERLING, table=MAIN_TABLE)
            removed += 1
    if changed or removed:
        log.info("routes: %d set, %d removed, %d in all", changed, removed, len(wanted))
    return changed, removed
