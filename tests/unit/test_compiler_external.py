"""br-int's flows for the external bridge (golden), and the external bridge's settings checked together."""

from __future__ import annotations

import pytest

from sanderling.agent import config
from sanderling.compiler.external import external_flows
from sanderling.model.network import NodeNetwork
from sanderling.openflow.pipeline import PIPELINE

NODE = NodeNetwork.build("node-1", "10.244.1.0/24")


def test_external_flows_golden():
    flows = external_flows(NODE, ("0.0.0.0/0", "203.0.113.0/24"), ("10.244.0.0/16", "172.30.0.11/32"))
    assert PIPELINE["Classifier"] == 0 and PIPELINE["UnSNAT"] == 3 and PIPELINE["L3Forwarding"] == 17
    assert sorted(f.text(cookie=0) for f in flows) == sorted([
        # in through the patch port: outside traffic, addressed to the gateway whatever its L2 header
        "table=0,priority=200,in_port=65001 actions=load:0x3->NXM_NX_REG0[0..3],"
        "set_field:0a:58:0a:f4:00:01->dl_dst,goto_table:3",
        # out: every external CIDR to the patch port (65001 = 0xfde9)...
        "table=17,priority=30,ip,dl_dst=0a:58:0a:f4:00:01 actions=load:0xfde9->NXM_NX_REG1[],goto_table:18",
        "table=17,priority=30,ip,dl_dst=0a:58:0a:f4:00:01,nw_dst=203.0.113.0/24 "
        "actions=load:0xfde9->NXM_NX_REG1[],goto_table:18",
        # ...except pod, service and node addresses, which go to the node (LOCAL, 0xfffe)
        "table=17,priority=40,ip,dl_dst=0a:58:0a:f4:00:01,nw_dst=10.244.0.0/16 "
        "actions=load:0xfffe->NXM_NX_REG1[],goto_table:18",
        "table=17,priority=40,ip,dl_dst=0a:58:0a:f4:00:01,nw_dst=172.30.0.11 "
        "actions=load:0xfffe->NXM_NX_REG1[],goto_table:18",
    ])


@pytest.mark.parametrize("flags,said", [
    (["--external-uplink", "eth1"], "external-uplink: set external-bridge too"),
    (["--external-bridge", "br-int"], "external-bridge: 'br-int' is the integration bridge"),
    (["--external-bridge", "br-ext", "--external-controller", "udp:1.2.3.4:6653"], "is not tcp:IP:PORT or ssl"),
    (["--external-bridge", "br-ext", "--external-controller", "ssl:1.2.3.4:6653"], "needs external-ssl"),
    (["--external-bridge", "br-ext", "--external-protocols", "OpenFlow13,OpenFlow99"], "'OpenFlow99' is not one"),
    (["--external-bridge", "br-ext", "--external-ssl", "key.pem"], "give three files"),
    (["--external-bridge", "br-ext", "--external-cidrs", "203.0.113.0/33"], "is not an IPv4 CIDR"),
])
def test_external_bridge_settings_are_checked_together(flags, said):
    with pytest.raises(config.ConfigError, match=said.replace("(", r"\(")):
        config.load(["--node", "n1", *flags])


def test_a_complete_external_bridge_configuration_loads():
    cfg = config.load(["--node", "n1", "--external-bridge", "br-ext", "--external-uplink", "eth1",
                       "--external-controller", "tcp:192.0.2.1:6653", "--external-controller", "tcp:192.0.2.2:6653",
                       "--external-fail-mode", "standalone", "--external-cidrs", "198.51.100.0/24"])
    assert (cfg.external_controller, cfg.external_fail_mode) == (["tcp:192.0.2.1:6653", "tcp:192.0.2.2:6653"],
                                                                 "standalone")


def test_masquerade_golden():
    import ipaddress

    flows = external_flows(NODE, ("0.0.0.0/0",), (), ipaddress.IPv4Address("10.244.1.254"))
    assert sorted(f.text(cookie=0) for f in flows) == sorted([
        "table=0,priority=200,in_port=65001 actions=load:0x3->NXM_NX_REG0[0..3],"
        "set_field:0a:58:0a:f4:00:01->dl_dst,goto_table:3",
        # pods' connections out: committed in the SNAT zone (65521) with the node's masquerade address
        "table=17,priority=30,ip,dl_dst=0a:58:0a:f4:00:01 actions=load:0xfde9->NXM_NX_REG1[],"
        "ct(commit,zone=65521,table=18,nat(src=10.244.1.254))",
        # their answers get the pod's address back before anything else
        "table=3,priority=210,ip,in_port=65001,nw_dst=10.244.1.254 actions=ct(zone=65521,table=4,nat)",
        # connections from outside are committed untranslated: the pod answers with its own address
        "table=3,priority=205,ip,in_port=65001 actions=ct(commit,zone=65521,table=4)",
    ])
