"""NodePort steering is updated in place (issue 20): a change of the kept health-check ports never
tears the redirect filters down, so NodePort traffic never meets a moment without them.

The redirect actions' own packet counters show it: a rebuild would reset them to zero."""

from __future__ import annotations

import re
import subprocess
import sys

from sanderling.lab.node import teardown_prefix
from sanderling.netlink import nodeport, veth
from sanderling.netlink.netns import ipr

from ..conftest import require_ovs
from .conftest import require_root

NODE, PEER = "sltc-node", "sltc-peer"


def _hits(pref: str) -> int:
    """Packets the redirect actions of that priority have sent (tc -s action statistics)."""
    shown = nodeport._tc(NODE, "-s", "filter", "show", "dev", "up0", "ingress", "pref", pref).stdout
    return sum(int(n) for n in re.findall(r"Sent \d+ bytes (\d+) pkt", shown))


def _send_udp(port: int, count: int) -> None:
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range({count}): s.sendto(b'x', ('10.55.0.2', {port}))")
    subprocess.run(["ip", "netns", "exec", PEER, sys.executable, "-c", code], check=True, timeout=30)


def _node_and_peer() -> None:
    """The node's namespace with its uplink `up0` (to `up1` in the peer's) and `brx`, which stands
    for br-int's LOCAL port; all up, no addresses yet."""
    require_root()
    require_ovs()
    teardown_prefix("sltc-")
    for ns in (NODE, PEER):
        veth.ensure_netns(ns)
    with ipr(NODE) as h:
        h.link("add", ifname="up0", kind="veth", peer={"ifname": "up1", "net_ns_fd": PEER})
        h.link("add", ifname="brx", kind="veth", peer={"ifname": "brx-peer"})
        for name in ("up0", "brx", "brx-peer", "lo"):
            h.link("set", index=h.link_lookup(ifname=name)[0], state="up")
    with ipr(PEER) as h:
        for name in ("up1", "lo"):
            h.link("set", index=h.link_lookup(ifname=name)[0], state="up")


def test_kept_ports_change_in_place_and_redirects_keep_counting():
    _node_and_peer()
    try:
        with ipr(NODE) as h:
            h.addr("add", index=h.link_lookup(ifname="up0")[0], address="10.55.0.2", prefixlen=24)
        with ipr(PEER) as h:
            h.addr("add", index=h.link_lookup(ifname="up1")[0], address="10.55.0.1", prefixlen=24)
            h.neigh("add", dst="10.55.0.2", lladdr="02:00:00:00:00:02", ifindex=h.link_lookup(ifname="up1")[0],
                    state=0x80)  # permanent: no ARP needed
        assert nodeport.steer(NODE, "up0", "10.55.0.2", "brx") is True
        _send_udp(30080, 5)
        first = _hits(nodeport.REDIRECT_PREF)
        assert first >= 5
        for keep in ((31001,), (31001, 31002), ()):  # health-check ports come and go with endpoints
            assert nodeport.steer(NODE, "up0", "10.55.0.2", "brx", keep=keep) is False
            shown = nodeport._tc(NODE, "filter", "show", "dev", "up0", "ingress").stdout
            kept = {int(v, 16) for v in re.findall(r"match 0000([0-9a-f]{4})/0000ffff at 20", shown)}
            assert kept == set(keep), shown
        _send_udp(30080, 5)
        assert _hits(nodeport.REDIRECT_PREF) >= first + 5  # never reset: the redirects were never rebuilt
    finally:
        for ns in (NODE, PEER):
            veth.delete_netns(ns)


def test_an_ipv6_node_address_is_steered_beside_the_ipv4_one():
    """The node's IPv6 address gets its own redirects (u32 ip6 matches, their own priorities) on
    the same interface; steering either family leaves the other's filters alone."""
    _node_and_peer()
    try:
        with ipr(NODE) as h:
            up0 = h.link_lookup(ifname="up0")[0]
            h.addr("add", index=up0, address="10.55.0.2", prefixlen=24)
            h.addr("add", index=up0, address="fd00:55::2", prefixlen=64, flags=0x02)  # IFA_F_NODAD
        with ipr(PEER) as h:
            up1 = h.link_lookup(ifname="up1")[0]
            h.addr("add", index=up1, address="fd00:55::1", prefixlen=64, flags=0x02)
            h.neigh("add", dst="fd00:55::2", lladdr="02:00:00:00:00:02", ifindex=up1, state=0x80, family=10)
        assert nodeport.interface_of(NODE, "fd00:55::2")[0] == "up0"
        assert nodeport.steer(NODE, "up0", "10.55.0.2", "brx") is True
        assert nodeport.steer(NODE, "up0", "fd00:55::2", "brx", keep=(31001,)) is True
        assert nodeport.steer(NODE, "up0", "10.55.0.2", "brx") is False  # the IPv4 redirects stayed
        assert nodeport.steer(NODE, "up0", "fd00:55::2", "brx", keep=(31001,)) is False
        code = ("import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                "for _ in range(5): s.sendto(b'x', ('fd00:55::2', 30080))")
        subprocess.run(["ip", "netns", "exec", PEER, sys.executable, "-c", code], check=True, timeout=30)
        shown = nodeport._tc(NODE, "-s", "filter", "show", "dev", "up0", "ingress",
                             "pref", nodeport.REDIRECT_PREF6).stdout
        assert sum(int(n) for n in re.findall(r"Sent \d+ bytes (\d+) pkt", shown)) >= 5, shown
        kept = nodeport._tc(NODE, "filter", "show", "dev", "up0", "ingress").stdout
        assert re.search(r"match 00007919/0000ffff at 40", kept), kept  # port 31001 kept local (IPv6 header: 40)
    finally:
        for ns in (NODE, PEER):
            veth.delete_netns(ns)
