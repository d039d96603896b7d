"""The COE documents of Kubernetes objects (literal expectations), and the feed's delivery rules
against a real HTTP receiver on loopback: webhook events, a failure turning into a resync."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from sanderling.northbound import coe
from sanderling.northbound.feed import Feed
from sanderling.northbound.targets import Credentials, WebhookTarget

CLUSTER = coe.ClusterInfo("c1")
VLAN_NAD = {"metadata": {"namespace": "tel", "name": "vlan100"},
            "spec": {"config": json.dumps({"cniVersion": "1.0.0", "name": "vlan100", "type": "sanderling",
                                           "topology": "vlan", "vlanID": 100, "physicalNetwork": "physnet1",
                                           "subnet": "10.100.0.0/24"})}}
L2_NAD = {"metadata": {"namespace": "tel", "name": "priv"},
          "spec": {"config": json.dumps({"cniVersion": "1.0.0", "name": "priv", "type": "sanderling",
                                         "topology": "layer2", "vni": 4242, "subnet": "10.50.0.0/24"})}}
STATUS = [{"name": "sanderling", "interface": "eth0", "ips": ["10.244.1.5"], "mac": "0a:58:0a:f4:01:05",
           "default": True},
          {"name": "tel/vlan100", "interface": "net1", "ips": ["10.100.0.7"], "mac": "02:00:00:00:00:07"},
          {"name": "priv", "interface": "net2", "ips": ["10.50.0.3"], "mac": "02:00:00:00:00:08"},
          {"name": "tel/mv", "interface": "net3", "ips": ["192.168.9.4"], "mac": "02:00:00:00:00:09"}]
POD = {"metadata": {"namespace": "tel", "name": "upf", "uid": "11111111-2222-3333-4444-555555555555",
                    "annotations": {coe.NETWORK_STATUS: json.dumps(STATUS)}},
       "spec": {"nodeName": "node1"},
       "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}], "hostIP": "172.30.0.11"}}


def test_a_pod_with_three_secondary_networks_lists_every_interface_with_its_network_type():
    path, body = coe.pod_doc(POD, {"tel/vlan100": VLAN_NAD, "tel/priv": L2_NAD}, CLUSTER)  # type: ignore[misc]
    assert path == "pod:coe/pods/11111111-2222-3333-4444-555555555555"
    entry = body["pods"][0]
    assert (entry["name"], entry["network-NS"], entry["cluster-id"], entry["host-ip-address"],
            entry["port-mac-address"]) == ("upf", "tel", "c1", "172.30.0.11", "0a:58:0a:f4:01:05")
    kinds = [(i["ip-address"], i["network-type"], i["segmentation-id"]) for i in entry["interface"]]
    # a delegated network (tel/mv: no NAD known here, e.g. macvlan) is FLAT
    assert kinds == [("10.244.1.5", "FLAT", 0), ("10.100.0.7", "VLAN", 100), ("10.50.0.3", "VXLAN", 4242),
                     ("192.168.9.4", "FLAT", 0)]
    assert entry["interface"][1]["network-id"] == coe.derived_uuid("network/tel/vlan100")
    assert len({i["uid"] for i in entry["interface"]}) == 4


def test_overlay_mode_pod_network_is_vxlan_and_host_network_or_unplaced_pods_are_not_sent():
    entry = coe.pod_doc(POD, {}, coe.ClusterInfo("c1", mode="overlay", overlay_vni=7))[1]["pods"][0]  # type: ignore[index]
    assert entry["interface"][0]["network-type"] == "VXLAN" and entry["interface"][0]["segmentation-id"] == 7
    assert coe.pod_doc({**POD, "spec": {"nodeName": "node1", "hostNetwork": True}}, {}, CLUSTER) is None
    assert coe.pod_doc({**POD, "status": {}}, {}, CLUSTER) is None


def test_node_service_and_endpoints_documents():
    node = {"metadata": {"name": "node1", "uid": "n-1"}, "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.11"},
                                     {"type": "ExternalIP", "address": "203.0.113.11"}]}}
    assert coe.node_doc(node) == ("k8s-node:k8s-nodes-info/k8s-nodes/n-1", {"k8s-nodes": [{
        "uid": "n-1", "host-name": "node1", "internal-ip-address": "172.30.0.11",
        "external-ip-address": "203.0.113.11", "pod-cidr": "10.244.1.0/24"}]})
    svc = {"metadata": {"namespace": "tel", "name": "amf", "uid": "s-1"},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalIPs": ["198.51.100.4"],
                    "ports": [{"name": "sctp", "port": 38412, "targetPort": "ngap", "nodePort": 31000}]},
           "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}}
    assert coe.service_doc(svc)[1]["services"][0] == {
        "uid": "s-1", "name": "amf", "network-NS": "tel", "cluster-ip-address": "10.96.0.20",
        "external-ip-address": ["198.51.100.4"], "load-balancer-IP": "192.0.2.10", "ingress-ip-address": ["192.0.2.10"],
        "service-ports": [{"name": "sctp", "port": 38412, "target-port": "ngap", "node-port": 31000}]}
    headless = {**svc, "spec": {"clusterIP": "None", "ports": []}, "status": {}}
    assert "cluster-ip-address" not in coe.service_doc(headless)[1]["services"][0]
    slices = [{"metadata": {"namespace": "tel", "name": "amf-a", "labels": {"kubernetes.io/service-name": "amf"}},
               "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node1", "targetRef": {"name": "amf-0"},
                              "conditions": {"ready": True}},
                             {"addresses": ["10.244.2.6"], "nodeName": "node2", "conditions": {"ready": False}}],
               "ports": [{"name": "sctp", "port": 38412}]}]
    assert coe.endpoints_doc(svc, slices) == ("service:endpoints-info/endpoints/s-1", {"endpoints": [{
        "uid": "s-1", "name": "amf", "network-NS": "tel",
        "endpoint-addresses": [{"ip-address": "10.244.1.5", "host-name": "amf-0", "node-name": "node1"}],
        "endpoint-ports": [{"name": "sctp", "port": 38412}]}]})


def test_webhook_feed_sends_changes_and_resyncs_after_a_failure():
    async def scenario() -> list[dict]:
        events: list[dict] = []
        failing = {"on": False}

        async def hook(request: web.Request) -> web.Response:
            if failing["on"]:
                return web.Response(status=503)
            events.append(await request.json())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/events", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        feed = Feed(WebhookTarget(f"http://127.0.0.1:{port}/events", Credentials()), max_backoff=0.2)
        task = asyncio.create_task(feed.run())
        feed.set("a", {"x": 1})
        feed.start()
        await asyncio.wait_for(feed.in_sync.wait(), 10)
        feed.set("b", {"x": 2})
        feed.set("a", None)
        await asyncio.wait_for(feed.in_sync.wait(), 10)
        failing["on"] = True
        feed.set("c", {"x": 3})
        while feed.counts["failures"] == 0:
            await asyncio.sleep(0.02)
        failing["on"] = False
        await asyncio.wait_for(feed.in_sync.wait(), 10)
        task.cancel()
        await runner.cleanup()
        return events

    events = asyncio.run(scenario())
    assert events[0] == {"type": "SYNC", "documents": {"a": {"x": 1}}}
    assert {json.dumps(e, sort_keys=True) for e in events[1:3]} == {
        json.dumps({"type": "PUT", "path": "b", "document": {"x": 2}}, sort_keys=True),
        json.dumps({"type": "DELETE", "path": "a"}, sort_keys=True)}
    # after the failure: a full resync, holding what changed meanwhile
    assert events[3] == {"type": "SYNC", "documents": {"b": {"x": 2}, "c": {"x": 3}}}
