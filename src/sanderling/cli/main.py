"""`sanderling`: the command line for operators and developers."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sanderling.cli import bench, lab, node
from sanderling.cli.output import table
from sanderling.ovs.runtime import SYSTEM_RUNDIR, OvsError, OvsRuntime


def _ovs(args: argparse.Namespace) -> int:
    runtime = OvsRuntime(args.run_dir, netns=args.netns, datapath=args.datapath,
                         private=args.run_dir != SYSTEM_RUNDIR)
    if args.action == "start":
        runtime.start()
        print(f"OVS running: database {runtime.db_sock}, vswitchd control {runtime.vswitchd_ctl}")
    elif args.action == "stop":
        runtime.stop()
        print(f"OVS in {args.run_dir} stopped")
    else:
        runtime.check()
        print(runtime.vsctl("show"))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from sanderling import pipeline_doc

    if args.doc:
        print(pipeline_doc.render(), end="")
        return 0
    from sanderling.openflow.pipeline import PIPELINE

    print(table(["id", "table", "stage", "on miss", "what it does"],
                [(i, t.name, t.stage, t.miss.value, t.doc) for i, t in enumerate(PIPELINE.tables)]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sanderling import demo

    return demo.down() if args.down else demo.run(keep=args.keep)


def _conformance(args: argparse.Namespace) -> int:
    missing = [str(f) for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"sanderling conformance {args.suite}: no such file: {', '.join(missing)} (the suites' files are in "
              f"../shared/conformance/{args.suite}/)", file=sys.stderr)
        return 2
    if args.repeat != 1 and args.suite != "netpol":
        print(f"--repeat applies to the netpol suite (real traffic on a lab), not to {args.suite}", file=sys.stderr)
        return 2
    if args.suite == "proxy":
        from sanderling.conformance import proxy

        return proxy.run(args.files, args.ip_family)
    if args.suite == "netpol":
        from sanderling.conformance import netpol

        try:
            if args.network:
                netpol.SecondaryNetwork(args.network, args.network_topology)
        except ValueError as exc:
            print(f"sanderling conformance netpol: {exc}", file=sys.stderr)
            return 2
        if args.ip_family == "ipv6" and args.network:
            print("sanderling conformance netpol: --ip-family ipv6 runs on the pod network (secondary networks "
                  "are IPv4)", file=sys.stderr)
            return 2
        return netpol.run(args.files, repeat=args.repeat, control_plane=args.control_plane, network=args.network,
                          network_topology=args.network_topology, ip_family=args.ip_family)
    from sanderling.conformance import cni

    return cni.run(args.files, args.only, front=args.cni_front)


def _trace(args: argparse.Namespace) -> int:
    from sanderling.kube.client import KubeApi
    from sanderling.tracer import Tracer, http_agents

    def make() -> Tracer:
        api = KubeApi(args.kubeconfig).client
        return Tracer(api, http_agents(api, args.agent_port))
    return lab.show_trace(make, args, "sanderling trace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sanderling", description="SDN networking for Kubernetes on Open vSwitch")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ovs", help="start, stop or show a node's private Open vSwitch")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--run-dir", type=Path, default=SYSTEM_RUNDIR)
    p.add_argument("--netns", default=None, help="run the daemons inside this network namespace")
    p.add_argument("--datapath", default="netdev", choices=["netdev", "dummy"])
    p.set_defaults(func=_ovs)

    p = sub.add_parser("pipeline", help="show the OpenFlow tables (or --doc: render docs/pipeline.md)")
    p.add_argument("--doc", action="store_true")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("demo", help="one node, pods talking through the pipeline, a spoofing pod blocked")
    p.add_argument("--keep", action="store_true", help="leave it running")
    p.add_argument("--down", action="store_true", help="remove a kept demo")
    p.set_defaults(func=_demo)

    p = sub.add_parser("conformance", help="run a conformance suite from ../shared/conformance")
    p.add_argument("suite", choices=["cni", "proxy", "netpol"])
    p.add_argument("--control-plane", choices=["sanderling", "kubernetes"], default="sanderling",
                   help="netpol: the lab's API server, embedded (default) or upstream (built by setup)")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--only", action="append", help="run only the case with this id (repeatable)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="netpol soak: run the files N times on one lab and report every flake with its round")
    p.add_argument("--network", metavar="NS/NAD", default=None,
                   help="netpol: run the files over this secondary network (created by the run) as "
                        "MultiNetworkPolicies, instead of the pod network")
    p.add_argument("--ip-family", choices=["ipv4", "ipv6"], default="ipv4",
                   help="proxy: ipv6 runs each case's IPv6 derivation (addresses mapped into fd00::/96, the node "
                        "and its Services dual-stack, the flows sent over IPv6); netpol: ipv6 runs the files on an "
                        "IPv6-only lab (ipBlocks derived as the module's docstring says)")
    p.add_argument("--cni-front", choices=["compiled", "python"], default="compiled",
                   help="cni: the plugin binary run, the compiled front (built by setup) or the Python shim")
    p.add_argument("--network-topology", choices=["layer2", "vlan"], default="layer2",
                   help="netpol --network: a layer2 overlay (default) or VLAN 177 of the lab's provider network")
    p.set_defaults(func=_conformance)

    p = sub.add_parser("trace", help=lab.TRACE_HELP + "; on any cluster whose agents serve their status on "
                                           "the nodes' addresses")
    lab.trace_arguments(p)
    p.add_argument("--kubeconfig", type=Path, default=None, help="default: in-cluster, else ~/.kube/config")
    p.add_argument("--agent-port", type=int, default=9465, help="the agents' status port")
    p.set_defaults(func=_trace)

    bench.add_parser(sub)
    lab.add_parser(sub)
    node.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except OvsError as exc:
        print(f"sanderling: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
