"""Per-flow state of the TCP translation: the flow record, its states, sequence arithmetic,
the limits and timeouts every part shares, and :class:`TcpIo`, what the core asks of its driver.

A :class:`TcpFlow` holds everything about one guest connection and its host socket and has no
behaviour: the parts of :class:`~guestnet.core.tcp.TcpNat` act on it. Its states are small
integers (compared on every segment); half-closes are flags on top of ``ESTABLISHED``
(``guest_fin``, ``fin_sent``, ``fin_acked``) and :attr:`TcpFlow.state_name` spells them out
as RFC 9293 would.

Options. We announce MSS = MTU - 40 and window scaling (shift ``OUR_WSCALE``) when the guest
offers it, and honour the guest's. No SACK and no timestamps: the guest link is a local,
lossless link (loss only when a test injects it), so SACK's recovery speed and timestamps' RTT
samples and PAWS buy little here, and leaving them out keeps every segment's header 20 bytes
and the retransmit logic simple. Sequence numbers are compared in modular space
(:func:`seq_delta`), so transfers larger than 4 GiB are fine without PAWS.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import Any, Protocol

from guestnet.core.dns import UPSTREAM_TIMEOUT_S
from guestnet.core.flows import FlowKey
from guestnet.core.port import Port
from guestnet.core.tcp.sendq import SendQueue
from guestnet.wire.l3 import IPV4, IPV6, L3Family

# -- limits and timeouts -----------------------------------------------------------------------

#: RFC 5382 REQ-5: an established flow may be idle at least 2 h 4 min.
IDLE_TIMEOUT_S = 7440.0
#: A host connect that has not completed by then is given up (RST to the guest).
CONNECT_TIMEOUT_S = 30.0
#: DNS over TCP: an upstream that has not accepted the connection by then is given up for
#: the next one, as the UDP relay gives up on a silent upstream (core/dns.py).
DNS_CONNECT_TIMEOUT_S = UPSTREAM_TIMEOUT_S
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
#: How long a flow with both directions closed lingers (socket already closed) when we closed
#: first; one the guest closed first is freed as soon as our FIN is acknowledged.
REAP_DELAY_S = 1.0
#: Our window-scale shift: windows up to 8 MiB.
OUR_WSCALE = 7
MAX_WINDOW = 0xFFFF << OUR_WSCALE
#: Host bytes sent to the guest and not yet acknowledged, per flow: the retransmit buffer bound.
MAX_UNACKED = 4 * 1024 * 1024
#: Most frames one host read fills (one ``recvmsg_into`` with that many buffers).
READ_BATCH = 64
#: Most bytes one host read asks for: with TSO super-frames (up to 64 KiB each) 64 frames would
#: be 4 MiB of pool slots touched at once for no gain, one read of 1 MiB costing a system call
#: per 16 super-frames (issue 12: peak RSS). Without offloads 64 frames stay well under it.
READ_BATCH_BYTES = 1 << 20
#: A flow whose host reads are offered this many frames (reads kept filling every buffer: a
#: bulk transfer) asks the driver to keep further data in the host socket (see ``TcpIo.keep``).
KEEP_MIN_FRAMES = 8
#: MSS assumed when the guest's SYN carries none (RFC 9293).
DEFAULT_MSS = 536
#: A forwarded connection's SYN to the guest: first retransmission after this, doubling; the
#: host connection is reset when no SYN-ACK came within ``FORWARD_CONNECT_TIMEOUT_S`` (SYNs at
#: 0, 1 and 3 s: three tries).
FORWARD_SYN_RTO_S = 1.0
FORWARD_CONNECT_TIMEOUT_S = 6.0
#: A flow moved to a guest that came back (issue 15) is probed this often (a keep-alive the
#: guest must answer) until the guest shows it knows the flow, or its return timeout passes.
RETURN_PROBE_S = 1.0
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

#: What :meth:`TcpIo.connect` returns for a connect that completed inside the call (loopback
#: and the host's own addresses finish the handshake within ``connect()``): no errno, and no
#: ``host_connected`` to wait for.
CONNECTED = -1


def seq_delta(a: int, b: int) -> int:
    """``a - b`` in 32-bit sequence space, as a signed number."""
    return ((a - b + 0x80000000) & SEQ_MASK) - 0x80000000


class TcpIo(Protocol):
    """What the TCP core asks of its I/O driver. Every call is about one flow's host socket."""

    def connect(self, flow: TcpFlow) -> int:
        """Start a non-blocking connect to ``flow.host:flow.host_port``: 0 while it runs (the
        driver reports its end with :meth:`TcpNat.host_connected`), :data:`CONNECTED` when it
        already completed (a local destination: the core goes on as if reported at once), or
        an errno when it failed."""

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        """Write ``data``; bytes taken (0 when the buffer is full). Raises OSError on errors."""

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        """Read into ``bufs`` in order (one scatter read): bytes read, 0 at EOF, -1 when
        nothing is there. Raises OSError. A driver that knows the read emptied the queue (a
        short read with no EOF or error pending) clears ``flow.host_readable``: the core then
        reads no more until the driver reports the next edge (:meth:`TcpNat.host_readable`)."""

    def send_room(self, flow: TcpFlow) -> int:
        """Bytes the host socket's send buffer can take now (an estimate)."""

    # Optional (a driver without them keeps the copy in ``flow.unacked``): data sent to the
    # guest left in the host socket until the guest acknowledges it.

    def keep(self, flow: TcpFlow) -> bool:
        """From the next ``recv_into`` on, leave what is read in the host socket (read with
        ``MSG_PEEK`` at a kernel-kept offset, ``SO_PEEK_OFF``); False when it cannot."""

    def discard(self, flow: TcpFlow, nbytes: int) -> None:
        """Drop the oldest ``nbytes`` kept bytes from the host socket (the guest acknowledged
        them). Raises OSError."""

    def reread(self, flow: TcpFlow, bufs: list[memoryview], kept: int) -> int:
        """Read the oldest kept bytes again into ``bufs`` (a retransmission), leaving the next
        ``recv_into`` where it was: ``kept`` bytes past them. Bytes read. Raises OSError."""

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
        "cookie",
        "created",
        "deferred",
        "delack_deadline",
        "dns",
        "dns_tried",
        "dst_ip",
        "dst_port",
        "dupacks",
        "family",
        "fin_acked",
        "fin_sent",
        "forward_id",
        "guest_fin",
        "guest_first",
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
        "keep",
        "kept",
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
        "return_deadline",
        "return_mark",
        "return_until",
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
        "to_discard",
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
        #: The flow's IP version (from its addresses): headers, MSS, where payload sits.
        self.family: L3Family = IPV6 if len(self.guest_ip) == 16 else IPV4
        self.port = port
        self.guest_mac = guest_mac
        #: Where the host socket connects (after policy: the gateway is 127.0.0.1).
        self.host = host
        self.host_port = host_port
        self.dns = False
        #: Opened by an ACK that carried a SYN cookie: the guest already thinks it is open.
        self.cookie = False
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
        #: The guest's FIN came before ours was sent: the guest closed first, so it (not we)
        #: waits in TIME_WAIT, and once our FIN is acknowledged nothing is left to linger for.
        self.guest_first = False
        self.host_writable = True
        self.ack_pending = False
        #: Host reading deferred to the end of the loop turn; the flow is on the flush list.
        self.pump_pending = False
        #: Pooled frames offered to the next host read (adapts to the reads; see ``_pump``);
        #: 0 before the first read.
        self.read_frames = 0
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
        #: Bytes in flight to the guest: the oldest copied here (``unacked``), the newer
        #: ``kept`` in the host socket (``keep``: 0 not asked yet, 1 keeping, -1 refused).
        self.unacked = SendQueue()
        self.keep = 0
        self.kept = 0
        #: Acknowledged bytes still in the host socket, dropped at the end of the loop turn.
        self.to_discard = 0
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
        #: DNS over TCP: the upstreams this flow has tried to connect to, in order.
        self.dns_tried: tuple[tuple[str, int], ...] = ()
        self.reap_deadline: float | None = None
        #: A guest came back and the flow moved to it (``TcpNat.move_guest``): when it is
        #: probed next; ``last_active`` at the move (any guest segment since changes it);
        #: when it is reset unless that happened (None until the first probe tick).
        self.return_deadline: float | None = None
        self.return_mark = 0.0
        self.return_until: float | None = None
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
            "guest": _endpoint(self.guest_ip, self.guest_port),
            "dst": _endpoint(self.dst_ip, self.dst_port),
            "host": f"[{self.host}]:{self.host_port}"
            if ":" in self.host
            else f"{self.host}:{self.host_port}",
            "state": self.state_name,
            "bytes_to_host": self.bytes_to_host,
            "bytes_to_guest": self.bytes_to_guest,
            "unacked": len(self.unacked) + self.kept,
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_active, 3),
        }


def _endpoint(packed: bytes, port: int) -> str:
    return f"{_ip(packed)}:{port}" if len(packed) == 4 else f"[{_ip(packed)}]:{port}"


def _ip(packed: bytes) -> str:
    return ".".join(str(b) for b in packed) if len(packed) == 4 else str(IPv6Address(packed))
