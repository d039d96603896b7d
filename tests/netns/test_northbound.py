"""The northbound RESTCONF feed against a lab cluster (issue 15, the OpenDaylight COE models).

`sanderling-northbound --restconf` runs against a 2-node lab; a RESTCONF datastore
(restconf_server.py, ODL's `/restconf/config` behaviour for the COE lists) receives it. After each
change the datastore must equal the cluster, document for document: pods created and deleted, a
Service edited, its backends scaled to 0, a Node added. Then the datastore is stopped, the cluster
changes (a pod deleted, one created, a Service edited) and the datastore restarts with its old
data plus an entry the cluster never had: the resync heals it (every PUT and DELETE counted).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from .conftest import LabCli

NAME = "sltestnb"
lab = LabCli(NAME)
SERVER = Path(__file__).with_name("restconf_server.py")

OBJECTS = """apiVersion: v1
kind: Namespace
metadata: {name: nb}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: nb}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: nb, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: nb, labels: {app: web}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
"""


def pod(name: str, node: str, app: str = "web") -> str:
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: nb, labels: {{app: {app}}}}}\n"
            f"spec: {{nodeName: {node}, containers: [{{name: c, image: none, ports: [{{containerPort: 8080}}]}}]}}\n")


class Datastore:
    def __init__(self, tmp: Path) -> None:
        self.state, self.log = tmp / "datastore.json", tmp / "requests.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SERVER), str(self.port), str(self.state), str(self.log)],
                                     stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the RESTCONF datastore did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def tree(self) -> dict[str, dict]:
        return json.loads(self.state.read_text()) if self.state.exists() else {}

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected() -> dict[str, dict]:
    """What the datastore should hold: the COE documents of the cluster as the API has it now."""
    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import Node, Pod, Service
    from lightkube.resources.discovery_v1 import EndpointSlice

    from sanderling.lab.cluster import Lab
    from sanderling.northbound import coe

    client = Client(config=KubeConfig.from_file(str(Lab(NAME).kubeconfig)))
    objects = {kind: {f"{o.metadata.namespace}/{o.metadata.name}" if o.metadata.namespace else o.metadata.name:
                      o.to_dict() for o in client.list(res, **({} if kind == "Node" else {"namespace": "*"}))}
               for kind, res in (("Node", Node), ("Pod", Pod), ("Service", Service),
                                 ("EndpointSlice", EndpointSlice))}
    docs = coe.cluster_docs(objects, coe.ClusterInfo("lab"))
    return {path: body[next(iter(body))][0] for path, body in docs.items()}


def wait_equal(store: Datastore, what: str, timeout: float = 30, until=lambda tree: True) -> dict[str, dict]:
    """Until the datastore equals the cluster, in a state where `until(tree)` holds (the cluster's
    controllers may not have caught up with the change yet: an EndpointSlice lags its pods)."""
    deadline = time.monotonic() + timeout
    while True:
        want, have = expected(), store.tree()
        if want == have and until(have):
            return have
        if time.monotonic() > deadline:
            missing = sorted(set(want) - set(have))
            stale = sorted(set(have) - set(want))
            differ = sorted(p for p in set(want) & set(have) if want[p] != have[p])
            raise AssertionError(f"{what}: datastore differs from the cluster: missing {missing}, stale {stale}, "
                                 f"different {[(p, want[p], have[p]) for p in differ][:2]}")
        time.sleep(0.2)


def pods_in(tree: dict[str, dict]) -> dict[str, dict]:
    return {e["name"]: e for p, e in tree.items() if p.startswith("pod:coe/pods/")}


def endpoints_of(tree: dict[str, dict], service: str) -> list[str]:
    entry = next(e for p, e in tree.items() if p.startswith("service:endpoints-info/") and e["name"] == service)
    return sorted(a["ip-address"] for a in entry.get("endpoint-addresses", []))


def apply(tmp: Path, text: str) -> None:
    f = tmp / "obj.yaml"
    f.write_text(text)
    out = lab("apply", "-f", str(f))
    assert out.returncode == 0, out.stdout + out.stderr


def wait_pod_ip(name: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        pods = {p["metadata"]["name"]: p for p in json.loads(lab("get", "pods", "-n", "nb", "-o", "json").stdout)}
        ip = ((pods.get(name) or {}).get("status") or {}).get("podIP")
        if ip:
            return str(ip)
        assert time.monotonic() < deadline, f"pod {name} got no address"
        time.sleep(0.2)


def test_restconf_feed_follows_the_cluster_and_a_restarted_controller_is_resynced(tmp_path):
    manifest = tmp_path / "nb.yaml"
    manifest.write_text(OBJECTS)
    store = Datastore(tmp_path)
    feed = None
    try:
        ips = lab.up_with(2, manifest, 2, namespace="nb")
        from sanderling.lab.cluster import Lab

        store.start()
        password = tmp_path / "password"
        password.write_text("admin\n")
        feed = subprocess.Popen([sys.executable, "-m", "sanderling.northbound.main", "--restconf",
                                 f"http://127.0.0.1:{store.port}", "--kubeconfig", str(Lab(NAME).kubeconfig),
                                 "--cluster-id", "lab", "--user", "admin", "--password-file", str(password)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "northbound.log", "w"))
        tree = wait_equal(store, "first resync")
        web1 = pods_in(tree)["web-1"]
        print(f"\nfirst resync: {len(tree)} documents; web-1: {json.dumps(web1)}")
        assert web1["interface"][0]["ip-address"] == ips["web-1"] and web1["interface"][0]["network-type"] == "FLAT"
        assert web1["host-ip-address"] == "172.30.0.11" and web1["cluster-id"] == "lab" and web1["network-NS"] == "nb"
        nodes = {e["host-name"]: e for p, e in tree.items() if p.startswith("k8s-node:")}
        assert nodes["node1"]["internal-ip-address"] == "172.30.0.11" and nodes["node1"]["pod-cidr"]
        svc = next(e for p, e in tree.items() if p.startswith("service:service-information/"))
        assert svc["service-ports"][0]["target-port"] == "8080" and 30000 <= svc["service-ports"][0]["node-port"]
        assert endpoints_of(tree, "web") == sorted([ips["web-1"], ips["web-2"]])

        apply(tmp_path, pod("web-3", "node2"))
        wait_pod_ip("web-3")
        tree = wait_equal(store, "pod created", until=lambda t: len(endpoints_of(t, "web")) == 3)
        assert "web-3" in pods_in(tree) and len(endpoints_of(tree, "web")) == 3
        assert lab("delete", "-f", str(tmp_path / "obj.yaml")).returncode == 0
        tree = wait_equal(store, "pod deleted", until=lambda t: "web-3" not in pods_in(t)
                          and len(endpoints_of(t, "web")) == 2)
        assert "web-3" not in pods_in(tree)

        service = json.loads(lab("get", "services", "-n", "nb", "-o", "json").stdout)[0]
        service["spec"]["ports"].append({"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"})
        (tmp_path / "svc.json").write_text(json.dumps(service))
        assert lab("apply", "-f", str(tmp_path / "svc.json")).returncode == 0
        tree = wait_equal(store, "Service edited", until=lambda t: any(
            len(e.get("service-ports", [])) == 2 for p, e in t.items() if p.startswith("service:service-information/")))
        svc = next(e for p, e in tree.items() if p.startswith("service:service-information/"))
        assert sorted(p["port"] for p in svc["service-ports"]) == [80, 9090]

        (tmp_path / "backends.yaml").write_text(pod("web-1", "node1") + "---\n" + pod("web-2", "node2"))
        assert lab("delete", "-f", str(tmp_path / "backends.yaml")).returncode == 0  # scaled to 0
        tree = wait_equal(store, "backends gone", until=lambda t: endpoints_of(t, "web") == [])
        assert endpoints_of(tree, "web") == []

        (tmp_path / "node.yaml").write_text("apiVersion: v1\nkind: Node\nmetadata: {name: node9}\n"
                                            "status: {addresses: [{type: InternalIP, address: 172.30.0.99}]}\n")
        assert lab("apply", "-f", str(tmp_path / "node.yaml")).returncode == 0
        tree = wait_equal(store, "node added", until=lambda t: any(
            e.get("host-name") == "node9" for p, e in t.items() if p.startswith("k8s-node:")))
        assert any(e["host-name"] == "node9" for p, e in tree.items() if p.startswith("k8s-node:"))

        # the controller goes away; the cluster moves on; it comes back with old data and a stranger
        before = len(store.requests())
        store.stop()
        apply(tmp_path, pod("web-4", "node1"))
        wait_pod_ip("web-4")
        assert lab("delete", "-f", str(tmp_path / "node.yaml")).returncode == 0
        service = json.loads(lab("get", "services", "-n", "nb", "-o", "json").stdout)[0]
        service["spec"]["ports"] = service["spec"]["ports"][:1]
        (tmp_path / "svc.json").write_text(json.dumps(service))
        assert lab("apply", "-f", str(tmp_path / "svc.json")).returncode == 0
        old = store.tree()
        old["pod:coe/pods/00000000-0000-0000-0000-000000000001"] = {"uid": "00000000-0000-0000-0000-000000000001",
                                                                    "name": "never-existed"}
        store.state.write_text(json.dumps(old))
        store.start()
        tree = wait_equal(store, "after the controller's restart", timeout=60, until=lambda t: "web-4" in pods_in(t)
                          and not any(e.get("host-name") == "node9" for p, e in t.items() if p.startswith("k8s-node:")))
        after = store.requests()[before:]
        puts = sum(1 for r in after if r.startswith("PUT "))
        deletes = [r for r in after if r.startswith("DELETE ")]
        print(f"after the restart: {len(tree)} documents; requests {len(after)} ({puts} PUT, {len(deletes)} DELETE: "
              f"{deletes})")
        assert "web-4" in pods_in(tree) and "never-existed" not in pods_in(tree)
        assert not any(e["host-name"] == "node9" for p, e in tree.items() if p.startswith("k8s-node:"))
        assert {r.split()[1].rsplit("/", 1)[1] for r in deletes} >= {"00000000-0000-0000-0000-000000000001"}
        assert puts >= len(tree)
        assert feed.poll() is None, (tmp_path / "northbound.log").read_text()[-2000:]
    finally:
        if feed is not None:
            feed.terminate()
            feed.wait(10)
        store.stop()
        assert lab("down").returncode == 0
