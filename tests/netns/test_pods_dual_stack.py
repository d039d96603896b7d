"""Dual-stack pods on one node (userspace datapath): IPv6 between pods is routed by the pipeline,
neighbour discovery is answered in OVS and never forwarded, and a pod forging IPv6 addresses or
neighbour advertisements reaches nobody and poisons no cache; then an IPv6-only node through CNI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sanderling.lab import fabric
from sanderling.lab.node import LocalNode, Pod
from sanderling.netlink import veth

from ..conftest import require_ovs
from .conftest import lose_ipam_database, one_node, require_root, wait_for

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


@pytest.fixture
def cni_node6(tmp_path) -> Iterator[LocalNode]:
    yield from one_node(tmp_path, "sl6c", "10.244.16.0/24,fd00:10:244:16::/64")


def _cni(node: LocalNode, command: str, cid: str, ips: list[str] | None = None) -> tuple[int, dict]:
    ns = f"{node.netns}-{cid}"
    veth.ensure_netns(ns)
    conf: dict = {"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
                  "agentSocket": str(node.cni_socket)}
    if ips:
        conf["runtimeConfig"] = {"ips": ips}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/{ns}",
           "CNI_IFNAME": "eth0", "CNI_PATH": str(node.cni_bin.parent),
           "CNI_ARGS": f"K8S_POD_NAMESPACE=prod;K8S_POD_NAME=pod-{cid}"}
    if command != "ADD":
        conf["prevResult"] = {}
    proc = subprocess.run([str(node.cni_bin)], input=json.dumps(conf), env=env, capture_output=True, text=True)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def _in(cid: str, *argv: str, node: str = "sl6c-n1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", f"{node}-{cid}", *argv], capture_output=True, text=True,
                          timeout=30)


def test_cni_add_on_a_dual_stack_node_gives_one_address_per_family(cni_node6):
    code, first = _cni(cni_node6, "ADD", "c1")
    assert code == 0, first
    addresses = {ip["address"] for ip in first["ips"]}
    v4 = next(a for a in addresses if "." in a)
    v6 = next(a for a in addresses if ":" in a)
    assert v4.endswith("/24") and v6.startswith("fd00:10:244:16::") and v6.endswith("/64"), first
    assert {(r["dst"], r["gw"]) for r in first["routes"]} == {("0.0.0.0/0", "10.244.16.1"),
                                                              ("::/0", "fd00:10:244:16::1")}
    inside = _in("c1", "ip", "-6", "addr", "show", "dev", "eth0").stdout
    assert v6 in inside, inside
    # fixed addresses of both families, by runtimeConfig
    code, second = _cni(cni_node6, "ADD", "c2", ["10.244.16.50/24", "fd00:10:244:16::50/64"])
    assert code == 0, second
    assert {ip["address"] for ip in second["ips"]} == {"10.244.16.50/24", "fd00:10:244:16::50/64"}
    # an IPv6 address already taken: refused, naming the holder, and the ADD leaves nothing (no IPv4 either)
    code, out = _cni(cni_node6, "ADD", "c3", ["fd00:10:244:16::50"])
    assert code == 1 and out["code"] == 100 and "prod/pod-c2" in out["msg"], out
    assert "c3" not in {a.container_id for a in cni_node6.allocations()}
    # the two pods talk over IPv6 through the pipeline
    server = subprocess.Popen(["ip", "netns", "exec", "sl6c-n1-c2", sys.executable, "-m", "sanderling.probe",
                               "serve", "--name", "c2", "--tcp", "8080"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        reply = _in("c1", sys.executable, "-m", "sanderling.probe", "connect", "tcp", "fd00:10:244:16::50", "8080",
                    "--timeout", "2")
        assert reply.returncode == 0 and reply.stdout.strip() == "c2", reply
    finally:
        server.kill()
        server.wait()
    assert _cni(cni_node6, "CHECK", "c1")[0] == 0
    # DEL releases both families
    assert _cni(cni_node6, "DEL", "c1")[0] == 0
    held = {a.container_id: a for a in cni_node6.allocations()}
    assert "c1" not in held and held["c2"].ip6 == "fd00:10:244:16::50"


def test_ipv6_pods_on_two_routed_nodes_over_the_underlay_link(tmp_path):
    """Routed mode: IPv6 pod addresses on the wire (no encapsulation, no NAT); the underlay is
    addressed in IPv4 only, the nodes route each other's IPv6 pod subnets via the link-local
    addresses of their uplinks."""
    require_root()
    require_ovs()
    nodes = fabric.routed_nodes("sl6r", tmp_path, ["10.244.33.0/24,fd00:10:244:33::/64",
                                                   "10.244.34.0/24,fd00:10:244:34::/64"], "172.31.249.0/24")
    try:
        n1, n2 = nodes
        for n in nodes:
            n.wait_ready()
        a = n1.add_pod("default", "a", "10.244.33.10", "fd00:10:244:33::a")
        b = n2.add_pod("default", "b", "10.244.34.10", "fd00:10:244:34::a")
        n1.wait_programmed(a)
        n2.wait_programmed(b)
        n2.serve(b)
        capture = subprocess.Popen(["ip", "netns", "exec", "sl6r-fabric", "tcpdump", "--immediate-mode", "-n", "-l",
                                    "-i", "fabric0", "-c", "20", "ip6 and not icmp6"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert capture.stderr is not None
        while "listening on" not in (line := capture.stderr.readline()):
            assert line, "tcpdump ended before it listened"
        assert n1.probe(a, "tcp", b.ip6, 8080, timeout=2)
        assert n1.probe(a, "udp", b.ip6, 8081, timeout=2)
        assert n1.probe(a, "icmp", b.ip6, timeout=2)
        assert n1.probe(a, "tcp", b.ip, 8080, timeout=2)  # and IPv4 alongside
        capture.terminate()
        lines = (capture.communicate(timeout=10)[0] or "").splitlines()
        assert any(f"{a.ip6}." in line and f"> {b.ip6}.8080" in line for line in lines), lines
        out = n1.pod_exec(a, ["ping", "-6", "-c", "1", b.ip6]).stdout
        # the reply's hops: n2's kernel, n1's kernel, n1's pipeline delivering to a (a pipeline
        # sending to its node does not decrement: the node's kernel does): 64 - 3
        assert re.search(r"(ttl|hlim)=61", out), out
    finally:
        fabric.teardown("sl6r", nodes)


@pytest.fixture
def node6only(tmp_path) -> Iterator[LocalNode]:
    yield from one_node(tmp_path, "slv6", "fd00:10:244:7::/64")


def test_ipv6_only_pods_through_cni(node6only):
    """An IPv6-only node through the CNI plugin: pods get one address, IPv6 (the IPv6 subnet is the
    node's primary pool), talk to each other, pass CHECK, survive an IPAM database rebuilt from
    OVSDB, and an IPv4 request is refused naming why."""
    node6 = node6only
    code, a = _cni(node6, "ADD", "a")
    assert code == 0, a
    assert [(ip["address"], ip["gateway"]) for ip in a["ips"]] == [("fd00:10:244:7::2/64", "fd00:10:244:7::1")]
    assert a["routes"] == [{"dst": "::/0", "gw": "fd00:10:244:7::1"}]
    code, b = _cni(node6, "ADD", "b", ["fd00:10:244:7::50/64"])
    assert code == 0 and b["ips"][0]["address"] == "fd00:10:244:7::50/64", b
    # nothing IPv4 inside the pod
    assert "inet " not in _in("a", "ip", "-4", "addr", "show", "dev", "eth0", node=node6.netns).stdout
    ping = _in("a", "ping", "-6", "-c", "1", "-W", "2", "fd00:10:244:7::50", node=node6.netns)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert _cni(node6, "CHECK", "a")[0] == 0
    code, refused = _cni(node6, "ADD", "c", ["10.244.7.5/24"])
    assert code == 1 and refused["code"] == 7 and "IPv6-only" in refused["msg"], refused
    # the database lost: rebuilt from the ports' external_ids, IPv6 addresses as the primary ones
    lose_ipam_database(node6)
    assert sorted((x.container_id, x.v6, x.v4) for x in node6.allocations()) == [
        ("a", "fd00:10:244:7::2", ""), ("b", "fd00:10:244:7::50", "")]
    code, d = _cni(node6, "ADD", "d")
    assert code == 0 and d["ips"][0]["address"] not in (a["ips"][0]["address"], b["ips"][0]["address"]), d
    assert _cni(node6, "DEL", "a")[0] == 0
    assert "a" not in {x.container_id for x in node6.allocations()}
    for cid in ("a", "b", "c", "d"):
        veth.delete_netns(f"{node6.netns}-{cid}")
