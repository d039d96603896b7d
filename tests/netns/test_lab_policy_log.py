"""Policy logging end to end on a 2-node lab: real connections across nodes become structured
lines in the agent log of the node that decided (allowed by an annotated policy, denied for a pod
of an annotated namespace), and the denied connection really fails."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

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
metadata: {name: stranger, namespace: plain, labels: {app: stranger}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: visitor, namespace: watched, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: plain}
spec: {selector: {app: server}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: plain}
spec: {selector: {app: nobody}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: plain}
spec: {type: NodePort, selector: {app: server}, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: lost, namespace: plain}
spec: {nodeName: node9, containers: [{name: c, image: none}]}
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


def metric(node: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels on a node's agent."""
    from sanderling.lab import agent_status
    from sanderling.lab.cluster import Lab

    netns = next(n["netns"] for n in Lab(NAME).state()["nodes"] if n["name"] == node)
    return sum(agent_status.samples(agent_status.metrics_text(netns), name, **labels).values())


def test_allowed_and_denied_connections_are_logged_where_they_are_decided(tmp_path):
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(OBJECTS)
    try:
        ips = lab.up_with(2, manifest, pods=4, monitoring=True)
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

        # the rule's counter (node2's metrics) counts each allowed connection once
        rule = {"namespace": "plain", "policy": "allow-client", "direction": "ingress", "rule": "0"}
        denied_key = {"namespace": "plain", "pod": "server", "direction": "ingress"}
        before, denied_before = metric("node2", "sanderling_policy_rule_connections_total", **rule), \
            metric("node2", "sanderling_policy_default_deny_connections_total", **denied_key)
        out = lab("exec", "plain/client", "--", sys.executable, "-m", "sanderling.probe", "spread", "tcp", server,
                  "8080", "--count", "40")
        assert out.returncode == 0 and '"server": 40' in out.stdout, out.stdout + out.stderr
        assert not connect("plain/stranger", server)  # no rule allows it: plain/server's default deny
        after, denied_after = metric("node2", "sanderling_policy_rule_connections_total", **rule), \
            metric("node2", "sanderling_policy_default_deny_connections_total", **denied_key)
        print(f"rule plain/allow-client ingress/0: {after - before:.0f} connections counted for 40 made; "
              f"default deny of plain/server: {denied_after - denied_before:.0f} for one attempt (SYNs retried)")
        assert after - before == 40
        assert denied_after - denied_before >= 1

        # `lab trace` says what real traffic does, in Kubernetes terms
        services = {s["metadata"]["name"]: s["spec"]["clusterIP"]
                    for s in json.loads(lab("get", "svc", "-n", "plain", "-o", "json").stdout)}
        cases = [  # (source, destination, extra args, verdict, words the explanation must hold, real probe)
            ("plain/client", "plain/server", ["--port", "8080"], "delivered",
             ["allowed by networkpolicy plain/allow-client ingress rule 0", "delivered to pod plain/server"],
             ("plain/client", server, 8080, True)),
            ("plain/client", "svc/plain/web", [], "delivered",
             ["service plain/web", f"DNAT to endpoint {server}:8080", "delivered to pod plain/server"],
             ("plain/client", services["web"], 80, True)),
            ("plain/stranger", "plain/server", ["--port", "8080"], "dropped",
             ["default deny of pod plain/server (ingress)"], ("plain/stranger", server, 8080, False)),
            ("plain/client", "plain/server", ["--port", "8080", "--source-ip", "10.244.0.250"], "dropped",
             ["spoof guard"], None),
            ("plain/client", "svc/plain/nobody", [], "refused", ["has no endpoint"],
             ("plain/client", services["nobody"], 80, False)),
            # a NodePort of the client's own node: whatever happens, the trace must say what a real
            # connection meets (masqueraded, the server's policy sees the node's address)
            ("plain/client", "nodeport/plain/web-np", [], None,
             ["service plain/web-np", f"DNAT to endpoint {server}:8080"], ("plain/client", "172.30.0.11", 30080, None)),
        ]
        for src, dst, extra, verdict, words, probe in cases:
            if probe is not None and probe[3] is None:  # the verdict a real connection gives
                real = lab("exec", probe[0], "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp",
                           probe[1], str(probe[2]), "--timeout", "1")
                verdict = "delivered" if real.returncode == 0 else "dropped"
                probe = (*probe[:3], real.returncode == 0)
            out = lab("trace", src, dst, *extra, "-o", "json")
            got = json.loads(out.stdout)
            text = " | ".join(s["detail"] for s in got["stages"])
            print(f"trace {src} -> {dst} {' '.join(extra)}: {got['verdict']}: {text}")
            assert got["verdict"] == verdict, text
            assert out.returncode == (0 if verdict == "delivered" else 3)
            for word in words:
                assert word in text, (word, text)
            if probe is not None:
                pod, ip, port, ok = probe
                real = lab("exec", pod, "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp", ip,
                           str(port), "--timeout", "1")
                assert (real.returncode == 0) == ok, f"trace says {verdict}, a real connection says otherwise"
        # the same from outside, as on any cluster: `sanderling trace` asks the API for names and the
        # agents at their nodes' addresses (from the fabric namespace, where both are reachable)
        from sanderling.lab.cluster import Lab

        the_lab = Lab(NAME)
        outside = subprocess.run(["ip", "netns", "exec", the_lab.fabric, sys.executable, "-m", "sanderling.cli.main",
                                  "trace", "--kubeconfig", str(the_lab.node_kubeconfig), "plain/stranger",
                                  "plain/server", "--port", "8080", "-o", "json"],
                                 capture_output=True, text=True, timeout=60)
        got = json.loads(outside.stdout)
        print(f"sanderling trace from outside the lab: {got['verdict']}: {got['reason']}")
        assert outside.returncode == 3 and got["verdict"] == "dropped"
        assert "default deny of pod plain/server (ingress)" in got["reason"]
        for args, code, words in ((["plain/ghost", "plain/server", "--port", "8080"], 1, "no pod plain/ghost"),
                                  (["plain/client", "plain/server", "--port", "70000"], 2, "out of range"),
                                  (["plain/lost", "plain/server", "--port", "8080"], 1, "not a node of this cluster")):
            bad = lab("trace", *args)
            print(f"trace {' '.join(args)}: exit {bad.returncode}: {bad.stderr.strip().splitlines()[-1]}")
            # one line that names the problem (argparse prints its usage above a bad argument's)
            assert bad.returncode == code and words in bad.stderr.strip().splitlines()[-1], bad.stderr
            assert sum(1 for line in bad.stderr.splitlines() if line.startswith("sanderling lab trace:")) == 1

        # the lab's Prometheus scrapes both agents; every panel of the dashboard has data
        vip = services["web"]
        out = lab("exec", "plain/client", "--", sys.executable, "-m", "sanderling.probe", "spread", "tcp", vip, "80",
                  "--count", "10")
        assert out.returncode == 0 and '"server": 10' in out.stdout, out.stdout + out.stderr
        from sanderling.lab import monitoring
        from sanderling.lab.cluster import Lab

        fabric = Lab(NAME).fabric
        # one more endpoint while Prometheus watches: a CNI ADD, an EndpointSlice change programmed,
        # bundles synced, all inside its rate() windows
        (tmp_path / "more.yaml").write_text(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: server-2, namespace: plain, labels: {app: server}}\n"
            "spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}\n")
        assert lab("apply", "-f", str(tmp_path / "more.yaml")).returncode == 0
        dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
                                / "grafana-dashboard.json").read_text())

        def empty_panels() -> list[str]:
            empty = []
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    values = [r["value"][1] for r in monitoring.query(fabric, target["expr"])]
                    if not [v for v in values if v not in ("NaN", "+Inf", "-Inf")]:
                        empty.append(panel["title"])
            return empty

        deadline = time.monotonic() + 60
        while (empty := empty_panels()) and time.monotonic() < deadline:
            time.sleep(1)
        assert monitoring.targets_up(fabric) == {"node1": True, "node2": True}
        for panel in dashboard["panels"]:
            print(f"panel {panel['title']!r}: {len(monitoring.query(fabric, panel['targets'][0]['expr']))} series")
        assert not empty, f"dashboard panels without data: {empty}"

        # with ClientIP affinity the trace names the endpoint this client is pinned to
        web = next(x for x in json.loads(lab("get", "svc", "-n", "plain", "-o", "json").stdout)
                   if x["metadata"]["name"] == "web")
        web["spec"]["sessionAffinity"] = "ClientIP"
        (tmp_path / "web.json").write_text(json.dumps(web))
        assert lab("apply", "-f", str(tmp_path / "web.json")).returncode == 0
        lab.wait_agents("service plain/web with affinity and 2 endpoints", "service/plain/web",
                        lambda objs: any(o["installed"] and o["flows"] > 4 and o["buckets"] >= 2
                                         for o in objs.values()))
        pods = {p["metadata"]["name"]: (p.get("status") or {}).get("podIP")
                for p in json.loads(lab("get", "pods", "-n", "plain", "-o", "json").stdout)}
        out = lab("exec", "plain/client", "--", sys.executable, "-m", "sanderling.probe", "spread", "tcp", vip, "80",
                  "--count", "5")
        pinned = [k for k in json.loads(out.stdout) if not k.startswith("_")]
        assert len(pinned) == 1, out.stdout  # affinity: one endpoint for all five
        got = json.loads(lab("trace", "plain/client", "svc/plain/web", "-o", "json").stdout)
        print(f"affinity: real connections went to {pinned[0]}; trace: {got['endpoint']}")
        assert got["endpoint"] == f"{pods[pinned[0]]}:8080" and got["verdict"] == "delivered", got
        bad = lab("logs", "node9")
        assert bad.returncode == 1 and "no node 'node9'" in bad.stderr
    finally:
        assert lab("down").returncode == 0
