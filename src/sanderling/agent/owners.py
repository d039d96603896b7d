"""Who owns a flow, in Kubernetes terms, from its cookie.

Every flow's cookie carries its category and a hash of its owner's key (openflow/cookies.py);
the agent knows every key it compiled, so it can say which pod, Service, NetworkPolicy rule or
isolated pod a flow belongs to. `sanderling lab trace` reads this map from the agent's status
endpoint (/owners) to explain an `ofproto/trace` in those terms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sanderling.openflow import cookies

C = cookies.Category


def owners(keys: Iterable[str], policy: Any = None) -> dict[int, str]:
    """cookie (generation 0) -> owner, for the realizer's object keys and the policy agent's rules."""
    out: dict[int, str] = {}
    for key in keys:
        if key.startswith("pod/"):  # pod/NS/NAME/INTERFACE: compiled with the same key
            out[cookies.cookie(C.POD, key)] = "pod " + "/".join(key.split("/")[1:3])
        elif key.startswith("service/") and key.count("/") == 2:  # service/NS/NAME: cookie of NS/NAME
            out[cookies.cookie(C.SERVICE, key[len("service/"):])] = "service " + key[len("service/"):]
    if policy is not None:
        for cookie, rule in policy.rules_by_cookie.items():  # NS/NAME/direction/index/variant
            parts = rule.split("/")
            if len(parts) >= 4:
                out[cookie] = f"networkpolicy {parts[0]}/{parts[1]} {parts[2]} rule {parts[3]}"
        for pod in policy._isolated:
            out[cookies.cookie(C.POLICY, f"isolated/{pod}")] = f"isolation of pod {pod}"
        out[cookies.cookie(C.POLICY, "static")] = "policy conntrack"
    return out


def describe(cookie: int, known: dict[int, str]) -> str:
    """The owner of a flow with this cookie, or at least its category."""
    base = cookies.with_generation(cookie, 0)
    if base in known:
        return known[base]
    category = cookies.category_of(cookie)
    try:
        return {C.PIPELINE: "pipeline", C.POD: "pod", C.NODE: "node routing", C.SERVICE: "services",
                C.POLICY: "policy"}[C(category)]
    except ValueError:
        return f"category {category}"
