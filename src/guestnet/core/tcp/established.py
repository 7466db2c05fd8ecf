"""The established flow's steady state: the per-segment fast path, in one module.

Everything a data transfer runs per segment, either way, is here (headers are written by
:mod:`guestnet.core.tcp.segment`); the branches a healthy transfer never takes (RST, SYN, a
segment without ACK, out-of-order, out-of-window and duplicate segments) are in
:mod:`guestnet.core.tcp.irregular`, and the retransmission machinery in
:mod:`guestnet.core.tcp.recovery`.

Guest to host. In-order payload goes straight from the guest's frame to the host socket
(``send`` of a memoryview slice); we acknowledge only what the socket took. The window we
advertise is the room in the host socket's send buffer (the driver's ``send_room``), so the
guest is throttled by the host connection and guestnet queues nothing. If ``send`` takes less
than offered (the estimate was generous), we ACK what it took with the current window and wait
for EPOLLOUT to send a window update. ACKs for in-order data are coalesced to one per flow per
loop turn (:meth:`flush`), except that the ACK for a lone segment shorter than the MSS (a
request) is held up to ``DELACK_S`` so that the host's answer carries it (a bare ACK per
request was a quarter of guestnet's work in a 1-byte ping-pong); a second segment sends it that
turn, as a receiver acknowledges at least every other segment (RFC 9293 3.8.6.3). A segment of
an established flow from a link with trusted checksums skips the classifier's general parse and
route: the classifier unpacks Ethernet, IPv4 and TCP headers in one go and calls
:meth:`handle_fast`, which takes it only for an established flow, or for one in SYN_RCVD
(the guest's ACK that ends the handshake: one per connection) (else it goes the ordinary way,
unchanged).

Host to guest. We read the host socket only while the guest's window (and ``MAX_UNACKED``)
has room, straight into the payload area of a pooled frame, write the headers in front and
send it. What was sent stays somewhere until the guest acknowledges it, for retransmission. At
first a copy goes into the flow's bounded ``unacked`` buffer; once a flow's reads keep filling
every buffer offered (``KEEP_MIN_FRAMES``: a bulk transfer) it asks the driver to leave the
data in the host socket instead (``TcpIo.keep``: reads peek at an offset the kernel keeps, as
passt does), which saves that copy of every byte. The oldest bytes in flight are then in
``unacked`` (copied before the switch) and the rest, ``kept``, in the socket; an ACK releases
the oldest first, and what it releases from the socket is dropped there (``TcpIo.discard``)
once per loop turn, in :meth:`flush`, or before the socket is closed (unread data would make
the close an RST). A request/response flow never switches: it would pay a discard per request.
The driver registers host sockets edge-triggered: ``host_readable`` remembers an edge we could
not act on yet (window full), and we read until EAGAIN (an EOF can hide behind a short read).

Close. A FIN either way is a half-close passed on: the guest's FIN becomes ``shutdown(SHUT_WR)``
on the host once its data is written; host EOF becomes our FIN once everything read is sent.
When both directions are closed and our FIN is acknowledged the host socket is closed at once.
Who closed first decides what is left. Where the guest did (its FIN came before ours was sent,
``guest_first``: connect, request, close, as a client does) we are where a kernel is in
LAST_ACK: our FIN acknowledged, the guest in TIME_WAIT holding the 4-tuple, nothing more to
answer; the flow is freed at once (no timer, no table entry left: under connection churn a
lingering flow per connection cost a timer set and fired and a table entry for a second).
Where we did (host EOF first, or both at once), the guest may still retransmit its FIN until
it hears our ACK: the flow lingers ``REAP_DELAY_S`` without a socket, answering such a FIN,
before it is reaped. Either way no TIME_WAIT holds a descriptor.
"""

from __future__ import annotations

from guestnet.core.tcp.flow import (
    CLOSED,
    DELACK_S,
    ESTABLISHED,
    IDLE_TIMEOUT_S,
    KEEP_MIN_FRAMES,
    MAX_UNACKED,
    MAX_WINDOW,
    OUR_WSCALE,
    PERSIST_MIN_S,
    READ_BATCH,
    READ_BATCH_BYTES,
    REAP_DELAY_S,
    SEQ_MASK,
    SYN_RCVD,
    WND_CHECK_MIN_S,
    TcpFlow,
    seq_delta,
)
from guestnet.core.tcp.recovery import _Recovery, _silent_deadline
from guestnet.pool import Frame
from guestnet.wire.tcp import ACK, FIN, PSH, RST, SYN, TCP_HLEN

#: Flags that take a segment off the steady-state path (with a missing ACK).
_RST_SYN = RST | SYN
#: Frames holding this many payload bytes or more are read one per answer that fits in them.
BIG_FRAME = 16384


class _Established(_Recovery):
    """Segments of established flows, host reads and the end-of-turn flush."""

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
        checked, taken only for an established flow or one waiting for the ACK of our SYN-ACK
        (the last of every handshake), as :meth:`handle_segment` would take it. False: not
        taken, nothing changed (the segment goes the ordinary way)."""
        flow = self.table.lookup((src, sport, dst, dport))
        if flow is None or (flags & SYN and flags & (FIN | RST)):
            return False
        state = flow.state
        self._now = now
        if state == ESTABLISHED:
            self._established(flow, l4, hlen, seq, ack, flags, window, now)
        elif state == SYN_RCVD:
            self._syn_rcvd(flow, l4, hlen, seq, ack, flags, window, now)
        else:
            return False
        if flow.state != CLOSED or flow.reap_deadline is not None:
            self._arm(flow)
        return True

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
        if flow.guest_fin:
            return
        if not was_blocked:
            if flow.rcv_wnd >= self.our_mss:
                return
            # A window below one MSS (a fresh socket's buffer is smaller than a 64 KiB MTU's
            # MSS): an update only if it grew. Edge-triggered epoll reports EPOLLOUT with every
            # read event on a writable socket, and an ACK repeating the window is a frame for
            # nothing (one per forwarded connection, at the host client's EOF).
            old = flow.rcv_wnd
            self._update_window(flow)
            if flow.rcv_wnd <= old:
                return
        else:
            self._update_window(flow)
        self.counters.inc("tcp.window.update")
        self._send_ack(flow, update=False)
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
            if flow.to_discard:
                self._discard(flow)
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
        """A segment of an established flow: in steady state an in-order ACK, with or without
        data or FIN; anything else goes to ``_irregular_control`` or ``_out_of_sequence``."""
        if flags & _RST_SYN or not flags & ACK:
            self._irregular_control(flow, seq, flags)
            return
        flow.last_active = now
        payload = l4[hlen:]
        fin = flags & FIN
        if seq != flow.rcv_nxt:  # both are 32-bit: seq_delta(seq, flow.rcv_nxt) != 0
            trimmed = self._out_of_sequence(flow, payload, seq, ack, window, fin, now)
            if trimmed is None:
                return
            payload = trimmed
        plen = len(payload)
        counters = self.counters
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
                if not flow.fin_acked:
                    # (With our FIN acknowledged the socket is closed just below, which sends
                    # the host its FIN: a shutdown first would be a system call for nothing.)
                    try:
                        self.io.shutdown_write(flow)
                    except OSError as exc:
                        self._host_error(flow, exc)
                        return
                if not flow.fin_sent:
                    flow.guest_first = True
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
        # seq_delta(ack, snd_una) and seq_delta(snd_nxt, snd_una), inline (every segment).
        acked = ((ack - snd_una + 0x80000000) & SEQ_MASK) - 0x80000000
        flight = ((flow.snd_nxt - snd_una + 0x80000000) & SEQ_MASK) - 0x80000000
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
                if flow.kept:
                    self._release(flow, nbytes)
                else:
                    flow.unacked.drop(nbytes)
            flow.snd_una = ack
            flow.dupacks = 0
            rtt_seq = flow.rtt_seq
            # seq_delta(ack, rtt_seq) >= 0, inline
            if rtt_seq is not None and (ack - rtt_seq) & SEQ_MASK < 0x80000000:
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
        wl1 = flow.snd_wl1
        if (0 < (seq - wl1) & SEQ_MASK < 0x80000000) or (
            seq == wl1 and seq_delta(ack, flow.snd_wl2) >= 0
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

    def _release(self, flow: TcpFlow, nbytes: int) -> None:
        """The guest acknowledged ``nbytes`` of a flow keeping data in the host socket: the
        oldest from ``unacked``, the rest dropped from the socket at the end of the turn."""
        unacked = flow.unacked
        copied = len(unacked)
        if copied:
            if nbytes <= copied:
                del unacked[:nbytes]
                return
            del unacked[:]
            nbytes -= copied
        flow.kept -= nbytes
        flow.to_discard += nbytes
        self._defer(flow)

    def _start_keeping(self, flow: TcpFlow) -> None:
        """Ask the driver to keep further host data in the socket (once per flow)."""
        keep = getattr(self.io, "keep", None)
        flow.keep = 1 if keep is not None and keep(flow) else -1
        if flow.keep > 0:
            self.counters.inc("tcp.host.keep")

    # -- host to guest --------------------------------------------------------------------------

    def _pump(self, flow: TcpFlow, now: float) -> None:
        """Move host data to the guest while its window has room; FIN after host EOF."""
        if flow.host_readable and not flow.host_eof:
            pool = self.pool
            io = self.io
            seg_max = self._seg_max(flow)
            most = READ_BATCH_BYTES // seg_max or 1
            hdrs = flow.family.l4_off + TCP_HLEN  # hdrs_len(flow.family), inline
            while True:
                # seq_delta(snd_nxt, snd_una), inline: this runs for every host read.
                flight = ((flow.snd_nxt - flow.snd_una + 0x80000000) & SEQ_MASK) - 0x80000000
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
                batch = flow.read_frames
                if batch >= most:
                    batch = most
                elif not batch:
                    # A flow's first read: one super-frame takes any answer that fits it (one
                    # ``recv`` into one pool frame, as below); smaller frames, two.
                    batch = 1 if seg_max >= BIG_FRAME else 2
                if batch >= KEEP_MIN_FRAMES and not flow.keep:
                    self._start_keeping(flow)
                keeping = flow.keep > 0
                if batch == 1 or room <= seg_max:
                    # One frame (a request's answer, at any MTU with super-frames): no lists
                    # of frames to build and walk, the same reads and segments as below.
                    asked = seg_max if room > seg_max else room
                    frame = pool.acquire()
                    base = frame.start + hdrs
                    view = frame.view[base : base + asked]
                    try:
                        got = io.recv_into(flow, [view])
                    except OSError as exc:
                        pool.release(frame)
                        self._host_error(flow, exc)
                        return
                    if got <= 0:
                        pool.release(frame)
                        self._host_gone(flow, got)
                        break
                    self._read_done(flow, got, asked, batch, seg_max, now)
                    seq = flow.snd_nxt
                    if keeping:
                        flow.kept += got
                    else:
                        flow.unacked += view[:got]
                    flow.snd_nxt = (seq + got) & SEQ_MASK
                    self._segment(flow, frame, seq, ACK | PSH, got)
                else:
                    frames: list[Frame] = []
                    views: list[memoryview] = []
                    asked = 0
                    while room > 0 and len(frames) < batch:
                        n = seg_max if room > seg_max else room
                        room -= n
                        asked += n
                        frame = pool.acquire()
                        base = frame.start + hdrs
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
                        self._host_gone(flow, got)
                        break
                    self._read_done(flow, got, asked, batch, seg_max, now)
                    unacked = flow.unacked
                    if keeping:
                        flow.kept += got
                    left = got
                    for frame, view in zip(frames, views, strict=True):
                        if left <= 0:
                            pool.release(frame)
                            continue
                        take = len(view) if len(view) < left else left
                        left -= take
                        seq = flow.snd_nxt
                        if not keeping:
                            unacked += view[:take]
                        flow.snd_nxt = (seq + take) & SEQ_MASK
                        self._segment(flow, frame, seq, ACK | PSH, take)
                if not flow.host_readable:
                    # The driver knows this read emptied the queue (see TcpIo.recv_into).
                    break
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

    def _host_gone(self, flow: TcpFlow, got: int) -> None:
        """A read found nothing: the queue was empty (``got`` < 0) or the host sent EOF (0)."""
        flow.host_readable = False
        if got == 0:
            flow.host_eof = True
            self.counters.inc("tcp.host.eof")

    @staticmethod
    def _read_done(
        flow: TcpFlow, got: int, asked: int, batch: int, seg_max: int, now: float
    ) -> None:
        """A read of ``got`` bytes into ``batch`` frames of ``asked`` bytes in all: arm the RTO,
        start an RTT sample, count, and size the next read from this one."""
        if flow.rto_deadline is None:
            flow.rto_deadline = now + flow.rto
        if flow.rtt_seq is None:
            flow.rtt_seq = (flow.snd_nxt + got) & SEQ_MASK
            flow.rtt_time = now
        flow.bytes_to_guest += got
        # Double while reads fill every buffer (bulk reaches READ_BATCH in a few reads), else
        # twice what this one used. A fixed READ_BATCH cost 64 pool acquires and releases for
        # every 1-byte answer.
        if got >= asked:
            flow.read_frames = batch * 2 if batch * 2 < READ_BATCH else READ_BATCH
        else:
            # Frames of 16 KiB or more (super-frames, a 64 KiB MTU): as many as this read
            # used, one for any answer that fits one (a single ``recv`` into one pool frame
            # per request); smaller ones, twice as many.
            used = got // seg_max + 1
            if seg_max < BIG_FRAME:
                used *= 2
            flow.read_frames = used if used < READ_BATCH else READ_BATCH

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

    # -- both directions closed ----------------------------------------------------------------

    def _check_done(self, flow: TcpFlow, now: float) -> None:
        """Both directions closed and our FIN acknowledged: close the socket, linger, reap."""
        if flow.guest_fin and flow.fin_acked and flow.state == ESTABLISHED:
            if flow.to_discard:
                # Unread data in the socket would turn the close into an RST.
                self._discard(flow)
                if flow.state == CLOSED:
                    return
            self.counters.inc("tcp.flow.closed")
            flow.state = CLOSED
            flow.unacked.release()
            self.io.close(flow, False)
            flow.rto_deadline = flow.persist_deadline = flow.wnd_check_deadline = None
            flow.ack_pending = False
            if flow.guest_first:
                # LAST_ACK -> CLOSED: the guest closed first and has our FIN; it lingers in
                # TIME_WAIT and will send nothing more that needs an answer. Freed now.
                flow.reap_deadline = None
                self.io.set_timer(flow, None)
                self.table.remove(flow.key, flow)
                return
            flow.reap_deadline = now + REAP_DELAY_S
            self.io.set_timer(flow, flow.reap_deadline)

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, flow: TcpFlow) -> None:
        """Tell the driver the flow's next deadline."""
        if flow.state == CLOSED:
            self.io.set_timer(flow, flow.reap_deadline)
            return
        when = flow.last_active + IDLE_TIMEOUT_S
        if flow.forward_id is not None and not flow.bytes_to_guest:
            silent = _silent_deadline(flow, self.config.forward_silent_timeout)
            if silent < when:
                when = silent
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
        d = flow.return_deadline
        if d is not None and d < when:
            when = d
        self.io.set_timer(flow, when)
