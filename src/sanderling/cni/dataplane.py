"""What the CNI handler needs from the node's dataplane, and nothing more.

The agent implements it (`agent.pod_flows.PodFlows`); the CNI layer never imports the agent. A
pod's flows are named by its key (`PodPort.key`).
"""

from __future__ import annotations

from typing import Protocol


class PodDataplane(Protocol):
    @property
    def target(self) -> str:
        """The OpenFlow target, for error messages."""
        ...

    def connected(self) -> bool:
        """The agent holds its OpenFlow session to the bridge (ADDs wait for it)."""
        ...

    async def converge(self) -> None:
        """Take every pod port now in OVSDB into account and return once the switch has the
        result (raises ConnectionLost when not connected)."""
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
