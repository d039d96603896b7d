"""An underlay bridge in its own namespace, and routed nodes attached to it (tests, benches, lab)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth
from sanderling.netlink.netns import ipr

BRIDGE = "fabric0"


def make_fabric(netns: str) -> None:
    teardown_prefix(netns)
    veth.ensure_netns(netns)
    with ipr(netns) as fab:
        fab.link("set", index=fab.link_lookup(ifname="lo")[0], state="up")  # its own services (a controller)
        fab.link("add", ifname=BRIDGE, kind="bridge")
        fab.link("set", index=fab.link_lookup(ifname=BRIDGE)[0], state="up")


def attach_host(fabric_netns: str, netns: str, host_end: str, ip_cidr: str) -> None:
    """A namespace of its own on the underlay (the control plane): veth `eth0` with ip_cidr."""
    veth.ensure_netns(netns)
    with ipr(fabric_netns) as fab:
        fab.link("add", ifname=host_end, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns})
        idx = fab.link_lookup(ifname=host_end)[0]
        fab.link("set", index=idx, master=fab.link_lookup(ifname=BRIDGE)[0], state="up")
    iface = ipaddress.IPv4Interface(ip_cidr)
    with ipr(netns) as h:
        h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
        idx = h.link_lookup(ifname="eth0")[0]
        h.link("set", index=idx, state="up")
        h.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def routed_nodes(prefix: str, base: Path, pod_cidrs: list[str], underlay: str) -> list[LocalNode]:
    """Nodes in routed mode on a fresh fabric `<prefix>-fabric`, each routing to the others' pod subnets."""
    net = ipaddress.IPv4Network(underlay)
    make_fabric(f"{prefix}-fabric")
    nodes: list[LocalNode] = []
    try:
        for i, cidr in enumerate(pod_cidrs, start=1):
            teardown_prefix(f"{prefix}-n{i}")
            node = LocalNode(f"n{i}", cidr, base, prefix=prefix, gateway=True)
            nodes.append(node)  # before it starts: a failure half-way must still stop its agent and OVS
            node.start()
            node.attach_underlay(f"{prefix}-fabric", BRIDGE, f"{net.network_address + 10 + i}/{net.prefixlen}")
        for node in nodes:
            for other in nodes:
                if other is not node:
                    if other.network.pod_cidr is not None:
                        node.route(str(other.network.pod_cidr), other.underlay_ip)
                    if other.network.pod_cidr6 is not None:  # via the uplink's link-local address
                        node.route(str(other.network.pod_cidr6), other.uplink_link_local(), dev="uplink")
    except BaseException:
        teardown(prefix, nodes)
        raise
    return nodes


def teardown(prefix: str, nodes: list[LocalNode]) -> None:
    for node in nodes:
        node.teardown()
    teardown_prefix(f"{prefix}-fabric")
