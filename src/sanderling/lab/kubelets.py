"""The lab's kubelets against a real kube-apiserver (`lab up --control-plane kubernetes`).

`python -m sanderling.lab.kubelets --config FILE` runs one kubelet per node listed in FILE, each
with that node's own credentials (`system:node:<name>`, so the Node authorizer and the
NodeRestriction admission plugin judge every write as they judge a kubelet's). What a kubelet
does that the cluster depends on, and nothing more:

- Node status: Ready condition, addresses, capacity/allocatable (the scheduler needs room for
  pods), refreshed with the node's Lease in `kube-node-lease` every 10 s so the node lifecycle
  controller keeps it Ready;
- pods bound to the node (a watch with `spec.nodeName`): the sandbox and CNI ADD through
  `lab.kubelet.Kubelet`, exactly as the embedded control plane runs them, then the status a
  kubelet writes (phase, podIP(s), hostIP(s), conditions); an ADD refused with "try again later"
  is retried with backoff;
- graceful deletion: a pod with a deletionTimestamp is stopped (workload, CNI DEL, sandbox) and
  then deleted for good (grace period 0), as a kubelet finishes a deletion.

FILE is JSON: {"server", "ca", "allow_commands", "nodes": [{"name", "token", "netns", "cni_bin",
"cni_conf", "host_ip"}]}. The process runs in the control-plane namespace (it starts CNI plugins
in each node's namespace with nsenter, as the embedded control plane does).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sanderling.lab.host_pods import HostPod, NodeHost, PodSpecError
from sanderling.lab.kubelet import Kubelet, NodeRuntime
from sanderling.netlink import netns
from sanderling.process import until_signalled

log = logging.getLogger("sanderling.lab.kubelets")
HEARTBEAT_S = 10.0
LEASE_S = 40


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def client_for(server: str, ca: str, token: str, field_manager: str) -> Any:
    from lightkube import Client, KubeConfig

    from sanderling.kube.client import httpx_timeout

    config = KubeConfig.from_dict({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "lab", "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]})
    return Client(config=config, timeout=httpx_timeout(30), field_manager=field_manager)


class NodeKubelet:
    """One node's kubelet: heartbeats, and the pods bound to the node."""

    def __init__(self, spec: dict[str, Any], server: str, ca: str, allow_commands: bool) -> None:
        self.name = spec["name"]
        self.host_ip = spec.get("host_ip", "")
        self.client = client_for(server, ca, spec["token"], f"lab-kubelet-{self.name}")
        self.host = NodeHost(self.name, spec.get("netns", self.name), self.host_ip, Path(spec["dir"])) \
            if spec.get("dir") else None
        view = self.host.view() if self.host is not None and spec.get("daemonset") else None
        self.kubelet = Kubelet(NodeRuntime(self.name, Path(spec["cni_bin"]), Path(spec["cni_conf"]),
                                           spec.get("netns", self.name), self.host_ip, view=view),
                               allow_commands=allow_commands)
        self.host_pods: dict[str, HostPod] = {}  # hostNetwork pods (the agent's DaemonSet) by key
        self.uids: dict[str, str] = {}      # running pod key -> uid
        self.busy: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kubelet-{self.name}")
        self.stopping = threading.Event()

    # ---- node --------------------------------------------------------------------------

    def heartbeat(self) -> None:
        from lightkube import ApiError
        from lightkube.models.coordination_v1 import LeaseSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.coordination_v1 import Lease
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        status: dict[str, Any] = {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "lab kubelet is posting ready status", "lastHeartbeatTime": _now(),
                            "lastTransitionTime": self._ready_since()}],
            "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": self.name}],
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "nodeInfo": {"kubeletVersion": "v1.34.4-sanderling-lab", "kubeProxyVersion": "", "osImage": "lab",
                         "operatingSystem": "linux", "architecture": "amd64", "containerRuntimeVersion": "lab://1",
                         "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}}
        self.client.patch(Node.Status, self.name, {"status": status}, patch_type=PatchType.STRATEGIC)
        lease = Lease(metadata=ObjectMeta(name=self.name, namespace="kube-node-lease"),
                      spec=LeaseSpec(holderIdentity=self.name, leaseDurationSeconds=LEASE_S,
                                     renewTime=_micro_now()))  # type: ignore[arg-type]
        try:
            current = self.client.get(Lease, self.name, namespace="kube-node-lease")
            lease.metadata.resourceVersion = current.metadata.resourceVersion  # type: ignore[union-attr]
            self.client.replace(lease)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            self.client.create(lease)

    _since: str | None = None

    def _ready_since(self) -> str:
        if self._since is None:
            self._since = _now()
        return self._since

    def heartbeats(self) -> None:
        while not self.stopping.is_set():
            try:
                self.heartbeat()
            except Exception as exc:  # the API may be restarting: try again next beat
                log.warning("node %s: heartbeat failed: %s", self.name, exc)
            self.stopping.wait(HEARTBEAT_S)

    # ---- pods --------------------------------------------------------------------------

    def watch_pods(self) -> None:
        from lightkube.resources.core_v1 import Pod

        fields = {"spec.nodeName": self.name}
        while not self.stopping.is_set():
            try:
                listed = self.client.list(Pod, namespace="*", fields=fields)
                seen = set()
                for pod in listed:
                    d = pod.to_dict()
                    seen.add(_key(d))
                    self.reconcile(d)
                with self.lock:
                    gone = [k for k in self.uids if k not in seen]
                for key in gone:
                    self._stop(key)
                version = listed.resourceVersion  # type: ignore[attr-defined]
                for op, pod in self.client.watch(Pod, namespace="*", fields=fields, resource_version=version):
                    d = pod.to_dict()
                    if op == "DELETED":
                        self.pool.submit(self._stop, _key(d))
                    else:
                        self.reconcile(d)
            except Exception as exc:
                log.warning("node %s: pod watch ended (%s); listing again", self.name, exc)
                self.stopping.wait(1.0)

    def reconcile(self, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        key = _key(pod)
        with self.lock:
            if key in self.busy:
                return
            running_uid = self.uids.get(key)
            if meta.get("deletionTimestamp"):
                self.busy.add(key)
                self.pool.submit(self._finish_deletion, pod)
                return
            if running_uid == meta["uid"] or status.get("phase") in ("Failed", "Succeeded") or status.get("podIP"):
                return
            self.busy.add(key)
        self.pool.submit(self._start, pod)

    def _start(self, pod: dict[str, Any]) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod
        from lightkube.types import PatchType

        meta = pod["metadata"]
        key = _key(pod)
        try:
            with self.lock:
                stale = key in self.uids
            if stale:  # same name, new uid: the old pod's sandbox goes first
                self._stop(key)
            if (pod.get("spec") or {}).get("hostNetwork") and self.host is not None:
                self._start_host_pod(pod)
                return
            status = self.kubelet.start(pod)
            now = _now()
            status.update({"hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}], "startTime": now})
            ready = "True" if status.get("phase") == "Running" else "False"
            extra = [c for c in status.get("conditions", []) if c["type"] == "Ready" and c["status"] == "False"]
            status["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now,
                 **({k: extra[0][k] for k in ("reason", "message")} if extra else {})}]
            if status.get("phase") == "Running":
                with self.lock:
                    self.uids[key] = meta["uid"]
                running = self.kubelet.pods.get(key)
                status["containerStatuses"] = [  # what `kubectl get pods` counts as READY
                    {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
                     "restartCount": 0, "containerID": f"lab://{running.container_id if running else ''}",
                     "state": {"running": {"startedAt": now}}}
                    for c in (pod.get("spec") or {}).get("containers") or []]
            try:
                self.client.patch(Pod.Status, meta["name"], {"status": status}, namespace=meta["namespace"],
                                  patch_type=PatchType.MERGE)
            except ApiError as exc:
                log.info("pod %s: status not recorded: %s", key, exc.status.message)
            if key in self.kubelet.retry_later:
                self._retry_later(pod)
            else:
                self.attempts.pop(key, None)
        except Exception:
            log.exception("pod %s: start failed", key)
        finally:
            with self.lock:
                self.busy.discard(key)

    def _start_host_pod(self, pod: dict[str, Any]) -> None:
        """A hostNetwork pod's containers as processes on the node (`lab.host_pods`)."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod
        from lightkube.types import PatchType

        assert self.host is not None
        meta = pod["metadata"]
        key = _key(pod)

        def report(status: dict[str, Any]) -> None:
            self.client.patch(Pod.Status, meta["name"], {"status": status}, namespace=meta["namespace"],
                              patch_type=PatchType.MERGE)

        host_pod = HostPod(pod, self.host, self.client, report)
        try:
            host_pod.prepare()
            host_pod.run_init_containers()
            host_pod.start()
        except Exception as exc:  # PodSpecError, the API, an init container: reported, tried again
            message = str(exc.status.message if isinstance(exc, ApiError) else exc)
            if not isinstance(exc, (PodSpecError, ApiError, OSError, subprocess.TimeoutExpired)):
                log.exception("pod %s: start failed", key)
            log.warning("pod %s: not started on %s: %s; trying again", key, self.name, message)
            try:
                report({"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "False", "reason": "ContainersNotStarted", "message": message[:1000]}]})
            except ApiError:
                pass
            self._retry_later(pod)
            return
        with self.lock:
            self.uids[key] = meta["uid"]
            self.host_pods[key] = host_pod
        self.attempts.pop(key, None)

    def _retry_later(self, pod: dict[str, Any]) -> None:
        key = _key(pod)
        attempt = self.attempts.get(key, 0)
        self.attempts[key] = attempt + 1

        def again() -> None:
            from lightkube import ApiError
            from lightkube.resources.core_v1 import Pod

            try:
                current = self.client.get(Pod, pod["metadata"]["name"], namespace=pod["metadata"]["namespace"])
            except ApiError:
                return
            self.reconcile(current.to_dict())

        timer = threading.Timer(min(0.2 * 2 ** attempt, 5.0), again)
        timer.daemon = True
        timer.start()

    def _stop(self, key: str, uid: str = "") -> None:
        """Stop a pod this process runs; with `uid`, also one it does not know (CNI DEL is idempotent)."""
        with self.lock:
            uid = self.uids.pop(key, "") or uid
            host_pod = self.host_pods.pop(key, None)
        if host_pod is not None:
            host_pod.stop()
            return
        namespace, name = key.split("/", 1)
        if uid or key in self.kubelet.pods:
            self.kubelet.stop(namespace, name, uid)

    def _finish_deletion(self, pod: dict[str, Any]) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        key = _key(pod)
        try:
            meta = pod["metadata"]
            self._stop(key, meta["uid"])
            try:
                self.client.delete(Pod, meta["name"], namespace=meta["namespace"], grace_period=0)
            except ApiError as exc:
                if exc.status.code != 404:
                    log.warning("pod %s: final delete refused: %s", key, exc.status.message)
        except Exception:
            log.exception("pod %s: stop failed", key)
        finally:
            with self.lock:
                self.busy.discard(key)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.heartbeats, daemon=True, name=f"heartbeat-{self.name}"),
                   threading.Thread(target=self.watch_pods, daemon=True, name=f"pods-{self.name}")]
        for t in threads:
            t.start()
        return threads


def _key(pod: dict[str, Any]) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


async def main_async(args: argparse.Namespace) -> int:
    config = json.loads(Path(args.config).read_text())
    if args.netns:
        netns.enter(args.netns)  # before any thread: every later thread inherits it
    kubelets = [NodeKubelet(spec, config["server"], config["ca"], bool(config.get("allow_commands")))
                for spec in config["nodes"]]
    for k in kubelets:
        k.run()
    await until_signalled()
    for k in kubelets:
        k.stopping.set()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sanderling.lab.kubelets")
    p.add_argument("--config", required=True)
    p.add_argument("--netns", help="the control-plane namespace to run in")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
