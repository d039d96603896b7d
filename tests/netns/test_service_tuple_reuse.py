"""A direct pod-IP connection never depends on an earlier Service connection (issue 21).

Replies from a service target port go through the DNAT zone, because they may belong to a service
connection. Before the fix, a direct connection from the source port of a recent (closed, still in
conntrack) service connection to the same endpoint had its replies taken for that connection's:
the SYN-ACK reached the client from the service address, the client's TIME_WAIT socket answered
with an ACK the server reset, and the pod-IP path failed for as long as OVS kept the entry. Here
each (endpoint on this node / on the other node, TCP / connected UDP, order) reuses one source
port for a service connection and a direct one, and both must answer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .conftest import LabCli, wait_for

NAME = "sltestreuse"
lab = LabCli(NAME)
STATE = Path("/run/sanderling-lab") / NAME
BURST = """
import socket
ok = 0
for _ in range(6000):
    s = socket.create_connection(("{ip}", 8080), timeout=3)
    ok += bool(s.recv(64))
    s.close()
print(ok, "ok")
"""

# one connection from a chosen source port: what the server answered, or why it failed
ONE = """
import socket
def one(host, port, source_port, timeout=3):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.bind(("0.0.0.0", source_port))
        s.connect((host, port))
        return s.recv(64).decode().strip()
    except OSError as e:
        return "failed: " + str(e)
    finally:
        s.close()
"""

# one client port for a service connection and at once a direct one to the same endpoint, many
# times: the direct SYN can overtake the service connection's last segments inside OVS (packets
# are batched per flow), which once let that FIN take the tuple back in the origin zone
REUSE = ONE + """
failed = []
for i in range({count}):
    for host, port in (("{vip}", 80), ("{ip}", 8080)):
        answer = one(host, port, {base} + i)
        if answer != "far":
            failed.append(({base} + i, host, answer))
print(len(failed), "failed", failed[:5])
"""

# a direct connection a moment after a service connection from the same port: the endpoint's
# TIME_WAIT socket of the service connection answers the direct SYN with a challenge ACK, the
# client resets it and sends its SYN again at once; OVS's conntrack has sized the origin entry's
# window from that challenge ACK, so it calls the real SYN-ACK invalid. That SYN-ACK must still
# reach the client from the pod address (it was rewritten to the service address, and the
# connection waited for a SYN retransmission a second later, or timed out after two). A
# connection that needs a retransmission fails here (connect timeout below the 1 s SYN RTO).
# Its ports are below the ephemeral range (32768-60999): the burst's sockets that closed first sit
# in TIME_WAIT on ports of that range, and a bind there fails (EADDRINUSE).
LATER = ONE + """
import time
ports = range({base}, {base} + {count})
failed = [(p, "service", a) for p in ports if (a := one("{vip}", 80, p, 3)) != "near"]
time.sleep(1)  # the scenario: the direct connections come a second after the service ones
failed += [(p, "direct", a) for p in ports if (a := one("{ip}", 8080, p, 0.9)) != "near"]
print(len(failed), "failed", failed[:5])
"""


def _pod(name: str, node: str, ports: str) -> str:
    return (f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: reuse, labels: {{app: {name}}}}}\n"
            f"spec: {{nodeName: {node}, containers: [{{name: c, image: none, ports: {ports}}}]}}\n")


def _service(name: str) -> str:
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: reuse}}\n"
            f"spec: {{selector: {{app: {name}}}, ports: [{{name: t, port: 80, targetPort: 8080}}, "
            f"{{name: u, port: 81, protocol: UDP, targetPort: 8081}}]}}\n")


# near isolated for ingress: only the client may reach its TCP port
POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: near-from-client, namespace: reuse}
spec:
  podSelector: {matchLabels: {app: near}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}]
"""
SERVER_PORTS = "[{containerPort: 8080}, {containerPort: 8081, protocol: UDP}]"
OBJECTS = ("apiVersion: v1\nkind: Namespace\nmetadata: {name: reuse}\n"
           + _pod("client", "node1", "[]") + _pod("near", "node1", SERVER_PORTS) + _pod("far", "node2", SERVER_PORTS)
           + _service("near") + _service("far"))


def _connect(proto: str, host: str, port: int, source_port: int) -> str:
    out = lab("exec", "reuse/client", "--", sys.executable, "-m", "sanderling.probe", "connect", proto, host,
              str(port), "--timeout", "3", "--source-port", str(source_port))
    return out.stdout.strip() if out.returncode == 0 else f"failed: {out.stderr.strip()}"


def _service_ips() -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        items = json.loads(lab("get", "services", "-n", "reuse", "-o", "json").stdout or "[]")
        ips = {s["metadata"]["name"]: s["spec"].get("clusterIP") for s in items}
        if len(ips) == 2 and all(ips.values()):
            return ips
        time.sleep(0.2)
    raise AssertionError("services got no ClusterIP")


def _until_answers(proto: str, host: str, port: int, want: str) -> None:
    """The agents program services asynchronously: wait until the service answers at all."""
    deadline = time.monotonic() + 30
    while _connect(proto, host, port, 0) != want:
        assert time.monotonic() < deadline, f"{proto} {host}:{port} never answered {want}"


def test_direct_connection_reusing_a_service_connections_ports(tmp_path):
    manifest = tmp_path / "reuse.yaml"
    manifest.write_text(OBJECTS)
    try:
        ips = lab.up_with(2, manifest, 3, namespace="reuse")
        vips = _service_ips()
        outcomes = {}
        source_port = 42000
        for server in ("near", "far"):
            for proto, vport, tport in (("tcp", 80, 8080), ("udp", 81, 8081)):
                _until_answers(proto, vips[server], vport, server)
                for order in ("service first", "direct first"):
                    source_port += 1
                    steps = [("service", vips[server], vport), ("direct", ips[server], tport)]
                    if order == "direct first":
                        steps.reverse()
                    for what, host, port in steps:
                        outcomes[(server, proto, order, what)] = _connect(proto, host, port, source_port)
        wrong = {k: v for k, v in outcomes.items() if v != k[0]}
        assert not wrong, f"{len(wrong)} of {len(outcomes)} connections failed: {wrong}"
        reuse = lab("exec", "reuse/client", "--", sys.executable, "-c",
                    REUSE.format(count=300, vip=vips["far"], ip=ips["far"], base=44000), timeout=300)
        assert reuse.returncode == 0 and reuse.stdout.startswith("0 failed"), reuse.stdout + reuse.stderr
        later = lab("exec", "reuse/client", "--", sys.executable, "-c",
                    LATER.format(count=60, vip=vips["near"], ip=ips["near"], base=30000), timeout=300)
        assert later.returncode == 0 and later.stdout.startswith("0 failed"), later.stdout + later.stderr
        # sustained direct traffic to a target port: the null SNAT this used to be tracked with
        # crashed OVS 3.1's userspace conntrack (conn_update_state assertion) after ~3,000 of these
        burst = lab("exec", "reuse/client", "--", sys.executable, "-c", BURST.format(ip=ips["near"]), timeout=120)
        assert burst.returncode == 0 and burst.stdout.strip() == "6000 ok", burst.stdout + burst.stderr
        log = (STATE / "node1" / "ovs" / "ovs-vswitchd.log").read_text()
        assert "EMER" not in log and "assertion" not in log
        assert _connect("tcp", ips["near"], 8080, 43999) == "near"
        # the same with policy on the endpoint: the service connections' policy entries (only their
        # requests pass policy) made the direct SYN invalid for about a minute, and an allowed
        # connection's segments out of the window sized from the challenge ACK were dropped
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        applied = lab("apply", "-f", str(policy))
        assert applied.returncode == 0, applied.stdout + applied.stderr
        wait_for(lambda: lab.agent_objects("policy-pod/reuse/near").get("node1", {})
                 .get("policy-pod/reuse/near", {}).get("installed"), 30, "near isolated on node1")
        denied = lab("exec", "reuse/far", "--", sys.executable, "-m", "sanderling.probe", "connect", "tcp",
                     ips["near"], "8080", "--timeout", "1")
        assert denied.returncode != 0, f"the policy does not isolate near: {denied.stdout}"
        later = lab("exec", "reuse/client", "--", sys.executable, "-c",
                    LATER.format(count=60, vip=vips["near"], ip=ips["near"], base=31000), timeout=300)
        assert later.returncode == 0 and later.stdout.startswith("0 failed"), later.stdout + later.stderr
    finally:
        lab("down")
