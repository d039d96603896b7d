"""A real Prometheus (Debian's package) scraping every node agent of a lab.

It runs in the fabric namespace, outside the cluster like an operator's monitoring, and scrapes
each agent's /metrics on its node's underlay address (the lab's agents serve their status on
every address of the node, port 9465). `query` asks it PromQL from this host; the dashboard test
and `sanderling lab query` use it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

PROMETHEUS = "/usr/bin/prometheus"
LISTEN = "127.0.0.1:9090"  # inside the fabric namespace
AGENT_PORT = 9465
SCRAPE_INTERVAL_S = 2

# runs in the fabric namespace: GET a Prometheus API path, print the body (also on an HTTP error)
_GET = ("import sys, urllib.request, urllib.error\n"
        "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n"
        "except urllib.error.HTTPError as e:\n    print(e.read().decode())\n")


def config(targets: dict[str, str]) -> str:
    """prometheus.yml: one job, every node's agent (node name -> underlay address)."""
    lines = ["global:", f"  scrape_interval: {SCRAPE_INTERVAL_S}s", f"  evaluation_interval: {SCRAPE_INTERVAL_S}s",
             "scrape_configs:", "  - job_name: sanderling-agent", "    static_configs:"]
    for node, ip in sorted(targets.items()):
        lines += [f"      - targets: ['{ip}:{AGENT_PORT}']", f"        labels: {{node: {node}}}"]
    return "\n".join(lines) + "\n"


def start(state_dir: Path, netns: str, targets: dict[str, str]) -> int:
    """Start Prometheus in `netns`; return its pid once it answers ready."""
    if not Path(PROMETHEUS).exists():
        raise SystemExit(f"{PROMETHEUS} is missing: `apt-get install prometheus` (scripts/setup.sh installs it)")
    home = state_dir / "prometheus"
    (home / "data").mkdir(parents=True, exist_ok=True)
    (home / "prometheus.yml").write_text(config(targets))
    # it listens on the namespace's loopback, which a namespace starts with down
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    log = open(home / "prometheus.log", "ab")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, PROMETHEUS, f"--config.file={home / 'prometheus.yml'}",
                             f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address={LISTEN}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prometheus exited ({proc.returncode}); see {home / 'prometheus.log'}")
        if "Ready" in _get(netns, "/-/ready"):
            return proc.pid
        time.sleep(0.3)
    raise SystemExit(f"prometheus did not become ready in 60 s; see {home / 'prometheus.log'}")


def _get(netns: str, path: str) -> str:
    got = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _GET, f"http://{LISTEN}{path}"],
                         capture_output=True, text=True, timeout=30)
    return got.stdout


def query(netns: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector (or scalar) PromQL answers now: [{"metric": {...}, "value": [t, "v"]}]."""
    body = _get(netns, "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    try:
        answer = json.loads(body)
    except ValueError:
        raise RuntimeError(f"prometheus did not answer {promql!r}: {body[:200] or 'nothing'}") from None
    if answer.get("status") != "success":
        raise RuntimeError(f"prometheus refused {promql!r}: {answer.get('error', answer)}")
    data = answer["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result


def targets_up(netns: str) -> dict[str, bool]:
    """node -> whether Prometheus's last scrape of its agent worked."""
    return {r["metric"].get("node", "?"): r["value"][1] == "1" for r in query(netns, "up")}
