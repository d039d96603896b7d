"""Ask a lab node's agent what it has: its status endpoint, from inside the node's namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from typing import Any

from sanderling.agent.status import DEFAULT_ADDRESS

# runs in a node's namespace: GET the agent's status endpoint, print the body (also on 503)
_GET = ("import sys, urllib.request, urllib.error\n"
        "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\n"
        "except urllib.error.HTTPError as e:\n    print(e.read().decode())\n")


def fetch(netns: str, path: str) -> dict[str, Any]:
    """The JSON the agent answers on `path` (/readyz, /objects?prefix=...), or {"error": why}."""
    got = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _GET, f"http://{DEFAULT_ADDRESS}{path}"],
                         capture_output=True, text=True, timeout=30)
    try:
        body: dict[str, Any] = json.loads(got.stdout)
        return body
    except ValueError:
        return {"error": (got.stderr.strip().splitlines() or ["no answer"])[-1]}


def metrics_text(netns: str) -> str:
    """The agent's Prometheus exposition text (/metrics)."""
    got = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _GET,
                          f"http://{DEFAULT_ADDRESS}/metrics"], capture_output=True, text=True, timeout=30)
    if got.returncode != 0:
        raise RuntimeError((got.stderr.strip().splitlines() or ["no answer"])[-1])
    return got.stdout


def samples(text: str, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric in exposition text whose labels include `labels`: {labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def readiness(netns: str) -> dict[str, Any]:
    return fetch(netns, "/readyz")


def objects(netns: str, prefix: str) -> dict[str, Any]:
    return fetch(netns, "/objects?prefix=" + urllib.parse.quote(prefix))


def wait_ready(nodes: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
    """Until every agent (node name -> netns) reports ready; their last answers either way."""
    deadline = time.monotonic() + timeout
    while True:
        answers = {name: readiness(netns) for name, netns in nodes.items()}
        if all(a.get("ready") for a in answers.values()) or time.monotonic() > deadline:
            return answers
        time.sleep(0.2)
