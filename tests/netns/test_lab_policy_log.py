"""Policy logging end to end on a 2-node lab: real connections across nodes become structured
lines in the agent log of the node that decided (allowed by an annotated policy, denied for a pod
of an annotated namespace), and the denied connection really fails."""

from __future__ import annotations

import re
import sys
import time

from .conftest import LabCli

NAME = "sltestlog"

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: watched, annotations: {policy.sanderling.io/log: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: plain, labels: {app: server}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: plain, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: visitor, namespace: watched, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client, namespace: plain, annotations: {policy.sanderling.io/log: "true"}}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]
"""

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*policy-log verdict=(\w+) policy=(\S+) rule=(\S+) "
                  r"src=(\S+) dst=(\S+) proto=(\w+) port=(\d+)$")


lab = LabCli(NAME)


def connect(pod: str, ip: str) -> bool:
    out = lab("exec", pod, "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp", ip, "8080",
              "--timeout", "1")
    return out.returncode == 0


def policy_lines(node: str) -> list[tuple[str, ...]]:
    out = lab("logs", node, "--grep", "policy-log")
    assert out.returncode == 0, out.stderr
    return [m.groups() for m in map(LINE.match, out.stdout.splitlines()) if m]


def test_allowed_and_denied_connections_are_logged_where_they_are_decided(tmp_path):
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(OBJECTS)
    try:
        ips = lab.up_with(2, manifest, pods=3)
        server = ips["server"]
        deadline = time.monotonic() + 20  # the agents see the policy
        while time.monotonic() < deadline and connect("watched/visitor", server):
            time.sleep(0.5)

        assert connect("plain/client", server)  # allowed, logged by the policy
        assert not connect("watched/visitor", server)  # denied, logged for the visitor's namespace
        time.sleep(1.0)
        lines = policy_lines("node2")  # the server's node decides ingress
        print("\n".join(" ".join(g) for g in lines))
        allowed = [g for g in lines if g[1] == "allow"]
        denied = [g for g in lines if g[1] == "deny"]
        want = ("plain/allow-client", "ingress/0/ports", f"plain/client({ips['client']})", f"plain/server({server})",
                "TCP", "8080")
        assert allowed and allowed[-1][2:] == want, allowed
        assert denied and denied[-1][4:] == (f"watched/visitor({ips['visitor']})", f"plain/server({server})",
                                             "TCP", "8080"), denied
        assert not policy_lines("node1")  # nothing isolates the clients: their node logs nothing
        bad = lab("logs", "node9")
        assert bad.returncode == 1 and "no node 'node9'" in bad.stderr
    finally:
        assert lab("down").returncode == 0
