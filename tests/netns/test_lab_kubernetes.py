"""The lab on the upstream control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler built by setup): what a user of a real cluster does with kubectl, end to end.

One 3-node lab for the module: nodes Ready through the lab kubelets' heartbeats, a Deployment
scheduled over the nodes by kube-scheduler, a Service whose EndpointSlices kube-controller-manager
writes answering from every node, scale to 0 refused at once; kube-apiserver's CRD schema refusing
a malformed IPPool with its message reaching the user; an agent whose ClusterRole lacks one verb
stopping with one line that names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanderling.lab.kubernetes import UPSTREAM_BIN, binaries

from .conftest import LabCli, require_root

NAME = "sltestk8s"
lab = LabCli(NAME)
KUBECTL = UPSTREAM_BIN / "kubectl"


def kubectl(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    kubeconfig = lab("kubeconfig").stdout.strip()
    proc = subprocess.run([str(KUBECTL), "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=120, input=stdin)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc


def until(what: str, probe, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    require_root()
    binaries()  # fails with the line saying how to build them
    lab("down")
    up = lab("up", "--nodes", "3", "--control-plane", "kubernetes", timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield
    finally:
        lab("down")


def _ready_nodes() -> list[str]:
    nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return [n["metadata"]["name"] for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))]


def _web_pods() -> list[dict]:
    return json.loads(kubectl("get", "pods", "-n", "web", "-l", "app=web", "-o", "json").stdout)["items"]


def _connect(client: str, ip: str, port: int) -> str:
    out = lab("exec", f"web/{client}", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp", ip,
              str(port), "--timeout", "2")
    return out.stdout.strip() if out.returncode == 0 else f"failed: {out.stderr.strip()}"


def test_deployment_spread_over_ready_nodes_and_its_service_answers_from_every_node(cluster):
    assert sorted(until("3 nodes Ready", lambda: len(_ready_nodes()) == 3 and _ready_nodes())) == \
        ["node1", "node2", "node3"]
    kubectl("create", "namespace", "web")
    kubectl("create", "deployment", "web", "-n", "web", "--image=none", "--port=8080", "--replicas=6")
    kubectl("expose", "deployment", "web", "-n", "web", "--port=80", "--target-port=8080")
    for i in (1, 2, 3):  # a client on every node
        manifest = (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: client{i}, namespace: web}}\n"
                    f"spec: {{nodeName: node{i}, containers: [{{name: c, image: none}}]}}\n")
        until("the namespace's default ServiceAccount",
              lambda m=manifest: kubectl("apply", "-f", "-", stdin=m, check=False).returncode == 0)

    def running() -> list[dict] | None:
        pods = [p for p in _web_pods() if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
        return pods if len(pods) == 6 else None

    pods = until("6 web pods running", running, timeout=120)
    nodes = {p["spec"]["nodeName"] for p in pods}
    print(f"\nweb pods: {sorted((p['metadata']['name'], p['spec']['nodeName'], p['status']['podIP']) for p in pods)}")
    assert nodes == {"node1", "node2", "node3"}, nodes  # kube-scheduler spreads the replicas
    wide = kubectl("get", "pods", "-n", "web", "-o", "wide").stdout
    header = wide.splitlines()[0].split()
    assert "IP" in header and "NODE" in header, wide
    for p in pods:
        assert p["status"]["podIP"] in wide and p["spec"]["nodeName"] in wide

    vip = json.loads(kubectl("get", "service", "web", "-n", "web", "-o", "json").stdout)["spec"]["clusterIP"]
    names = {p["metadata"]["name"] for p in pods}
    for i in (1, 2, 3):
        client = f"client{i}"
        until(f"the service answers on node{i}", lambda c=client: _connect(c, vip, 80) in names)
        answers = [_connect(client, vip, 80) for _ in range(12)]
        print(f"node{i} -> {vip}: {sorted(set(answers))}")
        assert set(answers) <= names and len(set(answers)) > 1, answers

    kubectl("scale", "deployment", "web", "-n", "web", "--replicas=0")
    until("no web pods", lambda: not _web_pods())

    def refused() -> str | None:  # refused, not dropped: a drop is "timed out" after the probe's 2 s
        got = _connect("client2", vip, 80)
        return got if "refused" in got.lower() else None

    print(f"scaled to 0: {until('the service refuses', refused, timeout=30)}")


def test_malformed_ippool_is_refused_by_the_crd_schema(cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: ipam.sanderling.io/v1alpha1\nkind: IPPool\nmetadata: {name: bad}\n"
                   "spec: {cidrs: [not-a-cidr]}\n")
    out = lab("apply", "-f", str(bad))
    assert out.returncode != 0
    assert "ippool/bad" in out.stderr and "must be a CIDR" in out.stderr, out.stderr
    good = tmp_path / "good.yaml"
    good.write_text("apiVersion: ipam.sanderling.io/v1alpha1\nkind: IPPool\nmetadata: {name: good}\n"
                    "spec: {cidrs: [10.60.0.0/24], excludes: [10.60.0.1]}\n")
    assert lab("apply", "-f", str(good)).returncode == 0


def test_deploy_manifests_are_accepted_by_the_real_apiserver(cluster):
    """kubectl apply --dry-run=server: kube-apiserver's validation and admission of every object
    a user applies to install Sanderling (CRDs, namespace, RBAC, ConfigMap, DaemonSet)."""
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    out = kubectl("apply", "--dry-run=server", "-f", str(deploy / "crds"), "-f", str(deploy)).stdout
    print("\n" + out)
    for obj in ("customresourcedefinition.apiextensions.k8s.io/ippools.ipam.sanderling.io",
                "clusterrole.rbac.authorization.k8s.io/sanderling-agent", "configmap/sanderling-config",
                "daemonset.apps/sanderling-agent"):
        assert f"{obj} " in out and "(server dry run)" in out.split(f"{obj} ")[1].splitlines()[0], out


def test_an_agent_lacking_one_verb_stops_naming_it(cluster, tmp_path):
    role = json.loads(kubectl("get", "clusterrole", "sanderling-agent", "-o", "json").stdout)
    for rule in role["rules"]:
        if "endpointslices" in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "watch"]
    role["metadata"] = {"name": "sanderling-agent-partial"}
    kubectl("apply", "-f", "-", stdin=json.dumps(role))
    kubectl("create", "serviceaccount", "partial", "-n", "sanderling-system")
    kubectl("create", "clusterrolebinding", "partial", "--clusterrole=sanderling-agent-partial",
            "--serviceaccount=sanderling-system:partial")
    token = kubectl("create", "token", "partial", "-n", "sanderling-system").stdout.strip()
    admin = Path(lab("kubeconfig").stdout.strip())
    server = next(line.split("server:")[1].strip() for line in admin.read_text().splitlines() if "server:" in line)
    ca = next(line.split("certificate-authority:")[1].strip() for line in admin.read_text().splitlines()
              if "certificate-authority:" in line)
    config = tmp_path / "partial.kubeconfig"
    config.write_text(f"apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: {server}, "
                      f"certificate-authority: {ca}}}}}]\nusers: [{{name: u, user: {{token: {token}}}}}]\n"
                      f"contexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n")
    agent = subprocess.run([sys.executable, "-m", "sanderling.agent.main", "--node", "node1",
                            "--kubeconfig", str(config), "--state-dir", str(tmp_path / "state"),
                            "--ovs-run-dir", str(tmp_path / "ovs")],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = agent.stderr.strip().splitlines()[-1]
    print(f"\nagent: exit {agent.returncode}: {last}")
    assert agent.returncode != 0
    assert "not allowed to watch endpointslices.discovery.k8s.io" in last, agent.stderr[-2000:]


def test_kube_apiserver_restart_under_traffic_agents_relist_after_410(cluster, tmp_path):
    from sanderling.lab.cluster import Lab

    the_lab = Lab(NAME)
    for i in (1, 3):
        manifest = (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: ping{i}, namespace: default}}\n"
                    f"spec: {{nodeName: node{i}, containers: [{{name: c, image: none}}]}}\n")
        until("the default ServiceAccount", lambda m=manifest: kubectl("apply", "-f", "-", stdin=m,
                                                                        check=False).returncode == 0)

    def ip_of(name: str) -> str:
        pod = json.loads(kubectl("get", "pod", name, "-n", "default", "-o", "json").stdout)
        return (pod.get("status") or {}).get("podIP", "")

    target = until("ping3 has an address", lambda: ip_of("ping3"))
    until("ping1 has an address", lambda: ip_of("ping1"))
    before = sum((the_lab.state_dir / f"node{i}" / "agent.log").read_text().count("is gone (compacted)")
                 for i in (1, 2, 3))
    pinger = subprocess.Popen(["ip", "netns", "exec", f"{NAME}-node1-default-ping1", "ping", "-i", "0.05", "-w", "8",
                               target], stdout=subprocess.PIPE, text=True)
    the_lab.restart_controlplane()
    out = pinger.communicate(timeout=60)[0]
    stats = next(line for line in out.splitlines() if "packets transmitted" in line)
    sent, received = int(stats.split()[0]), int(stats.split()[3])
    print(f"\nping across the kube-apiserver restart: {received}/{sent}")
    assert sent > 80 and received >= sent - 2, stats

    def relisted() -> int:
        after = sum((the_lab.state_dir / f"node{i}" / "agent.log").read_text().count("is gone (compacted)")
                    for i in (1, 2, 3))
        return after - before >= 3 and after - before

    print(f"410 relists after the restart: {until('the agents relist after 410', relisted, timeout=60)}")
    late = ("apiVersion: v1\nkind: Pod\nmetadata: {name: late, namespace: default}\n"
            "spec: {nodeName: node2, containers: [{name: c, image: none}]}\n")
    kubectl("apply", "-f", "-", stdin=late)
    assert until("a pod created after the restart gets an address", lambda: ip_of("late"))
