"""bench reject-flood: a pod floods an unserved ClusterIP port; the agent stays bounded and the
node keeps starting pods.

A 1-node lab, a Service with no endpoints (every packet to it is refused: the Reject table sends
it to the agent, which answers with an ICMP port unreachable, through a meter of 200 packets/s),
and a client pod that sends UDP datagrams to that port, 50,000 a second. Measured during the
flood: the agent's CPU (user + system time over wall time) and the time from creating a pod to
Running with an address, one pod after another. Reference in the same run: the same sender at
the same rate to an unused address of the service CIDR (dropped in OVS, never sent to the agent),
so the machine carries the same load (the sender and OVS take most of the 2 cores) and only the
refusal path differs; also the same start-ups with no flood at all. `ratio` is refused-flood p50
/ dropped-flood p50.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

NAME = "slbenchflood"
SENDER = """
import signal, socket, sys, time
target, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent, started = 0, time.monotonic()
end = started + seconds
while not stop:
    now = time.monotonic()
    if now >= end:
        break
    due = int((now - started) * rate)
    while sent < due:
        try:
            s.sendto(b"flood", (target, port))
        except OSError:
            pass
        sent += 1
print(sent / (time.monotonic() - started), flush=True)
"""


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 1/100 s


def _start_pods(client: Any, names: list[str]) -> list[float]:
    """Create each pod and wait until it is Running with an address; seconds per pod."""
    from lightkube.resources.core_v1 import Pod

    took = []
    for name in names:
        started = time.monotonic()
        client.create(Pod.from_dict({"metadata": {"name": name, "namespace": "flood"},  # type: ignore[call-overload]
                                     "spec": {"containers": [{"name": "c", "image": "none"}]}}))
        while True:
            pod = client.get(Pod, name, namespace="flood")
            if pod.status and pod.status.phase == "Running" and pod.status.podIP:
                break
            if time.monotonic() - started > 60:
                raise RuntimeError(f"pod {name} not Running after 60 s")
            time.sleep(0.01)
        took.append(time.monotonic() - started)
    return took


def run(progress: Callable[[str], None] = lambda _m: None, pods: int = 10, rate: int = 50_000, **_: Any
        ) -> dict[str, Any]:
    from lightkube.resources.core_v1 import Namespace, Service

    from sanderling.kube.client import KubeApi
    from sanderling.lab.cluster import Lab

    lab = Lab(NAME, progress)
    lab.down(quiet=True)
    try:
        lab.up(1, "routed")
        client = KubeApi(lab.kubeconfig).client
        client.create(Namespace.from_dict({"metadata": {"name": "flood"}}))  # type: ignore[call-overload]
        client.create(Service.from_dict({"metadata": {"name": "nobody", "namespace": "flood"},  # type: ignore
                                         "spec": {"selector": {"app": "nobody"},
                                                  "ports": [{"port": 53, "protocol": "UDP"}]}}))
        _start_pods(client, ["flooder"])
        vip = client.get(Service, "nobody", namespace="flood").spec.clusterIP
        unused = "10.96.255.254"  # in the service CIDR, no Service: dropped by a static flow
        sandbox = f"{NAME}-node1-flood-flooder"
        agent_pid = lab.state()["nodes"][0]["agent_pid"]

        def phase(label: str, target: str | None) -> tuple[list[float], float, float]:
            """Pod start-ups (seconds each), the agent's CPU % and the sender's rate meanwhile."""
            sender = None
            if target is not None:
                progress(f"{label}: {rate} datagrams/s to {target}:53, starting {pods} pods")
                sender = subprocess.Popen(["ip", "netns", "exec", sandbox, sys.executable, "-c", SENDER, target,
                                           "53", str(rate), "60"], stdout=subprocess.PIPE, text=True)
                time.sleep(1.0)  # the flood is established before anything is measured
            else:
                progress(f"{label}: starting {pods} pods")
            cpu0, wall0 = _cpu_seconds(agent_pid), time.monotonic()
            took = _start_pods(client, [f"{label}{i}" for i in range(pods)])
            cpu = (_cpu_seconds(agent_pid) - cpu0) / (time.monotonic() - wall0) * 100
            sent = 0.0
            if sender is not None:
                sender.terminate()
                out, _ = sender.communicate(timeout=30)
                sent = float(out.strip() or 0)
            return took, cpu, sent

        quiet, quiet_cpu, _ = phase("quiet", None)
        dropped, dropped_cpu, dropped_pps = phase("dropped", unused)
        refused, refused_cpu, refused_pps = phase("refused", str(vip))
        p50 = {k: statistics.median(v) * 1000 for k, v in (("quiet", quiet), ("dropped", dropped),
                                                           ("refused", refused))}
        ratio = p50["refused"] / p50["dropped"]
        return {
            "benchmark": "reject-flood", "target_pps": rate, "sent_pps_dropped": round(dropped_pps),
            "sent_pps_refused": round(refused_pps),
            "pod_start_p50_ms_quiet": round(p50["quiet"], 1), "pod_start_p50_ms_dropped": round(p50["dropped"], 1),
            "pod_start_p50_ms_refused": round(p50["refused"], 1), "ratio": round(ratio, 2),
            "agent_cpu_pct_quiet": round(quiet_cpu, 1), "agent_cpu_pct_dropped": round(dropped_cpu, 1),
            "agent_cpu_pct_refused": round(refused_cpu, 1),
            "floors": {"ratio": ["<=", 1.3], "agent_cpu_pct_refused": ["<=", 50]},
        }
    finally:
        lab.down(quiet=True)


if __name__ == "__main__":
    print(json.dumps(run(progress=lambda m: print(m, file=sys.stderr))))
