"""A lab kubelet: runs the pods the scheduler placed on one node.

For each pod: a network namespace as its sandbox, CNI ADD exactly as a container runtime calls
it (the node's installed plugin binary, conflist config, CNI_* environment with the K8S_*
arguments), the pod's IP written to its status, and its workload started inside the sandbox:
the built-in probe server on every containerPort (TCP and UDP) answering with the pod's name,
or the pod's own command, only when the lab was started with `--allow-workload-commands` (an API
object must not be able to run any program as root on this machine by default; such a pod is
marked Failed, saying how to allow it). Deleting the pod stops the workload, calls CNI DEL and
removes the sandbox. Container images are ignored.

Each sandbox is recorded on disk (pod, uid, container id) before its CNI ADD, as a container
runtime keeps its sandboxes: a pod deleted while the control plane was down (or restarting)
sends no event to the next one, and without the record its sandbox, OVS port and address would
stay until the agent restarted. The next kubelet removes such sandboxes (`collect_garbage`).
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanderling.cni.errors import E_TRY_LATER
from sanderling.lab import host_view
from sanderling.netlink import veth
from sanderling.process import kill_netns_processes

log = logging.getLogger(__name__)
SERVER_READY_TIMEOUT_S = 15.0
DELEGATE_PLUGINS = "/usr/lib/cni"  # Debian's containernetworking-plugins (macvlan, host-device, ...)


@dataclass
class NodeRuntime:
    """Where one lab node's CNI plugin and agent live."""

    name: str
    cni_bin: Path
    cni_conf: Path
    netns_prefix: str
    host_ip: str = ""
    # a node whose plugin was installed by the agent's DaemonSet: the plugin runs where the node's
    # host paths are its own (`lab.host_view`: view path -> real path), found at its host path
    view: dict[str, str] | None = None
    view_plugin: str = "/opt/cni/bin/sanderling-cni"

    @property
    def sandbox_dir(self) -> Path:
        """The node's sandbox records (beside its CNI directories)."""
        return self.cni_conf.parent.parent / "sandboxes"


@dataclass
class RunningPod:
    netns: str
    container_id: str
    workload: subprocess.Popen[bytes] | None = None


@dataclass
class Kubelet:
    node: NodeRuntime
    pods: dict[str, RunningPod] = field(default_factory=dict)
    allow_commands: bool = False
    # pods whose last ADD failed with "try again later" (the agent is down or restarting): the
    # control plane starts them again with backoff, as a kubelet retries sandbox creation
    retry_later: set[str] = field(default_factory=set)

    def sandbox_name(self, namespace: str, name: str) -> str:
        return f"{self.node.netns_prefix}-{namespace}-{name}"[:60]

    def _cni(self, command: str, namespace: str, name: str, cid: str, netns: str) -> tuple[int, dict[str, Any]]:
        if not self.node.cni_conf.exists():  # as a kubelet whose node's network is not ready yet
            return 1, {"code": E_TRY_LATER, "msg": f"no CNI configuration on {self.node.name} yet "
                                                   f"({self.node.cni_conf}): try again later"}
        conflist = json.loads(self.node.cni_conf.read_text())
        plugin = conflist["plugins"][0] if "plugins" in conflist else conflist  # a conflist or a single config
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        plugin_dir = Path(self.node.view_plugin).parent if self.node.view is not None else self.node.cni_bin.parent
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
               "CNI_PATH": f"{plugin_dir}:{DELEGATE_PLUGINS}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
                           f"K8S_POD_INFRA_CONTAINER_ID={cid}"}
        # a kubelet runs on its node: plugins run in the node's network namespace (a delegate such
        # as macvlan finds its master interface there)
        if self.node.view is not None:
            argv = host_view.argv_for(self.node.netns_prefix, self.node.view, [self.node.view_plugin])
        else:
            argv = ["nsenter", f"--net=/var/run/netns/{self.node.netns_prefix}", str(self.node.cni_bin)]
        proc = subprocess.run(argv, input=json.dumps(conf), env=env, capture_output=True, text=True, timeout=120)
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except ValueError:
            out = {"msg": proc.stdout[:300]}
        return proc.returncode, out

    def start(self, pod: dict[str, Any]) -> dict[str, Any]:
        """Run the pod; return the status to record (Running with its IP, or Pending with why)."""
        meta = pod["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        netns_name = self.sandbox_name(meta["namespace"], meta["name"])
        cid = meta.get("uid", key).replace("-", "")[:32]
        if _command(pod) and not self.allow_commands:
            log.warning("pod %s: has a command, and this lab runs none", key)
            return {"phase": "Failed", "reason": "WorkloadCommandsOff",
                    "message": "this lab runs no command from a Pod object; start it with "
                               "`sanderling lab up --allow-workload-commands` to allow them"}
        self._record(netns_name, {"namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid", ""),
                                  "containerID": cid})
        veth.ensure_netns(netns_name)
        code, out = self._cni("ADD", meta["namespace"], meta["name"], cid, f"/var/run/netns/{netns_name}")
        if code != 0:
            if out.get("code") == E_TRY_LATER or "try again" in str(out.get("msg", "")).lower():
                self.retry_later.add(key)
            self._cni("DEL", meta["namespace"], meta["name"], cid, f"/var/run/netns/{netns_name}")
            veth.delete_netns(netns_name)
            self._forget(netns_name)
            log.warning("pod %s: CNI ADD failed: %s", key, out.get("msg"))
            return {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"},
                                                       {"type": "Ready", "status": "False",
                                                        "reason": "NetworkSetupFailed",
                                                        "message": str(out.get("msg", out))}]}
        self.retry_later.discard(key)
        first = out["ips"][0]
        ip = first["address"].split("/")[0]
        # a dual-stack pod: its IPv6 address on the same interface is its second podIP
        ip6 = next((e["address"].split("/")[0] for e in out["ips"][1:]
                    if ":" in e.get("address", "") and ":" not in ip and e.get("interface") == first.get("interface")),
                   "")
        running = RunningPod(netns_name, cid)
        running.workload = self._workload(pod, netns_name)
        self.pods[key] = running
        log.info("pod %s running on %s with %s", key, self.node.name, ip)
        return {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}] + ([{"ip": ip6}] if ip6 else []),
                "conditions": [{"type": "Ready", "status": "True"}]}

    def _workload(self, pod: dict[str, Any], netns_name: str) -> subprocess.Popen[bytes] | None:
        containers = (pod.get("spec") or {}).get("containers") or []
        command = _command(pod)
        if command:
            argv = command
        else:
            tcp = [str(p["containerPort"]) for c in containers for p in c.get("ports") or []
                   if p.get("protocol", "TCP") == "TCP"]
            udp = [str(p["containerPort"]) for c in containers for p in c.get("ports") or []
                   if p.get("protocol") == "UDP"]
            if not tcp and not udp:
                return None
            argv = [sys.executable, "-m", "sanderling.probe", "serve", "--name", pod["metadata"]["name"]]
            argv += [a for p in tcp for a in ("--tcp", p)] + [a for p in udp for a in ("--udp", p)]
            return _started_server(["ip", "netns", "exec", netns_name, *argv], pod)
        return subprocess.Popen(["ip", "netns", "exec", netns_name, *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def stop(self, namespace: str, name: str, uid: str = "") -> None:
        key = f"{namespace}/{name}"
        running = self.pods.pop(key, None)
        netns_name = self.sandbox_name(namespace, name)
        cid = running.container_id if running else (uid or key).replace("-", "")[:32]
        if running and running.workload and running.workload.poll() is None:
            running.workload.kill()
            running.workload.wait(10)
        self._cni("DEL", namespace, name, cid, f"/var/run/netns/{netns_name}")
        # also a workload this kubelet did not start (its predecessor before a control-plane
        # restart did): the sandbox's processes end with it
        kill_netns_processes(netns_name)
        veth.delete_netns(netns_name)
        self._forget(netns_name)
        log.info("pod %s stopped on %s", key, self.node.name)

    # ---- sandbox records -----------------------------------------------------------------------

    def _record(self, netns_name: str, record: dict[str, str]) -> None:
        self.node.sandbox_dir.mkdir(parents=True, exist_ok=True)
        path = self.node.sandbox_dir / f"{netns_name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def _forget(self, netns_name: str) -> None:
        (self.node.sandbox_dir / f"{netns_name}.json").unlink(missing_ok=True)

    def orphans(self, live: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
        """Recorded sandboxes whose pod is gone from the API (or came back as another pod: a
        different uid); `live` maps namespace/name to uid of the pods bound to this node."""
        out = []
        for path in sorted(self.node.sandbox_dir.glob("*.json")) if self.node.sandbox_dir.is_dir() else ():
            try:
                record = json.loads(path.read_text())
                key = f"{record['namespace']}/{record['name']}"
            except (ValueError, KeyError, OSError) as exc:
                log.warning("sandbox record %s unreadable (%s): removed", path, exc)
                path.unlink(missing_ok=True)
                continue
            if live.get(key) != record.get("uid"):
                out.append((path.stem, record))
        return out

    def remove_orphan(self, netns_name: str, record: dict[str, str]) -> bool:
        """CNI DEL, processes, namespace and record of a sandbox whose pod is gone; False when the
        DEL failed (the plugin's agent may be restarting: try again later)."""
        key = f"{record['namespace']}/{record['name']}"
        code, out = self._cni("DEL", record["namespace"], record["name"], record["containerID"],
                              f"/var/run/netns/{netns_name}")
        if code != 0:
            log.warning("sandbox of deleted pod %s on %s: CNI DEL failed (%s); will retry", key, self.node.name,
                        out.get("msg", out))
            return False
        try:  # a pod of the same name started meanwhile owns the namespace (and the record) now
            current = json.loads((self.node.sandbox_dir / f"{netns_name}.json").read_text())
        except (OSError, ValueError):
            current = None
        if current is None or current.get("uid") != record.get("uid"):
            return True
        kill_netns_processes(netns_name)
        veth.delete_netns(netns_name)
        self._forget(netns_name)
        log.info("sandbox of pod %s (deleted while no kubelet watched) removed from %s", key, self.node.name)
        return True

    def stop_all(self) -> None:
        for key in list(self.pods):
            namespace, name = key.split("/", 1)
            self.stop(namespace, name)


def _command(pod: dict[str, Any]) -> list[str] | None:
    """The first container's command + args, if a container has a command."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return next(([str(a) for a in c.get("command", []) + c.get("args", [])] for c in containers
                 if c.get("command")), None)


def _started_server(argv: list[str], pod: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start the built-in probe server and wait for its "ready" (every port bound).

    A pod is reported Running only once its ports answer, as a kubelet with a readiness probe
    would: `lab check` probes the moment every pod is Running, and a Python interpreter starting
    on a busy 2-core machine can take a second to bind (CI saw probes refused in that window).
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], SERVER_READY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        log.warning("pod %s/%s: the probe server did not report ready within %.0f s",
                    pod["metadata"]["namespace"], pod["metadata"]["name"], SERVER_READY_TIMEOUT_S)
    proc.stdout.close()  # it prints nothing after "ready"
    return proc
