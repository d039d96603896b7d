"""Sanderling installed only by `helm install` of charts/sanderling, on the real control plane (issue 12).

The lab starts no agent itself (`lab up --agents daemonset`): the DaemonSet controller makes one
pod per node, the scheduler binds it, and each node's lab kubelet runs its init container and its
agent (ConfigMap mounted, ServiceAccount token from a TokenRequest, host paths of that node,
readiness from /readyz). On that lab, under continuous connections between pods of different
nodes and through a Service (and an intruder the NetworkPolicy refuses):
- a changed ConfigMap (`helm upgrade --set logLevel=DEBUG`), then a new agent version (image
  tag), each roll the DaemonSet node by node (never two nodes without a Ready agent): 0 failed
  connections, the intruder never in;
- one verb taken from the ClusterRole: the agent's pod is not Ready, with the verb named;
- `helm uninstall` and `sanderling node cleanup` (in each node's view): no bridge, conflist,
  plugin or socket of Sanderling left on any node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .conftest import LabCli
from .test_lab_restart_traffic import CLIENT, INTRUDER, OBJECTS

NAME = "sltestds"
lab = LabCli(NAME)
STATE = Path("/run/sanderling-lab") / NAME


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    from sanderling.lab.kubernetes import binaries

    out = subprocess.run([str(binaries()["kubectl"]), "--kubeconfig", str(STATE / "kubeconfig"), *args],
                         input=stdin, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def the_lab():
    from sanderling.lab.cluster import Lab

    return Lab(NAME)


def watch_rollout(before: dict[str, str], nodes: list[str], timeout: float = 240) -> int:
    """Until every node runs a Ready agent pod that is not one of `before` (node -> uid); returns the
    most nodes seen at once without a Ready agent (a RollingUpdate with maxUnavailable 1: 1)."""
    from sanderling.lab import daemonset

    worst = 0
    deadline = time.monotonic() + timeout
    while True:
        pods = daemonset.agent_pods(the_lab())
        ready = {p["spec"]["nodeName"]: p["metadata"]["uid"] for p in pods if daemonset.is_ready(p)}
        worst = max(worst, sum(1 for n in nodes if n not in ready))
        if all(ready.get(n) not in (None, before[n]) for n in nodes):
            return worst
        assert time.monotonic() < deadline, f"DaemonSet not rolled out after {timeout:.0f} s: {pods}"
        time.sleep(0.1)


def agent_uids() -> dict[str, str]:
    from sanderling.lab import daemonset

    return {p["spec"]["nodeName"]: p["metadata"]["uid"] for p in daemonset.agent_pods(the_lab())}


def test_helm_installed_lab_upgrades_under_traffic_names_a_missing_verb_and_uninstalls_clean(tmp_path):
    from sanderling.lab import daemonset

    manifest = tmp_path / "rt.yaml"
    manifest.write_text(OBJECTS)
    restarted, done = tmp_path / "restarted", tmp_path / "done"
    nodes = ["node1", "node2", "node3"]
    try:
        ips = lab.up_with(3, manifest, 5, namespace="rt", control_plane="kubernetes", agents="daemonset")
        state = the_lab().state()
        assert state["agents"] == "daemonset" and all(n.get("agent_pid", 0) == 0 for n in state["nodes"])
        pods = kubectl("get", "pods", "-n", "sanderling-system", "-o", "json").stdout
        print("\nagents: " + ", ".join(f"{p['metadata']['name']} on {p['spec']['nodeName']} "
                                       f"(sa {p['spec']['serviceAccountName']})" for p in json.loads(pods)["items"]))
        vip = json.loads(lab("get", "services", "-n", "rt", "-o", "json").stdout)[0]["spec"]["clusterIP"]
        deadline = time.monotonic() + 30  # policy and service programmed: the intruder is refused
        while lab("exec", "rt/intruder", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp",
                  ips["db"], "8080", "--timeout", "0.5").returncode == 0:
            assert time.monotonic() < deadline, "the NetworkPolicy never refused the intruder"
            time.sleep(0.2)
        # a connection fails when it has no answer in 5 s (a lost SYN and its first retransmission
        # still succeed on the second, at 3 s; each one over 0.9 s is listed as slow)
        client = subprocess.Popen(lab.argv("exec", "rt/client", "--", sys.executable, "-c", CLIENT, vip, ips["db"],
                                           str(restarted), "5"), stdout=subprocess.PIPE, text=True)
        intruder = subprocess.Popen(lab.argv("exec", "rt/intruder", "--", sys.executable, "-c", INTRUDER,
                                             ips["db"], str(done)), stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "flowing"

        before = agent_uids()
        daemonset.upgrade(the_lab(), {"logLevel": "DEBUG"})  # the ConfigMap changes: its hash rolls the pods
        worst_config = watch_rollout(before, nodes)
        mounted = [(STATE / n / "pods" / uid / "volumes" / "config" / "config.yaml").read_text()
                   for n, uid in agent_uids().items()]
        assert all("log-level: DEBUG" in text for text in mounted), mounted
        before = agent_uids()
        daemonset.upgrade(the_lab(), {"logLevel": "DEBUG", "image": {"tag": "0.1.1"}})  # a new agent version
        worst_version = watch_rollout(before, nodes)
        images = {p["spec"]["containers"][0]["image"] for p in daemonset.agent_pods(the_lab())}
        restarted.touch()
        summary = json.loads(client.communicate(timeout=300)[0].strip().splitlines()[-1])
        done.touch()
        tries, got_in = map(int, intruder.communicate(timeout=60)[0].split())
        print(f"ConfigMap change rolled node by node (at most {worst_config} node without a Ready agent), "
              f"then the version ({images}, at most {worst_version}); under traffic: {summary['ok']} connections, "
              f"{len(summary['fails'])} failed, {len(summary['slow'])} slower than 0.9 s {summary['slow']}; "
              f"intruder {tries} tries, {got_in} got in")
        assert images == {"sanderling/agent:0.1.1"}
        assert worst_config == 1 and worst_version == 1
        assert summary["fails"] == [] and summary["ok"] > 700, summary["fails"]
        assert tries > 20 and got_in == 0

        # one verb less in the ClusterRole: the restarted agent's pod is not Ready, and says which
        role = json.loads(kubectl("get", "clusterrole", "sanderling-agent", "-o", "json").stdout)
        original = json.dumps(role)
        for rule in role["rules"]:
            if "endpointslices" in rule["resources"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != "watch"]
        kubectl("replace", "-f", "-", stdin=json.dumps(role))
        old = agent_uids()["node3"]
        kubectl("delete", "pod", "-n", "sanderling-system", "--wait=false",
                next(p["metadata"]["name"] for p in daemonset.agent_pods(the_lab()) if p["metadata"]["uid"] == old))
        deadline = time.monotonic() + 90
        message = ""
        while "not allowed to watch endpointslices.discovery.k8s.io" not in message:
            assert time.monotonic() < deadline, f"the agent's pod never said which verb it lacks: {message!r}"
            fresh = [p for p in daemonset.agent_pods(the_lab())
                     if p["spec"]["nodeName"] == "node3" and p["metadata"]["uid"] != old]
            if fresh:
                assert not daemonset.is_ready(fresh[0]), "an agent lacking a verb was reported Ready"
                message = next((c.get("message", "") for c in fresh[0]["status"].get("conditions") or []
                                if c["type"] == "Ready"), "")
            time.sleep(0.2)
        print(f"without 'watch endpointslices': node3's agent pod not Ready: {message}")
        back = json.loads(original)
        back["metadata"].pop("resourceVersion", None)
        kubectl("replace", "-f", "-", stdin=json.dumps(back))
        daemonset.wait_rolled_out(the_lab(), nodes, timeout=90)  # restarted with backoff, now allowed

        # uninstall: the chart's objects, then each node cleaned in its own view
        config = kubectl("get", "configmap", "sanderling-config", "-n", "sanderling-system",
                         "-o", "jsonpath={.data.config\\.yaml}").stdout
        daemonset.helm(the_lab(), "uninstall", "sanderling", "--namespace", "default", "--wait")
        deadline = time.monotonic() + 60
        while daemonset.agent_pods(the_lab()) or daemonset.agent_processes(the_lab()):
            assert time.monotonic() < deadline, "the agents did not stop after helm uninstall"
            time.sleep(0.2)
        for node in nodes:
            cleaned = daemonset.cleanup_node(the_lab(), node, config)
            assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
            left = daemonset.leftovers(the_lab(), node)
            print(f"{node} after uninstall and cleanup: {left or 'nothing of Sanderling'}")
            assert left == [], left
    finally:
        keep_logs()
        assert lab("down").returncode == 0


def keep_logs() -> None:
    """The agents' and kubelets' logs, kept past `lab down` (in /tmp/sltestds-logs) to read a failure."""
    import shutil

    target = Path("/tmp") / f"{NAME}-logs"
    shutil.rmtree(target, ignore_errors=True)
    for log in [*STATE.glob("*/pods/*/*.log"), *STATE.glob("*.log"), *STATE.glob("*/ovs/*.log")]:
        dest = target / log.relative_to(STATE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, dest)
