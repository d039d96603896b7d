"""bench chaos: churn through the API while agents, ovs-vswitchd and the control plane are killed.

A 3-node lab (routed). For `seconds`, one writer churns pods (created, deleted, relabelled),
Services (with selectors, created and deleted) and NetworkPolicies (created, edited, deleted)
through the API, while at random intervals a fault hits: an agent killed -9 and started again,
a node's ovs-vswitchd killed -9 and started again, or the control plane restarted. Writes the API
refuses or cannot take (it is down) are counted, not fatal. Then, with the churn stopped:

- every agent reports ready (/readyz) and every pod is Running or gone;
- every node's flows and groups equal what a fresh agent compiles from the API's state: each
  node's dataplane is dumped, its agent restarted (a from-scratch compile of the same objects) and
  dumped again, and the two must be identical after normalising what legitimately differs
  between two agents (the generation in cookies, group ids and conjunction ids, which are
  allocated in arrival order: each is replaced by what it stands for);
- nothing leaked: OVS pod ports and IPAM allocations of each node are exactly the API's pods on it;
- one NetworkPolicy conformance case (np14 by default) passes on the same lab.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

LAB = "slchaos"
NAMESPACE = "chaos"
APPS = ("a", "b", "c")
CASE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "netpol" / \
    "np14-should-enforce-policy-based-on-ports.yaml"


def _pod(name: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE,
                                                            "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "lab", "ports": [{"containerPort": 8080}]}]}}


def _service(name: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}}


def _policy(name: str, rng: random.Random) -> dict[str, Any]:
    rule: dict[str, Any] = {"from": [{"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}}]}
    if rng.random() < 0.5:
        rule["ports"] = [{"port": rng.choice([8080, 9090]), "protocol": "TCP"}]
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}, "policyTypes": ["Ingress"],
                            "ingress": [rule]}
    if rng.random() < 0.3:
        spec["policyTypes"].append("Egress")
        spec["egress"] = [{"to": [{"namespaceSelector": {}}]}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


# ---- the dataplane, normalised -----------------------------------------------------------------

_STATS = re.compile(r"\b(duration|n_packets|n_bytes|idle_age|hard_age)=[^,\s]+,?\s*")
_COOKIE = re.compile(r"cookie=0x([0-9a-f]+)")
_GROUP_ID = re.compile(r"group_id=(\d+)")


def dataplane(runtime: Any, bridge: str) -> Counter[str]:
    """The bridge's flows and groups as comparable lines: cookies without their generation, group
    ids replaced by the group's buckets, conjunction ids by the cookie of the rule they stand for."""
    from sanderling.openflow import cookies

    groups = {}
    for line in runtime.ofctl(bridge, "dump-groups").splitlines():
        found = _GROUP_ID.search(line)
        if found:
            groups[found.group(1)] = line.strip().split(",", 1)[1]
    raw = [line.strip() for line in runtime.ofctl(bridge, "dump-flows").splitlines()
           if "cookie=" in line]
    lines = []
    for line in raw:
        line = _STATS.sub("", line)
        line = _COOKIE.sub(lambda m: f"cookie={cookies.with_generation(int(m.group(1), 16), 0):#x}", line)
        lines.append(line)
    conj = {}
    for line in lines:
        found, cookie = re.search(r"conj_id=(\d+)", line), _COOKIE.search(line)
        if found:
            conj[found.group(1)] = cookie.group(1) if cookie else "?"
    out: Counter[str] = Counter()
    for line in lines:
        line = re.sub(r"group:(\d+)", lambda m: f"group:[{groups.get(m.group(1), '?')}]", line)
        line = re.sub(r"conj_id=(\d+)", lambda m: f"conj_id=<{conj.get(m.group(1), m.group(1))}>", line)
        line = re.sub(r"conjunction\((\d+),", lambda m: f"conjunction(<{conj.get(m.group(1), m.group(1))}>,", line)
        if " actions=conjunction(" in line:  # ordered by id on the switch: by what they stand for here
            head, actions = line.split(" actions=", 1)
            line = head + " actions=" + ",".join(sorted(re.findall(r"conjunction\([^)]*\)", actions)))
        out[line] += 1
    for text in groups.values():
        out["group " + text] += 1
    return out


# ---- the run ------------------------------------------------------------------------------------

class Chaos:
    def __init__(self, progress: Callable[[str], None], seed: int) -> None:
        from sanderling.lab.cluster import Lab

        self.progress = progress
        self.rng = random.Random(seed)
        self.lab = Lab(LAB)
        self.actions: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.pods: dict[str, str] = {}  # name -> app, as last written
        self.services: set[str] = set()
        self.policies: set[str] = set()
        self.serial = 0

    def up(self) -> None:
        from lightkube import codecs

        from sanderling.kube.client import KubeApi

        self.lab.down(quiet=True)
        self.lab.up(3, "routed")
        self.client = KubeApi(self.lab.kubeconfig).client
        self.client.create(codecs.from_dict({"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": NAMESPACE}}))

    def _next(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def churn_once(self) -> None:
        from lightkube import codecs
        from lightkube.resources.core_v1 import Pod, Service
        from lightkube.resources.networking_v1 import NetworkPolicy

        rng = self.rng
        choice = rng.choice(["pod+", "pod+", "pod-", "pod~", "svc+", "svc-", "np+", "np~", "np-"])
        if choice == "pod+" and len(self.pods) < 24:
            name, app = self._next("p"), rng.choice(APPS)
            self.client.create(codecs.from_dict(_pod(name, app)))
            self.pods[name] = app
        elif choice == "pod-" and self.pods:
            name = rng.choice(sorted(self.pods))
            self.client.delete(Pod, name, namespace=NAMESPACE, grace_period=0)
            del self.pods[name]
        elif choice == "pod~" and self.pods:
            name, app = rng.choice(sorted(self.pods)), rng.choice(APPS)
            self.client.patch(Pod, name, {"metadata": {"labels": {"app": app}}}, namespace=NAMESPACE)
            self.pods[name] = app
        elif choice == "svc+" and len(self.services) < 8:
            name = self._next("s")
            self.client.create(codecs.from_dict(_service(name, rng.choice(APPS))))
            self.services.add(name)
        elif choice == "svc-" and self.services:
            name = rng.choice(sorted(self.services))
            self.client.delete(Service, name, namespace=NAMESPACE)
            self.services.discard(name)
        elif choice == "np+" and len(self.policies) < 8:
            name = self._next("np")
            self.client.create(codecs.from_dict(_policy(name, rng)))
            self.policies.add(name)
        elif choice == "np~" and self.policies:
            name = rng.choice(sorted(self.policies))
            self.client.replace(codecs.from_dict(_policy(name, rng)))
        elif choice == "np-" and self.policies:
            name = rng.choice(sorted(self.policies))
            self.client.delete(NetworkPolicy, name, namespace=NAMESPACE)
            self.policies.discard(name)
        else:
            return
        self.actions[choice] += 1

    def fault(self) -> None:
        from sanderling.ovs.runtime import OvsRuntime

        state = self.lab.state()
        node = self.rng.choice(state["nodes"])
        kind = self.rng.choice(["kill-agent", "kill-ovs-vswitchd", "restart-control-plane"])
        self.progress(f"fault: {kind}" + ("" if kind == "restart-control-plane" else f" on {node['name']}"))
        if kind == "kill-agent":
            try:
                os.kill(node["agent_pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.lab.restart_agent(node["name"])
        elif kind == "kill-ovs-vswitchd":
            runtime = OvsRuntime(Path(node["dir"]) / "ovs", netns=node["netns"], datapath="netdev")
            runtime.stop_vswitchd(hard=True)
            runtime.start_vswitchd()
        else:
            self.lab.restart_controlplane()
        self.faults[kind] += 1

    def settle(self, timeout: float = 120.0) -> dict[str, Any]:
        """Until every pod is Running with an address and every agent is ready."""
        from lightkube.resources.core_v1 import Pod

        from sanderling.lab import agent_status

        deadline = time.monotonic() + timeout
        pods: list[Any] = []
        while time.monotonic() < deadline:
            try:
                pods = list(self.client.list(Pod, namespace=NAMESPACE))
            except Exception:  # the control plane may still be coming back
                time.sleep(0.5)
                continue
            if all(p.status and p.status.phase == "Running" and p.status.podIP for p in pods):
                break
            time.sleep(0.5)
        not_running = sorted(p.metadata.name for p in pods
                             if not (p.status and p.status.phase == "Running" and p.status.podIP))
        nodes = {n["name"]: n["netns"] for n in self.lab.state()["nodes"]}
        answers = agent_status.wait_ready(nodes, max(10.0, deadline - time.monotonic()))
        return {"pods": len(pods), "pods_not_running": not_running,
                "agents_not_ready": {n: a.get("missing") or a.get("error") for n, a in answers.items()
                                     if not a.get("ready")}}

    def compare_with_fresh_agents(self) -> dict[str, Any]:
        """Each node's dataplane against what a restarted agent installs from the same API state."""
        from sanderling.lab import agent_status
        from sanderling.ovs.runtime import OvsRuntime

        out = {}
        for node in self.lab.state()["nodes"]:
            runtime = OvsRuntime(Path(node["dir"]) / "ovs", netns=node["netns"], datapath="netdev")
            before = dataplane(runtime, "br-int")
            objects_before = _shape(agent_status.objects(node["netns"], ""))
            log_before = self.lab.agent_log(node["name"]).read_text(errors="replace")
            self.lab.restart_agent(node["name"])
            ready = agent_status.wait_ready({node["name"]: node["netns"]}, 60)[node["name"]]
            after = dataplane(runtime, "br-int")
            only_before, only_after = before - after, after - before
            differences = sum(only_before.values()) + sum(only_after.values())
            out[node["name"]] = {"lines": sum(before.values()), "ready": bool(ready.get("ready")),
                                 "only_before": sorted(only_before)[:10], "only_after": sorted(only_after)[:10],
                                 "differences": differences}
            if differences:
                # where the staleness lived: the agent's own desired state (its informers or producers
                # missed a change) or only the switch (the realizer's view of OVS diverged)
                objects_after = _shape(agent_status.objects(node["netns"], ""))
                out[node["name"]]["desired_differs"] = {k: (objects_before.get(k), objects_after.get(k))
                                                        for k in sorted(objects_before.keys() | objects_after.keys())
                                                        if objects_before.get(k) != objects_after.get(k)}
                kept = Path(f"/tmp/sanderling-chaos-{node['name']}-agent.log")
                kept.write_text(log_before + "\n==== fresh agent ====\n"
                                + self.lab.agent_log(node["name"]).read_text(errors="replace")[len(log_before):]
                                + "\n==== OVSDB ports ====\n" + _ports_text(runtime))
                out[node["name"]]["agent_log"] = str(kept)
        return out

    def leaks(self) -> dict[str, Any]:
        """OVS pod ports and IPAM allocations that no pod of the API accounts for (and the reverse)."""
        from lightkube.resources.core_v1 import Pod

        from sanderling.ovs import ovsdb as ovsdb_names
        from sanderling.ovs.ovsdb import Ovsdb
        from sanderling.ovs.runtime import OvsRuntime

        api_pods: dict[str, set[str]] = {}
        for pod in self.client.list(Pod, namespace="*"):
            if pod.spec and pod.spec.nodeName and pod.metadata:
                api_pods.setdefault(pod.spec.nodeName, set()).add(f"{pod.metadata.namespace}/{pod.metadata.name}")
        state = self.lab.state()
        out = {}
        for node in state["nodes"]:
            runtime = OvsRuntime(Path(node["dir"]) / "ovs", netns=node["netns"], datapath="netdev")
            db = Ovsdb(runtime.db_endpoint)
            try:
                records = [r for r in db.ports("br-int") if r.external_ids.get(ovsdb_names.EXT_POD_NAME)]
                ports = {f"{r.external_ids.get(ovsdb_names.EXT_POD_NAMESPACE)}/"
                         f"{r.external_ids.get(ovsdb_names.EXT_POD_NAME)}" for r in records}
                unopened = sorted(f"{r.name} ({r.external_ids.get(ovsdb_names.EXT_POD_NAME)})" for r in records
                                  if r.effective_ofport <= 0)
            finally:
                db.close()
            local = self.lab._local_node(node, state["mode"])
            allocations = {a.pod for a in local.allocations()}
            wanted = api_pods.get(node["name"], set())
            out[node["name"]] = {"ports_without_pod": sorted(ports - wanted),
                                 "pods_without_port": sorted(wanted - ports),
                                 "allocations_without_pod": sorted(allocations - wanted),
                                 "ports_not_opened": unopened}
        return out


def _ports_text(runtime: Any) -> str:
    from sanderling.ovs.ovsdb import Ovsdb

    db = Ovsdb(runtime.db_endpoint)
    try:
        return "\n".join(f"{r.name} ofport={r.ofport} request={r.ofport_request} {dict(r.external_ids)}"
                         for r in db.ports("br-int"))
    finally:
        db.close()


def _shape(objects: dict[str, Any]) -> dict[str, str]:
    """Per object of an agent: what it has, in a form that does not depend on ids or generation."""
    return {key: f"flows={o.get('flows')} groups={o.get('groups')} buckets={o.get('buckets')}"
                 + ("" if o.get("installed") else f" pending={o.get('pending')} refused={o.get('refused')}")
            for key, o in objects.items()}


def run(progress: Callable[[str], None] = lambda _m: None, seconds: int = 300, seed: int = 1,
        case: str = str(CASE), **_: Any) -> dict[str, Any]:
    from sanderling.conformance.netpol import Runner, run_case

    chaos = Chaos(progress, seed)
    result: dict[str, Any] = {"bench": "chaos", "seconds": seconds, "seed": seed}
    try:
        progress("lab of 3 nodes (routed)")
        chaos.up()
        progress(f"{seconds} s of churn through the API with faults")
        refused = 0
        deadline = time.monotonic() + seconds
        next_fault = time.monotonic() + chaos.rng.uniform(4, 10)
        while time.monotonic() < deadline:
            try:
                chaos.churn_once()
            except Exception as exc:  # refused (conflict, not found) or the API is down for a moment
                refused += 1
                if refused <= 5 or refused % 50 == 0:
                    progress(f"write not taken ({refused} so far): {str(exc)[:120]}")
                time.sleep(0.2)
            if time.monotonic() > next_fault:
                chaos.fault()
                next_fault = time.monotonic() + chaos.rng.uniform(4, 10)
            time.sleep(chaos.rng.uniform(0.05, 0.25))
        result["actions"] = dict(chaos.actions)
        result["faults"] = dict(chaos.faults)
        result["writes_not_taken"] = refused
        progress("churn stopped: waiting for pods and agents")
        result.update(chaos.settle())
        leaks = chaos.leaks()  # before the agents restart: a restarted agent's reconcile would hide them
        progress("dataplanes against fresh agents' compiles")
        compared = chaos.compare_with_fresh_agents()
        result["flow_lines"] = {n: c["lines"] for n, c in compared.items()}
        result["flow_differences"] = {n: c["differences"] for n, c in compared.items()}
        result["difference_samples"] = {n: {"only_before": c["only_before"], "only_after": c["only_after"],
                                            "desired_differs": c.get("desired_differs"),
                                            "agent_log": c.get("agent_log")}
                                        for n, c in compared.items() if c["differences"]}
        result["leaks"] = {n: v for n, v in leaks.items() if any(v.values())}
        progress(f"NetworkPolicy case {Path(case).stem} on the same lab")
        with contextlib.redirect_stdout(sys.stderr):  # its PASS/FAIL lines: stdout is the JSON's
            passed, failures = run_case(Runner(chaos.lab), Path(case))
        result["netpol_passed"] = passed
        result["netpol_failed"] = len(failures)
        result["netpol_failures"] = failures[:5]
        result["ok"] = (not result["pods_not_running"] and not result["agents_not_ready"]
                        and not any(result["flow_differences"].values()) and not result["leaks"]
                        and passed > 0 and not failures)
    finally:
        chaos.lab.down(quiet=True)
    return result
