"""A lab kubelet's host-network pods: a DaemonSet's containers run as processes on the lab node.

The lab has no container runtime, yet the agent's DaemonSet must run for real: its command and
args, its environment (values, fieldRefs, ConfigMap keys, `$(VAR)` expansion), its mounted
ConfigMap, its ServiceAccount token (a TokenRequest bound to the pod, made with the node's own
identity as a kubelet makes it), its host paths, its init containers, its probes. So a
`hostNetwork` pod's containers run here as processes, each in the node's network namespace and a
private mount namespace (`lab.host_view`) where the pod's volumes are mounted at their
mountPaths and host paths are the node's own directories (`NodeHost.host_path`). Images are
ignored: the program named by the command is this machine's (the agent's from this checkout).

What a kubelet reports, and the DaemonSet controller acts on: Running with the host's address,
`Ready` from the readiness probe (its failure message: the probe's answer), restarts with
backoff when a container exits (`CrashLoopBackOff` with the last line it printed), a container
restarted when its liveness probe fails, SIGTERM then SIGKILL after the grace period on delete.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanderling.lab import host_view

log = logging.getLogger(__name__)

# host paths of a real node -> where a lab node keeps them (under its directory); /var/run/netns
# is the machine's own (the nodes' namespaces are all there)
NODE_PATHS = {"/var/run/openvswitch": "ovs", "/run/openvswitch": "ovs", "/opt/cni/bin": "cni/bin",
              "/etc/cni/net.d": "cni/net.d", "/var/lib/sanderling": "state", "/run/sanderling": "."}
SHARED_PATHS = ("/var/run/netns", "/run/netns")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_BACKOFF_S = 20.0
INIT_TIMEOUT_S = 120.0
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class NodeHost:
    """One lab node seen as a host: its name, namespace, address and directory."""

    name: str
    netns: str
    host_ip: str
    dir: Path

    def host_path(self, path: str) -> Path:
        """Where the node's `path` really is (a private directory for any path not listed)."""
        clean = os.path.normpath(path)
        if clean in SHARED_PATHS:
            return Path(clean)
        for prefix, local in NODE_PATHS.items():
            if clean == prefix or clean.startswith(prefix + "/"):
                return (self.dir / local / os.path.relpath(clean, prefix)).resolve()
        return self.dir / "host" / clean.lstrip("/")

    def view(self) -> dict[str, str]:
        """The binds that make this machine look like the node (view path -> real path)."""
        return {prefix: str((self.dir / local).resolve()) for prefix, local in NODE_PATHS.items()
                if not prefix.startswith("/run/openvswitch")}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (an unknown reference stays as written; `$$` escapes)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text.replace("$$(", "\0")).replace("\0", "$(")


class PodSpecError(ValueError):
    """Something in the pod spec this lab kubelet cannot provide; the message names it."""


@dataclass
class Container:
    spec: dict[str, Any]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    message: str = ""         # why not ready (the readiness answer, or the last line before an exit)
    waiting: str = ""         # CrashLoopBackOff while waiting to restart
    last_exit: dict[str, Any] | None = None
    started_at: str = ""
    next_start: float = 0.0
    probe_due: dict[str, float] = field(default_factory=dict)
    live_failures: int = 0

    @property
    def name(self) -> str:
        return str(self.spec["name"])


class HostPod:
    """One running hostNetwork pod: its volumes on disk, its containers supervised."""

    def __init__(self, pod: dict[str, Any], node: NodeHost, client: Any, report: Callable[[dict[str, Any]], None]):
        self.pod = pod
        self.node = node
        self.client = client
        self.report = report
        meta = pod["metadata"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.dir = node.dir / "pods" / meta["uid"]
        self.stopping = threading.Event()
        self.binds: dict[str, str] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.containers = [Container(c, self.dir / f"{c['name']}.log") for c in pod["spec"].get("containers") or []]
        self.init_status: list[dict[str, Any]] = []
        self.thread: threading.Thread | None = None

    # ---- set-up -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Volumes written and bound; raises PodSpecError naming what cannot be provided."""
        self.dir.mkdir(parents=True, exist_ok=True)
        volumes: dict[str, str] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            volumes[volume["name"]] = str(self._volume(volume))
        self.volumes = volumes

    def _volume(self, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        if "hostPath" in volume:
            path = self.node.host_path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",) or path.parent == self.node.dir / "host":
                path.mkdir(parents=True, exist_ok=True)
            if volume["hostPath"].get("type") == "Directory" and not path.is_dir():
                raise PodSpecError(f"volume {name}: hostPath {volume['hostPath']['path']} is not a directory on "
                                   f"node {self.node.name}")
            path.mkdir(parents=True, exist_ok=True)
            return path
        target = self.dir / "volumes" / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        if "configMap" in volume:
            self._write_config_map(target, volume["configMap"])
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    tok = source["serviceAccountToken"]
                    (target / tok["path"]).write_text(self._token(tok.get("expirationSeconds", 3607),
                                                                  tok.get("audience")))
                elif "configMap" in source:
                    self._write_config_map(target, source["configMap"])
                elif "downwardAPI" in source:
                    for item in source["downwardAPI"].get("items") or []:
                        (target / item["path"]).write_text(self._field(item["fieldRef"]["fieldPath"]))
                else:
                    raise PodSpecError(f"volume {name}: projected source {sorted(source)} not supported by the lab")
        elif "emptyDir" in volume:
            pass
        else:
            raise PodSpecError(f"volume {name}: kind {sorted(k for k in volume if k != 'name')} not supported by "
                               "the lab kubelet")
        return target

    def _write_config_map(self, target: Path, ref: dict[str, Any]) -> None:
        data = self._config_map(ref["name"], bool(ref.get("optional")))
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise PodSpecError(f"ConfigMap {ref['name']} has no key {item['key']}")
            (target / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (target / item["path"]).write_text(data[item["key"]])

    def _config_map(self, name: str, optional: bool) -> dict[str, str]:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import ConfigMap

        try:
            cm = self.client.get(ConfigMap, name, namespace=self.pod["metadata"]["namespace"])
        except ApiError as exc:
            if exc.status.code == 404 and optional:
                return {}
            raise PodSpecError(f"ConfigMap {name}: {exc.status.message}") from None
        return dict(cm.data or {})

    def _token(self, seconds: int, audience: str | None) -> str:
        from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import ServiceAccountToken

        meta = self.pod["metadata"]
        account = self.pod["spec"].get("serviceAccountName") or "default"
        request = ServiceAccountToken(metadata=ObjectMeta(name=account, namespace=meta["namespace"]),
                                      spec=TokenRequestSpec(
            audiences=[audience] if audience else [], expirationSeconds=max(int(seconds), 3600),
            boundObjectRef=BoundObjectReference(kind="Pod", apiVersion="v1", name=meta["name"], uid=meta["uid"])))
        answer = self.client.create(request, account, namespace=meta["namespace"])
        return str(answer.status.token)

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
                  "spec.nodeName": spec.get("nodeName", self.node.name),
                  "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                  "status.hostIP": self.node.host_ip, "status.podIP": self.node.host_ip}
        if path not in fields:
            raise PodSpecError(f"fieldRef {path} not supported by the lab kubelet")
        return fields[path]

    def environment(self, spec: dict[str, Any]) -> dict[str, str]:
        """What a kubelet gives a container: service variables, then envFrom, then env."""
        venv_bin = str(Path(sys.executable).parent)
        env = {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "HOSTNAME": self.node.name, "PYTHONUNBUFFERED": "1", **self._service_env()}
        for source in spec.get("envFrom") or []:
            if "configMapRef" in source:
                ref = source["configMapRef"]
                for k, v in self._config_map(ref["name"], bool(ref.get("optional"))).items():
                    env[source.get("prefix", "") + k] = v
        for var in spec.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
            elif "fieldRef" in (var.get("valueFrom") or {}):
                env[var["name"]] = self._field(var["valueFrom"]["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in (var.get("valueFrom") or {}):
                ref = var["valueFrom"]["configMapKeyRef"]
                data = self._config_map(ref["name"], bool(ref.get("optional")))
                if ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
            else:
                env[var["name"]] = ""
        return env

    def _service_env(self) -> dict[str, str]:
        """KUBERNETES_SERVICE_HOST/PORT: the `kubernetes` Service, as every kubelet sets them."""
        from lightkube.resources.core_v1 import Service

        try:
            svc = self.client.get(Service, "kubernetes", namespace="default")
        except Exception:
            return {}
        port = str(svc.spec.ports[0].port) if svc.spec and svc.spec.ports else "443"
        ip = svc.spec.clusterIP if svc.spec else ""
        return {"KUBERNETES_SERVICE_HOST": ip or "", "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port}

    def argv(self, spec: dict[str, Any], env: dict[str, str]) -> list[str]:
        program = [expand(str(a), env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if not program:
            raise PodSpecError(f"container {spec['name']}: no command (the lab runs no image entrypoint)")
        binds = dict(self.node.view())
        for mount in spec.get("volumeMounts") or []:
            if mount["name"] not in self.volumes:
                raise PodSpecError(f"container {spec['name']}: volumeMount {mount['name']} names no volume")
            source = self.volumes[mount["name"]]
            if os.path.normpath(mount["mountPath"]) != source:
                binds[mount["mountPath"]] = source
        return host_view.argv_for(self.node.netns, binds, program)

    # ---- running ------------------------------------------------------------------------

    def run_init_containers(self) -> None:
        """Each init container to completion, in order; PodSpecError with its output if one fails."""
        for spec in self.pod["spec"].get("initContainers") or []:
            env = self.environment(spec)
            logfile = self.dir / f"{spec['name']}.log"
            with open(logfile, "ab") as out:
                proc = subprocess.run(self.argv(spec, env), env=env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=INIT_TIMEOUT_S)
            self.init_status.append({"name": spec["name"], "image": spec.get("image", ""), "imageID": "",
                                     "ready": proc.returncode == 0, "restartCount": 0,
                                     "state": {"terminated": {"exitCode": proc.returncode,
                                                              "reason": "Completed" if proc.returncode == 0
                                                              else "Error"}}})
            if proc.returncode != 0:
                raise PodSpecError(f"init container {spec['name']} exited {proc.returncode}: {_last_line(logfile)}")

    def start(self) -> None:
        for c in self.containers:
            self._start_container(c)
        self.thread = threading.Thread(target=self._supervise, daemon=True, name=f"hostpod-{self.key}")
        self.thread.start()

    def _start_container(self, c: Container) -> None:
        env = self.environment(c.spec)
        with open(c.log, "ab") as out:
            c.proc = subprocess.Popen(self.argv(c.spec, env), env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        c.started_at, c.waiting, c.ready, c.live_failures = _now(), "", False, 0
        now = time.monotonic()
        for kind in ("readinessProbe", "livenessProbe"):
            if kind in c.spec:
                c.probe_due[kind] = now + float(c.spec[kind].get("initialDelaySeconds", 0))
        if "readinessProbe" not in c.spec:
            c.ready = True
        log.info("pod %s: container %s started on %s (pid %d)", self.key, c.name, self.node.name, c.proc.pid)

    def _supervise(self) -> None:
        said = ""
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            for c in self.containers:
                if c.proc is not None and c.proc.poll() is not None:
                    code = c.proc.returncode
                    c.last_exit = {"exitCode": code, "reason": "Error" if code else "Completed",
                                   "message": _last_line(c.log), "finishedAt": _now()}
                    c.proc, c.ready, c.message = None, False, c.last_exit["message"]
                    delay = min(MAX_BACKOFF_S, 1.0 * 2 ** min(c.restarts, 5))
                    c.next_start, c.waiting = now + delay, "CrashLoopBackOff"
                    log.warning("pod %s: container %s exited %d (%s); restarting in %.0f s", self.key, c.name, code,
                                c.message, delay)
                if c.proc is None and now >= c.next_start:
                    c.restarts += 1
                    try:
                        self._start_container(c)
                    except (PodSpecError, OSError) as exc:
                        c.message, c.next_start = str(exc), now + MAX_BACKOFF_S
                self._probe(c, now)
            text = json.dumps(self.status(), sort_keys=True, default=str)
            if text != said:
                said = text
                try:
                    self.report(self.status())
                except Exception as exc:  # the API may be restarting: the next change reports again
                    log.info("pod %s: status not reported: %s", self.key, exc)
                    said = ""

    def _probe(self, c: Container, now: float) -> None:
        if c.proc is None:
            return
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.spec.get(kind)
            if probe is None or now < c.probe_due.get(kind, 0):
                continue
            c.probe_due[kind] = now + float(probe.get("periodSeconds", 10))
            ok, answer = self._http_probe(c.spec, probe)
            if kind == "readinessProbe":
                c.ready, c.message = ok, ("" if ok else answer)
            elif ok:
                c.live_failures = 0
            else:
                c.live_failures += 1
                if c.live_failures >= int(probe.get("failureThreshold", 3)):
                    log.warning("pod %s: container %s failed its liveness probe %d times (%s): restarted",
                                self.key, c.name, c.live_failures, answer)
                    _terminate(c.proc, 5.0)

    def _http_probe(self, spec: dict[str, Any], probe: dict[str, Any]) -> tuple[bool, str]:
        get = probe.get("httpGet")
        if get is None:
            return False, f"probe {sorted(probe)} not supported by the lab kubelet (httpGet only)"
        port = get["port"]
        if isinstance(port, str) and not port.isdigit():
            port = next((p["containerPort"] for p in spec.get("ports") or [] if p.get("name") == port), 0)
        url = f"http://{get.get('host') or self.node.host_ip}:{port}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=float(probe.get("timeoutSeconds", 1))) as resp:
                return 200 <= resp.status < 400, ""
        except urllib.error.HTTPError as exc:
            return False, _probe_message(exc.code, exc.read())
        except OSError as exc:
            return False, f"GET {url}: {exc}"

    def status(self) -> dict[str, Any]:
        ready = all(c.ready for c in self.containers)
        why = "; ".join(f"{c.name}: {c.message}" for c in self.containers if not c.ready and c.message)
        statuses = []
        for c in self.containers:
            state: dict[str, Any] = ({"running": {"startedAt": c.started_at}} if c.proc is not None else
                                     {"waiting": {"reason": c.waiting or "ContainerCreating", "message": c.message}})
            entry = {"name": c.name, "image": c.spec.get("image", ""), "imageID": "", "ready": c.ready,
                     "started": c.proc is not None, "restartCount": c.restarts, "state": state,
                     "containerID": f"lab://{self.pod['metadata']['uid']}-{c.name}"}
            if c.last_exit:
                entry["lastState"] = {"terminated": c.last_exit}
            statuses.append(entry)
        flag = "True" if ready else "False"
        ready_condition = {"type": "Ready", "status": flag, **({} if ready else {"reason": "ContainersNotReady",
                                                                                "message": why[:1000]})}
        return {"phase": "Running", "podIP": self.node.host_ip, "podIPs": [{"ip": self.node.host_ip}],
                "hostIP": self.node.host_ip, "hostIPs": [{"ip": self.node.host_ip}],
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                               {"type": "ContainersReady", "status": flag}, ready_condition],
                "initContainerStatuses": self.init_status, "containerStatuses": statuses}

    def stop(self) -> None:
        """SIGTERM every container, SIGKILL after the pod's grace period; the volumes removed."""
        self.stopping.set()
        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        for c in self.containers:
            if c.proc is not None:
                _terminate(c.proc, grace)
        if self.thread is not None:
            self.thread.join(5)
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        log.info("pod %s stopped on %s", self.key, self.node.name)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-500:] if lines else ""


def _probe_message(code: int, body: bytes) -> str:
    """A failed probe's answer in one line (the agent's /readyz lists what is missing)."""
    try:
        data = json.loads(body)
        missing = data.get("missing") if isinstance(data, dict) else None
        if missing:
            return f"HTTP {code}: " + "; ".join(str(m) for m in missing)
    except ValueError:
        pass
    return f"HTTP {code}: {body.decode(errors='replace').strip()[:300]}"
