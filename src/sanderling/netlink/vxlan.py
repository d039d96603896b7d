"""Kernel VXLAN devices for layer2 secondary networks: one per network, flooding to every node.

The kernel's VXLAN routes by the node's own routing table, so a layer2 network crosses nodes the
same way in routed and in overlay mode (OVS's userspace tunnels would need the underlay address
on an OVS bridge). Unknown and broadcast frames go to every other node (all-zero FDB entries);
unicast follows the MACs the device learned from what arrived.
"""

from __future__ import annotations

import errno

from pyroute2.netlink.exceptions import NetlinkError

from sanderling.netlink.netns import ipr

FLOOD = "00:00:00:00:00:00"


def device_name(vni: int) -> str:
    return f"slx{vni:06x}"  # <= 15 characters; `slx` keeps it apart from pod veths (`sl` + 12 hex)


def ensure(netns: str | None, vni: int, port: int, mtu: int) -> str:
    name = device_name(vni)
    with ipr(netns, reuse=True) as h:
        if not h.link_lookup(ifname=name):
            try:
                h.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port, vxlan_learning=1,
                       vxlan_ttl=64)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        idx = h.link_lookup(ifname=name)[0]
        h.link("set", index=idx, mtu=mtu, state="up")
    return name


def remove(netns: str | None, vni: int) -> None:
    with ipr(netns, reuse=True) as h:
        try:
            h.link("del", ifname=device_name(vni))
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def set_flood(netns: str | None, vni: int, vteps: set[str]) -> None:
    """Exactly `vteps` as the device's flood list."""
    with ipr(netns, reuse=True) as h:
        found = h.link_lookup(ifname=device_name(vni))
        if not found:
            return
        idx = found[0]
        have = set()
        for entry in h.fdb("dump", ifindex=idx):
            if entry.get_attr("NDA_LLADDR") == FLOOD and entry.get_attr("NDA_DST"):
                have.add(entry.get_attr("NDA_DST"))
        for ip in vteps - have:
            h.fdb("append", ifindex=idx, lladdr=FLOOD, dst=ip)
        for ip in have - vteps:
            h.fdb("del", ifindex=idx, lladdr=FLOOD, dst=ip)
