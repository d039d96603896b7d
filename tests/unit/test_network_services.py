"""Services on a secondary network: the annotations read (and refused, naming the field), the
selected pods as endpoints by their address on the network, the announcer, the EndpointSlice, and
the flows (golden, with table names)."""

from __future__ import annotations

import json
import re

import pytest

from sanderling.agent.network_services import NetworkServices, announcer, endpoint_slice
from sanderling.compiler.network_services import service_flows
from sanderling.model.attachments import ANNOTATION_STATUS
from sanderling.model.errors import ModelError
from sanderling.model.network_services import endpoint_of, net_service_from
from sanderling.openflow import ir
from sanderling.openflow.pipeline import SECONDARY_PIPELINE as P


def service(**annotations: str) -> dict:
    return {"metadata": {"namespace": "ns1", "name": "web", "annotations": {
        "k8s.v1.cni.cncf.io/service-network": "red", "service.sanderling.io/network-ip": "10.1.0.100",
        **annotations}}, "spec": {"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "targetPort": "http"}, {"name": "dns", "protocol": "UDP", "port": 53}]}}


def pod(name: str, ip: str, node: str, labels: dict | None = None, phase: str = "Running") -> dict:
    status = [{"name": "ns1/pods", "ips": ["10.244.0.9"], "default": True},
              {"name": "ns1/red", "interface": "net1", "ips": [ip],
               "mac": f"02:00:00:00:00:{int(ip.split('.')[-1]):02x}"}]
    return {"metadata": {"namespace": "ns1", "name": name, "labels": {"app": "web"} if labels is None else labels,
                         "annotations": {ANNOTATION_STATUS: json.dumps(status)}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http",
                                                                               "containerPort": 8080}]}]},
            "status": {"phase": phase}}


def test_a_service_on_a_network_is_read_with_its_ports_and_affinity():
    svc = net_service_from({**service(), "spec": {**service()["spec"], "sessionAffinity": "ClientIP"}})
    assert (svc.network, str(svc.vip), svc.vip_mac, svc.affinity_timeout) == (
        "ns1/red", "10.1.0.100", "0a:5a:0a:01:00:64", 10800)
    assert [(p.protocol, p.port, p.target) for p in svc.ports] == [("TCP", 80, "http"), ("UDP", 53, 53)]


@pytest.mark.parametrize("change,said", [
    ({"service.sanderling.io/network-ip": "10.1.0.300"}, "give the Service's virtual IPv4 address"),
    ({"k8s.v1.cni.cncf.io/service-network": "a/b/c"}, "is not a NAD name"),
])
def test_bad_annotations_are_refused_naming_them(change, said):
    with pytest.raises(ModelError, match=said):
        net_service_from(service(**change))


def test_no_selector_and_sctp_are_refused():
    with pytest.raises(ModelError, match="give a selector"):
        net_service_from({**service(), "spec": {"ports": [{"port": 80}]}})
    with pytest.raises(ModelError, match="TCP or UDP"):
        net_service_from({**service(), "spec": {"selector": {"a": "b"}, "ports": [{"port": 80, "protocol": "SCTP"}]}})


def test_endpoints_are_the_selected_pods_addresses_on_the_network():
    svc = net_service_from(service())
    ep = endpoint_of(svc, pod("a", "10.1.0.5", "n1"))
    assert ep is not None and (str(ep.ip), ep.mac, ep.node, ep.ready) == ("10.1.0.5", "02:00:00:00:00:05", "n1", True)
    assert ep.targets == (("http", 8080), ("dns", 53))  # the named port resolved on the pod
    assert endpoint_of(svc, pod("b", "10.1.0.6", "n1", {"app": "db"})) is None
    assert endpoint_of(svc, pod("c", "10.1.0.7", "n1", phase="Pending")).ready is False


def test_the_announcer_is_one_node_whoever_asks():
    nodes = ["n3", "n1", "n2"]
    assert announcer("ns1/web", nodes) == announcer("ns1/web", sorted(nodes)) in nodes
    assert announcer("ns1/web", []) == ""


def test_endpoint_slice_lists_this_nodes_addresses_on_the_network():
    svc = net_service_from(service())
    ep = endpoint_of(svc, pod("a", "10.1.0.5", "n1"))
    assert ep is not None
    doc = endpoint_slice(svc, "n1", [ep])
    assert doc["metadata"]["name"] == "web-n1" and doc["metadata"]["labels"] == {
        "kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "sanderling.io"}
    assert doc["endpoints"] == [{"addresses": ["10.1.0.5"], "nodeName": "n1", "conditions": {"ready": True},
                                 "targetRef": {"kind": "Pod", "namespace": "ns1", "name": "a"}}]
    assert [(p["name"], p["port"]) for p in doc["ports"]] == [("http", 8080), ("dns", 53)]


def named(flow: ir.Flow) -> str:
    text = re.sub(r"(goto_table:|resubmit\(,)(\d+)", lambda m: f"{m.group(1)}{P.name_of(int(m.group(2)))}",
                  flow.text(cookie=0))
    return re.sub(r"^table=(\d+)", lambda m: P.name_of(int(m.group(1))), text)


def test_service_flows_golden():
    svc = net_service_from({**service(), "spec": {"selector": {"app": "web"}, "ports": [
        {"name": "http", "port": 80, "targetPort": 8080}]}})
    eps = [endpoint_of(svc, pod("a", "10.1.0.5", "n1")), endpoint_of(svc, pod("b", "10.1.0.6", "n2"))]
    flows, groups = service_flows(svc, [e for e in eps if e is not None], "n1", False, 0x8001, lambda key: 7)
    assert sorted(named(f) for f in flows) == sorted([
        # ARP for the virtual IP from the network's pods (not the announcer: not from the uplink)
        "ServiceARP,priority=100,arp,reg5=0x8001/0x1ffff,arp_op=1,arp_tpa=10.1.0.100 "
        "actions=move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],set_field:0a:5a:0a:01:00:64->dl_src,set_field:2->arp_op,"
        "move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],"
        "set_field:0a:5a:0a:01:00:64->arp_sha,set_field:10.1.0.100->arp_spa,IN_PORT",
        "ServiceLB,priority=10,ip,reg5=0x8001/0xffff,dl_dst=0a:5a:0a:01:00:64,nw_dst=10.1.0.100 actions=drop",
        "ServiceLB,priority=100,tcp,reg5=0x8001/0xffff,dl_dst=0a:5a:0a:01:00:64,nw_dst=10.1.0.100,tcp_dst=80 "
        "actions=group:7",
        # this node's endpoint: translated here
        "ServiceDNAT,priority=100,tcp,reg5=0x8001/0xffff,dl_dst=02:00:00:00:00:05,nw_dst=10.1.0.100,tcp_dst=80 "
        f"actions=ct(commit,zone=49153,table={P['PolicyConntrack']},nat(dst=10.1.0.5:8080))",
        # from the VLAN for node n2's endpoint: back out of the uplink, from the virtual MAC
        "Switch,priority=100,ip,reg5=0x58001/0x5ffff,nw_dst=10.1.0.100 "
        "actions=set_field:0a:5a:0a:01:00:64->dl_src,IN_PORT",
    ])
    (group,) = groups
    assert re.sub(r"resubmit\(,(\d+)\)", lambda m: f"resubmit(,{P.name_of(int(m.group(1)))})", group.text()) == (
        "group_id=7,type=select,"
        "bucket=weight:100,actions=set_field:02:00:00:00:00:05->dl_dst,load:0x0->NXM_NX_REG5[18],resubmit(,ServiceDNAT),"
        "bucket=weight:100,actions=set_field:02:00:00:00:00:06->dl_dst,load:0x1->NXM_NX_REG5[18],"
        "resubmit(,ServiceDNAT)")
    for flow in flows:
        P.check_flow(flow)


class Recorder:
    def __init__(self) -> None:
        self.objects: dict[str, tuple] = {}

    def bridge_for(self, network):
        return "br-physnet1"

    def network_id(self, network: str) -> int:
        return 0x8001

    def group_id(self, bridge: str, key: str) -> int:
        return 1

    def set_policy(self, bridge, network, key, flows, groups=()) -> bool:
        self.objects[key] = (tuple(flows), tuple(groups))
        return True


def test_what_is_wrong_with_a_service_is_said_and_others_keep_working():
    events: list[tuple[str, str, str]] = []
    slices: dict[str, dict | None] = {}
    svc = NetworkServices("n1", lambda: None, lambda ns, name, obj: slices.__setitem__(name, obj),
                          lambda ns, name, msg: events.append((ns, name, msg)))
    bridges = Recorder()
    svc.attach(bridges)
    svc.nad_changed("ns1/red", {"metadata": {"namespace": "ns1", "name": "red"}, "spec": {"config": json.dumps(
        {"type": "sanderling", "topology": "vlan", "vlanID": 10, "subnet": "10.1.0.0/24"})}})
    svc.pod_changed("ns1/a", pod("a", "10.1.0.5", "n1"))
    svc.service_changed("ns1/web", service())
    svc.service_changed("ns1/far", {**service(**{"service.sanderling.io/network-ip": "10.9.0.1"}),
                                    "metadata": {**service()["metadata"], "name": "far", "annotations": {
                                        "k8s.v1.cni.cncf.io/service-network": "red",
                                        "service.sanderling.io/network-ip": "10.9.0.1"}}})
    svc.service_changed("ns1/gone", {**service(), "metadata": {"namespace": "ns1", "name": "gone", "annotations": {
        "k8s.v1.cni.cncf.io/service-network": "nosuch", "service.sanderling.io/network-ip": "10.1.0.7"}}})
    svc.service_changed("ns1/plain", {"metadata": {"namespace": "ns1", "name": "plain"}, "spec": {}})
    assert set(bridges.objects) == {"service/ns1/web", "service-zone"}
    said = {name: msg for _ns, name, msg in events}
    assert "outside the network's subnet 10.1.0.0/24" in said["far"]
    assert "no such NetworkAttachmentDefinition" in said["gone"] and "plain" not in said
    assert slices["web-n1"] is not None and slices["web-n1"]["endpoints"][0]["addresses"] == ["10.1.0.5"]
    svc.service_changed("ns1/web", None)
    assert bridges.objects["service/ns1/web"] == ((), ()) and slices["web-n1"] is None


def test_without_an_address_one_is_asked_for_once_and_given_back_when_the_service_goes():
    asked, released = [], []
    svc = NetworkServices("n1", lambda: None, allocate_vip=asked.append, release_vip=released.append)
    bridges = Recorder()
    svc.attach(bridges)
    svc.nad_changed("ns1/red", {"metadata": {"namespace": "ns1", "name": "red"}, "spec": {"config": json.dumps(
        {"type": "sanderling", "topology": "vlan", "vlanID": 10, "subnet": "10.1.0.0/24"})}})
    bare = service()
    del bare["metadata"]["annotations"]["service.sanderling.io/network-ip"]
    svc.service_changed("ns1/web", bare)
    svc.service_changed("ns1/web", bare)  # a relist: not asked again
    assert [s.key for s in asked] == ["ns1/web"] and not bridges.objects
    given = service(**{"service.sanderling.io/network-ip-pool": "net-ns1-red"})
    svc.service_changed("ns1/web", given)  # the allocation written back: balanced
    assert "service/ns1/web" in bridges.objects
    svc.service_changed("ns1/web", None)
    assert [(str(s.vip), s.vip_pool) for s in released] == [("10.1.0.100", "net-ns1-red")]
