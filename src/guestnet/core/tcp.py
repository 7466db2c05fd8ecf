"""TCP translation: one guest TCP connection spliced onto one host socket.

Theory of operation
-------------------
guestnet does not run a TCP stack for the host side: the host kernel does that on an ordinary
socket. Toward the guest, guestnet *is* the remote TCP peer, but a thin one: it keeps no receive
queue and a bounded send queue, and lets each side's kernel do the hard parts. Per flow:

Open. The guest's SYN starts a non-blocking ``connect`` on the host (the I/O driver does it,
with TCP_NODELAY). Nothing goes back to the guest until the host connect completes: then the
SYN-ACK (state ``SYN_RCVD``); refused, unreachable or timed out (``CONNECT_TIMEOUT_S``): RST.
SYN retransmissions meanwhile are absorbed and counted. The guest's ACK makes the flow
``ESTABLISHED``.

Forwarded connections (host to guest). A connection accepted on a published port (see
``guestnet.io.forwards``) is opened the other way round: :meth:`TcpNat.open_to_guest` sends the
guest a SYN from the gateway address (the guest sees every host client as the gateway, as slirp
and passt show it) and a source port from the ephemeral range, unique among flows and going
round the whole range before reuse (state ``SYN_SENT``). The SYN is retransmitted after 1 and
3 s; without a SYN-ACK by ``FORWARD_CONNECT_TIMEOUT_S`` the host connection is reset. An RST
from the guest (nobody listens) resets the host connection at once. The SYN-ACK makes the flow
``ESTABLISHED`` and from there it is exactly a guest-opened flow; removing the forward only
closes its listening socket, never its flows.

Options. We announce MSS = MTU - 40 and window scaling (shift ``OUR_WSCALE``) when the guest
offers it, and honour the guest's. No SACK and no timestamps: the guest link is a local,
lossless link (loss only when a test injects it), so SACK's recovery speed and timestamps' RTT
samples and PAWS buy little here, and leaving them out keeps every segment's header 20 bytes
and the retransmit logic simple. Sequence numbers are compared in modular space
(:func:`seq_delta`), so transfers larger than 4 GiB are fine without PAWS.

Guest to host. In-order payload goes straight from the guest's frame to the host socket
(``send`` of a memoryview slice); we acknowledge only what the socket took. The window we
advertise is the room in the host socket's send buffer (the driver's ``send_room``), so the
guest is throttled by the host connection and guestnet queues nothing. If ``send`` takes less
than offered (the estimate was generous), we ACK what it took with the current window and wait
for EPOLLOUT to send a window update. A window we advertise below one MSS is re-checked on a
short timer (``WND_CHECK_*``), because a send buffer that drains without an earlier EAGAIN
raises no EPOLLOUT. Segments beyond ``rcv_nxt`` are dropped and answered with a duplicate ACK
at once (the guest's fast retransmit needs three); retransmitted bytes we already have are
trimmed. ACKs for in-order data are coalesced to one per flow per loop turn
(:meth:`TcpNat.flush`), except that the ACK for a lone segment shorter than the MSS (a request)
is held up to ``DELACK_S`` so that the host's answer carries it (a bare ACK per request was a
quarter of guestnet's work in a 1-byte ping-pong); a second segment sends it that turn, as a
receiver acknowledges at least every other segment (RFC 9293 3.8.6.3). A segment of an
established flow from a link with trusted checksums skips the classifier's general parse and
route: the classifier unpacks Ethernet, IPv4 and TCP headers in one go and calls
:meth:`TcpNat.handle_fast`, which takes it only for an established flow (else it goes the
ordinary way, unchanged).

Host to guest. We read the host socket only while the guest's window (and ``MAX_UNACKED``)
has room, straight into the payload area of a pooled frame, write the headers in front and
send it; a copy of the bytes stays in the flow's bounded ``unacked`` buffer until the guest
acknowledges them. Retransmission: RTO per RFC 6298 (initial 1 s, floor 200 ms, exponential
backoff, Karn's rule), fast retransmit on three duplicate ACKs with NewReno partial-ACK
recovery (each partial ACK retransmits the next hole at once). There is no congestion window:
the path is one local link. A zero window is probed (persist timer, probes with
``seq = snd_nxt - 1`` that make the guest answer with its window, backing off to 60 s).
The driver registers host sockets edge-triggered: ``host_readable`` remembers an edge we could
not act on yet (window full), and we read until EAGAIN (an EOF can hide behind a short read).

Offloads. A link that takes them (a TAP with a virtio-net header) says so on its Port
(``offload_max``, the largest IP packet it accepts). Toward such a port every segment leaves
with a partial checksum (the pseudo-header sum, ``Frame.csum_start``/``csum_offset``) that the
guest's kernel never needs to finish for local delivery, and data goes out in super-frames of
as many whole MSS as fit in ``offload_max`` and a pool slot (``Frame.gso_size`` = MSS): about
44 segments' worth per frame at MTU 1500, so the per-frame cost is paid once per 64 KiB. Ports
without offloads get one MSS per frame with full checksums, whatever else is attached. From
the guest, offloads need nothing here: a super-frame is one large in-order segment whose payload
goes to the host socket in one ``send`` (the link has already told the classifier not to
verify its partial checksum).

Close. A FIN either way is a half-close passed on: the guest's FIN becomes ``shutdown(SHUT_WR)``
on the host once its data is written; host EOF becomes our FIN once everything read is sent.
When both directions are closed and our FIN is acknowledged the host socket is closed at once
and the flow lingers ``REAP_DELAY_S`` without a socket (answering a retransmitted FIN) before
it is reaped: no TIME_WAIT holds a descriptor. An RST either way tears down both: the guest's
RST closes the host socket with SO_LINGER 0 so the host peer sees an RST; a host reset
(ECONNRESET, EPIPE) sends RST to the guest. An established flow idle for ``IDLE_TIMEOUT_S``
(2 h 4 min, RFC 5382) is reset both ways; so is one whose guest stops acknowledging for
``MAX_RETRANSMITS`` timeouts in a row.

Everything else is RFC 9293 and counted under ``tcp.*``: a segment for no flow gets RST
(unless it is an RST), an unacceptable segment an ACK, an in-window RST or SYN a challenge ACK
(RFC 5961), a full flow table (``config.max_flows``) or no descriptors (EMFILE) an RST.

This module is sans-I/O: it never touches a socket or a clock. :class:`TcpIo` is what it asks of
the I/O driver (``guestnet.io.tcp_nat``), which calls back :meth:`TcpNat.host_connected`,
:meth:`TcpNat.host_readable`, :meth:`TcpNat.host_writable` and :meth:`TcpNat.on_timer`. Unit
tests drive it with a fake driver and a scripted clock.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any, Protocol

from guestnet.config import Config
from guestnet.core.flows import FlowKey, FlowTable
from guestnet.core.packet import IpPacket
from guestnet.core.policy import Policy
from guestnet.core.port import Port
from guestnet.counters import Counters
from guestnet.pool import HEADROOM, Frame, FramePool
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import ETH_HLEN, ETH_ZLEN, ETHERTYPE_IPV4
from guestnet.wire.ipv4 import IPV4_HLEN, PROTO_TCP, build_ipv4
from guestnet.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_HLEN,
    build_syn_options,
    parse_tcp_options,
)

# -- limits and timeouts -----------------------------------------------------------------------

#: RFC 5382 REQ-5: an established flow may be idle at least 2 h 4 min.
IDLE_TIMEOUT_S = 7440.0
#: A host connect that has not completed by then is given up (RST to the guest).
CONNECT_TIMEOUT_S = 30.0
#: RFC 6298: initial RTO, floor (Linux's 200 ms rather than 1 s: the link is local), ceiling.
RTO_INITIAL_S = 1.0
RTO_MIN_S = 0.2
RTO_MAX_S = 60.0
#: Consecutive retransmission timeouts before the flow is reset both ways (~15 min with backoff).
MAX_RETRANSMITS = 15
#: Zero-window probe interval: first, ceiling (doubling in between).
PERSIST_MIN_S = 0.2
PERSIST_MAX_S = 60.0
#: Re-check of a window we advertised below one MSS: first, ceiling.
WND_CHECK_MIN_S = 0.001
WND_CHECK_MAX_S = 0.2
#: How long the ACK for a lone small in-order segment (a request) is held, so that the host's
#: answer can carry it: a loopback server answers within tens of microseconds.
DELACK_S = 0.001
#: How long a flow with both directions closed lingers (socket already closed).
REAP_DELAY_S = 1.0
#: Our window-scale shift: windows up to 8 MiB.
OUR_WSCALE = 7
MAX_WINDOW = 0xFFFF << OUR_WSCALE
#: Host bytes sent to the guest and not yet acknowledged, per flow: the retransmit buffer bound.
MAX_UNACKED = 4 * 1024 * 1024
#: Most frames one host read fills (one ``recvmsg_into`` with that many buffers).
READ_BATCH = 64
#: MSS assumed when the guest's SYN carries none (RFC 9293).
DEFAULT_MSS = 536
#: A forwarded connection's SYN to the guest: first retransmission after this, doubling; the
#: host connection is reset when no SYN-ACK came within ``FORWARD_CONNECT_TIMEOUT_S`` (SYNs at
#: 0, 1 and 3 s: three tries).
FORWARD_SYN_RTO_S = 1.0
FORWARD_CONNECT_TIMEOUT_S = 6.0
#: Source ports of forwarded connections as the guest sees them (Linux's ephemeral range).
FORWARD_PORT_MIN = 32768
FORWARD_PORT_MAX = 60999

# -- states --------------------------------------------------------------------------------------

#: Host connect in progress; the guest has sent SYN and heard nothing.
CONNECTING = 0
#: SYN-ACK sent to the guest, waiting for its ACK.
SYN_RCVD = 1
#: Data flows both ways (half-closes are flags on top of this state).
ESTABLISHED = 2
#: Both directions closed or reset; the host socket is closed; the entry lingers until reaped.
CLOSED = 3
#: A forwarded connection: our SYN sent to the guest, waiting for its SYN-ACK.
SYN_SENT = 4

STATE_NAMES = ("CONNECTING", "SYN_RCVD", "ESTABLISHED", "CLOSED", "SYN_SENT")

SEQ_MASK = 0xFFFFFFFF
#: Ethernet + IPv4 + TCP header bytes in front of a data segment's payload.
HDRS_LEN = ETH_HLEN + IPV4_HLEN + TCP_HLEN

_TCP_HDR = struct.Struct("!HHIIBBH")
_TCP_OUT = struct.Struct("!HHIIBBHHH")
_ETH = struct.Struct("!6s6sH")
_ZEROS = bytes(ETH_ZLEN)


def seq_delta(a: int, b: int) -> int:
    """``a - b`` in 32-bit sequence space, as a signed number."""
    return ((a - b + 0x80000000) & SEQ_MASK) - 0x80000000


class TcpIo(Protocol):
    """What the TCP core asks of its I/O driver. Every call is about one flow's host socket."""

    def connect(self, flow: TcpFlow) -> int:
        """Start a non-blocking connect to ``flow.host:flow.host_port``; 0 or an errno."""

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        """Write ``data``; bytes taken (0 when the buffer is full). Raises OSError on errors."""

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        """Read into ``bufs`` in order (one scatter read): bytes read, 0 at EOF, -1 when
        nothing is there. Raises OSError."""

    def send_room(self, flow: TcpFlow) -> int:
        """Bytes the host socket's send buffer can take now (an estimate)."""

    def shutdown_write(self, flow: TcpFlow) -> None:
        """``shutdown(SHUT_WR)``: pass the guest's FIN on. Raises OSError."""

    def close(self, flow: TcpFlow, reset: bool) -> None:
        """Close the host socket (idempotent); ``reset``: SO_LINGER 0, the peer sees RST."""

    def set_timer(self, flow: TcpFlow, when: float | None) -> None:
        """Call :meth:`TcpNat.on_timer` for ``flow`` no later than ``when`` (None: never)."""

    def request_flush(self) -> None:
        """Call :meth:`TcpNat.flush` once at the end of this loop turn."""


class TcpFlow:
    """One guest connection and its host socket: all per-flow state, no behaviour."""

    __slots__ = (
        "ack_pending",
        "bytes_to_guest",
        "bytes_to_host",
        "connect_deadline",
        "created",
        "deferred",
        "delack_deadline",
        "dns",
        "dst_ip",
        "dst_port",
        "dupacks",
        "fin_acked",
        "fin_sent",
        "forward_id",
        "guest_fin",
        "guest_ip",
        "guest_isn",
        "guest_mac",
        "guest_port",
        "guest_wscale",
        "host",
        "host_eof",
        "host_port",
        "host_readable",
        "host_writable",
        "in_recovery",
        "io_data",
        "iss",
        "key",
        "last_active",
        "mss",
        "persist_deadline",
        "persist_interval",
        "port",
        "pump_pending",
        "rcv_nxt",
        "rcv_wnd",
        "read_frames",
        "reap_deadline",
        "recover",
        "retries",
        "rto",
        "rto_deadline",
        "rtt_seq",
        "rtt_time",
        "rttvar",
        "snd_nxt",
        "snd_una",
        "snd_wl1",
        "snd_wl2",
        "snd_wnd",
        "srtt",
        "state",
        "unacked",
        "wnd_check_deadline",
        "wnd_check_interval",
        "wnd_field",
        "wscale_ok",
    )

    def __init__(
        self,
        key: FlowKey,
        port: Port,
        guest_mac: bytes,
        host: str,
        host_port: int,
        guest_isn: int,
        iss: int,
        now: float,
    ) -> None:
        self.key = key
        self.guest_ip, self.guest_port, self.dst_ip, self.dst_port = key
        self.port = port
        self.guest_mac = guest_mac
        #: Where the host socket connects (after policy: the gateway is 127.0.0.1).
        self.host = host
        self.host_port = host_port
        self.dns = False
        #: The forward a host-opened flow came in on (None: the guest opened it).
        self.forward_id: str | None = None
        self.state = CONNECTING
        self.created = now
        self.last_active = now
        #: Driver's own per-flow data (socket, loop timer).
        self.io_data: Any = None
        # guest -> host
        self.guest_isn = guest_isn
        self.rcv_nxt = (guest_isn + 1) & SEQ_MASK
        #: Window last advertised to the guest, in bytes, and as the scaled header field.
        self.rcv_wnd = 0
        self.wnd_field = 0
        self.guest_fin = False
        self.host_writable = True
        self.ack_pending = False
        #: Host reading deferred to the end of the loop turn; the flow is on the flush list.
        self.pump_pending = False
        #: Pooled frames offered to the next host read (adapts to the reads; see ``_pump``).
        self.read_frames = 2
        self.deferred = False
        #: When a held ACK goes out bare (only while ``ack_pending``; see ``DELACK_S``).
        self.delack_deadline: float | None = None
        self.wnd_check_deadline: float | None = None
        self.wnd_check_interval = WND_CHECK_MIN_S
        # host -> guest
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = (iss + 1) & SEQ_MASK
        self.snd_wnd = 0
        self.snd_wl1 = guest_isn
        self.snd_wl2 = iss
        self.guest_wscale = 0
        self.wscale_ok = False
        self.mss = DEFAULT_MSS
        self.unacked = bytearray()
        self.host_readable = False
        self.host_eof = False
        self.fin_sent = False
        self.fin_acked = False
        # retransmission
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = RTO_INITIAL_S
        self.rto_deadline: float | None = None
        self.rtt_seq: int | None = None
        self.rtt_time = 0.0
        self.retries = 0
        self.dupacks = 0
        self.in_recovery = False
        self.recover = iss
        self.persist_deadline: float | None = None
        self.persist_interval = PERSIST_MIN_S
        self.connect_deadline: float | None = now + CONNECT_TIMEOUT_S
        self.reap_deadline: float | None = None
        self.bytes_to_host = 0
        self.bytes_to_guest = 0

    @property
    def state_name(self) -> str:
        """The state, with half-closes spelled out as RFC 9293 would name them (for stats)."""
        if self.state != ESTABLISHED:
            return STATE_NAMES[self.state]
        if self.guest_fin and self.fin_sent:
            return "LAST_ACK" if not self.fin_acked else "CLOSING"
        if self.guest_fin:
            return "CLOSE_WAIT"
        if self.fin_sent:
            return "FIN_WAIT"
        return "ESTABLISHED"

    def info(self, now: float) -> dict[str, object]:
        """The flow as the stats API shows it."""
        return {
            "proto": "tcp",
            "origin": "guest" if self.forward_id is None else "host",
            "forward": self.forward_id,
            "guest": f"{_ip(self.guest_ip)}:{self.guest_port}",
            "dst": f"{_ip(self.dst_ip)}:{self.dst_port}",
            "host": f"{self.host}:{self.host_port}",
            "state": self.state_name,
            "bytes_to_host": self.bytes_to_host,
            "bytes_to_guest": self.bytes_to_guest,
            "unacked": len(self.unacked),
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_active, 3),
        }


def _ip(packed: bytes) -> str:
    return ".".join(str(b) for b in packed)


class _DnsTcp:
    """The classifier's ``dns_tcp`` handler: the same translation, toward the DNS upstream."""

    __slots__ = ("nat",)

    def __init__(self, nat: TcpNat) -> None:
        self.nat = nat

    def handle_tcp(self, pkt: IpPacket, now: float) -> None:
        self.nat.handle_segment(pkt, now, dns=True)


class TcpNat:
    """Every TCP flow of one instance: the classifier's ``tcp_nat`` handler."""

    def __init__(
        self,
        config: Config,
        pool: FramePool,
        counters: Counters,
        policy: Policy,
        io: TcpIo | None = None,
        dns_upstream: Callable[[], tuple[str, int] | None] | None = None,
        isn: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        self.policy = policy
        #: The I/O driver; set before the first segment arrives.
        self.io: TcpIo = io  # type: ignore[assignment]
        #: Where DNS over TCP goes (None: refused with RST).
        self.dns_upstream = dns_upstream
        self._isn = isn if isn is not None else (lambda: random.getrandbits(32))
        self.table: FlowTable[TcpFlow] = FlowTable(config.max_flows)
        self.dns_handler = _DnsTcp(self)
        #: The MSS we announce: what one guest-link frame carries.
        self.our_mss = config.mtu - IPV4_HLEN - TCP_HLEN
        self._mac = config.mac
        self._ident = 0
        self._ack_list: list[TcpFlow] = []
        self._flush_requested = False
        #: The time of the event being handled (entry points set it; helpers read it).
        self._now = 0.0
        #: Last source port given to a forwarded connection (see :meth:`_forward_port`).
        self._fwd_port = FORWARD_PORT_MIN + random.randrange(FORWARD_PORT_MAX - FORWARD_PORT_MIN)

    # -- entry points -------------------------------------------------------------------------

    def handle_tcp(self, pkt: IpPacket, now: float) -> None:
        """A guest segment for the NAT (the classifier verified the checksum)."""
        self.handle_segment(pkt, now, dns=False)

    def handle_segment(self, pkt: IpPacket, now: float, dns: bool) -> None:
        """One guest segment; ``dns``: it was addressed to port 53 on the DNS/gateway address."""
        self._now = now
        l4 = pkt.l4
        sport, dport, seq, ack, off_byte, flags, window = _TCP_HDR.unpack_from(l4, 0)
        hlen = (off_byte >> 4) * 4
        ip = pkt.ip
        key = (ip.src, sport, ip.dst, dport)
        flow = self.table.get(key)
        if flow is None:
            if flags & (SYN | ACK | RST | FIN) == SYN:
                self._open(pkt, key, l4, hlen, seq, now, dns)
            else:
                self._no_flow(pkt, key, l4, hlen, seq, ack, flags)
            return
        if flags & SYN and flags & (FIN | RST):
            self.counters.inc("tcp.segment.bad_flags")
            return
        state = flow.state
        if state == ESTABLISHED:
            self._established(flow, l4, hlen, seq, ack, flags, window, now)
        elif state == SYN_RCVD:
            self._syn_rcvd(flow, l4, hlen, seq, ack, flags, window, now)
        elif state == CONNECTING:
            self._connecting(flow, seq, flags)
        elif state == SYN_SENT:
            self._syn_sent(flow, l4, hlen, seq, ack, flags, window, now)
        else:
            self._closed(flow, pkt, key, l4, hlen, seq, ack, flags, now, dns)
        if flow.state != CLOSED or flow.reap_deadline is not None:
            self._arm(flow)

    def handle_fast(
        self,
        l4: memoryview,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        hlen: int,
        flags: int,
        window: int,
        now: float,
    ) -> bool:
        """The classifier's fast path (``tcp_fast``): a guest segment already parsed and
        checked, taken only for an established flow, as :meth:`handle_segment` would take it.
        False: not taken, nothing changed (the segment goes the ordinary way)."""
        flow = self.table.get((src, sport, dst, dport))
        if flow is None or flow.state != ESTABLISHED or (flags & SYN and flags & (FIN | RST)):
            return False
        self._now = now
        self._established(flow, l4, hlen, seq, ack, flags, window, now)
        if flow.state != CLOSED or flow.reap_deadline is not None:
            self._arm(flow)
        return True

    def host_connected(self, flow: TcpFlow, err: int, now: float) -> None:
        """The driver: the host connect finished (``err`` 0) or failed (an errno)."""
        self._now = now
        if flow.state != CONNECTING:
            return
        flow.connect_deadline = None
        if err:
            self.counters.inc(_connect_reason(err))
            self._send_rst_to_guest(flow)
            self._drop(flow, reset=False)
            return
        flow.state = SYN_RCVD
        flow.last_active = now
        self._send_syn_ack(flow)
        flow.rto_deadline = now + flow.rto
        self.counters.inc("tcp.connect.ok")
        self._arm(flow)

    def host_readable(self, flow: TcpFlow, now: float) -> None:
        """The driver: the host socket has data, EOF or an error (an edge)."""
        self._now = now
        if flow.state == CLOSED:
            return
        flow.host_readable = True
        if flow.state == ESTABLISHED:
            self._pump(flow, now)
            if flow.state != CLOSED:
                self._arm(flow)

    def host_writable(self, flow: TcpFlow, now: float) -> None:
        """The driver: the host socket's send buffer has room again (an edge)."""
        self._now = now
        if flow.state != ESTABLISHED:
            return
        was_blocked = not flow.host_writable
        flow.host_writable = True
        if not flow.guest_fin and (was_blocked or flow.rcv_wnd < self.our_mss):
            self.counters.inc("tcp.window.update")
            self._send_ack(flow)
            self._arm(flow)

    def flush(self, now: float) -> None:
        """End of a loop turn: send the ACKs coalesced during it."""
        self._now = now
        self._flush_requested = False
        flows, self._ack_list = self._ack_list, []
        for flow in flows:
            flow.deferred = False
            if flow.state == CLOSED:
                continue
            if flow.pump_pending:
                flow.pump_pending = False
                self._pump(flow, now)
                if flow.state == CLOSED:
                    continue
            if flow.ack_pending:
                self._send_ack(flow)
            self._arm(flow)

    def on_timer(self, flow: TcpFlow, now: float) -> None:
        """The driver: a deadline of ``flow`` may have passed."""
        self._now = now
        if flow.reap_deadline is not None and now >= flow.reap_deadline:
            self.table.remove(flow.key, flow)
            flow.reap_deadline = None
            return
        if flow.state == CLOSED:
            # A timer armed for an earlier deadline (RTO of our FIN) fired before the reap:
            # the driver arms lazily, so ask again or the entry is never reaped.
            if flow.reap_deadline is not None:
                self.io.set_timer(flow, flow.reap_deadline)
            return
        if flow.connect_deadline is not None and now >= flow.connect_deadline:
            if flow.state == SYN_SENT:
                # The guest never answered our SYN: the host client sees a reset at once.
                self.counters.inc("tcp.forward.timeout")
                self._drop(flow, reset=True)
                return
            self.counters.inc("tcp.connect.timeout")
            self._send_rst_to_guest(flow)
            self._drop(flow, reset=False)
            return
        if now - flow.last_active >= IDLE_TIMEOUT_S:
            self.counters.inc("tcp.flow.idle_timeout")
            self._abort(flow)
            return
        if flow.rto_deadline is not None and now >= flow.rto_deadline:
            self._on_rto(flow, now)
            if flow.state == CLOSED:
                return
        if flow.persist_deadline is not None and now >= flow.persist_deadline:
            self._on_persist(flow, now)
        if flow.wnd_check_deadline is not None and now >= flow.wnd_check_deadline:
            self._on_wnd_check(flow, now)
        if flow.delack_deadline is not None and now >= flow.delack_deadline:
            flow.delack_deadline = None
            if flow.ack_pending and flow.state == ESTABLISHED:
                self.counters.inc("tcp.ack.delayed")
                self._send_ack(flow)
        self._arm(flow)

    def flows_info(self, now: float) -> list[dict[str, object]]:
        """Every flow, for the stats API."""
        return [flow.info(now) for flow in self.table]

    #: The name the control API looks for on the classifier's services (``GET /flows``).
    flows = flows_info

    def counts_by_state(self) -> dict[str, int]:
        """How many flows are in each state."""
        out: dict[str, int] = {}
        for flow in self.table:
            name = flow.state_name
            out[name] = out.get(name, 0) + 1
        return out

    def close_all(self) -> None:
        """Shutdown: close every host socket (with RST) and forget every flow."""
        for flow in self.table:
            self.io.close(flow, True)
            self.io.set_timer(flow, None)
            flow.state = CLOSED
            self.table.remove(flow.key, flow)

    # -- opening ------------------------------------------------------------------------------

    def _open(
        self,
        pkt: IpPacket,
        key: FlowKey,
        l4: memoryview,
        hlen: int,
        seq: int,
        now: float,
        dns: bool,
    ) -> None:
        counters = self.counters
        opts = parse_tcp_options(l4, hlen)
        if dns:
            target = self.dns_upstream() if self.dns_upstream is not None else None
            if target is None:
                counters.inc("tcp.dns.no_upstream")
                self._rst_for_syn(pkt, key, seq)
                return
            host, host_port = target
        else:
            verdict = self.policy.destination(key[2])
            if verdict.host is None:
                counters.inc("tcp." + verdict.reason)
                self._rst_for_syn(pkt, key, seq)
                return
            host, host_port = verdict.host, key[3]
        if self.table.full:
            counters.inc("tcp.syn.table_full")
            self._rst_for_syn(pkt, key, seq)
            return
        flow = TcpFlow(key, pkt.port, pkt.src_mac, host, host_port, seq, self._isn(), now)
        flow.dns = dns
        if opts.mss:
            flow.mss = min(opts.mss, self.our_mss)
        else:
            flow.mss = min(DEFAULT_MSS, self.our_mss)
        if opts.wscale is not None:
            flow.wscale_ok = True
            flow.guest_wscale = opts.wscale
        err = self.io.connect(flow)
        if err:
            counters.inc(_connect_reason(err))
            self._rst_for_syn(pkt, key, seq)
            return
        self.table.add(key, flow)
        counters.inc("tcp.syn.dns" if dns else "tcp.syn.accepted")
        self._arm(flow)

    def _connecting(self, flow: TcpFlow, seq: int, flags: int) -> None:
        if flags & RST:
            if seq == flow.rcv_nxt:
                self.counters.inc("tcp.guest.rst")
                self._drop(flow, reset=True)
            else:
                self.counters.inc("tcp.segment.rst_out_of_window")
            return
        if flags & SYN and not flags & ACK:
            self.counters.inc("tcp.syn.retransmit_absorbed")
            return
        self.counters.inc("tcp.segment.while_connecting")

    def _syn_rcvd(
        self,
        flow: TcpFlow,
        l4: memoryview,
        hlen: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        now: float,
    ) -> None:
        if flags & RST:
            if seq == flow.rcv_nxt:
                self.counters.inc("tcp.guest.rst")
                self._drop(flow, reset=True)
            else:
                self.counters.inc("tcp.segment.rst_out_of_window")
            return
        if flags & SYN:
            if not flags & ACK and seq == flow.guest_isn:
                self.counters.inc("tcp.syn.retransmit")
                self._send_syn_ack(flow)
            else:
                self.counters.inc("tcp.segment.bad_syn")
            return
        if not flags & ACK:
            self.counters.inc("tcp.segment.no_ack")
            return
        if ack != flow.snd_nxt:
            self.counters.inc("tcp.segment.bad_ack")
            self._emit(
                flow.port,
                flow.guest_mac,
                flow.dst_ip,
                flow.dst_port,
                flow.guest_ip,
                flow.guest_port,
                ack,
                0,
                RST,
                0,
            )
            return
        flow.state = ESTABLISHED
        flow.snd_una = ack
        flow.snd_wnd = window << flow.guest_wscale
        flow.snd_wl1 = seq
        flow.snd_wl2 = ack
        flow.rto_deadline = None
        flow.retries = 0
        flow.rto = RTO_INITIAL_S
        self.counters.inc("tcp.flow.established")
        self._established(flow, l4, hlen, seq, ack, flags, window, now)
        if flow.state == ESTABLISHED and flow.host_readable:
            self._pump(flow, now)

    def _closed(
        self,
        flow: TcpFlow,
        pkt: IpPacket,
        key: FlowKey,
        l4: memoryview,
        hlen: int,
        seq: int,
        ack: int,
        flags: int,
        now: float,
        dns: bool,
    ) -> None:
        """A segment for a flow that lingers after both directions closed."""
        if flags & (SYN | ACK | RST) == SYN:
            self.table.remove(key, flow)
            self.io.set_timer(flow, None)
            flow.reap_deadline = None
            self._open(pkt, key, l4, hlen, seq, now, dns)
            return
        if flags & RST:
            return
        if flags & FIN or len(l4) > hlen:
            if seq_delta(seq, flow.rcv_nxt) < 0 and len(l4) == hlen:
                self.counters.inc("tcp.segment.fin_retransmit")
                self._send_ack(flow)
            else:
                self.counters.inc("tcp.segment.closed_flow")
                self._no_flow(pkt, key, l4, hlen, seq, ack, flags)
            return
        self.counters.inc("tcp.segment.closed_flow")

    # -- forwarded connections: opened by us toward the guest ------------------------------------

    def open_to_guest(
        self,
        port: Port,
        guest_mac: bytes,
        guest_ip: bytes,
        guest_port: int,
        io_data: Any,
        peer: tuple[str, int],
        forward_id: str,
        now: float,
    ) -> TcpFlow | None:
        """A host client connected to a forward: SYN to ``guest_ip:guest_port``.

        ``io_data`` is the driver's handle on the accepted socket (set on the flow before the
        SYN goes out, so the window can be asked for). ``peer`` is the host client's address
        (for stats). Returns the flow, or None when no flow fits (the caller closes the socket).
        """
        self._now = now
        counters = self.counters
        if self.table.full:
            counters.inc("tcp.forward.table_full")
            return None
        sport = self._forward_port(guest_ip, guest_port)
        if sport is None:
            counters.inc("tcp.forward.no_port")
            return None
        key = (guest_ip, guest_port, self.config.gateway_b, sport)
        flow = TcpFlow(key, port, guest_mac, peer[0], peer[1], 0, self._isn(), now)
        flow.io_data = io_data
        flow.forward_id = forward_id
        flow.state = SYN_SENT
        flow.connect_deadline = now + FORWARD_CONNECT_TIMEOUT_S
        flow.rto = FORWARD_SYN_RTO_S
        flow.rto_deadline = now + flow.rto
        self.table.add(key, flow)
        counters.inc("tcp.forward.syn")
        self._send_syn(flow)
        self._arm(flow)
        return flow

    def _forward_port(self, guest_ip: bytes, guest_port: int) -> int | None:
        """The next source port (as the guest sees it) that no flow to that guest port uses.

        Ports go round the whole range before one is used again, so a 4-tuple the guest may
        still hold in TIME_WAIT comes back as late as possible.
        """
        span = FORWARD_PORT_MAX - FORWARD_PORT_MIN + 1
        gateway = self.config.gateway_b
        port = self._fwd_port
        table = self.table
        for _ in range(span):  # ends early: the table holds far fewer flows than the span
            port = FORWARD_PORT_MIN + (port - FORWARD_PORT_MIN + 1) % span
            if (guest_ip, guest_port, gateway, port) not in table:
                self._fwd_port = port
                return port
        return None

    def _send_syn(self, flow: TcpFlow) -> None:
        """Our SYN to the guest, offering our MSS and window scaling (window unscaled)."""
        flow.wscale_ok = False
        field = self._update_window(flow)
        opts = build_syn_options(self.our_mss, OUR_WSCALE)
        self._emit(
            flow.port,
            flow.guest_mac,
            flow.dst_ip,
            flow.dst_port,
            flow.guest_ip,
            flow.guest_port,
            flow.iss,
            0,
            SYN,
            field,
            self.pool.acquire(),
            0,
            opts,
        )

    def _syn_sent(
        self,
        flow: TcpFlow,
        l4: memoryview,
        hlen: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        now: float,
    ) -> None:
        """The guest's answer to our SYN (RFC 9293 3.10.7.3)."""
        counters = self.counters
        if flags & ACK and ack != flow.snd_nxt:
            if flags & RST:
                counters.inc("tcp.segment.rst_out_of_window")
                return
            # Typically a guest socket still in TIME_WAIT on this 4-tuple answering with its
            # old ACK: our RST clears it, and a SYN right after is accepted (once per flow).
            counters.inc("tcp.forward.bad_ack")
            self._emit(
                flow.port,
                flow.guest_mac,
                flow.dst_ip,
                flow.dst_port,
                flow.guest_ip,
                flow.guest_port,
                ack,
                0,
                RST,
                0,
            )
            if flow.retries == 0:
                flow.retries = 1
                self._send_syn(flow)
            return
        if flags & RST:
            if flags & ACK:
                # Nobody listens there: the host client sees a reset at once.
                counters.inc("tcp.forward.refused")
                self._drop(flow, reset=True)
            else:
                counters.inc("tcp.segment.rst_no_ack")
            return
        if not flags & SYN or not flags & ACK:
            counters.inc("tcp.forward.not_syn_ack")
            return
        opts = parse_tcp_options(l4, hlen)
        flow.guest_isn = seq
        flow.rcv_nxt = (seq + 1) & SEQ_MASK
        flow.mss = min(opts.mss or DEFAULT_MSS, self.our_mss)
        if opts.wscale is not None:
            flow.wscale_ok = True
            flow.guest_wscale = opts.wscale
        flow.state = ESTABLISHED
        flow.connect_deadline = None
        flow.last_active = now
        flow.snd_una = ack
        flow.snd_wnd = window  # never scaled in a SYN segment
        flow.snd_wl1 = seq
        flow.snd_wl2 = ack
        flow.rto_deadline = None
        first_try = flow.retries == 0
        flow.retries = 0
        flow.rto = RTO_INITIAL_S
        if first_try:
            self._rtt_sample(flow, now - flow.created)
        counters.inc("tcp.forward.established")
        self._send_ack(flow)
        if flow.host_readable:
            self._pump(flow, now)

    # -- the established flow, guest side ------------------------------------------------------

    def _established(
        self,
        flow: TcpFlow,
        l4: memoryview,
        hlen: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        now: float,
    ) -> None:
        counters = self.counters
        if flags & RST:
            d = seq_delta(seq, flow.rcv_nxt)
            if d == 0:
                counters.inc("tcp.guest.rst")
                self._drop(flow, reset=True)
            elif 0 < d < max(flow.rcv_wnd, 1):
                counters.inc("tcp.segment.rst_challenge")
                self._send_ack(flow)
            else:
                counters.inc("tcp.segment.rst_out_of_window")
            return
        if flags & SYN:
            counters.inc("tcp.segment.syn_challenge")
            self._send_ack(flow)
            return
        if not flags & ACK:
            counters.inc("tcp.segment.no_ack")
            return
        flow.last_active = now
        payload = l4[hlen:]
        plen = len(payload)
        fin = flags & FIN
        d = seq_delta(seq, flow.rcv_nxt)
        if d != 0:
            if d > 0:
                if d < max(flow.rcv_wnd, 1):
                    counters.inc("tcp.segment.out_of_order")
                    self._on_ack(flow, seq, ack, window, False, now)
                else:
                    counters.inc("tcp.segment.out_of_window")
                if flow.state == ESTABLISHED:
                    self._send_ack(flow)
                return
            if d + plen + (1 if fin else 0) <= 0:
                # All old: a retransmission of what we have, or a window/keep-alive probe.
                counters.inc("tcp.segment.duplicate")
                self._send_ack(flow)
                return
            if -d >= plen:
                payload = payload[plen:]
            else:
                payload = payload[-d:]
            plen = len(payload)
            counters.inc("tcp.segment.trimmed")
        if not self._on_ack(flow, seq, ack, window, plen == 0 and not fin, now):
            return
        if flow.state != ESTABLISHED:
            return
        if plen:
            if flow.guest_fin:
                counters.inc("tcp.segment.after_fin")
                return
            try:
                n = self.io.send(flow, payload)
            except OSError as exc:
                self._host_error(flow, exc)
                return
            if n:
                flow.rcv_nxt = (flow.rcv_nxt + n) & SEQ_MASK
                flow.bytes_to_host += n
            if n < plen:
                flow.host_writable = False
                counters.inc("tcp.host.send_blocked")
                self._send_ack(flow)
                return
        if fin:
            if not flow.guest_fin:
                flow.guest_fin = True
                flow.rcv_nxt = (flow.rcv_nxt + 1) & SEQ_MASK
                counters.inc("tcp.guest.fin")
                try:
                    self.io.shutdown_write(flow)
                except OSError as exc:
                    self._host_error(flow, exc)
                    return
                if not flow.fin_sent:
                    # The host usually closes at once on our shutdown: hold the ACK so that
                    # our FIN carries it (one frame to the guest instead of two).
                    flow.ack_pending = True
                    flow.delack_deadline = now + DELACK_S
                    return
            self._send_ack(flow)
            self._check_done(flow, now)
            return
        if plen:
            if flow.ack_pending:
                # A second segment before the held ACK went out: acknowledge this turn.
                self._defer(flow)
            elif plen < flow.mss:
                # A lone small segment: hold the ACK, the host's answer may carry it.
                flow.ack_pending = True
                flow.delack_deadline = now + DELACK_S
            else:
                flow.ack_pending = True
                self._defer(flow)

    def _defer(self, flow: TcpFlow) -> None:
        """Have :meth:`flush` visit ``flow`` at the end of this loop turn."""
        if not flow.deferred:
            flow.deferred = True
            self._ack_list.append(flow)
        if not self._flush_requested:
            self._flush_requested = True
            self.io.request_flush()

    def _on_ack(
        self, flow: TcpFlow, seq: int, ack: int, window: int, pure: bool, now: float
    ) -> bool:
        """Process the ACK and window of an acceptable segment; False if it must be dropped."""
        snd_una = flow.snd_una
        acked = seq_delta(ack, snd_una)
        flight = seq_delta(flow.snd_nxt, snd_una)
        if acked > flight:
            self.counters.inc("tcp.segment.ack_unsent")
            self._send_ack(flow)
            return False
        wnd = window << flow.guest_wscale
        if acked > 0:
            nbytes = acked
            if flow.fin_sent and ack == flow.snd_nxt:
                flow.fin_acked = True
                nbytes -= 1
            if nbytes:
                del flow.unacked[:nbytes]
            flow.snd_una = ack
            flow.dupacks = 0
            if flow.rtt_seq is not None and seq_delta(ack, flow.rtt_seq) >= 0:
                self._rtt_sample(flow, now - flow.rtt_time)
                flow.rtt_seq = None
            if flow.retries:
                flow.retries = 0
                flow.rto = self._rto_estimate(flow)
            if ack == flow.snd_nxt:
                flow.rto_deadline = None
                flow.in_recovery = False
            else:
                flow.rto_deadline = now + flow.rto
                if flow.in_recovery:
                    if seq_delta(ack, flow.recover) >= 0:
                        flow.in_recovery = False
                    else:
                        self.counters.inc("tcp.retransmit.partial_ack")
                        self._retransmit(flow)
        elif acked == 0 and pure and flight > 0 and wnd == flow.snd_wnd:
            flow.dupacks += 1
            if flow.dupacks == 3 and not flow.in_recovery:
                flow.in_recovery = True
                flow.recover = flow.snd_nxt
                self.counters.inc("tcp.retransmit.fast")
                self._retransmit(flow)
        # RFC 9293 3.10.7.4: take the window from the newest segment only.
        if seq_delta(seq, flow.snd_wl1) > 0 or (
            seq == flow.snd_wl1 and seq_delta(ack, flow.snd_wl2) >= 0
        ):
            flow.snd_wnd = wnd
            flow.snd_wl1 = seq
            flow.snd_wl2 = ack
            if wnd:
                flow.persist_deadline = None
                flow.persist_interval = PERSIST_MIN_S
        if flow.fin_acked:
            self._check_done(flow, now)
            if flow.state != ESTABLISHED:
                return True
        if flow.host_readable and (acked > 0 or wnd) and not flow.pump_pending:
            # Read the host once per loop turn, after every ACK in the batch has opened the
            # window, rather than a segment or two per ACK.
            flow.pump_pending = True
            self._defer(flow)
        return True

    # -- host to guest --------------------------------------------------------------------------

    def _pump(self, flow: TcpFlow, now: float) -> None:
        """Move host data to the guest while its window has room; FIN after host EOF."""
        if flow.host_readable and not flow.host_eof:
            pool = self.pool
            io = self.io
            seg_max = self._seg_max(flow)
            while True:
                flight = seq_delta(flow.snd_nxt, flow.snd_una)
                limit = flow.snd_wnd
                if limit > MAX_UNACKED:
                    limit = MAX_UNACKED
                room = limit - flight
                if room <= 0:
                    if flow.snd_wnd == 0 and flight == 0 and flow.persist_deadline is None:
                        flow.persist_deadline = now + flow.persist_interval
                        self.counters.inc("tcp.window.zero")
                    break
                # One system call fills the payload areas of up to ``read_frames`` pooled
                # frames (adaptive, see below).
                frames: list[Frame] = []
                views: list[memoryview] = []
                batch = flow.read_frames
                asked = 0
                while room > 0 and len(frames) < batch:
                    n = seg_max if room > seg_max else room
                    room -= n
                    asked += n
                    frame = pool.acquire()
                    base = frame.start + HDRS_LEN
                    frames.append(frame)
                    views.append(frame.view[base : base + n])
                try:
                    got = io.recv_into(flow, views)
                except OSError as exc:
                    for frame in frames:
                        pool.release(frame)
                    self._host_error(flow, exc)
                    return
                if got <= 0:
                    for frame in frames:
                        pool.release(frame)
                    flow.host_readable = False
                    if got == 0:
                        flow.host_eof = True
                        self.counters.inc("tcp.host.eof")
                    break
                if flow.rto_deadline is None:
                    flow.rto_deadline = now + flow.rto
                if flow.rtt_seq is None:
                    flow.rtt_seq = (flow.snd_nxt + got) & SEQ_MASK
                    flow.rtt_time = now
                flow.bytes_to_guest += got
                # Size the next read from this one: double while reads fill every buffer (bulk
                # reaches READ_BATCH in a few reads), else twice what this one used. A fixed
                # READ_BATCH cost 64 pool acquires and releases for every 1-byte answer.
                if got >= asked:
                    flow.read_frames = batch * 2 if batch * 2 < READ_BATCH else READ_BATCH
                else:
                    used = got // seg_max + 1
                    flow.read_frames = 2 * used if 2 * used < READ_BATCH else READ_BATCH
                unacked = flow.unacked
                left = got
                for frame, view in zip(frames, views, strict=True):
                    if left <= 0:
                        pool.release(frame)
                        continue
                    take = len(view) if len(view) < left else left
                    left -= take
                    seq = flow.snd_nxt
                    unacked += view[:take]
                    flow.snd_nxt = (seq + take) & SEQ_MASK
                    self._segment(flow, frame, seq, ACK | PSH, take)
                # A short read usually means the socket is drained, but an EOF (or error) may
                # sit behind the data and edge-triggered epoll would not report it again: read
                # on until EAGAIN.
        if flow.host_eof and not flow.fin_sent:
            flow.fin_sent = True
            seq = flow.snd_nxt
            flow.snd_nxt = (seq + 1) & SEQ_MASK
            if flow.rto_deadline is None:
                flow.rto_deadline = now + flow.rto
            self._segment(flow, self.pool.acquire(), seq, FIN | ACK, 0)

    def _seg_max(self, flow: TcpFlow) -> int:
        """Most payload bytes one frame to ``flow``'s guest may carry: one MSS, or for a port
        that takes TCP super-frames as many whole MSS as its limit and a pool slot allow."""
        mss = flow.mss
        cap = flow.port.offload_max
        if cap <= 0:
            return mss
        slot = self.pool.slot_size - HEADROOM - ETH_HLEN
        room = (cap if cap < slot else slot) - IPV4_HLEN - TCP_HLEN
        return max(mss, room - room % mss)

    def _retransmit(self, flow: TcpFlow) -> None:
        """Send the oldest unacknowledged segment again (data, or our FIN)."""
        flow.rtt_seq = None  # Karn: no RTT sample across a retransmission
        pending = len(flow.unacked)
        if pending:
            # Up to a super-frame again where the link takes them: the guest keeps what it
            # already has and acknowledges the rest.
            n = min(self._seg_max(flow), pending)
            frame = self.pool.acquire()
            base = frame.start + HDRS_LEN
            frame.view[base : base + n] = flow.unacked[:n]
            flags = ACK | PSH
            if n == pending and flow.fin_sent:
                flags |= FIN
            self._segment(flow, frame, flow.snd_una, flags, n)
        elif flow.fin_sent and not flow.fin_acked:
            self._segment(flow, self.pool.acquire(), flow.snd_una, FIN | ACK, 0)

    def _on_rto(self, flow: TcpFlow, now: float) -> None:
        flow.rto_deadline = None
        if flow.state != SYN_RCVD and flow.snd_nxt == flow.snd_una:
            return
        flow.retries += 1
        if flow.retries > MAX_RETRANSMITS:
            self.counters.inc("tcp.flow.retransmit_timeout")
            self._abort(flow)
            return
        flow.rto = min(flow.rto * 2, RTO_MAX_S)
        flow.dupacks = 0
        self.counters.inc("tcp.retransmit.timeout")
        if flow.state == SYN_RCVD:
            self._send_syn_ack(flow)
        elif flow.state == SYN_SENT:
            self.counters.inc("tcp.forward.syn_retransmit")
            self._send_syn(flow)
        else:
            flow.in_recovery = True
            flow.recover = flow.snd_nxt
            self._retransmit(flow)
        flow.rto_deadline = now + flow.rto

    def _on_persist(self, flow: TcpFlow, now: float) -> None:
        flow.persist_deadline = None
        if flow.snd_wnd or flow.snd_nxt != flow.snd_una:
            return
        self.counters.inc("tcp.window.probe")
        self._emit(
            flow.port,
            flow.guest_mac,
            flow.dst_ip,
            flow.dst_port,
            flow.guest_ip,
            flow.guest_port,
            (flow.snd_nxt - 1) & SEQ_MASK,
            flow.rcv_nxt,
            ACK,
            flow.wnd_field,
        )
        flow.persist_interval = min(flow.persist_interval * 2, PERSIST_MAX_S)
        flow.persist_deadline = now + flow.persist_interval

    def _rtt_sample(self, flow: TcpFlow, rtt: float) -> None:
        """RFC 6298 section 2."""
        if flow.srtt is None:
            flow.srtt = rtt
            flow.rttvar = rtt / 2
        else:
            flow.rttvar = 0.75 * flow.rttvar + 0.25 * abs(flow.srtt - rtt)
            flow.srtt = 0.875 * flow.srtt + 0.125 * rtt
        flow.rto = self._rto_estimate(flow)

    @staticmethod
    def _rto_estimate(flow: TcpFlow) -> float:
        if flow.srtt is None:
            return RTO_INITIAL_S
        return min(max(flow.srtt + 4 * flow.rttvar, RTO_MIN_S), RTO_MAX_S)

    # -- window toward the guest ---------------------------------------------------------------

    def _update_window(self, flow: TcpFlow) -> int:
        """Recompute the window we advertise from the host socket's room; the header field."""
        if flow.guest_fin:
            return flow.wnd_field
        room = self.io.send_room(flow)
        if room < 0:
            room = 0
        elif room > MAX_WINDOW:
            room = MAX_WINDOW
        shift = OUR_WSCALE if flow.wscale_ok else 0
        field = room >> shift
        if field > 0xFFFF:
            field = 0xFFFF
        flow.wnd_field = field
        flow.rcv_wnd = field << shift
        if flow.rcv_wnd < self.our_mss:
            if flow.wnd_check_deadline is None:
                flow.wnd_check_deadline = self._now + flow.wnd_check_interval
        else:
            flow.wnd_check_deadline = None
            flow.wnd_check_interval = WND_CHECK_MIN_S
        return field

    def _on_wnd_check(self, flow: TcpFlow, now: float) -> None:
        flow.wnd_check_deadline = None
        if flow.guest_fin or flow.state != ESTABLISHED:
            return
        old = flow.rcv_wnd
        self._update_window(flow)
        if flow.rcv_wnd > old:
            self.counters.inc("tcp.window.update")
            self._send_ack(flow, update=False)
        if flow.wnd_check_deadline is not None:
            flow.wnd_check_interval = min(flow.wnd_check_interval * 2, WND_CHECK_MAX_S)
            flow.wnd_check_deadline = now + flow.wnd_check_interval

    # -- endings --------------------------------------------------------------------------------

    def _check_done(self, flow: TcpFlow, now: float) -> None:
        """Both directions closed and our FIN acknowledged: close the socket, linger, reap."""
        if flow.guest_fin and flow.fin_acked and flow.state == ESTABLISHED:
            self.counters.inc("tcp.flow.closed")
            flow.state = CLOSED
            self.io.close(flow, False)
            flow.rto_deadline = flow.persist_deadline = flow.wnd_check_deadline = None
            flow.reap_deadline = now + REAP_DELAY_S
            flow.ack_pending = False
            self.io.set_timer(flow, flow.reap_deadline)

    def _host_error(self, flow: TcpFlow, exc: OSError) -> None:
        """The host socket failed (reset, broken pipe...): reset the guest, drop the flow."""
        name = "reset" if isinstance(exc, ConnectionError) else "error"
        self.counters.inc(f"tcp.host.{name}")
        self._send_rst_to_guest(flow)
        self._drop(flow, reset=False)

    def _abort(self, flow: TcpFlow) -> None:
        """Give up on a flow: RST both ways."""
        self._send_rst_to_guest(flow)
        self._drop(flow, reset=True)

    def _drop(self, flow: TcpFlow, reset: bool) -> None:
        """Forget the flow now, closing its host socket."""
        flow.state = CLOSED
        flow.ack_pending = False
        flow.reap_deadline = None
        self.io.close(flow, reset)
        self.io.set_timer(flow, None)
        self.table.remove(flow.key, flow)

    # -- segments out ---------------------------------------------------------------------------

    def _send_ack(self, flow: TcpFlow, update: bool = True) -> None:
        """A bare ACK with a fresh window."""
        flow.ack_pending = False
        if update:
            self._update_window(flow)
        self._emit(
            flow.port,
            flow.guest_mac,
            flow.dst_ip,
            flow.dst_port,
            flow.guest_ip,
            flow.guest_port,
            flow.snd_nxt,
            flow.rcv_nxt,
            ACK,
            flow.wnd_field,
        )

    def _send_syn_ack(self, flow: TcpFlow) -> None:
        self._update_window(flow)
        opts = build_syn_options(self.our_mss, OUR_WSCALE if flow.wscale_ok else None)
        # The SYN-ACK's window is never scaled (RFC 7323 2.2).
        field = min(flow.rcv_wnd, 0xFFFF)
        frame = self.pool.acquire()
        self._emit(
            flow.port,
            flow.guest_mac,
            flow.dst_ip,
            flow.dst_port,
            flow.guest_ip,
            flow.guest_port,
            flow.iss,
            flow.rcv_nxt,
            SYN | ACK,
            field,
            frame,
            0,
            opts,
        )

    def _send_rst_to_guest(self, flow: TcpFlow) -> None:
        if flow.state == CONNECTING:
            self._emit(
                flow.port,
                flow.guest_mac,
                flow.dst_ip,
                flow.dst_port,
                flow.guest_ip,
                flow.guest_port,
                0,
                flow.rcv_nxt,
                RST | ACK,
                0,
            )
        else:
            self._emit(
                flow.port,
                flow.guest_mac,
                flow.dst_ip,
                flow.dst_port,
                flow.guest_ip,
                flow.guest_port,
                flow.snd_nxt,
                flow.rcv_nxt,
                RST | ACK,
                0,
            )
        self.counters.inc("tcp.rst.sent")

    def _rst_for_syn(self, pkt: IpPacket, key: FlowKey, seq: int) -> None:
        self._emit(
            pkt.port,
            pkt.src_mac,
            key[2],
            key[3],
            key[0],
            key[1],
            0,
            (seq + 1) & SEQ_MASK,
            RST | ACK,
            0,
        )
        self.counters.inc("tcp.rst.sent")

    def _no_flow(
        self,
        pkt: IpPacket,
        key: FlowKey,
        l4: memoryview,
        hlen: int,
        seq: int,
        ack: int,
        flags: int,
    ) -> None:
        """RFC 9293 3.10.7.1: a segment for no connection gets RST, unless it is one."""
        if flags & RST:
            self.counters.inc("tcp.segment.unknown_flow_rst")
            return
        self.counters.inc("tcp.segment.unknown_flow")
        if flags & ACK:
            self._emit(pkt.port, pkt.src_mac, key[2], key[3], key[0], key[1], ack, 0, RST, 0)
        else:
            seg_len = len(l4) - hlen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._emit(
                pkt.port,
                pkt.src_mac,
                key[2],
                key[3],
                key[0],
                key[1],
                0,
                (seq + seg_len) & SEQ_MASK,
                RST | ACK,
                0,
            )
        self.counters.inc("tcp.rst.sent")

    def _segment(self, flow: TcpFlow, frame: Frame, seq: int, flags: int, plen: int) -> None:
        """A data (or FIN) segment whose payload already sits at ``frame.start + HDRS_LEN``.

        More than one MSS of payload makes it a super-frame (only :meth:`_seg_max` allows that,
        for a port that takes them): ``gso_size`` tells the link where the guest's kernel would
        cut it.
        """
        flow.ack_pending = False
        if plen > flow.mss:
            frame.gso_size = flow.mss
        self._emit(
            flow.port,
            flow.guest_mac,
            flow.dst_ip,
            flow.dst_port,
            flow.guest_ip,
            flow.guest_port,
            seq,
            flow.rcv_nxt,
            flags,
            flow.wnd_field,
            frame,
            plen,
        )

    def _emit(
        self,
        port: Port,
        dst_mac: bytes,
        src_ip: bytes,
        sport: int,
        dst_ip: bytes,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        frame: Frame | None = None,
        plen: int = 0,
        options: bytes = b"",
    ) -> None:
        """Write Ethernet, IPv4 and TCP headers in front of the payload and send the frame."""
        if frame is None:
            frame = self.pool.acquire()
        buf = frame.view
        start = frame.start
        _ETH.pack_into(buf, start, dst_mac, self._mac, ETHERTYPE_IPV4)
        hlen = TCP_HLEN + len(options)
        tcp_len = hlen + plen
        ident = self._ident = (self._ident + 1) & 0xFFFF
        tcp_off = build_ipv4(buf, start + ETH_HLEN, src_ip, dst_ip, PROTO_TCP, tcp_len, ident)
        if options:
            # Options go between the header and a payload; only SYN-ACKs carry them (no payload).
            buf[tcp_off + TCP_HLEN : tcp_off + hlen] = options
        _TCP_OUT.pack_into(
            buf, tcp_off, sport, dport, seq, ack & SEQ_MASK, (hlen // 4) << 4, flags, window, 0, 0
        )
        psum = pseudo_header_sum(src_ip, dst_ip, PROTO_TCP, tcp_len)
        if port.offload_max:
            # The link completes checksums: leave the pseudo-header sum for it (NEEDS_CSUM).
            csum = psum
            frame.csum_start = ETH_HLEN + IPV4_HLEN
            frame.csum_offset = 16
        else:
            csum = checksum(buf[tcp_off : tcp_off + tcp_len], psum)
        buf[tcp_off + 16] = csum >> 8
        buf[tcp_off + 17] = csum & 0xFF
        length = ETH_HLEN + IPV4_HLEN + tcp_len
        if length < ETH_ZLEN:
            buf[start + length : start + ETH_ZLEN] = _ZEROS[: ETH_ZLEN - length]
            length = ETH_ZLEN
        frame.length = length
        port.send(frame)

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, flow: TcpFlow) -> None:
        """Tell the driver the flow's next deadline."""
        if flow.state == CLOSED:
            self.io.set_timer(flow, flow.reap_deadline)
            return
        when = flow.last_active + IDLE_TIMEOUT_S
        d = flow.connect_deadline
        if d is not None and d < when:
            when = d
        d = flow.rto_deadline
        if d is not None and d < when:
            when = d
        d = flow.persist_deadline
        if d is not None and d < when:
            when = d
        d = flow.wnd_check_deadline
        if d is not None and d < when:
            when = d
        d = flow.delack_deadline
        if d is not None and d < when and flow.ack_pending:
            when = d
        self.io.set_timer(flow, when)


def _connect_reason(err: int) -> str:
    import errno

    if err == errno.ECONNREFUSED:
        return "tcp.connect.refused"
    if err in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return "tcp.connect.unreachable"
    if err == errno.ETIMEDOUT:
        return "tcp.connect.timeout"
    if err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        return "tcp.connect.no_resources"
    return "tcp.connect.error"
