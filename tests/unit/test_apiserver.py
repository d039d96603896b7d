"""The lab API server speaks enough Kubernetes for lightkube: CRUD, conflicts, selectors, watch."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
from lightkube import ApiError
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import PatchType

from sanderling.kube.client import KubeApi
from sanderling.lab.apiserver.resources import matches_fields, matches_labels
from sanderling.lab.apiserver.store import merge_patch


@pytest.fixture
def api(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sanderling.lab.apiserver", "--db", str(tmp_path / "db"),
                             "--port", str(port), "--kubeconfig", str(tmp_path / "kc"), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    client = KubeApi(tmp_path / "kc").client
    client.lab_url = f"http://127.0.0.1:{port}"
    yield client
    proc.terminate()
    proc.wait(10)


def mkpod(name, node="n1", labels=None):
    return Pod.from_dict({"metadata": {"name": name, "namespace": "default", "labels": labels or {}},
                          "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}})


def test_crud_and_optimistic_concurrency(api):
    created = api.create(mkpod("a"))
    assert created.metadata.uid and created.metadata.resourceVersion
    with pytest.raises(ApiError) as dup:
        api.create(mkpod("a"))
    assert dup.value.status.code == 409 and dup.value.status.reason == "AlreadyExists"
    api.patch(Pod, "a", {"metadata": {"labels": {"x": "1"}}}, namespace="default", patch_type=PatchType.MERGE)
    with pytest.raises(ApiError) as stale:
        api.replace(created)  # carries the old resourceVersion
    assert stale.value.status.code == 409
    api.delete(Pod, "a", namespace="default")
    with pytest.raises(ApiError) as gone:
        api.get(Pod, "a", namespace="default")
    assert gone.value.status.code == 404


def test_label_and_field_selectors(api):
    api.create(mkpod("a", "n1", {"app": "web"}))
    api.create(mkpod("b", "n2", {"app": "web"}))
    api.create(mkpod("c", "n1", {"app": "db"}))
    assert {p.metadata.name for p in api.list(Pod, namespace="*", labels={"app": "web"})} == {"a", "b"}
    assert {p.metadata.name for p in api.list(Pod, namespace="*", fields={"spec.nodeName": "n1"})} == {"a", "c"}
    assert matches_labels({"a": "1", "b": "2"}, "a in (1,3),b!=3,!c")
    assert not matches_labels({"a": "1"}, "a notin (1)")
    assert matches_fields({"spec": {"nodeName": "n1"}}, "spec.nodeName=n1")


def test_watch_from_resource_version_and_after_compaction(api):
    first = api.create(mkpod("a"))
    api.create(mkpod("b"))
    seen = []

    def watch():
        for kind, obj in api.watch(Pod, namespace="default", resource_version=first.metadata.resourceVersion):
            seen.append((kind, obj.metadata.name))
            if len(seen) == 2:
                return

    t = threading.Thread(target=watch)
    t.start()
    api.delete(Pod, "a", namespace="default")
    t.join(10)
    assert seen == [("ADDED", "b"), ("DELETED", "a")]
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(api.lab_url + "/lab/compact", method="POST"), timeout=5).read()
    with pytest.raises(ApiError) as expired:
        for _ in api.watch(Pod, namespace="default", resource_version=first.metadata.resourceVersion):
            break
    assert expired.value.status.code == 410


def test_cluster_scoped_and_merge_patch(api):
    api.create(Namespace.from_dict({"metadata": {"name": "prod", "labels": {"tier": "a"}}}))
    api.patch(Namespace, "prod", {"metadata": {"labels": {"tier": None, "zone": "x"}}}, patch_type=PatchType.MERGE)
    assert api.get(Namespace, "prod").metadata.labels == {"zone": "x"}
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None}, "d": 3}) == {"a": {"c": 2}, "d": 3}


def test_malformed_objects_are_refused_naming_the_field(api):
    from lightkube.resources.core_v1 import Service

    bad_port = Pod.from_dict({"metadata": {"name": "p", "namespace": "default"},
                              "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 70000}]}]}})
    with pytest.raises(ApiError) as exc:
        api.create(bad_port)
    assert exc.value.status.code == 422
    assert "spec.containers[0].ports[0].containerPort" in exc.value.status.message
    bad_svc = Service.from_dict({"metadata": {"name": "s", "namespace": "default"},
                                 "spec": {"ports": [{"port": 80, "protocol": "ICMP"}]}})
    with pytest.raises(ApiError) as exc:
        api.create(bad_svc)
    assert "spec.ports[0].protocol" in exc.value.status.message and "ICMP" in exc.value.status.message
    with pytest.raises(ApiError) as exc:
        api.create(Pod.from_dict({"metadata": {"name": "Bad_Name", "namespace": "default"},
                                  "spec": {"containers": [{"name": "c"}]}}))
    assert "metadata.name" in exc.value.status.message
    # nothing else is affected: a good object still goes in
    assert api.create(mkpod("fine")).metadata.name == "fine"


def test_service_cluster_ip_and_node_port_allocation(api):
    from lightkube.resources.core_v1 import Service

    def svc(name, **spec):
        return Service.from_dict({"metadata": {"name": name, "namespace": "default"},
                                  "spec": {"ports": [{"port": 80}], **spec}})

    a = api.create(svc("a"))
    b = api.create(svc("b", type="NodePort"))
    assert a.spec.clusterIP != b.spec.clusterIP and a.spec.clusterIP.startswith("10.96.")
    assert 30000 <= b.spec.ports[0].nodePort <= 32767
    with pytest.raises(ApiError) as taken:
        api.create(svc("c", clusterIP=a.spec.clusterIP))
    assert "already allocated" in taken.value.status.message
    with pytest.raises(ApiError) as outside:
        api.create(svc("d", clusterIP="192.168.1.1"))
    assert "not in the valid range" in outside.value.status.message
    # re-applied without the allocated fields: they are kept
    again = svc("b", type="NodePort")
    again.metadata.resourceVersion = b.metadata.resourceVersion
    kept = api.replace(again)
    assert kept.spec.clusterIP == b.spec.clusterIP and kept.spec.ports[0].nodePort == b.spec.ports[0].nodePort
    lb = api.create(svc("lb", type="LoadBalancer", externalTrafficPolicy="Local"))
    assert lb.spec.healthCheckNodePort and lb.spec.healthCheckNodePort != b.spec.ports[0].nodePort


def test_tls_and_bearer_token_for_every_client(tmp_path):
    """Issue 20: the lab API speaks HTTPS only and answers 401 without the token; the kubeconfig it
    writes carries the CA and the token, so lightkube (and kubectl) work as before."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    from sanderling.lab.pki import ensure_pki

    pki = ensure_pki(tmp_path / "pki", ("127.0.0.1",))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sanderling.lab.apiserver", "--db", str(tmp_path / "db"),
                             "--port", str(port), "--kubeconfig", str(tmp_path / "kc"), "--log-level", "WARNING",
                             "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                             "--ca-cert", str(pki.ca_cert), "--token-file", str(pki.token_file)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        client = KubeApi(tmp_path / "kc").client
        client.create(mkpod("a"))
        assert client.get(Pod, "a", namespace="default").metadata.name == "a"
        verified = ssl.create_default_context(cafile=str(pki.ca_cert))
        url = f"https://127.0.0.1:{port}/api/v1/namespaces/default/pods"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url, context=verified, timeout=5)
        assert denied.value.code == 401 and json.loads(denied.value.read())["reason"] == "Unauthorized"
        wrong = urllib.request.Request(url, headers={"Authorization": "Bearer not-the-token"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(wrong, context=verified, timeout=5)
        assert denied.value.code == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP at all
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/pods", timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)


def test_status_writes_are_validated_like_spec_writes(api):
    """Issue 20: what kubelets and controllers write to status (pod IPs, load-balancer IPs) is
    checked too: an agent routes on it."""
    api.create(mkpod("s"))
    with pytest.raises(ApiError) as bad:
        api.patch(Pod.Status, "s", {"status": {"podIP": "10.0.0.999"}}, namespace="default",
                  patch_type=PatchType.MERGE)
    assert bad.value.status.code == 422 and "status.podIP" in bad.value.status.message
    with pytest.raises(ApiError) as bad:
        api.patch(Pod.Status, "s", {"status": {"phase": "Exploded"}}, namespace="default",
                  patch_type=PatchType.MERGE)
    assert bad.value.status.code == 422 and "status.phase" in bad.value.status.message
    api.patch(Pod.Status, "s", {"status": {"podIP": "10.0.0.9", "phase": "Running"}}, namespace="default",
              patch_type=PatchType.MERGE)
    assert api.get(Pod, "s", namespace="default").status.podIP == "10.0.0.9"


def test_kubelet_runs_no_pod_command_unless_the_lab_allows_it(tmp_path):
    """Issue 20: an API object must not run a program as root on the lab machine by default."""
    from pathlib import Path

    from sanderling.lab.kubelet import Kubelet, NodeRuntime

    pod = {"metadata": {"namespace": "default", "name": "sh", "uid": "u1"},
           "spec": {"containers": [{"name": "c", "command": ["touch", str(tmp_path / "ran")]}]}}
    kubelet = Kubelet(NodeRuntime("n1", Path("/nonexistent/cni"), Path("/nonexistent/conf"), "slkub"))
    status = kubelet.start(pod)
    assert status["phase"] == "Failed" and "--allow-workload-commands" in status["message"]
    assert not (tmp_path / "ran").exists() and not kubelet.pods
