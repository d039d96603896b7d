"""What the agent may do in the Kubernetes API, checked once at start-up.

Why: an agent missing one verb would otherwise run half-blind (an informer retrying a 403
forever, Events silently lost) while reporting healthy. Each permission below is one the agent
uses, the same list as deploy/rbac.yaml's ClusterRole (a unit test keeps them equal); at start-up
the agent asks the API server about each (SelfSubjectAccessReview, which any authenticated user
may create) and stops with one line naming the first it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verb: str
    subresource: str = ""

    def text(self) -> str:
        res = self.resource + (f"/{self.subresource}" if self.subresource else "")
        return f"{self.verb} {res}" + (f".{self.group}" if self.group else "")


def _all(group: str, resource: str, *verbs: str, subresource: str = "") -> list[Permission]:
    return [Permission(group, resource, v, subresource) for v in verbs]


REQUIRED: tuple[Permission, ...] = tuple(
    _all("", "pods", "get", "list", "watch", "patch")
    + _all("", "nodes", "get", "list", "watch", "patch")
    + _all("", "namespaces", "get", "list", "watch")
    + _all("", "services", "list", "watch", "patch")
    + _all("", "events", "create")
    + _all("discovery.k8s.io", "endpointslices", "list", "watch", "get", "create", "update", "delete")
    + _all("networking.k8s.io", "networkpolicies", "list", "watch")
    + _all("ipam.sanderling.io", "ippools", "get", "list", "watch", "create")
    + _all("ipam.sanderling.io", "ippools", "update", subresource="status")
    + _all("k8s.cni.cncf.io", "network-attachment-definitions", "get", "list", "watch")
    + _all("k8s.cni.cncf.io", "multi-networkpolicies", "list", "watch"))


class MissingPermission(SystemExit):
    pass


def check(client: Any, required: tuple[Permission, ...] = REQUIRED) -> None:
    """Raise MissingPermission naming the first permission the API server denies (a lightkube
    sync Client)."""
    from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
    from lightkube.resources.authorization_v1 import SelfSubjectAccessReview

    for perm in required:
        review = client.create(SelfSubjectAccessReview(spec=SelfSubjectAccessReviewSpec(
            resourceAttributes=ResourceAttributes(group=perm.group, resource=perm.resource, verb=perm.verb,
                                                  subresource=perm.subresource or None))))
        if not (review.status and review.status.allowed):
            why = f" ({review.status.reason})" if review.status and review.status.reason else ""
            raise MissingPermission(
                f"sanderling-agent: not allowed to {perm.text()} (cluster-wide){why}; grant it in the agent's "
                "ClusterRole (deploy/rbac.yaml has every verb the agent needs)")
