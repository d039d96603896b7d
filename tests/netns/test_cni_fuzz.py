"""The CNI protocol under hostile input (issue 20): the agent's socket and the shim's stdin/env.

Every answer must be a spec error ({"code": int, "msg": str}) with a code the spec or Sanderling
defines and never an "internal error"; after the campaign the agent still answers a real STATUS
and a real ADD. `SANDERLING_FUZZ_EXAMPLES` runs longer.
"""

from __future__ import annotations

import json
import os
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanderling.cni import errors as E

from ..unit.test_cni_shim import BASE_ENV, CONF, run
from .test_cni_errors import add

EXAMPLES = int(os.environ.get("SANDERLING_FUZZ_EXAMPLES", "150"))
CODES = {v for k, v in vars(E).items() if k.startswith("E_") and isinstance(v, int)}
WORDS = ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "eth0", "net1", "a/b", "../x", "", "1.1.0", "0.4.0",
         "10.244.5.7", "10.244.5.7/24", "999.0.0.1", "fd00::1", "/var/run/netns/none", "relative/netns", "K8S_POD_NAME",
         "ips", "mac", "runtimeConfig", "prevResult", "cniVersion", "name", "type", "sanderling-cni"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(allow_nan=True),
                    st.text(max_size=16), st.sampled_from(WORDS))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(WORDS), inner, max_size=4), max_leaves=10)
requests = st.fixed_dictionaries({}, optional={
    "command": st.one_of(st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]), junk),
    "containerID": junk, "ifname": junk, "netns": junk, "args": junk, "path": junk,
    "config": st.one_of(junk, st.fixed_dictionaries({"cniVersion": st.just("1.1.0"), "name": st.just("net1")},
                                                    optional={"runtimeConfig": junk, "ipam": junk,
                                                              "prevResult": junk}))})
lines = st.one_of(requests.map(lambda r: json.dumps(r).encode()), st.binary(max_size=200),
                  junk.map(lambda v: json.dumps(v).encode()))


def _ask(path: str, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(path)
        s.sendall(line.replace(b"\n", b" ") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def _is_spec_error(reply: dict) -> bool:
    err = reply.get("error") if isinstance(reply, dict) else None
    return (isinstance(err, dict) and isinstance(err.get("code"), int) and err["code"] in CODES
            and isinstance(err.get("msg"), str) and "internal error" not in err["msg"])


def test_agent_socket_answers_every_hostile_request_with_a_spec_error(cni_node):
    path = str(cni_node.cni_socket)
    seen: list = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(lines)
    def one(line):
        reply = _ask(path, line)
        seen.append(reply)
        if "result" in reply:  # a request that happens to be valid (a DEL of nothing, a STATUS) may succeed
            return
        assert _is_spec_error(reply), (line, reply)

    one()
    assert len(seen) >= EXAMPLES // 2
    assert _ask(path, json.dumps({"command": "STATUS", "config": CONF}).encode()) == {"result": None}
    code, out = add(cni_node, "after-fuzz", "after")  # a real ADD still works
    assert code == 0 and out["ips"], out


@settings(max_examples=max(20, EXAMPLES // 5), deadline=None)
@given(st.dictionaries(st.sampled_from(list(BASE_ENV) + ["CNI_ARGS"]), st.one_of(st.text(max_size=20),
                                                                                  st.sampled_from(WORDS)), max_size=6),
       st.one_of(st.text(max_size=200), junk.map(json.dumps), st.just(json.dumps(CONF))))
def test_shim_answers_hostile_env_and_stdin_with_spec_errors(env, stdin):
    env = {k: v.replace("\0", "") for k, v in env.items()}
    code, out = run(env, stdin.replace("\0", ""))
    if env.get("CNI_COMMAND") == "VERSION" and code == 0:
        assert "supportedVersions" in out
        return
    assert code == 1 and out is not None and out["code"] in CODES and isinstance(out["msg"], str), (env, stdin, out)


raw_requests = st.one_of(
    junk,
    st.fixed_dictionaries({"env": st.one_of(junk, st.dictionaries(st.sampled_from(list(BASE_ENV) + ["CNI_ARGS"]),
                                                                   st.one_of(st.sampled_from(WORDS), junk),
                                                                   max_size=6)),
                           "stdin": st.one_of(junk, st.text(max_size=100), junk.map(json.dumps),
                                              st.just(json.dumps(CONF)))}))


def test_agent_socket_answers_hostile_raw_requests_as_the_shim_prints(cni_node):
    """The compiled front's requests (`raw`: env and stdin as the runtime gave them): every answer
    is an exit code and what the plugin prints, a spec error whenever the exit code is not 0."""
    path = str(cni_node.cni_socket)

    @settings(max_examples=max(30, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw_requests)
    def one(raw):
        reply = _ask(path, json.dumps({"raw": raw}).encode())
        assert set(reply) == {"exit", "stdout"} and isinstance(reply["stdout"], str), (raw, reply)
        if reply["exit"] == 0:
            return
        out = json.loads(reply["stdout"])
        assert reply["exit"] == 1 and out["code"] in CODES and isinstance(out["msg"], str), (raw, reply)
        assert "internal error" not in out["msg"], (raw, reply)

    one()
    version = _ask(path, json.dumps({"raw": {"env": {"CNI_COMMAND": "VERSION"}, "stdin": "{}"}}).encode())
    assert version["exit"] == 0 and "supportedVersions" in json.loads(version["stdout"])
