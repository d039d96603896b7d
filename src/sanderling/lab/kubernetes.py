"""The lab on the upstream Kubernetes control plane (`lab up --control-plane kubernetes`).

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built from their Go modules by
`scripts/build-upstream.sh` into the machine's cache, run in the lab's control-plane namespace on
the underlay. Why the real thing: validation, RBAC, watch and 410 behaviour, CRD schemas and the
status subresources are the API users have; the embedded SQLite server stays the fast default.

Identities: kube-apiserver's static token file holds the lab's admin token (system:masters, the
same token the embedded server takes, so the CLI and kubeconfig do not change), one token per
node (`system:node:<name>` in `system:nodes`, so the Node authorizer and NodeRestriction apply to
the lab kubelets as they do to kubelets) and one each for the controller manager and the scheduler
(their default RBAC users). The agents get a ServiceAccount token (TokenRequest) bound to the
least-privilege ClusterRole of `deploy/rbac.yaml`: a permission the agent lacks fails it.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sanderling.lab.pki import Pki

UPSTREAM_BIN = Path(os.environ.get("SANDERLING_UPSTREAM_BIN", "/var/cache/sanderling/bin"))
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
SERVICE_CIDR = "10.96.0.0/16"     # as the embedded server's
NODE_PORT_RANGE = "30000-32767"
CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:10:244::/56"  # dual-stack labs: a /64 per node
SERVICE_CIDR6 = "fd00:10:96::/112"
AGENT_SA = ("sanderling-system", "sanderling-agent")


def binaries() -> dict[str, Path]:
    """The upstream binaries, or one line saying which are missing and how to build them."""
    found = {name: UPSTREAM_BIN / name for name in COMPONENTS}
    missing = [name for name, path in found.items() if not os.access(path, os.X_OK)]
    if missing:
        raise SystemExit(f"sanderling lab: --control-plane kubernetes needs {', '.join(missing)} in {UPSTREAM_BIN}; "
                         "build them once with `bash scripts/build-upstream.sh` (about 12 minutes on 2 cores)")
    return found


@dataclass(frozen=True)
class Tokens:
    """Static bearer tokens of the control plane's own users (made once per lab)."""

    path: Path

    def ensure(self, admin: str, nodes: list[str]) -> None:
        known = self.users()
        lines = [f"{admin},sanderling-admin,sanderling-admin,system:masters"]
        # kube-proxy's user is bound to system:node-proxier by default RBAC (bench proxy-peer runs it)
        for user in ["system:kube-controller-manager", "system:kube-scheduler", "system:kube-proxy"]:
            lines.append(f"{known.get(user) or secrets.token_urlsafe(24)},{user},{user}")
        for node in nodes:
            user = f"system:node:{node}"
            lines.append(f'{known.get(user) or secrets.token_urlsafe(24)},{user},{user},"system:nodes"')
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")

    def users(self) -> dict[str, str]:
        """user name -> token."""
        if not self.path.exists():
            return {}
        return {line.split(",")[1]: line.split(",")[0] for line in self.path.read_text().splitlines() if line}

    def token(self, user: str) -> str:
        return self.users()[user]


@dataclass
class KubernetesControlPlane:
    """Starts and waits for the upstream control plane of one lab."""

    state_dir: Path
    netns: str
    pki: Pki
    api_ip: str
    api_port: int
    host_port: int  # the lab's relay from the host's loopback to the API
    ip_family: str = "ipv4"  # "dual": pod and service CIDRs of both families (IPv4 first); "ipv6": IPv6 only

    @property
    def tokens(self) -> Tokens:
        return Tokens(self.state_dir / "pki" / "tokens.csv")

    @property
    def server(self) -> str:
        return f"https://{self.api_ip}:{self.api_port}"

    def _service_account_key(self) -> Path:
        key = self.state_dir / "pki" / "sa.key"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
            key.chmod(0o600)
        return key

    def _service_cidrs(self) -> str:
        return {"dual": f"{SERVICE_CIDR},{SERVICE_CIDR6}", "ipv6": SERVICE_CIDR6}.get(self.ip_family, SERVICE_CIDR)

    def _cidr_flags(self) -> list[str]:
        """The controller manager's node IPAM: a /24 per node, a /64 when dual-stack, only the /64
        when IPv6-only."""
        if self.ip_family == "ipv4":
            return ["--cluster-cidr", CLUSTER_CIDR, "--node-cidr-mask-size", "24",
                    "--service-cluster-ip-range", SERVICE_CIDR]
        if self.ip_family == "ipv6":
            return ["--cluster-cidr", CLUSTER_CIDR6, "--node-cidr-mask-size", "64",
                    "--service-cluster-ip-range", SERVICE_CIDR6]
        return ["--cluster-cidr", f"{CLUSTER_CIDR},{CLUSTER_CIDR6}", "--node-cidr-mask-size-ipv4", "24",
                "--node-cidr-mask-size-ipv6", "64", "--service-cluster-ip-range", self._service_cidrs()]

    def kubeconfig_for(self, user: str) -> Path:
        """A kubeconfig with one of the static identities (the controllers', a node's, kube-proxy's)."""
        from sanderling.lab.apiserver.__main__ import write_kubeconfig

        path = self.state_dir / "kubeconfigs" / f"{user.replace(':', '-')}.yaml"
        write_kubeconfig(path, self.server, ca_cert=self.pki.ca_cert, token=self.tokens.token(user))
        return path

    def start(self, nodes: list[str]) -> dict[str, int]:
        """Every component started (component -> pid); returns once the API answers /readyz."""
        bins = binaries()
        self.tokens.ensure(self.pki.token, nodes)
        sa_key = self._service_account_key()
        etcd_dir = self.state_dir / "etcd"
        pids = {"etcd": self._run("etcd", [
            str(bins["etcd"]), "--name", "lab", "--data-dir", str(etcd_dir),
            "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "lab=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level", "warn"])}
        pids["kube-apiserver"] = self.start_apiserver()
        self.wait_ready(90)
        common = ["--leader-elect=false", "--profiling=false", "--v", "1"]
        kcm_kubeconfig = self.kubeconfig_for("system:kube-controller-manager")
        pids["kube-controller-manager"] = self._run("kube-controller-manager", [
            str(bins["kube-controller-manager"]), "--kubeconfig", str(kcm_kubeconfig),
            "--allocate-node-cidrs", *self._cidr_flags(), "--service-account-private-key-file", str(sa_key),
            "--root-ca-file", str(self.pki.ca_cert), "--use-service-account-credentials",
            "--controllers", "*",  # the cloud controllers stay off without --cloud-provider
            "--secure-port", "0", *common])
        pids["kube-scheduler"] = self._run("kube-scheduler", [
            str(bins["kube-scheduler"]), "--kubeconfig", str(self.kubeconfig_for("system:kube-scheduler")),
            "--secure-port", "0", *common])
        return pids

    def start_apiserver(self) -> int:
        """kube-apiserver alone (also to restart it: etcd keeps the state)."""
        bins = binaries()
        sa_key = self._service_account_key()
        return self._run("kube-apiserver", [
            str(bins["kube-apiserver"]), "--etcd-servers", "http://127.0.0.1:2379",
            "--bind-address", "0.0.0.0", "--secure-port", str(self.api_port), "--advertise-address", self.api_ip,
            "--tls-cert-file", str(self.pki.server_cert), "--tls-private-key-file", str(self.pki.server_key),
            "--client-ca-file", str(self.pki.ca_cert), "--token-auth-file", str(self.tokens.path),
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            "--service-cluster-ip-range", self._service_cidrs(), "--service-node-port-range", NODE_PORT_RANGE,
            # IPv6-only: the API listens on the IPv4 underlay, and the `kubernetes` Service (IPv6, from
            # the primary range) may not have endpoints of the other family; clients use the kubeconfig
            *(["--endpoint-reconciler-type", "none"] if self.ip_family == "ipv6" else []),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(sa_key), "--service-account-signing-key-file", str(sa_key),
            "--allow-privileged", "--profiling=false", "--v", "1"])

    def _run(self, name: str, argv: list[str]) -> int:
        log = open(self.state_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return proc.pid

    def wait_ready(self, timeout: float) -> None:
        """Until /readyz answers 200 through the host's relay (127.0.0.1:host_port)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                status, body = https_get(f"https://127.0.0.1:{self.host_port}/readyz", self.pki.token, self.pki.ca_cert)
            except OSError as exc:
                status, body = 0, str(exc).encode()
            if status == 200:
                return
            last = f"{status} {body.decode(errors='replace').strip()[-200:]}"
            time.sleep(0.5)
        raise SystemExit(f"kube-apiserver not ready after {timeout:.0f}s ({last}); see "
                         f"{self.state_dir / 'kube-apiserver.log'}")

    def node_token(self, node: str) -> str:
        return self.tokens.token(f"system:node:{node}")


def https_get(url: str, token: str, ca: Path, timeout: float = 5.0) -> tuple[int, bytes]:
    """One authenticated GET (status, body); used where lightkube would be too much."""
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def agent_token(kubectl: Path, admin_kubeconfig: Path) -> str:
    """A long-lived token of the agents' ServiceAccount (TokenRequest through kubectl)."""
    namespace, name = AGENT_SA
    proc = subprocess.run([str(kubectl), "--kubeconfig", str(admin_kubeconfig), "create", "token", name,
                           "-n", namespace, "--duration", "8760h"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"sanderling lab: no token for {namespace}/{name}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def bootstrap_objects() -> list[Path]:
    """What the lab installs before any node: the CRDs, then the agents' RBAC."""
    crds = sorted((DEPLOY / "crds").glob("*.yaml"))
    return [*crds, DEPLOY / "rbac.yaml"]
