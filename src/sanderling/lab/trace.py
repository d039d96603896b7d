"""`sanderling lab trace SRC DST`: why a packet arrives or not, said in Kubernetes terms.

The packet a pod would send (the first packet of a new connection) goes through `ofproto/trace`
on the source node's br-int, conntrack answering "new"; every flow it hits is named by its owner
(the agent's /owners: cookie -> pod, Service, NetworkPolicy rule, isolated pod), and the hops
become stages: spoof guard, Service load balancing (which Service, which endpoint: the one
ClientIP affinity pinned, else the one the trace's hash picked among the group's buckets),
NetworkPolicy (the rule that allowed it, or the pod whose default deny refused it), forwarding
(local pod, other node) and the verdict. A packet routed to another node is traced again there,
as it arrives from the underlay (routed mode).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanderling.agent.owners import describe
from sanderling.lab import agent_status
from sanderling.lab.cluster import Lab
from sanderling.model.network import mac_for_ip
from sanderling.openflow.pipeline import PIPELINE
from sanderling.ovs.runtime import OvsRuntime

# " 5. ct_state=+new+trk,tcp, priority 200, cookie 0x...", " 2. priority 0, cookie 0x..." (a table's
# miss flow: no match), or " 7. No match."
TABLE_LINE = re.compile(r"^\s*(\d+)\. (?:(.*?), )?priority (\d+), cookie (0x[0-9a-f]+)$")
NO_MATCH = re.compile(r"^\s*(\d+)\. (No match.*)$")
NAT_DST = re.compile(r"nat\(dst=([0-9.]+)(?::(\d+))?")
OUTPUT = re.compile(r"^\s*output:(\d+)")
SOURCE_PORT = 40000
DP_HASH = 1


class TraceError(Exception):
    """Bad input (unknown pod, pod on no node, ...): one line for the user."""


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


@dataclass
class Result:
    verdict: str  # delivered, dropped, refused
    reason: str
    stages: list[tuple[str, str, str]]  # (node, stage, what happened)
    endpoint: str | None = None  # a Service's endpoint the connection went to
    hops: list[Hop] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "endpoint": self.endpoint,
                "stages": [{"node": n, "stage": s, "detail": d} for n, s, d in self.stages],
                "hops": [{"node": h.node, "table": h.table, "owner": h.owner, "match": h.match,
                          "actions": h.actions} for h in self.hops]}


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
                stages.append((hop.node, "forwarding", f"to another node ({hop.match})"))
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


class Tracer:
    def __init__(self, lab: Lab) -> None:
        from sanderling.kube.client import KubeApi

        self.lab = lab
        self.state = lab.state()
        self.api: Any = KubeApi(lab.kubeconfig).client
        self.nodes = {n["name"]: n for n in self.state["nodes"]}

    # ---- resolving names ---------------------------------------------------------------------

    def _get(self, resource: Any, kind: str, ns: str, name: str) -> dict[str, Any]:
        from lightkube import ApiError

        try:
            obj: dict[str, Any] = self.api.get(resource, name, namespace=ns).to_dict()
            return obj
        except ApiError as exc:
            if exc.status.code == 404:
                raise TraceError(f"no {kind} {ns}/{name} in the cluster") from None
            raise

    def pod(self, ref: str) -> dict[str, Any]:
        from lightkube.resources.core_v1 import Pod

        ns, _, name = ref.rpartition("/")
        if not ns or not name:
            raise TraceError(f"{ref!r}: name a pod as NAMESPACE/NAME")
        pod = self._get(Pod, "pod", ns, name)
        node = (pod.get("spec") or {}).get("nodeName")
        if not node:
            raise TraceError(f"pod {ns}/{name} is on no node yet (not scheduled): nothing sends from it")
        if node not in self.nodes:
            raise TraceError(f"pod {ns}/{name} is bound to {node}, which is not a node of lab {self.lab.name} "
                             f"({', '.join(sorted(self.nodes))})")
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            raise TraceError(f"pod {ns}/{name} has no address yet (status.podIP is empty)")
        return {"key": f"{ns}/{name}", "node": node, "ip": ip}

    def destination(self, ref: str, port: int | None) -> tuple[str, int | None, str]:
        """(IP, port, what it is) of DST: NS/POD, svc/NS/NAME (its ClusterIP and first port) or an IP."""
        from lightkube.resources.core_v1 import Service

        try:
            return str(ipaddress.IPv4Address(ref)), port, ref
        except ValueError:
            pass
        if ref.startswith(("svc/", "service/")):
            ns, _, name = ref.split("/", 1)[1].rpartition("/")
            svc = self._get(Service, "Service", ns, name)
            vip = (svc.get("spec") or {}).get("clusterIP")
            if not vip or vip == "None":
                raise TraceError(f"Service {ns}/{name} has no ClusterIP (headless): trace a pod instead")
            ports = (svc.get("spec") or {}).get("ports") or []
            return vip, port if port is not None else (ports[0]["port"] if ports else None), f"service {ns}/{name}"
        pod = self.pod(ref)
        return pod["ip"], port, f"pod {pod['key']}"

    def pod_by_ip(self, ip: str) -> dict[str, Any] | None:
        from lightkube.resources.core_v1 import Pod

        for pod in self.api.list(Pod, namespace="*"):
            if pod.status and pod.status.podIP == ip and pod.spec and pod.metadata:
                return {"key": f"{pod.metadata.namespace}/{pod.metadata.name}", "node": pod.spec.nodeName, "ip": ip}
        return None

    # ---- tracing ------------------------------------------------------------------------------

    def _runtime(self, node: str) -> OvsRuntime:
        return OvsRuntime(Path(self.nodes[node]["dir"]) / "ovs", datapath="netdev")

    def _ofport(self, node: str, key: str) -> int:
        ns, name = key.split("/")
        out = self._runtime(node).vsctl("--bare", "--columns=ofport", "find", "Interface",
                                        f"external_ids:sanderling.io/pod-namespace={ns}",
                                        f"external_ids:sanderling.io/pod-name={name}",
                                        "external_ids:sanderling.io/interface=eth0")
        words = out.split()
        if not words:
            raise TraceError(f"pod {key} has no port on {node}'s br-int")
        return int(words[0])

    def _owners(self, node: str) -> dict[int, str]:
        got = agent_status.fetch(self.nodes[node]["netns"], "/owners")
        return {int(c, 16): o for c, o in got.items() if c.startswith("0x")}

    def _gateway_mac(self, node: str) -> str:
        return self.lab._local_node(self.nodes[node], self.state["mode"]).network.gateway_mac

    def _trace(self, node: str, flow: str) -> tuple[list[Hop], str]:
        out = self._runtime(node).appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 6), "br-int", flow)
        return parse(out, node, self._owners(node))

    def trace(self, src_ref: str, dst_ref: str, proto: str = "tcp", port: int | None = None,
              source_ip: str | None = None) -> Result:
        src = self.pod(src_ref)
        dst_ip, dport, what = self.destination(dst_ref, port)
        if proto != "icmp" and dport is None:
            raise TraceError(f"{what}: say which port (--port)")
        node = src["node"]
        gw = self._gateway_mac(node)
        l4 = ("icmp,icmp_type=8,icmp_code=0" if proto == "icmp"
              else f"{proto},{proto}_src={SOURCE_PORT},{proto}_dst={dport}")
        # a select group picks its bucket by the datapath's dp_hash (computed, then recirculated);
        # the trace gets one up front: its pick is one of the endpoints, as any connection's is
        flow = (f"in_port={self._ofport(node, src['key'])},dl_src={mac_for_ip(src['ip'])},dl_dst={gw},"
                f"dp_hash={DP_HASH:#x},{l4},nw_src={source_ip or src['ip']},nw_dst={dst_ip},nw_ttl=64")
        if proto == "tcp":
            flow += ",tcp_flags=0x002"
        hops, final = self._trace(node, flow)
        verdict, reason, stages, endpoint, delivered = explain(hops, final)
        all_hops = list(hops)
        if verdict == "forwarded":
            target_ip, target_port = dst_ip, dport
            if endpoint is not None:
                target_ip, _, p = endpoint.partition(":")
                target_port = int(p) if p else dport
            target = self.pod_by_ip(target_ip)
            if target is None or not target.get("node") or self.state["mode"] != "routed":
                why = ("no pod has that address: it leaves the cluster" if target is None
                       else "overlay mode: the destination node is not traced")
                stages.append((node, "forwarding", f"left {node} for {target_ip} ({why})"))
                return Result("forwarded", why, stages, endpoint, all_hops)
            there = target["node"]
            gw2 = self._gateway_mac(there)
            l4b = ("icmp,icmp_type=8,icmp_code=0" if proto == "icmp"
                   else f"{proto},{proto}_src={SOURCE_PORT},{proto}_dst={target_port}")
            flow2 = (f"in_port=LOCAL,dl_src={gw2},dl_dst={gw2},dp_hash={DP_HASH:#x},{l4b},"
                     f"nw_src={source_ip or src['ip']},nw_dst={target_ip},nw_ttl=63"
                     + (",tcp_flags=0x002" if proto == "tcp" else ""))
            hops2, final2 = self._trace(there, flow2)
            verdict, reason2, stages2, _, delivered = explain(hops2, final2)
            reason = reason2
            stages += [(there, "underlay", f"arrives on {there} from {node}")] + stages2
            all_hops += hops2
        if verdict == "delivered":
            stages.append((stages[-1][0] if stages else node, "verdict", f"delivered to pod {delivered}"))
        else:
            stages.append((stages[-1][0] if stages else node, "verdict", f"{verdict}: {reason}"))
        return Result(verdict, reason, stages, endpoint, all_hops)
