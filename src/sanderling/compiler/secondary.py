"""Flows of a secondary-network bridge (a VLAN provider bridge, or the layer2 bridge).

These bridges switch frames with OVS's own MAC learning (NORMAL, which also applies the ports'
VLAN access tags and trunks, so networks on one bridge stay apart by VLAN); the agent adds what
NORMAL cannot: a spoof guard on every pod port that has addresses from Sanderling's IPAM, so a
pod sends only from its own MAC and IPv4 addresses and answers ARP only for them. Ports without
IPAM (pure L2 networks) are unguarded by design: the user owns their addressing.

Pure: ports in, ovs-ofctl flow lines out (table 0 only), in a stable order for golden tests.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIO_GUARD_ALLOW = 100
PRIO_GUARD_DROP = 90
PRIO_SWITCH = 0


@dataclass(frozen=True)
class GuardedPort:
    ofport: int
    mac: str
    ips: tuple[str, ...]


def compile_bridge(ports: list[GuardedPort]) -> list[str]:
    flows = [f"table=0,priority={PRIO_SWITCH},actions=NORMAL"]
    for port in sorted(ports, key=lambda p: p.ofport):
        if not port.ips:
            continue
        where = f"table=0,in_port={port.ofport},dl_src={port.mac}"
        for ip in sorted(port.ips):
            flows.append(f"{where},priority={PRIO_GUARD_ALLOW},ip,nw_src={ip},actions=NORMAL")
            flows.append(f"{where},priority={PRIO_GUARD_ALLOW},arp,arp_spa={ip},arp_sha={port.mac},actions=NORMAL")
        flows.append(f"table=0,in_port={port.ofport},priority={PRIO_GUARD_DROP},actions=drop")
    return flows
