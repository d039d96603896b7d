"""The agent's side of CNI: ADD, DEL, CHECK, GC and STATUS for pods of this node.

ADD allocates an address (IPAM), creates the veth pair into the pod's namespace, adds the host
end to br-int with the pod's external_ids and a chosen ofport, has the agent's dataplane install the
pod's flows, and only then answers. Any failure undoes every step already taken, so a failed ADD
leaves nothing allocated or plumbed. DEL undoes all of it and is idempotent.

Under concurrent ADDs the steps overlap rather than queue: the veth pair is made while the
address is allocated (allocations that arrive together share one transaction), the pod's flows
go in while its veth and port are made, the pod's side of the veth is configured while
ovs-vswitchd opens the host's, new ports that arrive together are one OVSDB transaction, and each
ADD answers as soon as the switch reports its own port open (not when the whole batch is).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sanderling.cni import errors as E
from sanderling.cni.attachments import MultiNetwork, PodCall, Primary, from_result
from sanderling.cni.dataplane import PodDataplane
from sanderling.cni.errors import CniFailure
from sanderling.cni.result import add_result
from sanderling.group_commit import GroupCommit
from sanderling.ipam.allocator import Allocator, IpamError, Request
from sanderling.ipam.cluster import PREFIX as POOL_PREFIX
from sanderling.ipam.cluster import ClusterIpam
from sanderling.ipam.store import Allocation
from sanderling.model.attachments import (
    DELEGATED_NAMESPACE,
    SANDERLING_TYPE,
    Network,
    NetworkSelection,
    check_interface_name,
    network_from_config,
)
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork, PodPort, mac_for_ip, parse_mac, split_cidrs
from sanderling.netlink import veth
from sanderling.ovs import ovsdb
from sanderling.ovs.ovsdb import Ovsdb, PortChange
from sanderling.ovs.port_batcher import PortBatcher
from sanderling.ovs.runtime import OvsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    name: str

    @staticmethod
    def from_args(args: dict[str, str], container_id: str) -> PodIdentity:
        return PodIdentity(args.get("K8S_POD_NAMESPACE") or "cni", args.get("K8S_POD_NAME") or container_id[:63])


class CniHandler:
    def __init__(self, node: NodeNetwork, db: Ovsdb, bridge: str, allocator: Allocator,
                 dataplane: PodDataplane, node_netns: str | None = None, mtu: int = 1500,
                 cluster: ClusterIpam | None = None, tunnel: bool = False, multinet: MultiNetwork | None = None,
                 network_name: str = "sanderling", native_networks: bool = True) -> None:
        self.cluster = cluster
        self.multinet = multinet  # secondary networks (needs the Kubernetes API)
        # False when Multus is in front: it reads the networks annotation and writes network-status,
        # this agent only serves `"type": "sanderling"` networks Multus hands it
        self.native_networks = native_networks
        self.network_name = network_name
        self.node = node
        self.db = db
        self.bridge = bridge
        self.allocator = allocator
        self.dataplane = dataplane
        self.node_netns = node_netns
        self.mtu = mtu
        self.ports = PortBatcher(db, bridge)
        # the node's own pool: concurrent ADDs' allocations share one SQLite transaction
        self.allocations: GroupCommit[Request, Allocation] = GroupCommit(self._allocate_batch)
        # without userspace TSO the userspace datapath needs tx checksum offload off on veths; so do
        # VXLAN tunnels in OVS 3.1's userspace datapath, which never fill in an inner checksum left
        # to offload (ICMP passes, TCP and UDP arrive with bad checksums)
        self.tx_checksum_off = tunnel or not db.userspace_tso_enabled()
        self._reserved_ofports: set[int] = set()
        # (command, seconds, error code or None) after every request: the agent's metrics
        self.observers: list[Callable[[str, float, int | None], None]] = []
        # (step, seconds) of each successful ADD's steps: ipam, plumbing, ovsdb, flows
        self.step_observers: list[Callable[[str, float], None]] = []

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        answer = await self._handle(request)
        command = str(request.get("command"))
        code = (answer.get("error") or {}).get("code") if "error" in answer else None
        for observer in self.observers:
            try:
                observer(command, time.perf_counter() - started, code)
            except Exception:  # metrics must never fail a CNI request
                log.exception("CNI observer failed")
        return answer

    def _steps(self, **seconds: float) -> None:
        for observer in self.step_observers:
            for step, value in seconds.items():
                try:
                    observer(step, value)
                except Exception:  # metrics must never fail a CNI request
                    log.exception("CNI step observer failed")

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        started = time.perf_counter()
        try:
            _check_request(request)
            secondary = (request.get("config") or {}).get("type") == SANDERLING_TYPE
            if command == "ADD":
                return {"result": await (self.add_secondary(request) if secondary else self.add(request))}
            if command == "DEL":
                if secondary:
                    await self.delete_secondary(request)
                else:
                    await self.delete(request.get("containerID", ""), request.get("ifname", ""))
                return {"result": None}
            if command == "CHECK":
                await self.check(request)
                return {"result": None}
            if command == "GC":
                await self.gc(request.get("config", {}))
                return {"result": None}
            if command == "STATUS":
                self.status()
                return {"result": None}
            raise CniFailure(E.E_BAD_ENV, f"unknown CNI_COMMAND: {command}")
        except CniFailure as exc:
            log.warning("CNI %s %s/%s failed: %s", command, request.get("containerID"), request.get("ifname"),
                        exc.msg)
            return {"error": exc.as_json()}
        except sqlite3.Error as exc:  # a full disk, a read-only or broken state directory: the node's fault
            store = getattr(self.allocator.store, "path", "the IPAM database")
            log.error("CNI %s %s: IPAM database %s: %s", command, request.get("containerID"), store, exc)
            return {"error": {"code": E.E_TRY_LATER, "msg": f"the node's IPAM database {store} cannot be written "
                                                            f"({exc}): free space on, or make writable, the agent's "
                                                            "state directory, then retry"}}
        except Exception as exc:  # never let one request take the agent down
            log.exception("CNI %s %s failed unexpectedly", command, request.get("containerID"))
            return {"error": {"code": E.E_PLUMBING, "msg": f"internal error: {exc}"}}
        finally:
            log.debug("CNI %s %s took %.1f ms", command, request.get("containerID"),
                      (time.perf_counter() - started) * 1000)

    # ---- ADD -----------------------------------------------------------------------------

    async def add(self, req: dict[str, Any]) -> dict[str, Any]:
        conf = req.get("config") or {}
        cid, ifname, netns = req["containerID"], req["ifname"], req["netns"]
        who = PodIdentity.from_args(req.get("args") or {}, cid)
        runtime = conf.get("runtimeConfig") or {}
        requested_ips = runtime.get("ips") or []
        requested, requested6 = _requested_ips(requested_ips, self.node)
        if not self.dataplane.connected():
            raise CniFailure(E.E_TRY_LATER, f"agent of node {self.node.name} is not connected to OVS yet")
        try:
            mac = parse_mac(f"pod/{who.namespace}/{who.name}", "runtimeConfig.mac", runtime["mac"]) \
                if runtime.get("mac") else ""
        except ModelError as exc:
            raise CniFailure(E.E_BAD_CONFIG, str(exc)) from None
        try:
            mtu = int(conf.get("mtu") or self.mtu)
        except (TypeError, ValueError):
            raise CniFailure(E.E_BAD_CONFIG, f"mtu must be a number, got {conf.get('mtu')!r}") from None
        host_if = veth.host_veth_name(cid, ifname)
        # an address this container already holds (a repeated ADD) stays when the ADD is refused
        known = self.allocator.store.find(cid, ifname)
        # the veth pair is made while the address is allocated (the pod's MAC is set with the rest),
        # unless the pod's namespace already has the interface (then nothing may be touched)
        pair = asyncio.ensure_future(asyncio.to_thread(
            veth.create_pair_unless_present, veth.PodInterface(netns, host_if, "", "", "", ifname, mtu),
            self.node_netns, self.tx_checksum_off))
        try:
            alloc, mac, ipam_s = await self._allocate(cid, ifname, who, requested, requested6, mac,
                                                      k8s_pod="K8S_POD_NAME" in (req.get("args") or {}))
        except BaseException:
            await asyncio.wait([pair])
            if not pair.cancelled() and pair.exception() is None and pair.result() is not None:
                await asyncio.to_thread(veth.unplumb, host_if, self.node_netns)  # made for nothing
            if not pair.cancelled() and isinstance(pair.exception(), veth.InterfacePresent):
                raise CniFailure(E.E_INTERFACE_EXISTS, str(pair.exception())) from None
            raise
        try:
            result = await self._plumb(req, who, alloc, mac or alloc.mac or mac_for_ip(alloc.ip), host_if,
                                       ipam_s, mtu, pair)
            if self.multinet is not None and "K8S_POD_NAME" in (req.get("args") or {}) and self.native_networks:
                ips, pod_mac = from_result(result, ifname)
                args = ";".join(f"{k}={v}" for k, v in (req.get("args") or {}).items())
                await asyncio.to_thread(self.multinet.add, PodCall(who.namespace, who.name, cid, netns, args),
                                        Primary(self.network_name, ifname, tuple(ips), pod_mac))
            return result
        except BaseException:
            await asyncio.wait([pair])  # an undo must not race the pair's making
            if not pair.cancelled() and isinstance(pair.exception(), veth.InterfacePresent):
                # nothing was made (the pod's flows went with the ADD): only an address it took goes back
                if known is None:
                    await self._release(cid, ifname)
                raise CniFailure(E.E_INTERFACE_EXISTS, str(pair.exception())) from None
            await self._undo(cid, ifname, host_if, release=True)
            raise

    async def _allocate(self, cid: str, ifname: str, who: PodIdentity, requested: str | None,
                        requested6: str | None, mac: str, k8s_pod: bool) -> tuple[Allocation, str, float]:
        """The pod's addresses (the node's pool, or an IPPool the API decides on): (allocation,
        MAC, seconds taken)."""
        pool = None
        ipam_started = time.perf_counter()
        try:
            if self.cluster is not None and k8s_pod:
                requested, requested6, mac, pool = await asyncio.to_thread(
                    self.cluster.decide, who.namespace, who.name, requested, requested6, mac, self.node.pod_cidrs)
            request = Request(cid, ifname, who.namespace, who.name, requested, mac, requested6)
            if pool is None:
                alloc = await self.allocations.submit(request)
            else:
                assert self.cluster is not None
                alloc = await asyncio.to_thread(self.cluster.allocate, pool, request,
                                                tuple(c.version for c in self.node.pod_cidrs))
        except (IpamError, ModelError) as exc:
            code = exc.code if isinstance(exc, IpamError) else E.E_BAD_CONFIG
            message = exc.msg if isinstance(exc, IpamError) else str(exc)
            if self.cluster is not None and k8s_pod:
                await asyncio.to_thread(self.cluster.api.event, who.namespace, who.name, "AddressNotAssigned",
                                        message, self.node.name)
            raise CniFailure(code, f"pod {who.namespace}/{who.name}: {message}") from None
        except (LookupError, OSError) as exc:
            raise CniFailure(E.E_TRY_LATER, f"pod {who.namespace}/{who.name}: Kubernetes API: {exc}") from None
        return alloc, mac, time.perf_counter() - ipam_started

    async def _allocate_batch(self, requests: list[Request]) -> list[Allocation | IpamError]:
        """On the event loop itself: a handful of indexed statements (the agent is the database's
        only writer). In a thread each statement re-took the GIL behind the plumbing threads,
        15-25 ms a batch under 20 concurrent ADDs; inline about 1 ms."""
        return self.allocator.allocate_many(requests)

    # ---- a secondary network, called as a plugin (Multus in front) ----------------------------

    def _secondary_call(self, req: dict[str, Any]) -> tuple[MultiNetwork, PodCall, Network]:
        if self.multinet is None:
            raise CniFailure(E.E_NOT_AVAILABLE, f"agent of node {self.node.name} serves no secondary networks "
                                                "(it runs without the Kubernetes API)")
        args = req.get("args") or {}
        who = PodIdentity.from_args(args, req["containerID"])
        try:
            network = network_from_config(req.get("config") or {})
        except ModelError as exc:
            raise CniFailure(E.E_BAD_CONFIG, str(exc)) from None
        call = PodCall(who.namespace, who.name, req["containerID"], req.get("netns", ""),
                       ";".join(f"{k}={v}" for k, v in args.items()))
        return self.multinet, call, network

    async def add_secondary(self, req: dict[str, Any]) -> dict[str, Any]:
        multinet, call, network = self._secondary_call(req)
        conf = req.get("config") or {}
        runtime = conf.get("runtimeConfig") or {}
        where = f"pod/{call.namespace}/{call.name}"
        try:
            check_interface_name(where, "CNI_IFNAME", req["ifname"])
            ips = runtime.get("ips") or []
            if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
                raise ModelError(where, "runtimeConfig.ips", "must be a list of addresses")
            for ip in ips:
                ipaddress.IPv4Interface(ip)
            mac = parse_mac(where, "runtimeConfig.mac", runtime["mac"]) if runtime.get("mac") else ""
        except (ModelError, ValueError) as exc:
            raise CniFailure(E.E_BAD_CONFIG, str(exc)) from None
        sel = NetworkSelection(DELEGATED_NAMESPACE, network.name, req["ifname"], tuple(ips), mac)
        return await asyncio.to_thread(multinet.add_one, call, sel, network, str(conf.get("cniVersion", "1.1.0")))

    async def delete_secondary(self, req: dict[str, Any]) -> None:
        multinet, call, _network = self._secondary_call(req)
        problems = await asyncio.to_thread(multinet.delete_one, call.container_id, req.get("ifname", ""))
        if problems:
            raise CniFailure(E.E_PLUMBING, f"DEL of {call.container_id}/{req.get('ifname')}: " + "; ".join(problems))

    async def _plumb(self, req: dict[str, Any], who: PodIdentity, alloc: Allocation, mac: str,
                     host_if: str, ipam_seconds: float, mtu: int,
                     pair: asyncio.Future[str | None]) -> dict[str, Any]:
        conf = req.get("config") or {}
        cid, ifname, netns = req["containerID"], req["ifname"], req["netns"]
        address = address6 = gateway = gateway6 = ""
        if alloc.v4:
            # pool addresses: /32 with the gateway on-link
            prefix = self.node.pod_cidr.prefixlen if alloc.pool == "node" and self.node.pod_cidr else 32
            address, gateway = f"{alloc.v4}/{prefix}", str(self.node.gateway_ip)
        if alloc.v6 and self.node.pod_cidr6:
            prefix6 = self.node.pod_cidr6.prefixlen if alloc.pool == "node" else 128
            address6, gateway6 = f"{alloc.v6}/{prefix6}", str(self.node.gateway_ip6)
        ips = ",".join(alloc.ips)
        try:
            self.node.check_pod(PodPort.build(who.namespace, who.name, 1, mac, ips, ifname))
        except ModelError as exc:
            raise CniFailure(E.E_BAD_CONFIG, str(exc)) from None
        ofport = self._reserve_ofport(host_if)
        try:
            pod = PodPort.build(who.namespace, who.name, ofport, mac, ips, ifname)
        except ModelError as exc:
            self._reserved_ofports.discard(ofport)
            raise CniFailure(E.E_BAD_CONFIG, str(exc)) from None
        try:
            # the pod's flows go in while its veth is made and its OVS port opened
            self.dataplane.expect(pod)
            flows = asyncio.ensure_future(self.dataplane.converge())
            try:
                t0 = time.perf_counter()
                iface = veth.PodInterface(netns, host_if, address, mac, gateway, ifname, mtu,
                                          ip6_cidr=address6, gateway6=gateway6)
                host_mac, t1 = await self._plumb_and_open(iface, ofport, {
                    ovsdb.EXT_POD_NAMESPACE: who.namespace, ovsdb.EXT_POD_NAME: who.name,
                    ovsdb.EXT_CONTAINER_ID: cid, ovsdb.EXT_INTERFACE: ifname, ovsdb.EXT_IP: ips,
                    ovsdb.EXT_MAC: mac}, pair)
                t2 = time.perf_counter()
            finally:
                # never cancelled: a sync stopped half-way would leave the realizer unsure of the switch
                await asyncio.wait([flows])
            flows.result()
            t3 = time.perf_counter()
        finally:
            self.dataplane.withdraw(pod.key)
            self._reserved_ofports.discard(ofport)
        problem = self.dataplane.problem(pod.key)
        if problem is not None:
            raise CniFailure(E.E_PLUMBING, f"flows for pod {who.namespace}/{who.name} refused: {problem}")
        if not self.dataplane.installed(pod.key):
            raise CniFailure(E.E_TRY_LATER, f"flows for pod {who.namespace}/{who.name} not installed yet")
        # plumbing: the veth pair made; ovsdb: from there until the port is open and the pod's side
        # configured (meanwhile); flows: what the ADD still waited for them (they went in meanwhile)
        self._steps(ipam=ipam_seconds, plumbing=t1 - t0, ovsdb=t2 - t1, flows=t3 - t2)
        log.info("pod %s/%s: %s %s on %s (ofport %d, container %s); veth %.1f ms, OVS port %.1f ms, "
                 "then flows %.1f ms", who.namespace, who.name, " ".join(filter(None, (address, address6))), mac,
                 host_if, ofport, cid[:12],
                 (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000)
        return add_result(conf.get("cniVersion", "1.1.0"), host_if, host_mac, ifname, mac, netns, address,
                          gateway, conf.get("prevResult"), (address6, gateway6) if address6 else None)

    async def _plumb_and_open(self, iface: veth.PodInterface, ofport: int, external_ids: dict[str, str],
                              pair: asyncio.Future[str | None]) -> tuple[str, float]:
        """The veth pair (being made since the ADD began), then its host end's OVS port opened
        while the pod's end is configured: (the host end's MAC, when the pair was there)."""
        inside: asyncio.Future[None] | None = None
        try:
            created = await pair
            if created is None:  # a repeated ADD: bring what is there to the pod's configuration
                host_mac = await asyncio.to_thread(veth.converge, iface, self.node_netns, self.tx_checksum_off)
            else:
                host_mac = created
                inside = asyncio.ensure_future(asyncio.to_thread(veth.configure_inside, iface, self.tx_checksum_off))
        except veth.PlumbingError as exc:
            raise CniFailure(E.E_PLUMBING, str(exc)) from None
        made = time.perf_counter()
        try:
            await self._open_port(iface.host_ifname, ofport, external_ids)
        finally:
            if inside is not None:
                await asyncio.wait([inside])  # an undo must not race it
        if inside is not None:
            try:
                inside.result()
            except veth.PlumbingError as exc:
                raise CniFailure(E.E_PLUMBING, str(exc)) from None
        return host_mac, made

    def _reserve_ofport(self, host_if: str) -> int:
        """A free ofport for the pod's port (the one it has, when it has one), held until the ADD
        ends; read from the in-memory replica, so no I/O."""
        records = self.db.ports(self.bridge)
        existing = next((r for r in records if r.name == host_if), None)
        if existing is not None and existing.effective_ofport > 0:
            ofport = existing.effective_ofport
        else:
            taken = {r.ofport for r in records} | {r.ofport_request for r in records} | self._reserved_ofports
            ofport = next(n for n in range(1, 0xFF00) if n not in taken)
        self._reserved_ofports.add(ofport)
        return ofport

    async def _open_port(self, host_if: str, ofport: int, external_ids: dict[str, str]) -> None:
        """The port in OVSDB at `ofport`; returns once ovs-vswitchd has opened it there.

        ovs-vswitchd opens the ports of a transaction one after another and writes OVSDB (the
        configuration number) once for all of them; the OpenFlow port-status message it sends as
        it opens each one tells this port's ADD up to the whole batch's time earlier. Whichever
        comes first counts (the session may be down; a port opened at another ofport than asked
        sends a status that matches nothing, and OVSDB then says what happened)."""
        self.dataplane.forget_port(host_if)
        try:
            cfg = await self.ports.commit(PortChange(host_if, external_ids=tuple(sorted(external_ids.items())),
                                                     ofport_request=ofport))
            opened = asyncio.ensure_future(self.dataplane.port_opened(host_if, ofport))
            applied = asyncio.ensure_future(self.ports.applied(cfg))
            try:
                await asyncio.wait((opened, applied), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in (opened, applied):
                    if not waiting.done():
                        waiting.cancel()
            if opened.done() and not opened.cancelled():
                await self.ports.visible(host_if)  # the replica has the pod (its flows outlive this ADD)
                return
            applied.result()
        except OvsError as exc:
            raise CniFailure(E.E_PLUMBING, str(exc)) from None
        record = next((r for r in self.db.ports(self.bridge) if r.name == host_if), None)
        if record is None or record.ofport != ofport:
            got = "no port" if record is None else f"ofport {record.ofport}"
            raise CniFailure(E.E_PLUMBING, f"ovs-vswitchd did not open {host_if} at ofport {ofport} on {self.bridge} "
                                           f"({got}): see ovs-vswitchd's log for the reason")

    async def _undo(self, cid: str, ifname: str, host_if: str, release: bool) -> None:
        try:
            await self.ports.apply(PortChange(host_if, delete=True))
        except Exception as exc:  # best effort: report, continue with the other steps
            log.warning("cleanup of OVS port %s for %s/%s: %s", host_if, cid, ifname, exc)
        try:
            await asyncio.to_thread(veth.unplumb, host_if, self.node_netns)
        except Exception as exc:
            log.warning("cleanup of veth %s for %s/%s: %s", host_if, cid, ifname, exc)
        if release:
            await self._release(cid, ifname)
        try:
            await self.dataplane.converge()
        except Exception as exc:  # flows go when the agent next syncs
            log.warning("flow cleanup for %s/%s deferred: %s", cid, ifname, exc)

    async def _release(self, cid: str, ifname: str) -> None:
        """The container's addresses back to their pool (an IPPool's through the API)."""
        released = await asyncio.to_thread(self.allocator.release, cid, ifname)
        if released is not None and released.pool.startswith(POOL_PREFIX) and self.cluster is not None:
            try:
                await asyncio.to_thread(self.cluster.release, released)
            except Exception as exc:  # the start-up reconcile releases it later
                log.warning("IPPool release of %s for %s deferred: %s", released.ip, released.pod, exc)

    # ---- DEL, CHECK, GC, STATUS -----------------------------------------------------------

    async def delete(self, cid: str, ifname: str) -> None:
        """Secondary networks first, then the default one; every step runs, problems come back together."""
        problems = await asyncio.to_thread(self.multinet.delete, cid) if self.multinet is not None else []
        host_if = veth.host_veth_name(cid, ifname)
        alloc = await asyncio.to_thread(self.allocator.store.find, cid, ifname)
        await self._undo(cid, ifname, host_if, release=True)
        if alloc:
            log.info("pod %s: released %s (container %s/%s)", alloc.pod, alloc.ip, cid[:12], ifname)
        if problems:
            raise CniFailure(E.E_PLUMBING, f"DEL of container {cid}: secondary networks not fully removed: "
                                           + "; ".join(problems))

    async def check(self, req: dict[str, Any]) -> None:
        cid, ifname, netns = req["containerID"], req["ifname"], req["netns"]
        alloc = await asyncio.to_thread(self.allocator.store.find, cid, ifname)
        if alloc is None:
            raise CniFailure(E.E_CHECK_FAILED, f"no address is allocated to container {cid} interface {ifname}")
        inside = await asyncio.to_thread(veth.interface_in_netns, netns, ifname)
        if inside is None:
            raise CniFailure(E.E_CHECK_FAILED, f"interface {ifname} is missing in {netns}")
        for ip in alloc.ips:
            if not any(a.split("/")[0] == ip for a in inside.addresses):
                raise CniFailure(E.E_CHECK_FAILED, f"{ifname} in {netns} does not carry {ip}")
        if alloc.v4 and inside.gateway != str(self.node.gateway_ip):
            raise CniFailure(E.E_CHECK_FAILED, f"default route via {self.node.gateway_ip} missing in {netns}")
        if alloc.v6 and inside.gateway6 != str(self.node.gateway_ip6):
            raise CniFailure(E.E_CHECK_FAILED, f"IPv6 default route via {self.node.gateway_ip6} missing in {netns}")
        host_if = veth.host_veth_name(cid, ifname)
        ports = {r.name: r for r in await asyncio.to_thread(self.db.ports, self.bridge)}
        record = ports.get(host_if)
        if record is None:
            raise CniFailure(E.E_CHECK_FAILED, f"OVS port {host_if} for {cid}/{ifname} is missing from {self.bridge}")
        ext = record.external_ids
        key = PodPort.build(ext.get(ovsdb.EXT_POD_NAMESPACE, ""), ext.get(ovsdb.EXT_POD_NAME, ""),
                            record.effective_ofport, ext.get(ovsdb.EXT_MAC, ""), ",".join(alloc.ips), ifname).key
        if not self.dataplane.installed(key):
            raise CniFailure(E.E_CHECK_FAILED, f"flows for {key} are not installed")
        if self.dataplane.connected():
            if not await self.dataplane.classifies(record.effective_ofport):
                raise CniFailure(E.E_CHECK_FAILED, f"classifier flow for ofport {record.effective_ofport} "
                                                   f"is missing on {self.bridge}")

    async def gc(self, conf: dict[str, Any]) -> None:
        valid_list = conf.get("cni.dev/valid-attachments")
        if valid_list is None:
            return
        valid = {(a.get("containerID"), a.get("ifname")) for a in valid_list if isinstance(a, dict)}
        allocations = await asyncio.to_thread(self.allocator.store.all)
        stale = [a for a in allocations if (a.container_id, a.ifname) not in valid]
        for alloc in stale:
            log.info("GC: pod %s container %s/%s is not a valid attachment; releasing %s", alloc.pod,
                     alloc.container_id[:12], alloc.ifname, alloc.ip)
            await self.delete(alloc.container_id, alloc.ifname)
        for record in await asyncio.to_thread(self.db.ports, self.bridge):
            cid = record.external_ids.get(ovsdb.EXT_CONTAINER_ID)
            if cid and (cid, record.external_ids.get(ovsdb.EXT_INTERFACE, "eth0")) not in valid:
                await self._undo(cid, record.external_ids.get(ovsdb.EXT_INTERFACE, "eth0"), record.name,
                                 release=False)
        if self.multinet is not None:
            live = {cid for cid, _ in valid}
            for cid in await asyncio.to_thread(self._secondary_containers):
                if cid not in live:
                    problems = await asyncio.to_thread(self.multinet.delete, cid)
                    log.info("GC: container %s is not valid; its secondary networks removed%s", cid[:12],
                             f" with problems: {'; '.join(problems)}" if problems else "")

    def _secondary_containers(self) -> set[str]:
        """Containers with a secondary attachment record or port on this node."""
        assert self.multinet is not None
        ports = {p.external_ids.get(ovsdb.EXT_CONTAINER_ID, "") for _, p in self.multinet.bridges.pod_ports()}
        return (set(self.multinet.records.containers()) | ports) - {""}

    def status(self) -> None:
        if not self.dataplane.connected():
            raise CniFailure(E.E_NOT_AVAILABLE, f"agent of node {self.node.name} is not connected to OVS "
                                                f"({self.dataplane.target})")
        if all(self._free(p.name) == 0 for p in self.allocator.pools):
            raise CniFailure(E.E_NOT_AVAILABLE, "every IP pool of this node is exhausted")

    def _free(self, pool_name: str) -> int:
        pool = next(p for p in self.allocator.pools if p.name == pool_name)
        used = sum(1 for a in self.allocator.store.all() if a.pool == pool_name)
        return pool.size - used

    async def _reconcile_with_api(self) -> None:
        """Pods the API no longer places on this node lose their addresses; pool allocations of
        this node that nothing local backs are returned to their pool."""
        assert self.cluster is not None
        try:
            live = await asyncio.to_thread(self.cluster.api.node_pods, self.node.name)
        except Exception as exc:  # API down: reconcile with it next start
            log.warning("reconcile against the Kubernetes API skipped: %s", exc)
            return
        for alloc in await asyncio.to_thread(self.allocator.store.all):
            if alloc.pod_namespace in ("", "cni") or (alloc.pod_namespace, alloc.pod_name) in live:
                continue
            log.warning("reconcile: pod %s is not on node %s any more; releasing %s", alloc.pod, self.node.name,
                        alloc.ip)
            await self._undo(alloc.container_id, alloc.ifname, veth.host_veth_name(alloc.container_id, alloc.ifname),
                             release=True)
        try:
            await asyncio.to_thread(self.cluster.reconcile, live)
        except Exception as exc:
            log.warning("IPPool reconcile skipped: %s", exc)

    async def restore_from_ovsdb(self) -> int:
        """Rebuild the IPAM store from the ports on the bridge (after a corrupt database was moved
        aside): every completed ADD left a port whose external_ids name its container, interface,
        address and pod, so no live pod loses its address and none is handed out twice."""
        pools = await asyncio.to_thread(self.cluster.pools) if self.cluster is not None else []
        found = []
        for rec in await asyncio.to_thread(self.db.ports, self.bridge):
            ext = rec.external_ids
            ips, cid = ext.get(ovsdb.EXT_IP, ""), ext.get(ovsdb.EXT_CONTAINER_ID, "")
            if not ips or not cid:
                continue
            try:
                ip, ip6 = split_cidrs(ips)
                addr = ipaddress.IPv4Address(ip) if ip else ipaddress.IPv6Address(ip6)
            except ValueError:
                log.error("restore: port %s carries %r, not a pod's addresses; not restored", rec.name, ips)
                continue
            if not ip:  # an IPv6-only node's pod: its address is the row's primary one
                ip, ip6 = ip6, ""
            pool = "node" if any(addr in c for c in self.node.pod_cidrs if c.version == addr.version) else next(
                (POOL_PREFIX + p.name for p in pools if p.contains(addr)), "")
            if not pool:
                log.error("restore: %s of %s is in no pool of this node; not restored", ip, rec.name)
                continue
            found.append(Allocation(ip, pool, cid, ext.get(ovsdb.EXT_INTERFACE, "eth0"),
                                    ext.get(ovsdb.EXT_POD_NAMESPACE, ""), ext.get(ovsdb.EXT_POD_NAME, ""),
                                    ext.get(ovsdb.EXT_MAC, ""), ip6))
        return await asyncio.to_thread(self.allocator.store.restore, found)

    async def reconcile(self) -> None:
        """At start-up, before serving: finish what an agent killed mid-ADD/DEL left behind.

        An allocation with no OVS port never completed its ADD (the runtime saw it fail): its
        address is released and its veth removed. A Sanderling veth with neither port nor
        allocation is removed. A completed ADD always has both, so nothing live is touched.
        """
        if self.cluster is not None:
            await self._reconcile_with_api()
        names = await asyncio.to_thread(self.db.port_names, self.bridge)
        if self.multinet is not None:
            # secondary networks of a container whose default network is gone (killed mid-ADD or
            # mid-DEL): all of them go; a live pod has its br-int port, so nothing live is touched
            with_primary = {a.container_id for a in await asyncio.to_thread(self.allocator.store.all)
                            if veth.host_veth_name(a.container_id, a.ifname) in names}
            for cid in await asyncio.to_thread(self._secondary_containers):
                if cid not in with_primary:
                    problems = await asyncio.to_thread(self.multinet.delete, cid)
                    log.warning("reconcile: container %s has no default network here; its secondary networks "
                                "removed%s", cid[:12], f" with problems: {'; '.join(problems)}" if problems else "")
            names |= {p.name for _, p in await asyncio.to_thread(self.multinet.bridges.pod_ports)}
        allocated = set()
        for alloc in await asyncio.to_thread(self.allocator.store.all):
            host_if = veth.host_veth_name(alloc.container_id, alloc.ifname)
            allocated.add(host_if)
            if host_if not in names:
                log.warning("reconcile: %s holds %s but has no port on %s; releasing", alloc.pod, alloc.ip,
                            self.bridge)
                await asyncio.to_thread(veth.unplumb, host_if, self.node_netns)
                released = await asyncio.to_thread(self.allocator.release, alloc.container_id, alloc.ifname)
                if released is not None and released.pool.startswith(POOL_PREFIX) and self.cluster is not None:
                    try:
                        await asyncio.to_thread(self.cluster.release, released)
                    except Exception as exc:  # the pool's own reconcile returns it at the next start
                        log.warning("IPPool release of %s deferred: %s", released.ip, exc)
        for link in await asyncio.to_thread(veth.sanderling_links, self.node_netns):
            if link not in names and link not in allocated:
                log.warning("reconcile: removing orphan veth %s", link)
                await asyncio.to_thread(veth.unplumb, link, self.node_netns)


_REQUEST_STRINGS = {"ADD": ("containerID", "ifname", "netns"), "CHECK": ("containerID", "ifname", "netns"),
                    "DEL": ("containerID", "ifname")}


def _check_request(request: dict[str, Any]) -> None:
    """The request's shape, before any of it is used: the shim sends exactly this, anything else
    is a decoding error of that request (never an internal error of the agent)."""
    command = request.get("command")
    if command not in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        raise CniFailure(E.E_BAD_ENV, f"unknown CNI_COMMAND: {command!r}")
    for key in _REQUEST_STRINGS.get(command, ()):
        value = request.get(key)
        if not isinstance(value, str) or (key != "netns" and not value and command != "DEL"):
            raise CniFailure(E.E_DECODE, f"request field {key!r} must be a non-empty string, got {value!r}")
    for key in ("config", "args"):
        if not isinstance(request.get(key, {}), dict):
            raise CniFailure(E.E_DECODE, f"request field {key!r} must be an object")


def _requested_ips(raw: object, node: NodeNetwork) -> tuple[str | None, str | None]:
    """runtimeConfig.ips: at most one address per family, of the families the node has."""
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise CniFailure(E.E_BAD_CONFIG, "runtimeConfig.ips must be a list of addresses")
    v4: str | None = None
    v6: str | None = None
    for text in raw:
        try:
            addr = ipaddress.ip_interface(text).ip
        except ValueError:
            raise CniFailure(E.E_BAD_CONFIG, f"runtimeConfig.ips: {text!r} is not an IP address") from None
        if addr.version == 4:
            if node.pod_cidr is None:
                raise CniFailure(E.E_BAD_CONFIG, f"runtimeConfig.ips: {text} is IPv4 but node {node.name} is "
                                                 "IPv6-only (no IPv4 pod subnet)")
            if v4 is not None:
                raise CniFailure(E.E_BAD_CONFIG, "runtimeConfig.ips names two IPv4 addresses; a pod has one per family")
            v4 = text
        else:
            if node.pod_cidr6 is None:
                raise CniFailure(E.E_BAD_CONFIG, f"runtimeConfig.ips: {text} is IPv6 but this node has no IPv6 "
                                                 "pod subnet (give the Node an IPv6 podCIDR)")
            if v6 is not None:
                raise CniFailure(E.E_BAD_CONFIG, "runtimeConfig.ips names two IPv6 addresses; a pod has one per family")
            v6 = text
    return v4, v6
