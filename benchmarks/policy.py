"""bench policy: 2,000 pods in 100 namespaces and 1,000 NetworkPolicies realised on one node.

1. The agent's policy path (PolicyAgent fed as the informers feed it, conjunctive compiler,
   realizer, one OpenFlow connection) programs an empty bridge (dummy datapath): `realize_s`,
   the flow count, and what a non-conjunctive encoding would need (`cross_product_flows`);
   `address_sets` distinct clause value sets the rules share, `conjunction_actions` in all.
2. One policy edited 100 times (a port changes): each edit recompiles that policy alone and goes
   out as one bundle; `change_p99_ms`.
3. Throughput: iperf3 between two pods on the userspace datapath with no policy, then with the
   1,000 policies installed and the pair selected (isolated, allowed by a rule); the ratio. The
   ratio for a pair no policy selects (`throughput_ratio_unselected`) shows the cost of the flow
   tables alone; the main figure includes conntrack, which isolation needs for replies. Best of 5
   alternated rounds (medians beside it), ovs-vswitchd and the iperf3 pair pinned to separate
   CPUs (_pin).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PREFIX = "slbpol"
NAMESPACES, PODS_PER_NS, POLICIES = 100, 20, 1000


def world(rng: random.Random) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    namespaces = {f"ns-{i}": {"metadata": {"name": f"ns-{i}", "labels": {
        "kubernetes.io/metadata.name": f"ns-{i}", "team": f"t{i % 5}", "env": "prod" if i % 2 else "dev"}}}
        for i in range(NAMESPACES)}
    pods = {}
    base = ipaddress.IPv4Address("10.200.0.10")
    for n in range(NAMESPACES):
        for j in range(PODS_PER_NS):
            ns, name = f"ns-{n}", f"p{j}"
            pods[f"{ns}/{name}"] = {
                "metadata": {"namespace": ns, "name": name, "labels": {"app": f"a{j % 10}",
                                                                        "role": "web" if j % 2 else "db"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080 + j % 3, "protocol": "TCP"}]}]},
                "status": {"podIP": str(base + n * PODS_PER_NS + j)}}
    policies = []
    for i in range(POLICIES):
        ns = f"ns-{i % NAMESPACES}"
        kind = i % 5
        peers: list[dict[str, Any]] = [
            [{"podSelector": {"matchLabels": {"role": "web"}}}],
            [{"namespaceSelector": {"matchLabels": {"team": f"t{i % 5}"}}}],
            [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
              "podSelector": {"matchLabels": {"app": f"a{i % 10}"}}}],
            [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{rng.randrange(1, 200)}.0.0/16"]}}],
            [{"podSelector": {"matchLabels": {"app": f"a{(i + 3) % 10}"}}}],
        ][kind]
        ports = [[{"protocol": "TCP", "port": 80}], [{"protocol": "TCP", "port": 8000, "endPort": 8100}],
                 [{"protocol": "TCP", "port": "http"}], [{"protocol": "UDP", "port": 53}], []][i % 5]
        spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": f"a{i % 10}"}},
                                "ingress": [{"from": peers, **({"ports": ports} if ports else {})}]}
        if i % 4 == 0:
            spec["egress"] = [{"to": [{"namespaceSelector": {}}]}]
            spec["policyTypes"] = ["Ingress", "Egress"]
        policies.append({"metadata": {"namespace": ns, "name": f"np-{i}"}, "spec": spec})
    return namespaces, pods, policies


def _edits(target: dict[str, Any], count: int = 100) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, policy) for `count` edits of one policy: its first ingress rule's port changes."""
    key = f"{target['metadata']['namespace']}/{target['metadata']['name']}"
    for n in range(count):
        edited = json.loads(json.dumps(target))
        edited["spec"]["ingress"][0]["ports"] = [{"protocol": "TCP", "port": 1000 + n}]
        yield key, edited


def _realize(progress: Callable[[str], None]) -> dict[str, Any]:
    from sanderling.agent.main import tune_gc
    from sanderling.agent.policy_agent import PolicyAgent
    from sanderling.compiler import policy as compiler
    from sanderling.model.policy import pod_info, policy_from
    from sanderling.openflow import ir
    from sanderling.openflow.connection import Connection
    from sanderling.openflow.realizer import Realizer
    from sanderling.ovs.ovsdb import Ovsdb
    from sanderling.ovs.runtime import OvsRuntime

    tune_gc()
    rng = random.Random(11)
    namespaces, pods, policies = world(rng)
    run_dir = Path(tempfile.mkdtemp(prefix="sanderling-bench-pol-"))
    runtime = OvsRuntime(run_dir, datapath="dummy")
    runtime.start()
    db = Ovsdb(runtime.db_endpoint)
    try:
        db.ensure_bridge("pol", "dummy")

        async def go() -> dict[str, Any]:
            conn = await Connection.open(runtime.mgmt_target("pol"), timeout=10)
            realizer = Realizer(1)
            deferred: list[Callable[[], None]] = []
            agent = PolicyAgent("n1", realizer, lambda: None, schedule=deferred.append)
            progress(f"{len(pods)} pods, {len(namespaces)} namespaces, {len(policies)} policies: realize")
            started = time.perf_counter()
            agent.start()
            for key, obj in namespaces.items():
                agent.namespace_changed(key, obj)
            for key, obj in pods.items():
                agent.pod_changed(key, obj)
            for pol in policies:
                agent.policy_changed(f"{pol['metadata']['namespace']}/{pol['metadata']['name']}", pol)
            for fn in deferred:
                fn()
            deferred.clear()
            compiled = time.perf_counter()
            result = await realizer.sync(conn)
            await conn.barrier()
            realized = time.perf_counter()
            if result.failed:
                raise RuntimeError(f"refused: {list(result.failed.items())[:1]}")
            installed = [f for s in realizer.installed_state().values() for f in s.flows.values()]
            conj_per_flow = [sum(isinstance(a, ir.Conjunction) for a in f.actions) for f in installed]
            shared_sets = agent.shared.set_count()
            progress("100 edits of one policy, one bundle each")
            times = []
            for key, edited in _edits(policies[7]):
                t0 = time.perf_counter()
                agent.policy_changed(key, edited)
                for fn in deferred:
                    fn()
                deferred.clear()
                await realizer.sync(conn)
                times.append((time.perf_counter() - t0) * 1000)
            conn.close()
            local = [pod_info(p) for p in pods.values()]
            cluster = compiler.ClusterPods(tuple(local), {k: v["metadata"]["labels"] for k, v in namespaces.items()})
            cross = sum(compiler.cross_product_size(policy_from(p), [x for x in local if x.namespace ==
                                                                     p["metadata"]["namespace"]], cluster)
                        for p in policies)
            times.sort()
            return {"pods": len(pods), "namespaces": len(namespaces), "policies": len(policies),
                    "compile_s": round(compiled - started, 3), "realize_s": round(realized - started, 3),
                    "flows": len(installed), "cross_product_flows": cross, "address_sets": shared_sets,
                    "conjunction_actions": sum(conj_per_flow), "max_conjunctions_per_flow": max(conj_per_flow),
                    "change_p50_ms": round(statistics.median(times), 2),
                    "change_p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}
        return asyncio.run(go())
    finally:
        db.close()
        runtime.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _cpu_times() -> tuple[int, int]:
    """(all, steal) CPU ticks of this machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[7]


def _pin(node: Any) -> list[str]:
    """ovs-vswitchd (all its threads) on CPU 0, the iperf3 pair on the other CPUs: unpinned, the
    three busy threads share two cores as the scheduler pleases and the same setup gives 3.0-6.4
    Gbit/s; pinned, 6.1-6.9. Both sides of the ratio run pinned the same way."""
    cpus = os.cpu_count() or 1
    if cpus < 2:
        return []
    pid = (node.ovs.run_dir / "ovs-vswitchd.pid").read_text().strip()
    subprocess.run(["taskset", "-a", "-p", "-c", "0", pid], check=True, capture_output=True)
    return ["taskset", "-c", f"1-{cpus - 1}"]


def _iperf(node: Any, client: Any, server: Any, seconds: int, pin: list[str]) -> float:
    srv = node.pod_popen(server, [*pin, "iperf3", "-s", "-1"])
    try:
        time.sleep(0.5)
        out = node.pod_exec(client, [*pin, "iperf3", "-c", server.ip, "-t", str(seconds), "-J"],
                            timeout=seconds + 30)
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.kill()
        srv.wait()


def _throughput(seconds: int, rounds: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from sanderling.agent.policy_agent import PolicyAgent
    from sanderling.compiler import node_objects
    from sanderling.lab.node import LocalNode, teardown_prefix
    from sanderling.model.network import PodPort
    from sanderling.openflow.connection import Connection
    from sanderling.openflow.realizer import Realizer

    teardown_prefix(f"{PREFIX}-n1")
    base = Path(tempfile.mkdtemp(prefix="sanderling-bench-pol-thr-"))
    node = LocalNode("n1", "10.244.70.0/24", base, prefix=PREFIX)
    namespaces, pods, policies = world(random.Random(11))
    try:
        node.start(agent=False)
        pin = _pin(node)
        a = node.add_pod("ns-0", "iperf-a", "10.244.70.10")
        b = node.add_pod("ns-0", "iperf-b", "10.244.70.11")
        c = node.add_pod("ns-1", "iperf-c", "10.244.70.12")
        d = node.add_pod("ns-1", "iperf-d", "10.244.70.13")

        async def install(with_policies: bool) -> None:
            conn = await Connection.open(node.ovs.mgmt_target(node.bridge), timeout=10)
            realizer = Realizer(1)
            ports = [PodPort.build(pod.namespace, pod.name, node.ofport(pod), pod.mac, pod.ip) for pod in (a, b, c, d)]
            for key, flows in node_objects.node_objects(node.network, ports).items():
                realizer.set_object(key, flows)
            if with_policies:
                deferred: list[Callable[[], None]] = []
                agent = PolicyAgent("n1", realizer, lambda: None, schedule=deferred.append)
                agent.start()
                for key, obj in namespaces.items():
                    agent.namespace_changed(key, obj)
                for key, obj in pods.items():
                    agent.pod_changed(key, {**obj, "spec": {**obj["spec"], "nodeName": "elsewhere"}})
                for pod, app in ((a, "iperf"), (b, "iperf"), (c, "other"), (d, "other")):
                    agent.pod_changed(f"{pod.namespace}/{pod.name}", {
                        "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": {"app": app}},
                        "spec": {"nodeName": "n1"}, "status": {"podIP": pod.ip}})
                for pol in policies:
                    agent.policy_changed(f"{pol['metadata']['namespace']}/{pol['metadata']['name']}", pol)
                agent.policy_changed("ns-0/iperf", {"metadata": {"namespace": "ns-0", "name": "iperf"}, "spec": {
                    "podSelector": {"matchLabels": {"app": "iperf"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "iperf"}}}],
                                 "ports": [{"protocol": "TCP", "port": 5201}]}]}})
                for fn in deferred:
                    fn()
            await realizer.resync(conn)
            conn.close()

        runs: dict[str, list[float]] = {"none": [], "isolated": [], "unselected": []}
        ticks_before = _cpu_times()
        for r in range(1, rounds + 1):
            progress(f"round {r}/{rounds}: iperf3 {seconds}s without policies, then with the 1,000 installed")
            asyncio.run(install(False))
            runs["none"].append(_iperf(node, a, b, seconds, pin))
            asyncio.run(install(True))
            runs["isolated"].append(_iperf(node, a, b, seconds, pin))
            runs["unselected"].append(_iperf(node, c, d, seconds, pin))
        ticks_after = _cpu_times()
    finally:
        node.teardown()
        shutil.rmtree(base, ignore_errors=True)
    # The host steals this VM's CPUs now and then (single runs of one setup: 0.8-6.9 Gbit/s);
    # interference only ever lowers a run, so the best of the alternated rounds is the figure
    # for what the datapath can do; the medians are reported beside it.
    best = {k: max(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"gbps_no_policy": round(best["none"], 2), "gbps_with_policies": round(best["isolated"], 2),
            "gbps_with_policies_unselected_pair": round(best["unselected"], 2),
            "throughput_ratio": round(best["isolated"] / best["none"], 3),
            "throughput_ratio_unselected": round(best["unselected"] / best["none"], 3),
            "throughput_ratio_of_medians": round(med["isolated"] / med["none"], 3),
            "throughput_runs_gbps": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "cpu_steal_pct": round(100 * (ticks_after[1] - ticks_before[1]) / max(ticks_after[0] - ticks_before[0], 1),
                                   1)}


NETWORK = "bench/fronthaul"


def _network_world(rng: random.Random) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]],
                                                 list[dict[str, Any]]]:
    """The same world on a secondary network: every pod has an interface on NETWORK (its address
    there in its network-status), every policy is a MultiNetworkPolicy for it."""
    from sanderling.model.attachments import ANNOTATION_STATUS
    from sanderling.model.multi_policy import POLICY_FOR

    namespaces, pods, policies = world(rng)
    for pod in pods.values():
        ip = ipaddress.IPv4Address(pod["status"]["podIP"]) - (10 << 24) + (172 << 24)  # 10.x -> 172.x
        pod["metadata"]["annotations"] = {ANNOTATION_STATUS: json.dumps([
            {"name": "bench/pods", "ips": [pod["status"]["podIP"]], "default": True},
            {"name": NETWORK, "interface": "net1", "ips": [str(ip)], "default": False}])}
    for pol in policies:
        pol.update(apiVersion="k8s.cni.cncf.io/v1beta2", kind="MultiNetworkPolicy")
        pol["metadata"]["annotations"] = {POLICY_FOR: NETWORK}
    return namespaces, pods, policies


def _realize_network(progress: Callable[[str], None]) -> dict[str, Any]:
    """The agent's MultiNetworkPolicy path onto a provider bridge (dummy datapath): MultiPolicyAgents
    fed as the informers feed it, the network's PolicyAgent, the node's SecondaryBridges rendering
    and `ovs-ofctl replace-flows --bundle`."""
    from sanderling.agent.main import tune_gc
    from sanderling.agent.multi_policy import MultiPolicyAgents
    from sanderling.ovs.ovsdb import Ovsdb
    from sanderling.ovs.runtime import OvsRuntime
    from sanderling.ovs.secondary import SecondaryBridges, provider_bridge

    tune_gc()
    namespaces, pods, policies = _network_world(random.Random(11))
    run_dir = Path(tempfile.mkdtemp(prefix="sanderling-bench-mnp-"))
    runtime = OvsRuntime(run_dir, datapath="dummy")
    runtime.start()
    db = Ovsdb(runtime.db_endpoint)
    try:
        bridges = SecondaryBridges(db, runtime, None, {"physnet1": "uplink0"}, datapath="dummy")
        bridges.setup()
        deferred: list[Callable[[], None]] = []
        agents = MultiPolicyAgents("n1", lambda: None, schedule=deferred.append)
        agents.attach(bridges)
        nad = {"metadata": {"namespace": "bench", "name": "fronthaul"}, "spec": {"config": json.dumps(
            {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": 100,
             "subnet": "172.200.0.0/16"})}}

        def drain() -> None:
            while deferred:
                deferred.pop(0)()
            bridges.flush_policy()

        progress(f"{len(pods)} pods on {NETWORK}, {len(namespaces)} namespaces, {len(policies)} "
                 "MultiNetworkPolicies: realize")
        started = time.perf_counter()
        agents.nad_changed(NETWORK, nad)
        for key, obj in namespaces.items():
            agents.namespace_changed(key, obj)
        for key, obj in pods.items():
            agents.pod_changed(key, obj)
        for pol in policies:
            agents.policy_changed(f"{pol['metadata']['namespace']}/{pol['metadata']['name']}", pol)
        while deferred:
            deferred.pop(0)()
        compiled = time.perf_counter()
        bridges.flush_policy()
        realized = time.perf_counter()
        bridge = provider_bridge("physnet1")
        installed = len([line for line in runtime.ofctl(bridge, "dump-flows", options=("--no-stats",)).splitlines()
                         if "actions=" in line])
        progress("100 edits of one policy, one add-flows bundle each")
        times = []
        for key, edited in _edits(policies[7]):
            t0 = time.perf_counter()
            agents.policy_changed(key, edited)
            drain()
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        return {"network_compile_s": round(compiled - started, 3), "network_realize_s": round(realized - started, 3),
                "network_flows": installed, "network_policy_flows": bridges.policy_flow_count(bridge),
                "network_change_p50_ms": round(statistics.median(times), 2),
                "network_change_p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}
    finally:
        db.close()
        runtime.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def run(progress: Callable[[str], None] = lambda _m: None, seconds: int = 5, rounds: int = 5,
        network: bool = False, **_: Any) -> dict[str, Any]:
    if network:
        # MultiNetworkPolicy on a secondary network, the pod network's realisation as the reference
        reference = _realize(progress)
        result = {"benchmark": "policy --network", **_realize_network(progress),
                  **{f"pod_network_{k}": v for k, v in reference.items() if k in ("realize_s", "flows",
                                                                                     "change_p99_ms")}}
        result["flows_ratio"] = round(result["network_policy_flows"] / reference["flows"], 3)
        result["floors"] = {"network_realize_s": ["<=", 3], "network_change_p99_ms": ["<=", 100],
                            "flows_ratio": ["<=", 1.1]}
        return result
    # five alternated rounds, best of each (see _throughput and _pin for the noise of single runs)
    result = {"benchmark": "policy", **_realize(progress), **_throughput(seconds, rounds, progress)}
    result["floors"] = {"realize_s": ["<=", 3], "change_p99_ms": ["<=", 100], "throughput_ratio": [">=", 0.9]}
    return result

