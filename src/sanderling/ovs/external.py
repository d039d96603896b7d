"""The external bridge: OVS plumbing for an operator's SDN controller, and nothing more.

In the OpenDaylight COE layout a node has `br-int`, programmed by Sanderling, and `br-ext`,
programmed by the site's own controller, joined by a patch pair. The agent creates br-ext (its
fail mode, OpenFlow versions and controller targets as configured), the patch pair and the
uplink ports, and keeps them so on every start; it never adds, changes or deletes a flow on
br-ext (the controller owns them; a test dumps them). br-int's side of the patch pair has a
fixed OpenFlow port number (`EXTERNAL_OFPORT`) that the pipeline's flows name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import OvsRuntime

log = logging.getLogger(__name__)

EXTERNAL_OFPORT = 65001     # br-int's end of the patch pair (beside the tunnel's 65000)
INT_PATCH = "patch-ext"     # on br-int, peer of EXT_PATCH
EXT_PATCH = "patch-int"     # on the external bridge
ROLE_KEY = "sanderling.io/role"


@dataclass(frozen=True)
class ExternalBridge:
    name: str
    integration: str
    uplinks: tuple[str, ...] = ()
    controllers: tuple[str, ...] = ()
    fail_mode: str = "secure"
    protocols: tuple[str, ...] = ("OpenFlow13",)
    ssl: tuple[str, ...] = ()          # private key, certificate, CA certificate
    datapath: str = "netdev"

    def setup(self, db: Ovsdb, runtime: OvsRuntime) -> None:
        """The bridge, its controller, uplinks and the patch pair (idempotent; no flows)."""
        db.ensure_bridge(self.name, self.datapath, external_ids={ROLE_KEY: "external"}, fail_mode=self.fail_mode,
                         protocols=self.protocols)
        if self.ssl:
            runtime.vsctl("set-ssl", *self.ssl)
        # the controller is reached through the node's own network, never through br-ext: no
        # in-band control (OVS's hidden flows would otherwise take ARP to and from the controller's
        # address for the bridge's LOCAL port)
        runtime.vsctl("set", "Bridge", self.name, "other_config:disable-in-band=true")
        if self.controllers:
            runtime.vsctl("set-controller", self.name, *self.controllers)
        else:
            runtime.vsctl("del-controller", self.name)
        db.add_port(self.integration, INT_PATCH, iface_type="patch", options={"peer": EXT_PATCH},
                    ofport_request=EXTERNAL_OFPORT)
        db.add_port(self.name, EXT_PATCH, iface_type="patch", options={"peer": INT_PATCH})
        for uplink in self.uplinks:
            db.add_port(self.name, uplink, external_ids={ROLE_KEY: "external-uplink"})
        log.info("external bridge %s: controller %s, fail mode %s, %s, uplinks %s, patch %s<->%s (no flows of ours)",
                 self.name, ", ".join(self.controllers) or "none", self.fail_mode, ",".join(self.protocols),
                 ", ".join(self.uplinks) or "none", INT_PATCH, EXT_PATCH)
