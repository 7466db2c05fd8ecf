"""UDP NAT: the guest's datagrams onto host sockets, and the replies back.

Theory of operation
-------------------
*Mapping.* A flow is keyed by the guest's source (address, port) alone: endpoint-independent
mapping (RFC 4787 REQ-1). The first datagram from a guest source opens one host UDP socket (bound
to an ephemeral port), and every later datagram from that source goes out through it, whatever
its destination. So a peer sees one host address and port for the guest source, as STUN, games
and P2P protocols expect.

*Filtering.* Address-dependent (RFC 4787 REQ-8's middle option): the flow remembers each host
address the guest has sent to, with the address the guest used for it (the gateway address maps
to 127.0.0.1 through :class:`~guestnet.core.policy.Policy`; the reply must come back from the
gateway address). A reply from any port of a remembered address reaches the guest, from that
guest-side address and the reply's own source port; replies from other addresses are dropped and
counted. If the guest sends to 127.0.0.1 directly and to the gateway from the same source, the
latest one sets the address replies from 127.0.0.1 seem to come from.

*Destinations.* The policy decides: refused destinations (``--no-host-loopback``, link-local,
the guest subnet, multicast) are answered with ICMP destination unreachable, code 13
(administratively prohibited) from the gateway, and counted as ``nat.udp.policy.*``. Broadcast
and multicast never get here (the classifier drops them as ``udp.dst.broadcast``). Port 53 on
the DNS and gateway addresses belongs to the DNS service.

*Lifetime and bounds.* A flow lives :attr:`Config.udp_timeout` seconds (default 180, RFC 4787
REQ-5 asks at least 120) after the last datagram in either direction; the table is an
``OrderedDict`` in last-use order, so :meth:`UdpNat.expire` stops at the first live flow. At most
``max_flows`` flows (``Config.max_flows``): a new flow beyond that evicts the least recently used
one, counted, unless that one was used in the last :data:`ACTIVE_S` seconds: then the newcomer
is dropped (``nat.udp.flow.refused_full``), so a source-port sweep cannot push out the guest's
live flows. Each flow remembers at most :data:`MAX_PEERS` destinations.

*Buffers.* The I/O side receives a reply straight into a pooled to-guest frame at the flow's
``family.udp_payload_off`` (:class:`~guestnet.wire.l3.L3Family`); :meth:`UdpNat.deliver_reply`
writes the UDP, IP and Ethernet headers in front and sends it, fragmented if it exceeds the
guest's MTU. Guest payload goes to the host socket as a memoryview slice of the guest's frame.
Host ICMP errors on a flow's socket (port unreachable, via IP_RECVERR) become the same ICMP error
toward the guest.

*UDP segmentation offloads (a TAP with USO).* A guest application that sends with
``UDP_SEGMENT`` makes its kernel hand over one super-frame of many datagrams of one flow: the
link says so in ``Port.rx_gso_size`` (the payload size of each datagram; the last may be
shorter), and :meth:`UdpNat.handle_udp` sends the whole payload with one
:meth:`UdpSocket.sendto_segments` (one ``sendmsg`` with a ``UDP_SEGMENT`` control message on the
I/O side), or, to a published port's client, one datagram at a time. Toward the guest,
:meth:`UdpNat.coalesce_limits` tells the I/O side whether the flow's guest link takes USO
super-frames (``Port.udp_offload``) and how large: it then gathers the replies of one host
source read back to back (or the kernel's own ``UDP_GRO`` batches) that share a payload size into
one frame, and :meth:`UdpNat.deliver_reply` sends them as one super-frame (partial checksum,
``Frame.gso_size`` = the datagram size); the guest's kernel cuts it. For a link without USO, or
datagrams that need fragments, it cuts the batch into datagrams itself. A single datagram to a
link with USO that fits its MTU leaves its checksum to the guest's kernel as well (a link with
only TCP offloads gets whole UDP checksums, as before).

*Gathering guest datagrams.* With :attr:`UdpNat.gather_sends` (set by the assembly, whose links
call :meth:`UdpNat.flush_sends` after every burst of guest frames they read), consecutive
datagrams of one flow to one destination with one payload size (the last may be shorter) are
copied into one buffer and leave together as one ``sendto_segments`` when the burst ends or
something else comes: a guest that sends many datagrams costs one system call per batch, not
one per datagram, and nothing waits past the burst that brought it. Anything that could reorder
or lose them (another flow, a super-frame, a sweep, shutdown) sends the batch first.

*The per-datagram fast path.* A guest that sends a stream of datagrams sends them from one
source to one destination. The first goes the ordinary way (:meth:`UdpNat.handle_udp`: source
and destination policy, flow lookup or creation, the filter's ``peers``), which records on the
flow what it decided (``UdpFlow.fast_*``); the classifier hands each later plain IPv4 datagram
from the port's guest to :meth:`UdpNat.handle_fast` with its fields parsed in one call
(:func:`guestnet.wire.native.udp_fast4`), which gathers it straight away when its flow's last
datagram went to the same destination and port. Everything else, and anything it is unsure of,
is declined and goes the ordinary way unchanged.

*Port forwards (host -> guest).* A datagram arriving on a published UDP port
(``io/forwards.py``) is handed to :meth:`UdpNat.deliver_inbound`, which keeps an *inbound* flow
per (forward, host client): the guest sees the datagram from the gateway address and a port of
its own (the client's port, or another free one if two clients share a port number), and its
replies to that address and port go back to the client through the forward's socket. Inbound
flows expire and are bounded like the others.

The core never touches a socket itself: it calls the :class:`UdpSocket` objects the
``open_socket`` factory returns (``io/udp_nat.py`` in production, fakes in tests).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from guestnet.config import Config
from guestnet.core.flows import IdleFlows, ip_text
from guestnet.core.fragments import send_to_guest
from guestnet.core.icmp import IcmpService, errname
from guestnet.core.packet import IpPacket
from guestnet.core.policy import Policy
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire.icmp import UNREACH_ADMIN_PROHIBITED
from guestnet.wire.ipv4 import PROTO_UDP
from guestnet.wire.l3 import IPV4, IPV6, L3Family, build_l3_frame, build_udp_frame
from guestnet.wire.udp import UDP_HLEN

#: Destinations a flow remembers for filtering; the oldest is forgotten beyond this.
MAX_PEERS = 1024
#: A flow used within this many seconds is in active use: never evicted for a newcomer.
ACTIVE_S = 10.0
#: Datagrams in one UDP super-frame or one UDP_SEGMENT send at most (the kernel's
#: UDP_MAX_SEGMENTS on older kernels; newer ones allow 128).
MAX_SEGMENTS = 64
#: UDP's checksum field, from the start of the UDP header (a partial checksum's csum_offset).
UDP_CSUM_OFFSET = 6
#: Payload bytes one gathered send holds at most (the largest IPv4 UDP payload).
MAX_GATHER = 65507

FlowKey = tuple[bytes, int]


class UdpSocket(Protocol):
    """The host socket of one flow."""

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        """Send one datagram; raises OSError (EAGAIN, ENETUNREACH...)."""

    def sendto_segments(self, data: memoryview, addr: tuple[str, int], size: int) -> int:
        """Send ``data`` as datagrams of ``size`` bytes (the last may be shorter), at most
        :data:`MAX_SEGMENTS` per call; return how many datagrams left. Raises OSError."""

    def close(self) -> None:
        """Close the socket and stop watching it."""


_UDP_HDR = struct.Struct("!HHHH")


def segments(payload: memoryview, size: int) -> list[memoryview]:
    """``payload`` cut into datagrams of ``size`` bytes, the last one possibly shorter."""
    return [payload[at : at + size] for at in range(0, len(payload), size)] or [payload]


class UdpFlow:
    """One guest source (address, port) and its host socket."""

    __slots__ = (
        "created",
        "family",
        "fast_addr",
        "fast_dport",
        "fast_dst",
        "fast_rule",
        "guest_ip",
        "guest_mac",
        "guest_port",
        "last_used",
        "peers",
        "sock",
    )

    def __init__(
        self, family: L3Family, guest_ip: bytes, guest_port: int, guest_mac: bytes, now: float
    ) -> None:
        #: The IP version of the flow: where a reply's payload lands in a pooled frame
        #: (``family.udp_payload_off``) and how its headers are written.
        self.family = family
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.guest_mac = guest_mac
        self.created = now
        self.last_used = now
        #: Host address string -> the destination address the guest used for it.
        self.peers: dict[str, bytes] = {}
        self.sock: UdpSocket | None = None
        #: The destination (address, port) of the last datagram the ordinary path sent, and
        #: what it decided for it: the host address and port, and the egress rule that allowed
        #: it (-1: a built-in rule). :meth:`UdpNat.handle_fast` sends the next datagrams to the
        #: same destination on that decision (see the module docstring).
        self.fast_dst = b""
        self.fast_dport = 0
        self.fast_addr: tuple[str, int] = ("", 0)
        self.fast_rule = -1

    def close(self) -> None:
        """Close the host socket (the flow left the table)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @property
    def key(self) -> FlowKey:
        """The flow table key: the guest source."""
        return (self.guest_ip, self.guest_port)

    def info(self, now: float) -> dict[str, object]:
        """The flow as the API's ``/flows`` shows it."""
        return {
            "proto": "udp",
            "origin": "guest",
            "guest": f"{ip_text(self.guest_ip)}:{self.guest_port}",
            "dst": sorted(f"{ip_text(dst)}" for dst in set(self.peers.values())),
            "host": sorted(self.peers),
            "state": "OPEN",
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_used, 3),
        }


class InboundFlow:
    """A host client of a published port, as the guest sees it: gateway:visible_port."""

    __slots__ = ("guest_ip", "guest_port", "last_used", "reply", "source", "visible_port")

    def __init__(
        self,
        source: Hashable,
        reply: Callable[[memoryview], object],
        guest_ip: bytes,
        guest_port: int,
        visible_port: int,
        now: float,
    ) -> None:
        #: Identifies the host client: (forward id, client address) for io/forwards.py.
        self.source = source
        #: Sends one datagram back to the host client.
        self.reply = reply
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.visible_port = visible_port
        self.last_used = now

    @property
    def key(self) -> tuple[bytes, int, int]:
        """The guest's side: (guest address, guest port, port the gateway speaks from)."""
        return (self.guest_ip, self.guest_port, self.visible_port)


class UdpNat:
    """The UDP flow table: the classifier's ``udp_nat`` handler."""

    def __init__(
        self,
        config: Config,
        pool: FramePool,
        counters: Counters,
        switch: Switch,
        policy: Policy,
        icmp: IcmpService,
        open_socket: Callable[[UdpFlow], UdpSocket],
        max_flows: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        self.switch = switch
        self.policy = policy
        self.icmp = icmp
        self.open_socket = open_socket
        self.max_flows = max_flows if max_flows is not None else config.max_flows
        self.timeout = timeout if timeout is not None else config.udp_timeout
        self.flows: IdleFlows[FlowKey, UdpFlow] = IdleFlows(counters, "nat.udp.flow")
        #: Inbound (port-forward) flows by the guest's side, in last-use order.
        self.inbound: OrderedDict[tuple[bytes, int, int], InboundFlow] = OrderedDict()
        self._inbound_by_source: dict[Hashable, InboundFlow] = {}
        #: The MAC each guest address last sent from (where inbound datagrams go).
        self.guest_macs: dict[bytes, bytes] = {}
        self._ident = 0
        #: guestnet's gateway address of each family: where the guest answers a published
        #: port's client (and the origin of our ICMP errors).
        self._gateways = {4: config.gateway_b, 6: config.gateway6_b}
        self._gateway4 = config.gateway_b
        self._gateway6 = config.gateway6_b
        #: Gather guest datagrams into batches (see the module docstring); the caller then
        #: calls :meth:`flush_sends` after every burst of guest frames.
        self.gather_sends = False
        self._gather_buf = memoryview(bytearray(MAX_GATHER))
        #: The batch being gathered: (flow, destination, datagram size, bytes, datagrams).
        self._batch: tuple[UdpFlow, tuple[str, int], int, int, int] | None = None

    # -- from the guest --------------------------------------------------------------------

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """Send one guest datagram to its host destination through the flow's socket."""
        counters = self.counters
        src = pkt.src
        dst = pkt.dst
        if not self.policy.guest_source(src):
            counters.inc("nat.udp.src.foreign")
            return
        if dport == 0 or sport == 0:
            counters.inc("nat.udp.port_zero")
            return
        if self.guest_macs.get(src) != pkt.src_mac:
            self.guest_macs[src] = pkt.src_mac
        gateway = self._gateways[pkt.family.version]
        seg = pkt.port.rx_gso_size
        if dst == gateway and self.inbound:
            inbound = self.inbound.get((src, sport, dport))
            if inbound is not None:
                if seg:
                    for part in segments(payload, seg):
                        self._reply_inbound(inbound, part, now)
                else:
                    self._reply_inbound(inbound, payload, now)
                return
        verdict = self.policy.destination(dst)
        host = verdict.host
        if host is None:
            counters.inc(f"nat.udp.{verdict.reason}")
            self.icmp.send_unreachable(pkt, UNREACH_ADMIN_PROHIBITED, gateway, now)
            return
        flow = self._flow_for(pkt, sport, now)
        if flow is None or flow.sock is None:
            return
        peers = flow.peers
        if peers.get(host) != dst:
            if host not in peers and len(peers) >= MAX_PEERS:
                del peers[next(iter(peers))]
            peers[host] = dst
        # What handle_fast repeats for the next datagrams to this destination.
        flow.fast_dst = dst
        flow.fast_dport = dport
        flow.fast_addr = addr = (host, dport)
        flow.fast_rule = verdict.rule
        if self.gather_sends and not seg:
            self._gather(flow, addr, payload)
            return
        if self._batch is not None:
            self.flush_sends()
        try:
            if seg and len(payload) > seg:
                sent = flow.sock.sendto_segments(payload, (host, dport), seg)
                counters.inc("nat.udp.to_host.gso")
                counters.inc("nat.udp.to_host", sent)
                return
            flow.sock.sendto(payload, (host, dport))
        except OSError as exc:
            counters.inc(f"nat.udp.send.{errname(exc)}")
            return
        counters.inc("nat.udp.to_host")

    def handle_fast(
        self,
        port: Port,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        payload: memoryview,
        now: float,
    ) -> bool:
        """One datagram from the classifier's fast path (a plain unicast datagram from
        ``port``'s guest, at its MAC, checked by :func:`guestnet.wire.native.udp_fast4` or
        ``udp_fast6``):
        gathered for its flow's socket when the flow exists and its last datagram went to the
        same destination; False, with nothing changed, for anything else (the ordinary path
        then takes it).

        What :meth:`handle_udp` would do for it, with its decisions taken from the flow: the
        source passed the policy when the flow opened; the destination's verdict (the policy's
        are fixed for the instance's life) and its place in ``peers`` were settled by the
        datagram before, and only the ordinary path changes either (and always records the
        latest in ``fast_*``). Declined: a super-frame (``rx_gso_size``), a guest MAC that
        changed, datagrams to the gateway while published ports have inbound flows (a reply
        to a host client), and sends that are not gathered.
        """
        key = (src, sport)
        flow = self.flows.get(key)
        if (
            flow is None
            or flow.fast_dst != dst
            or flow.fast_dport != dport
            or not self.gather_sends
            or port.rx_gso_size
        ):
            return False
        mac = port.guest_mac
        if flow.guest_mac != mac or self.guest_macs.get(src) != mac:
            return False
        if self.inbound and (dst == self._gateway4 or dst == self._gateway6):
            return False
        rule = flow.fast_rule
        if rule >= 0:
            self.policy.hits[rule] += 1
        flow.last_used = now
        self.flows.move_to_end(key)
        self._gather(flow, flow.fast_addr, payload)
        return True

    def _gather(self, flow: UdpFlow, addr: tuple[str, int], payload: memoryview) -> None:
        """Add one datagram to the batch, or send the batch and start another with it."""
        n = len(payload)
        batch = self._batch
        buf = self._gather_buf
        if batch is not None:
            bflow, baddr, size, total, count = batch
            if (
                bflow is flow
                and baddr == addr
                and 0 < n <= size
                and total + n <= MAX_GATHER
                and count < MAX_SEGMENTS
            ):
                buf[total : total + n] = payload
                total += n
                count += 1
                self._batch = (flow, addr, size, total, count)
                if n < size or count >= MAX_SEGMENTS or total + size > MAX_GATHER:
                    self.flush_sends()
                return
            self.flush_sends()
        buf[:n] = payload
        self._batch = (flow, addr, n, n, 1)
        if n == 0 or n + n > MAX_GATHER:
            self.flush_sends()

    def flush_sends(self) -> None:
        """Send the gathered batch (the end of a burst of guest frames, or before anything
        that must come after it)."""
        batch = self._batch
        if batch is None:
            return
        self._batch = None
        flow, addr, size, total, count = batch
        counters = self.counters
        sock = flow.sock
        if sock is None:  # the flow closed meanwhile
            counters.inc("nat.udp.send.closed", count)
            return
        data = self._gather_buf[:total]
        try:
            if count > 1:
                sock.sendto_segments(data, addr, size)
                counters.inc("nat.udp.to_host.gathered")
            else:
                sock.sendto(data, addr)
        except OSError as exc:
            counters.inc(f"nat.udp.send.{errname(exc)}", count)
            return
        counters.inc("nat.udp.to_host", count)

    def _flow_for(self, pkt: IpPacket, sport: int, now: float) -> UdpFlow | None:
        """The guest source's flow, opened (and room made) on first use; None if no socket.

        The flow follows the guest's MAC, so replies reach a guest whose MAC changed.
        """
        key = (pkt.src, sport)
        flows = self.flows
        flow = flows.get(key)
        if flow is not None:
            flow.last_used = now
            flows.move_to_end(key)
            if flow.guest_mac != pkt.src_mac:
                flow.guest_mac = pkt.src_mac
            return flow
        self.expire(now)
        if len(flows) >= self.max_flows and not flows.make_room(now, ACTIVE_S):
            return None
        flow = UdpFlow(pkt.family, pkt.src, sport, pkt.src_mac, now)
        try:
            flow.sock = self.open_socket(flow)
        except OSError as exc:
            # EMFILE/ENFILE and friends: a counted refusal, never a crash.
            self.counters.inc(f"nat.udp.socket.{errname(exc)}")
            return None
        flows[key] = flow
        self.counters.inc("nat.udp.flow.new")
        return flow

    # -- from the host ---------------------------------------------------------------------

    def coalesce_limits(self, flow: UdpFlow) -> tuple[int, int]:
        """How the I/O side may gather replies for ``flow`` into one super-frame: (largest
        payload of all of them together, largest datagram payload), or (0, 0) when the flow's
        guest link takes no UDP super-frames and each reply goes on its own."""
        port = self.switch.port_for(flow.guest_mac)
        if port is None or not port.udp_offload:
            return (0, 0)
        family = flow.family
        hdrs = family.header_len + UDP_HLEN
        return (family.max_l4_len - UDP_HLEN, self.config.mtu - hdrs)

    def deliver_reply(
        self,
        flow: UdpFlow,
        frame: Frame,
        payload_len: int,
        host: str,
        hport: int,
        now: float,
        seg: int = 0,
    ) -> None:
        """Send the reply whose payload is at ``flow.family.udp_payload_off`` in ``frame``.

        ``host``/``hport`` is the reply's source on the host. ``seg`` > 0: the payload is many
        datagrams of ``seg`` bytes (the last may be shorter) from that one source, as the
        kernel's UDP_GRO or the I/O side's gathering returned them. Takes ownership of ``frame``.
        """
        guest_src = flow.peers.get(host)
        if guest_src is None:
            self.counters.inc("nat.udp.reply.filtered")
            self.pool.release(frame)
            return
        if flow.sock is None:  # closed while the reply was in flight
            self.counters.inc("nat.udp.reply.closed")
            self.pool.release(frame)
            return
        flow.last_used = now
        self.flows.move_to_end(flow.key)
        family = flow.family
        if seg and payload_len > seg:
            count = -(-payload_len // seg)
            self.counters.inc("nat.udp.to_guest", count)
            port = self.switch.port_for(flow.guest_mac)
            if (
                port is not None
                and port.udp_offload
                and count <= MAX_SEGMENTS
                and family.header_len + UDP_HLEN + seg <= self.config.mtu
            ):
                self._emit_super(family, frame, payload_len, seg, count, guest_src, hport,
                                 flow.guest_ip, flow.guest_port, flow.guest_mac)  # fmt: skip
                return
            self.counters.inc("nat.udp.to_guest.split")
            off = frame.start + family.udp_payload_off
            view = frame.view
            rest = []
            for at in range(seg, payload_len, seg):
                part = self.pool.acquire()
                n = min(seg, payload_len - at)
                poff = part.start + family.udp_payload_off
                part.view[poff : poff + n] = view[off + at : off + at + n]
                rest.append((part, n))
            self._emit(family, frame, seg, guest_src, hport, flow.guest_ip, flow.guest_port,
                       flow.guest_mac)  # fmt: skip
            for part, n in rest:
                self._emit(family, part, n, guest_src, hport, flow.guest_ip, flow.guest_port,
                           flow.guest_mac)  # fmt: skip
            return
        self.counters.inc("nat.udp.to_guest")
        self._emit(family, frame, payload_len, guest_src, hport, flow.guest_ip,
                   flow.guest_port, flow.guest_mac)  # fmt: skip

    def _emit(
        self, family: L3Family, frame: Frame, payload_len: int, src: bytes, sport: int,
        dst: bytes, dport: int, mac: bytes,
    ) -> None:  # fmt: skip
        """Write UDP, IP and Ethernet headers before the payload in ``frame``; send it.

        A fresh IP identification each time, fragmentation allowed: a reply may exceed the
        guest's MTU and is then fragmented here. A datagram that fits the MTU, toward a link
        that takes UDP offloads (``Port.udp_offload``), leaves its UDP checksum to the guest's
        kernel.
        """
        self._ident = ident = (self._ident + 1) & 0xFFFF
        l4_len = UDP_HLEN + payload_len
        port = self.switch.port_for(mac)
        if port is not None and port.udp_offload and family.header_len + l4_len <= self.config.mtu:
            self._partial(family, frame, l4_len, src, sport, dst, dport, mac, ident)
            port.send(frame)
            return
        frame.length = build_udp_frame(
            family, frame.view, frame.start, mac, self.config.mac, src, dst, sport, dport,
            payload_len, ident, False,
        )  # fmt: skip
        if send_to_guest(frame, self.config.mtu, self.pool, self.switch.send, ident) > 1:
            self.counters.inc("nat.udp.to_guest.fragmented")

    def _partial(
        self, family: L3Family, frame: Frame, l4_len: int, src: bytes, sport: int, dst: bytes,
        dport: int, mac: bytes, ident: int,
    ) -> None:  # fmt: skip
        """Headers for ``l4_len`` bytes of UDP with a partial checksum (the pseudo-header sum,
        for the guest's kernel to complete from ``csum_start``)."""
        view = frame.view
        start = frame.start
        frame.length = build_l3_frame(
            family, view, start, mac, self.config.mac, src, dst, PROTO_UDP, l4_len, ident, False
        )
        l4 = start + family.l4_off
        csum = family.pseudo_sum(src, dst, PROTO_UDP, l4_len)
        view[l4 : l4 + 8] = _UDP_HDR.pack(sport, dport, l4_len, csum)
        frame.csum_start = family.l4_off
        frame.csum_offset = UDP_CSUM_OFFSET

    def _emit_super(
        self, family: L3Family, frame: Frame, payload_len: int, seg: int, count: int, src: bytes,
        sport: int, dst: bytes, dport: int, mac: bytes,
    ) -> None:  # fmt: skip
        """Send ``count`` datagrams of ``seg`` bytes (the last may be shorter) as one USO
        super-frame: one IP and UDP header for all, a partial checksum over the whole length and
        ``gso_size`` = ``seg``. The guest's kernel cuts it, fixing each datagram's lengths and
        checksum (and IPv4 identifications, one per datagram from the header's)."""
        ident = (self._ident + 1) & 0xFFFF
        self._ident = (self._ident + count) & 0xFFFF
        self._partial(family, frame, UDP_HLEN + payload_len, src, sport, dst, dport, mac, ident)
        frame.gso_size = seg
        self.counters.inc("nat.udp.to_guest.uso")
        self.switch.send(frame)

    def deliver_inbound(
        self,
        source: Hashable,
        reply: Callable[[memoryview], object],
        guest_ip: bytes,
        guest_port: int,
        client_port: int,
        payload: memoryview,
        now: float,
    ) -> None:
        """A datagram from a host client of a published port, to ``guest_ip:guest_port``.

        ``source`` names the client (same value for the same client); ``reply(data)`` sends the
        guest's answers back to it. The payload is copied into a pooled frame.
        """
        n = len(payload)
        family = IPV6 if len(guest_ip) == 16 else IPV4
        if n > family.max_l4_len - UDP_HLEN:
            self.counters.inc("nat.udp.forward.too_big")
            return
        flow = self._inbound_by_source.get(source)
        if flow is not None and (flow.guest_ip, flow.guest_port) != (guest_ip, guest_port):
            self._drop_inbound(flow)  # the forward now points at another guest address
            flow = None
        if flow is None:
            self.expire(now)
            visible = self._free_visible_port(guest_ip, guest_port, client_port)
            if len(self.inbound) + len(self.flows) >= self.max_flows and self.inbound:
                self._drop_inbound(next(iter(self.inbound.values())))
                self.counters.inc("nat.udp.flow.evicted")
            flow = InboundFlow(source, reply, guest_ip, guest_port, visible, now)
            self.inbound[flow.key] = flow
            self._inbound_by_source[source] = flow
            self.counters.inc("nat.udp.forward.flow.new")
        else:
            flow.last_used = now
            self.inbound.move_to_end(flow.key)
        frame = self.pool.acquire()
        off = frame.start + family.udp_payload_off
        frame.view[off : off + n] = payload
        mac = (
            self.guest_macs.get(guest_ip)
            or self.switch.mac_for_ip4(guest_ip)  # a guest that has sent no UDP yet (issue 15)
            or self.config.guest_mac
        )
        self.counters.inc("nat.udp.forward.to_guest")
        self._emit(family, frame, n, self._gateways[family.version], flow.visible_port, guest_ip,
                   guest_port, mac)  # fmt: skip

    def _free_visible_port(self, guest_ip: bytes, guest_port: int, want: int) -> int:
        """The client's own port if free for this guest port, else the next free one."""
        inbound = self.inbound
        port = want
        while (guest_ip, guest_port, port) in inbound:  # ends: far fewer flows than ports
            port = 1024 + (port - 1024 + 1) % (65536 - 1024)
        return port

    def _reply_inbound(self, flow: InboundFlow, payload: memoryview, now: float) -> None:
        """The guest answers a published port's client: through the forward's socket."""
        flow.last_used = now
        self.inbound.move_to_end(flow.key)
        try:
            flow.reply(payload)
        except OSError as exc:
            self.counters.inc(f"nat.udp.forward.send.{errname(exc)}")
            return
        self.counters.inc("nat.udp.forward.to_host")

    def _drop_inbound(self, flow: InboundFlow) -> None:
        """Forget an inbound flow in both indexes (the source one only if it still points here)."""
        self.inbound.pop(flow.key, None)
        if self._inbound_by_source.get(flow.source) is flow:
            del self._inbound_by_source[flow.source]

    def drop_inbound_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Forget inbound flows whose source matches (a forward was removed); return how many."""
        doomed = [f for f in self.inbound.values() if predicate(f.source)]
        for flow in doomed:
            self._drop_inbound(flow)
        return len(doomed)

    def handle_host_error(
        self, flow: UdpFlow, host: str, hport: int, type_: int, code: int, now: float | None = None
    ) -> None:
        """The host got an ICMP error for a datagram this flow sent to ``host:hport``."""
        guest_dst = flow.peers.get(host)
        if guest_dst is None:
            self.counters.inc("nat.udp.host_error.unknown_peer")
            return
        self.counters.inc(f"nat.udp.host_error.{type_}.{code}")
        self.icmp.send_flow_error(
            flow.guest_mac, flow.guest_ip, flow.guest_port, guest_dst, hport, code, type_, now
        )

    # -- lifetime --------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Close flows idle for ``timeout`` seconds; return how many."""
        if self._batch is not None:
            self.flush_sends()
        timeout = self.timeout
        n = self.flows.expire(now, timeout)
        inbound = self.inbound
        while inbound:
            flow = next(iter(inbound.values()))
            if flow.last_used + timeout > now:
                break
            self._drop_inbound(flow)
            self.counters.inc("nat.udp.forward.flow.expired")
            n += 1
        return n

    def close_all(self) -> None:
        """Close every flow's socket (instance shutdown)."""
        if self._batch is not None:
            self.flush_sends()
        self.flows.close_all()
        self.inbound.clear()
        self._inbound_by_source.clear()

    def flows_info(self, now: float) -> list[dict[str, object]]:
        """Every flow, guest-opened and published-port ones, for the API's ``/flows``."""
        out = [flow.info(now) for flow in self.flows.values()]
        for inbound in self.inbound.values():
            out.append(
                {
                    "proto": "udp",
                    "origin": "host",
                    "guest": f"{ip_text(inbound.guest_ip)}:{inbound.guest_port}",
                    "visible_port": inbound.visible_port,
                    "state": "OPEN",
                    "idle_s": round(now - inbound.last_used, 3),
                }
            )
        return out
