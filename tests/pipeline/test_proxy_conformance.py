"""The kube-proxy conformance files from ../shared, traced through the real pipeline on OVS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..conftest import require_ovs

FILES = sorted((Path(__file__).resolve().parents[3] / "shared" / "conformance" / "proxy").glob("*.yaml"))


def test_proxy_conformance_runner_passes_every_file():
    require_ovs()
    assert FILES, "no proxy conformance files found in ../shared/conformance/proxy"
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "proxy", *map(str, FILES)],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), last


def test_the_ipv6_derivation_of_every_file_passes_too():
    """`--ip-family ipv6`: each case with its addresses mapped into fd00::/96, the node and its
    Services dual-stack, every flow sent over IPv6 (conformance/proxy_ipv6.py says how)."""
    require_ovs()
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "proxy", "--ip-family", "ipv6",
                           *map(str, FILES)], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(" 0 failed") and not lines[-1].startswith("0 passed"), lines[-1]
    cases = [line for line in lines if line.startswith("PASS ")]
    assert cases and all(line.split()[1].split(":")[0].endswith("-ipv6") for line in cases), cases


def test_the_ipv6_derivation_maps_every_address_and_keeps_the_ipv4_family():
    import yaml

    from sanderling.conformance import proxy_ipv6

    raw = next(r for r in (yaml.safe_load(f.read_text()) for f in FILES)
               if any(o.get("kind") == "EndpointSlice" for o in r.get("objects") or []))
    derived = proxy_ipv6.derive(raw)
    assert derived["node"]["ips6"] == [proxy_ipv6.address(ip) for ip in raw["node"]["ips"]]
    assert proxy_ipv6.address("192.168.0.2") == "fd00::c0a8:2"
    assert proxy_ipv6.network("10.0.0.0/8") == "fd00::a00:0/104"
    assert proxy_ipv6.endpoint("10.180.0.1:80") == "[fd00::ab4:1]:80"
    services = [o for o in derived["objects"] if o["kind"] == "Service"]
    assert all(s["spec"]["ipFamilies"] == ["IPv4", "IPv6"] for s in services if s["spec"].get("clusterIP"))
    kinds = [o.get("addressType") for o in derived["objects"] if o["kind"] == "EndpointSlice"]
    assert kinds.count("IPv6") == kinds.count("IPv4") > 0
    assert all(":" in f["src"] and ":" in f["dst"] for f in derived["flows"])
    assert raw != derived and "ips6" not in raw["node"]  # the file's own data is left alone
