"""A pod's veth made by hand-packed rtnetlink (`netlink.rtnl`), checked with pyroute2."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator

import pytest

from sanderling.netlink import veth
from sanderling.netlink.netns import ipr

from .conftest import require_root

_ids = itertools.count(1)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    require_root()
    n = next(_ids)
    node, pod = f"slvt{n}-node", f"slvt{n}-pod"
    for ns in (node, pod):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    yield node, pod
    for ns in (node, pod):
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _link(ns: str, name: str) -> dict:
    with ipr(ns) as h:
        link = h.link("get", ifname=name)[0]
        index = link["index"]
        return {"mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
                "up": bool(link["flags"] & 1),
                "v4": sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                             for a in h.get_addr(index=index, family=2)),
                "v6": [a.get_attr("IFA_ADDRESS") for a in h.get_addr(index=index, family=10)],
                "routes": sorted((r.get_attr("RTA_DST") or "default", r["dst_len"], r.get_attr("RTA_GATEWAY"))
                                 for r in h.get_routes(family=2, oif=index))}


def test_a_fresh_pod_gets_its_address_mac_mtu_and_routes_and_the_host_end_no_ipv6(namespaces):
    node, pod = namespaces
    pod_if = veth.PodInterface(pod, "slvt0000000001", "10.9.0.5/24", "0a:58:0a:09:00:05", "10.9.0.1", mtu=1400)
    host_mac = veth.plumb(pod_if, node)
    inside, host = _link(pod, "eth0"), _link(node, "slvt0000000001")
    assert inside["mac"] == "0a:58:0a:09:00:05" and inside["mtu"] == 1400 and inside["up"]
    assert inside["v4"] == ["10.9.0.5/24"]
    assert ("default", 0, "10.9.0.1") in inside["routes"]
    assert host["mac"] == host_mac and host["up"] and host["mtu"] == 1400
    assert host["v6"] == []  # no link-local: the node's kernel sends nothing into the pod from it
    assert _link(pod, "lo")["up"]
    assert veth.interface_exists(pod, "eth0") and not veth.interface_exists(pod, "eth9")


def test_a_pool_address_gets_an_on_link_gateway(namespaces):
    node, pod = namespaces
    veth.plumb(veth.PodInterface(pod, "slvt0000000002", "10.100.0.7/32", "0a:58:0a:64:00:07", "10.244.1.1"), node)
    routes = _link(pod, "eth0")["routes"]
    assert ("10.244.1.1", 32, None) in routes and ("default", 0, "10.244.1.1") in routes


def test_a_repeated_add_converges_instead_of_failing(namespaces):
    node, pod = namespaces
    pod_if = veth.PodInterface(pod, "slvt0000000003", "10.9.0.6/24", "0a:58:0a:09:00:06", "10.9.0.1")
    first = veth.plumb(pod_if, node)
    assert veth.create_pair(pod_if, node) is None  # either end there: the converging path's job
    assert veth.plumb(pod_if, node) == first
    assert _link(pod, "eth0")["v4"] == ["10.9.0.6/24"]
