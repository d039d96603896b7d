"""Routed mode across two nodes: pods reach each other over the underlay with no encapsulation and
no address translation; pods reach the other node and the node reaches pods."""

from __future__ import annotations

import subprocess

import pytest

from sanderling.lab import fabric
from sanderling.openflow.pipeline import PIPELINE

from ..conftest import require_ovs
from .conftest import require_root

FABRIC = "slrt-fabric"


@pytest.fixture
def routed(tmp_path):
    require_root()
    require_ovs()
    nodes = fabric.routed_nodes("slrt", tmp_path, ["10.244.31.0/24", "10.244.32.0/24"], "172.31.250.0/24")
    for node in nodes:
        node.wait_ready()
    yield nodes[0], nodes[1]
    fabric.teardown("slrt", nodes)

def test_pods_on_two_nodes_talk_routed_without_encapsulation_or_nat(routed):
    n1, n2 = routed
    a = n1.add_pod("default", "a", "10.244.31.10")
    b = n2.add_pod("default", "b", "10.244.32.10")
    n1.wait_programmed(a)
    n2.wait_programmed(b)
    n2.serve(b)
    # --immediate-mode: each packet printed as it is captured, not when the capture buffer's timeout
    # fires (the probes take well under its second: terminated before that, tcpdump printed nothing)
    capture = subprocess.Popen(["ip", "netns", "exec", FABRIC, "tcpdump", "--immediate-mode", "-n", "-l", "-i",
                                "fabric0", "-c", "20", "not arp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert capture.stderr is not None
    while "listening on" not in (line := capture.stderr.readline()):  # capturing before the first probe
        assert line, "tcpdump ended before it listened"
    assert n1.probe(a, "icmp", b.ip, timeout=2)
    assert n1.probe(a, "tcp", b.ip, 8080, timeout=2)
    assert n1.probe(a, "udp", b.ip, 8081, timeout=2)
    capture.terminate()
    lines = (capture.communicate(timeout=10)[0] or "").splitlines()
    assert any(f"{a.ip} > {b.ip}" in line for line in lines), lines  # the pods' own addresses on the wire
    assert any(f"{b.ip}.8080 > {a.ip}" in line or f"{b.ip} > {a.ip}" in line for line in lines), lines
    assert not any("VXLAN" in line or ".4789" in line or "GENEVE" in line for line in lines), lines
    assert not any("172.31.250." in line.split(">")[0] for line in lines if " IP " in line), lines  # no SNAT
    # and the traffic went through br-int's pipeline to the gateway, not around it via the node kernel
    routed = n1.ovs.ofctl(n1.bridge, "dump-flows", f"table={PIPELINE['L3Forwarding']},ip")
    default_route = [line for line in routed.splitlines() if "priority=10," in line]
    assert default_route and "n_packets=0," not in default_route[0], routed


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
