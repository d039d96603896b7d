"""The lab control plane process: API server, scheduler and one kubelet per node.

`python -m sanderling.lab.controlplane --state DIR --port N` serves the Kubernetes API from
DIR/api.db and runs, against the same store: a scheduler (pods without spec.nodeName go to the
node with the fewest pods) and the kubelets of the nodes registered with the
`lab.sanderling.io/cni-bin` and `lab.sanderling.io/cni-conf` annotations. Restarting it loses
nothing: objects are in SQLite and running pods are adopted from their status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from sanderling.lab.apiserver.server import serve
from sanderling.lab.apiserver.store import ApiError, Store, WatchEvent
from sanderling.lab.kubelet import Kubelet, NodeRuntime
from sanderling.process import until_signalled

log = logging.getLogger("sanderling.lab.controlplane")
PODS, NODES = "/pods", "/nodes"
ANN_BIN, ANN_CONF, ANN_NETNS = "lab.sanderling.io/cni-bin", "lab.sanderling.io/cni-conf", "lab.sanderling.io/netns"


class ControlPlane:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.kubelets: dict[str, Kubelet] = {}
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._busy: set[str] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.store.listeners.append(lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev))
        for node in self.store.list(NODES, None)[0]:
            self._register(node)
        for pod in self.store.list(PODS, None)[0]:
            self._adopt(pod)
            self.queue.put_nowait(WatchEvent(0, PODS, pod["metadata"]["namespace"], "MODIFIED", pod))

    def _register(self, node: dict[str, Any]) -> None:
        ann = node["metadata"].get("annotations") or {}
        name = node["metadata"]["name"]
        if ANN_BIN in ann and name not in self.kubelets:
            self.kubelets[name] = Kubelet(NodeRuntime(name, Path(ann[ANN_BIN]), Path(ann[ANN_CONF]),
                                                      ann.get(ANN_NETNS, name)))
            log.info("kubelet for node %s", name)

    def _adopt(self, pod: dict[str, Any]) -> None:
        """After a restart: pods already running keep running; remember them."""
        from sanderling.lab.kubelet import RunningPod

        node = (pod.get("spec") or {}).get("nodeName")
        if node in self.kubelets and (pod.get("status") or {}).get("podIP"):
            meta = pod["metadata"]
            kubelet = self.kubelets[node]
            kubelet.pods[f"{meta['namespace']}/{meta['name']}"] = RunningPod(
                kubelet.sandbox_name(meta["namespace"], meta["name"]), meta["uid"].replace("-", "")[:32])

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                if event.resource == NODES and event.type != "DELETED":
                    self._register(event.body)
                elif event.resource == PODS:
                    await self._pod(event)
            except Exception:  # one bad object must not stop the control plane
                log.exception("handling %s %s", event.type, event.body.get("metadata", {}).get("name"))

    async def _pod(self, event: WatchEvent) -> None:
        pod = event.body
        meta, spec = pod["metadata"], pod.get("spec") or {}
        key = f"{meta['namespace']}/{meta['name']}"
        node = spec.get("nodeName")
        if event.type == "DELETED":
            if node in self.kubelets:
                await asyncio.to_thread(self.kubelets[node].stop, meta["namespace"], meta["name"], meta.get("uid", ""))
            return
        if not node:
            self._schedule(pod)
            return
        kubelet = self.kubelets.get(node)
        if kubelet is None or key in kubelet.pods or key in self._busy or (pod.get("status") or {}).get("podIP"):
            return
        self._busy.add(key)
        asyncio.create_task(self._start(kubelet, pod, key))

    async def _start(self, kubelet: Kubelet, pod: dict[str, Any], key: str) -> None:
        try:
            status = await asyncio.to_thread(kubelet.start, pod)
            meta = pod["metadata"]
            status["hostIP"] = ""
            try:
                self.store.patch(PODS, meta["namespace"], meta["name"], {"status": status}, "status")
            except ApiError as exc:  # deleted meanwhile
                log.info("pod %s: status not recorded: %s", key, exc.message)
        finally:
            self._busy.discard(key)

    def _schedule(self, pod: dict[str, Any]) -> None:
        if not self.kubelets:
            return
        load = {name: 0 for name in self.kubelets}
        for other in self.store.list(PODS, None)[0]:
            node = (other.get("spec") or {}).get("nodeName")
            if node in load:
                load[node] += 1
        target = min(sorted(load), key=lambda n: load[n])
        meta = pod["metadata"]
        self.store.patch(PODS, meta["namespace"], meta["name"], {"spec": {"nodeName": target}})
        log.info("scheduled %s/%s to %s", meta["namespace"], meta["name"], target)


async def main_async(args: argparse.Namespace) -> int:
    store = Store(args.state / "api.db")
    runner = await serve(store, "127.0.0.1", args.port)
    plane = ControlPlane(store)
    plane.start()
    task = asyncio.create_task(plane.run())
    await until_signalled()
    task.cancel()
    await runner.cleanup()
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sanderling.lab.controlplane")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
