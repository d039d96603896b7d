"""`sanderling conformance cni FILE`: run black-box CNI checks against the real plugin binary.

The file format (../shared/conformance/cni) mixes structured steps with short prose. This runner
interprets the vocabulary, not the check ids: a step is a structured execution (env, env_only,
env_unset, stdin, stdin_patch, stdin_raw), a bare CNI command ("{ADD}", "{ADD ctr2}") or a
perturbation recognised by its words ("delete the netns", "remove the container iface / the IP /
OVS port / flows", "stop ovs-vswitchd or the agent, or exhaust the IP pool", "N parallel ADDs").
Alternatives written with "/" or "or" are each run as their own scenario. Expectations are
literal values, membership lists, or prose about a result field, which is checked against the
spec's schema for that field. A check with no steps is run as the CNI command its spec text
names; one about delegated plugins is not applicable (the IPAM is built into the agent).

Everything runs on a private lab node (netns, OVS userspace datapath, agent) with a /26 pod
subnet; state is garbage-collected between checks.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sanderling.lab.node import LocalNode, teardown_prefix
from sanderling.netlink import veth

PREFIX = "slconf"
SANDBOX_PREFIX = "slconfc-"  # the checks' sandboxes; distinct from the node's "slconf-n1..."
STEP_KEYS = {"env", "env_only", "env_unset", "stdin", "stdin_patch", "stdin_raw"}
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
FAKE_PREV = {"cniVersion": "1.1.0", "interfaces": [{"name": "prev0", "mac": "0a:00:00:00:00:99"}],
             "ips": [{"address": "192.0.2.10/24", "interface": 0}], "routes": [], "dns": {}}


@dataclass
class Execution:
    env: dict[str, str]
    stdin: str
    exit: int
    stdout: str
    json: Any

    @property
    def error(self) -> bool:
        return self.exit != 0


@dataclass
class Outcome:
    status: str  # PASS, FAIL, N/A
    why: str = ""


@dataclass
class Context:
    conf: dict[str, Any]
    env: dict[str, str]
    executions: list[Execution] = field(default_factory=list)


def plugin_for(node: LocalNode, front: str) -> Path:
    """The binary of the chosen front: the node installs the compiled one (when setup built it)
    with the Python shim beside it as <name>-py; without it, the Python shim is the plugin."""
    python_beside = node.cni_bin.with_name(node.cni_bin.name + "-py")
    if front == "compiled":
        if not python_beside.exists():
            raise SystemExit("conformance cni --cni-front compiled: the node installed no compiled front "
                             "(build it with scripts/setup.sh)")
        return node.cni_bin
    return python_beside if python_beside.exists() else node.cni_bin


class CniRunner:
    def __init__(self, spec: dict[str, Any], node: LocalNode, plugin: Path | None = None) -> None:
        self.spec = spec
        self.node = node
        self.plugin = str(plugin or node.cni_bin)
        self.all_executions: list[Execution] = []

    # ---- plumbing ------------------------------------------------------------------------

    def base_conf(self) -> dict[str, Any]:
        conf = copy.deepcopy(self.spec.get("defaults", {}).get("conf", {}))
        conf["type"] = "sanderling-cni"
        conf["agentSocket"] = str(self.node.cni_socket)
        conf.pop("ipam", None)  # the IPAM is the agent's own; nothing is delegated
        return conf

    def netns_for(self, container_id: str) -> str:
        name = f"{SANDBOX_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', container_id)[:30]}"
        veth.ensure_netns(name)
        return f"/var/run/netns/{name}"

    def base_env(self) -> dict[str, str]:
        env = {k: str(v) for k, v in self.spec.get("defaults", {}).get("env", {}).items()}
        env["CNI_PATH"] = str(Path(self.plugin).parent)
        return env

    def resolve_env(self, env: dict[str, str]) -> dict[str, str]:
        out = dict(env)
        default_ns = self.spec.get("defaults", {}).get("env", {}).get("CNI_NETNS")
        if out.get("CNI_NETNS") and out.get("CNI_NETNS") == default_ns and "CNI_CONTAINERID" in out:
            out["CNI_NETNS"] = self.netns_for(out["CNI_CONTAINERID"])
        return out

    def execute(self, env: dict[str, str], stdin: str) -> Execution:
        proc = subprocess.run([self.plugin], input=stdin, env=env, capture_output=True, text=True, timeout=120)
        parsed = None
        if proc.stdout.strip():
            try:
                parsed = json.loads(proc.stdout)
            except ValueError:
                parsed = None
        ex = Execution(env, stdin, proc.returncode, proc.stdout.strip(), parsed)
        self.all_executions.append(ex)
        return ex

    def cleanup(self, retry: bool = False) -> None:
        """GC of every attachment (with `retry`, until the agent, just restarted, takes it)."""
        env = {"CNI_COMMAND": "GC", "CNI_PATH": str(Path(self.plugin).parent)}
        conf = {**self.base_conf(), "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}

        def gc() -> bool:
            return subprocess.run([self.plugin], input=json.dumps(conf), env=env, capture_output=True, text=True,
                                  timeout=120).returncode == 0
        if not gc() and retry:
            wait_until(gc, 20)
        teardown_prefix_pods()

    # ---- steps ---------------------------------------------------------------------------

    def substitute(self, value: Any, ctx: Context) -> Any:
        if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
            text = value.lower()
            if "add result" in text:
                adds = [e for e in ctx.executions if e.env.get("CNI_COMMAND") == "ADD" and e.exit == 0]
                return adds[-1].json if adds else {}
            if "previous plugin" in text or "prevresult" in text:
                return copy.deepcopy(FAKE_PREV)
        if isinstance(value, dict):
            return {k: self.substitute(v, ctx) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, ctx) for v in value]
        return value

    def run_step(self, step: dict[str, Any], ctx: Context) -> Execution:
        if "env_only" in step:
            env = {k: str(v) for k, v in step["env_only"].items()}
        else:
            env = {**self.base_env(), **{k: str(v) for k, v in (step.get("env") or {}).items()}}
        for key in step.get("env_unset") or []:
            env.pop(key, None)
        env = self.resolve_env(env)
        if "stdin_raw" in step:
            stdin = str(step["stdin_raw"])
        else:
            conf = copy.deepcopy(step["stdin"]) if "stdin" in step else copy.deepcopy(ctx.conf)
            for k, v in (step.get("stdin_patch") or {}).items():
                conf[k] = self.substitute(v, ctx)
            stdin = json.dumps(conf)
        ex = self.execute(env, stdin)
        ctx.executions.append(ex)
        return ex

    def command_step(self, words: str, ctx: Context) -> Execution:
        parts = words.split()
        env: dict[str, Any] = {"CNI_COMMAND": parts[0]}
        if len(parts) > 1:
            env["CNI_CONTAINERID"] = parts[1]
        return self.run_step({"env": env}, ctx)

    def perturb(self, action: str, ctx: Context) -> None:
        """Apply one perturbation described in words to the last ADDed container."""
        text = action.lower()
        adds = [e for e in ctx.executions if e.env.get("CNI_COMMAND") == "ADD" and e.exit == 0]
        last = adds[-1] if adds else None
        netns = last.env.get("CNI_NETNS", "") if last else ""
        ifname = last.env.get("CNI_IFNAME", "eth0") if last else "eth0"
        cid = last.env.get("CNI_CONTAINERID", "") if last else ""
        if "netns" in text and ("delete" in text or "remove" in text):
            veth.delete_netns(os.path.basename(netns))
        elif "iface" in text or "interface" in text:
            subprocess.run(["ip", "netns", "exec", os.path.basename(netns), "ip", "link", "del", ifname],
                           capture_output=True)
        elif re.search(r"\bip\b", text) and "pool" not in text:
            subprocess.run(["ip", "netns", "exec", os.path.basename(netns), "ip", "addr", "flush", "dev", ifname],
                           capture_output=True)
        elif "ovs port" in text or text.strip() == "port":
            self.node.ovs.vsctl("--if-exists", "del-port", self.node.bridge, veth.host_veth_name(cid, ifname))
        elif "flow" in text:
            name = veth.host_veth_name(cid, ifname)
            wait_until(lambda: self.node.ofport_of(name) > 0, 5)  # our OVSDB replica may lag the agent's
            port = self.node.ofport_of(name)
            if port <= 0:
                raise RuntimeError(f"port {name} of {cid} not found on {self.node.bridge}")
            self.node.ovs.ofctl(self.node.bridge, "del-flows", f"table=0,in_port={port}")
        elif "ovs-vswitchd" in text or "vswitchd" in text:
            self.node.ovs.stop_vswitchd()
            wait_until(lambda: self.node.agent_status_code() != 0, 10)
        elif "agent" in text:
            self.node.kill_agent()
        elif "exhaust" in text:
            self.exhaust_pool(ctx)
        else:
            raise ValueError(f"unknown step {action!r}")

    def restore(self) -> None:
        """Undo node-level perturbations: OVS and agent back up (serving again once the
        cleanup's GC has freed a pool the check exhausted)."""
        self.node.ovs.start_vswitchd()
        if self.node.agent is None:
            self.node.start_agent()

    def exhaust_pool(self, ctx: Context) -> None:
        for i in range(min(self.node.network.first_cidr.num_addresses, 1 << 16)):
            ex = self.run_step({"env": {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"fill{i}"}}, ctx)
            ctx.executions.pop()
            self.all_executions.pop()
            if ex.exit != 0:
                if not isinstance(ex.json, dict) or "exhausted" not in str(ex.json.get("msg", "")):
                    raise RuntimeError(f"filling the pool stopped early: {ex.stdout[:200]}")
                return

    def parallel_adds(self, ctx: Context, n: int = 12) -> list[Execution]:
        steps = [{"env": {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"par{i}"}} for i in range(n)]
        for s in steps:
            self.netns_for(s["env"]["CNI_CONTAINERID"])
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda s: self.run_step(s, ctx), steps))

    # ---- checks --------------------------------------------------------------------------

    def scenarios(self, check: dict[str, Any]) -> list[list[Any]]:
        """The step lists to run; alternatives in a prose step fan out into separate lists."""
        run = check.get("run")
        if "run_each" in check:
            base = run if isinstance(run, dict) else {"env": {"CNI_COMMAND": "ADD"}}
            return [[{**base, "env": {**(base.get("env") or {}), **overrides}}] for overrides in check["run_each"]]
        if run is None:
            return []
        steps = run if isinstance(run, list) else [run]
        fanned: list[list[Any]] = [[]]
        for step in steps:
            alternatives = [step]
            if isinstance(step, dict) and step and all(v is None for v in step.values()):
                # YAML reads "{stop x or y, or z}" as a mapping of prose keys with null values
                words = ", ".join(step)
                if words.split()[0] not in COMMANDS:
                    alternatives = [{"_action": a} for a in split_alternatives(words)]
                else:
                    alternatives = [{"_command": words}]
            fanned = [prefix + [alt] for prefix in fanned for alt in alternatives]
        return fanned

    def run_check(self, check: dict[str, Any]) -> Outcome:
        scenarios = self.scenarios(check)
        if not scenarios:
            return self.run_implied(check)
        for steps in scenarios:
            outcome = self.run_scenario(check, steps)
            if outcome.status != "PASS":
                return outcome
        return Outcome("PASS")

    def run_scenario(self, check: dict[str, Any], steps: list[Any]) -> Outcome:
        ctx = Context(self.base_conf(), self.base_env())
        perturbed = False
        try:
            results: list[Execution] = []
            for step in steps:
                if isinstance(step, str):
                    if "parallel" in step.lower():
                        results.extend(self.parallel_adds(ctx))
                        continue
                    step = {step: None}
                if "_action" in step:
                    self.perturb(step["_action"], ctx)
                    perturbed = True
                elif "_command" in step:
                    results.append(self.command_step(step["_command"], ctx))
                elif STEP_KEYS & set(step):
                    results.append(self.run_step(step, ctx))
                else:
                    results.append(self.command_step(next(iter(step)), ctx))
            return self.evaluate(check, ctx, results)
        except Exception as exc:  # a runner problem is a failure of this check only
            return Outcome("FAIL", f"runner error: {exc}")
        finally:
            if perturbed:
                self.restore()
            self.cleanup(retry=perturbed)
            if perturbed:  # (an exhausted pool is free again only after the cleanup's GC)
                wait_until(lambda: self.node.agent_status_code() == 0, 20)

    def run_implied(self, check: dict[str, Any]) -> Outcome:
        text = f"{check.get('spec', '')} {check.get('test', '')}"
        if "delegated" in text.lower():
            return Outcome("N/A", "Sanderling delegates to no other plugin: its IPAM is part of the agent, and a "
                                  "failed ADD rolls back every step itself")
        if "expect_on_any_error" in check:
            return self.evaluate_errors(check["expect_on_any_error"])
        named = [c for c in COMMANDS if re.search(rf"\b{c}\b", text)]
        if not named:
            return Outcome("N/A", "the check names no command or steps to run")
        command = "ADD" if "STATUS" in named and "ADD" in text else named[0]
        ctx = Context(self.base_conf(), self.base_env())
        try:
            ex = self.command_step(command, ctx)
            if ex.exit != 0:
                return Outcome("FAIL", f"{command} without preparation failed: {ex.stdout}")
            return Outcome("PASS")
        finally:
            self.cleanup()

    # ---- expectations --------------------------------------------------------------------

    def evaluate(self, check: dict[str, Any], ctx: Context, results: list[Execution]) -> Outcome:
        expect = check.get("expect")
        if expect is None:
            return Outcome("PASS")
        if isinstance(expect, str):
            return self.evaluate_prose(expect, results)
        problems: list[str] = []
        if "all" in expect:
            for i, ex in enumerate(results):
                problems += [f"step {i + 1}: {p}" for p in self.match(expect["all"], ex, ctx)]
        ordinals = {"first": 0, "second": 1, "third": 2, "last": -1}
        for word, idx in ordinals.items():
            if word in expect and results:
                problems += [f"{word} step: {p}" for p in self.match(expect[word], results[idx], ctx)]
        direct = {k: v for k, v in expect.items() if k not in ordinals and k not in ("all", "side_effects")}
        if direct and results:
            target = results[-1] if check.get("run_each") is None else None
            for ex in ([target] if target else results):
                problems += self.match(direct, ex, ctx)
        for effect in expect.get("side_effects") or []:
            problem = self.side_effect(effect, ctx, results)
            if problem:
                problems.append(problem)
        return Outcome("FAIL", "; ".join(problems)) if problems else Outcome("PASS")

    def match(self, expect: dict[str, Any], ex: Execution, ctx: Context) -> list[str]:
        problems = []
        if "exit" in expect:
            want = expect["exit"]
            if want == "nonzero" and ex.exit == 0:
                problems.append(f"exit 0, want non-zero (stdout {ex.stdout[:200]!r})")
            elif isinstance(want, int) and ex.exit != want:
                problems.append(f"exit {ex.exit}, want {want} (stdout {ex.stdout[:300]!r})")
        if "stdout" in expect and ex.stdout != str(expect["stdout"]):
            problems.append(f"stdout {ex.stdout[:200]!r}, want {expect['stdout']!r}")
        for key in ("stdout_json", "error"):
            want_json = expect.get(key)
            if want_json is None:
                continue
            if isinstance(want_json, str):
                problems += self.prose_json(want_json, ex, ctx)
                continue
            if not isinstance(ex.json, dict):
                problems.append(f"stdout is not a JSON object: {ex.stdout[:200]!r}")
                continue
            for field_name, value in want_json.items():
                problems += self.field_matches(field_name, value, ex, ctx)
        return problems

    def field_matches(self, name: str, want: Any, ex: Execution, ctx: Context) -> list[str]:
        got = ex.json.get(name) if isinstance(ex.json, dict) else None
        if name == "msg_contains":
            msg = str(ex.json.get("msg", ""))
            return [f"msg {msg!r} does not name {w}" for w in want if w not in msg]
        if isinstance(want, list) and name not in ("interfaces", "ips", "routes"):
            return [] if got in want else [f"{name}={got!r}, want one of {want}"]
        if isinstance(want, str) and (" " in want or "(" in want) and name not in ("msg",):
            return self.schema(name, want, got, ex)
        if got != want:
            return [f"{name}={got!r}, want {want!r}"]
        return []

    def schema(self, name: str, prose: str, got: Any, ex: Execution) -> list[str]:
        """Prose about a result field: check the field against the spec's shape for it."""
        stdin_version = json.loads(ex.stdin).get("cniVersion") if ex.stdin.strip().startswith("{") else None
        if name == "cniVersion":
            want = stdin_version if "same as input" in prose else prose.split()[0]
            return [] if got == want else [f"cniVersion {got!r}, want {want!r}"]
        if name == "supportedVersions":
            need = re.findall(r"\d+\.\d+\.\d+", prose.split("(")[0])
            return [f"supportedVersions {got} lacks {v}" for v in need if not isinstance(got, list) or v not in got]
        if name == "interfaces":
            if not isinstance(got, list) or not got:
                return ["interfaces missing or empty"]
            problems = [f"interface without name: {i}" for i in got if not i.get("name")]
            if not any(i.get("sandbox") == ex.env.get("CNI_NETNS") for i in got):
                problems.append("no interface has sandbox == CNI_NETNS")
            return problems
        if name == "ips":
            if not isinstance(got, list) or not got:
                return ["ips missing or empty"]
            problems = []
            for ip in got:
                if "/" not in str(ip.get("address", "")):
                    problems.append(f"ip address {ip.get('address')!r} is not CIDR")
                if "interface" in prose and not isinstance(ip.get("interface"), int):
                    problems.append("ips[].interface is not an index")
            return problems
        if name == "routes":
            return [] if isinstance(got, list) and all("dst" in r for r in got) else [f"routes malformed: {got}"]
        if name == "dns":
            return [] if isinstance(got, dict) else [f"dns is {got!r}, want an object"]
        return []

    def prose_json(self, prose: str, ex: Execution, ctx: Context) -> list[str]:
        text = prose.lower()
        if "superset of prevresult" in text:
            prev = json.loads(ex.stdin).get("prevResult") or {}
            got = ex.json or {}
            problems = []
            for key in ("interfaces", "ips"):
                for item in prev.get(key) or []:
                    if item not in (got.get(key) or []):
                        problems.append(f"prevResult {key} entry {item} dropped")
            return problems
        return []

    def evaluate_prose(self, prose: str, results: list[Execution]) -> Outcome:
        text = prose.lower()
        if "all succeed" not in text and "distinct" not in text:
            return Outcome("FAIL", f"expectation not understood by this runner: {prose!r}")
        problems = []
        if "all succeed" in text:
            problems += [f"ADD failed: {e.stdout[:200]}" for e in results if e.exit != 0]
        if "distinct" in text:
            addrs = [ip["address"] for e in results if isinstance(e.json, dict) for ip in e.json.get("ips", [])]
            if len(addrs) != len(set(addrs)):
                problems.append(f"duplicate addresses: {sorted(addrs)}")
            if len(addrs) != len(results):
                problems.append(f"{len(addrs)} addresses for {len(results)} ADDs")
        return Outcome("FAIL", "; ".join(problems)) if problems else Outcome("PASS")

    def evaluate_errors(self, expect: dict[str, Any]) -> Outcome:
        errors = [e for e in self.all_executions if e.exit != 0]
        if not errors:
            return Outcome("FAIL", "no error was observed to check the format of")
        problems = []
        for e in errors:
            if not isinstance(e.json, dict):
                problems.append(f"error output is not JSON: {e.stdout[:120]!r}")
                continue
            missing = [k for k in expect.get("stdout_json_keys", []) if k not in e.json]
            if missing:
                problems.append(f"error {e.stdout[:120]} lacks {missing}")
            code = e.json.get("code")
            if not isinstance(code, int) or code < 0:
                problems.append(f"error code {code!r} is not a non-negative integer")
        summary = f"{len(errors)} error outputs checked"
        return Outcome("FAIL", "; ".join(problems[:3])) if problems else Outcome("PASS", summary)

    def side_effect(self, effect: str, ctx: Context, results: list[Execution]) -> str | None:
        text = effect.lower()
        adds = [e for e in results if e.env.get("CNI_COMMAND") == "ADD" and e.exit == 0]
        if "exists inside" in text and adds:
            ex = adds[-1]
            inside = veth.interface_in_netns(ex.env["CNI_NETNS"], ex.env["CNI_IFNAME"])
            if inside is None:
                return f"{ex.env['CNI_IFNAME']} missing in {ex.env['CNI_NETNS']}"
            reported = [i for i in ex.json["interfaces"] if i.get("sandbox")]
            addrs = [ip["address"] for ip in ex.json["ips"]]
            if reported and reported[-1].get("mac") != inside.mac:
                return f"MAC {inside.mac} differs from the reported {reported[-1].get('mac')}"
            if not set(addrs) & set(inside.addresses):
                return f"addresses {inside.addresses} lack the reported {addrs}"
            return None
        if "routes present" in text and adds:
            ex = adds[-1]
            inside = veth.interface_in_netns(ex.env["CNI_NETNS"], ex.env["CNI_IFNAME"])
            gws = [r.get("gw") for r in ex.json.get("routes", []) if r.get("gw")]
            if not inside or (gws and inside.gateway not in gws):
                return f"default route via {gws} missing"
            return None
        released = re.match(r"(\w+)'s ip released", text)
        if "ip released" in text:
            holders = {a.container_id for a in self.node.allocations()}
            cid = released.group(1) if released else (adds[0].env["CNI_CONTAINERID"] if adds else "ctr1")
            return f"{cid} still holds an address" if cid in holders else None
        untouched = re.match(r"(\w+) untouched", text)
        if untouched:
            cid = untouched.group(1)
            return None if cid in {a.container_id for a in self.node.allocations()} else f"{cid} lost its address"
        if "host veth gone" in text:
            cids = {e.env.get("CNI_CONTAINERID", "") for e in adds}
            left = [c for c in cids if veth.host_veth_name(c, "eth0") in self.node.host_links()]
            return f"host veth of {left} still present" if left else None
        if "flows" in text and "removed" in text:
            flows = self.node.ovs.ofctl(self.node.bridge, "dump-flows", "table=0")
            ports = [p for p in re.findall(r"in_port=(\d+)", flows)]
            return f"classifier flows left for ports {ports}" if ports else None
        if ("exists inside" in text or "routes present" in text) and not adds:
            return f"side effect {effect!r} needs a successful ADD, and none succeeded"
        # a phrase this runner cannot check is a failure, never a silent pass
        return f"side effect not understood by this runner: {effect!r}"


def split_alternatives(words: str) -> list[str]:
    parts = re.split(r"\s*/\s*|,?\s+or\s+", words)
    head = parts[0]
    verb = head.split()[0] if head.split() else ""
    return [head] + [p if p.split()[0] in (verb, "the") or len(p.split()) > 2 else f"{verb} {p}" for p in parts[1:]
                     if p]


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def teardown_prefix_pods() -> None:
    for name in os.listdir("/var/run/netns") if os.path.isdir("/var/run/netns") else []:
        if name.startswith(SANDBOX_PREFIX):
            veth.delete_netns(name)


def run(paths: list[Path], only: list[str] | None = None, front: str = "compiled") -> int:
    teardown_prefix(f"{PREFIX}-n1")
    base = Path(tempfile.mkdtemp(prefix="sanderling-conformance-"))
    node = LocalNode("n1", "10.244.250.0/26", base, prefix=PREFIX)
    passed = failed = na = 0
    try:
        node.start()
        wait_until(lambda: node.agent_status_code() == 0, 20)
        plugin = plugin_for(node, front)
        print(f"plugin: {plugin} ({front} front)")
        for path in paths:
            spec = yaml.safe_load(path.read_text())
            runner = CniRunner(spec, node, plugin)
            deferred = []
            for check in spec.get("checks", []):
                if only and check.get("id") not in only:
                    continue
                if "expect_on_any_error" in check:
                    deferred.append(check)
                    continue
                outcome = runner.run_check(check)
                passed, failed, na = report(check, outcome, passed, failed, na)
            for check in deferred:
                outcome = runner.run_check(check)
                passed, failed, na = report(check, outcome, passed, failed, na)
    finally:
        node.teardown()
        teardown_prefix_pods()
    if na:
        print(f"{na} not applicable (listed above with the reason)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def report(check: dict[str, Any], outcome: Outcome, passed: int, failed: int, na: int) -> tuple[int, int, int]:
    cid = check.get("id", "?")
    level = check.get("level", "")
    if outcome.status == "PASS":
        print(f"PASS {cid}" + (f" ({outcome.why})" if outcome.why else ""))
        return passed + 1, failed, na
    if outcome.status == "N/A":
        print(f"N/A {cid} [{level}]: {outcome.why}")
        return passed, failed, na + 1
    print(f"FAIL {cid} [{level}]: {outcome.why}")
    return passed, failed + 1, na
