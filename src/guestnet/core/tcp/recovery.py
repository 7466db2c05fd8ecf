"""Recovery, timers and endings of the TCP translation.

Host to guest, every byte sent stays until the guest acknowledges it: copied in the flow's bounded
``unacked`` buffer, or (a bulk flow, see ``established``) kept in the host socket, where a
retransmission reads it again from the oldest byte (``TcpIo.reread``). Retransmission: RTO per RFC
6298 (initial 1 s, floor 200 ms, exponential backoff, Karn's rule), fast retransmit on three
duplicate ACKs with NewReno partial-ACK recovery (each partial ACK retransmits the next hole at
once; the ACK processing that counts them is on the established path). There is no congestion
window: the path is one local link. A zero window is probed (persist timer, probes with ``seq =
snd_nxt - 1`` that make the guest answer with its window, backing off to 60 s). A window we
advertised below one MSS is re-checked on a short timer (``WND_CHECK_*``), because a send buffer
that drains without an earlier EAGAIN raises no EPOLLOUT.

Every deadline of a flow (connect, RTO, persist, window check, delayed ACK, idle, return probe,
reap) is a field on it; the driver holds one timer per flow, armed for the earliest, and
:meth:`on_timer` sees which have passed.

Endings. An RST either way tears down both: the guest's RST closes the host socket with
SO_LINGER 0 so the host peer sees an RST; a host reset (ECONNRESET, EPIPE) sends RST to the
guest. An established flow idle for ``IDLE_TIMEOUT_S`` (2 h 4 min, RFC 5382) is reset both
ways; so is one whose guest stops acknowledging for ``MAX_RETRANSMITS`` timeouts in a row.

Guests that come back (issue 15). A flow follows its guest's MAC to a new port
(``TcpNat.move_guest``), but the same MAC is not always the same stack: a QEMU that reconnects
keeps its guest, one killed and started again boots a new kernel that knows none of the old
flows. So a moved flow is probed with keep-alives until its guest sends a segment on it (kept);
a new stack answers the probe with an RST, which resets the flow both ways; no answer within
``config.guest_return_timeout`` resets it too. An idle host connection of the old guest thus
ends within that bound instead of hanging until the idle timeout.
"""

from __future__ import annotations

from guestnet.core.tcp.flow import (
    CLOSED,
    ESTABLISHED,
    IDLE_TIMEOUT_S,
    MAX_RETRANSMITS,
    PERSIST_MAX_S,
    RETURN_PROBE_S,
    RTO_INITIAL_S,
    RTO_MAX_S,
    RTO_MIN_S,
    SEQ_MASK,
    SYN_RCVD,
    SYN_SENT,
    WND_CHECK_MAX_S,
    TcpFlow,
)
from guestnet.core.tcp.segment import _SegmentWriter, hdrs_len
from guestnet.wire.tcp import ACK, FIN, PSH


class _Recovery(_SegmentWriter):
    """Retransmission, probes, timers and the ways a flow ends."""

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
            if flow.dns and self._dns_next_upstream(flow, now):
                return
            self._send_rst_to_guest(flow)
            self._drop(flow, reset=False)
            return
        if _silent_deadline(flow, self.config.forward_silent_timeout) <= now:
            self.counters.inc("tcp.forward.silent_timeout")
            self._silent.pop(flow, None)
            self._abort(flow)
            return
        if now - flow.last_active >= IDLE_TIMEOUT_S:
            self.counters.inc("tcp.flow.idle_timeout")
            self._abort(flow)
            return
        if flow.return_deadline is not None and now >= flow.return_deadline:
            self._on_return_probe(flow, now)
            if flow.state == CLOSED:
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

    def _retransmit(self, flow: TcpFlow) -> None:
        """Send the oldest unacknowledged segment again (data, or our FIN)."""
        flow.rtt_seq = None  # Karn: no RTT sample across a retransmission
        unacked = flow.unacked
        copied = len(unacked)
        pending = copied + flow.kept
        if pending:
            # Up to a super-frame again where the link takes them: the guest keeps what it
            # already has and acknowledges the rest.
            n = min(self._seg_max(flow), pending)
            frame = self.pool.acquire()
            view = frame.view
            base = frame.start + hdrs_len(flow.family)
            if n <= copied:
                view[base : base + n] = unacked[:n]
            else:
                view[base : base + copied] = unacked[:copied]
                got = self._reread(flow, view[base + copied : base + n])
                if got < 0:
                    self.pool.release(frame)
                    return
                n = copied + got
            flags = ACK | PSH
            if n == pending and flow.fin_sent:
                flags |= FIN
            self._segment(flow, frame, flow.snd_una, flags, n)
        elif flow.fin_sent and not flow.fin_acked:
            self._segment(flow, self.pool.acquire(), flow.snd_una, FIN | ACK, 0)

    def _discard(self, flow: TcpFlow) -> bool:
        """Drop the acknowledged bytes still in the host socket; False when the socket failed
        (the flow is gone)."""
        nbytes = flow.to_discard
        flow.to_discard = 0
        try:
            self.io.discard(flow, nbytes)
        except OSError as exc:
            self._host_error(flow, exc)
            return False
        return True

    def _reread(self, flow: TcpFlow, buf: memoryview) -> int:
        """The oldest kept bytes again, from the host socket, into ``buf``: bytes read, or -1
        when the socket failed (the flow is gone)."""
        # Acknowledged bytes still ahead of them: drop them first.
        if flow.to_discard and not self._discard(flow):
            return -1
        try:
            got = self.io.reread(flow, [buf], flow.kept)
        except OSError as exc:
            self._host_error(flow, exc)
            return -1
        self.counters.inc("tcp.retransmit.reread")
        return got if got > 0 else 0

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
        self._control(flow, (flow.snd_nxt - 1) & SEQ_MASK, flow.rcv_nxt, ACK, flow.wnd_field)
        flow.persist_interval = min(flow.persist_interval * 2, PERSIST_MAX_S)
        flow.persist_deadline = now + flow.persist_interval

    def _probe_returned(self, flow: TcpFlow) -> None:
        """``flow`` moved to a guest that came back on another port: ask that guest whether
        it knows the flow. A keep-alive (``seq = snd_una - 1``, no data) is answered by the
        same stack with an ACK, by a new one (a VM restarted with the same MAC) with an RST at
        ``rcv_nxt``, which resets the flow both ways. The first tick, due at once (``_now``
        may be stale here: the switch calls without a clock), starts the return timeout."""
        flow.return_mark = flow.last_active
        flow.return_until = None
        flow.return_deadline = self._now
        self.counters.inc("tcp.flow.return_probe")
        self._keepalive(flow)
        self._arm(flow)

    def _on_return_probe(self, flow: TcpFlow, now: float) -> None:
        """A tick of a moved flow: done when the guest has sent a segment on it since the move;
        else probed again every ``RETURN_PROBE_S`` (a rebooting guest answers only once it has
        its address back) and reset both ways once ``config.guest_return_timeout`` passes."""
        until = flow.return_until
        if until is None:
            flow.return_until = now + self.config.guest_return_timeout
            flow.return_deadline = now + RETURN_PROBE_S
            return
        if flow.last_active != flow.return_mark:
            flow.return_deadline = None
            self.counters.inc("tcp.flow.return_confirmed")
            return
        if now >= until:
            flow.return_deadline = None
            self.counters.inc("tcp.flow.return_timeout")
            self._abort(flow)
            return
        self.counters.inc("tcp.flow.return_probe")
        self._keepalive(flow)
        flow.return_deadline = min(now + RETURN_PROBE_S, until)

    def _keepalive(self, flow: TcpFlow) -> None:
        """A keep-alive probe (RFC 9293 3.8.4): an old sequence number and no data, which the
        guest's stack must answer."""
        self._control(flow, (flow.snd_una - 1) & SEQ_MASK, flow.rcv_nxt, ACK, flow.wnd_field)

    def _rtt_sample(self, flow: TcpFlow, rtt: float) -> None:
        """RFC 6298 section 2."""
        if flow.srtt is None:
            flow.srtt = rtt
            flow.rttvar = rtt / 2
        else:
            flow.rttvar = 0.75 * flow.rttvar + 0.25 * abs(flow.srtt - rtt)
            flow.srtt = 0.875 * flow.srtt + 0.125 * rtt
        # _rto_estimate(flow), inline (every RTT sample, one per request/response exchange).
        rto = flow.srtt + 4 * flow.rttvar
        flow.rto = RTO_MIN_S if rto < RTO_MIN_S else RTO_MAX_S if rto > RTO_MAX_S else rto

    @staticmethod
    def _rto_estimate(flow: TcpFlow) -> float:
        srtt = flow.srtt
        if srtt is None:
            return RTO_INITIAL_S
        rto = srtt + 4 * flow.rttvar
        # Clamped with comparisons, not min(max()): this runs on every RTT sample.
        if rto < RTO_MIN_S:
            return RTO_MIN_S
        return RTO_MAX_S if rto > RTO_MAX_S else rto

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
        self._half_open.pop(flow, None)


def _silent_deadline(flow: TcpFlow, timeout: float) -> float:
    """When a flow from a published port is reset for its host client's silence (slowloris):
    ``timeout`` after it was accepted, while the client has sent nothing; else never."""
    if flow.forward_id is None or flow.bytes_to_guest:
        return float("inf")
    return flow.created + timeout
