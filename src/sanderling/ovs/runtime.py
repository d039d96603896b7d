"""A node's Open vSwitch: a private ovsdb-server + ovs-vswitchd, or the system's own.

A private instance lives in its own run directory (sockets, pidfiles, logs, database), and can
run inside a network namespace, so several "nodes" share one machine. Datapath `netdev` is the
userspace datapath (with userspace TSO on, as measured in ARCHITECTURE.md); `dummy` needs no
kernel and no root and is what the fast pipeline tests use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sanderling.process import terminate, terminate_all

SYSTEM_RUNDIR = Path("/var/run/openvswitch")
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


class OvsError(RuntimeError):
    """OVS is missing, not running or refused an operation; the message says what to do."""


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        raise OvsError(f"{binary} not found: install Open vSwitch (apt-get install openvswitch-switch)")
    return path


@dataclass
class OvsRuntime:
    """Paths of one OVS instance; `start()` makes it run, `stop()` ends it."""

    run_dir: Path
    netns: str | None = None
    datapath: str = "netdev"
    private: bool = True

    @classmethod
    def system(cls) -> OvsRuntime:
        return cls(SYSTEM_RUNDIR, private=False)

    @property
    def db_sock(self) -> Path:
        return self.run_dir / "db.sock"

    @property
    def db_endpoint(self) -> str:
        return f"unix:{self.db_sock}"

    @property
    def vswitchd_ctl(self) -> Path:
        fixed = self.run_dir / "ovs-vswitchd.ctl"
        # a private instance names its socket (also one mounted at the system path, as a lab node's)
        if self.private or fixed.exists():
            return fixed
        pid = (self.run_dir / "ovs-vswitchd.pid").read_text().strip()
        return self.run_dir / f"ovs-vswitchd.{pid}.ctl"

    def mgmt_socket(self, bridge: str) -> Path:
        return self.run_dir / f"{bridge}.mgmt"

    def mgmt_target(self, bridge: str) -> str:
        return f"unix:{self.mgmt_socket(bridge)}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OVS_RUNDIR=str(self.run_dir), OVS_DBDIR=str(self.run_dir), OVS_LOGDIR=str(self.run_dir))
        return env

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _run(self, argv: list[str], timeout: float = 30) -> str:
        proc = subprocess.run(self._wrap(argv), env=self._env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise OvsError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def appctl(self, *args: str, target: str = "vswitchd") -> str:
        ctl = self.vswitchd_ctl if target == "vswitchd" else self.run_dir / "ovsdb-server.ctl"
        return self._run([_require("ovs-appctl"), "-t", str(ctl), *args])

    def vsctl(self, *args: str) -> str:
        return self._run([_require("ovs-vsctl"), f"--db={self.db_endpoint}", "--timeout=10", *args])

    def ofctl(self, bridge: str, command: str, *args: str, options: tuple[str, ...] = ()) -> str:
        """ovs-ofctl [options] COMMAND <bridge's mgmt socket> ARGS (OpenFlow 1.3)."""
        return self._run([_require("ovs-ofctl"), "-O", "OpenFlow13", *options, command, self.mgmt_target(bridge),
                          *args])

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if not self.private:
            self.check()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        db = self.run_dir / "conf.db"
        if not db.exists():
            self._run([_require("ovsdb-tool"), "create", str(db), str(SCHEMA)])
        if not self._alive("ovsdb-server"):
            self._run([_require("ovsdb-server"), str(db), f"--remote=punix:{self.db_sock}",
                       f"--unixctl={self.run_dir / 'ovsdb-server.ctl'}",
                       f"--pidfile={self.run_dir / 'ovsdb-server.pid'}",
                       f"--log-file={self.run_dir / 'ovsdb-server.log'}", "--detach"])
            self._wait_for(self.db_sock, "ovsdb-server")
            self.vsctl("--no-wait", "init")
            if self.datapath == "netdev":
                self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true")
        self.start_vswitchd()

    def start_vswitchd(self) -> None:
        if self._alive("ovs-vswitchd"):
            return
        argv = [_require("ovs-vswitchd"), self.db_endpoint, f"--unixctl={self.vswitchd_ctl}",
                f"--pidfile={self.run_dir / 'ovs-vswitchd.pid'}",
                f"--log-file={self.run_dir / 'ovs-vswitchd.log'}", "--detach"]
        if self.datapath == "dummy":
            argv.insert(2, "--enable-dummy=override")
        self._run(argv)
        self._wait_for(self.vswitchd_ctl, "ovs-vswitchd")

    def _pid(self, daemon: str) -> int | None:
        try:
            return int((self.run_dir / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, daemon: str) -> bool:
        pid = self._pid(daemon)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _wait_for(self, path: Path, daemon: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return
            time.sleep(0.02)
        raise OvsError(f"{daemon} did not create {path} within {timeout}s; see {self.run_dir / (daemon + '.log')}")

    def check(self) -> None:
        """Raise an OvsError naming the socket and how to start OVS if it is not reachable."""
        if not self.db_sock.exists():
            hint = ("start it with `sanderling ovs start` or `systemctl start openvswitch-switch`"
                    if not self.private else "start it with `sanderling ovs start --run-dir " + str(self.run_dir) + "`")
            raise OvsError(f"OVS database socket {self.db_sock} does not exist: OVS is not running; {hint}")
        try:
            self.vsctl("show")
        except OvsError as exc:
            raise OvsError(f"cannot talk to ovsdb-server at {self.db_sock}: {exc}") from None

    def stop_vswitchd(self, hard: bool = False) -> None:
        self._stop("ovs-vswitchd", hard)

    def stop(self) -> None:
        """Both daemons signalled together (each takes 1.5-2 s to exit; a node's teardown waited
        for one after the other)."""
        if not self.private:
            return
        terminate_all(self.daemon_pids(), timeout=10.0)
        self.forget_pids()

    def daemon_pids(self) -> list[int]:
        """The pids of this private instance's ovs-vswitchd and ovsdb-server (for stopping many
        instances together; `forget_pids` afterwards)."""
        if not self.private:
            return []
        return [pid for pid in (self._pid("ovs-vswitchd"), self._pid("ovsdb-server")) if pid is not None]

    def forget_pids(self) -> None:
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            (self.run_dir / f"{daemon}.pid").unlink(missing_ok=True)
        for mgmt in self.run_dir.glob("*.mgmt"):
            mgmt.unlink(missing_ok=True)

    def _stop(self, daemon: str, hard: bool) -> None:
        pid = self._pid(daemon)
        if pid is None:
            return
        terminate(pid, hard=hard)
        for leftover in (self.run_dir / f"{daemon}.pid",):
            leftover.unlink(missing_ok=True)
        if daemon == "ovs-vswitchd":
            for mgmt in self.run_dir.glob("*.mgmt"):
                mgmt.unlink(missing_ok=True)
