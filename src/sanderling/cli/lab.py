"""`sanderling lab up|down|status|apply|delete|get|exec|check|logs|kubeconfig` (see lab/cluster.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sanderling.cli.output import progress, table
from sanderling.lab.cluster import Lab

KINDS = {  # kubectl-style names -> (lightkube resource path)
    "pods": ("lightkube.resources.core_v1", "Pod"), "pod": ("lightkube.resources.core_v1", "Pod"),
    "nodes": ("lightkube.resources.core_v1", "Node"), "node": ("lightkube.resources.core_v1", "Node"),
    "namespaces": ("lightkube.resources.core_v1", "Namespace"), "ns": ("lightkube.resources.core_v1", "Namespace"),
    "services": ("lightkube.resources.core_v1", "Service"), "svc": ("lightkube.resources.core_v1", "Service"),
    "networkpolicies": ("lightkube.resources.networking_v1", "NetworkPolicy"),
    "endpointslices": ("lightkube.resources.discovery_v1", "EndpointSlice"),
    "ippools": ("sanderling.kube.client", "IPPoolResource"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="a multi-node cluster on this machine, in network namespaces")
    lab.add_argument("--name", default="sanderling", help="lab name (several labs can coexist)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", dest="sub_name", default=None, help="lab name (default sanderling)")
    cmds = lab.add_subparsers(dest="lab_command", required=True)
    up = cmds.add_parser("up", parents=[common], help="build the lab and start everything")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--mode", choices=["routed", "overlay"], default="routed")
    up.add_argument("--ip-family", choices=["ipv4", "dual", "ipv6"], default="ipv4",
                    help="dual: every node gets an IPv6 pod subnet too, every pod an IPv6 address; ipv6: pods and "
                         "Services are IPv6 only (over the IPv4 underlay)")
    up.add_argument("--demo", action="store_true", help="also deploy the demo workload and run lab check")
    up.add_argument("--multus", action="store_true",
                    help="Multus (built from its Go module by setup) in front of Sanderling on every node")
    up.add_argument("--control-plane", choices=["sanderling", "kubernetes"], default="sanderling",
                    help="the embedded API server (default, fast) or upstream etcd, kube-apiserver, "
                         "kube-controller-manager and kube-scheduler (built by setup)")
    up.add_argument("--agents", choices=["process", "daemonset"], default="process",
                    help="how agents start: the lab starts one per node (default), or `helm install` of "
                         "charts/sanderling and the lab kubelets run the DaemonSet's pods (--control-plane "
                         "kubernetes)")
    up.add_argument("--br-ext", nargs="?", const="on", default="", choices=["on", "masquerade"],
                    help="every node gets br-ext (uplink ext0 on the fabric, controller tcp:172.30.0.1:6653) for "
                         "an external SDN controller, e.g. examples/osken; `--br-ext masquerade`: pods' "
                         "connections leave with the node's masquerade address")
    up.add_argument("--monitoring", action="store_true",
                    help="also start Prometheus (Debian's) scraping every agent; ask it with `lab query`")
    up.add_argument("--allow-workload-commands", action="store_true",
                    help="kubelets run a Pod's command as root in its sandbox (off: such pods fail)")
    cmds.add_parser("down", parents=[common], help="remove every namespace, process, bridge and file of the lab")
    cmds.add_parser("status", parents=[common], help="nodes, their agents and pods")
    for verb in ("apply", "delete"):
        p = cmds.add_parser(verb, parents=[common],
                            help=f"{verb} objects from YAML (multi-document; a file or a directory)")
        p.add_argument("-f", "--filename", type=Path, required=True)
    get = cmds.add_parser("get", parents=[common], help="list objects of a kind")
    get.add_argument("kind")
    get.add_argument("-n", "--namespace", default=None)
    get.add_argument("-o", "--output", choices=["table", "json"], default="table")
    ex = cmds.add_parser("exec", parents=[common], help="run a command in a pod's network namespace")
    ex.add_argument("pod", help="NAMESPACE/POD")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    cmds.add_parser("check", parents=[common],
                    help="probe ICMP and every containerPort between all pods; print the matrix")
    logs = cmds.add_parser("logs", parents=[common], help="a node agent's log (policy-log lines, errors, ...)")
    logs.add_argument("node", help="node name, e.g. node1")
    logs.add_argument("--grep", default=None, help="only lines containing this text (e.g. policy-log)")
    logs.add_argument("--tail", type=int, default=0, help="only the last N lines (after --grep)")
    ag = cmds.add_parser("agents", parents=[common],
                         help="each node agent's readiness (/readyz), or its objects with --objects PREFIX")
    ag.add_argument("--objects", default=None, metavar="PREFIX",
                    help="objects whose key starts with PREFIX (service/NS/NAME, policy/, pod/NS/...)")
    ag.add_argument("-o", "--output", choices=["table", "json"], default="table")
    me = cmds.add_parser("metrics", parents=[common], help="a node agent's Prometheus metrics (/metrics)")
    me.add_argument("node", help="node name, e.g. node1")
    me.add_argument("--grep", default=None, help="only lines containing this text (e.g. service_endpoint)")
    trace_arguments(cmds.add_parser("trace", parents=[common], help=TRACE_HELP))
    qu = cmds.add_parser("query", parents=[common], help="ask the lab's Prometheus (lab up --monitoring) PromQL")
    qu.add_argument("promql", help="e.g. 'sum by (endpoint) (sanderling_service_endpoint_connections_total)'")
    qu.add_argument("-o", "--output", choices=["table", "json"], default="table")
    cmds.add_parser("kubeconfig", parents=[common], help="print the path of the lab's kubeconfig")
    ra = cmds.add_parser("restart-agent", parents=[common],
                         help="restart a node's agent (the node keeps forwarding on its installed flows)")
    ra.add_argument("node", help="node name, e.g. node1")
    cmds.add_parser("restart-controlplane", parents=[common],
                    help="stop and start the control plane (objects persist; agents relist, traffic keeps flowing)")
    lab.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.name = args.sub_name or args.name  # `lab --name X up` and `lab up --name X` both work
    lab = Lab(args.name, progress)
    cmd = args.lab_command
    if os.geteuid() != 0 and cmd not in ("kubeconfig",):
        print("sanderling lab: needs root (it creates network namespaces and OVS instances)", file=sys.stderr)
        return 1
    if cmd == "up":
        lab.up(args.nodes, args.mode, allow_workload_commands=args.allow_workload_commands,
               multus=args.multus, control_plane=args.control_plane, monitoring=args.monitoring,
               agents=args.agents, br_ext=args.br_ext, ip_family=args.ip_family)
        if args.demo:
            apply(lab, Path(__file__).resolve().parents[1] / "lab" / "demo.yaml")
            wait_running(lab, 60)
            return check(lab)
        return 0
    if cmd == "down":
        lab.down()
        return 0
    if not lab.state():
        print(f"sanderling lab: lab {args.name} is not up (`sanderling lab up --name {args.name}`)", file=sys.stderr)
        return 1
    if cmd == "kubeconfig":
        print(lab.kubeconfig)
        return 0
    if cmd == "status":
        return status(lab)
    if cmd == "apply":
        return apply(lab, args.filename)
    if cmd == "delete":
        return delete(lab, args.filename)
    if cmd == "get":
        return get(lab, args.kind, args.namespace, args.output)
    if cmd == "exec":
        return exec_in_pod(lab, args.pod, [a for a in args.argv if a != "--"])
    if cmd == "check":
        return check(lab)
    if cmd == "logs":
        return agent_logs(lab, args.node, args.grep, args.tail)
    if cmd == "agents":
        return agents(lab, args.objects, args.output)
    if cmd == "metrics":
        return agent_metrics(lab, args.node, args.grep)
    if cmd == "query":
        return prometheus_query(lab, args.promql, args.output)
    if cmd == "trace":
        from sanderling.lab.trace import lab_tracer

        return show_trace(lambda: lab_tracer(lab), args, "sanderling lab trace")
    if cmd == "restart-agent":
        if lab.state().get("agents") == "daemonset":
            from sanderling.lab import daemonset

            daemonset.restart_pod(lab, args.node)
        else:
            lab.restart_agent(args.node)
        print(f"agent of {args.node} restarted")
        return 0
    if cmd == "restart-controlplane":
        lab.restart_controlplane()
        progress(f"control plane of lab {lab.name} restarted")
        return 0
    return 2


def agents(lab: Lab, prefix: str | None, output: str) -> int:
    """Ask every node agent's status endpoint (in the node's namespace) what it has."""
    from sanderling.lab import agent_status

    out = {node["name"]: agent_status.readiness(node["netns"]) if prefix is None
           else agent_status.objects(node["netns"], prefix) for node in lab.state()["nodes"]}
    if output == "json":
        print(json.dumps(out, indent=1))
        return 0
    if prefix is None:
        rows = [[name, "yes" if s.get("ready") else "no", s.get("generation", "-"), s.get("pending", "-"),
                 len(s.get("refused") or {}), "; ".join(s.get("missing") or []) or s.get("error", "")]
                for name, s in out.items()]
        print(table(["node", "ready", "generation", "pending", "refused", "missing"], rows))
        return 0 if all(s.get("ready") for s in out.values()) else 1
    rows = [[name, key, "yes" if o["installed"] else "no", o["flows"], o["groups"], o["buckets"], o["refused"] or ""]
            for name, objects in out.items() for key, o in objects.items() if isinstance(o, dict)]
    print(table(["node", "object", "installed", "flows", "groups", "buckets", "refused"], rows))
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range: a port is 1-65535")
    return port


TRACE_HELP = "why a new connection from a pod arrives or not, stage by stage (ofproto/trace by the agents)"


def trace_arguments(tr: argparse.ArgumentParser) -> None:
    """The arguments of `sanderling trace` and `sanderling lab trace`."""
    tr.add_argument("source", help="the sending pod, NAMESPACE/NAME")
    tr.add_argument("destination", help="NAMESPACE/POD, svc/NAMESPACE/SERVICE (its ClusterIP), "
                                        "nodeport/NAMESPACE/SERVICE[@NODE] or an IP address")
    tr.add_argument("--proto", choices=["tcp", "udp", "icmp"], default="tcp")
    tr.add_argument("--port", type=_port, default=None, help="destination port (a Service's: its first by default)")
    tr.add_argument("--source-ip", default=None, help="send from this address instead of the pod's (spoofing)")
    tr.add_argument("-o", "--output", choices=["table", "json"], default="table")


def show_trace(make: Callable[[], Any], args: argparse.Namespace, prog: str) -> int:
    """Run a trace and print it: exit 0 delivered, 3 not delivered, 1 bad input."""
    from sanderling.tracer import TraceError

    try:
        result = make().trace(args.source, args.destination, args.proto, args.port, args.source_ip)
    except TraceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(table(["node", "stage", "what happened"], [list(s) for s in result.stages]))
    return 0 if result.verdict == "delivered" else 3


def prometheus_query(lab: Lab, promql: str, output: str) -> int:
    from sanderling.lab import monitoring

    if not lab.state().get("monitoring"):
        print(f"sanderling lab: lab {lab.name} runs no Prometheus; start it with `sanderling lab up --monitoring`",
              file=sys.stderr)
        return 1
    try:
        result = monitoring.query(lab.fabric, promql)
    except RuntimeError as exc:
        print(f"sanderling lab: {exc}", file=sys.stderr)
        return 1
    if output == "json":
        print(json.dumps(result, indent=1))
        return 0
    rows = [[", ".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k != "__name__") or "-",
             r["value"][1]] for r in result]
    print(table(["series", "value"], rows) if rows else "(no data)")
    return 0


def agent_metrics(lab: Lab, node: str, grep: str | None) -> int:
    from sanderling.lab import agent_status

    nodes = {n["name"]: n["netns"] for n in lab.state()["nodes"]}
    if node not in nodes:
        print(f"sanderling lab: no node {node!r} in lab {lab.name} (nodes: {', '.join(nodes)})", file=sys.stderr)
        return 1
    try:
        text = agent_status.metrics_text(nodes[node])
    except RuntimeError as exc:
        print(f"sanderling lab: the agent of {node} did not answer on /metrics: {exc}", file=sys.stderr)
        return 1
    for line in text.splitlines():
        if grep is None or grep in line:
            print(line)
    return 0


def agent_logs(lab: Lab, node: str, grep: str | None, tail: int) -> int:
    names = [n["name"] for n in lab.state()["nodes"]]
    if node not in names:
        print(f"sanderling lab: no node {node!r} in lab {lab.name} (nodes: {', '.join(names)})", file=sys.stderr)
        return 1
    path = lab.agent_log(node)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    if grep is not None:
        lines = [ln for ln in lines if grep in ln]
    for line in lines[-tail:] if tail > 0 else lines:
        print(line)
    return 0


def _api(lab: Lab) -> Any:
    from sanderling.kube.client import KubeApi

    return KubeApi(lab.kubeconfig).client


def _resource(kind: str) -> Any:
    import importlib

    if kind.lower() not in KINDS:
        raise SystemExit(f"sanderling lab: unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    module, attr = KINDS[kind.lower()]
    return getattr(importlib.import_module(module), attr)


def _documents(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
    docs = []
    for f in files:
        try:
            docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
        except yaml.YAMLError as exc:
            raise SystemExit(f"sanderling lab: {f}: not valid YAML: {exc}") from None
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise SystemExit(f"sanderling lab: {path}: every document needs apiVersion and kind")
    return docs


def apply(lab: Lab, path: Path) -> int:
    """Create or update every document; a refused one is reported and the others still go in."""
    from lightkube import ApiError, codecs

    from sanderling.kube.apply import create_or_replace

    client = _api(lab)
    failed = 0
    for doc in _documents(path):
        name = f"{doc['kind'].lower()}/{(doc.get('metadata') or {}).get('name')}"
        try:
            obj = codecs.from_dict(doc)
        except Exception as exc:
            print(f"sanderling lab: {name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        try:
            print(f"{name} {create_or_replace(client, obj)}")
        except ApiError as exc:
            print(f"sanderling lab: {name}: {exc.status.message}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def delete(lab: Lab, path: Path) -> int:
    from lightkube import ApiError, codecs

    client = _api(lab)
    for doc in _documents(path):
        obj = codecs.from_dict(doc)
        meta = doc.get("metadata") or {}
        name = f"{doc['kind'].lower()}/{meta.get('name')}"
        try:
            client.delete(type(obj), meta.get("name"), namespace=meta.get("namespace"))
            print(f"{name} deleted")
        except ApiError as exc:
            print(f"{name}: {exc.status.message}")
    return 0


def get(lab: Lab, kind: str, namespace: str | None, output: str = "table") -> int:
    res = _resource(kind)
    client = _api(lab)
    from lightkube.core.resource import NamespacedResource

    namespaced = isinstance(res, type) and issubclass(res, NamespacedResource)
    objs = list(client.list(res, namespace=namespace or "*")) if namespaced else list(client.list(res))
    if output == "json":
        print(json.dumps([o.to_dict() if hasattr(o, "to_dict") else dict(o) for o in objs], indent=1))
        return 0
    kind_name = getattr(res, "__name__", "")
    headers, view = VIEWS.get(kind_name, (["namespace", "name"], lambda d: []))
    rows = []
    for o in objs:
        d = o.to_dict() if hasattr(o, "to_dict") else dict(o)
        meta = d.get("metadata", {})
        rows.append((meta.get("namespace", ""), meta.get("name"), *view(d)))
    print(table(headers, rows))
    return 0


def _ports(ports: list[dict[str, Any]] | None) -> str:
    return ",".join(f"{p.get('port')}{'/' + str(p['nodePort']) if p.get('nodePort') else ''}/"
                    f"{p.get('protocol', 'TCP')}" for p in ports or [])


VIEWS: dict[str, tuple[list[str], Any]] = {  # kind -> (extra columns, object -> their values)
    "Pod": (["namespace", "name", "phase", "ip", "node"],
            lambda d: [(d.get("status") or {}).get("phase", ""), (d.get("status") or {}).get("podIP", ""),
                       (d.get("spec") or {}).get("nodeName", "")]),
    "Node": (["namespace", "name", "podCIDR", "internalIP"],
             lambda d: [(d.get("spec") or {}).get("podCIDR", ""),
                        ",".join(a["address"] for a in (d.get("status") or {}).get("addresses") or []
                                 if a.get("type") == "InternalIP")]),
    "Service": (["namespace", "name", "type", "clusterIP", "ports"],
                lambda d: [(d.get("spec") or {}).get("type", ""), (d.get("spec") or {}).get("clusterIP", ""),
                           _ports((d.get("spec") or {}).get("ports"))]),
    "EndpointSlice": (["namespace", "name", "service", "endpoints", "ports"],
                      lambda d: [((d.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name", ""),
                                 ",".join(e["addresses"][0] + ("" if (e.get("conditions") or {}).get("ready")
                                                              else "(not ready)") for e in d.get("endpoints") or []),
                                 _ports(d.get("ports"))]),
}


def _sandbox(lab: Lab, ns: str, pod: str) -> str:
    from lightkube.resources.core_v1 import Pod

    node = _api(lab).get(Pod, pod, namespace=ns).spec.nodeName
    netns = {n["name"]: n["netns"] for n in lab.state()["nodes"]}[node]
    return f"{netns}-{ns}-{pod}"[:60]


def exec_in_pod(lab: Lab, pod: str, argv: list[str]) -> int:
    if "/" not in pod or not argv:
        print("usage: sanderling lab exec NAMESPACE/POD -- COMMAND...", file=sys.stderr)
        return 2
    ns, name = pod.split("/", 1)
    return subprocess.run(["ip", "netns", "exec", _sandbox(lab, ns, name), *argv]).returncode


def status(lab: Lab) -> int:
    from lightkube.resources.core_v1 import Pod

    state = lab.state()
    pods = list(_api(lab).list(Pod, namespace="*"))
    rows = []
    by_daemonset = state.get("agents") == "daemonset"
    for n in state["nodes"]:
        if by_daemonset:  # the agent is its DaemonSet pod on that node: Ready or not, as the API says
            agent = next((p for p in pods if p.spec and p.spec.nodeName == n["name"] and p.metadata
                          and p.metadata.namespace == "sanderling-system"), None)
            ready = agent is not None and agent.status is not None and any(
                c.type == "Ready" and c.status == "True" for c in agent.status.conditions or [])
            shown = f"{agent.metadata.name} {'Ready' if ready else 'NOT READY'}" if agent and agent.metadata \
                else "NO POD"
        else:
            shown = "running" if _alive(n.get("agent_pid", 0)) else "DOWN"
        count = sum(1 for p in pods if p.spec and p.spec.nodeName == n["name"])
        rows.append((n["name"], n["pod_cidr"], n["underlay_ip"], shown, count))
    if state.get("control_plane") == "kubernetes":
        plane = ", ".join(f"{name} {'running' if _alive(pid) else 'DOWN'}" for name, pid in state["pids"].items())
    else:
        plane = f"control plane {'running' if _alive(state['controlplane_pid']) else 'DOWN'}"
    print(f"lab {lab.name}: mode {state['mode']}, API https://127.0.0.1:{state['api_port']} ({plane})")
    print(table(["node", "pod CIDR", "underlay", "agent", "pods"], rows))
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, TypeError):
        return False


def wait_running(lab: Lab, timeout: float) -> None:
    import time

    from lightkube.resources.core_v1 import Pod

    deadline = time.monotonic() + timeout
    client = _api(lab)
    while time.monotonic() < deadline:
        pods = list(client.list(Pod, namespace="*"))
        if pods and all(p.status and p.status.phase == "Running" for p in pods):
            return
        time.sleep(0.3)
    progress("some pods are not Running yet")


def check(lab: Lab) -> int:
    from lightkube.resources.core_v1 import Pod

    from sanderling.lab import check as probe

    pods = [p.to_dict() for p in _api(lab).list(Pod, namespace="*")]
    node_netns = {n["name"]: n["netns"] for n in lab.state()["nodes"]}
    targets = probe.targets(pods, node_netns)
    count = sum(len(d.probes) * len(s.families(d)) for s in targets for d in targets if s is not d)
    over = " and ".join(f for f, seen in (("IPv4", any(t.ip for t in targets)), ("IPv6", any(t.ip6 for t in targets)))
                        if seen)
    progress(f"probing {len(targets)} pods ({count} probes over {over or 'no address'})")
    results = probe.matrix(targets)
    names = [t.key for t in targets]
    rows = []
    failed = 0
    for src in names:
        row = [src]
        for dst in names:
            if src == dst:
                row.append("-")
                continue
            outcome = results[(src, dst)]
            bad = [what for what, ok in outcome if not ok]
            failed += len(bad)
            row.append("ok" if not bad else "FAIL " + ",".join(bad))
        rows.append(row)
    print(table(["from \\ to", *names], rows))
    total = sum(len(v) for v in results.values())
    print(f"{total - failed} of {total} probes succeeded")
    return 0 if failed == 0 and total > 0 else 1
