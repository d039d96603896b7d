"""Run a program as if on one lab node's own host: its network namespace, its own file paths.

`python -m sanderling.lab.host_view --netns NS --bind SRC=DST ... -- PROGRAM ARGS...`

Why: the lab's nodes share this machine's file system, but a DaemonSet pod (and the CNI plugin it
installs) uses host paths: `/run/sanderling/cni.sock`, `/etc/cni/net.d`, `/var/run/openvswitch`.
On a real cluster each node has its own; here every node's would collide. So the lab kubelet
starts such programs in a private mount namespace where each of those paths is a bind mount of
that node's directory (`--bind`), inside the node's network namespace (`--netns`). Nothing
changes for the rest of the machine: the mounts vanish with the process. A missing mount point is
created (an empty directory) on the host; it is never written to.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter(netns: str | None, binds: list[tuple[str, str]]) -> None:
    """Enter `netns` (a name under /var/run/netns) and a private mount namespace with `binds`."""
    if netns:
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
        finally:
            os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    # nothing mounted here propagates back to the host, while the host's new mounts come in (a pod's
    # network namespace is a mount under /var/run/netns: HostToContainer, as the DaemonSet asks)
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave of the host's mounts")
    for src, dst in binds:
        os.makedirs(src, exist_ok=True)
        os.makedirs(dst, exist_ok=True)
        _check(_libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None), f"bind {src} on {dst}")


def parse_binds(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for value in values:
        src, sep, dst = value.partition("=")
        if not sep or not src.startswith("/") or not dst.startswith("/"):
            raise SystemExit(f"host_view: --bind {value!r}: give SRC=DST, both absolute paths")
        out.append((src, dst))
    return out


def argv_for(netns: str | None, binds: dict[str, str], program: list[str]) -> list[str]:
    """The command line that runs `program` in that view (binds: host path in the view -> where it
    really is)."""
    args = [sys.executable, "-m", "sanderling.lab.host_view"]
    if netns:
        args += ["--netns", netns]
    for dst, src in sorted(binds.items()):
        args += ["--bind", f"{src}={dst}"]
    return [*args, "--", *program]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("host_view: usage: --netns NS --bind SRC=DST ... -- PROGRAM ARGS...")
    split = argv.index("--")
    opts, program = argv[:split], argv[split + 1:]
    if not program:
        raise SystemExit("host_view: no program after --")
    netns = None
    binds: list[str] = []
    it = iter(opts)
    for opt in it:
        if opt == "--netns":
            netns = next(it, None)
        elif opt == "--bind":
            binds.append(next(it, ""))
        else:
            raise SystemExit(f"host_view: unknown option {opt}")
    enter(netns, parse_binds(binds))
    os.execvp(program[0], program)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
