"""A Service on a VLAN network, on a real OVS (dummy datapath): NetworkServices fed as the
informers feed it, the node's SecondaryBridges installing flows and groups, ofproto/trace for the
verdicts: ARP for the virtual IP, DNAT on the endpoint's node, forwarding to another node's
endpoint (back out of the uplink for a host on the VLAN), Reject with no endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sanderling.agent.network_services import NetworkServices
from sanderling.compiler.network_services import static_flows
from sanderling.model.attachments import ANNOTATION_STATUS
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import Ovsdb, PortChange
from sanderling.ovs.runtime import OvsRuntime
from sanderling.ovs.secondary import SecondaryBridges, provider_bridge

PHYSNET = "pnsvc"
UPLINK, UPLINK_OFPORT = "pnsvc-up", 9
VIP, VMAC = "10.1.0.100", "0a:5a:0a:01:00:64"
# name: (ofport (0: another node), address, node, labels)
PODS = {"ep-local": (1, "10.1.0.2", "n1", {"app": "web"}),
        "client": (2, "10.1.0.3", "n1", {"app": "client"}),
        "ep-remote": (0, "10.1.0.20", "n2", {"app": "web"})}
NAD = {"metadata": {"namespace": "ns1", "name": "red"}, "spec": {"config": json.dumps(
    {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": 100, "physicalNetwork": PHYSNET,
     "subnet": "10.1.0.0/24"})}}


def mac(ip: str) -> str:
    return "02:00:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


def pod(name: str, labels: dict | None = None) -> dict:
    _ofport, ip, node, default_labels = PODS[name]
    status = [{"name": "ns1/red", "interface": "net1", "ips": [ip], "mac": mac(ip)}]
    return {"metadata": {"namespace": "ns1", "name": name, "labels": default_labels if labels is None else labels,
                         "annotations": {ANNOTATION_STATUS: json.dumps(status)}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http",
                                                                               "containerPort": 8080}]}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


SERVICE = {"metadata": {"namespace": "ns1", "name": "web", "annotations": {
    "k8s.v1.cni.cncf.io/service-network": "red", "service.sanderling.io/network-ip": VIP}},
    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


@pytest.fixture
def bridges(dummy_ovs: OvsRuntime, dummy_db: Ovsdb) -> Iterator[SecondaryBridges]:
    sb = SecondaryBridges(dummy_db, dummy_ovs, None, {PHYSNET: UPLINK}, datapath="dummy",
                          static_flows=tuple(static_flows(2)))
    bridge = provider_bridge(PHYSNET)
    dummy_db.ensure_bridge(bridge, "dummy")
    dummy_db.add_port(bridge, UPLINK, ofport_request=UPLINK_OFPORT, iface_type="dummy",
                      external_ids={"sanderling.io/uplink": PHYSNET})
    dummy_ovs.ofctl(bridge, "add-meter", "meter=2,pktps,burst,band=type=drop,rate=200,burst_size=50")
    changes = []
    for name, (ofport, ip, node, _labels) in PODS.items():
        if node == "n1":
            ext = {ovsdb.EXT_POD_NAMESPACE: "ns1", ovsdb.EXT_POD_NAME: name, ovsdb.EXT_CONTAINER_ID: f"c-{name}",
                   ovsdb.EXT_INTERFACE: "net1", ovsdb.EXT_NETWORK: "ns1/red", ovsdb.EXT_MAC: mac(ip), ovsdb.EXT_IP: ip}
            changes.append(PortChange(f"pnsvc-{name}", external_ids=tuple(sorted(ext.items())), ofport_request=ofport,
                                      iface_type="dummy", tag=100))
    dummy_db.apply_port_changes(bridge, changes)
    sb.sync_flows(bridge)
    yield sb
    dummy_db.delete_bridge(bridge)


def trace(runtime: OvsRuntime, flow: str) -> str:
    """Every recirculation's datapath actions, in order, joined by ' | ' (the last one outputs)."""
    out = runtime.appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 4), provider_bridge(PHYSNET), flow)
    return " | ".join(line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Datapath actions:"))


def dp(runtime: OvsRuntime, name: str) -> str:
    out = runtime.appctl("dpif/show")
    line = next(x for x in out.splitlines() if x.strip().startswith(f"{name} "))
    return line.split()[1].split("/")[1].rstrip(":")


def services(bridges: SecondaryBridges, pods: list[str], nodes: list[str]) -> NetworkServices:
    svc = NetworkServices("n1", lambda: None)
    svc.attach(bridges)
    svc.nodes_changed(nodes)
    svc.nad_changed("ns1/red", NAD)
    for name in pods:
        svc.pod_changed(f"ns1/{name}", pod(name))
    svc.service_changed("ns1/web", SERVICE)
    bridges.flush_policy()
    return svc


def request(src_port: int | str, src: str, src_mac: str, vlan: int = 0) -> str:
    tag = f"dl_vlan={vlan}," if vlan else ""
    # dp_hash given up front: OVS's select groups pick by it (computed in the datapath, then recirculated)
    return (f"in_port={src_port},{tag}dl_src={src_mac},dl_dst={VMAC},dp_hash=0x1,tcp,nw_src={src},nw_dst={VIP},"
            "nw_ttl=64,tcp_src=40000,tcp_dst=80")


def test_arp_and_dnat_on_the_endpoints_node(bridges: SecondaryBridges, dummy_ovs: OvsRuntime):
    services(bridges, ["ep-local", "client"], ["n1"])
    arp = dummy_ovs.appctl("ofproto/trace", provider_bridge(PHYSNET),
                           f"in_port=2,dl_src={mac('10.1.0.3')},dl_dst=ff:ff:ff:ff:ff:ff,arp,arp_op=1,"
                           f"arp_spa=10.1.0.3,arp_tpa={VIP},arp_sha={mac('10.1.0.3')}")
    assert f"set_field:{VMAC}->arp_sha" in arp and "IN_PORT" in arp
    actions = trace(dummy_ovs, request(2, "10.1.0.3", mac("10.1.0.3")))
    # translated here; switched (NORMAL: this dummy bridge has learned no MAC, so it floods) to the endpoint
    assert "nat(dst=10.1.0.2:8080)" in actions, actions
    assert dp(dummy_ovs, "pnsvc-ep-local") in actions.split("|")[-1].strip().split(","), actions


def test_another_nodes_endpoint_gets_the_request_unchanged_and_a_host_on_the_vlan_is_sent_back(
        bridges: SecondaryBridges, dummy_ovs: OvsRuntime):
    services(bridges, ["ep-remote", "client"], ["n1", "n2"])
    from_pod = trace(dummy_ovs, request(2, "10.1.0.3", mac("10.1.0.3")))
    # to the endpoint's MAC, untranslated: its node translates
    assert f"set(eth(dst={mac('10.1.0.20')}))" in from_pod and "nat(dst" not in from_pod, from_pod
    from_host = trace(dummy_ovs, request(UPLINK_OFPORT, "10.1.0.250", "02:00:00:00:00:fa", vlan=100))
    assert f"set(eth(src={VMAC},dst={mac('10.1.0.20')}))" in from_host, from_host  # from the virtual MAC
    assert from_host.split("|")[-1].strip().split(",")[-1] == dp(dummy_ovs, UPLINK), from_host


def test_no_endpoint_is_refused_by_the_agent(bridges: SecondaryBridges, dummy_ovs: OvsRuntime):
    svc = services(bridges, ["ep-local", "client"], ["n1"])
    svc.pod_changed("ns1/ep-local", pod("ep-local", {"app": "gone"}))
    bridges.flush_policy()
    assert "userspace(" in trace(dummy_ovs, request(2, "10.1.0.3", mac("10.1.0.3")))
