"""A Service on a VLAN network of a 3-node lab (`k8s.v1.cni.cncf.io/service-network`), with real
traffic: a host on VLAN 100 (a namespace cabled to a node's provider bridge as an access port, so
its frames cross the fabric tagged) and a pod on the network connect to the virtual IP; 300
connections spread over the three endpoints (one per node); ClientIP affinity pins; with no
endpoint the connection is refused at once; Sanderling's EndpointSlices list the endpoints'
addresses on the network; a Service without an address gets one from the network's IPPool and
gives it back when deleted; one with an address outside the subnet gets an Event, nothing else
changes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sanderling.agent.network_services import announcer
from sanderling.ovs.runtime import OvsRuntime

from .conftest import LabCli, wait_for

NAME = "slns"
lab = LabCli(NAME)
KUBECONFIG = Path("/run/sanderling-lab") / NAME / "kubeconfig"
VIP = "10.100.0.200"
HOST_IP = "10.100.0.250"
NODES = ["node1", "node2", "node3"]
# the host hangs off another node than the one announcing the Service: its frames cross the fabric
HOST_NODE = next(n for n in NODES if n != announcer("default/web", NODES))
AUTO = next(f"auto-{i}" for i in range(20) if announcer(f"default/auto-{i}", NODES) != HOST_NODE)


def manifest() -> str:
    nad = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
           "metadata": {"name": "vlan100", "namespace": "default"}, "spec": {"config": json.dumps(
               {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": 100,
                "subnet": "10.100.0.0/24", "excludeSubnets": ["10.100.0.192/26"]})}}

    def pod(name: str, node: str, app: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "default", "labels": {"app": app},
            "annotations": {"k8s.v1.cni.cncf.io/networks": "vlan100"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                                                       "ports": [{"name": "http", "containerPort": 8080}]}]}}

    on_net = {"k8s.v1.cni.cncf.io/service-network": "vlan100"}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "web", "namespace": "default", "annotations": {**on_net, "service.sanderling.io/network-ip": VIP}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    outside = {**on_net, "service.sanderling.io/network-ip": "10.200.0.1"}
    no_vip = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "novip", "namespace": "default",
                                                                  "annotations": outside},
              "spec": {"selector": {"app": "web"}, "ports": [{"port": 81, "targetPort": 8080}]}}
    objs = [nad, *(pod(f"web-{i}", n, "web") for i, n in enumerate(NODES, 1)), pod("client", "node1", "client"),
            service, no_vip]
    return "\n---\n".join(json.dumps(o) for o in objs)


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), *args], capture_output=True, text=True,
                          timeout=60)




def host(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", f"{NAME}-vhost", *argv], capture_output=True, text=True,
                          timeout=timeout)


def spread(count: int, *, from_pod: str = "") -> dict[str, int]:
    argv = [sys.executable, "-m", "sanderling.probe", "spread", "tcp", VIP, "80", "--count", str(count),
            "--timeout", "2"]
    out = lab("exec", f"default/{from_pod}", "--", *argv, timeout=300) if from_pod else host(*argv, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = json.loads(out.stdout)
    counts.pop("_slowest_ms", None)
    return counts


def spread_until(count: int, accept):
    """A wait_for predicate: a spread of `count` connections, if `accept` takes it."""
    def attempt() -> dict[str, int] | None:
        counts = spread(count)
        return counts if accept(counts) else None
    return attempt


@pytest.fixture(scope="module")
def services_lab(tmp_path_factory):
    path = tmp_path_factory.mktemp("netsvc") / "all.json"
    path.write_text(manifest())
    lab.up_with(3, path, 4)
    node = next(n for n in json.loads((Path("/run/sanderling-lab") / NAME / "state.json").read_text())["nodes"]
                if n["name"] == HOST_NODE)
    # the host: a namespace with a veth whose other end is an access port of VLAN 100 on HOST_NODE's
    # provider bridge (this kernel has no 802.1q module to tag in the host itself)
    subprocess.run(["ip", "netns", "del", f"{NAME}-vhost"], capture_output=True)
    for argv in (["ip", "netns", "add", f"{NAME}-vhost"],
                 ["ip", "link", "add", "vhost0", "netns", node["netns"], "type", "veth", "peer", "name", "eth0",
                  "netns", f"{NAME}-vhost"],
                 ["ip", "-n", node["netns"], "link", "set", "vhost0", "up"],
                 ["ip", "-n", f"{NAME}-vhost", "addr", "add", f"{HOST_IP}/24", "dev", "eth0"],
                 ["ip", "-n", f"{NAME}-vhost", "link", "set", "eth0", "up"],
                 ["ip", "-n", f"{NAME}-vhost", "link", "set", "lo", "up"]):
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr)
    OvsRuntime(Path(node["dir"]) / "ovs", datapath="netdev").vsctl("add-port", "br-physnet1", "vhost0", "tag=100")
    yield
    subprocess.run(["ip", "netns", "del", f"{NAME}-vhost"], capture_output=True)
    down = lab("down")
    assert down.returncode == 0, down.stderr


def test_a_host_on_the_vlan_and_a_pod_reach_the_service_spread_over_its_endpoints(services_lab):
    wait_for(spread_until(30, lambda c: set(c) == {"web-1", "web-2", "web-3"}), 60,
             "the virtual IP answering from all three endpoints")
    counts = spread(300)
    assert set(counts) == {"web-1", "web-2", "web-3"} and min(counts.values()) >= 50, counts
    from_pod = spread(60, from_pod="client")
    assert set(from_pod) == {"web-1", "web-2", "web-3"}, from_pod
    print(f"300 connections from a host on VLAN 100 via {HOST_NODE}: {counts}; 60 from a pod: {from_pod}")


def test_sanderlings_endpoint_slices_list_the_addresses_on_the_network(services_lab):
    pods = {p["metadata"]["name"]: p for p in json.loads(kubectl("get", "pods", "-o", "json").stdout)["items"]}
    on_net = {json.loads(p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"])[1]["ips"][0]
              for name, p in pods.items() if name.startswith("web-")}

    def listed() -> set[str] | None:
        mine = "endpointslice.kubernetes.io/managed-by=sanderling.io"
        items = json.loads(kubectl("get", "endpointslices", "-l", mine, "-o", "json").stdout)["items"]
        got = {a for s in items if s["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
               for e in s["endpoints"] for a in e["addresses"]}
        return got if got == on_net else None

    wait_for(listed, 30, "EndpointSlices with the pods' vlan100 addresses")


def test_a_service_without_an_address_gets_one_from_the_networks_pool_and_gives_it_back(services_lab, tmp_path):
    auto = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": AUTO, "namespace": "default", "annotations": {
        "k8s.v1.cni.cncf.io/service-network": "vlan100"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    path = tmp_path / "auto.json"
    path.write_text(json.dumps(auto))
    assert lab("apply", "-f", str(path)).returncode == 0

    def allocated() -> tuple[str, str] | None:
        meta = json.loads(kubectl("get", "service", AUTO, "-o", "json").stdout)["metadata"]
        annotations = meta.get("annotations") or {}
        ip, pool = annotations.get("service.sanderling.io/network-ip"), annotations.get(
            "service.sanderling.io/network-ip-pool")
        return (ip, pool) if ip and pool else None

    ip, pool = wait_for(allocated, 30, f"a virtual IP allocated for default/{AUTO}")
    owners = json.loads(kubectl("get", "ippool", pool, "-o", "json").stdout)["status"]["allocations"]
    assert owners[ip] == {"service": f"default/{AUTO}"}, owners
    argv = [sys.executable, "-m", "sanderling.probe", "spread", "tcp", ip, "80", "--count", "30", "--timeout", "2"]
    counts = wait_for(lambda: (c := json.loads(host(*argv).stdout)) and set(c) - {"_slowest_ms"} <= {
        "web-1", "web-2", "web-3"} and len(c) > 2 and c, 30, f"{ip} answering from the endpoints")
    assert lab("delete", "-f", str(path)).returncode == 0
    wait_for(lambda: ip not in (json.loads(kubectl("get", "ippool", pool, "-o", "json").stdout)["status"].get(
        "allocations") or {}), 30, f"{ip} given back to {pool}")
    print(f"default/{AUTO}: {ip} from {pool}; {counts}")


def test_client_ip_affinity_pins_and_no_endpoint_is_refused_at_once(services_lab):
    patch = {"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}}
    assert kubectl("patch", "service", "web", "--type", "merge", "-p", json.dumps(patch)).returncode == 0
    pinned = wait_for(spread_until(20, lambda c: len(c) == 1), 30, "affinity in place")
    counts = spread(100)
    assert counts == {next(iter(pinned)): 100}, counts
    for i in (1, 2, 3):
        assert kubectl("label", "pod", f"web-{i}", "app=off", "--overwrite").returncode == 0
    refused = wait_for(spread_until(5, lambda c: set(c) == {"error: ConnectionRefusedError"}), 30,
                       "connections refused once no pod is selected")
    started = time.monotonic()
    assert spread(10) == {"error: ConnectionRefusedError": 10}
    elapsed = time.monotonic() - started
    assert elapsed < 5, "refusals must come at once, not after a timeout"
    print(f"affinity: {counts}; no endpoint: {refused}, 10 refusals in {elapsed * 1000:.0f} ms (with the probe's "
          "start-up)")


def test_a_service_with_a_virtual_ip_outside_the_subnet_gets_an_event(services_lab):
    def event() -> str | None:
        items = json.loads(kubectl("get", "events", "-o", "json").stdout)["items"]
        return next((e["message"] for e in items if e["reason"] == "NetworkServiceNotBalanced"
                     and e["involvedObject"]["name"] == "novip"), None)

    message = wait_for(event, 30, "an Event on default/novip")
    assert "virtual IP 10.200.0.1 is outside the network's subnet 10.100.0.0/24" in message, message
