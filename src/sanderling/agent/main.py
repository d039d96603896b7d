"""`sanderling-agent`: the per-node process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from sanderling.agent.controller import NodeController
from sanderling.agent.pods_source import pods_from_ports
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork
from sanderling.openflow import cookies
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer
from sanderling.ovs.ovsdb import Ovsdb
from sanderling.ovs.runtime import SYSTEM_RUNDIR, OvsError, OvsRuntime

log = logging.getLogger("sanderling.agent")

GENERATION_KEY = "sanderling.io/generation"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sanderling-agent", description="Sanderling node agent")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--pod-cidr", required=True, help="this node's pod subnet, e.g. 10.244.1.0/24")
    p.add_argument("--gateway-mac", default="0a:58:0a:f4:00:01", help="MAC pods see for their gateway")
    p.add_argument("--bridge", default="br-int")
    p.add_argument("--ovs-run-dir", type=Path, default=SYSTEM_RUNDIR,
                   help="OVS run directory (a private instance from `sanderling ovs start`, or the system's)")
    p.add_argument("--datapath", default="netdev", choices=["netdev", "dummy"])
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    runtime = OvsRuntime(args.ovs_run_dir, private=args.ovs_run_dir != SYSTEM_RUNDIR, datapath=args.datapath)
    runtime.check()
    node = NodeNetwork.build(args.node, args.pod_cidr, args.gateway_mac)
    db = Ovsdb(runtime.db_endpoint)
    db.ensure_bridge(args.bridge, args.datapath)
    previous = int(db.bridge_external_ids(args.bridge).get(GENERATION_KEY, "0") or 0)
    generation = cookies.next_generation(previous)
    db.set_bridge_external_id(args.bridge, GENERATION_KEY, str(generation))
    log.info("node %s: bridge %s, pod CIDR %s, generation %d (previous %d), %d tables",
             node.name, args.bridge, node.pod_cidr, generation, previous, len(PIPELINE.tables))
    port_errors: dict[str, str] = {}
    controller = NodeController(node, runtime.mgmt_target(args.bridge), Realizer(generation),
                                lambda: pods_from_ports(db.ports(args.bridge), port_errors))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.stop)
    try:
        await controller.run()
    except asyncio.CancelledError:
        pass
    finally:
        db.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except (OvsError, ModelError) as exc:
        print(f"sanderling-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
