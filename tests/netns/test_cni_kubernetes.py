"""CNI with the Kubernetes API (the lab API server): pod annotations, IPPools, events, reconcile."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sanderling.kube.client import IPPoolResource, KubeApi
from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth

from ..conftest import require_ovs
from .conftest import require_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    proc = subprocess.Popen([sys.executable, "-m", "sanderling.lab.apiserver", "--db", str(tmp_path / "api.db"),
                             "--port", str(free_port()), "--kubeconfig", str(kubeconfig), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    yield KubeApi(kubeconfig), kubeconfig
    proc.terminate()
    proc.wait(10)


def make_nodes(tmp_path: Path, kubeconfig: Path, n: int) -> list[LocalNode]:
    nodes = []
    for i in range(1, n + 1):
        teardown_prefix(f"slk{i}-n{i}")
        node = LocalNode(f"n{i}", f"10.244.{20 + i}.0/24", tmp_path / f"lab{i}", prefix=f"slk{i}",
                         kubeconfig=kubeconfig)
        node.start()
        nodes.append(node)
    for node in nodes:
        node.wait_ready()
    return nodes


def pod(api: KubeApi, ns: str, name: str, node: str, annotations: dict | None = None, labels: dict | None = None):
    from lightkube.resources.core_v1 import Pod

    api.client.create(Pod.from_dict({"metadata": {"name": name, "namespace": ns, "annotations": annotations or {},
                                                  "labels": labels or {}},
                                     "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}}))


def add(node: LocalNode, ns: str, name: str, cid: str) -> tuple[int, dict]:
    netns = f"{node.netns}-{cid}"
    veth.ensure_netns(netns)
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/{netns}", "CNI_IFNAME": "eth0",
           "CNI_PATH": str(node.cni_bin.parent), "CNI_ARGS": f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"}
    conf = {"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
            "agentSocket": str(node.cni_socket)}
    proc = subprocess.run([str(node.cni_bin)], input=json.dumps(conf), env=env, capture_output=True, text=True)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def delete(node: LocalNode, cid: str) -> int:
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    conf = {"cniVersion": "1.1.0", "name": node.cni_network, "type": "sanderling-cni",
            "agentSocket": str(node.cni_socket)}
    return subprocess.run([str(node.cni_bin)], input=json.dumps(conf), env=env, capture_output=True,
                          text=True).returncode


def ippool(api: KubeApi, name: str, cidrs: list[str], **spec) -> None:
    api.client.create(IPPoolResource.from_dict({"apiVersion": "ipam.sanderling.io/v1alpha1", "kind": "IPPool",
                                                "metadata": {"name": name}, "spec": {"cidrs": cidrs, **spec}}))


def events_for(api: KubeApi, ns: str, name: str) -> list[str]:
    from lightkube.resources.core_v1 import Event

    return [e.message or "" for e in api.client.list(Event, namespace=ns)
            if e.involvedObject and e.involvedObject.name == name]


@pytest.fixture
def two_nodes(api, tmp_path):
    require_root()
    require_ovs()
    client, kubeconfig = api
    nodes = make_nodes(tmp_path, kubeconfig, 2)
    yield client, nodes
    for node in nodes:
        node.teardown()


def test_annotation_fixed_ip_and_mac_from_the_node_subnet(two_nodes):
    api, (n1, _) = two_nodes
    pod(api, "default", "fixed", "n1", {"ipam.sanderling.io/ips": "10.244.21.77", "ipam.sanderling.io/mac":
                                        "0a:00:00:00:77:77"})
    code, out = add(n1, "default", "fixed", "k1")
    assert code == 0, out
    assert out["ips"][0]["address"] == "10.244.21.77/24"
    assert out["interfaces"][1]["mac"] == "0a:00:00:00:77:77"


@pytest.mark.parametrize("value", ["10.244.21.300", "", "[]"])  # malformed, empty (issue 20: was an internal error)
def test_bad_annotation_is_an_error_and_an_event_for_that_pod_only(two_nodes, value):
    api, (n1, _) = two_nodes
    pod(api, "default", "broken", "n1", {"ipam.sanderling.io/ips": value})
    pod(api, "default", "fine", "n1")
    code, out = add(n1, "default", "broken", "k2")
    assert code == 1 and out["code"] == 7 and "ipam.sanderling.io/ips" in out["msg"], out
    assert repr(value) in out["msg"] or value in out["msg"], out
    assert any("ipam.sanderling.io/ips" in m for m in events_for(api, "default", "broken"))
    assert add(n1, "default", "fine", "k3")[0] == 0


def test_ippool_selected_by_namespace_annotation_two_nodes_never_share(two_nodes):
    api, nodes = two_nodes
    from lightkube.resources.core_v1 import Namespace

    ippool(api, "telco", ["10.60.0.0/27"], excludes=["10.60.0.1"])
    api.client.create(Namespace.from_dict({"metadata": {"name": "upf",
                                                        "annotations": {"ipam.sanderling.io/pool": "telco"}}}))
    results = []
    for i in range(12):
        node = nodes[i % 2]
        pod(api, "upf", f"p{i}", node.name)
        code, out = add(node, "upf", f"p{i}", f"u{i}")
        assert code == 0, out
        results.append(out["ips"][0]["address"])
    assert len(set(results)) == 12
    assert all(a.startswith("10.60.0.") and a.endswith("/32") and a != "10.60.0.1/32" for a in results)
    allocations = api.pool("telco")["status"]["allocations"]
    assert {f"{ip}/32" for ip in allocations} == set(results)
    assert {o["node"] for o in allocations.values()} == {"n1", "n2"}
    # DEL returns the address to the pool
    assert delete(nodes[0], "u0") == 0
    assert results[0].split("/")[0] not in api.pool("telco")["status"]["allocations"]


def test_pool_address_reaches_a_node_subnet_pod(two_nodes):
    api, (n1, _) = two_nodes
    ippool(api, "blue", ["10.61.0.0/28"], podSelector={"matchLabels": {"net": "blue"}})
    pod(api, "default", "bluepod", "n1", labels={"net": "blue"})
    code, out = add(n1, "default", "bluepod", "b1")
    assert code == 0, out and out["ips"][0]["address"].startswith("10.61.0.")
    plain = n1.add_pod("default", "plain", "10.244.21.50")
    n1.wait_programmed(plain)
    ip = out["ips"][0]["address"].split("/")[0]
    assert n1.probe(plain, "icmp", ip)


def test_errors_name_the_holder_the_pools_and_the_pool_size(two_nodes):
    api, (n1, n2) = two_nodes
    ippool(api, "tiny", ["10.62.0.0/30"])  # 2 usable
    pod(api, "default", "a", "n1", {"ipam.sanderling.io/ips": "10.62.0.1"})
    pod(api, "default", "b", "n2", {"ipam.sanderling.io/ips": "10.62.0.1"})
    pod(api, "default", "c", "n2", {"ipam.sanderling.io/ips": "10.99.9.9"})
    pod(api, "default", "d", "n1", {"ipam.sanderling.io/pool": "tiny"})
    pod(api, "default", "e", "n1", {"ipam.sanderling.io/pool": "tiny"})
    assert add(n1, "default", "a", "t1")[0] == 0
    code, out = add(n2, "default", "b", "t2")
    assert out["code"] == 100 and "default/a" in out["msg"] and "n1" in out["msg"]
    code, out = add(n2, "default", "c", "t3")
    assert out["code"] == 101 and "tiny (10.62.0.0/30)" in out["msg"] and "node (10.244.22.0/24)" in out["msg"]
    assert add(n1, "default", "d", "t4")[0] == 0
    code, out = add(n1, "default", "e", "t5")
    assert out["code"] == 102 and "tiny" in out["msg"] and "2 addresses" in out["msg"]


def test_restart_reconciles_against_the_api(two_nodes):
    api, (n1, _) = two_nodes
    from lightkube.resources.core_v1 import Pod

    ippool(api, "green", ["10.63.0.0/28"])
    pod(api, "default", "gone", "n1", {"ipam.sanderling.io/pool": "green"})
    pod(api, "default", "stays", "n1")
    assert add(n1, "default", "gone", "r1")[0] == 0
    assert add(n1, "default", "stays", "r2")[0] == 0
    n1.kill_agent()
    api.client.delete(Pod, "gone", namespace="default")  # deleted while the agent was down, no DEL came
    n1.start_agent()
    n1.wait_ready()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(a.container_id == "r1" for a in n1.allocations()):
        time.sleep(0.1)
    assert {a.container_id for a in n1.allocations()} == {"r2"}
    assert not (api.pool("green").get("status") or {}).get("allocations")


@pytest.mark.parametrize("flags", [("--no-proxy",), ("--no-policy",)])
def test_proxy_and_policy_are_switched_separately(api, tmp_path, flags):
    """Issue 17: --no-proxy once also switched NetworkPolicy off (its informers started inside the
    proxy's start-up); each feature has its own switch."""
    from lightkube.resources.core_v1 import Pod
    from lightkube.resources.networking_v1 import NetworkPolicy
    from lightkube.types import PatchType

    from sanderling.openflow.pipeline import PIPELINE

    require_root()
    require_ovs()
    client, kubeconfig = api
    teardown_prefix("slsw-n1")
    node = LocalNode("n1", "10.244.23.0/24", tmp_path / "sw", prefix="slsw", kubeconfig=kubeconfig, agent_args=flags)
    try:
        node.start()
        node.wait_ready()
        pod(client, "default", "guarded", "n1", labels={"app": "guarded"})
        code, out = add(node, "default", "guarded", "g1")
        assert code == 0, out
        ip = out["ips"][0]["address"].split("/")[0]  # what a kubelet would report
        client.client.patch(Pod.Status, "guarded", {"status": {"podIP": ip, "phase": "Running"}},
                            namespace="default", patch_type=PatchType.MERGE)
        client.client.create(NetworkPolicy.from_dict({"metadata": {"name": "deny", "namespace": "default"},
                                                      "spec": {"podSelector": {"matchLabels": {"app": "guarded"}}}}))
        deadline = time.monotonic() + 20
        while "informers listed" not in node.agent_log.read_text():  # the readiness gate opened
            assert time.monotonic() < deadline, "the agent's informers never listed"
            time.sleep(0.1)
        state = node.ovs.ofctl(node.bridge, "dump-flows", f"table={PIPELINE['PolicyState']}")
        reject = node.ovs.ofctl(node.bridge, "dump-flows", f"table={PIPELINE['Reject']}")
        assert ("ct_state=+inv+trk" in state) == ("--no-policy" not in flags), state  # policy's own flows
        assert ("controller(" in reject) == ("--no-proxy" not in flags), reject  # the proxy's refusals
        if "--no-policy" not in flags:  # and policy really works without the proxy
            while True:
                rules = node.ovs.ofctl(node.bridge, "dump-flows", f"table={PIPELINE['IngressRule']}")
                if "nw_dst=10.244.23." in rules and "actions=drop" in rules:
                    break
                assert time.monotonic() < deadline, rules
                time.sleep(0.1)
    finally:
        node.teardown()


def test_an_ippool_of_both_families_gives_a_dual_stack_pod_one_address_of_each(api, tmp_path):
    """IPPools hold IPv6 CIDRs too: a dual-stack node's pod gets a /32 and a /128 from a pool of both
    families (a fixed IPv6 one by annotation), both recorded in the pool and released by DEL; a
    pool of a family the node has no pods of is refused naming both."""
    require_root()
    require_ovs()
    client, kubeconfig = api
    teardown_prefix("slk9-n1")
    node = LocalNode("n1", "10.244.31.0/24,fd00:10:244:31::/64", tmp_path / "lab9", prefix="slk9",
                     kubeconfig=kubeconfig)
    try:
        node.start()
        node.wait_ready()
        ippool(client, "both", ["10.62.0.0/28", "fd00:62::/120"], excludes=["fd00:62::1"],
               podSelector={"matchLabels": {"net": "both"}})
        ippool(client, "six", ["fd00:63::/120"], podSelector={"matchLabels": {"net": "six"}})
        pod(client, "default", "a", "n1", labels={"net": "both"})
        pod(client, "default", "b", "n1", {"ipam.sanderling.io/ips": "fd00:62::99"}, labels={"net": "both"})
        code, a = add(node, "default", "a", "d1")
        assert code == 0, a
        assert [ip["address"] for ip in a["ips"]] == ["10.62.0.1/32", "fd00:62::2/128"], a
        code, b = add(node, "default", "b", "d2")
        assert code == 0, b
        assert [ip["address"] for ip in b["ips"]] == ["10.62.0.2/32", "fd00:62::99/128"], b
        held = client.pool("both")["status"]["allocations"]
        assert {ip: o["pod"] for ip, o in held.items()} == {"10.62.0.1": "default/a", "fd00:62::2": "default/a",
                                                           "10.62.0.2": "default/b", "fd00:62::99": "default/b"}
        # a's pool addresses answer from b over both families (the gateway on-link for a /128 too)
        for dst in ("10.62.0.1", "fd00:62::2"):
            ping = subprocess.run(["ip", "netns", "exec", f"{node.netns}-d2", "ping", "-c", "1", "-W", "2", dst],
                                  capture_output=True, text=True, timeout=30)
            assert ping.returncode == 0, ping.stdout + ping.stderr
        assert delete(node, "d1") == 0
        assert set(client.pool("both")["status"]["allocations"]) == {"10.62.0.2", "fd00:62::99"}
    finally:
        node.teardown()
    teardown_prefix("slk8-n1")
    v4 = LocalNode("n1", "10.244.32.0/24", tmp_path / "lab8", prefix="slk8", kubeconfig=kubeconfig)
    try:
        v4.start()
        v4.wait_ready()
        pod(client, "default", "c", "n1", labels={"net": "six"})
        code, out = add(v4, "default", "c", "d3")
        assert code == 1 and out["code"] == 101, out
        assert "IPPool six holds IPv6 addresses only" in out["msg"] and "IPv4" in out["msg"], out
        # a fixed IPv6 address from a pool of both families, on this IPv4-only node: refused, not dropped
        pod(client, "default", "e", "n1", {"ipam.sanderling.io/ips": "fd00:62::50"}, labels={"net": "both"})
        code, out = add(v4, "default", "e", "d4")
        assert code == 1 and out["code"] == 101 and "fd00:62::50 is IPv6" in out["msg"], out
    finally:
        v4.teardown()
