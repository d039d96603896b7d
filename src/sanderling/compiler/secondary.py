"""Flows of a secondary-network bridge (a VLAN provider bridge, or the layer2 bridge).

These bridges switch frames with OVS's own MAC learning (NORMAL, which also applies the ports'
VLAN access tags and trunks, so networks on one bridge stay apart by VLAN); the agent adds what
NORMAL cannot, in front of it (SECONDARY_PIPELINE):
- a spoof guard on every pod port that has addresses from Sanderling's IPAM, so a pod sends only
  from its own MAC and IPv4 addresses and answers ARP only for them (ports without IPAM, pure L2
  networks, are unguarded by design: the user owns their addressing);
- the network of each IPv4 packet and ARP request (its pod port, the uplink's VLAN, the layer2
  tunnel) in SECONDARY_NETWORK, then the Services of that network (`compiler.network_services`)
  and the policy tables, where MultiNetworkPolicy of that network applies (flows from
  `compiler.policy`, each matching its network: see `on_network`).

Pure: ports in, flows out, in a stable order for golden tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import SECONDARY_PIPELINE as P
from sanderling.openflow.registers import SECONDARY_FROM_UPLINK, SECONDARY_NETWORK

PRIO_GUARD_ALLOW = 100
PRIO_GUARD_DROP = 90
PRIO_NETWORK = 50
COOKIE = cookies.cookie(cookies.Category.PIPELINE, "secondary-bridge")
VLAN_PRESENT = 0x1000


@dataclass(frozen=True)
class GuardedPort:
    """A pod port with addresses Sanderling gave it, on network `network_id` (0: no policy)."""

    ofport: int
    mac: str
    ips: tuple[str, ...]
    network_id: int = 0


@dataclass(frozen=True)
class NetworkPort:
    """A port whose IPv4 and ARP belong to one network: an unguarded pod port, a layer2 network's
    tunnel device, or the uplink for one VLAN (vlan != 0); `uplink`: frames from other nodes."""

    ofport: int
    network_id: int
    vlan: int = 0
    uplink: bool = False


def _onwards(network_id: int, table: str, uplink: bool = False) -> tuple[ir.Action, ...]:
    if not network_id:
        return (ir.Output(ir.NORMAL),)
    marks = (SECONDARY_FROM_UPLINK.load(1),) if uplink else ()
    return (SECONDARY_NETWORK.load(network_id), *marks, ir.Goto(P[table]))


def compile_bridge(ports: Iterable[GuardedPort], networks: Iterable[NetworkPort] = ()) -> list[ir.Flow]:
    table = P["NetworkClassifier"]
    flows = P.miss_flows(COOKIE)
    for port in sorted(ports, key=lambda p: p.ofport):
        if not port.ips:
            continue
        for ip in sorted(port.ips):
            flows.append(ir.Flow(table, PRIO_GUARD_ALLOW, ir.match(in_port=port.ofport, dl_src=port.mac, proto="ip",
                                                                   nw_src=ip), _onwards(port.network_id, "ServiceLB"),
                                 COOKIE))
            flows.append(ir.Flow(table, PRIO_GUARD_ALLOW, ir.match(in_port=port.ofport, dl_src=port.mac, proto="arp",
                                                                   arp_spa=ip, arp_sha=port.mac),
                                 _onwards(port.network_id, "ServiceARP"), COOKIE))
        flows.append(ir.Flow(table, PRIO_GUARD_DROP, ir.match(in_port=port.ofport), (), COOKIE))
    for net in sorted(networks, key=lambda n: (n.ofport, n.vlan)):
        if not net.network_id:
            continue
        extra = {"vlan_vid": VLAN_PRESENT | net.vlan} if net.vlan else {}
        flows.append(ir.Flow(table, PRIO_NETWORK, ir.match(in_port=net.ofport, proto="ip", **extra),
                             _onwards(net.network_id, "ServiceLB", net.uplink), COOKIE))
        flows.append(ir.Flow(table, PRIO_NETWORK, ir.match(in_port=net.ofport, proto="arp", **extra),
                             _onwards(net.network_id, "ServiceARP", net.uplink), COOKIE))
    return flows


def on_network(flows: Iterable[ir.Flow], network_id: int) -> list[ir.Flow]:
    """Policy flows of one network: each also matches the network, so networks sharing a bridge
    (and, perhaps, addresses) never see each other's rules."""
    reg = SECONDARY_NETWORK.equals(network_id).match_items()
    return [ir.Flow(f.table, f.priority, ir.Match.from_items((*f.match.items, *reg)), f.actions, f.cookie,
                    f.idle_timeout, f.hard_timeout) for f in flows]
