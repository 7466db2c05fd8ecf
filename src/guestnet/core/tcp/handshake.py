"""Opening and refusing TCP flows: the guest's SYN, our SYN to the guest, and answers for
segments that have no flow.

Open. The guest's SYN starts a non-blocking ``connect`` on the host (the I/O driver does it).
Nothing goes back to the guest until the host connect completes: then the SYN-ACK (state
``SYN_RCVD``); refused, unreachable or timed out (``CONNECT_TIMEOUT_S``): RST. A connect to a
local destination (loopback, the host's own addresses) has completed before ``connect()``
returns; the driver says so (:data:`~guestnet.core.tcp.flow.CONNECTED`) and the SYN-ACK, or
the RST of a refused one, answers the SYN in the same loop turn, not a turn later.
SYN retransmissions meanwhile are absorbed and counted. The guest's ACK makes the flow
``ESTABLISHED``.

Forwarded connections (host to guest). A connection accepted on a published port (see
``guestnet.io.forwards``) is opened the other way round: :meth:`open_to_guest` sends the
guest a SYN from the gateway address (the guest sees every host client as the gateway, as slirp
and passt show it) and a source port from the ephemeral range, unique among flows and going
round the whole range before reuse (state ``SYN_SENT``). The SYN is retransmitted after 1 and
3 s; without a SYN-ACK by ``FORWARD_CONNECT_TIMEOUT_S`` the host connection is reset. An RST
from the guest (nobody listens) resets the host connection at once. The SYN-ACK makes the flow
``ESTABLISHED`` and from there it is exactly a guest-opened flow; removing the forward only
closes its listening socket, never its flows. Our ACK of the SYN-ACK is held to the end of the
loop turn unless host data is already waiting: a client that spoke first (its data is reported
in the same turn, just after the SYN-ACK) has it carried by its first data segment.

Half-open bound and SYN cookies. A SYN flood (random source ports) would otherwise fill the
whole flow table with flows that never finish their handshake and hold a host connect each, and
a full host connect per SYN costs more than a guest can send SYNs. Flows are tracked in creation
order from their SYN until ESTABLISHED (CONNECTING and SYN_RCVD toward the guest's peer,
SYN_SENT for forwarded ones), at most ``config.max_half_open`` (``--max-half-open``). Past it,
or when the guest sends faster than we read (``Port.backlog``) while a sixteenth of it is taken,
a SYN is answered with a SYN cookie and nothing is kept (``core/tcp/cookies.py``); the guest's
ACK of a cookie opens the flow then. Only a flow so opened, or a forwarded one, may evict the
oldest half-open flow (``tcp.half_open.evicted``): one still connecting is dropped silently (the
guest's SYN retransmission starts it again, as after a kernel's full SYN queue), one waiting on
the guest gets RST both ways. Established flows are never touched by this bound.

Refusals, RFC 9293 and counted under ``tcp.*``: a segment for no flow gets RST (unless it is an
RST), a full flow table (``config.max_flows``), a destination the policy refuses or no
descriptors (EMFILE) an RST for the SYN; but a SYN that ``--no-host-loopback`` refuses gets an
ICMP network unreachable instead when ``config.host_loopback_unreachable`` asks for slirp4netns's
answer (the guest's connect fails at once with ENETUNREACH), and a SYN an egress rule denies
(``policy.deny``) gets ICMP administratively prohibited, as UDP does (EHOSTUNREACH at once;
ICMPv6 code 1, EACCES, over IPv6); a host connect that fails at once for want of a route
(ENETUNREACH, EHOSTUNREACH) gets network or host unreachable, as the router on the way would
send. All come from the gateway of the SYN's IP version. A flow
that lingers closed answers a retransmitted FIN with an ACK and gives way to a new SYN on its
4-tuple.
"""

from __future__ import annotations

import errno
from typing import Any

from guestnet.core.flows import FlowKey
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.core.tcp.flow import (
    CLOSED,
    CONNECTED,
    CONNECTING,
    DEFAULT_MSS,
    DNS_CONNECT_TIMEOUT_S,
    ESTABLISHED,
    FORWARD_CONNECT_TIMEOUT_S,
    FORWARD_PORT_MAX,
    FORWARD_PORT_MIN,
    FORWARD_SYN_RTO_S,
    OUR_WSCALE,
    RTO_INITIAL_S,
    SEQ_MASK,
    SYN_RCVD,
    SYN_SENT,
    TcpFlow,
    seq_delta,
)
from guestnet.core.tcp.irregular import _Irregular
from guestnet.core.tcp.segment import _Reply
from guestnet.wire.icmp import UNREACH_ADMIN_PROHIBITED, UNREACH_HOST, UNREACH_NET
from guestnet.wire.tcp import ACK, FIN, RST, SYN, build_syn_options, parse_tcp_options


class _Handshake(_Irregular):
    """Flows opening either way, and refusals."""

    def host_connected(self, flow: TcpFlow, err: int, now: float) -> None:
        """The driver: the host connect finished (``err`` 0) or failed (an errno)."""
        self._now = now
        if flow.state != CONNECTING:
            return
        flow.connect_deadline = None
        if err:
            self.counters.inc(_connect_reason(err))
            if flow.dns and self._dns_next_upstream(flow, now):
                return
            self._send_rst_to_guest(flow)
            self._drop(flow, reset=False)
            return
        if flow.cookie:
            self._cookie_established(flow, now)
            return
        flow.state = SYN_RCVD
        flow.last_active = now
        self._send_syn_ack(flow)
        flow.rto_deadline = now + flow.rto
        self.counters.inc("tcp.connect.ok")
        self._arm(flow)

    def _send_syn_ack(self, flow: TcpFlow) -> None:
        """Our SYN-ACK: our MSS, window scaling if the guest offered it, window unscaled."""
        self._update_window(flow)
        opts = build_syn_options(self._our_mss(flow), OUR_WSCALE if flow.wscale_ok else None)
        # The SYN-ACK's window is never scaled (RFC 7323 2.2).
        field = min(flow.rcv_wnd, 0xFFFF)
        self._control(flow, flow.iss, flow.rcv_nxt, SYN | ACK, field, opts)

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
                self._refuse_syn(pkt, key, seq, self._unreachable_code(verdict.reason))
                return
            host, host_port = verdict.host, key[3]
        if not dns and self._cookie_time(pkt.port):
            self._send_cookie(pkt, key, seq, opts.mss, opts.wscale)
            return
        self._make_half_open_room()
        if self.table.full:
            counters.inc("tcp.syn.table_full")
            self._rst_for_syn(pkt, key, seq)
            return
        flow = TcpFlow(key, pkt.port, pkt.src_mac, host, host_port, seq, self._isn(), now)
        flow.dns = dns
        ours = self._our_mss(flow)
        flow.mss = min(opts.mss, ours) if opts.mss else min(DEFAULT_MSS, ours)
        if opts.wscale is not None:
            flow.wscale_ok = True
            flow.guest_wscale = opts.wscale
        if dns:
            flow.dns_tried = ((host, host_port),)
            flow.connect_deadline = now + DNS_CONNECT_TIMEOUT_S
        err = self.io.connect(flow)
        while err > 0:
            counters.inc(_connect_reason(err))
            if not (dns and self._dns_pick_next(flow, now)):
                # No route on the host (connect says so at once): answered as a router would.
                self._refuse_syn(pkt, key, seq, _UNROUTABLE.get(err))
                return
            err = self.io.connect(flow)
        self.table.add(key, flow)
        self._half_open[flow] = None
        counters.inc("tcp.syn.dns" if dns else "tcp.syn.accepted")
        if err == CONNECTED:
            # A local destination: the SYN-ACK goes out in this turn (it arms the timer).
            self.host_connected(flow, 0, now)
        else:
            self._arm(flow)

    def _cookie_time(self, port: Port) -> bool:
        """Answer a SYN with a cookie: the half-open table is full, or the guest sends faster
        than we read while a sixteenth of it is taken (a flood whose handshakes end at once,
        as when the guest's kernel resets SYN-ACKs it never asked for, never fills it; a bulk
        upload with a connect or two beside it never takes that many)."""
        cap = self.config.max_half_open
        n = len(self._half_open)
        return n >= cap or (port.backlog and n >= max(cap // 16, 1))

    def _send_cookie(
        self, pkt: IpPacket, key: FlowKey, seq: int, mss: int | None, wscale: int | None
    ) -> None:
        """The half-open table is full: a SYN-ACK whose ISN is a SYN cookie, and no state (see
        ``core/tcp/cookies.py``). Our options as for any SYN-ACK; the window unscaled."""
        ours = self._mss_for(pkt.family)
        guest_mss = min(mss, ours) if mss else min(DEFAULT_MSS, ours)
        cookie = self.cookies.make(key, seq, guest_mss, wscale, self._now)
        opts = build_syn_options(ours, OUR_WSCALE if wscale is not None else None)
        reply = _Reply(pkt, key)
        self._control(reply, cookie, (seq + 1) & SEQ_MASK, SYN | ACK, 0xFFFF, opts)
        self.counters.inc("tcp.syn.cookie_sent")

    def _open_from_cookie(
        self, pkt: IpPacket, key: FlowKey, seq: int, ack: int, window: int, now: float
    ) -> bool:
        """An ACK for no flow: if it acknowledges a SYN cookie of ours, open the flow it
        stands for (host connect started; ESTABLISHED once the host accepts) and say True."""
        guest_isn = (seq - 1) & SEQ_MASK
        cookie = (ack - 1) & SEQ_MASK
        got = self.cookies.check(key, guest_isn, cookie, now)
        if got is None:
            return False
        counters = self.counters
        verdict = self.policy.destination(key[2])
        if verdict.host is None or self.table.full:
            counters.inc("tcp.cookie.refused")
            self._answer(pkt, key, ack, 0, RST)
            return True
        self._make_half_open_room()
        flow = TcpFlow(key, pkt.port, pkt.src_mac, verdict.host, key[3], guest_isn, cookie, now)
        flow.cookie = True
        flow.mss = min(got[0], self._our_mss(flow))
        if got[1] is not None:
            flow.wscale_ok = True
            flow.guest_wscale = got[1]
        flow.snd_wnd = window << flow.guest_wscale
        err = self.io.connect(flow)
        if err > 0:
            counters.inc(_connect_reason(err))
            self._answer(pkt, key, ack, 0, RST)
            return True
        self.table.add(key, flow)
        self._half_open[flow] = None
        counters.inc("tcp.syn.cookie_accepted")
        if err == CONNECTED:
            self.host_connected(flow, 0, now)
        else:
            self._arm(flow)
        return True

    def _cookie_established(self, flow: TcpFlow, now: float) -> None:
        """The host accepted a flow a cookie opened: it is ESTABLISHED, as the guest thinks."""
        flow.state = ESTABLISHED
        self._half_open.pop(flow, None)
        flow.last_active = now
        flow.snd_una = flow.snd_nxt
        flow.snd_wl1 = flow.rcv_nxt
        flow.snd_wl2 = flow.snd_nxt
        self.counters.inc("tcp.connect.ok")
        self.counters.inc("tcp.flow.established")
        self._update_window(flow)
        self._arm(flow)
        if flow.host_readable:
            self._pump(flow, now)

    def _make_half_open_room(self) -> None:
        """Before a new flow: at ``max_half_open`` unfinished handshakes, evict the oldest.

        A flow still connecting on the host is dropped silently (its host connect reset): the
        guest's SYN retransmission starts it afresh, as a full SYN queue does in a kernel. One
        waiting for the guest (SYN_RCVD, SYN_SENT) is aborted with RST both ways, so neither a
        host client nor the guest is left waiting for it."""
        half_open = self._half_open
        while len(half_open) >= self.config.max_half_open:
            oldest = next(iter(half_open))
            del half_open[oldest]
            self.counters.inc("tcp.half_open.evicted")
            if oldest.state == CONNECTING and not oldest.cookie:
                self._drop(oldest, reset=True)
            else:
                self._abort(oldest)

    def _refuse_syn(self, pkt: IpPacket, key: FlowKey, seq: int, code: int | None) -> None:
        """Answer a SYN no flow will serve: ICMP (ICMPv6) destination unreachable with
        ``code`` from the gateway of its family when there is a code and the ICMP service is
        wired, else RST."""
        if code is not None and self.unreachable is not None:
            cfg = self.config
            origin = cfg.gateway6_b if len(key[2]) == 16 else cfg.gateway_b
            self.unreachable(pkt, code, origin)
        else:
            self._rst_for_syn(pkt, key, seq)

    def _unreachable_code(self, reason: str) -> int | None:
        """The ICMP unreachable code a refused SYN is answered with, or None for RST: an
        egress rule's denial is "administratively prohibited" (as UDP and ICMP are answered);
        slirp4netns --disable-host-loopback is "Network is unreachable"."""
        if reason == "policy.deny":
            return UNREACH_ADMIN_PROHIBITED
        if reason == "policy.host_loopback" and self.config.host_loopback_unreachable:
            return UNREACH_NET
        return None

    def _dns_pick_next(self, flow: TcpFlow, now: float) -> bool:
        """DNS over TCP could not reach ``flow``'s upstream: report it and point the flow at
        the next upstream it has not tried; False when there is none."""
        failed = self.dns_failed
        if failed is None or self.dns_upstream is None:
            return False
        failed((flow.host, flow.host_port), now)
        target = self.dns_upstream()
        if target is None or target in flow.dns_tried:
            return False
        self.counters.inc("tcp.dns.failover")
        flow.host, flow.host_port = target
        flow.dns_tried += (target,)
        flow.connect_deadline = now + DNS_CONNECT_TIMEOUT_S
        return True

    def _dns_next_upstream(self, flow: TcpFlow, now: float) -> bool:
        """A connecting DNS flow failed (refused, unreachable, timed out): connect it to the
        next upstream, the guest none the wiser; False when no upstream is left."""
        self.io.close(flow, False)
        while self._dns_pick_next(flow, now):
            err = self.io.connect(flow)
            if err == CONNECTED:
                self.host_connected(flow, 0, now)
                return True
            if not err:
                self._arm(flow)
                return True
            self.counters.inc(_connect_reason(err))
        return False

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
            self._control(flow, ack, 0, RST)
            return
        flow.state = ESTABLISHED
        self._half_open.pop(flow, None)
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
        self._make_half_open_room()
        self._make_silent_room()
        if self.table.full:
            counters.inc("tcp.forward.table_full")
            return None
        sport = self._forward_port(guest_ip, guest_port)
        if sport is None:
            counters.inc("tcp.forward.no_port")
            return None
        key = (guest_ip, guest_port, self._gateway_for(guest_ip), sport)
        flow = TcpFlow(key, port, guest_mac, peer[0], peer[1], 0, self._isn(), now)
        flow.io_data = io_data
        flow.forward_id = forward_id
        flow.state = SYN_SENT
        flow.connect_deadline = now + FORWARD_CONNECT_TIMEOUT_S
        flow.rto = FORWARD_SYN_RTO_S
        flow.rto_deadline = now + flow.rto
        self.table.add(key, flow)
        self._half_open[flow] = None
        self._silent[flow] = None
        counters.inc("tcp.forward.syn")
        self._send_syn(flow)
        self._arm(flow)
        return flow

    def _make_silent_room(self) -> None:
        """Before a new forwarded flow: at ``max_silent_forwards`` connections whose host client
        has sent nothing (a slowloris holding accepted connections), reset the oldest."""
        silent = self._silent
        cap = self.config.max_silent_forwards
        while len(silent) >= cap:
            oldest = next(iter(silent))
            del silent[oldest]
            if oldest.state == CLOSED or oldest.bytes_to_guest:
                continue  # spoke or ended since: only the entry was left
            self.counters.inc("tcp.forward.silent_evicted")
            self._abort(oldest)

    def _gateway_for(self, guest_ip: bytes) -> bytes:
        """The address host clients appear from to a guest address: the gateway of its family."""
        return self.config.gateway_b if len(guest_ip) == 4 else self.config.gateway6_b

    def _forward_port(self, guest_ip: bytes, guest_port: int) -> int | None:
        """The next source port (as the guest sees it) that no flow to that guest port uses.

        Ports go round the whole range before one is used again, so a 4-tuple the guest may
        still hold in TIME_WAIT comes back as late as possible.
        """
        span = FORWARD_PORT_MAX - FORWARD_PORT_MIN + 1
        gateway = self._gateway_for(guest_ip)
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
        opts = build_syn_options(self._our_mss(flow), OUR_WSCALE)
        self._control(flow, flow.iss, 0, SYN, field, opts)

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
            self._control(flow, ack, 0, RST)
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
        flow.mss = min(opts.mss or DEFAULT_MSS, self._our_mss(flow))
        if opts.wscale is not None:
            flow.wscale_ok = True
            flow.guest_wscale = opts.wscale
        flow.state = ESTABLISHED
        self._half_open.pop(flow, None)
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
        if flow.host_readable:
            self._send_ack(flow)
            self._pump(flow, now)
            return
        # The client's first bytes are usually in the host socket already, reported by the
        # loop later in this very turn (the guest's answer to our SYN is queued on the link
        # before the accepted socket is watched): hold the ACK to the end of the turn, so that
        # the data segment carries it; :meth:`flush` sends it bare if nothing came. The window
        # is scaled from here on: recompute the field the data segment will carry.
        self._update_window(flow)
        flow.ack_pending = True
        self._defer(flow)

    # -- refusals -------------------------------------------------------------------------------

    def _rst_for_syn(self, pkt: IpPacket, key: FlowKey, seq: int) -> None:
        self._answer(pkt, key, 0, (seq + 1) & SEQ_MASK, RST | ACK)
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
        """RFC 9293 3.10.7.1: a segment for no connection gets RST, unless it is one (or it
        acknowledges a SYN cookie of ours: then it opens its flow)."""
        if flags & (SYN | RST | ACK) == ACK and self._open_from_cookie(
            pkt, key, seq, ack, (l4[14] << 8) | l4[15], self._now
        ):
            return
        if flags & RST:
            self.counters.inc("tcp.segment.unknown_flow_rst")
            return
        self.counters.inc("tcp.segment.unknown_flow")
        if flags & ACK:
            self._answer(pkt, key, ack, 0, RST)
        else:
            seg_len = len(l4) - hlen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._answer(pkt, key, 0, (seq + seg_len) & SEQ_MASK, RST | ACK)
        self.counters.inc("tcp.rst.sent")


#: Host connect errors that mean "no route": the ICMP unreachable code a router would send.
_UNROUTABLE = {errno.ENETUNREACH: UNREACH_NET, errno.EHOSTUNREACH: UNREACH_HOST}


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
