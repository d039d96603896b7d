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



# ---- the compiled front (cni-shim/, built by scripts/setup.sh) ---------------------------------

def _installed_front(tmp_path: Path) -> Path:
    from sanderling.cni.install import COMPILED_SHIM, install_binary

    assert os.access(COMPILED_SHIM, os.X_OK), f"{COMPILED_SHIM} missing: scripts/setup.sh builds it"
    return install_binary(tmp_path / "bin", socket=tmp_path / "default.sock", compiled=COMPILED_SHIM)


def _run_front(plugin: Path, env: dict, stdin: str) -> tuple[int, dict | None]:
    proc = subprocess.run([str(plugin)], input=stdin, env=env, capture_output=True, text=True)
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def test_compiled_front_without_an_agent_answers_as_the_python_shim(tmp_path):
    """No agent at the named socket, or no socket named at all: the Python shim beside the front
    runs and answers in the spec's terms (it knows the node's default socket)."""
    plugin = _installed_front(tmp_path)
    assert plugin.with_name("sanderling-cni-py").exists()
    code, out = _run_front(plugin, {**BASE_ENV, "CNI_COMMAND": "DEL"}, json.dumps(CONF))
    assert code == 1 and out is not None and out["code"] == 11 and "/nonexistent.sock" in out["msg"], out
    no_socket = {k: v for k, v in CONF.items() if k != "agentSocket"}
    code, out = _run_front(plugin, {**BASE_ENV, "CNI_COMMAND": "DEL"}, json.dumps(no_socket))
    assert code == 1 and out is not None and str(tmp_path / "default.sock") in out["msg"], out
    code, out = _run_front(plugin, {"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": "1.0.0"}))
    assert code == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_compiled_front_forwards_env_and_stdin_and_prints_the_agents_answer(tmp_path):
    """The front's whole job: the CNI_* environment and stdin to the socket, the answer's stdout
    and exit code back; an agent that closes without answering is try-again-later."""
    import socket
    import threading

    plugin = _installed_front(tmp_path)
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(2)
    seen: list[dict] = []

    def serve() -> None:
        conn, _ = server.accept()
        seen.append(json.loads(conn.makefile().readline()))
        conn.sendall(json.dumps({"exit": 3, "stdout": '{"answer": 42}'}).encode() + b"\n")
        conn.close()
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    conf = json.dumps({**CONF, "agentSocket": str(path)})
    try:
        first = _run_front(plugin, {**BASE_ENV, "CNI_ARGS": "K8S_POD_NAME=p", "OTHER": "x"}, conf)
        second = _run_front(plugin, BASE_ENV, conf)
    finally:
        thread.join(10)
        server.close()
    assert first == (3, {"answer": 42})
    assert seen == [{"raw": {"env": {**BASE_ENV, "CNI_ARGS": "K8S_POD_NAME=p"}, "stdin": conf}}]
    assert second[0] == 1 and second[1] is not None and second[1]["code"] == 11, second
    assert "bad reply from the sanderling agent" in second[1]["msg"]
