"""One node's half of a trace: `ofproto/trace` of a packet through this node's br-int, every hit
flow named by its owner (agent/owners.py), and the hops said as stages in Kubernetes terms.

The agent answers it on its status endpoint (`/trace`), so a trace needs no access to the node:
the `sanderling trace` client (tracer.py) resolves names through the API and asks the source
node's agent, then the destination node's when the packet crosses the underlay. The packet is
the first of a new connection (conntrack answers "new" at every ct()).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sanderling.agent.owners import describe
from sanderling.compiler.nodes import TUNNEL_OFPORT
from sanderling.openflow.pipeline import PIPELINE

# " 5. ct_state=+new+trk,tcp, priority 200, cookie 0x...", " 2. priority 0, cookie 0x..." (a table's
# miss flow: no match), or " 7. No match."
TABLE_LINE = re.compile(r"^\s*(\d+)\. (?:(.*?), )?priority (\d+), cookie (0x[0-9a-f]+)$")
NO_MATCH = re.compile(r"^\s*(\d+)\. (No match.*)$")
NAT_SRC = re.compile(r"nat\(src=([0-9.]+)")
NAT_DST = re.compile(r"nat\(dst=([0-9.]+)(?::(\d+))?")
TUN_DST = re.compile(r"set_field:([0-9.]+)->tun_dst")
SOURCE_PORT = 40000
# a select group picks its bucket by the datapath's dp_hash (computed, then recirculated); the
# trace gets one up front: its pick is one of the endpoints, as any connection's is
DP_HASH = 1
PROTOCOLS = ("tcp", "udp", "icmp")


class BadTrace(ValueError):
    """A trace request the agent cannot make (unknown pod, bad address, port)."""


@dataclass
class Hop:
    node: str
    table: str
    owner: str
    match: str
    actions: list[str] = field(default_factory=list)

    @property
    def missed(self) -> bool:
        return self.match.startswith("No match")


def parse(text: str, node: str, known: dict[int, str]) -> tuple[list[Hop], str]:
    """The flows an ofproto/trace hit (in order, across recirculations) and its last datapath
    actions. An action belongs to the innermost flow printed less indented than it (a resubmit's
    flows are nested, and the outer flow's actions go on after them)."""
    hops: list[Hop] = []
    final = ""
    stack: list[tuple[int, Hop]] = []
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if line.startswith("Datapath actions:"):
            final = line.split(":", 1)[1].strip()
            continue
        if line.startswith("bridge("):
            stack = []
            continue
        m = TABLE_LINE.match(line) or NO_MATCH.match(line)
        if m:
            table = int(m.group(1))
            name = PIPELINE.name_of(table) if table < len(PIPELINE.tables) else str(table)
            if m.re is NO_MATCH:
                owner, match = "table miss", m.group(2)
            else:
                owner, match = describe(int(m.group(4), 16), known), m.group(2) or "(anything: the table's miss flow)"
            hop = Hop(node, name, owner, match)
            hops.append(hop)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, hop))
        elif stack and indent > 0 and line.strip() and not line.strip().startswith("->"):
            while len(stack) > 1 and stack[-1][0] >= indent:
                stack.pop()
            stack[-1][1].actions.append(line.strip())
    return hops, final


def explain(hops: list[Hop], final: str) -> tuple[str, str, list[tuple[str, str, str]], str | None, str | None]:
    """(verdict, reason, stages, endpoint, pod it was delivered to or None) of one node's trace."""
    stages: list[tuple[str, str, str]] = []
    endpoint = delivered = None
    reason = ""
    for hop in hops:
        acts = " ".join(hop.actions)
        if hop.table == "SpoofGuard":
            if hop.missed or (not hop.actions or acts == "drop"):
                reason = "spoof guard: the source address or MAC is not the sending pod's own"
                stages.append((hop.node, "spoof guard", "dropped: " + reason))
            else:
                stages.append((hop.node, "spoof guard", f"source checked ({hop.owner})"))
        elif hop.table == "ServiceLB" and hop.owner.startswith("service "):
            reject = PIPELINE["Reject"]
            if f"goto_table:{reject}" in acts or f"resubmit(,{reject})" in acts:
                stages.append((hop.node, "service", f"{hop.owner} has no endpoint: refused"))
            else:
                stages.append((hop.node, "service", f"{hop.owner}: new connection load-balanced"))
        elif hop.table == "SessionAffinity" and hop.owner.startswith("service ") and not hop.missed:
            stages.append((hop.node, "service", f"{hop.owner}: ClientIP affinity remembers this client's endpoint"))
        elif hop.table in ("IngressRule", "EgressRule") and not hop.missed:
            direction = "ingress" if hop.table == "IngressRule" else "egress"
            if hop.owner.startswith("networkpolicy "):
                stages.append((hop.node, "networkpolicy", f"allowed by {hop.owner}"))
            elif hop.owner.startswith("isolation of pod ") and "goto_table" not in acts:
                pod = hop.owner[len("isolation of pod "):]
                reason = f"default deny of pod {pod} ({direction}): no NetworkPolicy rule allows it"
                stages.append((hop.node, "networkpolicy", "denied: " + reason))
        elif hop.table == "Reject":
            reason = "the Service has no endpoint: refused at once (TCP reset / ICMP port unreachable)"
            stages.append((hop.node, "service", reason))
        elif hop.table == "L3Forwarding" and not hop.missed:
            if hop.owner.startswith("pod "):
                delivered = hop.owner[len("pod "):]
                stages.append((hop.node, "forwarding", f"to {hop.owner} on this node"))
            elif hop.owner == "node routing":
                tunnel = TUN_DST.search(acts)
                how = f"through the VXLAN tunnel to {tunnel.group(1)}" if tunnel else "over the underlay"
                stages.append((hop.node, "forwarding", f"to another node {how} ({hop.match})"))
        masq = NAT_SRC.search(acts)
        if masq and hop.table == "ServiceMasq":
            stages.append((hop.node, "service", f"masqueraded: source becomes {masq.group(1)}"))
        m = NAT_DST.search(acts)
        if m and endpoint is None and hop.table in ("ServiceLB", "EndpointDNAT", "AffinitySelect", "SessionAffinity"):
            endpoint = f"{m.group(1)}:{m.group(2)}" if m.group(2) else m.group(1)
            stages.append((hop.node, "service", f"DNAT to endpoint {endpoint}"))
    if any(h.table == "Reject" for h in hops):
        return "refused", reason, stages, endpoint, None
    if final == "drop" or not final:
        if not reason:
            last = hops[-1] if hops else None
            reason = f"dropped in table {last.table} ({last.owner})" if last else "dropped"
        return "dropped", reason, stages, endpoint, None
    return "delivered" if delivered else "forwarded", reason, stages, endpoint, delivered


def packet(in_port: str, dl_src: str, dl_dst: str, proto: str, src: str, dst: str, port: int | None,
           ttl: int) -> str:
    """The packet as ofproto/trace takes it: the first of a new connection."""
    l4 = ("icmp,icmp_type=8,icmp_code=0" if proto == "icmp"
          else f"{proto},{proto}_src={SOURCE_PORT},{proto}_dst={port}")
    flow = (f"in_port={in_port},dl_src={dl_src},dl_dst={dl_dst},dp_hash={DP_HASH:#x},{l4},nw_src={src},"
            f"nw_dst={dst},nw_ttl={ttl}")
    return flow + (",tcp_flags=0x002" if proto == "tcp" else "")


class NodeTracer:
    """The agent's /trace: `pods()` gives this node's pod ports (by ofport), `owners()` the
    cookie map, `run(flow)` the ofproto/trace text (a blocking call: run off the event loop)."""

    def __init__(self, node: str, gateway_mac: str, pods: Callable[[], dict[int, Any]],
                 owners: Callable[[], dict[int, str]], run: Callable[[str], str]) -> None:
        self.node = node
        self.gateway_mac = gateway_mac
        self.pods = pods
        self.owners = owners
        self.run = run

    def flow(self, params: dict[str, str]) -> str:
        proto = params.get("proto", "tcp")
        if proto not in PROTOCOLS:
            raise BadTrace(f"proto {proto!r}: one of {', '.join(PROTOCOLS)}")
        try:
            src = str(ipaddress.IPv4Address(params.get("src", "")))
            dst = str(ipaddress.IPv4Address(params.get("dst", "")))
        except ValueError as exc:
            raise BadTrace(f"src and dst must be IPv4 addresses: {exc}") from None
        port = None
        if proto != "icmp":
            try:
                port = int(params.get("port", ""))
            except ValueError:
                raise BadTrace(f"port {params.get('port')!r} is not a number") from None
            if not 1 <= port <= 65535:
                raise BadTrace(f"port {port} is out of range (1-65535)")
        if params.get("arrival") == "underlay":  # routed from another node: through the host, into LOCAL
            return packet("LOCAL", self.gateway_mac, self.gateway_mac, proto, src, dst, port, 63)
        if params.get("arrival") == "tunnel":  # out of VXLAN from the sending node, to the gateway MAC
            try:
                tunnel_src = str(ipaddress.IPv4Address(params.get("tunnel_src", "")))
            except ValueError as exc:
                raise BadTrace(f"tunnel_src must be the sending node's IPv4 address: {exc}") from None
            inner = packet(str(TUNNEL_OFPORT), self.gateway_mac, self.gateway_mac, proto, src, dst, port, 64)
            return f"tun_id=0x0,tun_src={tunnel_src},{inner}"
        ns, _, name = params.get("pod", "").partition("/")
        pod = next((p for p in self.pods().values() if (p.namespace, p.name, p.interface) == (ns, name, "eth0")),
                   None)
        if pod is None:
            raise BadTrace(f"pod {ns}/{name} has no port on node {self.node}")
        return packet(str(pod.ofport), pod.mac, self.gateway_mac, proto, src, dst, port, 64)

    async def handle(self, params: dict[str, str]) -> dict[str, Any]:
        flow = self.flow(params)
        text = await asyncio.to_thread(self.run, flow)
        hops, final = parse(text, self.node, self.owners())
        verdict, reason, stages, endpoint, delivered = explain(hops, final)
        masq = next((m.group(1) for h in hops if h.table == "ServiceMasq"
                     for m in [NAT_SRC.search(" ".join(h.actions))] if m), None)
        tunnel = next((m.group(1) for h in hops if h.table == "L3Forwarding"
                       for m in [TUN_DST.search(" ".join(h.actions))] if m), None)
        leaves = None if verdict != "forwarded" else ("tunnel" if tunnel else "underlay")
        return {"node": self.node, "verdict": verdict, "reason": reason, "endpoint": endpoint,
                "delivered": delivered, "source_after": masq, "leaves": leaves, "tunnel_dst": tunnel,
                "stages": [list(s) for s in stages],
                "hops": [{"node": h.node, "table": h.table, "owner": h.owner, "match": h.match,
                          "actions": h.actions} for h in hops]}
