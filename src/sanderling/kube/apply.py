"""Create-or-replace of one object, as `kubectl apply` does for a whole object, with the two
waits kube-apiserver makes clients handle right after a namespace changes.

Why the waits: a pod created just after its namespace is refused until the ServiceAccount
controller has made the namespace's `default` ServiceAccount; an object created in a namespace
that is still being deleted (namespace deletion is asynchronous, with finalizers) is refused until
it is gone. Both are transient and both answer 403 with those words; anything else is the
object's own problem and is raised at once. The embedded lab server has neither delay.
"""

from __future__ import annotations

import time
from typing import Any

TRANSIENT = ("service account", "serviceaccount", "being terminated")


def create_or_replace(client: Any, obj: Any, wait_s: float = 60.0) -> str:
    """'created' or 'configured' (a lightkube sync Client and resource object)."""
    from lightkube import ApiError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            # look first: kube-apiserver allocates before it notices a name is taken, so creating
            # a Service that exists says "IP already allocated", not 409
            try:
                current = client.get(type(obj), obj.metadata.name, namespace=obj.metadata.namespace)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                try:
                    client.create(obj)
                    return "created"
                except ApiError as exc:
                    if exc.status.code != 409:  # created meanwhile: replace it
                        raise
                    current = client.get(type(obj), obj.metadata.name, namespace=obj.metadata.namespace)
            obj.metadata.resourceVersion = current.metadata.resourceVersion
            client.replace(obj)
            return "configured"
        except ApiError as exc:
            message = (exc.status.message or "").lower()
            if exc.status.code != 403 or not any(t in message for t in TRANSIENT) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
