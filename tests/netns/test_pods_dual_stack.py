"""Dual-stack pods on one node (userspace datapath): IPv6 between pods is routed by the pipeline,
neighbour discovery is answered in OVS and never forwarded, and a pod forging IPv6 addresses or
neighbour advertisements reaches nobody and poisons no cache."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sanderling.lab.node import LocalNode, Pod
from tests.netns.conftest import one_node, wait_for

GW6 = "fd00:10:244:6::1"

# an unsolicited neighbour advertisement, sent from the pod's own link-local address to all nodes:
# "<target> is at <mac>" with the override flag, what an attacker sends to take an address over
FORGE_NA = r"""
import socket, struct, sys
target, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
na = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target) + bytes([2, 1]) + mac
idx = socket.if_nametoindex("eth0")
for dst in sys.argv[3:]:
    for _ in range(3):
        s.sendto(na, (dst, 0, 0, idx))
"""


@pytest.fixture
def node6(tmp_path) -> Iterator[LocalNode]:
    yield from one_node(tmp_path, "sl6", "10.244.6.0/24,fd00:10:244:6::/64", ready=False)


def _pods(node: LocalNode, *names: str) -> list[Pod]:
    pods = [node.add_pod("default", name, f"10.244.6.{10 + i}", f"fd00:10:244:6::{10 + i:x}")
            for i, name in enumerate(names)]
    for p in pods:
        node.wait_programmed(p)
        node.serve(p)
    return pods


def _neighbours(node: LocalNode, pod: Pod) -> str:
    return node.pod_exec(pod, ["ip", "-6", "neigh", "show", "dev", "eth0"]).stdout


def _flow_packets(node: LocalNode, table: str, match: str) -> int:
    """Packets the flows of `table` whose text contains `match` have counted."""
    from sanderling.openflow.pipeline import PIPELINE

    out = node.ovs.ofctl(node.bridge, "dump-flows", f"table={PIPELINE[table]}")
    return sum(int(m.group(1)) for line in out.splitlines() if match in line
               for m in [re.search(r"n_packets=(\d+)", line)] if m)


def test_ipv6_ping_tcp_udp_between_two_dual_stack_pods(node6):
    a, b = _pods(node6, "a", "b")
    for src, dst in ((a, b), (b, a)):
        assert node6.probe(src, "icmp", dst.ip6), f"ping {src.name} -> {dst.ip6}"
        assert node6.probe(src, "tcp", dst.ip6, 8080), f"tcp {src.name} -> [{dst.ip6}]:8080"
        assert node6.probe(src, "udp", dst.ip6, 8081), f"udp {src.name} -> [{dst.ip6}]:8081"
        assert node6.probe(src, "tcp", dst.ip, 8080), f"IPv4 still: tcp {src.name} -> {dst.ip}:8080"
    out = node6.pod_exec(a, ["ping", "-6", "-c", "1", b.ip6]).stdout
    assert re.search(r"(ttl|hlim)=63", out), out  # routed: the hop limit went down by one in OVS
    # the responder answered for b with the gateway MAC (every packet is routed), as a router
    gw_mac = node6.network.gateway_mac
    assert re.search(rf"{b.ip6} lladdr {gw_mac} router", _neighbours(node6, a)), _neighbours(node6, a)
    # and for the gateway itself, which a resolves for anything off-link
    node6.probe(a, "udp", "fd00:10:245::1", 9, timeout=0.2)
    wait_for(lambda: re.search(rf"{GW6} lladdr {gw_mac} router", _neighbours(node6, a)), 10,
             f"{GW6} resolved to {gw_mac} in a")


def test_a_pod_forging_ipv6_sources_or_neighbour_advertisements_reaches_nobody(node6):
    a, b, evil = _pods(node6, "a", "b", "evil")
    for p in (a, b):
        assert node6.probe(p, "tcp", evil.ip6, 8080)  # every pod has resolved its gateway
    # neighbour discovery delivered to b by anything but the responder (b's own solicitations are
    # answered by it, from the gateway MAC)
    capture = subprocess.Popen(["ip", "netns", "exec", node6.netns, "tcpdump", "-n", "-l", "-Q", "out", "-i",
                                b.host_ifname, "icmp6 and ip6[40] >= 133 and ip6[40] <= 137 and not ether src "
                                + node6.network.gateway_mac],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert capture.stderr is not None
        wait_for(lambda: "listening on" in capture.stderr.readline(), 10, "tcpdump on b's port")
        dropped_before = _flow_packets(node6, "NeighborResponder", "icmp_type=136 actions=drop")
        # "a's address and the gateway's are at evil's MAC", to every node and to b directly
        node6.pod_exec(evil, [sys.executable, "-c", FORGE_NA, a.ip6, evil.mac, "ff02::1", b.ip6])
        node6.pod_exec(evil, [sys.executable, "-c", FORGE_NA, GW6, evil.mac, "ff02::1", b.ip6])
        wait_for(lambda: _flow_packets(node6, "NeighborResponder", "icmp_type=136 actions=drop")
                 >= dropped_before + 12, 10, "the forged advertisements dropped by the responder table")
        # and a forged source: evil takes a's IPv6 address
        node6.pod_exec(evil, ["ip", "-6", "addr", "add", f"{a.ip6}/64", "dev", "eth0", "nodad"])
        node6.pod_exec(evil, ["ip", "-6", "addr", "del", f"{evil.ip6}/64", "dev", "eth0"])
        node6.pod_exec(evil, ["ip", "-6", "route", "replace", "default", "via", GW6, "dev", "eth0"])
        assert not node6.probe(evil, "tcp", b.ip6, 8080)
        assert not node6.probe(evil, "udp", b.ip6, 8081)
        assert not node6.probe(evil, "icmp", b.ip6)
    finally:
        capture.terminate()
        out, _ = capture.communicate(timeout=10)
    assert out.strip() == "", f"neighbour discovery reached b's port:\n{out}"
    for victim in (a, b):
        neigh = _neighbours(node6, victim)
        assert evil.mac not in neigh, f"{victim.name}'s neighbour cache poisoned:\n{neigh}"
    # a and b still talk, over both families
    assert node6.probe(b, "tcp", a.ip6, 8080)
    assert node6.probe(a, "tcp", b.ip6, 8080)
    assert node6.probe(b, "tcp", a.ip, 8080)
