"""An example external controller for Sanderling's br-ext: an os-ken application (not part of the product).

Run: `osken-manager --ofp-tcp-listen-port 6653 examples/osken/sanderling_external.py` with
SANDERLING_FEED_LISTEN=IP:PORT (default 0.0.0.0:8181), and point `sanderling-northbound --webhook
http://IP:PORT/events` at it. It shows the split the COE design describes: Sanderling programs
br-int; this controller, fed the cluster's inventory northbound, programs each node's br-ext:

- it tells the nodes' br-ext apart by where their OpenFlow connection comes from (the node's
  InternalIP, from the feed's k8s-nodes documents);
- hosts on a br-ext uplink that ask (ARP) for a pod of that node (or any address of its pod CIDR,
  such as the node's masquerade address) get the bridge's MAC as the answer (proxy ARP, one MAC per node: 02:5a:00:00:00:<last octet of the node's address>), and
  are remembered (IP, MAC, port);
- per pod it learned (pod documents, FLAT or VXLAN interfaces of the pod network), a route: IP to
  the pod from an uplink -> the patch port to br-int (and, below them, the node's pod CIDR); per remembered host, the way back: IP from
  the patch port to that host -> its MAC, out of its port;
- `POST /block` with {"prefix": CIDR} drops traffic from outside to that prefix (highest
  priority), `DELETE /block?prefix=CIDR` lifts it; `GET /state` shows what it knows.

Every change rewrites the application's flows (cookie 0x5a0e) on the affected bridges: simple,
and fine for an example; a real controller would diff.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from os_ken.lib import hub
from os_ken.lib.packet import arp, ethernet, packet
from os_ken.ofproto import ofproto_v1_3

COOKIE = 0x5A0E
PATCH = "patch-int"


class SanderlingExternal(app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.docs: dict[str, dict] = {}           # the feed's documents by path
        self.dps: dict[int, object] = {}          # datapath id -> datapath
        self.ports: dict[int, dict[str, int]] = {}  # datapath id -> port name -> number
        self.hosts: dict[int, dict[str, tuple[str, int]]] = {}  # datapath id -> host IP -> (MAC, port)
        self.blocked: set[str] = set()
        host, _, port = os.environ.get("SANDERLING_FEED_LISTEN", "0.0.0.0:8181").rpartition(":")
        self.server = hub.WSGIServer((host, int(port)), self.wsgi)
        hub.spawn(self.server.serve_forever)

    # ---- the feed and the little API ---------------------------------------------------------

    def wsgi(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0) or 0)
        status, answer = "200 OK", {}
        if method == "POST" and path == "/events":
            event = json.loads(body)
            if event["type"] == "SYNC":
                self.docs = dict(event["documents"])
            elif event["type"] == "PUT":
                self.docs[event["path"]] = event["document"]
            elif event["type"] == "DELETE":
                self.docs.pop(event["path"], None)
            self.program_all()
        elif method == "POST" and path == "/block":
            self.blocked.add(str(ipaddress.ip_network(json.loads(body)["prefix"], strict=False)))
            self.program_all()
        elif method == "DELETE" and path == "/block":
            self.blocked.discard(str(ipaddress.ip_network(query["prefix"][0], strict=False)))
            self.program_all()
        elif method == "GET" and path == "/state":
            answer = {"nodes": self.nodes(), "pods": self.pods(), "blocked": sorted(self.blocked),
                      "bridges": {str(d): {"address": dp.address[0], "ports": self.ports.get(d, {}),
                                           "hosts": self.hosts.get(d, {})} for d, dp in self.dps.items()}}
        else:
            status = "404 Not Found"
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]

    def nodes(self) -> dict[str, str]:
        """Node InternalIP -> pod CIDR."""
        out = {}
        for path, doc in self.docs.items():
            if path.startswith("k8s-node:"):
                entry = doc["k8s-nodes"][0]
                if entry.get("internal-ip-address") and entry.get("pod-cidr"):
                    out[entry["internal-ip-address"]] = entry["pod-cidr"]
        return out

    def pods(self) -> dict[str, str]:
        """Pod address on the pod network -> its node's address."""
        out = {}
        for path, doc in self.docs.items():
            if path.startswith("pod:coe/pods/"):
                entry = doc["pods"][0]
                for interface in entry.get("interface", []):
                    if interface.get("network-type") in ("FLAT", "VXLAN") and entry.get("host-ip-address"):
                        out[interface["ip-address"]] = entry["host-ip-address"]
                        break
        return out

    # ---- OpenFlow ---------------------------------------------------------------------------

    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def features(self, ev):
        dp = ev.msg.datapath
        self.dps[dp.id] = dp
        self.hosts.setdefault(dp.id, {})
        dp.send_msg(dp.ofproto_parser.OFPPortDescStatsRequest(dp, 0))

    @set_ev_cls(ofp_event.EventOFPPortDescStatsReply, MAIN_DISPATCHER)
    def port_desc(self, ev):
        dp = ev.msg.datapath
        self.ports[dp.id] = {p.name.decode(): p.port_no for p in ev.msg.body}
        self.program(dp)

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def gone(self, ev):
        if ev.datapath.id is not None:
            self.dps.pop(ev.datapath.id, None)

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def packet_in(self, ev):
        msg, dp = ev.msg, ev.msg.datapath
        pkt = packet.Packet(msg.data)
        request = pkt.get_protocol(arp.arp)
        if request is None:
            return
        in_port = msg.match["in_port"]
        known = self.hosts.setdefault(dp.id, {})
        if known.get(request.src_ip) != (request.src_mac, in_port):
            known[request.src_ip] = (request.src_mac, in_port)
            self.program(dp)
        if request.opcode != arp.ARP_REQUEST or not self.serves(dp, request.dst_ip):
            return
        mac = self.mac(dp)
        reply = packet.Packet()
        reply.add_protocol(ethernet.ethernet(dst=request.src_mac, src=mac, ethertype=0x0806))
        reply.add_protocol(arp.arp(opcode=arp.ARP_REPLY, src_mac=mac, src_ip=request.dst_ip,
                                   dst_mac=request.src_mac, dst_ip=request.src_ip))
        reply.serialize()
        parser = dp.ofproto_parser
        dp.send_msg(parser.OFPPacketOut(datapath=dp, buffer_id=dp.ofproto.OFP_NO_BUFFER,
                                        in_port=dp.ofproto.OFPP_CONTROLLER,
                                        actions=[parser.OFPActionOutput(in_port)], data=reply.data))

    def serves(self, dp, ip: str) -> bool:
        """A pod of this bridge's node, or an address of its pod CIDR (the node's masquerade address)."""
        if self.pods().get(ip) == dp.address[0]:
            return True
        cidr = self.nodes().get(dp.address[0])
        return bool(cidr) and ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)

    @staticmethod
    def mac(dp) -> str:
        return "02:5a:00:00:00:%02x" % (int(dp.address[0].split(".")[-1]) & 0xFF)

    def program_all(self):
        for dp in list(self.dps.values()):
            self.program(dp)

    def program(self, dp):
        """This bridge's flows, all rewritten."""
        ports = self.ports.get(dp.id)
        if ports is None or PATCH not in ports:
            return
        ofp, parser = dp.ofproto, dp.ofproto_parser
        patch = ports[PATCH]
        uplinks = [n for name, n in ports.items() if name != PATCH and n < ofp.OFPP_MAX]
        dp.send_msg(parser.OFPFlowMod(dp, cookie=COOKIE, cookie_mask=0xFFFFFFFFFFFFFFFF, table_id=ofp.OFPTT_ALL,
                                      command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))

        def add(priority, match, actions):
            inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)] if actions else []
            dp.send_msg(parser.OFPFlowMod(dp, cookie=COOKIE, priority=priority, match=match, instructions=inst))

        for port in uplinks:
            add(10, parser.OFPMatch(in_port=port, eth_type=0x0806),
                [parser.OFPActionOutput(ofp.OFPP_CONTROLLER, ofp.OFPCML_NO_BUFFER)])
            cidr = self.nodes().get(dp.address[0])
            if cidr:  # the rest of the node's pod CIDR (its masquerade address, when it masquerades)
                net = ipaddress.ip_network(cidr)
                add(50, parser.OFPMatch(in_port=port, eth_type=0x0800,
                                        ipv4_dst=(str(net.network_address), str(net.netmask))),
                    [parser.OFPActionOutput(patch)])
            for ip, node in sorted(self.pods().items()):
                if node == dp.address[0]:
                    add(100, parser.OFPMatch(in_port=port, eth_type=0x0800, ipv4_dst=ip),
                        [parser.OFPActionOutput(patch)])
            for prefix in sorted(self.blocked):
                net = ipaddress.ip_network(prefix)
                add(200, parser.OFPMatch(in_port=port, eth_type=0x0800,
                                         ipv4_dst=(str(net.network_address), str(net.netmask))), [])
        for ip, (mac, port) in sorted(self.hosts.get(dp.id, {}).items()):
            add(100, parser.OFPMatch(in_port=patch, eth_type=0x0800, ipv4_dst=ip),
                [parser.OFPActionSetField(eth_src=self.mac(dp)), parser.OFPActionSetField(eth_dst=mac),
                 parser.OFPActionOutput(port)])
