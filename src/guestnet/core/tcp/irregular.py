"""An established flow's irregular segments: what the fast path hands off and never runs in
a healthy transfer.

RFC 9293 as hardened by RFC 5961: an RST exactly at ``rcv_nxt`` resets the flow both ways (the
host socket is closed with SO_LINGER 0), one elsewhere in the window gets a challenge ACK, one
outside it is ignored; a SYN on an established flow gets a challenge ACK; a segment without
ACK is dropped. Segments beyond ``rcv_nxt`` are dropped (their ACK field is still taken when in
the window) and answered with a duplicate ACK at once: the guest's fast retransmit needs three.
A segment entirely before ``rcv_nxt`` (a retransmission of what we have, a window or keep-alive
probe) gets an ACK; one that overlaps ``rcv_nxt`` is trimmed to its new bytes and goes on.
Everything is counted under ``tcp.segment.*``.
"""

from __future__ import annotations

from guestnet.core.tcp.established import _Established
from guestnet.core.tcp.flow import ESTABLISHED, TcpFlow, seq_delta
from guestnet.wire.tcp import RST, SYN


class _Irregular(_Established):
    """The established flow's cold branches."""

    def _irregular_control(self, flow: TcpFlow, seq: int, flags: int) -> None:
        """An established flow's segment with RST or SYN, or without ACK."""
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
        counters.inc("tcp.segment.no_ack")

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
        """An established flow's segment that does not start at ``rcv_nxt``: the part of
        ``payload`` still to take, or None when the segment is done with (answered)."""
        counters = self.counters
        d = seq_delta(seq, flow.rcv_nxt)
        plen = len(payload)
        if d > 0:
            if d < max(flow.rcv_wnd, 1):
                counters.inc("tcp.segment.out_of_order")
                self._on_ack(flow, seq, ack, window, False, now)
            else:
                counters.inc("tcp.segment.out_of_window")
            if flow.state == ESTABLISHED:
                self._send_ack(flow)
            return None
        if d + plen + (1 if fin else 0) <= 0:
            # All old: a retransmission of what we have, or a window/keep-alive probe.
            counters.inc("tcp.segment.duplicate")
            self._send_ack(flow)
            return None
        counters.inc("tcp.segment.trimmed")
        return payload[plen:] if -d >= plen else payload[-d:]
