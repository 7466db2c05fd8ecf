"""What the parts of :class:`~guestnet.core.tcp.TcpNat` share: its state, and the few methods
one part calls in a part defined after it.

``TcpNat`` is one object assembled from one class per concern (segment writing, recovery and
timers, the established path, irregular segments, the handshake), each a subclass of the one
before, so that a call from one part to another is an ordinary method call on ``self``: the
per-segment path pays no extra attribute lookup or indirection for the split. A part may call
anything defined in the parts below it; the calls that go up are declared here (for the type
checker only) and implemented where the comment says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from guestnet.config import Config
from guestnet.core.flows import FlowTable
from guestnet.core.packet import IpPacket
from guestnet.core.policy import Policy
from guestnet.core.tcp.cookies import SynCookies
from guestnet.core.tcp.flow import TcpFlow, TcpIo
from guestnet.counters import Counters
from guestnet.pool import FramePool


class TcpNatBase:
    """The state of every TCP flow of one instance (set by ``TcpNat.__init__``)."""

    config: Config
    pool: FramePool
    counters: Counters
    policy: Policy
    #: The I/O driver; set before the first segment arrives.
    io: TcpIo
    #: Where DNS over TCP goes (None: refused with RST).
    dns_upstream: Callable[[], tuple[str, int] | None] | None
    #: Told when a DNS upstream could not be reached over TCP (refused, unreachable, timed
    #: out), so that ``dns_upstream`` moves on to the next, as the UDP relay does.
    dns_failed: Callable[[tuple[str, int], float], None] | None
    #: Sends the guest an ICMP destination unreachable (datagram, code, from address): how a
    #: SYN an egress rule denies is answered, and one refused by ``--no-host-loopback`` when
    #: ``host_loopback_unreachable``; without it, RST.
    unreachable: Callable[[IpPacket, int, bytes], None] | None
    _isn: Callable[[], int]
    table: FlowTable[TcpFlow]
    #: Flows whose handshake is not complete (CONNECTING, SYN_RCVD, SYN_SENT), oldest first:
    #: bounded by ``config.max_half_open`` (see ``handshake``).
    _half_open: dict[TcpFlow, None]
    #: Flows opened from published ports, oldest first, while their host client has sent
    #: nothing (entries that spoke or closed are dropped lazily): bounded by
    #: ``config.max_silent_forwards`` (see ``handshake``).
    _silent: dict[TcpFlow, None]
    #: Makes and checks the SYN cookies that answer SYNs past the half-open bound.
    cookies: SynCookies
    #: The MSS we announce: what one guest-link frame carries.
    our_mss: int
    #: Our MAC address, the source of every frame to the guest.
    _mac: bytes
    #: The last IPv4 identification used.
    _ident: int
    #: Flows to visit in :meth:`flush` at the end of this loop turn.
    _ack_list: list[TcpFlow]
    _flush_requested: bool
    #: The time of the event being handled (entry points set it; helpers read it).
    _now: float
    #: Last source port given to a forwarded connection (see ``_forward_port``).
    _fwd_port: int

    if TYPE_CHECKING:
        # Implemented in established.py.

        def _update_window(self, flow: TcpFlow) -> int:
            """Recompute the window we advertise; the header field."""
            raise NotImplementedError

        def _arm(self, flow: TcpFlow) -> None:
            """Tell the driver the flow's next deadline."""

        # Implemented in handshake.py.

        def _dns_next_upstream(self, flow: TcpFlow, now: float) -> bool:
            """Connect a failed DNS flow to its next upstream; False when none is left."""
            raise NotImplementedError

        def _send_syn(self, flow: TcpFlow) -> None:
            """Our SYN to the guest (a forwarded connection)."""

        def _send_syn_ack(self, flow: TcpFlow) -> None:
            """Our SYN-ACK to the guest (its host connect completed)."""

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
            """A guest segment for a flow waiting for the ACK of our SYN-ACK."""

        # Implemented in irregular.py.

        def _irregular_control(self, flow: TcpFlow, seq: int, flags: int) -> None:
            """An established flow's segment with RST or SYN, or without ACK."""

        def _out_of_sequence(
            self,
            flow: TcpFlow,
            payload: memoryview,
            seq: int,
            ack: int,
            window: int,
            fin: int,
            now: float,
        ) -> memoryview | None:
            """An established flow's segment that does not start at ``rcv_nxt``."""
            raise NotImplementedError
