"""NodePorts from outside the node: steer them from the node's interface into br-int.

The node's address belongs to its kernel, so a connection to NODE_IP:NODEPORT arriving on the
uplink would be delivered to the node itself. A tc filter on the uplink's ingress
(clsact and u32, not iptables) redirects TCP, UDP and SCTP to the NodePort range of the node's
address into br-int's LOCAL interface, where the pipeline recognizes it by the uplink's MAC and
load-balances it like any service traffic. Replies leave br-int through LOCAL with the node's
address as source; `accept_local` lets the node's kernel forward them back out.
"""

from __future__ import annotations

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
        for addr in h.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") == address:
                link = h.get_links(addr["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS")
    raise SteeringError(f"no interface holds {address} in {netns or 'this namespace'}")


KEEP_PREFS = ("10", "11")  # the kept ports' filters alternate between these, ahead of the redirects
REDIRECT_PREF = "20"


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
    if not _redirects_present(netns, ifname, address, bridge):
        _tc(netns, "qdisc", "del", "dev", ifname, "clsact")  # what is there is not ours, or incomplete
        _run(netns, "qdisc", "add", "dev", ifname, "clsact")
        for number in (PROTO_NUMBERS[p] for p in PROTOS):
            for value, mask in port_blocks(*ports):
                _run(netns, *_u32(ifname, address, REDIRECT_PREF), "match", "ip", "protocol", str(number), "0xff",
                     "match", "ip", "dport", str(value), hex(mask), "action", "mirred", "egress", "redirect", "dev",
                     bridge)
        rebuilt = True
    shown = _tc(netns, "filter", "show", "dev", ifname, "ingress").stdout
    old = [pref for pref in KEEP_PREFS if f"pref {pref} " in shown]
    new = KEEP_PREFS[1] if KEEP_PREFS[0] in old else KEEP_PREFS[0]
    for port in keep:  # e.g. healthCheckNodePorts, served by the node itself
        # a match with no action ends classification and lets the packet through (this kernel has no
        # act_gact for an explicit `pass`)
        _run(netns, *_u32(ifname, address, new), "match", "ip", "protocol", "6", "0xff", "match", "ip", "dport",
             str(port), "0xffff", "flowid", "1:1")
    for pref in old:
        _tc(netns, "filter", "del", "dev", ifname, "ingress", "pref", pref)
    conf = f"/proc/sys/net/ipv4/conf/{bridge}/accept_local"
    if netns:
        run_in_netns(netns, partial(_write, conf, "1"))
    else:
        _write(conf, "1")
    return rebuilt


def _u32(ifname: str, address: str, pref: str) -> list[str]:
    return ["filter", "add", "dev", ifname, "ingress", "pref", pref, "protocol", "ip", "u32", "match", "ip",
            "dst", f"{address}/32"]


def _redirects_present(netns: str | None, ifname: str, address: str, bridge: str) -> bool:
    """Our redirect filters for this address and bridge are installed (u32 shows the address as hex)."""
    shown = _tc(netns, "filter", "show", "dev", ifname, "ingress", "pref", REDIRECT_PREF).stdout
    hexed = "".join(f"{int(part):02x}" for part in address.split("."))
    return f"match {hexed}/ffffffff at 16" in shown and f"to device {bridge}" in shown


def _run(netns: str | None, *args: str) -> None:
    res = _tc(netns, *args)
    if res.returncode != 0:
        raise SteeringError(f"tc {' '.join(args)}: {res.stderr.strip()}")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
