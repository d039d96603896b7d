"""The lab end to end: 3 dual-stack nodes (routed, then overlay), the demo workload, the full probe
matrix over both families, kubectl, down; then IPv6-only nodes in both modes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import require_ovs
from .conftest import require_root

NAME = "sltestlab"


def lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanderling.cli.main", "lab", "--name", NAME, *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["routed", "overlay"])
def running_lab(request):
    require_root()
    require_ovs()
    lab("down")
    started = time.monotonic()
    up = lab("up", "--nodes", "3", "--mode", request.param, "--ip-family", "dual", "--demo")
    elapsed = time.monotonic() - started
    yield request.param, up, elapsed
    down = lab("down")
    assert down.returncode == 0, down.stderr
    leftovers = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert NAME not in leftovers, leftovers
    assert not list(Path("/run/sanderling-lab").glob(NAME)), "lab state left behind"
    assert lab("down").returncode == 0  # idempotent


def pods_by_name() -> dict[str, dict]:
    out = json.loads(lab("get", "pods", "-o", "json").stdout)
    return {p["metadata"]["name"]: p for p in out}


def capture(argv: list[str], seconds: float, *probes: list[str]) -> list[str]:
    """tcpdump on the underlay bridge while the probes run in pods."""
    proc = subprocess.Popen(["ip", "netns", "exec", f"{NAME}-fabric", "tcpdump", "-n", "-l", "-i", "fabric0", "-c",
                             "40", *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1.0)
    for probe in probes:
        res = lab("exec", *probe)
        assert res.returncode == 0, res.stdout + res.stderr
    time.sleep(seconds)
    proc.terminate()
    return (proc.communicate(timeout=10)[0] or "").splitlines()


def assert_node_reaches_every_pod() -> None:
    """node1's own kernel reaches every pod over each of its addresses: on other nodes too (routed
    via their underlay address; overlay into br-int, whose flows tunnel it)."""
    targets = [e["ip"] for p in pods_by_name().values() for e in p["status"].get("podIPs") or []]
    assert targets
    for ip in targets:
        ping = subprocess.run(["ip", "netns", "exec", f"{NAME}-node1", "ping", "-c", "1", "-W", "2", ip],
                              capture_output=True, text=True, timeout=30)
        assert ping.returncode == 0, f"node1 -> {ip}: {ping.stdout}{ping.stderr}"


def assert_balanced_and_refused(connect: list[str]) -> None:
    """The Service (`connect` ends with its address) answered by several pods from a pod and from
    the node (whose kernel routes other nodes' pods via the underlay, or in overlay mode into
    br-int's tunnel); a port it does not serve refused at once."""
    deadline = time.monotonic() + 30
    answered: set[str] = set()
    while time.monotonic() < deadline and len(answered) < 2:  # (until the agents have the Service)
        got = lab("exec", "demo/web-0", "--", *connect, "80", "--timeout", "1")
        answered |= {got.stdout.strip()} if got.returncode == 0 else set()
    assert len(answered) >= 2 and answered <= {f"web-{i}" for i in range(6)}, answered
    answered = set()
    for _ in range(6):  # endpoints on other nodes among them
        from_node = subprocess.run(["ip", "netns", "exec", f"{NAME}-node1", *connect, "80", "--timeout", "2"],
                                   capture_output=True, text=True, timeout=30)
        assert from_node.returncode == 0 and from_node.stdout.strip().startswith("web-"), from_node.stderr
        answered.add(from_node.stdout.strip())
    assert len(answered) >= 2, answered
    refused = lab("exec", "demo/web-0", "--", *connect, "81", "--timeout", "2")
    assert refused.returncode != 0 and "refused" in (refused.stdout + refused.stderr), refused


def test_lab_both_modes_matrix_capture_kubectl_and_down(running_lab):
    mode, up, elapsed = running_lab
    print(f"\nlab up --nodes 3 --mode {mode} --ip-family dual --demo took {elapsed:.1f}s")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "(180 probes over IPv4 and IPv6)" in up.stderr, up.stderr  # progress goes to stderr
    assert "180 of 180 probes succeeded" in up.stdout, up.stdout
    status = lab("status")
    assert status.stdout.count("running") >= 4, status.stdout  # 3 agents + control plane
    pods = pods_by_name()
    src, dst = pods["web-0"], pods["web-1"]
    assert src["spec"]["nodeName"] != dst["spec"]["nodeName"]
    a, b = src["status"]["podIP"], dst["status"]["podIP"]
    a6, b6 = (next(e["ip"] for e in p["status"]["podIPs"] if ":" in e["ip"]) for p in (src, dst))
    lines = capture(["not", "arp", "and", "not", "tcp", "port", "6443", "and", "not", "icmp6"], 0.5,
                    ["demo/web-0", "--", "ping", "-c", "2", "-i", "0.2", b],
                    ["demo/web-0", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp", b, "8080"],
                    ["demo/web-0", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp", b6, "8080"])
    # IPv6 between the pods' own addresses: on the wire in routed mode (via the nodes' link-local next
    # hops), inside VXLAN over the IPv4 underlay in overlay mode
    assert any(f"{a6}." in line and f"> {b6}.8080" in line for line in lines), lines
    if mode == "routed":
        # the pods' own addresses on the wire: no encapsulation, no address translation
        assert any(f"{a} > {b}: ICMP echo request" in line for line in lines), lines
        assert any(f"{b} > {a}: ICMP echo reply" in line for line in lines), lines
        assert any(f"{a}." in line and f"> {b}.8080" in line for line in lines), lines
        assert not any(".4789" in line or "VXLAN" in line for line in lines), lines
    else:
        # only the nodes' underlay addresses on the wire, the pods inside VXLAN
        assert any(".4789: VXLAN" in line for line in lines), lines
        inner = [i for i, line in enumerate(lines) if f"IP {a} > {b}" in line]
        assert inner, lines
        # tcpdump prints the decapsulated packet on the line after its VXLAN header
        assert all(i > 0 and ".4789: VXLAN" in lines[i - 1] for i in inner), lines
    # the trace follows the packet to the other node: through the host (routed) or out of the tunnel
    traced = lab("trace", "demo/web-0", "demo/web-1", "--port", "8080", "-o", "json")
    assert traced.returncode == 0, traced.stdout + traced.stderr
    result = json.loads(traced.stdout)
    assert result["verdict"] == "delivered", result
    stages = [(s["node"], s["stage"], s["detail"]) for s in result["stages"]]
    there = dst["spec"]["nodeName"]
    arrival = next(d for n, st, d in stages if st == "arrival")
    assert ("VXLAN tunnel" in arrival) == (mode == "overlay"), stages
    assert (there, "forwarding", "to pod demo/web-1 on this node") in stages, stages
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl missing: run scripts/setup.sh (apt-get install kubernetes-client)"
    kubeconfig = lab("kubeconfig").stdout.strip()
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "from-kubectl", "namespace": "demo"},
                "spec": {"containers": [{"name": "c", "image": "none", "ports": [{"containerPort": 9090}]}]}}
    created = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "create", "-f", "-"], input=json.dumps(manifest),
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    deadline = time.monotonic() + 30
    ip = ""
    while time.monotonic() < deadline and not ip:
        got = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "get", "pod", "-n", "demo", "from-kubectl",
                              "-o", "json"], capture_output=True, text=True, timeout=60)
        ip = (json.loads(got.stdout).get("status") or {}).get("podIP", "") if got.returncode == 0 else ""
        time.sleep(0.3)
    assert ip.startswith("10.244."), ip
    ping = lab("exec", "demo/web-0", "--", "ping", "-c", "1", "-W", "2", ip)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    check = lab("check")
    assert check.returncode == 0 and "succeeded" in check.stdout, check.stdout
    # a dual-stack Service: its IPv6 ClusterIP balances over the pods' IPv6 addresses, for pods and
    # (routed) the node itself, masqueraded; a port it does not serve is refused at once (TCP RST over IPv6)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"},
               "spec": {"ipFamilyPolicy": "PreferDualStack", "selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    created = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "create", "-f", "-"], input=json.dumps(service),
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    svc = json.loads(lab("get", "services", "-n", "demo", "-o", "json").stdout)[0]
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"], svc["spec"]
    vip6 = svc["spec"]["clusterIPs"][1]
    connect = [sys.executable, "-m", "sanderling.probe", "connect", "tcp", vip6]
    assert_balanced_and_refused(connect)
    assert_node_reaches_every_pod()


@pytest.fixture(params=["routed", "overlay"])
def ipv6_lab(request):
    require_root()
    require_ovs()
    lab("down")
    up = lab("up", "--nodes", "3", "--mode", request.param, "--ip-family", "ipv6", "--demo")
    yield request.param, up
    assert lab("down").returncode == 0


def test_an_ipv6_only_lab_in_both_modes(ipv6_lab, tmp_path):
    """IPv6-only nodes over the IPv4 underlay: every pod has one address, IPv6; the whole matrix over
    it; an IPv6 single-stack Service answered by the pods (and, routed, the node), an unserved port
    refused, then ClientIP affinity, then a NodePort from outside to each node's IPv6 address; on the
    wire the pods' own addresses (routed) or VXLAN (overlay)."""
    mode, up = ipv6_lab
    assert up.returncode == 0, up.stdout + up.stderr
    assert "(90 probes over IPv6)" in up.stderr, up.stderr
    assert "90 of 90 probes succeeded" in up.stdout, up.stdout
    pods = pods_by_name()
    assert all([e["ip"] for e in p["status"]["podIPs"]] == [p["status"]["podIP"]] and ":" in p["status"]["podIP"]
               for p in pods.values()), pods
    a, b = pods["web-0"]["status"]["podIP"], pods["web-1"]["status"]["podIP"]
    lines = capture(["not", "arp", "and", "not", "tcp", "port", "6443"], 0.5,
                    ["demo/web-0", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp", b, "8080"])
    if mode == "routed":
        assert any(f"{a}." in line and f"> {b}.8080" in line for line in lines), lines
        assert not any(".4789" in line for line in lines), lines
    else:
        assert any(".4789: VXLAN" in line for line in lines), lines
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"},
               "spec": {"selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    manifest = tmp_path / "web-service.json"
    manifest.write_text(json.dumps(service))
    assert lab("apply", "-f", str(manifest)).returncode == 0
    svc = json.loads(lab("get", "services", "-n", "demo", "-o", "json").stdout)[0]
    assert svc["spec"]["ipFamilies"] == ["IPv6"] and ":" in svc["spec"]["clusterIP"], svc["spec"]
    connect = [sys.executable, "-m", "sanderling.probe", "connect", "tcp", svc["spec"]["clusterIP"]]
    assert_balanced_and_refused(connect)
    assert_node_reaches_every_pod()
    # ClientIP affinity over IPv6: once the agents have it, every connection of the client goes to one pod
    svc["spec"]["sessionAffinity"] = "ClientIP"
    manifest.write_text(json.dumps(svc))
    assert lab("apply", "-f", str(manifest)).returncode == 0
    spread = [sys.executable, "-m", "sanderling.probe", "spread", "tcp", svc["spec"]["clusterIP"], "80"]
    deadline = time.monotonic() + 30
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        got = lab("exec", "demo/web-0", "--", *spread, "--count", "40")
        counts = {k: v for k, v in json.loads(got.stdout).items() if not k.startswith("_")} \
            if got.returncode == 0 else {}
        if list(counts.values()) == [40]:
            break
    assert len(counts) == 1 and next(iter(counts)).startswith("web-"), counts
    # a NodePort from outside to each node's own IPv6 address (on the fabric), steered into br-int
    nodeport = {**service, "metadata": {"name": "web-np", "namespace": "demo"},
                "spec": {**service["spec"], "type": "NodePort"}}
    manifest.write_text(json.dumps(nodeport))
    assert lab("apply", "-f", str(manifest)).returncode == 0
    port = next(s for s in json.loads(lab("get", "services", "-n", "demo", "-o", "json").stdout)
                if s["metadata"]["name"] == "web-np")["spec"]["ports"][0]["nodePort"]
    subprocess.run(["ip", "netns", "exec", f"{NAME}-fabric", "ip", "addr", "add", "fd00:172:30::1/64", "dev",
                    "fabric0", "nodad"], check=True)
    for node_ip in ("fd00:172:30::b", "fd00:172:30::c", "fd00:172:30::d"):  # node1..3 (10 + i)
        deadline = time.monotonic() + 30
        while True:  # (until that node's agent has the Service)
            got = subprocess.run(["ip", "netns", "exec", f"{NAME}-fabric", sys.executable, "-m", "sanderling.probe",
                                  "connect", "tcp", node_ip, str(port), "--timeout", "1"],
                                 capture_output=True, text=True, timeout=30)
            if got.returncode == 0 or time.monotonic() > deadline:
                break
        assert got.returncode == 0 and got.stdout.strip().startswith("web-"), (node_ip, got.stderr)


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_controlplane_restart_and_malformed_manifest(tmp_path):
    """Restart the control plane under traffic: flows stay, agents relist after 410, new pods work;
    a malformed manifest is refused naming the field while the rest of the file goes in."""
    require_root()
    require_ovs()
    from sanderling.lab.apiserver.store import Store
    from sanderling.lab.cluster import Lab

    lab("down")
    try:
        up = lab("up", "--nodes", "3", "--demo")
        assert up.returncode == 0, up.stdout + up.stderr
        pods = pods_by_name()
        target = pods["web-1"]["status"]["podIP"]
        # straight into the sandbox: `lab exec` itself asks the API where the pod runs
        sandbox = f"{NAME}-{pods['web-0']['spec']['nodeName']}-demo-web-0"
        pinger = subprocess.Popen(["ip", "netns", "exec", sandbox, "ping", "-i", "0.05", "-w", "6", target],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        the_lab = Lab(NAME)

        gone_node = pods["web-2"]["spec"]["nodeName"]
        gone_sandbox = f"{NAME}-{gone_node}-demo-web-2"

        def compact_history():  # so the agents' watches come back to 410 Gone and must relist
            store = Store(the_lab.state_dir / "api.db")
            store.create("/namespaces", "", {"metadata": {"name": "while-down"}})
            # a pod deleted while no control plane runs: no event will ever tell the next one
            store.delete("/pods", "demo", "web-2")
            store.compact()
            store.close()

        the_lab.restart_controlplane(compact_history)
        out = pinger.communicate(timeout=30)[0]
        stats = next(line for line in out.splitlines() if "packets transmitted" in line)
        sent, received = int(stats.split()[0]), int(stats.split()[3])
        print(f"\nping across the control-plane restart: {received}/{sent}")
        assert sent > 50 and received >= sent - 2, stats  # traffic does not depend on the control plane
        deadline = time.monotonic() + 20
        logs = ""
        while time.monotonic() < deadline:
            logs = "".join((the_lab.state_dir / f"node{i}" / "agent.log").read_text() for i in (1, 2, 3))
            if logs.count("is gone (compacted); relisting") >= 3:
                break
            time.sleep(0.2)
        assert logs.count("is gone (compacted); relisting") >= 3, "agents did not relist after 410"
        # ... yet its sandbox goes: the new kubelet finds it among its records, CNI DEL releases it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (gone_sandbox in _netns_names()
                                               or "pod demo/web-2: released" not in logs):
            logs = (the_lab.state_dir / gone_node / "agent.log").read_text()
            time.sleep(0.2)
        assert gone_sandbox not in _netns_names(), "sandbox of a pod deleted while down was left behind"
        assert "pod demo/web-2: released" in logs, "its address and port were not released by a CNI DEL"

        manifest = tmp_path / "mixed.yaml"
        manifest.write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: demo}\n"
            "spec: {selector: {app: web}, ports: [{port: 70000}]}\n---\n"
            "apiVersion: v1\nkind: Pod\nmetadata: {name: after-restart, namespace: demo, labels: {app: web}}\n"
            "spec: {containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}\n")
        applied = lab("apply", "-f", str(manifest))
        assert applied.returncode == 1
        assert "spec.ports[0].port" in applied.stderr and "70000" in applied.stderr, applied.stderr
        assert "pod/after-restart created" in applied.stdout, applied.stdout
        deadline = time.monotonic() + 30
        ip = ""
        while time.monotonic() < deadline and not ip:
            ip = (pods_by_name().get("after-restart", {}).get("status") or {}).get("podIP", "")
            time.sleep(0.2)
        assert ip, "pod created after the restart got no address"
        check = lab("check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "services" not in lab("get", "svc").stdout or "broken" not in lab("get", "svc").stdout
    finally:
        assert lab("down").returncode == 0
