"""bench proxy-peer: Sanderling's agent and upstream kube-proxy side by side, on one kube-apiserver.

A 2-node lab on the upstream control plane (`lab up --control-plane kubernetes`). node1 keeps
its Sanderling agent (OVS); node2's agent is stopped and kube-proxy v1.34.4 (built by setup) runs
in node2's namespace with kube-proxy's own identity (`system:kube-proxy`), in nftables mode when
the kernel takes it, else iptables (the result says which). Both watch the same objects, created
through the API: `services` Services without selector (kube-apiserver allocates the ClusterIPs)
and one EndpointSlice each with `endpoints` ready addresses. The addresses are not pods: what is
measured is programming, not forwarding.

One definition for both, each observed from outside the process:
- sync: from the last object written to the dataplane holding all of them. Sanderling: br-int has
  a select group per Service and the last Service's ClusterIP flow. kube-proxy: its metrics show
  a sync that ended after that write with no service or endpoint change pending.
- change: one EndpointSlice write (an endpoint address replaced) to the dataplane holding it.
  Sanderling: the Service's group lists the new address (`ovs-ofctl dump-groups`, polled).
  kube-proxy: a sync ended after the write with nothing pending (polled on its metrics from
  node2's namespace). Changes go one at a time, each waited for; `changes` of them timed on
  Sanderling while kube-proxy is stopped (SIGSTOP), then as many on kube-proxy while the agent
  is stopped, so neither's work takes the 2 cores from the other's measurement.
- RSS of each process at the end.
- first packet: with every Service installed, a client in each node's own network namespace opens
  TCP connections to ClusterIPs whose one endpoint is a real pod on that node (`latency` Services
  per node, created last, each waited for on both). `first`: one connection to each of those
  ClusterIPs, so each is the first packet to that address through the dataplane (OVS: a datapath
  miss and an upcall through the 10,000-Service tables; nftables: its chains); `repeat`: new
  connections to one ClusterIP (OVS: its datapath flow cached); `direct`: the pod's own address,
  the same path without a Service. Figures are connect() times (SYN to SYN-ACK), p50 and p99.
Ratios are Sanderling / kube-proxy: below 1 means Sanderling is ahead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

LAB = "slbpeer"
NAMESPACE = "peer"
ENDPOINT_NET = ipaddress.IPv4Network("10.250.0.0/16")  # routed nowhere: only programming is measured
METRICS = "127.0.0.1:10249"
LATENCY_NAMESPACE = "latency"

# Runs in a node's namespace: connect() times in ms to each ClusterIP once (`first`), to the first
# ClusterIP `repeat` times (`repeat`) and to the pod's own address (`direct`), as JSON.
CLIENT = r"""
import json, socket, sys, time
vips, pod, repeat = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
def once(ip, port):
    for attempt in range(3):
        s = socket.socket()
        s.settimeout(3)
        try:
            t = time.perf_counter()
            s.connect((ip, port))
            return (time.perf_counter() - t) * 1000
        except OSError as e:
            error = e
        finally:
            s.close()
    raise SystemExit(f"{ip}:{port}: {error}")
first = [once(v, 80) for v in vips]
print(json.dumps({"first": first, "repeat": [once(vips[0], 80) for _ in range(repeat)],
                  "direct": [once(pod, 8080) for _ in range(repeat)]}))
"""

# Runs in node2's namespace: answers each "WRITE_EPOCH" line with the epoch at which kube-proxy's
# metrics first show a sync that ended after it with nothing pending.
POLLER = r"""
import sys, time, urllib.request
def metrics():
    text = urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=2).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, value = line.rpartition(" ")
        values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values
for line in sys.stdin:
    written = float(line)
    while True:
        try:
            m = metrics()
        except OSError:
            time.sleep(0.05)
            continue
        pending = m.get("kubeproxy_sync_proxy_rules_endpoint_changes_pending", 0) + \
            m.get("kubeproxy_sync_proxy_rules_service_changes_pending", 0)
        if m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0) > written and pending == 0:
            print(time.time(), flush=True)
            break
        time.sleep(0.002)
"""


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanderling.cli.main", "lab", "--name", LAB, *args],
                          capture_output=True, text=True, timeout=timeout)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _endpoint_ip(service: int, endpoint: int, generation: int = 0) -> str:
    return str(ENDPOINT_NET.network_address + ((service * 16 + endpoint + generation * 7) % (ENDPOINT_NET.num_addresses
                                                                                          - 2)) + 1)


def _slice(service: int, endpoints: int, ips: list[str] | None = None) -> dict[str, Any]:
    ips = ips or [_endpoint_ip(service, e) for e in range(endpoints)]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"s{service}", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": f"s{service}",
                                    "endpointslice.kubernetes.io/managed-by": "bench.sanderling.io"}},
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]}


class Peer:
    def __init__(self, progress: Callable[[str], None]) -> None:
        from sanderling.lab.cluster import Lab

        self.progress = progress
        self.lab = Lab(LAB)
        self.kube_proxy: subprocess.Popen[bytes] | None = None
        self.poller: subprocess.Popen[str] | None = None
        self.mode = ""

    def up(self) -> None:
        from lightkube import Client, KubeConfig

        self.lab.down(quiet=True)
        up = _cli("up", "--nodes", "2", "--control-plane", "kubernetes")
        if up.returncode != 0:
            raise SystemExit(f"bench proxy-peer: lab up failed: {up.stderr[-2000:]}")
        self.client = Client(config=KubeConfig.from_file(str(self.lab.kubeconfig)), field_manager="bench")
        state = self.lab.state()
        self.node1 = state["nodes"][0]
        self.node2 = state["nodes"][1]
        from sanderling.process import terminate

        self.servers = self._server_pods()  # while node2's agent still plugs pods in
        terminate(self.node2["agent_pid"], timeout=5.0)  # node2 is kube-proxy's
        self.agent_pid = self.node1["agent_pid"]
        self.br_int = f"unix:{Path(self.node1['dir']) / 'ovs' / 'br-int.mgmt'}"

    def _server_pods(self) -> dict[str, str]:
        """One pod per node serving TCP 8080 (the lab kubelet's probe server); node name -> pod IP."""
        from lightkube import codecs
        from lightkube.resources.core_v1 import Pod

        self.client.create(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": LATENCY_NAMESPACE}}))
        for node in (self.node1, self.node2):
            self.client.create(codecs.from_dict({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"server-{node['name']}", "namespace": LATENCY_NAMESPACE},
                "spec": {"nodeName": node["name"], "containers": [{"name": "s", "image": "lab",
                                                                   "ports": [{"containerPort": 8080}]}]}}))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ips = {}
            for node in (self.node1, self.node2):
                pod = self.client.get(Pod, f"server-{node['name']}", namespace=LATENCY_NAMESPACE)
                if pod.status and pod.status.phase == "Running" and pod.status.podIP:
                    ips[node["name"]] = str(pod.status.podIP)
            if len(ips) == 2:
                return ips
            time.sleep(0.3)
        raise SystemExit("bench proxy-peer: the latency server pods did not start in 120 s")

    def latency_services(self, per_node: int) -> tuple[float, dict[str, list[str]]]:
        """`per_node` Services per node whose only endpoint is that node's server pod; the epoch of
        the last write and each node's ClusterIPs."""
        from lightkube import codecs
        from lightkube.resources.core_v1 import Service

        vips: dict[str, list[str]] = {}
        last = 0.0
        for node in (self.node1, self.node2):
            for i in range(per_node):
                name = f"lat-{node['name']}-{i}"
                self.client.create(codecs.from_dict({
                    "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": LATENCY_NAMESPACE},
                    "spec": {"ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))
                body = _slice(0, 1, [self.servers[node["name"]]])
                body["metadata"].update(name=name, namespace=LATENCY_NAMESPACE,
                                        labels={**body["metadata"]["labels"], "kubernetes.io/service-name": name})
                self.client.create(codecs.from_dict(body))
                last = time.time()
                spec = self.client.get(Service, name, namespace=LATENCY_NAMESPACE).spec
                assert spec is not None
                vips.setdefault(node["name"], []).append(str(spec.clusterIP))
        return last, vips

    def wait_answers(self, node: dict[str, Any], vip: str, timeout: float) -> None:
        probe = (f"import socket; s = socket.create_connection(('{vip}', 80), timeout=1); s.close()")
        deadline = time.monotonic() + timeout
        while subprocess.run(["ip", "netns", "exec", node["netns"], sys.executable, "-c", probe],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench proxy-peer: {vip}:80 does not answer from {node['name']} in {timeout:.0f} s")
            time.sleep(0.5)

    def connect_times(self, node: dict[str, Any], vips: list[str], repeat: int) -> dict[str, list[float]]:
        """Connect times (ms) measured from inside the node's own namespace (see CLIENT)."""
        out = subprocess.run(["ip", "netns", "exec", node["netns"], sys.executable, "-c", CLIENT, ",".join(vips),
                              self.servers[node["name"]], str(repeat)],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"bench proxy-peer: connections from {node['name']} failed: {out.stderr[-1500:]}")
        times: dict[str, list[float]] = json.loads(out.stdout)
        return times

    def start_kube_proxy(self) -> None:
        from sanderling.lab.kubernetes import UPSTREAM_BIN, KubernetesControlPlane

        kcp = KubernetesControlPlane(self.lab.state_dir, self.lab.controlplane_netns, self.lab.pki, "172.30.0.2",
                                     6443, self.lab.state()["api_port"])
        kubeconfig = kcp.kubeconfig_for("system:kube-proxy")
        log = self.lab.state_dir / "kube-proxy.log"
        for mode in ("nftables", "iptables"):
            argv = ["ip", "netns", "exec", self.node2["netns"], str(UPSTREAM_BIN / "kube-proxy"),
                    "--kubeconfig", str(kubeconfig), "--hostname-override", self.node2["name"],
                    "--proxy-mode", mode, "--cluster-cidr", "10.244.0.0/16", "--metrics-bind-address", METRICS,
                    "--healthz-bind-address", "127.0.0.1:10256", "--conntrack-max-per-core", "0", "--v", "1"]
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
            if self._metrics_answer(proc, 30):
                self.kube_proxy, self.mode = proc, mode
                self.progress(f"kube-proxy in {mode} mode on {self.node2['name']} (pid {proc.pid})")
                break
            proc.kill()
            proc.wait()
        else:
            raise SystemExit(f"bench proxy-peer: kube-proxy started in neither mode; see {log}")
        self.poller = subprocess.Popen(["ip", "netns", "exec", self.node2["netns"], sys.executable, "-c", POLLER,
                                        METRICS],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _metrics_answer(self, proc: subprocess.Popen[bytes], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        probe = f"import urllib.request; urllib.request.urlopen('http://{METRICS}/metrics', timeout=1)"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            ok = subprocess.run(["ip", "netns", "exec", self.node2["netns"], sys.executable, "-c", probe],
                                capture_output=True).returncode == 0
            if ok:
                return True
            time.sleep(0.5)
        return False

    def kube_proxy_synced_after(self, written: float) -> float:
        assert self.poller and self.poller.stdin and self.poller.stdout
        self.poller.stdin.write(f"{written}\n")
        self.poller.stdin.flush()
        return float(self.poller.stdout.readline())

    # ---- objects --------------------------------------------------------------------------

    def create(self, services: int, endpoints: int) -> tuple[float, str]:
        """Every Service and EndpointSlice through the API (8 writers); the epoch of the last
        write and the last Service's ClusterIP."""
        from lightkube import codecs
        from lightkube.resources.core_v1 import Namespace, Service

        self.client.create(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": NAMESPACE}}))
        assert Namespace
        last = [0.0]
        lock = threading.Lock()

        def one(i: int) -> None:
            self.client.create(codecs.from_dict({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": NAMESPACE},
                "spec": {"ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))
            self.client.create(codecs.from_dict(_slice(i, endpoints)))
            with lock:
                last[0] = max(last[0], time.time())

        done = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(one, range(services)):
                done += 1
                if done % 1000 == 0:
                    self.progress(f"{done} of {services} Services and EndpointSlices written")
        vip = self.client.get(Service, f"s{services - 1}", namespace=NAMESPACE).spec.clusterIP
        return last[0], str(vip)

    # ---- Sanderling's dataplane -----------------------------------------------------------

    def _ofctl(self, *args: str) -> str:
        return subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", *args], capture_output=True, text=True,
                              check=True).stdout

    def sanderling_synced(self, services: int, vip: str) -> float:
        while True:
            flows = self._ofctl("dump-flows", self.br_int, f"ip,nw_dst={vip}")
            if "group:" in flows:
                groups = self._ofctl("dump-groups", self.br_int).count("type=select")
                if groups >= services:
                    return time.time()
            time.sleep(0.05)

    def sanderling_programmed(self, vip: str) -> None:
        while "group:" not in self._ofctl("dump-flows", self.br_int, f"ip,nw_dst={vip}"):
            time.sleep(0.05)

    def group_of(self, vip: str) -> str:
        flows = self._ofctl("dump-flows", self.br_int, f"ip,nw_dst={vip}")
        return flows.split("group:", 1)[1].split(",")[0].split()[0]

    def sanderling_has(self, group: str, ip: str) -> float:
        while True:
            if f"{ip}" in self._ofctl("dump-groups", self.br_int, group):
                return time.time()
            time.sleep(0.002)

    def change(self, service: int, endpoints: int, generation: int) -> tuple[float, str]:
        ips = [_endpoint_ip(service, e) for e in range(endpoints)]
        new_ip = str(ENDPOINT_NET.network_address + 40000 + generation)
        ips[0] = new_ip
        from lightkube import codecs
        from lightkube.resources.discovery_v1 import EndpointSlice

        current = self.client.get(EndpointSlice, f"s{service}", namespace=NAMESPACE)
        body = _slice(service, endpoints, ips)
        body["metadata"]["resourceVersion"] = current.metadata.resourceVersion
        self.client.replace(codecs.from_dict(body))
        return time.time(), new_ip

    def down(self) -> None:
        for proc in (self.poller, self.kube_proxy):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.lab.down(quiet=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(progress: Callable[[str], None] = lambda _m: None, services: int = 10000, endpoints: int = 10,
        changes: int = 50, latency_services: int = 50, **_: Any) -> dict[str, Any]:
    peer = Peer(progress)
    result: dict[str, Any] = {"bench": "proxy-peer", "services": services, "endpoints": endpoints,
                              "changes": changes}
    try:
        progress("lab on the upstream control plane: 2 nodes")
        peer.up()
        peer.start_kube_proxy()
        result["kube_proxy_mode"] = peer.mode
        progress(f"writing {services} Services x {endpoints} endpoints through kube-apiserver")
        started = time.time()
        written, vip = peer.create(services, endpoints)
        result["write_s"] = round(written - started, 2)
        progress("waiting for both dataplanes")
        both: dict[str, float] = {}

        def wait(name: str, fn: Callable[[], float]) -> None:
            both[name] = fn()

        threads = [threading.Thread(target=wait, args=("sanderling", lambda: peer.sanderling_synced(services, vip))),
                   threading.Thread(target=wait, args=("kube_proxy", lambda: peer.kube_proxy_synced_after(written)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["sanderling_sync_s"] = round(max(0.0, both["sanderling"] - written), 3)
        result["kube_proxy_sync_s"] = round(max(0.0, both["kube_proxy"] - written), 3)
        result["sync_ratio"] = round(result["sanderling_sync_s"] / max(result["kube_proxy_sync_s"], 1e-3), 3)

        assert peer.kube_proxy is not None
        vips = {}

        def target(n: int) -> int:
            service = (n * 97) % services
            if service not in vips:
                vips[service] = str(peer.client.get(_service_res(), f"s{service}", namespace=NAMESPACE).spec.clusterIP)
            return service

        # each measured alone: the other process is stopped (SIGSTOP) while one is timed, so one's
        # sync does not take the CPU from the other's (2 cores); it catches up afterwards
        progress(f"{changes} single-endpoint changes timed on Sanderling (kube-proxy paused)")
        s_ms: list[float] = []
        with _paused(peer.kube_proxy.pid):
            for n in range(changes):
                service = target(n)
                group = peer.group_of(vips[service])
                t_write, ip = peer.change(service, endpoints, n + 1)
                s_ms.append((peer.sanderling_has(group, ip) - t_write) * 1000)
        peer.kube_proxy_synced_after(time.time())
        progress(f"{changes} single-endpoint changes timed on kube-proxy (Sanderling's agent paused)")
        k_ms: list[float] = []
        with _paused(peer.agent_pid):
            for n in range(changes):
                t_write, _ = peer.change(target(n), endpoints, changes + n + 1)
                k_ms.append((peer.kube_proxy_synced_after(t_write) - t_write) * 1000)
        result["sanderling_change_p50_ms"] = round(statistics.median(s_ms), 1)
        result["sanderling_change_p99_ms"] = round(_pct(s_ms, 0.99), 1)
        result["kube_proxy_change_p50_ms"] = round(statistics.median(k_ms), 1)
        result["kube_proxy_change_p99_ms"] = round(_pct(k_ms, 0.99), 1)
        result["change_ratio"] = round(result["sanderling_change_p99_ms"] / max(result["kube_proxy_change_p99_ms"],
                                                                               1e-3), 3)
        assert peer.kube_proxy is not None
        progress(f"{latency_services} Services per node to a pod on that node: first-packet latency")
        lat_written, lat_vips = peer.latency_services(latency_services)
        for vip in lat_vips[peer.node1["name"]]:
            peer.sanderling_programmed(vip)
        # kube-proxy: its metrics cannot tell a sync that began before the watch events arrived
        # (at 10,000 Services one takes ~16 s): the last ClusterIP answering shows they did; one
        # more complete sync after that covers the others. That ClusterIP is then left out of
        # `first` on both nodes (it is no first packet any more).
        peer.wait_answers(peer.node2, lat_vips[peer.node2["name"]][-1], timeout=300)
        peer.kube_proxy_synced_after(time.time())
        for who, node in (("sanderling", peer.node1), ("kube_proxy", peer.node2)):
            times = peer.connect_times(node, lat_vips[node["name"]][:-1], repeat=200)
            for kind, values in times.items():
                result[f"{who}_{kind}_p50_ms"] = round(statistics.median(values), 3)
                result[f"{who}_{kind}_p99_ms"] = round(_pct(values, 0.99), 3)
        result["first_packet_ratio"] = round(result["sanderling_first_p50_ms"]
                                             / max(result["kube_proxy_first_p50_ms"], 1e-3), 3)
        result["sanderling_rss_mb"] = _rss_mb(peer.agent_pid)
        result["kube_proxy_rss_mb"] = _rss_mb(peer.kube_proxy.pid)
        result["rss_ratio"] = round(result["sanderling_rss_mb"] / max(result["kube_proxy_rss_mb"], 0.1), 3)
    finally:
        peer.down()
    return result


@contextlib.contextmanager
def _paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _service_res() -> Any:
    from lightkube.resources.core_v1 import Service

    return Service


if __name__ == "__main__":
    print(json.dumps(run(lambda m: print(m, file=sys.stderr))))
