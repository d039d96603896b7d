"""NodePorts from outside the node: steer them from the node's interface into br-int.

The node's address belongs to its kernel, so a connection to NODE_IP:NODEPORT arriving on the
uplink would be delivered to the node itself. A tc filter on the uplink's ingress
(clsact and u32, not iptables) redirects TCP, UDP and SCTP to the NodePort range of the node's
address into br-int's LOCAL interface, where the pipeline recognizes it by the uplink's MAC and
load-balances it like any service traffic. Replies leave br-int through LOCAL with the node's
address as source; `accept_local` lets the node's kernel forward them back out. An IPv6 node
address is steered the same way by its own filters (u32's `ip6` matches, their own priorities),
beside the IPv4 ones on the same interface.
"""

from __future__ import annotations

import ipaddress
import subprocess
from functools import partial

from sanderling.netlink.netns import ipr, netns_path, run_in_netns
from sanderling.portrange import port_blocks

PROTOS = ("tcp", "udp", "sctp")
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}


class SteeringError(RuntimeError):
    pass


def _tc(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["tc", *args]
    if netns:
        argv = ["nsenter", f"--net={netns_path(netns)}", *argv]
    return subprocess.run(argv, capture_output=True, text=True)


def interface_of(netns: str | None, address: str) -> tuple[str, str]:
    """(name, MAC) of the interface holding `address` in the node."""
    with ipr(netns) as h:
        for addr in h.get_addr(family=10 if ":" in address else 2):
            if addr.get_attr("IFA_ADDRESS") == address:
                link = h.get_links(addr["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS")
    raise SteeringError(f"no interface holds {address} in {netns or 'this namespace'}")


KEEP_PREFS = ("10", "11")  # the kept ports' filters alternate between these, ahead of the redirects
REDIRECT_PREF = "20"
KEEP_PREFS6 = ("12", "13")  # the same for an IPv6 address
REDIRECT_PREF6 = "21"


def _family(address: str) -> tuple[str, tuple[str, str], str]:
    """(u32's match keyword, the kept ports' priorities, the redirects' priority) of the address's family."""
    return ("ip6", KEEP_PREFS6, REDIRECT_PREF6) if ":" in address else ("ip", KEEP_PREFS, REDIRECT_PREF)


def steer(netns: str | None, ifname: str, address: str, bridge: str, ports: tuple[int, int] = (30000, 32767),
          keep: tuple[int, ...] = ()) -> bool:
    """Redirect ADDRESS:ports arriving on ifname into bridge (idempotent); `keep` ports stay local.
    Returns whether the redirects had to be (re)built.

    u32, the classifier every kernel has (flower is a module this one lacks): one filter per
    protocol and aligned block of the port range, after action-less filters for the kept ports.
    Updated in place: the redirects are built once; a new set of kept ports is added under the
    other keep priority before the old set is deleted, so NodePort traffic never meets a moment
    without its filters (endpoint changes move health-check ports at any time)."""
    rebuilt = False
    ip, keep_prefs, redirect_pref = _family(address)
    if not _redirects_present(netns, ifname, address, bridge):
        if "clsact" not in _tc(netns, "qdisc", "show", "dev", ifname).stdout:
            _run(netns, "qdisc", "add", "dev", ifname, "clsact")
        # what is there at our priority is not ours, or incomplete (the other family's stays)
        _tc(netns, "filter", "del", "dev", ifname, "ingress", "pref", redirect_pref)
        for number in (PROTO_NUMBERS[p] for p in PROTOS):
            for value, mask in port_blocks(*ports):
                _run(netns, *_u32(ifname, address, redirect_pref), "match", ip, "protocol", str(number), "0xff",
                     "match", ip, "dport", str(value), hex(mask), "action", "mirred", "egress", "redirect", "dev",
                     bridge)
        rebuilt = True
    shown = _tc(netns, "filter", "show", "dev", ifname, "ingress").stdout
    old = [pref for pref in keep_prefs if f"pref {pref} " in shown]
    new = keep_prefs[1] if keep_prefs[0] in old else keep_prefs[0]
    for port in keep:  # e.g. healthCheckNodePorts, served by the node itself
        # a match with no action ends classification and lets the packet through (this kernel has no
        # act_gact for an explicit `pass`)
        _run(netns, *_u32(ifname, address, new), "match", ip, "protocol", "6", "0xff", "match", ip, "dport",
             str(port), "0xffff", "flowid", "1:1")
    for pref in old:
        _tc(netns, "filter", "del", "dev", ifname, "ingress", "pref", pref)
    if ip == "ip":  # (IPv6 forwards replies from a local source without being told)
        conf = f"/proc/sys/net/ipv4/conf/{bridge}/accept_local"
        if netns:
            run_in_netns(netns, partial(_write, conf, "1"))
        else:
            _write(conf, "1")
    return rebuilt


def _u32(ifname: str, address: str, pref: str) -> list[str]:
    if ":" in address:
        return ["filter", "add", "dev", ifname, "ingress", "pref", pref, "protocol", "ipv6", "u32", "match", "ip6",
                "dst", f"{address}/128"]
    return ["filter", "add", "dev", ifname, "ingress", "pref", pref, "protocol", "ip", "u32", "match", "ip",
            "dst", f"{address}/32"]


def _redirects_present(netns: str | None, ifname: str, address: str, bridge: str) -> bool:
    """Our redirect filters for this address and bridge are installed (u32 shows the address as hex,
    an IPv6 one as four words from offset 24)."""
    _ip, _keep, redirect_pref = _family(address)
    shown = _tc(netns, "filter", "show", "dev", ifname, "ingress", "pref", redirect_pref).stdout
    packed = ipaddress.ip_address(address).packed
    base = 24 if len(packed) == 16 else 16
    words = [f"match {packed[i:i + 4].hex()}/ffffffff at {base + i}" for i in range(0, len(packed), 4)]
    return all(w in shown for w in words) and f"to device {bridge}" in shown


def _run(netns: str | None, *args: str) -> None:
    res = _tc(netns, *args)
    if res.returncode != 0:
        raise SteeringError(f"tc {' '.join(args)}: {res.stderr.strip()}")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
