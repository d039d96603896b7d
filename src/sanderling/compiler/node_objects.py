"""One assembly of a node's realizer objects: which compiler makes each object and its key.

The agent (incrementally, object by object), the proxy conformance runner, the pipeline document
and the benchmarks all build a node's flows through these functions, so what they install cannot
drift from what the agent installs. Pure: model in, (key -> flows) out.
"""

from __future__ import annotations

from collections.abc import Iterable

from sanderling.compiler import gateway as gateway_compiler
from sanderling.compiler import nodes as node_compiler
from sanderling.compiler import pods as pod_compiler
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.model.nodes import Remote
from sanderling.openflow.ir import Flow

STATIC_KEY = "node/pipeline"
GATEWAY_KEY = "node/gateway"
TUNNEL_KEY = "node/tunnel"
UPLINK_KEY = "node/uplink"
REMOTE_PREFIX = "node/remote/"


def base_objects(node: NodeNetwork, gateway: bool = False, mode: str = "routed",
                 uplink_ofport: int | None = None) -> dict[str, list[Flow]]:
    """The node's own objects that depend only on its network and configuration."""
    out = {STATIC_KEY: pod_compiler.static_flows(node)}
    if gateway:
        out[GATEWAY_KEY] = gateway_compiler.gateway_flows(node)
    if mode == "overlay":
        out[TUNNEL_KEY] = node_compiler.tunnel_flows(node)
    if uplink_ofport is not None:
        out[UPLINK_KEY] = node_compiler.uplink_flows(node, uplink_ofport)
    return out


def remote_key(remote: Remote) -> str:
    return REMOTE_PREFIX + str(remote.dst)


def remote_object(node: NodeNetwork, remote: Remote, mode: str) -> tuple[str, list[Flow]]:
    return remote_key(remote), node_compiler.remote_flows(node, remote, mode)


def pod_object(node: NodeNetwork, pod: PodPort) -> tuple[str, list[Flow]]:
    return pod.key, pod_compiler.pod_flows(node, pod)


def node_objects(node: NodeNetwork, pods: Iterable[PodPort], gateway: bool = False, mode: str = "routed",
                 remotes: Iterable[Remote] = (), uplink_ofport: int | None = None) -> dict[str, list[Flow]]:
    """Every object of a node from scratch (what the agent converges to for these inputs)."""
    out = base_objects(node, gateway, mode, uplink_ofport)
    out.update(remote_object(node, r, mode) for r in remotes)
    out.update(pod_object(node, p) for p in pods)
    return out
