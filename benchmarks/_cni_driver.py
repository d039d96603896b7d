"""Runs a CNI plugin as a container runtime does: N concurrent ADDs per round, then DELs.

Used by bench cni for both Sanderling and the reference plugins, started inside the network
namespace the plugin should see as "the host" so no `ip netns exec` lands in the timings.
Reads a job as JSON on stdin, prints the ADD latencies (ms) as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time


def call(plugin: str, conf: str, env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run([plugin], input=conf, env=env, capture_output=True, text=True)
    return (time.perf_counter() - start) * 1000, proc.returncode, proc.stdout


def main() -> int:
    job = json.load(sys.stdin)
    conf = json.dumps(job["conf"])
    latencies: list[float] = []
    failures: list[str] = []
    for rnd in range(job["rounds"]):
        envs = [{**job["env"], "CNI_CONTAINERID": f"bench{rnd}x{i}", "CNI_NETNS": ns, "CNI_IFNAME": "eth0"}
                for i, ns in enumerate(job["sandboxes"])]
        results: list[tuple[float, int, str]] = [(0.0, 0, "")] * len(envs)

        def add(i: int, envs: list[dict[str, str]] = envs, results: list[tuple[float, int, str]] = results) -> None:
            results[i] = call(job["plugin"], conf, {**envs[i], "CNI_COMMAND": "ADD"})

        threads = [threading.Thread(target=add, args=(i,)) for i in range(len(envs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ms, code, out in results:
            if code != 0:
                failures.append(out[:300])
            latencies.append(ms)
        dels = [threading.Thread(target=call, args=(job["plugin"], conf, {**e, "CNI_COMMAND": "DEL"})) for e in envs]
        for t in dels:
            t.start()
        for t in dels:
            t.join()
    json.dump({"latencies_ms": latencies, "failures": failures}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
