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
    An IPv6 destination's gateway is written `fe80::1%192.0.2.12`: a link-local next hop on the
    interface that reaches the IPv4 address after the %% (the other node's underlay address).
    prune=False only adds: routes a previous agent set stay until the cluster says otherwise."""
    changed = removed = 0
    with ipr(netns) as h:
        current: dict[str, tuple[str, int]] = {}
        for family in (2, 10):
            for route in h.get_routes(family=family, table=MAIN_TABLE, proto=RTPROT_SANDERLING):
                dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
                oif = route.get_attr("RTA_OIF") or 0 if family == 10 else 0
                current[dst] = (route.get_attr("RTA_GATEWAY") or "", oif)
        for dst, via in wanted.items():
            gateway, _, reach = via.partition("%")
            oif = 0
            if reach:
                found = h.route("get", dst=reach)
                oif = found[0].get_attr("RTA_OIF") if found else 0
                if not oif:
                    log.error("route to %s via %s: no interface reaches %s; not set", dst, gateway, reach)
                    continue
            have = current.get(dst)
            if have is None or have[0] != gateway or (oif and have[1] != oif):
                h.route("replace", dst=dst, gateway=gateway, proto=RTPROT_SANDERLING, table=MAIN_TABLE,
                        **({"family": 10} if ":" in dst else {}), **({"oif": oif} if oif else {}))
                changed += 1
        for dst in current.keys() - wanted.keys() if prune else ():
            h.route("del", dst=dst, proto=RTPROT_SANDERLING, table=MAIN_TABLE, **({"family": 10} if ":" in dst else {}))
            removed += 1
    if changed or removed:
        log.info("routes: %d set, %d removed, %d in all", changed, removed, len(wanted))
    return changed, removed


def link_local_toward(netns: str | None, address: str) -> str | None:
    """The IPv6 link-local address of the interface holding IPv4 `address` (this node's underlay
    address): the next hop other nodes route this node's IPv6 pod subnet to. None if there is none."""
    with ipr(netns) as h:
        owners = [a["index"] for a in h.get_addr(family=2) if a.get_attr("IFA_ADDRESS") == address]
        for index in owners:
            for addr in h.get_addr(family=10, index=index):
                text = str(addr.get_attr("IFA_ADDRESS"))
                if text.startswith("fe80:") and not addr["flags"] & 0x40:  # IFA_F_TENTATIVE
                    return text
    return None
