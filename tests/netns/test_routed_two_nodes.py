"""Routed mode across two nodes: pods reach each other over the underlay with no encapsulation and
no address translation; pods reach the other node and the node reaches pods."""

from __future__ import annotations

import subprocess
import time

import pytest

from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth
from sanderling.netlink.netns import ipr

from ..conftest import require_ovs
from .conftest import require_root

FABRIC = "slrt-fabric"


@pytest.fixture
def routed(tmp_path):
    require_root()
    require_ovs()
    for prefix in ("slrt-n1", "slrt-n2", FABRIC):
        teardown_prefix(prefix)
    veth.ensure_netns(FABRIC)
    with ipr(FABRIC) as fab:
        fab.link("add", ifname="fabric0", kind="bridge")
        fab.link("set", index=fab.link_lookup(ifname="fabric0")[0], state="up")
    nodes = []
    for i in (1, 2):
        node = LocalNode(f"n{i}", f"10.244.{30 + i}.0/24", tmp_path, prefix="slrt", gateway=True)
        node.start()
        node.attach_underlay(FABRIC, "fabric0", f"172.31.250.{10 + i}/24")
        nodes.append(node)
    n1, n2 = nodes
    n1.route("10.244.32.0/24", n2.underlay_ip)
    n2.route("10.244.31.0/24", n1.underlay_ip)
    for node in nodes:
        node.wait_ready()
    yield n1, n2
    for node in nodes:
        node.teardown()
    teardown_prefix(FABRIC)


def test_pods_on_two_nodes_talk_routed_without_encapsulation_or_nat(routed):
    n1, n2 = routed
    a = n1.add_pod("default", "a", "10.244.31.10")
    b = n2.add_pod("default", "b", "10.244.32.10")
    n1.wait_programmed(a)
    n2.wait_programmed(b)
    n2.serve(b)
    capture = subprocess.Popen(["ip", "netns", "exec", FABRIC, "tcpdump", "-n", "-l", "-i", "fabric0", "-c", "20",
                                "not arp"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.0)
    assert n1.probe(a, "icmp", b.ip, timeout=2)
    assert n1.probe(a, "tcp", b.ip, 8080, timeout=2)
    assert n1.probe(a, "udp", b.ip, 8081, timeout=2)
    time.sleep(0.5)
    capture.terminate()
    lines = (capture.communicate(timeout=10)[0] or "").splitlines()
    assert any(f"{a.ip} > {b.ip}" in line for line in lines), lines  # the pods' own addresses on the wire
    assert any(f"{b.ip}.8080 > {a.ip}" in line or f"{b.ip} > {a.ip}" in line for line in lines), lines
    assert not any("VXLAN" in line or ".4789" in line or "GENEVE" in line for line in lines), lines
    assert not any("172.31.250." in line.split(">")[0] for line in lines if " IP " in line), lines  # no SNAT


def test_pod_to_other_node_and_node_to_pod(routed):
    n1, n2 = routed
    a = n1.add_pod("default", "a", "10.244.31.11")
    n1.wait_programmed(a)
    assert n1.probe(a, "icmp", n2.underlay_ip)  # pod -> the other node
    ping = subprocess.run(["ip", "netns", "exec", n2.netns, "ping", "-c", "1", "-W", "2", a.ip],
                          capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout  # node -> pod on another node
    ping = subprocess.run(["ip", "netns", "exec", n1.netns, "ping", "-c", "1", "-W", "2", a.ip],
                          capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout  # node -> its own pod
