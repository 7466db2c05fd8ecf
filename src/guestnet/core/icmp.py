"""ICMP: echo for the guest, and the ICMP errors guestnet sends toward it.

Theory of operation
-------------------
*Echo to guestnet's own addresses.* An echo request to the gateway or the DNS address is answered
here, with no socket: the reply copies identifier, sequence and payload into a pooled frame.

*Echo to anything else.* The destination goes through :class:`~guestnet.core.policy.Policy`
(refused: an ICMP "administratively prohibited" from the gateway, counted). Allowed requests go
out through an :class:`EchoBackend` (``io/icmp_sock.py``): unprivileged ping sockets when
``net.ipv4.ping_group_range`` allows, else a raw socket with CAP_NET_RAW, else none (counted
drops; the I/O side warns once at start-up). A ping socket chooses its own identifier (its
"port"), so each guest echo *flow*, keyed by (guest address, guest identifier), owns one host
endpoint, and replies are mapped back: the guest sees its own identifier, sequence and payload,
from the address it pinged. Flows remember the destinations they were used for (replies from
anyone else are dropped), expire after :data:`ECHO_TIMEOUT_S` idle, and the table holds at most
:data:`MAX_ECHO_FLOWS` (the least recently used is evicted).

*IPv6.* The same service speaks ICMPv6 (RFC 4443) for IPv6 flows: a :class:`Dialect` per IP
version holds what differs (protocol number 1 or 58, echo types 8/0 or 128/129, the error
types and codes, and that the ICMPv6 checksum covers the IPv6 pseudo-header); flows, policy,
echo sockets (``IPPROTO_ICMPV6`` ping sockets on the I/O side) and error quoting are shared.
Echo to guestnet's own IPv6 addresses is answered by the NDP service, next to neighbour
discovery.

*Errors toward the guest.* :meth:`IcmpService.send_unreachable` quotes a guest datagram (its IP
header and as much of its payload as keeps the error within 576 bytes for IPv4, RFC 1812, and
1,280 for IPv6, RFC 4443 2.4) in a destination-unreachable message. Callers name the reason in
IPv4's codes; the ICMPv6 code is the dialect's. Two cases use it:

- a destination the policy refuses: type 3 code 13 (communication administratively
  prohibited), from the gateway, since guestnet plays the router that filtered it. Linux reports
  it to the guest's socket as EHOSTUNREACH;
- the host's own ICMP error for a NAT flow (port unreachable, seen as ECONNREFUSED through
  IP_RECVERR): the same type and code, from the address the guest sent to, quoting a header
  rebuilt from the flow (:meth:`IcmpService.send_flow_error`). Linux reports port unreachable as
  ECONNREFUSED.

Errors are rate-limited as Linux limits its own (``net.ipv4.icmp_msgs_per_sec`` 1000, burst
50): a token bucket of :data:`ERROR_BURST` refilled at :data:`ERROR_RATE_PER_S`; an error
beyond it is counted (``icmp.error.rate_limited``) and not sent, so a guest spraying refused
destinations cannot make guestnet flood it back.
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple, Protocol

from guestnet.config import Config
from guestnet.core.flows import IdleFlows, ip_text
from guestnet.core.fragments import send_to_guest
from guestnet.core.packet import IpPacket
from guestnet.core.policy import Policy
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire.checksum import checksum
from guestnet.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_HLEN,
    ICMP_TIME_EXCEEDED,
    UNREACH_ADMIN_PROHIBITED,
    UNREACH_HOST,
    UNREACH_NET,
    UNREACH_PORT,
    build_icmp,
    parse_icmp,
)
from guestnet.wire.icmpv6 import (
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_TIME_EXCEEDED,
)
from guestnet.wire.ipv4 import IPV4_HLEN, PROTO_ICMP, build_ipv4
from guestnet.wire.l3 import IPV4, IPV6, L3Family, build_l3_frame
from guestnet.wire.udp import UDP_HLEN

#: IPv6's next header for ICMPv6.
PROTO_ICMPV6 = 58

#: Seconds an echo flow lives without a request or reply (Linux's ping conntrack uses 30).
ECHO_TIMEOUT_S = 60.0
#: Echo flows at once; beyond this the least recently used is evicted.
MAX_ECHO_FLOWS = 1024
#: Destinations remembered per echo flow (for filtering replies).
MAX_PEERS = 256
#: ICMP errors stay within the minimum reassembly size (RFC 1812 4.3.2.3).
ICMP_ERROR_MAX = 576
#: ICMPv6 errors stay within the IPv6 minimum MTU (RFC 4443 2.4 (c)).
ICMPV6_ERROR_MAX = 1280
#: Errors toward the guests per second, and the burst allowed (Linux's defaults).
ERROR_RATE_PER_S = 1000.0
ERROR_BURST = 50.0

EchoKey = tuple[bytes, int]


class Dialect(NamedTuple):
    """What ICMP looks like in one IP version."""

    proto: int
    echo_request: int
    echo_reply: int
    dest_unreach: int
    time_exceeded: int
    #: IPv4 destination-unreachable codes (what callers name) -> this version's codes.
    unreach_codes: dict[int, int]
    #: The checksum covers the IP pseudo-header (ICMPv6) or the message alone (ICMP).
    pseudo: bool
    #: Largest error message, IP header included.
    error_max: int


ICMP4 = Dialect(
    PROTO_ICMP, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED,
    {}, False, ICMP_ERROR_MAX,
)  # fmt: skip
#: RFC 4443 3.1: 0 no route, 1 administratively prohibited, 3 address unreachable, 4 port.
ICMP6 = Dialect(
    PROTO_ICMPV6, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_DEST_UNREACH,
    ICMPV6_TIME_EXCEEDED,
    {UNREACH_NET: 0, UNREACH_HOST: 3, UNREACH_PORT: 4, UNREACH_ADMIN_PROHIBITED: 1},
    True, ICMPV6_ERROR_MAX,
)  # fmt: skip
#: The dialect of each IP version.
DIALECTS = {4: ICMP4, 6: ICMP6}


class EchoSocket(Protocol):
    """The host side of one echo flow (a ping socket, or a share of the raw socket)."""

    def send_echo(self, host: str, seq: int, payload: memoryview) -> None:
        """Send an echo request to ``host``; raises OSError."""

    def close(self) -> None:
        """Release the host endpoint."""


class EchoBackend(Protocol):
    """Opens host endpoints for echo flows."""

    def open(self, flow: EchoFlow) -> EchoSocket:
        """A host endpoint whose replies the I/O side hands to ``deliver_echo_reply``."""


class EchoFlow:
    """One guest echo flow: (guest address, guest identifier) and its host endpoint."""

    __slots__ = (
        "created",
        "family",
        "guest_ident",
        "guest_ip",
        "guest_mac",
        "last_used",
        "peers",
        "sock",
    )

    def __init__(
        self, family: L3Family, guest_ip: bytes, guest_ident: int, guest_mac: bytes, now: float
    ) -> None:
        #: The IP version of the flow: where a reply lands in a pooled frame
        #: (``family.l4_off``) and how its headers are written.
        self.family = family
        self.guest_ip = guest_ip
        self.guest_ident = guest_ident
        self.guest_mac = guest_mac
        self.created = now
        self.last_used = now
        #: Host address string -> the address the guest used for it.
        self.peers: dict[str, bytes] = {}
        self.sock: EchoSocket | None = None

    def close(self) -> None:
        """Release the host endpoint (the flow left the table)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def info(self, now: float) -> dict[str, object]:
        """The flow as the API's ``/flows`` shows it (the echo identifier stands for a port)."""
        return {
            "proto": "icmp",
            "origin": "guest",
            "guest": f"{ip_text(self.guest_ip)}",
            "ident": self.guest_ident,
            "dst": sorted(f"{ip_text(dst)}" for dst in set(self.peers.values())),
            "host": sorted(self.peers),
            "state": "OPEN",
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_used, 3),
        }


def quote_header(pkt: IpPacket) -> bytes:
    """A header equal to the guest's (IPv4 options and IPv6 extension headers left out), for
    quoting in an error."""
    if pkt.family is IPV6:
        buf = bytearray(IPV6.header_len)
        IPV6.build(buf, 0, pkt.src, pkt.dst, pkt.proto, len(pkt.l4), ttl=pkt.hop_limit)
        return bytes(buf)
    ip = pkt.ip
    buf = bytearray(IPV4_HLEN)
    build_ipv4(
        buf, 0, ip.src, ip.dst, ip.proto, ip.total_len - ip.header_len, ip.ident, ip.ttl,
        ip.frag, ip.tos,
    )  # fmt: skip
    return bytes(buf)


class IcmpService:
    """Answers echo to guestnet's addresses, NATs other echo, and sends ICMP errors."""

    def __init__(
        self,
        config: Config,
        pool: FramePool,
        counters: Counters,
        switch: Switch,
        policy: Policy,
        backend: EchoBackend | None = None,
        max_flows: int = MAX_ECHO_FLOWS,
        timeout: float = ECHO_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        self.switch = switch
        self.policy = policy
        self.backend = backend
        self.max_flows = max_flows
        self.timeout = timeout
        self.flows: IdleFlows[EchoKey, EchoFlow] = IdleFlows(counters, "icmp.echo.flow")
        self._ident = 0
        #: The error token bucket: tokens left, and when it was last refilled.
        self._tokens = ERROR_BURST
        self._refilled = 0.0
        self._now = 0.0

    # -- from the guest --------------------------------------------------------------------

    def handle_icmp(self, pkt: IpPacket, now: float) -> None:
        """Handle one ICMP or ICMPv6 message from the guest (checksum already verified)."""
        self._now = now
        hdr = parse_icmp(pkt.l4, verify=False)
        dialect = DIALECTS[pkt.family.version]
        if hdr.type != dialect.echo_request:
            self.counters.inc(f"icmp.type.{hdr.type}.ignored")
            return
        dst = pkt.dst
        if dst in self.config.owned_b or dst in self.config.owned6_b:
            self._answer_echo(pkt)
            return
        verdict = self.policy.destination(dst)
        if verdict.host is None:
            self.counters.inc(f"icmp.echo.{verdict.reason}")
            self.send_unreachable(pkt, UNREACH_ADMIN_PROHIBITED, self._gateway(pkt.family), now)
            return
        if self.backend is None:
            self.counters.inc("icmp.echo.no_socket")
            return
        flow = self._flow_for(pkt, hdr.ident, now)
        if flow is None or flow.sock is None:
            return
        if verdict.host not in flow.peers and len(flow.peers) >= MAX_PEERS:
            del flow.peers[next(iter(flow.peers))]
        flow.peers[verdict.host] = dst
        try:
            flow.sock.send_echo(verdict.host, hdr.seq, pkt.l4[ICMP_HLEN:])
        except OSError as exc:
            self.counters.inc(f"icmp.echo.send.{errname(exc)}")
            return
        self.counters.inc("icmp.echo.sent")

    def handle_icmp6(self, pkt: IpPacket, now: float) -> None:
        """The classifier's ``icmp6`` slot: ICMPv6 that is not NDP (echo to the outside)."""
        self.handle_icmp(pkt, now)

    def _gateway(self, family: L3Family) -> bytes:
        """The gateway address of ``family``: where guestnet's own errors come from."""
        return self.config.gateway_b if family is IPV4 else self.config.gateway6_b

    def _flow_for(self, pkt: IpPacket, ident: int, now: float) -> EchoFlow | None:
        """The guest's echo flow, opened (and room made) on first use; None if no socket."""
        key = (pkt.src, ident)
        flows = self.flows
        flow = flows.get(key)
        if flow is not None:
            flow.last_used = now
            flows.move_to_end(key)
            return flow
        assert self.backend is not None
        self.expire(now)
        if len(flows) >= self.max_flows:
            flows.evict_oldest()
        flow = EchoFlow(pkt.family, pkt.src, ident, pkt.src_mac, now)
        try:
            flow.sock = self.backend.open(flow)
        except OSError as exc:
            self.counters.inc(f"icmp.echo.socket.{errname(exc)}")
            return None
        flows[key] = flow
        self.counters.inc("icmp.echo.flow.new")
        return flow

    def _answer_echo(self, pkt: IpPacket) -> None:
        """Echo reply from guestnet itself: same identifier, sequence and payload."""
        frame = self.pool.acquire()
        buf = frame.view
        family = pkt.family
        icmp_off = frame.start + family.l4_off
        l4 = pkt.l4
        n = len(l4)
        buf[icmp_off : icmp_off + n] = l4
        buf[icmp_off] = DIALECTS[family.version].echo_reply
        buf[icmp_off + 1] = 0
        self._finish_icmp(family, frame, n, pkt.dst, pkt.src, pkt.src_mac)
        self.counters.inc("icmp.echo.answered")

    # -- from the host ---------------------------------------------------------------------

    def deliver_echo_reply(self, flow: EchoFlow, frame: Frame, icmp_len: int, host: str) -> None:
        """Send the echo reply in ``frame`` (ICMP message at ``flow.family.l4_off``) to the guest.

        The I/O side received the reply straight into the frame; here the identifier is put
        back to the guest's, the checksum redone, and IP and Ethernet headers written in front.
        Takes ownership of ``frame``.
        """
        buf = frame.view
        icmp_off = frame.start + flow.family.l4_off
        guest_src = flow.peers.get(host)
        echo_reply = DIALECTS[flow.family.version].echo_reply
        if icmp_len < ICMP_HLEN or buf[icmp_off] != echo_reply:
            self.counters.inc("icmp.echo.reply.not_echo")
            self.pool.release(frame)
            return
        if guest_src is None:
            self.counters.inc("icmp.echo.reply.filtered")
            self.pool.release(frame)
            return
        struct.pack_into("!H", buf, icmp_off + 4, flow.guest_ident)
        self._finish_icmp(flow.family, frame, icmp_len, guest_src, flow.guest_ip, flow.guest_mac)
        self.counters.inc("icmp.echo.reply")

    # -- errors toward the guest -----------------------------------------------------------

    def send_unreachable(
        self, pkt: IpPacket, code: int, origin: bytes, now: float | None = None
    ) -> None:
        """Destination unreachable (``code``) from ``origin``, quoting the guest's datagram.

        ``now``: for the rate limit (the time of the last call that gave one otherwise)."""
        if now is not None:
            self._now = now
        dialect = DIALECTS[pkt.family.version]
        if pkt.proto == dialect.proto and (len(pkt.l4) < 1 or pkt.l4[0] != dialect.echo_request):
            # Never an error about an error (RFC 1122 3.2.2).
            self.counters.inc("icmp.error.about_icmp")
            return
        self._send_error(pkt.family, pkt.src_mac, origin, pkt.src, quote_header(pkt), pkt.l4, code)

    def send_flow_error(
        self,
        guest_mac: bytes,
        guest_ip: bytes,
        guest_port: int,
        guest_dst: bytes,
        dport: int,
        code: int,
        type_: int = ICMP_DEST_UNREACH,
        now: float | None = None,
    ) -> None:
        """An error about a UDP datagram guest_ip:guest_port -> guest_dst:dport, from guest_dst.

        Used for host ICMP errors on NAT flows, where the guest's datagram is long gone: the
        quoted IP and UDP headers are rebuilt (UDP length 8, no checksum), which is what the
        guest's stack matches errors against. ``type_`` and ``code`` are in the flow's own
        version (the host's ICMP or ICMPv6 error as it came).
        """
        if now is not None:
            self._now = now
        family = IPV6 if len(guest_ip) == 16 else IPV4
        hlen = family.header_len
        head = bytearray(hlen + UDP_HLEN)
        family.build(head, 0, guest_ip, guest_dst, 17, UDP_HLEN)
        struct.pack_into("!HHHH", head, hlen, guest_port, dport, UDP_HLEN, 0)
        view = memoryview(head)
        self._send_error(family, guest_mac, guest_dst, guest_ip, bytes(head[:hlen]),
                         view[hlen:], code, type_, native=True)  # fmt: skip

    def _send_error(
        self,
        family: L3Family,
        guest_mac: bytes,
        origin: bytes,
        guest_ip: bytes,
        ip_head: bytes,
        l4: memoryview,
        code: int,
        type_: int = ICMP_DEST_UNREACH,
        native: bool = False,
    ) -> None:
        """The error message both senders share: ``ip_head`` and the start of ``l4`` quoted.

        ``type_``/``code`` are IPv4's (a destination unreachable) unless ``native``: then they
        are already the family's own.
        """
        if not self._take_token():
            self.counters.inc("icmp.error.rate_limited")
            return
        dialect = DIALECTS[family.version]
        if not native and dialect is ICMP6:
            type_, code = dialect.dest_unreach, dialect.unreach_codes.get(code, 0)
        room = dialect.error_max - family.header_len - ICMP_HLEN - len(ip_head)
        quote_len = min(len(l4), room)
        frame = self.pool.acquire()
        buf = frame.view
        icmp_off = frame.start + family.l4_off
        body = icmp_off + ICMP_HLEN
        buf[body : body + len(ip_head)] = ip_head
        buf[body + len(ip_head) : body + len(ip_head) + quote_len] = l4[:quote_len]
        body_len = len(ip_head) + quote_len
        build_icmp(buf, icmp_off, type_, code, 0, 0, body_len)
        if dialect.pseudo:
            self._checksum(family, frame, ICMP_HLEN + body_len, origin, guest_ip)
        self._headers(family, frame, ICMP_HLEN + body_len, origin, guest_ip, guest_mac)
        self.counters.inc(f"icmp{'v6' if dialect.pseudo else ''}.error.sent.{type_}.{code}")
        self.switch.send(frame)

    def _take_token(self) -> bool:
        """One error's worth from the bucket, refilled for the time since the last refill."""
        now = self._now
        tokens = self._tokens + (now - self._refilled) * ERROR_RATE_PER_S
        self._refilled = now
        if tokens > ERROR_BURST:
            tokens = ERROR_BURST
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    # -- building --------------------------------------------------------------------------

    def _finish_icmp(
        self, family: L3Family, frame: Frame, icmp_len: int, src: bytes, dst: bytes, mac: bytes
    ) -> None:
        """Checksum the ICMP message in ``frame``, add headers, send (fragmented if needed)."""
        self._checksum(family, frame, icmp_len, src, dst)
        self._headers(family, frame, icmp_len, src, dst, mac)
        send_to_guest(frame, self.config.mtu, self.pool, self.switch.send, self._ident)

    def _checksum(
        self, family: L3Family, frame: Frame, icmp_len: int, src: bytes, dst: bytes
    ) -> None:
        """The ICMP checksum; ICMPv6's covers the IPv6 pseudo-header too (RFC 4443 2.3)."""
        buf = frame.view
        icmp_off = frame.start + family.l4_off
        dialect = DIALECTS[family.version]
        initial = family.pseudo_sum(src, dst, dialect.proto, icmp_len) if dialect.pseudo else 0
        struct.pack_into("!H", buf, icmp_off + 2, 0)
        value = checksum(buf[icmp_off : icmp_off + icmp_len], initial)
        struct.pack_into("!H", buf, icmp_off + 2, value)

    def _headers(
        self, family: L3Family, frame: Frame, icmp_len: int, src: bytes, dst: bytes, mac: bytes
    ) -> None:
        """IP and Ethernet headers in front of the ICMP message, each with a fresh IP id
        (fragmentable: an echo reply may exceed the guest's MTU)."""
        self._ident = ident = (self._ident + 1) & 0xFFFF
        frame.length = build_l3_frame(
            family, frame.view, frame.start, mac, self.config.mac, src, dst,
            DIALECTS[family.version].proto, icmp_len, ident, False,
        )  # fmt: skip

    # -- lifetime --------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Close echo flows idle for ``timeout``; return how many."""
        return self.flows.expire(now, self.timeout)

    def flows_info(self, now: float) -> list[dict[str, object]]:
        """Every echo flow, for the API's ``/flows``."""
        return [flow.info(now) for flow in self.flows.values()]

    def close_all(self) -> None:
        """Close every echo flow (instance shutdown)."""
        self.flows.close_all()


def errname(exc: OSError) -> str:
    """``eagain``, ``emfile``...: the errno's name, for a counter."""
    return errno.errorcode.get(exc.errno or 0, "error").lower()
