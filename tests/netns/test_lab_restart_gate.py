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

def _objects(guarded_node: str, policy_spec: str) -> str:
    """A client on node1, a Service's backend on node2 and a policy-guarded pod."""
    def pod(name: str, node: str, serves: bool) -> str:
        ports = ", ports: [{containerPort: 8080}]" if serves else ""
        return (f"---\napiVersion: v1\nkind: Pod\n"
                f"metadata: {{name: {name}, namespace: gate, labels: {{app: {name}}}}}\n"
                f"spec: {{nodeName: {node}, containers: [{{name: c, image: none{ports}}}]}}\n")
    return ("apiVersion: v1\nkind: Namespace\nmetadata: {name: gate}\n"
            + pod("client", "node1", False)
            + pod("backend", "node2", True) + pod("guarded", guarded_node, True)
            + "---\napiVersion: v1\nkind: Service\nmetadata: {name: backend, namespace: gate}\n"
              "spec: {selector: {app: backend}, ports: [{port: 80, targetPort: 8080}]}\n"
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: guard, namespace: gate}\n"
            + f"spec: {policy_spec}\n")


OBJECTS = _objects("node1", "{podSelector: {matchLabels: {app: guarded}}, policyTypes: [Ingress]}")


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
            down_since = time.monotonic()
            generations = _generations(the_lab)
            before = agent_log.read_text().count("INFO sanderling.openflow.realizer: resync:")
            subprocess.run(["kill", "-9", str(node1["agent_pid"])], check=True)
            rec = the_lab.restart_agent("node1")
            deadline = time.monotonic() + 30
            while agent_log.read_text().count("INFO sanderling.openflow.realizer: resync:") == before:
                assert rec.poll() is None, "the restarted agent exited"
                assert time.monotonic() < deadline, "the restarted agent never connected to its bridge"
                time.sleep(0.1)
            # the API stays down 30 s: every ~2 s, the previous generation still serves and the three
            # paths behave (probes paced over a fixed outage, not a wait for state)
            rounds = 0
            while rounds == 0 or time.monotonic() - down_since < 15:
                seen["service"] = seen.get("service", True) and _connect(vip, 80)
                seen["isolation"] = seen.get("isolation", True) and not _connect(ips["guarded"], 8080)
                seen["pod to pod"] = seen.get("pod to pod", True) and _connect(ips["backend"], 8080)
                seen["previous generation kept"] = (seen.get("previous generation kept", True)
                                                    and generations <= _generations(the_lab))
                rounds += 1
                time.sleep(2.0)
            print(f"\nAPI down {time.monotonic() - down_since:.0f} s, agent restarted: {rounds} rounds of probes")

        the_lab.restart_controlplane(restart_agent_while_the_api_is_down)
        assert seen == {"service": True, "isolation": True, "pod to pod": True,
                        "previous generation kept": True}, seen
        deadline = time.monotonic() + 60
        while len(_generations(the_lab)) != 1:  # converged: the previous generation swept
            assert time.monotonic() < deadline, f"generations still installed: {_generations(the_lab)}"
            time.sleep(0.2)
        assert "previous generation swept" in agent_log.read_text()
        assert _connect(vip, 80) and not _connect(ips["guarded"], 8080)
    finally:
        lab("down")
