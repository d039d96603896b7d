"""br-ext on every node, programmed only by an external controller (issue 15).

A 2-node lab with `--br-ext`; the example os-ken controller (examples/osken, a real
`osken-manager`) runs on the fabric and is fed by `sanderling-northbound --webhook`. A host on
the fabric (172.30.0.1, a route to the pod network on the fabric) reaches a pod by its own
address only through the controller's flows on br-ext (proxy ARP, a route per pod it learned,
the way back per host it saw), and the pod answers through br-ext too; the controller blocks the
pod's /32 and the host is cut off, lifts it and the host is back. br-int carries no flow of the
controller, br-ext none of the agent, and an agent restart leaves br-ext's flows as they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .conftest import LabCli, require_ovs, require_root

NAME = "sltestbx"
lab = LabCli(NAME)
STATE = Path("/run/sanderling-lab") / NAME
OSKEN = Path("/var/cache/sanderling/osken/bin/osken-manager")
APP = Path(__file__).resolve().parents[2] / "examples" / "osken" / "sanderling_external.py"
FABRIC = f"{NAME}-fabric"
CONTROLLER_API = "172.30.0.1:8181"
APP_COOKIE = 0x5A0E

OBJECTS = """apiVersion: v1
kind: Pod
metadata: {name: inside, namespace: default}
spec: {nodeName: node2, containers: [{name: c, image: none, ports: [{containerPort: 8080}]}]}
"""


def in_fabric(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", FABRIC, *argv], capture_output=True, text=True, timeout=timeout)


def controller_state() -> dict:
    out = in_fabric("curl", "-s", "-m", "3", f"http://{CONTROLLER_API}/state")
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}


def reach(ip: str) -> bool:
    return in_fabric(sys.executable, "-m", "sanderling.probe", "connect", "tcp", ip, "8080", "--timeout",
                     "1").returncode == 0


def flows(node: str, bridge: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", f"{NAME}-{node}", "ovs-ofctl", "-O", "OpenFlow13", "dump-flows",
                          f"unix:{STATE / node / 'ovs' / (bridge + '.mgmt')}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines()[1:] if line.strip()]


def cookie(flow: str) -> int:
    return int(flow.split("cookie=")[1].split(",")[0], 16)


def until(what: str, check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def start_controller(tmp_path: Path, procs: list) -> None:
    """The example os-ken controller on the fabric, and the northbound webhook feeding it."""
    procs.append(subprocess.Popen(
        ["ip", "netns", "exec", FABRIC, "env", f"SANDERLING_FEED_LISTEN={CONTROLLER_API}", str(OSKEN),
         "--ofp-tcp-listen-port", "6653", str(APP)],
        stdout=open(tmp_path / "osken.log", "w"), stderr=subprocess.STDOUT))
    procs.append(subprocess.Popen(
        ["ip", "netns", "exec", FABRIC, sys.executable, "-m", "sanderling.northbound.main", "--webhook",
         f"http://{CONTROLLER_API}/events", "--kubeconfig", str(STATE / "kubeconfig-nodes")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "northbound.log", "w")))


def lab_with_a_pod(tmp_path: Path, *br_ext: str) -> str:
    """A 2-node lab with br-ext, a pod on node2 (its address returned), the pod network routed onto
    the fabric by the fabric host."""
    require_root()
    require_ovs()
    assert OSKEN.exists(), f"{OSKEN} missing: scripts/setup.sh installs os-ken for examples/osken"
    manifest = tmp_path / "pods.yaml"
    manifest.write_text(OBJECTS)
    lab("down")
    up = lab("up", "--nodes", "2", "--br-ext", *br_ext)
    assert up.returncode == 0, up.stdout + up.stderr
    assert lab("apply", "-f", str(manifest)).returncode == 0
    pod_ip = until("the pod's address", lambda: next(
        (p["status"]["podIP"] for p in json.loads(lab("get", "pods", "-o", "json").stdout)
         if (p.get("status") or {}).get("podIP")), None))
    assert in_fabric("ip", "route", "add", "10.244.0.0/16", "dev", "fabric0").returncode == 0
    return str(pod_ip)


def stop_and_down(procs: list) -> None:
    """The controller, the feed and the server stopped; the lab down."""
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert lab("down").returncode == 0


def whoami_outside(procs: list) -> str:
    """From the pod to a UDP server on the fabric host: the source address that server sees."""
    if not any(getattr(p, "args", [None])[-1:] == ["9000"] for p in procs):
        server = subprocess.Popen(["ip", "netns", "exec", FABRIC, sys.executable, "-m", "sanderling.probe", "serve",
                                   "--name", "outside", "--udp", "9000"], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        procs.append(server)
    out = lab("exec", "default/inside", "--", sys.executable, "-m", "sanderling.probe", "connect", "udp",
              "172.30.0.1", "9000", "--whoami", "--timeout", "1")
    return out.stdout.strip() if out.returncode == 0 else ""


def test_br_ext_is_the_controllers_own_and_outside_reaches_pods_only_through_its_flows(tmp_path):
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # the operator's network: the fabric host routes the pod network onto the fabric (br-ext uplinks)
        pod_ip = lab_with_a_pod(tmp_path)
        assert not reach(pod_ip), "a pod reached from outside with nothing on br-ext"
        assert flows("node2", "br-ext") == [], "br-ext had flows before its controller"

        start_controller(tmp_path, procs)
        def knows_all() -> dict | None:
            state = controller_state()
            return state if len(state.get("bridges", {})) == 2 and pod_ip in state.get("pods", {}) else None
        state = until("the controller knowing both bridges and the pod", knows_all, timeout=60)
        print(f"\ncontroller: nodes {state['nodes']}, pods {state['pods']}")
        until("the pod reachable from the fabric through br-ext", lambda: reach(pod_ip))

        def answered_through_br_ext() -> list[str] | None:
            # the example rewrites its flows on every change (counters restart): probe, then look
            ext = flows("node2", "br-ext") if reach(pod_ip) else []
            back = [f for f in ext if "in_port=1" in f and "n_packets=0," not in f]  # patch-int is port 1
            return ext if back else None
        ext = until("the pod's answers leaving through br-ext", answered_through_br_ext)
        print("node2's br-ext:\n  " + "\n  ".join(ext))
        seen = until("the pod's own connection out through br-ext", lambda: whoami_outside(procs))
        print(f"the pod to a server outside, which sees: {seen}")
        assert seen == f"outside {pod_ip}", seen  # its own address: no SNAT

        assert in_fabric("curl", "-s", "-m", "3", "-X", "POST", "-d", json.dumps({"prefix": f"{pod_ip}/32"}),
                         f"http://{CONTROLLER_API}/block").returncode == 0
        until("the block taking effect", lambda: not reach(pod_ip))
        print(f"controller blocks {pod_ip}/32: cut off")
        assert in_fabric("curl", "-s", "-m", "3", "-X", "DELETE",
                         f"http://{CONTROLLER_API}/block?prefix={pod_ip}/32").returncode == 0
        until("the pod reachable again", lambda: reach(pod_ip))
        print("block lifted: reachable again")

        for node in ("node1", "node2"):
            ext = flows(node, "br-ext")
            assert ext and all(cookie(f) == APP_COOKIE for f in ext), ext  # the agent installs nothing there
            mine = [f for f in flows(node, "br-int") if cookie(f) == APP_COOKIE]
            assert mine == [], mine  # the controller never touches br-int
        ext_before = sorted(f.split("priority=")[1] for f in flows("node2", "br-ext"))
        log = STATE / "node2" / "agent.log"
        offset = len(log.read_text(errors="replace"))
        assert lab("restart-agent", "node2").returncode == 0
        until("node2's agent resynced", lambda: "desired state complete" in log.read_text(errors="replace")[offset:])
        assert sorted(f.split("priority=")[1] for f in flows("node2", "br-ext")) == ext_before
        until("the pod reachable after the agent's restart", lambda: reach(pod_ip))
    finally:
        stop_and_down(procs)


def test_br_ext_masquerade_pods_leave_with_the_nodes_masquerade_address(tmp_path):
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pod_ip = lab_with_a_pod(tmp_path, "masquerade")
        start_controller(tmp_path, procs)
        until("the pod reachable from the fabric through br-ext", lambda: reach(pod_ip), timeout=60)
        seen = until("the pod's connection out through br-ext", lambda: whoami_outside(procs))
        print(f"\nwith external-masquerade, the server outside sees: {seen} (the pod is {pod_ip})")
        assert seen == "outside 10.244.1.254", seen  # node2's masquerade address: the last of 10.244.1.0/24
        snat = [f for f in flows("node2", "br-int") if "nat(src=10.244.1.254)" in f and "n_packets=0," not in f]
        assert snat, "no masqueraded connection counted on br-int"
    finally:
        stop_and_down(procs)
