"""An agent restarted while the API is unreachable keeps the node serving (issue 17's readiness
gate, and the restart hazard of issue 20's rule "never a fail-open policy").

The agent of node1 is killed -9 and started again while the control plane is down, so its
informers cannot list. Until they do, the previous generation of flows keeps serving: a Service
connection from node1 still reaches its endpoint on node2, and a pod isolated by a NetworkPolicy
stays isolated. Before the gate, the restart's resync swept the previous generation at once and
installed only what the agent knew without the API: the ClusterIP was dropped and the isolated
pod was open to everyone. When the control plane is back, the agent converges: every flow of the
bridge carries the new generation.
"""

from __future__ import annotations

import subprocess
import sys
import time

from sanderling.lab.cluster import Lab
from sanderling.ovs.runtime import OvsRuntime

from .conftest import LabCli

NAME = "sltestgate"
lab = LabCli(NAME)

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: gate}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: gate, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: gate, labels: {app: backend}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: gate, labels: {app: guarded}}
spec: {nodeName: node1, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: gate}
spec: {selector: {app: backend}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: gate}
spec: {podSelector: {matchLabels: {app: guarded}}, policyTypes: [Ingress]}
"""


def _connect(host: str, port: int) -> bool:
    sandbox = f"{NAME}-node1-gate-client"
    out = subprocess.run(["ip", "netns", "exec", sandbox, sys.executable, "-m", "sanderling.probe", "connect", "tcp",
                          host, str(port), "--timeout", "1"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0


def _generations(the_lab: Lab) -> set[int]:
    node = next(n for n in the_lab.state()["nodes"] if n["name"] == "node1")
    runtime = OvsRuntime(__import__("pathlib").Path(node["dir"]) / "ovs", datapath="netdev")
    flows = runtime.ofctl("br-int", "dump-flows").splitlines()
    return {int(line.split("cookie=")[1].split(",")[0], 16) >> 48 for line in flows if "cookie=" in line}


def test_agent_restart_with_the_api_down_keeps_services_and_isolation(tmp_path):
    manifest = tmp_path / "gate.yaml"
    manifest.write_text(OBJECTS)
    try:
        ips = lab.up_with(2, manifest, 3, namespace="gate")
        svc = next(s for s in __import__("json").loads(lab("get", "svc", "-n", "gate", "-o", "json").stdout)
                   if s["metadata"]["name"] == "backend")
        vip = svc["spec"]["clusterIP"]
        deadline = time.monotonic() + 30
        while not (_connect(vip, 80) and not _connect(ips["guarded"], 8080)):  # programmed everywhere
            assert time.monotonic() < deadline, "service or policy never programmed"
        the_lab = Lab(NAME)
        node1 = next(n for n in the_lab.state()["nodes"] if n["name"] == "node1")
        agent_log = the_lab.agent_log("node1")
        seen: dict[str, bool] = {}

        def restart_agent_while_the_api_is_down() -> None:
            before = agent_log.read_text().count("INFO sanderling.openflow.realizer: resync:")
            subprocess.run(["kill", "-9", str(node1["agent_pid"])], check=True)
            rec = the_lab.restart_agent("node1")
            deadline = time.monotonic() + 30
            while agent_log.read_text().count("INFO sanderling.openflow.realizer: resync:") == before:
                assert rec.poll() is None, "the restarted agent exited"
                assert time.monotonic() < deadline, "the restarted agent never connected to its bridge"
                time.sleep(0.1)
            seen["service"] = _connect(vip, 80)
            seen["isolation"] = not _connect(ips["guarded"], 8080)
            seen["pod to pod"] = _connect(ips["backend"], 8080)

        the_lab.restart_controlplane(restart_agent_while_the_api_is_down)
        assert seen == {"service": True, "isolation": True, "pod to pod": True}, seen
        deadline = time.monotonic() + 60
        while len(_generations(the_lab)) != 1:  # converged: the previous generation swept
            assert time.monotonic() < deadline, f"generations still installed: {_generations(the_lab)}"
            time.sleep(0.2)
        assert "previous generation swept" in agent_log.read_text()
        assert _connect(vip, 80) and not _connect(ips["guarded"], 8080)
    finally:
        lab("down")


KILL_OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: gate}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: gate, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: gate, labels: {app: stranger}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: gate, labels: {app: backend}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: gate, labels: {app: guarded}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: gate}
spec: {selector: {app: backend}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-only, namespace: gate}
spec:
  podSelector: {matchLabels: {app: guarded}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]
"""

LOOP = """
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.recv(64)
        ok += 1
    except OSError:
        failed += 1
    time.sleep(0.01)
print(ok, failed)
"""


def _loop(pod: str, host: str, port: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", f"{NAME}-node1-gate-{pod}", sys.executable, "-c", LOOP, host,
                             str(port), str(seconds)], stdout=subprocess.PIPE, text=True)


def test_agent_kill_9_under_traffic_with_the_api_up_loses_nothing(tmp_path):
    """Issue 17's first fault: continuous connections through a Service and to a policy-isolated
    pod on the other node while node1's agent is killed -9 and restarted: none fails, and the pod
    the policy does not allow never gets through."""
    manifest = tmp_path / "kill.yaml"
    manifest.write_text(KILL_OBJECTS)
    try:
        ips = lab.up_with(2, manifest, 4, namespace="gate")
        vip = next(s for s in __import__("json").loads(lab("get", "svc", "-n", "gate", "-o", "json").stdout)
                   if s["metadata"]["name"] == "backend")["spec"]["clusterIP"]
        deadline = time.monotonic() + 30
        while not (_connect(vip, 80) and _connect(ips["guarded"], 8080)):
            assert time.monotonic() < deadline, "service or policy never programmed"
        the_lab = Lab(NAME)
        agent_log = the_lab.agent_log("node1")
        swept = agent_log.read_text().count("previous generation swept")
        loops = {"service": _loop("client", vip, 80, 12), "isolated pod, allowed": _loop("client", ips["guarded"],
                                                                                             8080, 12),
                 "isolated pod, denied": _loop("stranger", ips["guarded"], 8080, 12)}
        time.sleep(2)  # traffic flowing before the kill
        node1 = next(n for n in the_lab.state()["nodes"] if n["name"] == "node1")
        subprocess.run(["kill", "-9", str(node1["agent_pid"])], check=True)
        the_lab.restart_agent("node1")
        deadline = time.monotonic() + 30
        while agent_log.read_text().count("previous generation swept") == swept:
            assert time.monotonic() < deadline, "the restarted agent never completed its resync"
            time.sleep(0.1)
        counts = {name: tuple(int(x) for x in p.communicate(timeout=60)[0].split()) for name, p in loops.items()}
        print(f"\nconnections (ok, failed) across an agent kill -9 and restart: {counts}")
        assert counts["service"][1] == 0 and counts["service"][0] > 100, counts
        assert counts["isolated pod, allowed"][1] == 0 and counts["isolated pod, allowed"][0] > 100, counts
        assert counts["isolated pod, denied"][0] == 0, counts  # no policy violation
    finally:
        lab("down")
