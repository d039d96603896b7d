"""`sanderling lab trace`: the trace client (tracer.py) with the lab's way to reach its agents,
inside each node's network namespace (their status endpoint)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from sanderling.lab import agent_status
from sanderling.lab.cluster import Lab
from sanderling.tracer import Tracer


def lab_tracer(lab: Lab) -> Tracer:
    from sanderling.kube.client import KubeApi

    state = lab.state()
    netns = {n["name"]: n["netns"] for n in state["nodes"]}

    def ask(node: str, params: dict[str, str]) -> dict[str, Any]:
        return agent_status.fetch(netns[node], "/trace?" + urllib.parse.urlencode(params))

    return Tracer(KubeApi(lab.kubeconfig).client, ask, set(netns))
