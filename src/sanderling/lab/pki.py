"""The lab API's credentials: a CA, a server certificate for its addresses, a bearer token.

Made once per lab (kept across control-plane restarts) with Debian's `openssl`, in the lab's
state directory (0600 keys and token). Every client - the CLI, kubectl, the agents - gets them
through the lab's kubeconfigs: the API server speaks only HTTPS and answers 401 without the token.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    token_file: Path

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {proc.stderr.strip()[-500:]}")


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_pki(directory: Path, addresses: tuple[str, ...]) -> Pki:
    """The lab's CA, a server certificate valid for `addresses`, and a token (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key", directory / "token")
    if not pki.token_file.exists():
        _private(pki.token_file, secrets.token_urlsafe(32) + "\n")
    if pki.server_cert.exists() and pki.server_key.exists() and pki.ca_cert.exists():
        return pki
    ca_key = directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(ca_key), "-out", str(pki.ca_cert), "-days", "3650", "-subj", "/CN=sanderling-lab-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = directory / "apiserver.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(pki.server_key), "-out", str(csr), "-subj", "/CN=sanderling-lab-apiserver")
    ext = directory / "apiserver.ext"
    sans = ",".join([f"IP:{a}" for a in addresses] + ["DNS:localhost", "DNS:kubernetes"])
    ext.write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(pki.server_cert), "-days", "3650", "-extfile", str(ext))
    for path in (ca_key, pki.server_key):
        path.chmod(0o600)
    csr.unlink()
    return pki
