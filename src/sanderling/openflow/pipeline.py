"""The OpenFlow pipeline declared once, as data: tables in order, numbered from that order.

Code refers to tables by name (`PIPELINE["L3Forwarding"]`); inserting a table later renumbers
the rest without touching any compiler. Gotos and resubmits may only go forward: `check_flow`
enforces it on every compiled flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sanderling.openflow import ir


class Miss(Enum):
    """What happens to a packet no flow of the table matches."""

    DROP = "drop"
    NEXT = "continue to the next table"
    NORMAL = "switched by OVS's MAC learning (NORMAL)"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    stage: str
    miss: Miss
    doc: str
    miss_to: str = ""  # with Miss.NEXT: continue at this table instead of the next one


# the policy stage's state check, the same on br-int and on the secondary-network bridges
POLICY_STATE = Table("PolicyState", "policy", Miss.NEXT,
                     "Established and related packets pass, invalid ones are dropped (unless of a connection "
                     "policy allowed, see compiler.policy.static_flows), new connections are checked.")

TABLES: tuple[Table, ...] = (
    Table("Classifier", "classification", Miss.DROP,
          "Marks the packet with the class of its ingress port (FROM_POD, ...); unknown ports are dropped."),
    Table("SpoofGuard", "validation", Miss.DROP,
          "A pod may only send from its own MAC and IP (ARP: sender MAC and IP; IPv6: its address, and "
          "for ICMPv6 only also its link-local one, or none for duplicate address detection); anything "
          "else is dropped."),
    Table("NeighborResponder", "neighbour", Miss.NEXT,
          "Answers ARP requests and IPv6 neighbour solicitations for the gateway and for local pods with "
          "the gateway MAC, so all pod traffic is routed; other ARP and neighbour discovery (DAD probes, "
          "advertisements, router solicitations, MLD, anything to a multicast or from a link-local "
          "address) is dropped, so it neither floods the node nor poisons a cache; the rest continues."),
    Table("UnSNAT", "conntrack", Miss.NEXT,
          "Packets to the node's masquerade address go through the SNAT zone first, so replies of "
          "masqueraded service connections get their client address back."),
    Table("Conntrack", "conntrack", Miss.NEXT,
          "Service traffic goes through the DNAT zone with nat: requests by their destination (service "
          "CIDR, node ports, external and LoadBalancer IPs), replies by their source (an endpoint's "
          "address and port); existing connections are translated there. Replies from a target port ask "
          "the origin zone first (ReplyOrigin). Other traffic skips conntrack.", miss_to="ServiceLB"),
    Table("ReplyOrigin", "conntrack", Miss.DROP,
          "A reply from a service target port: if the origin zone says the latest connection with this "
          "tuple was a local pod's direct one, it is pod-to-pod traffic (on to policy); otherwise it goes "
          "through the DNAT zone with nat, to be translated back if it belongs to a service connection. "
          "Only entered from Conntrack."),
    Table("ServiceLB", "services", Miss.NEXT,
          "New connections to a service address and port go to the service's select group (one "
          "bucket per endpoint), or first to SessionAffinity for ClientIP affinity; a service with no "
          "usable endpoint is rejected, an unused address of the service CIDR dropped. A local pod's "
          "direct request to a target port is committed to the origin zone, marked direct. Other "
          "traffic continues at RequestOrigin.", miss_to="RequestOrigin"),
    Table("SessionAffinity", "services", Miss.DROP,
          "Learned flows (one per client, service and port, idle timeout = the affinity timeout) "
          "that set the endpoint the client had last time. Only entered by resubmit."),
    Table("AffinitySelect", "services", Miss.DROP,
          "A remembered endpoint goes straight to EndpointDNAT; otherwise the service's group picks "
          "one. Only entered by resubmit."),
    Table("EndpointDNAT", "services", Miss.DROP,
          "Commits the connection with DNAT to the endpoint the bucket chose; hairpin and "
          "masqueraded connections are marked in ct_mark; with affinity, learns the choice. Only "
          "entered by resubmit."),
    Table("RequestOrigin", "services", Miss.NEXT,
          "The first request of a local pod's service connection, after DNAT, is committed to the origin "
          "zone marked as a service connection: the origin zone holds one entry per endpoint tuple, so "
          "whichever connection started last with the tuple, direct or through a service, decides how its replies are "
          "handled (no address translation of direct connections, whatever OVS's conntrack does with a "
          "null NAT). Every request this node translated is marked TRANSLATED for policy."),
    Table("PolicyConntrack", "policy", Miss.NEXT,
          "Traffic of pods a NetworkPolicy isolates (from an egress-isolated, to an ingress-isolated pod) "
          "goes through the policy conntrack zone (requests marked TRANSLATED through the service policy "
          "zone); everything else skips policy.", miss_to="ServiceMasq"),
    POLICY_STATE,
    Table("EgressRule", "policy", Miss.NEXT,
          "Egress rules as conjunctions (source pod, destination peers, ports); an egress-isolated source "
          "no rule allows is dropped."),
    Table("IngressRule", "policy", Miss.NEXT,
          "Ingress rules as conjunctions (destination pod, source peers, ports); an ingress-isolated "
          "destination no rule allows is dropped."),
    Table("PolicyCommit", "policy", Miss.NEXT,
          "Allowed new connections are committed to the policy zone (or the service policy zone), so "
          "their replies always pass."),
    Table("ServiceMasq", "services", Miss.NEXT,
          "Masqueraded connections (new, or later request packets) are SNATed to the node's "
          "masquerade address in the SNAT zone."),
    Table("L3Forwarding", "routing", Miss.DROP,
          "Routes by destination IP: rewrites MACs, decrements TTL and sets TARGET_OFPORT."),
    Table("Output", "output", Miss.DROP,
          "Sends the packet out of the port in TARGET_OFPORT."),
    Table("Reject", "services", Miss.DROP,
          "Connections to a service with no usable endpoint go to the agent, which answers at once "
          "with a TCP RST or an ICMP port unreachable."),
    Table("NeighborAdvert", "neighbour", Miss.DROP,
          "Finishes an advertisement NeighborResponder made of a solicitation: its target link-layer "
          "option gets the gateway MAC (OVS only sets that field on a packet that already is an "
          "advertisement) and it goes back out of the port it came in on. Last, as resubmits only go "
          "forward; only entered by resubmit."),
)


# The pipeline of a secondary-network bridge (a VLAN provider bridge, br-l2): switching stays OVS's
# MAC learning (NORMAL, which also applies access tags and trunks); in front of it the spoof guard and
# MultiNetworkPolicy, with the same policy tables (names and meaning) as br-int's, per network.
SECONDARY_TABLES: tuple[Table, ...] = (
    Table("NetworkClassifier", "classification", Miss.NORMAL,
          "IPv4 and ARP from a pod port (from its own MAC and addresses only, when Sanderling gave them), "
          "from the uplink by VLAN or from a layer2 tunnel get their network in SECONDARY_NETWORK and go "
          "on (ARP to ServiceARP); a guarded port's other frames are dropped; everything else is switched."),
    Table("ServiceARP", "services", Miss.NORMAL,
          "ARP requests for a Service's virtual IP on this network are answered with the Service's virtual "
          "MAC (from the network's pods; from the uplink only on the node announcing the Service); other "
          "ARP is switched. Non-ARP never comes here."),
    Table("ServiceLB", "services", Miss.NEXT,
          "A request to a virtual IP and port (addressed to its virtual MAC) gets an endpoint: the learned "
          "one with ClientIP affinity, else the service's select group's (a bucket per endpoint: its MAC as "
          "destination); no endpoint: Reject. Other traffic to a virtual IP is dropped.",
          miss_to="ServiceDNAT"),
    Table("ServiceAffinity", "services", Miss.DROP,
          "Learned flows (client, virtual IP, port -> the endpoint's MAC, idle timeout = the affinity "
          "timeout). Only entered by resubmit."),
    Table("ServiceAffinitySelect", "services", Miss.DROP,
          "A remembered endpoint goes straight to ServiceDNAT; otherwise the service's group picks one "
          "(its bucket continues at ServiceAffinityLearn). Only entered from ServiceLB."),
    Table("ServiceAffinityLearn", "services", Miss.DROP,
          "Remembers the endpoint the group chose for this client in ServiceAffinity (learn: OVS does not "
          "run learn inside a group bucket), then ServiceDNAT. Only entered by resubmit from a bucket."),
    Table("ServiceDNAT", "services", Miss.NEXT,
          "A request for a virtual IP addressed to a local endpoint's MAC is translated to the endpoint "
          "(committed with DNAT in the network's service zone): the endpoint's node translates, so its "
          "reply is translated back there and leaves from the virtual IP, whoever the client is."),
    Table("PolicyConntrack", "policy", Miss.NEXT,
          "Traffic of pods a MultiNetworkPolicy isolates on this network goes through the network's "
          "conntrack zone; everything else skips policy.", miss_to="ServiceUnDNAT"),
    POLICY_STATE,
    Table("EgressRule", "policy", Miss.NEXT,
          "Egress rules as conjunctions (source pod, destination peers' addresses on this network, ports)."),
    Table("IngressRule", "policy", Miss.NEXT,
          "Ingress rules as conjunctions (destination pod, source peers' addresses on this network, ports)."),
    Table("PolicyCommit", "policy", Miss.NEXT,
          "Allowed new connections are committed to the network's zone, so their replies always pass."),
    Table("ServiceUnDNAT", "services", Miss.NEXT,
          "Replies from a local endpoint's target port go through the service zone with nat: those of "
          "translated connections leave from the virtual IP and MAC."),
    Table("Switch", "output", Miss.NORMAL,
          "OVS's MAC learning (NORMAL) delivers the frame; a request that came in from the uplink for "
          "another node's endpoint goes back out of it (NORMAL never returns a frame where it came from)."),
    Table("Reject", "services", Miss.DROP,
          "Connections to a Service with no endpoint go to the agent, which answers at once with a TCP RST "
          "or an ICMP port unreachable."),
)


class PipelineError(ValueError):
    """A compiled flow breaks a pipeline rule (unknown table, backward goto)."""


class Pipeline:
    """Table numbers by name, plus the miss flows every table needs."""

    def __init__(self, tables: tuple[Table, ...] = TABLES) -> None:
        self.tables = tables
        self._ids = {t.name: i for i, t in enumerate(tables)}
        if len(self._ids) != len(tables):
            raise PipelineError("duplicate table name in the pipeline declaration")

    def __getitem__(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise PipelineError(f"no table named {name!r}") from None

    def name_of(self, table_id: int) -> str:
        return self.tables[table_id].name

    def next_of(self, name: str) -> int:
        table_id = self[name] + 1
        if table_id >= len(self.tables):
            raise PipelineError(f"{name} is the last table")
        return table_id

    def after(self, name: str) -> int:
        """Where a packet the table does not match goes on (its miss_to, or the next table)."""
        table = self.tables[self[name]]
        return self[table.miss_to] if table.miss_to else self.next_of(name)

    def miss_flows(self, cookie: int) -> list[ir.Flow]:
        flows = []
        for i, table in enumerate(self.tables):
            actions: tuple[ir.Action, ...] = ()
            if table.miss is Miss.NEXT:
                actions = (ir.Goto(self[table.miss_to] if table.miss_to else i + 1),)
            elif table.miss is Miss.NORMAL:
                actions = (ir.Output(ir.NORMAL),)
            flows.append(ir.Flow(i, 0, ir.Match(), actions, cookie))
        return flows

    def check_flow(self, flow: ir.Flow) -> None:
        if not 0 <= flow.table < len(self.tables):
            raise PipelineError(f"flow in unknown table {flow.table}: {flow.text()}")
        for action in flow.actions:
            target = getattr(action, "table", None) if isinstance(action, (ir.Goto, ir.Resubmit)) else None
            if target is not None and target <= flow.table:
                raise PipelineError(f"backward jump from {self.name_of(flow.table)} to table {target}: {flow.text()}")


PIPELINE = Pipeline()
SECONDARY_PIPELINE = Pipeline(SECONDARY_TABLES)
