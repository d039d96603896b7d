"""`sanderling demo`: one node, three pods on br-int (userspace datapath), traffic through the
pipeline, and a pod that forges its source address reaching nobody.

Until the multi-node lab exists this is the README's first command. It builds everything in
network namespaces under the prefix `sldemo`, prints what it tested as a table, and removes all
of it again (also what a crashed earlier run left behind).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sanderling.cli.output import progress, table
from sanderling.lab.node import LocalNode, Pod, teardown_prefix

PREFIX = "sldemo"


def run(keep: bool = False) -> int:
    teardown_prefix(f"{PREFIX}-node1")
    base = Path(tempfile.mkdtemp(prefix="sanderling-demo-"))
    node = LocalNode("node1", "10.244.1.0/24", base, prefix=PREFIX)
    rows: list[tuple[str, str, str, str, str]] = []
    ok = True
    try:
        progress("starting ovsdb-server and ovs-vswitchd (userspace datapath) in netns sldemo-node1")
        node.start()
        progress("plugging pods default/a, default/b and default/mallory into br-int")
        a = node.add_pod("default", "a", "10.244.1.10")
        b = node.add_pod("default", "b", "10.244.1.11")
        mallory = node.add_pod("default", "mallory", "10.244.1.12")
        for pod in (a, b, mallory):
            node.wait_programmed(pod)
            node.serve(pod)
        progress("mallory replaces its address 10.244.1.12 with a forged 10.244.1.66")
        node.pod_exec(mallory, ["ip", "addr", "flush", "dev", "eth0"])
        node.pod_exec(mallory, ["ip", "addr", "add", "10.244.1.66/24", "dev", "eth0"])
        node.pod_exec(mallory, ["ip", "route", "add", "default", "via", "10.244.1.1"])

        def check(src: Pod, dst: Pod, proto: str, port: int, expect: bool) -> None:
            nonlocal ok
            got = node.probe(src, proto, dst.ip, port)
            ok &= got == expect
            what = proto if proto == "icmp" else f"{proto}/{port}"
            rows.append((f"{src.namespace}/{src.name}", f"{dst.namespace}/{dst.name} {dst.ip}", what,
                         "reached" if got else "blocked", "ok" if got == expect else "UNEXPECTED"))

        progress("probing")
        for src, dst in ((a, b), (b, a)):
            check(src, dst, "icmp", 0, True)
            check(src, dst, "tcp", 8080, True)
            check(src, dst, "udp", 8081, True)
        for dst in (a, b):
            check(mallory, dst, "icmp", 0, False)
            check(mallory, dst, "tcp", 8080, False)
            check(mallory, dst, "udp", 8081, False)
        print(table(["from", "to", "probe", "result", "verdict"], rows))
        flows = node.ovs.ofctl(node.bridge, "dump-aggregate").split("flow_count=")[1].split()[0]
        print(f"\nbr-int of node1 holds {flows} flows; "
              f"pipeline: `sanderling pipeline` explains each table, docs/pipeline.md has examples.")
        print("demo: " + ("every probe matched the expectation" if ok else "SOME PROBES DID NOT MATCH"))
        if keep:
            print(f"kept running: pods are netns {a.netns}, ...; remove with `sanderling demo --down`")
    finally:
        if not keep:
            progress("cleaning up")
            node.teardown()
    return 0 if ok else 1


def down() -> int:
    teardown_prefix(f"{PREFIX}-node1")
    return 0
