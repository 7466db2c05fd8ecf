"""The TCP NAT as other code sees it: :class:`TcpNat`, assembled from its parts, and the
ordinary (classifier-routed) entry for guest segments, which dispatches on the flow's state.
"""

from __future__ import annotations

import random
import secrets
import struct
from collections.abc import Callable

from guestnet.config import Config
from guestnet.core.flows import FlowTable
from guestnet.core.packet import IpPacket
from guestnet.core.policy import Policy
from guestnet.core.port import Port
from guestnet.core.tcp.cookies import SynCookies
from guestnet.core.tcp.flow import (
    CLOSED,
    CONNECTING,
    ESTABLISHED,
    FORWARD_PORT_MAX,
    FORWARD_PORT_MIN,
    SYN_RCVD,
    SYN_SENT,
    TcpIo,
)
from guestnet.core.tcp.handshake import _Handshake
from guestnet.core.tcp.segment import mss_for_mtu
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.tcp import ACK, FIN, RST, SYN

_TCP_HDR = struct.Struct("!HHIIBBH")


class _DnsTcp:
    """The classifier's ``dns_tcp`` handler: the same translation, toward the DNS upstream."""

    __slots__ = ("nat",)

    def __init__(self, nat: TcpNat) -> None:
        self.nat = nat

    def handle_tcp(self, pkt: IpPacket, now: float) -> None:
        self.nat.handle_segment(pkt, now, dns=True)


class TcpNat(_Handshake):
    """Every TCP flow of one instance: the classifier's ``tcp_nat`` handler.

    The parts, each a module of this package and a base class here: ``segment`` (headers out),
    ``recovery`` (retransmission, timers, endings), ``established`` (the per-segment fast path),
    ``irregular`` (its cold branches) and ``handshake`` (opening and refusing flows).
    """

    def __init__(
        self,
        config: Config,
        pool: FramePool,
        counters: Counters,
        policy: Policy,
        io: TcpIo | None = None,
        dns_upstream: Callable[[], tuple[str, int] | None] | None = None,
        isn: Callable[[], int] | None = None,
        dns_failed: Callable[[tuple[str, int], float], None] | None = None,
        unreachable: Callable[[IpPacket, int, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        self.policy = policy
        self.io = io  # type: ignore[assignment]
        self.dns_upstream = dns_upstream
        self.dns_failed = dns_failed
        self.unreachable = unreachable
        self._isn = isn if isn is not None else (lambda: random.getrandbits(32))
        self.table = FlowTable(config.max_flows)
        self._half_open = {}
        self._silent = {}
        self.cookies = SynCookies(secrets.token_bytes(16))
        self.dns_handler = _DnsTcp(self)
        self.our_mss = mss_for_mtu(config.mtu)
        self._mac = config.mac
        self._ident = 0
        self._ack_list = []
        self._flush_requested = False
        self._now = 0.0
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
        key = (pkt.src, sport, pkt.dst, dport)
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

    def move_guest(self, mac: bytes, port: Port) -> int:
        """A guest came back on ``port`` (``Switch.on_return``): its flows now send there, and
        each established one is probed until the guest shows it knows it (a guest restarted
        with the same MAC does not: see ``recovery``).

        Returns how many flows moved. Scans every flow; called only when a known MAC changes
        port, which is rare.
        """
        moved = 0
        for flow in self.table:
            if flow.guest_mac == mac and flow.port is not port:
                flow.port = port
                moved += 1
                if flow.state == ESTABLISHED:
                    self._probe_returned(flow)
        if moved:
            self.counters.inc("nat.tcp.flow.moved", moved)
        return moved

    def reset_port(self, port: Port) -> int:
        """Reset every flow still on ``port``: its guest went away and did not come back in
        time (``Switch.on_depart``; the driver waits first). Returns how many."""
        gone = [flow for flow in self.table if flow.port is port]
        for flow in gone:
            self._abort(flow)
        if gone:
            self.counters.inc("nat.tcp.flow.guest_gone", len(gone))
        return len(gone)

    def has_port(self, port: Port) -> bool:
        """Whether any flow sends to ``port``."""
        return any(flow.port is port for flow in self.table)

    def flows_info(self, now: float) -> list[dict[str, object]]:
        """Every flow, for the API's ``/flows`` (through the driver's ``flows``)."""
        return [flow.info(now) for flow in self.table]

    @property
    def half_open(self) -> int:
        """How many flows have not finished their handshake (bounded by max_half_open)."""
        return len(self._half_open)

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
        self._half_open.clear()
