"""`sanderling trace SRC DST`: why a new connection from a pod arrives or not, in Kubernetes terms.

Names are resolved through the Kubernetes API (the sending pod, its node; a destination pod,
a Service's ClusterIP and port, or an address). The source node's agent traces the packet
through its br-int (`/trace` on its status endpoint: agent/trace.py) and names every stage:
spoof guard, Service load balancing (which Service, which endpoint: the one ClientIP affinity
pinned, else the one the trace's hash picked among the group's buckets; refused at once without
endpoints), NetworkPolicy (the rule that allowed it, or the pod whose default deny refused it),
forwarding. A packet sent to another node is traced again by that node's agent, as it arrives:
from the underlay through the node's kernel (routed mode) or out of the VXLAN tunnel from the
sending node's address (overlay mode); the source node's answer says which way it left.

How the agents are reached is the caller's: `http_agents` asks each node's InternalIP on the
agents' status port (their `status-address` must listen there, e.g. 0.0.0.0:9465); the lab asks
inside each node's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

AskAgent = Callable[[str, dict[str, str]], dict[str, Any]]  # (node, params) -> the agent's /trace answer


class TraceError(Exception):
    """Bad input (unknown pod, pod on no node, ...) or an agent that cannot answer: one line."""


@dataclass
class Result:
    verdict: str  # delivered, dropped, refused, forwarded (left the cluster or the traced part)
    reason: str
    stages: list[tuple[str, str, str]]  # (node, stage, what happened)
    endpoint: str | None = None  # the Service endpoint the connection went to
    hops: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reason": self.reason, "endpoint": self.endpoint,
                "stages": [{"node": n, "stage": s, "detail": d} for n, s, d in self.stages], "hops": self.hops}


def node_internal_ip(api: Any, node: str, purpose: str = "") -> str:
    """The node's InternalIP from its Node object (where its agent listens, where its tunnels start)."""
    from lightkube.resources.core_v1 import Node

    obj = api.get(Node, node)
    address = next((a.address for a in (obj.status.addresses or []) if a.type == "InternalIP"), None)
    if address is None:
        raise TraceError(f"node {node} has no InternalIP{purpose}")
    return str(address)


def http_agents(api: Any, port: int = 9465, timeout: float = 30.0) -> AskAgent:
    """Ask each node's agent over HTTP at its InternalIP."""

    def ask(node: str, params: dict[str, str]) -> dict[str, Any]:
        address = node_internal_ip(api, node, ": its agent cannot be asked")
        url = f"http://{address}:{port}/trace?" + urllib.parse.urlencode(params)
        try:
            body = urllib.request.urlopen(url, timeout=timeout).read().decode()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
        except OSError as exc:
            raise TraceError(f"the agent of {node} did not answer on {address}:{port} ({exc}); its "
                             "status-address must listen on the node's address") from None
        answer: dict[str, Any] = json.loads(body)
        return answer
    return ask


class Tracer:
    def __init__(self, api: Any, ask: AskAgent, nodes: set[str] | None = None) -> None:
        self.api = api
        self.ask = ask
        self.nodes = nodes  # the nodes there are (the lab's), or None: any node the API names

    # ---- names -----------------------------------------------------------------------------------

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
        if self.nodes is not None and node not in self.nodes:
            raise TraceError(f"pod {ns}/{name} is bound to {node}, which is not a node of this cluster "
                             f"({', '.join(sorted(self.nodes))})")
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            raise TraceError(f"pod {ns}/{name} has no address yet (status.podIP is empty)")
        return {"key": f"{ns}/{name}", "node": node, "ip": ip}

    def node_address(self, node: str) -> str:
        return node_internal_ip(self.api, node)

    def destination(self, ref: str, port: int | None, src_node: str = "") -> tuple[str, int | None, str]:
        """(IP, port, what it is) of DST: NS/POD, svc/NS/NAME (its ClusterIP and first port),
        nodeport/NS/NAME[@NODE] (a node's address, the source's by default, and the Service's first
        nodePort) or an IP."""
        from lightkube.resources.core_v1 import Service

        try:
            return str(ipaddress.IPv4Address(ref)), port, ref
        except ValueError:
            pass
        if ref.startswith("nodeport/"):
            spec, _, node = ref[len("nodeport/"):].partition("@")
            ns, _, name = spec.rpartition("/")
            svc = self._get(Service, "Service", ns, name)
            node_ports = [p["nodePort"] for p in (svc.get("spec") or {}).get("ports") or [] if p.get("nodePort")]
            if not node_ports:
                raise TraceError(f"Service {ns}/{name} has no nodePort (type {svc.get('spec', {}).get('type')})")
            return (self.node_address(node or src_node), port if port is not None else node_ports[0],
                    f"nodeport of service {ns}/{name}")
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

    # ---- tracing -----------------------------------------------------------------------------------

    def _ask(self, node: str, params: dict[str, str]) -> dict[str, Any]:
        answer = self.ask(node, params)
        if "error" in answer or "verdict" not in answer:
            raise TraceError(f"the agent of {node} could not trace: {answer.get('error', answer)}")
        return answer

    def trace(self, src_ref: str, dst_ref: str, proto: str = "tcp", port: int | None = None,
              source_ip: str | None = None) -> Result:
        src = self.pod(src_ref)
        dst_ip, dport, what = self.destination(dst_ref, port, src["node"])
        if proto != "icmp" and dport is None:
            raise TraceError(f"{what}: say which port (--port)")
        node = src["node"]
        params = {"pod": src["key"], "src": source_ip or src["ip"], "dst": dst_ip, "proto": proto,
                  "port": str(dport or 0)}
        first = self._ask(node, params)
        stages = [tuple(s) for s in first["stages"]]
        hops = list(first["hops"])
        verdict, reason, endpoint, delivered = first["verdict"], first["reason"], first["endpoint"], first["delivered"]
        if verdict == "forwarded":
            target_ip, target_port = dst_ip, dport
            if endpoint is not None:
                target_ip, _, p = endpoint.partition(":")
                target_port = int(p) if p else dport
            target = self.pod_by_ip(target_ip)
            if target is None or not target.get("node"):
                why = "no pod has that address: it leaves the cluster"
                stages.append((node, "forwarding", f"left {node} for {target_ip} ({why})"))
                return Result("forwarded", why, stages, endpoint, hops)  # type: ignore[arg-type]
            there = target["node"]
            # what leaves this node: its source masqueraded (e.g. a NodePort), or the pod's own
            sent_from = first.get("source_after") or source_ip or src["ip"]
            arrival = {"arrival": "underlay"}
            how = f"arrives on {there} from {node} over the underlay (routed)"
            if first.get("leaves") == "tunnel":
                tunnel_src = self.node_address(node)
                arrival = {"arrival": "tunnel", "tunnel_src": tunnel_src}
                how = f"arrives on {there} out of the VXLAN tunnel from {node} ({tunnel_src})"
            second = self._ask(there, {**arrival, "src": sent_from, "dst": target_ip,
                                       "proto": proto, "port": str(target_port or 0)})
            verdict, reason, delivered = second["verdict"], second["reason"], second["delivered"]
            stages += [(there, "arrival", how)] + [tuple(s) for s in second["stages"]]
            hops += second["hops"]
        last = stages[-1][0] if stages else node
        stages.append((last, "verdict", f"delivered to pod {delivered}" if verdict == "delivered"
                       else f"{verdict}: {reason}"))
        return Result(verdict, reason, stages, endpoint, hops)  # type: ignore[arg-type]
