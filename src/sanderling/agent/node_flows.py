"""The node's own flows: the pipeline's static tables, the gateway, the tunnel, other nodes.

One producer of the sync loop, owning the `node/` namespace. The static part depends only on the
node's network and mode, so it is compiled once; other nodes' destinations change with the
cluster view (`set_remotes`) and each one is compiled once per state.
"""

from __future__ import annotations

import ipaddress

from sanderling.agent.sync import SyncLoop
from sanderling.compiler import node_objects
from sanderling.compiler.external import external_flows
from sanderling.model.network import NodeNetwork
from sanderling.model.nodes import Remote
from sanderling.openflow.ir import Flow

EXTERNAL_KEY = "node/external"


class NodeFlows:
    def __init__(self, node: NodeNetwork, sync: SyncLoop, gateway: bool = False, mode: str = "routed") -> None:
        self.node = node
        self.mode = mode
        self.desired = sync.scope("node/")
        for key, flows in node_objects.base_objects(node, gateway, mode).items():
            self.desired.set_object(key, flows)
        self.remotes: list[Remote] = []
        self._remote_flows: dict[Remote, list[Flow]] = {}
        self._external: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._external_flows: list[Flow] | None = None
        self._masquerade: ipaddress.IPv4Address | None = None

    def set_external(self, cidrs: tuple[str, ...], inside: tuple[str, ...],
                     masquerade: ipaddress.IPv4Address | None = None) -> None:
        """Routes through the external bridge's patch port: `cidrs` out, `inside` (pod and service
        CIDRs, this node's addresses) never; the other nodes' addresses are added from the remotes."""
        self._external = (cidrs, inside)
        self._masquerade = masquerade
        self._update_external()

    def _update_external(self) -> None:
        if self._external is None:
            return
        cidrs, inside = self._external
        nodes = tuple(sorted({f"{r.via}/32" for r in self.remotes}))
        flows = external_flows(self.node, cidrs, inside + nodes, self._masquerade)
        if flows != self._external_flows:
            self._external_flows = flows
            self.desired.set_object(EXTERNAL_KEY, flows)

    def set_remotes(self, remotes: list[Remote]) -> None:
        """Other nodes' destinations changed (from the API): compile what changed."""
        self.remotes = remotes
        flows = {r: self._remote_flows.get(r) or node_objects.remote_object(self.node, r, self.mode)[1]
                 for r in remotes}
        keys = {node_objects.remote_key(r) for r in flows}
        for gone in self._remote_flows.keys() - flows.keys():
            if node_objects.remote_key(gone) not in keys:
                self.desired.remove_object(node_objects.remote_key(gone))
        for remote, remote_flows in flows.items():
            if self._remote_flows.get(remote) is not remote_flows:
                self.desired.set_object(node_objects.remote_key(remote), remote_flows)
        self._remote_flows = flows
        self._update_external()
