"""Synchronous Kubernetes API access for the agent (called from worker threads).

A thin layer over lightkube: pods, namespaces, events, and IPPools with optimistic
concurrency (every status write carries the resourceVersion it read; a 409 re-reads and
retries), which is what keeps two nodes from handing out the same pool address.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from lightkube import ApiError, Client, KubeConfig
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event, Namespace, Node, Pod

log = logging.getLogger(__name__)

IPPoolResource = create_global_resource("ipam.sanderling.io", "v1alpha1", "IPPool", "ippools")
NadResource = create_namespaced_resource("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition",
                                         "network-attachment-definitions")
MultiNetworkPolicyResource = create_namespaced_resource("k8s.cni.cncf.io", "v1beta1", "MultiNetworkPolicy",
                                                        "multi-networkpolicies")


def httpx_timeout(seconds: float) -> Any:
    """lightkube takes an httpx Timeout; import it the way lightkube does."""
    from lightkube.core.generic_client import httpx

    return httpx.Timeout(seconds)


class Conflict(Exception):
    """Optimistic concurrency lost too many times in a row."""


class KubeApi:
    def __init__(self, kubeconfig: Path | None = None, timeout: float = 10.0) -> None:
        if kubeconfig is not None:
            config = KubeConfig.from_file(str(kubeconfig))
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config = KubeConfig.from_service_account()
        else:
            config = KubeConfig.from_file(os.path.expanduser("~/.kube/config"))
        self.client = Client(config=config, timeout=httpx_timeout(timeout), field_manager="sanderling-agent")

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.client.get(Pod, name, namespace=namespace).to_dict()
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    def node(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.get(Node, name).to_dict()
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    def namespace_labels(self, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """(labels, annotations) of a namespace; empty if it does not exist."""
        try:
            meta = self.client.get(Namespace, name).metadata
        except ApiError as exc:
            if exc.status.code == 404:
                return {}, {}
            raise
        if meta is None:
            return {}, {}
        return dict(meta.labels or {}), dict(meta.annotations or {})

    def node_pods(self, node: str) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for pod in self.client.list(Pod, namespace="*", fields={"spec.nodeName": node}):
            if pod.metadata is not None:
                out.add((pod.metadata.namespace or "", pod.metadata.name or ""))
        return out

    def nad(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.get(NadResource, name, namespace=namespace))
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    def nads(self) -> list[dict[str, Any]]:
        return [dict(n) for n in self.client.list(NadResource, namespace="*")]

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
        """Merge-patch the pod's annotations (None removes one)."""
        from lightkube.types import PatchType

        self.client.patch(Pod, name, {"metadata": {"annotations": annotations}}, namespace=namespace,
                          patch_type=PatchType.MERGE)

    def annotate_node(self, name: str, annotations: dict[str, str | None]) -> None:
        """Merge-patch the node's annotations (None removes one)."""
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        self.client.patch(Node, name, {"metadata": {"annotations": annotations}}, patch_type=PatchType.MERGE)

    def ensure_pool(self, name: str, spec: dict[str, Any]) -> None:
        """Create the IPPool if it does not exist (a secondary network's pool, created on first use)."""
        if self.pool(name) is not None:
            return
        try:
            self.client.create(IPPoolResource(metadata=ObjectMeta(name=name), spec=spec))
        except ApiError as exc:
            if exc.status.code != 409:  # another node created it first
                raise

    def pools(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.client.list(IPPoolResource)]

    def pool(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.get(IPPoolResource, name))
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    def update_pool_allocations(self, name: str, change: Any, attempts: int = 50) -> Any:
        """Read the pool, let `change(allocations) -> (new allocations, result)` decide, write
        back with the resourceVersion read; on 409 Conflict start again."""
        for attempt in range(attempts):
            current = self.pool(name)
            if current is None:
                raise LookupError(f"IPPool {name} does not exist")
            allocations = dict(((current.get("status") or {}).get("allocations")) or {})
            new_allocations, result = change(current, allocations)
            if new_allocations is None:
                return result
            try:
                self.client.replace(IPPoolResource.Status.from_dict({
                    "apiVersion": "ipam.sanderling.io/v1alpha1", "kind": "IPPool",
                    "metadata": {"name": name, "resourceVersion": current["metadata"]["resourceVersion"]},
                    "status": {**(current.get("status") or {}), "allocations": new_allocations}}))
                return result
            except ApiError as exc:
                if exc.status.code != 409:
                    raise
                time.sleep(min(0.002 * (attempt + 1), 0.05))
        raise Conflict(f"IPPool {name}: {attempts} conflicting updates in a row")

    def event(self, namespace: str, pod: str, reason: str, message: str, node: str, kind: str = "Warning",
              involved_kind: str = "Pod", api_version: str = "v1") -> None:
        try:
            self.client.create(Event(
                metadata=ObjectMeta(generateName=f"{pod}.", namespace=namespace),
                involvedObject=ObjectReference(kind=involved_kind, namespace=namespace, name=pod,
                                               apiVersion=api_version),
                reason=reason, message=message, type=kind, source=EventSource(component="sanderling-agent",
                                                                              host=node)))
        except Exception as exc:  # an event is best effort; the log line stays
            log.warning("could not record event %s for pod %s/%s: %s", reason, namespace, pod, exc)

