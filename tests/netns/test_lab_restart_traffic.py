"""The agent killed -9 and restarted with the API up, under continuous connections (issue 17).

A client pod on node1 connects without pause, alternately through a Service (endpoints on node2
and node3) and directly to a pod on node2 (all isolated by a NetworkPolicy that admits the
client), while a pod the policy does not admit keeps trying that pod. (The direct target is not
a Service endpoint: a client port reused for a service connection and then a direct one to the
same endpoint meets the endpoint's TIME_WAIT socket, a separate limit named in the README.)
Node1's agent is killed -9 and started again; after it has resynced, every node's agent is
restarted in turn, each after the previous one has resynced (a DaemonSet's rolling update, one
node at a time); then the client makes 600 more connections. Every connection must succeed and
the intruder must never get through. (Session 1 saw 4-5 of ~700 fail here: node1's ovs-vswitchd had died of
an OVS 3.1 userspace-conntrack assertion, set off by the null SNAT direct connections to target
ports were tracked with, not by the restart; see the origin zone.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import LabCli

NAME = "slrestart"
lab = LabCli(NAME)
STATE = Path("/run/sanderling-lab") / NAME

OBJECTS = """apiVersion: v1
kind: Namespace
metadata: {name: rt}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: rt, labels: {role: client}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: rt, labels: {role: other}}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: rt, labels: {app: web}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: rt, labels: {app: web}}
spec: {nodeName: node3, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: rt, labels: {app: db}}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: rt}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: rt}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]
"""

CLIENT = """
import json, os, socket, sys, time
vip, direct, marker = sys.argv[1], sys.argv[2], sys.argv[3]
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 2.0
ok, fails, after, slow = 0, [], None, []
i = 0
while after is None or after < 600:
    host, port = (vip, 80) if i % 2 else (direct, 8080)
    i += 1
    phase, began = "connect", time.monotonic()
    try:
        s = socket.create_connection((host, port), timeout=timeout)
        phase = "answer"
        s.recv(64)
        s.close()
        ok += 1
        took = time.monotonic() - began
        if took > 0.9:  # a SYN retransmitted: the first was lost
            slow.append(f"{time.time():.3f} {host}:{port} {took:.2f}s")
    except OSError as exc:
        fails.append(f"{time.time():.3f} {host}:{port} {phase}: {exc}")
    if ok == 100:
        print("flowing", flush=True)
    if after is None and os.path.exists(marker):
        after = 0
    elif after is not None:
        after += 1
    time.sleep(0.01)
print(json.dumps({"ok": ok, "fails": fails, "slow": slow}), flush=True)
"""

INTRUDER = """
import os, socket, sys
direct, marker = sys.argv[1], sys.argv[2]
tries = got_in = 0
while not os.path.exists(marker):
    tries += 1
    try:
        socket.create_connection((direct, 8080), timeout=0.3).close()
        got_in += 1
    except OSError:
        pass
print(tries, got_in, flush=True)
"""


def _agent_pid() -> int:
    state = json.loads((STATE / "state.json").read_text())
    return int(next(n for n in state["nodes"] if n["name"] == "node1")["agent_pid"])


def _resynced(log: Path, offset: int) -> bool:
    return "desired state complete" in log.read_text(errors="replace")[offset:]


def _restart_and_wait(node: str) -> None:
    """Restart the node's agent (stopping it first, if it runs) and wait for its first sync."""
    log = STATE / node / "agent.log"
    offset = len(log.read_text(errors="replace"))
    assert lab("restart-agent", node).returncode == 0
    deadline = time.monotonic() + 60
    while not _resynced(log, offset) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _resynced(log, offset), f"the restarted agent of {node} never completed its first sync"


def test_agent_kill_9_and_rolling_restart_under_traffic_lose_no_connection_and_open_no_hole(tmp_path):
    manifest = tmp_path / "restart.yaml"
    manifest.write_text(OBJECTS)
    restarted, done = tmp_path / "restarted", tmp_path / "done"
    try:
        ips = lab.up_with(3, manifest, 5, namespace="rt")
        vip = json.loads(lab("get", "services", "-n", "rt", "-o", "json").stdout)[0]["spec"]["clusterIP"]
        deadline = time.monotonic() + 30  # policy and service programmed: the intruder is refused
        while lab("exec", "rt/intruder", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp",
                  ips["db"], "8080", "--timeout", "0.5").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        client = subprocess.Popen(lab.argv("exec", "rt/client", "--", sys.executable, "-c", CLIENT, vip, ips["db"],
                                           str(restarted)), stdout=subprocess.PIPE, text=True)
        intruder = subprocess.Popen(lab.argv("exec", "rt/intruder", "--", sys.executable, "-c", INTRUDER,
                                             ips["db"], str(done)), stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "flowing"
        os.kill(_agent_pid(), signal.SIGKILL)
        _restart_and_wait("node1")
        # then a rolling restart of every agent, one node at a time, each back before the next
        # (what the DaemonSet's RollingUpdate with maxUnavailable 1 does on an upgrade)
        for node in ("node1", "node2", "node3"):
            _restart_and_wait(node)
        restarted.touch()
        summary = json.loads(client.communicate(timeout=300)[0].strip().splitlines()[-1])
        done.touch()
        tries, got_in = map(int, intruder.communicate(timeout=60)[0].split())
        print(f"\nkill -9 of node1's agent, then a rolling restart of all 3, under traffic: {summary['ok']} "
              f"connections, {len(summary['fails'])} failed; intruder {tries} tries, {got_in} got in")
        assert summary["fails"] == [] and summary["ok"] > 700
        assert tries > 20 and got_in == 0
        assert "EMER" not in (STATE / "node1" / "ovs" / "ovs-vswitchd.log").read_text()
    finally:
        lab("down")
