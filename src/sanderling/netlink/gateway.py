"""The node side of the pod gateway: address the bridge's LOCAL interface, turn on forwarding."""

from __future__ import annotations

import errno
import ipaddress

from pyroute2.netlink.exceptions import NetlinkError

from sanderling.netlink.netns import ipr, run_in_netns


def _forwarding_on() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    # The node owns the gateway address; with the default arp_ignore=0 its kernel would also answer
    # a pod's ARP for it on the pod's veth, racing the OVS ARP responder with the veth's MAC (and
    # winning: frames to that MAC are then not routed). Answer only on the interface owning the IP.
    for scope in ("all", "default"):
        with open(f"/proc/sys/net/ipv4/conf/{scope}/arp_ignore", "w") as f:
            f.write("1")


def _forwarding6_on() -> None:
    with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
        f.write("1")


def ensure_gateway(ifname: str, ip_cidr: str, mac: str, node_netns: str | None = None, ip6_cidr: str = "") -> None:
    """ifname (the bridge's LOCAL port) gets the gateway MAC and address (on a dual-stack node
    also the IPv6 gateway address), comes up, and the node forwards IPv4 (and IPv6): it routes
    between pods and the underlay."""
    with ipr(node_netns) as h:
        idx = h.link_lookup(ifname=ifname)
        if not idx:
            raise RuntimeError(f"gateway interface {ifname} does not exist in {node_netns or 'this namespace'}")
        h.link("set", index=idx[0], address=mac, state="up")
        for cidr in filter(None, (ip_cidr, ip6_cidr)):
            iface = ipaddress.ip_interface(cidr)
            try:
                h.addr("add", index=idx[0], address=str(iface.ip), prefixlen=iface.network.prefixlen,
                       **({"flags": 0x02} if iface.version == 6 else {}))  # IFA_F_NODAD: ours alone
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
    steps = [_forwarding_on, *([_forwarding6_on] if ip6_cidr else [])]
    for step in steps:
        if node_netns:
            run_in_netns(node_netns, step)
        else:
            step()
