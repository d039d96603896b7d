"""MultiNetworkPolicy enforcement: one PolicyAgent per secondary network a policy names.

Informers feed MultiNetworkPolicies, NetworkAttachmentDefinitions, Pods and Namespaces. Each
policy goes to the networks of its `policy-for` annotation: for a Sanderling `vlan` or `layer2`
network this node carries, a PolicyAgent of that network compiles it (the same conjunctive
compiler and shared address sets as NetworkPolicy on br-int, with the secondary bridge's pipeline,
the network's conntrack zone, and pods seen by their address on that network), and its flows go
to the network's bridge through `NetworkFlows`. What cannot be enforced is said, never passed over
in silence: a malformed annotation, a NAD that does not exist, a delegated network (macvlan,
host-device: its interfaces are outside OVS) each get a warning Event on the policy; a network's
policy still applies on every other network it names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from sanderling.agent.object_errors import ObjectErrors
from sanderling.agent.policy_agent import NetworkRuleIds, PolicyAgent, RuleIds
from sanderling.model.attachments import Network, parse_nad
from sanderling.model.errors import ModelError
from sanderling.model.multi_policy import KIND, multi_policy_from, pod_on_network, policy_networks
from sanderling.model.policy import PodInfo
from sanderling.openflow import ir
from sanderling.openflow.pipeline import SECONDARY_PIPELINE
from sanderling.openflow.registers import SECONDARY_NETWORK

log = logging.getLogger(__name__)


class NetworkFlowsFactory(Protocol):
    """What this module needs from the node's secondary bridges."""

    def flows_for(self, network: Network) -> Any: ...  # a DesiredState on the network's bridge

    def network_id(self, network: str) -> int: ...

    def clear_network(self, network: str) -> None: ...

    def flush_policy(self) -> None: ...


class MultiPolicyAgents:
    def __init__(self, node_name: str, changed: Callable[[], None],
                 schedule: Callable[[Callable[[], None]], object] | None = None,
                 report: Callable[[str, str, str], None] | None = None) -> None:
        self.node_name = node_name
        self.changed = changed  # the bridges have policy flows to install
        self.schedule = schedule
        self.report = report
        self.bridges: NetworkFlowsFactory | None = None  # attached once the node's bridges exist
        self._errors = ObjectErrors(report)
        self.raw_policies: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, tuple[str, ...]] = {}  # policy -> networks it is enforced on
        self.raw_pods: dict[str, dict[str, Any]] = {}
        self.raw_namespaces: dict[str, dict[str, Any]] = {}
        self.networks: dict[str, Network | None] = {}  # NAD key -> parsed (None: refused)
        self.agents: dict[str, PolicyAgent] = {}
        self.rule_ids = RuleIds()  # one conjunction id space for every network of the node

    def attach(self, bridges: NetworkFlowsFactory) -> None:
        self.bridges = bridges
        for key in sorted(self.raw_policies):
            self._route(key)

    # ---- informer callbacks --------------------------------------------------------------

    def policy_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_policies.pop(key, None)
        else:
            self.raw_policies[key] = obj
        self._route(key)

    def nad_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        existed, before = key in self.networks, self.networks.get(key)
        if obj is None:
            self.networks.pop(key, None)
            now = None
        else:
            try:
                now = parse_nad(obj)
            except ModelError:
                now = None  # the CNI path reports a bad NAD to the pods that ask for it
            self.networks[key] = now
        if existed and before == now and obj is not None:
            return
        agent = self.agents.pop(key, None)
        if agent is not None:
            self.rule_ids.release_all(key + "|")
        if agent is not None and self.bridges is not None:
            self.bridges.clear_network(key)
            self.changed()
        for policy in sorted(self.raw_policies):
            if key in self.targets.get(policy, ()) or key in self._named(policy):
                self._route(policy)

    def pod_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_pods.pop(key, None)
        else:
            self.raw_pods[key] = obj
        for agent in self.agents.values():
            agent.pod_changed(key, obj)

    def namespace_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_namespaces.pop(key, None)
        else:
            self.raw_namespaces[key] = obj
        for agent in self.agents.values():
            agent.namespace_changed(key, obj)

    # ---- routing -------------------------------------------------------------------------

    def packet_in(self, table_id: int, cookie: int, match: ir.Match, data: bytes) -> None:
        """A logged connection from a secondary bridge: the network's agent writes the line (the
        network by SECONDARY_NETWORK in the packet-in's match; every agent if it is absent)."""
        if self.bridges is None:
            return
        reg = match.get(f"reg{SECONDARY_NETWORK.reg}")
        nid = (reg[0] & SECONDARY_NETWORK.mask) >> SECONDARY_NETWORK.start if reg is not None else None
        for network, agent in self.agents.items():
            if nid is None or self.bridges.network_id(network) == nid:
                agent.packet_in(table_id, cookie, data)

    def _named(self, key: str) -> tuple[str, ...]:
        raw = self.raw_policies.get(key)
        if raw is None:
            return ()
        try:
            return policy_networks(raw)
        except ModelError:
            return ()

    def _route(self, key: str) -> None:
        """Hand the policy to the agents of the networks it names now; take it from the others."""
        raw = self.raw_policies.get(key)
        named = self._errors.convert(key, raw, policy_networks) if raw is not None else ()
        if raw is not None and named is None:
            named = ()  # malformed annotation: reported by convert; the policy applies nowhere
        elif raw is not None and not named:
            self._errors.warn(key, f"{KIND}/{key}: no k8s.v1.cni.cncf.io/policy-for annotation: it applies to no "
                                   "network (name the NetworkAttachmentDefinitions it is for)")
        targets, problems = [], []
        for network in named or ():
            why = self._unenforceable(network)
            if why:
                problems.append(why)
            else:
                targets.append(network)
        if raw is not None and named:
            self._errors.warn(key, f"{KIND}/{key}: not enforced on {'; '.join(problems)}" if problems else None)
        before = self.targets.get(key, ())
        if raw is None:
            self.targets.pop(key, None)
        else:
            self.targets[key] = tuple(targets)
        if self.bridges is None:
            return
        for network in before:
            if network not in targets and network in self.agents:
                self.agents[network].policy_changed(key, None)
        for network in targets:
            agent = self._agent(network)
            if agent is not None and raw is not None:
                agent.policy_changed(key, raw)

    def _unenforceable(self, network: str) -> str:
        """Why the policy cannot be enforced on `network`, or '' if it can."""
        if network not in self.networks:
            return f"{network}: no such NetworkAttachmentDefinition"
        parsed = self.networks[network]
        if parsed is None:
            return f"{network}: its NetworkAttachmentDefinition is invalid"
        if not parsed.sanderling:
            kind = parsed.plugins[0].get("type", "?") if parsed.plugins else "?"
            return (f"{network}: a delegated network ({kind}): its interfaces are outside Open vSwitch, so Sanderling "
                    "cannot filter them")
        if parsed.trunk:
            return f"{network}: a VLAN trunk carries tagged frames the policy tables do not see"
        return ""

    def _agent(self, network: str) -> PolicyAgent | None:
        agent = self.agents.get(network)
        if agent is not None:
            return agent
        parsed = self.networks.get(network)
        assert self.bridges is not None and parsed is not None
        try:
            flows = self.bridges.flows_for(parsed)
        except Exception as exc:  # this node does not carry the network (no such physical network here)
            log.debug("%s: not carried by node %s (%s): its policies have nothing to do here", network,
                      self.node_name, exc)
            return None
        def pod_view(raw: dict[str, Any]) -> PodInfo:
            return pod_on_network(raw, network)

        agent = PolicyAgent(self.node_name, flows, self.changed, self.schedule, self.report,
                            pipeline=SECONDARY_PIPELINE, zone=self.bridges.network_id(network),
                            pod_view=pod_view, parse=multi_policy_from,
                            kind=KIND, rule_ids=NetworkRuleIds(self.rule_ids, network), service_zone=None)
        agent.log_context = f" network={network}"
        agent.start()
        for ns_key, ns in self.raw_namespaces.items():
            agent.namespace_changed(ns_key, ns)
        for pod_key, pod in self.raw_pods.items():
            agent.pod_changed(pod_key, pod)
        self.agents[network] = agent
        log.info("%s: MultiNetworkPolicy enforced on node %s (network id %#x)", network, self.node_name,
                 self.bridges.network_id(network))
        return agent


async def listen_packet_ins(target: str, agents: MultiPolicyAgents | None, stop: asyncio.Event,
                            resync: Callable[[], None]) -> None:
    """The packet-ins of one secondary bridge (its flows are installed by ovs-ofctl; this
    connection listens): policy-log copies go to the network's policy agent, Rejects (a Service
    of the network with no endpoint) are answered at once with a TCP RST or an ICMP port
    unreachable through the port the request came from. Reconnects while the bridge is away; at
    every (re)connect the bridge's flows are replaced whole (`resync`): an ovs-vswitchd that
    restarted has none."""
    from sanderling.openflow.connection import Connection, ConnectionLost

    delay = 0.1
    while not stop.is_set():
        try:
            conn = await Connection.open(target, timeout=2.0)
        except (TimeoutError, OSError, ConnectionLost) as exc:
            log.debug("packet-ins of %s: connect failed (%s); retry in %.1fs", target, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        delay = 0.1
        try:
            await asyncio.to_thread(resync)
        except Exception as exc:
            log.error("%s: flows not restored after connecting: %s", target, exc)
        def handle(pin: Any, conn: Any = conn) -> None:
            if pin.table_id == SECONDARY_PIPELINE["Reject"]:
                reply = reject_tagged(pin.data)
                in_port = pin.match.get("in_port")
                if reply is not None and in_port is not None:
                    asyncio.ensure_future(conn.packet_out(reply, (ir.Output(ir.IN_PORT),), in_port[0]))
            elif agents is not None:
                agents.packet_in(pin.table_id, pin.cookie, pin.match, pin.data)

        conn.packet_in_handlers.append(handle)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {conn.closed, stopping}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            conn.close()


def reject_tagged(frame: bytes) -> bytes | None:
    """The refusal of `frame`, an 802.1Q tag (from a provider network's uplink) kept on the answer."""
    from sanderling.agent.reject import reject_reply

    if frame[12:14] == b"\x81\x00":
        reply = reject_reply(frame[:12] + frame[16:])
        return reply[:12] + frame[12:16] + reply[12:] if reply is not None else None
    return reject_reply(frame)
