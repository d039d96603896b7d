"""Plug a pod's network namespace into the node: a veth pair, addresses, MAC, MTU and routes.

Idempotent: plumbing an already plumbed pod converges it, unplumbing a missing one is a no-op.
Used by the CNI server and by the demo/tests that stand pods up without a runtime.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute, netns


class PlumbingError(RuntimeError):
    """The kernel refused a step; the message names the interface and the namespace."""


@dataclass(frozen=True)
class PodInterface:
    netns: str
    host_ifname: str
    ip_cidr: str  # e.g. 10.244.1.5/24
    mac: str
    gateway: str
    ifname: str = "eth0"
    mtu: int = 1500


def ensure_netns(name: str) -> None:
    if name not in netns.listnetns():
        netns.create(name)


def delete_netns(name: str) -> None:
    if name in netns.listnetns():
        netns.remove(name)


def _ethtool_tx_off(ifname: str, ns: str | None) -> None:
    """The userspace datapath does not fill in checksums a veth left to offload."""
    argv = ["ethtool", "-K", ifname, "tx", "off"]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    subprocess.run(argv, check=False, capture_output=True)


def plumb(pod: PodInterface, node_netns: str | None = None, tx_checksum_off: bool = True) -> None:
    """Create (or converge) the pod's veth: host end in the node's namespace (None: this one)."""
    ensure_netns(pod.netns)
    peer_tmp = f"p{os.getpid() % 100000}{abs(hash(pod.host_ifname)) % 10000}"[:15]
    try:
        with (IPRoute(netns=node_netns) if node_netns else IPRoute()) as host:
            if not host.link_lookup(ifname=pod.host_ifname):
                host.link("add", ifname=pod.host_ifname, kind="veth", peer={"ifname": peer_tmp, "net_ns_fd": pod.netns})
            idx = host.link_lookup(ifname=pod.host_ifname)[0]
            host.link("set", index=idx, mtu=pod.mtu, state="up")
        with IPRoute(netns=pod.netns) as inner:
            lo = inner.link_lookup(ifname="lo")
            if lo:
                inner.link("set", index=lo[0], state="up")
            found = inner.link_lookup(ifname=pod.ifname) or inner.link_lookup(ifname=peer_tmp)
            if not found:
                raise PlumbingError(f"veth peer of {pod.host_ifname} is missing in netns {pod.netns}")
            idx = found[0]
            inner.link("set", index=idx, state="down")
            inner.link("set", index=idx, ifname=pod.ifname, address=pod.mac, mtu=pod.mtu)
            inner.link("set", index=idx, state="up")
            iface = ipaddress.IPv4Interface(pod.ip_cidr)
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in inner.get_addr(index=idx)}
            if (str(iface.ip), iface.network.prefixlen) not in have:
                inner.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            inner.route("replace", dst="0.0.0.0/0", gateway=pod.gateway, oif=idx)
    except PlumbingError:
        raise
    except Exception as exc:
        raise PlumbingError(f"plumbing {pod.host_ifname} into netns {pod.netns} failed: {exc}") from exc
    if tx_checksum_off:
        _ethtool_tx_off(pod.host_ifname, node_netns)
        _ethtool_tx_off(pod.ifname, pod.netns)


def unplumb(host_ifname: str, node_netns: str | None = None) -> None:
    with (IPRoute(netns=node_netns) if node_netns else IPRoute()) as host:
        found = host.link_lookup(ifname=host_ifname)
        if found:
            host.link("del", index=found[0])
