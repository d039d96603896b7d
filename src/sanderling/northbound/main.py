"""`sanderling-northbound`: the cluster's pods, nodes, services and endpoints fed to an SDN controller.

One process per cluster (a Deployment with one replica, or run beside the controller): informers
on Nodes, Pods, Services, EndpointSlices and NetworkAttachmentDefinitions; every change turns
into the documents it affects (`northbound.coe`), which the feed (`northbound.feed`) sends to the
controller: RESTCONF of OpenDaylight's COE models (`--restconf URL`) or a webhook of JSON events
(`--webhook URL`). The first contact, and the first after any failure, is a full resync.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from sanderling.northbound import coe
from sanderling.northbound.feed import Feed
from sanderling.northbound.targets import Credentials, RestconfTarget, WebhookTarget

log = logging.getLogger("sanderling.northbound")
KINDS = ("Node", "Pod", "Service", "EndpointSlice", "NAD")


class Watcher:
    """The watched objects, and the documents each change affects handed to the feed."""

    def __init__(self, feed: Feed, cluster: coe.ClusterInfo) -> None:
        self.feed = feed
        self.cluster = cluster
        self.objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}

    def callback(self, kind: str) -> Any:
        def changed(key: str, obj: dict[str, Any] | None) -> None:
            old = self.objects[kind].get(key)
            if obj is None:
                self.objects[kind].pop(key, None)
            else:
                self.objects[kind][key] = obj
            try:
                self._affected(kind, key, old, obj)
            except Exception:  # one odd object must not stop the feed of the others
                log.exception("%s %s: not fed", kind, key)
        return changed

    def _affected(self, kind: str, key: str, old: dict[str, Any] | None, obj: dict[str, Any] | None) -> None:
        uid = ((obj or old or {}).get("metadata") or {}).get("uid", "")
        if kind == "Pod":
            self._pod(old, obj)
        elif kind == "Node":
            if obj is None:
                self.feed.set(f"{coe.NODES}/{uid}", None)
            else:
                self.feed.set(*coe.node_doc(obj))
        elif kind == "Service":
            if old is not None and obj is not None and old["metadata"].get("uid") != uid:
                self._service_gone(old["metadata"].get("uid", ""))
            if obj is None:
                self._service_gone(uid)
            else:
                self.feed.set(*coe.service_doc(obj))
                self._endpoints(key)
        elif kind == "EndpointSlice":
            for sl in (old, obj):
                svc = ((sl or {}).get("metadata") or {}).get("labels", {}).get("kubernetes.io/service-name")
                if svc:
                    self._endpoints(f"{key.split('/', 1)[0]}/{svc}")
        elif kind == "NAD":  # the type of a network: every pod's interfaces may say it
            for pod in self.objects["Pod"].values():
                self._pod(pod, pod)

    def _pod(self, old: dict[str, Any] | None, obj: dict[str, Any] | None) -> None:
        doc = coe.pod_doc(obj, self.objects["NAD"], self.cluster) if obj is not None else None
        if old is not None and (doc is None or old["metadata"]["uid"] != obj["metadata"]["uid"]):  # type: ignore[index]
            self.feed.set(f"{coe.PODS}/{old['metadata']['uid']}", None)
        if doc is not None:
            self.feed.set(*doc)

    def _service_gone(self, uid: str) -> None:
        self.feed.set(f"{coe.SERVICES}/{uid}", None)
        self.feed.set(f"{coe.ENDPOINTS}/{uid}", None)

    def _endpoints(self, service_key: str) -> None:
        svc = self.objects["Service"].get(service_key)
        if svc is None:
            return
        namespace, name = service_key.split("/", 1)
        slices = [s for s in self.objects["EndpointSlice"].values() if s["metadata"].get("namespace") == namespace
                  and (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name") == name]
        self.feed.set(*coe.endpoints_doc(svc, slices))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sanderling-northbound", description=__doc__.splitlines()[0])
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--restconf", metavar="URL", help="the controller's RESTCONF base, e.g. http://odl:8181 "
                                                      "(documents go to URL/restconf/config/...)")
    to.add_argument("--webhook", metavar="URL", help="POST JSON events (PUT, DELETE, SYNC) to URL")
    p.add_argument("--kubeconfig", type=Path, help="Kubernetes API access (default: in-cluster)")
    p.add_argument("--cluster-id", default="sanderling", help="the cluster's name in the documents")
    p.add_argument("--mode", choices=["routed", "overlay"], default="routed",
                   help="the pod network's mode: its network-type FLAT (routed) or VXLAN (overlay)")
    p.add_argument("--user", default="", help="basic auth user")
    p.add_argument("--password-file", type=Path, help="basic auth password, read from this file")
    p.add_argument("--token-file", type=Path, help="bearer token, read from this file")
    p.add_argument("--ca-file", default="", help="CA certificates to verify the controller's TLS certificate")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def serve(args: argparse.Namespace) -> int:
    from lightkube import AsyncClient, KubeConfig
    from lightkube.resources.core_v1 import Node, Pod, Service
    from lightkube.resources.discovery_v1 import EndpointSlice

    from sanderling.kube.client import NadResource
    from sanderling.kube.informer import Informer
    from sanderling.process import until_signalled

    def secret(path: Path | None) -> str:
        return path.read_text().strip() if path is not None else ""

    credentials = Credentials(args.user, secret(args.password_file), secret(args.token_file), args.ca_file)
    target = RestconfTarget(args.restconf, credentials) if args.restconf else WebhookTarget(args.webhook, credentials)
    feed = Feed(target)
    watcher = Watcher(feed, coe.ClusterInfo(args.cluster_id, args.mode))
    config = KubeConfig.from_file(str(args.kubeconfig)) if args.kubeconfig else KubeConfig.from_service_account()
    client = AsyncClient(config=config, field_manager="sanderling-northbound")
    informers = [Informer(client, Node, watcher.callback("Node"), namespaced=False),
                 Informer(client, Pod, watcher.callback("Pod")),
                 Informer(client, Service, watcher.callback("Service")),
                 Informer(client, EndpointSlice, watcher.callback("EndpointSlice")),
                 Informer(client, NadResource, watcher.callback("NAD"))]
    tasks = [asyncio.create_task(i.run()) for i in informers] + [asyncio.create_task(feed.run())]

    async def start_when_listed() -> None:
        for informer in informers:
            await informer.synced.wait()
        log.info("cluster listed: %d documents for %s", len(feed.desired), target.name)
        feed.start()
    tasks.append(asyncio.create_task(start_when_listed()))
    await until_signalled()
    for task in tasks:
        task.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: "
                                                                        "%(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for path in (args.password_file, args.token_file):
        if path is not None and not path.is_file():
            print(f"sanderling-northbound: {path}: no such file", file=sys.stderr)
            return 1
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
