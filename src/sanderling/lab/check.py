"""`sanderling lab check`: every pod probes every other pod (ICMP and each containerPort), over
each family both pods have (IPv6 on a dual-stack or IPv6-only lab: `icmp6`, `tcp6/8080`)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    key: str
    ip: str  # its IPv4 address ("" on an IPv6-only lab)
    sandbox: str
    probes: tuple[tuple[str, int], ...]  # ("icmp", 0), ("tcp", 8080), ...
    ip6: str = ""  # its IPv6 address (status.podIPs), dual-stack or IPv6-only

    def families(self, other: Target) -> list[str]:
        """The addresses of `other` this pod probes: one per family both have."""
        return [dst for mine, dst in ((self.ip, other.ip), (self.ip6, other.ip6)) if mine and dst]


def targets(pods: list[dict[str, Any]], node_netns: dict[str, str]) -> list[Target]:
    out = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        if status.get("phase") != "Running" or not status.get("podIP") or spec.get("hostNetwork"):
            continue  # (a host-network pod, the agent's, has no sandbox to probe from)
        ports = [("tcp" if p.get("protocol", "TCP") == "TCP" else p["protocol"].lower(), int(p["containerPort"]))
                 for c in spec.get("containers") or [] for p in c.get("ports") or []]
        prefix = node_netns.get(spec.get("nodeName", ""), "")
        ips = [e.get("ip") or "" for e in status.get("podIPs") or []] or [status["podIP"]]
        ip6 = next((ip for ip in ips if ":" in ip), "")
        out.append(Target(f"{meta['namespace']}/{meta['name']}", next((ip for ip in ips if ip and ":" not in ip), ""),
                          f"{prefix}-{meta['namespace']}-{meta['name']}"[:60], (("icmp", 0), *ports), ip6))
    return out


def probe(src: Target, dst_ip: str, proto: str, port: int) -> bool:
    if proto == "icmp":
        # a second echo request if the first got no answer: in overlay mode OVS's userspace tunnel
        # drops the very first packet to a node whose underlay MAC it has not resolved yet (it sends
        # the ARP itself); ICMP goes first, so the port probes after it find the path resolved
        argv = ["sh", "-c", f"ping -c 1 -W 1 {dst_ip} || ping -c 1 -W 1 {dst_ip}"]
    else:
        argv = [sys.executable, "-m", "sanderling.probe", "connect", proto, dst_ip, str(port), "--timeout", "1"]
    return subprocess.run(["ip", "netns", "exec", src.sandbox, *argv], capture_output=True).returncode == 0


def matrix(pods: list[Target]) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    jobs = [(s, d, ip, proto, port) for s in pods for d in pods if s is not d for ip in s.families(d)
            for proto, port in d.probes]
    icmp = [j for j in jobs if j[3] == "icmp"]
    ports = [j for j in jobs if j[3] != "icmp"]
    jobs = icmp + ports
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda j: probe(j[0], *j[2:]), icmp)) + \
            list(pool.map(lambda j: probe(j[0], *j[2:]), ports))
    out: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for (s, d, ip, proto, port), ok in zip(jobs, results, strict=True):
        family = "6" if ":" in ip else ""
        out.setdefault((s.key, d.key), []).append((proto + family if proto == "icmp" else f"{proto}{family}/{port}",
                                                   ok))
    return out
