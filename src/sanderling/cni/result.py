"""The ADD success result in the shape of the requested CNI version, and prevResult merging."""

from __future__ import annotations

from typing import Any


def add_result(version: str, host_if: str, host_mac: str, ifname: str, mac: str, netns: str, address: str,
               gateway: str, prev: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our interfaces and address appended to a chained prevResult (or a fresh result)."""
    prev = dict(prev or {})
    interfaces = list(prev.get("interfaces") or [])
    ips = list(prev.get("ips") or [])
    routes = list(prev.get("routes") or [])
    base = len(interfaces)
    interfaces += [{"name": host_if, "mac": host_mac}, {"name": ifname, "mac": mac, "sandbox": netns}]
    ip: dict[str, Any] = {"address": address, "gateway": gateway, "interface": base + 1}
    if version == "0.4.0":
        ip = {"version": "4", **ip}
    ips.append(ip)
    if not any(r.get("dst") == "0.0.0.0/0" for r in routes):
        routes.append({"dst": "0.0.0.0/0", "gw": gateway})
    return {"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes,
            "dns": prev.get("dns") or {}}
