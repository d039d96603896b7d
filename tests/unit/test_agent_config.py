"""The agent's configuration: file and flags, precedence, and one line per bad setting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sanderling.agent import config


def test_defaults_file_then_flags(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("node: from-file\nmtu: 1450\nmode: overlay\nnode-ip: [172.30.0.11]\nno-proxy: true\n"
                 "external-ip-cidrs: [203.0.113.0/24, 198.51.100.0/24]\n")
    cfg = config.load(["--config", str(f), "--mtu", "9000"])
    assert (cfg.node, cfg.mtu, cfg.mode, cfg.node_ip, cfg.no_proxy) == ("from-file", 9000, "overlay",
                                                                       ["172.30.0.11"], True)
    assert cfg.external_ip_cidrs == "203.0.113.0/24,198.51.100.0/24"
    assert cfg.service_cidr == "10.96.0.0/16" and cfg.state_dir == Path("/var/lib/sanderling")
    assert config.load(["--node", "n1"]).mtu == 1500


def test_every_setting_has_a_flag_and_a_key():
    flags = {a.option_strings[0][2:] for a in config.parser()._actions if a.option_strings and
             a.option_strings[0].startswith("--") and a.dest not in ("help", "config", "version")}
    assert flags == set(config.keys())


@pytest.mark.parametrize(("content", "argv", "message"), [
    ("node: n1\nmtuu: 1400\n", [], "unknown key 'mtuu' (did you mean 'mtu'?)"),
    ("node: n1\nservice-cidr: 10.96.0.0/33\n", [], "service-cidr: '10.96.0.0/33' is not an IPv4 CIDR"),
    ("node: n1\n", ["--mtu", "70000"], "mtu: 70000 is out of range (576-9216)"),
    ("node: n1\nmtu: fast\n", [], "mtu: 'fast' is not an integer"),
    ("node: n1\nmode: bridged\n", [], "mode: 'bridged' is not one of routed, overlay"),
    ("node: n1\nno-proxy: yes please\n", [], "no-proxy: 'yes please' is not true or false"),
    ("node: n1\ngateway-mac: 01:00:5e:00:00:01\n", [], "gateway-mac: '01:00:5e:00:00:01' is not a unicast MAC"),
    ("- a list\n", [], "want a mapping of keys to values"),
    ("mtu: 1400\n", [], "node: required"),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path, content, argv, message):
    f = tmp_path / "agent.yaml"
    f.write_text(content)
    with pytest.raises(config.ConfigError) as err:
        config.load(["--config", str(f), *argv])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_agent_stops_with_that_line_before_touching_anything(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("node: n1\ncluster-cidr: not-a-cidr\n")
    proc = subprocess.run([sys.executable, "-m", "sanderling.agent.main", "--config", str(f),
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["sanderling-agent: cluster-cidr: 'not-a-cidr' is not an IPv4 CIDR "
                                                "(e.g. 10.96.0.0/16)"]
    assert not (tmp_path / "state").exists()


def test_the_readme_lists_every_key_with_its_default():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config.reference() in readme, "README's agent configuration table differs from agent/config.py"


@pytest.mark.parametrize("value,said", [("http://10.0.0.1:6443", "is not https://HOST[:PORT]"),
                                        ("https://10.0.0.1:99999", "has a bad port"),
                                        ("https://:6443", "is not https://HOST[:PORT]"),
                                        ("https://10.0.0.1:6443/api", "is not https://HOST[:PORT]")])
def test_a_bad_api_server_address_is_named(value, said):
    with pytest.raises(config.ConfigError, match=f"kube-api-server: .* {re.escape(said)}"):
        config.load(["--node", "n1", "--kube-api-server", value])


def test_the_api_server_address_replaces_the_kubernetes_service_in_the_environment(monkeypatch):
    from sanderling.agent.main import use_api_server

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    use_api_server(config.load(["--node", "n1", "--kube-api-server", "https://172.30.0.2:6443"]))
    import os

    assert (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]) == ("172.30.0.2", "6443")
    use_api_server(config.load(["--node", "n1", "--kube-api-server", "https://api.example"]))
    assert (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]) == ("api.example", "443")
