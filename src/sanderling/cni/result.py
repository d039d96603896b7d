"""The ADD success result in the shape of the requested CNI version, and prevResult merging."""

from __future__ import annotations

from typing import Any


def add_result(version: str, host_if: str, host_mac: str, ifname: str, mac: str, netns: str, address: str,
               gateway: str, prev: dict[str, Any] | None = None,
               ipv6: tuple[str, str] | None = None) -> dict[str, Any]:
    """Our interfaces and addresses appended to a chained prevResult (or a fresh result);
    `ipv6`: a dual-stack pod's (address, gateway)."""
    prev = dict(prev or {})
    interfaces = list(prev.get("interfaces") or [])
    ips = list(prev.get("ips") or [])
    routes = list(prev.get("routes") or [])
    base = len(interfaces)
    interfaces += [{"name": host_if, "mac": host_mac}, {"name": ifname, "mac": mac, "sandbox": netns}]
    for family, (addr, gw) in (("4", (address, gateway)), ("6", ipv6 or ("", ""))):
        if not addr:
            continue
        ip: dict[str, Any] = {"address": addr, "gateway": gw, "interface": base + 1}
        if version == "0.4.0":
            ip = {"version": family, **ip}
        ips.append(ip)
        default = "0.0.0.0/0" if family == "4" else "::/0"
        if not any(r.get("dst") == default for r in routes):
            routes.append({"dst": default, "gw": gw})
    return {"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes,
            "dns": prev.get("dns") or {}}
