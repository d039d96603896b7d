"""A Service with more endpoints than one OpenFlow group message holds still works (split groups)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import yaml

from ..conftest import require_ovs


def test_1000_endpoints_all_reachable_through_split_groups(tmp_path):
    require_ovs()
    eps = [str(ipaddress.IPv4Address("10.180.0.0") + 10 + i) for i in range(1000)]
    case = {
        "id": "many-endpoints",
        "node": {"name": "test-node", "ips": ["192.168.0.2"], "podCIDR": "10.0.0.0/8",
                 "serviceCIDR": "172.30.0.0/16", "nodePortAddresses": []},
        "options": {},
        "objects": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "ns", "name": "big"},
             "spec": {"clusterIP": "172.30.0.50", "ports": [{"name": "p", "port": 80, "targetPort": 8080}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"namespace": "ns", "name": "big-0", "labels": {"kubernetes.io/service-name": "big"}},
             "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "other"} for ip in eps]},
        ],
        "flows": [{"name": "pod to a service with 1000 endpoints", "protocol": "TCP", "src": "10.0.0.2",
                   "dst": "172.30.0.50", "dport": 80, "verdict": "DNAT", "endpoints": [f"{ip}:8080" for ip in eps],
                   "masquerade": False}],
    }
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(case))
    proc = subprocess.run([sys.executable, "-m", "sanderling.cli.main", "conformance", "proxy", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed, 0 failed" in proc.stdout
