"""What the CNI handler needs from the node's dataplane, and nothing more.

The agent implements it (`agent.pod_flows.PodFlows`); the CNI layer never imports the agent. A
pod's flows are named by its key (`PodPort.key`).
"""

from __future__ import annotations

from typing import Protocol

from sanderling.model.network import PodPort


class PodDataplane(Protocol):
    @property
    def target(self) -> str:
        """The OpenFlow target, for error messages."""
        ...

    def connected(self) -> bool:
        """The agent holds its OpenFlow session to the bridge (ADDs wait for it)."""
        ...

    def expect(self, pod: PodPort) -> None:
        """A pod being plugged: its flows go in with the next converge, before its OVS port
        exists (OVSDB, once it has the port, describes the same pod)."""
        ...

    def withdraw(self, key: str) -> None:
        """The ADD of this pod is over (done or undone): OVSDB alone says whether it is there."""
        ...

    async def converge(self) -> None:
        """Take every pod port now in OVSDB into account and return once the switch has the
        result (raises ConnectionLost when not connected)."""
        ...

    def forget_port(self, name: str) -> None:
        """Port `name` is about to be added: what the switch said of an earlier port of that name
        no longer counts."""
        ...

    async def port_opened(self, name: str, ofport: int) -> None:
        """Return once the switch reports port `name` added at `ofport` (OpenFlow port-status
        messages, sent as ovs-vswitchd opens each port, well before it writes OVSDB for the whole
        batch). Never returns while not connected, nor for a port opened elsewhere: callers race
        it with OVSDB, which has the last word."""
        ...

    def installed(self, key: str) -> bool:
        """The pod's flows are on the switch."""
        ...

    def problem(self, key: str) -> str | None:
        """Why the pod's flows were refused (by the model or the switch), if they were."""
        ...

    async def classifies(self, ofport: int) -> bool:
        """The switch's classifier table has a flow for this port (CNI CHECK reads the switch)."""
        ...
