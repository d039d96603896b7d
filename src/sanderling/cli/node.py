"""`sanderling node install-cni | cleanup`: what is done to a node outside the agent's run.

`install-cni` is the DaemonSet's init container: the plugin and the conflist written from the
same configuration file as the agent's, before the agent starts, so the kubelet sees a network
as soon as the node's agent can answer. `cleanup` is the last step of an uninstall (after
`kubectl delete -f deploy/`, which stops the agents): it removes what the agent made on the
node and would otherwise keep (bridges and their flows and ports, pod veths, VXLAN devices of
layer2 networks, its routes, the conflist, the plugins, its socket and, unless kept, its state).
Both read the agent's configuration (`--config`, flags as the agent takes them).
"""

from __future__ import annotations

import argparse
import errno
import shutil
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("node", help="install the CNI plugin on this node, or remove everything Sanderling made on it")
    actions = p.add_subparsers(dest="node_action", required=True)
    for name, help_text in (("install-cni", "write the plugin and the conflist (the DaemonSet's init container)"),
                            ("cleanup", "remove Sanderling's bridges, pod interfaces, routes, CNI files and state "
                                        "from this node (after its agent has stopped)")):
        q = actions.add_parser(name, help=help_text)
        q.add_argument("--config", type=Path, help="the agent's configuration file")
        q.add_argument("agent_flags", nargs=argparse.REMAINDER,
                       help="agent flags after --, e.g. -- --cni-bin-dir /opt/cni/bin")
        if name == "cleanup":
            q.add_argument("--keep-state", action="store_true", help="leave the IPAM database (state-dir)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> Any:
    from sanderling.agent.config import load

    flags = [f for f in args.agent_flags if f != "--"]
    if args.config is not None:
        flags = ["--config", str(args.config), *flags]
    if not any(f == "--node" or f.startswith("--node=") for f in flags):
        flags += ["--node", "-"]  # neither command is about one node's name
    return load(flags)


def run(args: argparse.Namespace) -> int:
    from sanderling.agent.config import ConfigError

    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"sanderling node {args.node_action}: {exc}")
        return 2
    if args.node_action == "install-cni":
        from sanderling.agent.main import install_cni

        install_cni(cfg, secondary=cfg.kubeconfig is not None or _in_cluster())
        print(f"plugin in {cfg.cni_bin_dir}, conflist {cfg.cni_network} in {cfg.cni_conf_dir}")
        return 0
    removed = cleanup(cfg, keep_state=args.keep_state)
    for line in removed:
        print(f"removed {line}")
    print(f"node clean: {len(removed)} things removed")
    return 0


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def cleanup(cfg: Any, keep_state: bool = False) -> list[str]:
    """Remove what the agent made; returns what was removed, one line each. What is not there is
    skipped (running it twice is fine)."""
    from sanderling.cni.install import CONFLIST_NAME
    from sanderling.model.attachments import SANDERLING_TYPE
    from sanderling.netlink import routes
    from sanderling.ovs.ovsdb import Ovsdb
    from sanderling.ovs.runtime import SYSTEM_RUNDIR, OvsRuntime
    from sanderling.ovs.secondary import L2_BRIDGE, provider_bridge

    removed: list[str] = []
    runtime = OvsRuntime(cfg.ovs_run_dir, private=cfg.ovs_run_dir != SYSTEM_RUNDIR, datapath=cfg.datapath)
    if runtime.db_sock.exists():
        db = Ovsdb(runtime.db_endpoint)
        try:
            present = set(db.bridges())
            physnets = [item.partition("=")[0] for item in cfg.provider_network]
            external = [cfg.external_bridge] if cfg.external_bridge else []  # the controller's flows go with it
            for bridge in [cfg.bridge, L2_BRIDGE, *(provider_bridge(p) for p in physnets), *external]:
                if bridge in present:
                    db.delete_bridge(bridge)  # its ports and flows go with it
                    removed.append(f"bridge {bridge} (its flows and ports)")
        finally:
            db.close()
    else:
        print(f"OVS is not running ({runtime.db_sock} missing): bridges left as they are")
    removed += [f"interface {name}" for name in _delete_links(cfg.node_netns)]
    _, dropped = routes.sync_routes(cfg.node_netns, {}, prune=True)
    if dropped:
        removed.append(f"{dropped} routes of the agent (protocol {routes.RTPROT_SANDERLING})")
    plugins = [cfg.cni_bin_dir / name for name in ("sanderling-cni", SANDERLING_TYPE)]
    files = (cfg.cni_conf_dir / CONFLIST_NAME, *plugins, *(p.with_name(p.name + "-py") for p in plugins),
             cfg.cni_socket)  # a compiled front has the Python shim beside it as <name>-py
    for path in files:
        if path.exists() or path.is_symlink():
            path.unlink()
            removed.append(str(path))
    if not keep_state and cfg.state_dir.exists():
        for entry in cfg.state_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        try:
            cfg.state_dir.rmdir()
        except OSError as exc:  # a hostPath mounted into a container: emptied, the mount point stays
            if exc.errno != errno.EBUSY:
                raise
        removed.append(f"state {cfg.state_dir}")
    return removed


def _delete_links(netns: str | None) -> list[str]:
    """Pod veth host ends (`sl` + 12 hex) and layer2 VXLAN devices (`slx` + VNI) Sanderling named."""
    import re

    from sanderling.netlink.netns import ipr

    ours = re.compile(r"^sl(x[0-9a-f]{6}|[0-9a-f]{12})$")
    gone = []
    with ipr(netns) as h:
        for link in h.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name and ours.match(name):
                h.link("del", index=link["index"])
                gone.append(name)
    return gone
