"""The CNI shim's validation and output, run as the runtime runs it (a process, env, stdin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sanderling.cni import shim

SHIM = Path(shim.__file__)
BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/var/run/netns/none",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
CONF = {"cniVersion": "1.1.0", "name": "net1", "type": "sanderling-cni", "agentSocket": "/nonexistent.sock"}


def run(env: dict, stdin: str = json.dumps(CONF)) -> tuple[int, dict | None]:
    proc = subprocess.run([os.path.realpath(sys.executable), "-IS", str(SHIM)], input=stdin, env=env,
                          capture_output=True, text=True)
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def test_version_echoes_the_requested_version():
    code, out = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": "1.0.0"}))
    assert code == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_missing_env_lists_every_missing_variable():
    env = dict(BASE_ENV)
    del env["CNI_CONTAINERID"], env["CNI_NETNS"]
    code, out = run(env)
    assert code == 1 and out["code"] == 4
    assert "CNI_CONTAINERID" in out["msg"] and "CNI_NETNS" in out["msg"]


def test_bad_inputs_get_spec_codes():
    assert run({**BASE_ENV, "CNI_CONTAINERID": "bad%%id"})[1]["code"] == 4
    assert run({**BASE_ENV, "CNI_IFNAME": "a/b"})[1]["code"] == 4
    assert run(BASE_ENV, "{oops")[1]["code"] == 6
    assert run(BASE_ENV, json.dumps({**CONF, "cniVersion": "9.9.9"}))[1]["code"] == 1
    assert run(BASE_ENV, json.dumps({**CONF, "name": "-bad"}))[1]["code"] == 7
    assert run({**BASE_ENV, "CNI_NETNS": "/proc/self/ns/net"})[1]["code"] == 8
    missing = run(BASE_ENV)[1]
    assert missing["code"] == 8 and "/var/run/netns/none" in missing["msg"]
    assert run({**BASE_ENV, "CNI_COMMAND": "GC"}, json.dumps({**CONF, "cniVersion": "1.0.0"}))[1]["code"] == 1


def test_agent_down_is_try_again_later_and_status_not_available():
    code, out = run({**BASE_ENV, "CNI_COMMAND": "DEL"})
    assert code == 1 and out["code"] == 11 and "/nonexistent.sock" in out["msg"]
    code, out = run({"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"})
    assert code == 1 and out["code"] == 50


def test_json_helpers_round_trip():
    value = {"a": [1, 2.5, "x\u00e9\"", None, True, False], "b": {}}
    assert json.loads(shim.dumps(value)) == value
    assert shim.loads(' {"x": [1, {"y": null}]} ') == {"x": [1, {"y": None}]}


def test_shim_starts_fast():
    """Not a floor (that is the benchmark's job): a guard against importing heavy modules."""
    env = {"CNI_COMMAND": "VERSION"}
    best = min(_timed(env) for _ in range(5))
    assert best < 0.15, f"shim took {best * 1000:.0f} ms"


def _timed(env: dict) -> float:
    start = time.perf_counter()
    run(env, "{}")
    return time.perf_counter() - start


def test_the_shims_error_codes_are_the_agents():
    """The shim is standard library only and keeps its own copy of the codes: one definition
    (sanderling.cni.errors), and this test keeps the copy equal to it."""
    from sanderling.cni import errors

    shim_codes = {k: v for k, v in vars(shim).items() if k.startswith("E_") and isinstance(v, int)}
    agent_codes = {k: v for k, v in vars(errors).items() if k.startswith("E_") and isinstance(v, int)}
    assert shim_codes and all(agent_codes.get(k) == v for k, v in shim_codes.items()), (shim_codes, agent_codes)


def test_an_agent_dying_mid_request_is_try_again_later(tmp_path):
    """The agent killed between accepting and answering: the runtime must retry, not give up."""
    import socket
    import threading

    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def accept_and_vanish() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=accept_and_vanish)
    thread.start()
    try:
        code, out = run({**BASE_ENV, "CNI_COMMAND": "DEL"}, json.dumps({**CONF, "agentSocket": str(path)}))
    finally:
        thread.join(10)
        server.close()
    assert code == 1 and out is not None and out["code"] == 11, out
    assert "closed the connection before answering" in out["msg"]

