"""The lab control plane's controllers against a real store: EndpointSlices and node podCIDRs."""

from __future__ import annotations

import pytest

from sanderling.lab.apiserver.server import ApiServer
from sanderling.lab.apiserver.store import Store
from sanderling.lab.controlplane import NODES, PODS, SERVICES, SLICES, ControlPlane
from sanderling.lab.endpointslices import desired_slices


def pod(name, ip, labels, ready=True, ports=(), node="n1", deleting=False):
    meta = {"name": name, "namespace": "ns", "labels": labels, "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-21T00:00:00Z"
    return {"metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                {"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]},
            "status": {"podIP": ip, "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


SVC = {"metadata": {"name": "web", "namespace": "ns", "uid": "u"},
       "spec": {"selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                          {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}}


def test_named_ports_resolve_per_pod_and_conditions():
    pods = [pod("a", "10.0.0.1", {"app": "web"}, ports=[("http", 8080, "TCP")]),
            pod("b", "10.0.0.2", {"app": "web"}, ports=[("http", 9090, "TCP")], ready=False),
            pod("c", "10.0.0.3", {"app": "web"}, ports=[("http", 8080, "TCP")], deleting=True),
            pod("d", "10.0.0.4", {"app": "db"}, ports=[("http", 8080, "TCP")])]
    slices = desired_slices(SVC, pods)
    assert slices is not None
    by_port = {tuple((p["name"], p["port"]) for p in s["ports"]): s for s in slices}
    assert set(by_port) == {(("http", 8080), ("dns", 5353)), (("http", 9090), ("dns", 5353))}
    first = by_port[(("http", 8080), ("dns", 5353))]["endpoints"]
    assert [e["addresses"] for e in first] == [["10.0.0.1"], ["10.0.0.3"]]
    assert first[1]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    other = by_port[(("http", 9090), ("dns", 5353))]["endpoints"]
    assert other[0]["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert desired_slices({**SVC, "spec": {"ports": [{"port": 80}]}}, pods) is None  # no selector: not ours


@pytest.fixture
def plane(tmp_path):
    store = Store(tmp_path / "api.db")
    ApiServer(store)  # installs admission (validation, ClusterIP allocation)
    return ControlPlane(store), store


def test_controller_keeps_slices_equal_to_pods(plane):
    cp, store = plane
    store.create(SERVICES, "ns", {"metadata": {"name": "web"}, "spec": SVC["spec"]})
    cp._sync_slices("ns")
    (empty,) = store.list(SLICES, "ns")[0]
    assert empty["endpoints"] == []
    store.create(PODS, "ns", pod("a", "10.0.0.1", {"app": "web"}, ports=[("http", 8080, "TCP")]))
    cp._sync_slices("ns")
    (one,) = store.list(SLICES, "ns")[0]
    assert one["endpoints"][0]["addresses"] == ["10.0.0.1"] and one["ports"][0]["port"] == 8080
    store.delete(PODS, "ns", "a")
    cp._sync_slices("ns")
    assert [s["endpoints"] for s in store.list(SLICES, "ns")[0]] == [[]]
    store.delete(SERVICES, "ns", "web")
    cp._sync_slices("ns", "web")
    assert store.list(SLICES, "ns")[0] == []


def test_node_pod_cidr_allocation(plane):
    cp, store = plane
    for name in ("n1", "n2"):
        store.create(NODES, "", {"metadata": {"name": name}})
        cp._allocate_pod_cidr(store.get(NODES, "", name))
    cidrs = [n["spec"]["podCIDR"] for n in store.list(NODES, None)[0]]
    assert cidrs == ["10.244.0.0/24", "10.244.1.0/24"]
    cp._allocate_pod_cidr(store.get(NODES, "", "n1"))  # already has one: unchanged
    assert store.get(NODES, "", "n1")["spec"]["podCIDR"] == "10.244.0.0/24"


def test_a_dual_stack_service_gets_an_ipv6_cluster_ip_and_ipv6_slices():
    import ipaddress

    from sanderling.lab.apiserver.admission import ServiceAllocator
    from sanderling.lab.apiserver.store import ApiError

    dual = ServiceAllocator(cidr6=ipaddress.IPv6Network("fd00:10:96::/112"))
    svc = {"metadata": {"name": "web"}, "spec": {"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}}
    dual.admit("web", svc, None, [])
    assert svc["spec"]["clusterIPs"] == ["10.96.0.2", "fd00:10:96::2"]
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    again = {"metadata": {"name": "web"}, "spec": {"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}}
    dual.admit("web", again, svc, [])  # re-applied: keeps both addresses
    assert again["spec"]["clusterIPs"] == ["10.96.0.2", "fd00:10:96::2"]
    single = {"metadata": {"name": "one"}, "spec": {"ports": [{"port": 80}]}}
    dual.admit("one", single, None, [svc])
    assert single["spec"]["clusterIPs"] == ["10.96.0.3"] and single["spec"]["ipFamilies"] == ["IPv4"]
    with pytest.raises(ApiError) as refused:  # an IPv4-only cluster cannot honour RequireDualStack
        ServiceAllocator().admit("x", {"metadata": {"name": "x"}, "spec": {"ipFamilyPolicy": "RequireDualStack",
                                                                           "ports": [{"port": 80}]}}, None, [])
    assert "not configured for dual-stack" in str(refused.value)
    pods = [pod("a", "10.0.0.1", {"app": "web"}, ports=[("http", 8080, "TCP")])]
    pods[0]["status"]["podIPs"] = [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]
    slices = desired_slices({**SVC, "spec": {**SVC["spec"], "ipFamilies": ["IPv4", "IPv6"]}}, pods)
    assert slices is not None
    assert sorted((s["addressType"], s["endpoints"][0]["addresses"][0]) for s in slices if s["endpoints"]) == [
        ("IPv4", "10.0.0.1"), ("IPv6", "fd00::1")]
    assert len({s["metadata"]["name"] for s in slices}) == len(slices)


def test_an_ipv6_only_cluster_gives_nodes_a_64_and_services_an_ipv6_cluster_ip(tmp_path):
    import ipaddress

    from sanderling.lab.apiserver.admission import ServiceAllocator
    from sanderling.lab.apiserver.store import ApiError

    store = Store(tmp_path / "api.db")
    cp = ControlPlane(store, None, cluster_cidr6=ipaddress.IPv6Network("fd00:10:244::/56"))
    store.create(NODES, "", {"metadata": {"name": "n1"}})
    cp._allocate_pod_cidr(store.get(NODES, "", "n1"))
    spec = store.get(NODES, "", "n1")["spec"]
    assert (spec["podCIDR"], spec["podCIDRs"]) == ("fd00:10:244::/64", ["fd00:10:244::/64"])
    six = ServiceAllocator(None, ipaddress.IPv6Network("fd00:10:96::/112"))
    for policy in ("SingleStack", "PreferDualStack"):
        svc = {"metadata": {"name": "web"}, "spec": {"ipFamilyPolicy": policy, "ports": [{"port": 80}]}}
        six.admit("web", svc, None, [])
        assert (svc["spec"]["clusterIPs"], svc["spec"]["ipFamilies"]) == (["fd00:10:96::2"], ["IPv6"])
    for spec, why in (({"ipFamilyPolicy": "RequireDualStack"}, "IPv6-only"),
                      ({"clusterIP": "10.96.0.9"}, "not in the valid range"),
                      ({"clusterIP": "nonsense"}, "must be a valid IP address")):
        with pytest.raises(ApiError, match=why):
            six.admit("x", {"metadata": {"name": "x"}, "spec": {**spec, "ports": [{"port": 80}]}}, None, [])
