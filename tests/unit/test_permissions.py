"""The agent's permission list and deploy/rbac.yaml's ClusterRole say the same thing."""

from __future__ import annotations

from pathlib import Path

import yaml

from sanderling.agent.permissions import REQUIRED, Permission

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "rbac.yaml"


def _granted() -> set[Permission]:
    role = next(d for d in yaml.safe_load_all(RBAC.read_text()) if d and d["kind"] == "ClusterRole")
    granted = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                res, _, sub = resource.partition("/")
                granted |= {Permission(group, res, verb, sub) for verb in rule["verbs"]}
    return granted


def test_cluster_role_grants_exactly_what_the_agent_checks():
    assert _granted() == set(REQUIRED)

