"""NodePorts on the node's own addresses reach br-int from outside (see netlink/nodeport.py).

A producer of the sync loop owning the `steered/` namespace: for each node address NodePorts
answer on (IPv4 and IPv6), a tc filter on the interface holding it steers NodePort traffic into br-int, and a
flow on br-int takes it from that interface's uplink port. Health-check ports of Services with
externalTrafficPolicy Local are answered by the node itself, so they are kept out of the filter;
they change at any time, so updates are serialized and only a changed set re-steers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sanderling.agent.sync import SyncLoop
from sanderling.compiler.nodes import steered_uplink_flows
from sanderling.model.network import NodeNetwork
from sanderling.netlink import nodeport

log = logging.getLogger(__name__)


class NodePortSteering:
    def __init__(self, cfg: Any, node: NodeNetwork, sync: SyncLoop, netns: str | None, bridge: str) -> None:
        self.cfg = cfg
        self.node = node
        self.netns = netns
        self.bridge = bridge
        self.desired = sync.scope("steered/")
        self._lock = asyncio.Lock()
        self._kept: tuple[int, ...] | None = None  # the health-check ports the filters keep local now

    async def steer(self, keep: tuple[int, ...] = ()) -> None:
        """(Re)install the filters keeping `keep` local; nothing to do if they already do."""
        async with self._lock:
            if keep == self._kept:
                return
            self._kept = keep
            for ip in (*self.cfg.node_port_ips, *self.cfg.node_port_ips6):
                try:
                    ifname, mac = await asyncio.to_thread(nodeport.interface_of, self.netns, str(ip))
                    await asyncio.to_thread(nodeport.steer, self.netns, ifname, str(ip), self.bridge, keep=keep)
                except (nodeport.SteeringError, OSError) as exc:
                    log.error("node %s: NodePorts on %s not reachable from outside: %s", self.cfg.node_name, ip, exc)
                    continue
                self.desired.set_object(f"steered/{ifname}", steered_uplink_flows(self.node, mac))
                log.info("node %s: NodePorts on %s (%s, %s) steered into %s%s", self.cfg.node_name, ip, ifname, mac,
                         self.bridge, f", health check ports {list(keep)} kept local" if keep else "")
