"""The TCP translation core, frame by frame, with a fake host socket and a scripted clock.

Guest segments go in through the classifier (as a link would hand them); frames out are parsed
back and checked, with the counters. A :class:`FakeIo` stands for the I/O driver: each flow's
fake socket records what was written, serves what the test queues for reading, and takes only
as many bytes as the test allows.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from guestnet.core.policy import Policy
from guestnet.core.tcp import (
    CLOSED,
    DELACK_S,
    DNS_CONNECT_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    OUR_WSCALE,
    REAP_DELAY_S,
    TcpFlow,
    TcpNat,
)
from guestnet.wire.ipv4 import PROTO_TCP, parse_ipv4
from guestnet.wire.ipv6 import parse_ipv6
from guestnet.wire.tcp import (
    ACK,
    FIN,
    OPT_MSS,
    PSH,
    RST,
    SYN,
    build_syn_options,
    build_tcp,
    parse_tcp,
    parse_tcp_options,
)

GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
REMOTE_IP = bytes([198, 18, 0, 7])
ISN = 5000
OUR_ISS = 900000


class FakeSock:
    """What the test controls about one host socket."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.readable = bytearray()
        self.eof = False
        self.recv_error: OSError | None = None
        self.send_error: OSError | None = None
        #: Bytes ``send`` may still take (None: all).
        self.accept: int | None = None
        self.room = 1 << 20
        self.shut_wr = False
        self.closed = False
        self.reset = False


class FakeIo:
    """The TcpIo the core talks to, recording every request."""

    def __init__(self) -> None:
        self.connect_error = 0
        self.connects: list[tuple[str, int]] = []
        self.timers: dict[TcpFlow, float] = {}
        self.flush_requests = 0

    def connect(self, flow: TcpFlow) -> int:
        self.connects.append((flow.host, flow.host_port))
        if self.connect_error:
            return self.connect_error
        flow.io_data = FakeSock()
        return 0

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        s: FakeSock = flow.io_data
        if s.send_error is not None:
            raise s.send_error
        n = len(data) if s.accept is None else min(len(data), s.accept)
        if s.accept is not None:
            s.accept -= n
        s.written += data[:n]
        return n

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        s: FakeSock = flow.io_data
        if s.recv_error is not None:
            raise s.recv_error
        if not s.readable:
            return 0 if s.eof else -1
        total = 0
        for buf in bufs:
            n = min(len(buf), len(s.readable))
            buf[:n] = s.readable[:n]
            del s.readable[:n]
            total += n
        return total

    def send_room(self, flow: TcpFlow) -> int:
        return int(flow.io_data.room)

    def shutdown_write(self, flow: TcpFlow) -> None:
        flow.io_data.shut_wr = True

    def close(self, flow: TcpFlow, reset: bool) -> None:
        s: FakeSock | None = flow.io_data
        if s is not None and not s.closed:
            s.closed = True
            s.reset = reset

    def set_timer(self, flow: TcpFlow, when: float | None) -> None:
        if when is None:
            self.timers.pop(flow, None)
        else:
            self.timers[flow] = when

    def request_flush(self) -> None:
        self.flush_requests += 1


class Seg(NamedTuple):
    """A segment guestnet sent to the guest, parsed."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    options: Any


class Tcp:
    """A TcpNat on the core harness, with helpers to play the guest."""

    def __init__(self, core: Any, frames: Any, version: int = 4) -> None:
        self.core = core
        self.frames = frames
        #: The guest speaks IPv4 or IPv6: addresses, frames and parsing follow.
        self.version = version
        self.guest_ip = GUEST_IP if version == 4 else frames.GUEST_IP6
        self.gateway = GATEWAY_IP if version == 4 else frames.GATEWAY_IP6
        #: What the gateway stands for on the host.
        self.loopback = "127.0.0.1" if version == 4 else "::1"
        #: IP + TCP header bytes: MSS = MTU - this.
        self.overhead = 40 if version == 4 else 60
        self.dns_ip = frames.DNS_IP if version == 4 else frames.DNS_IP6
        #: An outside address, and how the host socket names it.
        self.remote = REMOTE_IP if version == 4 else frames.REMOTE_IP6
        self.remote_host = "198.18.0.7" if version == 4 else "2001:db8::1"
        self.io = FakeIo()
        self.nat = TcpNat(
            core.config,
            core.pool,
            core.counters,
            Policy(core.config),
            self.io,
            dns_upstream=lambda: ("127.0.0.53", 53),
            isn=lambda: OUR_ISS,
        )
        core.classifier.tcp_nat = self.nat
        core.classifier.tcp_nat6 = self.nat
        core.classifier.dns_tcp = self.nat.dns_handler
        core.classifier.dns6_tcp = self.nat.dns_handler
        self.sport = 40000
        self.dst = self.gateway
        self.dport = 8080

    @property
    def now(self) -> float:
        return float(self.core.now)

    def send(
        self,
        flags: int,
        seq: int,
        ack: int = 0,
        payload: bytes = b"",
        window: int = 65535,
        options: bytes = b"",
        sport: int | None = None,
        dst: bytes | None = None,
        dport: int | None = None,
    ) -> None:
        """Feed one guest segment and run the coalesced-ACK flush, as the loop would."""
        dst = dst or self.dst
        hlen = 20 + len(options)
        buf = bytearray(hlen + len(payload))
        buf[hlen:] = payload
        build_tcp(
            buf,
            0,
            sport or self.sport,
            dport or self.dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            flags,
            window,
            len(payload),
            self.guest_ip,
            dst,
            options,
        )
        if self.version == 4:
            self.core.feed(self.frames.ipv4(PROTO_TCP, bytes(buf), dst=dst))
        else:
            self.core.feed(self.frames.ipv6(PROTO_TCP, bytes(buf), dst=dst))
        self.flush()

    def flush(self) -> None:
        if self.io.flush_requests:
            self.io.flush_requests = 0
            self.nat.flush(self.now)

    def out(self) -> list[Seg]:
        """Segments sent to the guest since the last call."""
        segs = []
        for raw in self.core.take_sent():
            ip = (
                parse_ipv4(memoryview(raw)[14:])
                if self.version == 4
                else parse_ipv6(memoryview(raw)[14:])
            )
            assert ip.proto == PROTO_TCP
            l4 = memoryview(raw)[14 + ip.header_len : 14 + ip.total_len]
            t = parse_tcp(l4)
            segs.append(
                Seg(
                    ip.src,
                    ip.dst,
                    t.sport,
                    t.dport,
                    t.seq,
                    t.ack,
                    t.flags,
                    t.window,
                    bytes(l4[t.header_len :]),
                    parse_tcp_options(l4, t.header_len),
                )
            )
        return segs

    def advance(self, seconds: float) -> None:
        """Move the scripted clock and fire the timers that are due."""
        self.core.now += seconds
        for flow, when in list(self.io.timers.items()):
            if when <= self.now and self.io.timers.get(flow) == when:
                del self.io.timers[flow]
                self.nat.on_timer(flow, self.now)
        self.flush()

    @property
    def flow(self) -> TcpFlow:
        flows = list(self.nat.table)
        assert len(flows) == 1
        return flows[0]

    @property
    def sock(self) -> FakeSock:
        s: FakeSock = self.flow.io_data
        return s

    def open(self, wscale: int | None = 7, mss: int = 1460, window: int = 65535) -> Seg:
        """SYN, host connect completes, SYN-ACK, ACK: an established flow."""
        self.send(SYN, ISN, options=build_syn_options(mss, wscale))
        assert self.out() == []
        self.nat.host_connected(self.flow, 0, self.now)
        (synack,) = self.out()
        self.send(ACK, ISN + 1, OUR_ISS + 1, window=window)
        assert self.out() == []
        return synack

    def host_data(self, data: bytes) -> None:
        """The host peer sends ``data`` (an EPOLLIN edge)."""
        self.sock.readable += data
        self.nat.host_readable(self.flow, self.now)


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def tcp(core: Any, frames: Any, request: pytest.FixtureRequest) -> Iterator[Tcp]:
    """The TCP translation over IPv4 and over IPv6: every test using it runs for both."""
    harness = Tcp(core, frames, request.param)
    yield harness
    harness.nat.close_all()


def c(tcp: Tcp, name: str) -> int:
    return int(tcp.core.counters[name])


# -- opening ----------------------------------------------------------------------


def test_syn_connects_then_synack_with_mss_and_window_scale(tcp: Tcp) -> None:
    tcp.send(SYN, ISN, options=build_syn_options(1460, 7))
    assert tcp.io.connects == [(tcp.loopback, 8080)]
    assert tcp.out() == [], "no SYN-ACK before the host connect completes"
    assert tcp.flow.state_name == "CONNECTING"
    tcp.nat.host_connected(tcp.flow, 0, tcp.now)
    (s,) = tcp.out()
    assert s.flags == SYN | ACK
    assert (s.src, s.sport, s.dst, s.dport) == (tcp.gateway, 8080, tcp.guest_ip, 40000)
    assert s.seq == OUR_ISS and s.ack == ISN + 1
    assert s.options.mss == tcp.core.config.mtu - tcp.overhead
    assert s.options.wscale == OUR_WSCALE
    assert not s.options.sack_permitted and s.options.timestamp is None
    assert tcp.flow.state_name == "SYN_RCVD"
    tcp.send(ACK, ISN + 1, OUR_ISS + 1)
    assert tcp.flow.state_name == "ESTABLISHED"
    assert c(tcp, "tcp.flow.established") == 1


def test_no_window_scale_when_guest_offers_none(tcp: Tcp) -> None:
    s = tcp.open(wscale=None)
    assert s.options.wscale is None
    assert tcp.flow.wnd_field == min(tcp.sock.room, 0xFFFF)


def test_other_destination_connects_as_is(tcp: Tcp) -> None:
    tcp.send(SYN, ISN, dst=tcp.remote, dport=443)
    assert tcp.io.connects == [(tcp.remote_host, 443)]


def test_syn_retransmits_absorbed_while_connecting(tcp: Tcp) -> None:
    tcp.send(SYN, ISN)
    tcp.send(SYN, ISN)
    tcp.send(SYN, ISN)
    assert tcp.out() == []
    assert len(tcp.io.connects) == 1
    assert c(tcp, "tcp.syn.retransmit_absorbed") == 2


def test_synack_retransmitted_on_syn_and_on_timeout(tcp: Tcp) -> None:
    tcp.send(SYN, ISN)
    tcp.nat.host_connected(tcp.flow, 0, tcp.now)
    assert len(tcp.out()) == 1
    tcp.send(SYN, ISN)
    (s,) = tcp.out()
    assert s.flags == SYN | ACK
    tcp.advance(1.01)
    (s,) = tcp.out()
    assert s.flags == SYN | ACK and s.seq == OUR_ISS
    assert c(tcp, "tcp.retransmit.timeout") == 1


@pytest.mark.parametrize(
    ("err", "counter"),
    [
        (errno.ECONNREFUSED, "tcp.connect.refused"),
        (errno.ENETUNREACH, "tcp.connect.unreachable"),
        (errno.ETIMEDOUT, "tcp.connect.timeout"),
    ],
)
def test_failed_connect_resets_guest(tcp: Tcp, err: int, counter: str) -> None:
    tcp.send(SYN, ISN)
    flow = tcp.flow
    tcp.nat.host_connected(flow, err, tcp.now)
    (s,) = tcp.out()
    assert s.flags == RST | ACK and s.ack == ISN + 1
    assert len(tcp.nat.table) == 0
    assert flow.io_data.closed
    assert c(tcp, counter) == 1


def test_connect_timeout(tcp: Tcp) -> None:
    tcp.send(SYN, ISN)
    tcp.advance(29.0)
    assert tcp.out() == []
    tcp.advance(1.5)
    (s,) = tcp.out()
    assert s.flags == RST | ACK
    assert c(tcp, "tcp.connect.timeout") == 1
    assert len(tcp.nat.table) == 0


def test_emfile_is_a_counted_refusal(tcp: Tcp) -> None:
    tcp.io.connect_error = errno.EMFILE
    tcp.send(SYN, ISN)
    (s,) = tcp.out()
    assert s.flags == RST | ACK and s.ack == ISN + 1
    assert c(tcp, "tcp.connect.no_resources") == 1
    assert len(tcp.nat.table) == 0


def test_flow_table_full(make_core: Any, frames: Any) -> None:
    core = make_core(max_flows=2)
    t = Tcp(core, frames)
    for port in (1000, 1001):
        t.send(SYN, ISN, sport=port)
    assert t.out() == []
    t.send(SYN, ISN, sport=1002)
    (s,) = t.out()
    assert s.flags == RST | ACK and s.dport == 1002
    assert core.counters["tcp.syn.table_full"] == 1
    assert len(t.nat.table) == 2
    t.nat.close_all()
    assert core.pool.in_use == 0


@pytest.mark.parametrize(
    ("config", "dst", "counter"),
    [
        ({"no_host_loopback": True}, GATEWAY_IP, "tcp.policy.host_loopback"),
        ({}, bytes([169, 254, 169, 254]), "tcp.policy.link_local"),
        ({}, bytes([10, 0, 2, 77]), "tcp.policy.guest_subnet"),
    ],
)
def test_policy_refusal_is_rst(
    make_core: Any, frames: Any, config: dict[str, Any], dst: bytes, counter: str
) -> None:
    core = make_core(**config)
    t = Tcp(core, frames)
    t.send(SYN, ISN, dst=dst)
    (s,) = t.out()
    assert s.flags == RST | ACK and s.ack == ISN + 1 and s.src == dst
    assert core.counters[counter] == 1
    assert t.io.connects == []


def test_link_local_allowed_by_option(make_core: Any, frames: Any) -> None:
    t = Tcp(make_core(allow_link_local=True), frames)
    t.send(SYN, ISN, dst=bytes([169, 254, 169, 254]), dport=80)
    assert t.io.connects == [("169.254.169.254", 80)]
    t.nat.close_all()


def test_dns_over_tcp_goes_to_upstream(tcp: Tcp) -> None:
    tcp.send(SYN, ISN, dst=tcp.dns_ip, dport=53)
    assert tcp.io.connects == [("127.0.0.53", 53)]
    assert c(tcp, "tcp.syn.dns") == 1


class Upstreams:
    """DNS upstreams as the DNS service orders them: the first not held down."""

    def __init__(self, *addrs: tuple[str, int]) -> None:
        self.addrs = addrs
        self.down: list[tuple[str, int]] = []

    def preferred(self) -> tuple[str, int] | None:
        live = [a for a in self.addrs if a not in self.down]
        return live[0] if live else self.addrs[0]

    def failed(self, addr: tuple[str, int], _now: float) -> None:
        self.down.append(addr)


UP_A, UP_B = ("127.0.0.1", 5301), ("127.0.0.1", 5302)


def _dns_tcp(core: Any, frames: Any, ups: Upstreams) -> Tcp:
    t = Tcp(core, frames)
    t.nat.dns_upstream = ups.preferred
    t.nat.dns_failed = ups.failed
    return t


@pytest.mark.parametrize("how", ["at_once", "later", "timeout"])
def test_dns_over_tcp_fails_over_to_next_upstream(make_core: Any, frames: Any, how: str) -> None:
    """Refused at connect(), refused once the connect completes, or no answer within the DNS
    timeout: the flow connects to the next upstream, the guest sees only the SYN-ACK."""
    ups = Upstreams(UP_A, UP_B)
    t = _dns_tcp(make_core(), frames, ups)
    if how == "at_once":
        first_error = [errno.ECONNREFUSED]
        connect = t.io.connect

        def refuse_once(flow: TcpFlow) -> int:
            if first_error:
                t.io.connects.append((flow.host, flow.host_port))
                return first_error.pop()
            return connect(flow)

        t.io.connect = refuse_once  # type: ignore[method-assign]
    t.send(SYN, ISN, dst=bytes([10, 0, 2, 3]), dport=53)
    if how == "later":
        t.nat.host_connected(t.flow, errno.ECONNREFUSED, t.now)
    elif how == "timeout":
        assert t.out() == []
        t.advance(DNS_CONNECT_TIMEOUT_S - 0.1)
        assert t.io.connects == [UP_A], "not given up before the DNS timeout"
        t.advance(0.2)
    assert t.io.connects == [UP_A, UP_B]
    assert ups.down == [UP_A]
    assert t.out() == [], "no RST: the guest waits for the next upstream"
    t.nat.host_connected(t.flow, 0, t.now)
    (synack,) = t.out()
    assert synack.flags == SYN | ACK and synack.ack == ISN + 1
    assert c(t, "tcp.dns.failover") == 1
    t.nat.close_all()


def test_dns_over_tcp_resets_when_every_upstream_fails(make_core: Any, frames: Any) -> None:
    ups = Upstreams(UP_A, UP_B)
    t = _dns_tcp(make_core(), frames, ups)
    t.send(SYN, ISN, dst=bytes([10, 0, 2, 3]), dport=53)
    t.nat.host_connected(t.flow, errno.ECONNREFUSED, t.now)
    t.nat.host_connected(t.flow, errno.ECONNREFUSED, t.now)
    assert t.io.connects == [UP_A, UP_B], "each upstream tried once"
    (rst,) = t.out()
    assert rst.flags & RST
    assert list(t.nat.table) == [] or t.flow.state == CLOSED


# -- guest to host ----------------------------------------------------------------------


def test_guest_data_written_and_acked_once_per_turn(tcp: Tcp) -> None:
    tcp.open()
    seq = ISN + 1
    tcp.core.feed(b"")  # nothing; keeps the harness honest about empty frames
    tcp.core.counters.counts.pop("eth.truncated", None)
    for chunk in (b"hello ", b"world"):
        tcp.send(ACK | PSH, seq, OUR_ISS + 1, chunk)
        seq += len(chunk)
    assert bytes(tcp.sock.written) == b"hello world"
    acks = tcp.out()
    # The first small segment's ACK is held (DELACK_S, for an answer to carry it); the second
    # segment makes it go out at the end of that turn, for both.
    assert [s.ack for s in acks] == [ISN + 1 + 11]
    assert all(s.flags == ACK and s.payload == b"" for s in acks)
    # The advertised window is the host socket's room, scaled.
    assert acks[-1].window == (1 << 20) >> OUR_WSCALE
    assert tcp.flow.bytes_to_host == 11


def test_ack_only_what_the_host_took_then_window_update(tcp: Tcp) -> None:
    tcp.open()
    tcp.sock.accept = 3
    tcp.sock.room = 0
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"abcdefgh")
    assert bytes(tcp.sock.written) == b"abc"
    (s,) = tcp.out()
    assert s.ack == ISN + 1 + 3 and s.window == 0
    assert c(tcp, "tcp.host.send_blocked") == 1
    # The guest retransmits the whole segment: what we have is trimmed.
    tcp.sock.accept = None
    tcp.sock.room = 1 << 16
    tcp.nat.host_writable(tcp.flow, tcp.now)
    (s,) = tcp.out()
    assert s.ack == ISN + 1 + 3 and s.window == (1 << 16) >> OUR_WSCALE
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"abcdefgh")
    assert bytes(tcp.sock.written) == b"abcdefgh"
    tcp.advance(DELACK_S)  # five new bytes: a small segment, its ACK held
    (s,) = tcp.out()
    assert s.ack == ISN + 1 + 8
    assert c(tcp, "tcp.segment.trimmed") == 1


def test_small_window_rechecked_on_timer(tcp: Tcp) -> None:
    tcp.open()
    tcp.sock.room = 100
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"x")
    tcp.advance(DELACK_S)
    (s,) = tcp.out()
    assert s.window == 0  # 100 bytes scaled by 128
    tcp.advance(0.0011)
    assert tcp.out() == [], "no update while the room is still small"
    tcp.sock.room = 1 << 18
    tcp.advance(0.003)
    (s,) = tcp.out()
    assert s.window == (1 << 18) >> OUR_WSCALE and s.ack == ISN + 2
    assert c(tcp, "tcp.window.update") == 1


def test_out_of_order_dropped_with_immediate_dup_acks(tcp: Tcp) -> None:
    tcp.open()
    for i in range(3):
        tcp.send(ACK, ISN + 1 + 100 + i * 10, OUR_ISS + 1, b"z" * 10)
    acks = tcp.out()
    assert [s.ack for s in acks] == [ISN + 1] * 3
    assert tcp.sock.written == b""
    assert c(tcp, "tcp.segment.out_of_order") == 3


def test_out_of_window_and_old_duplicates_get_acks(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(ACK, ISN + 1 + (1 << 30), OUR_ISS + 1, b"far")
    tcp.send(ACK, ISN + 1 - 100, OUR_ISS + 1, b"old")
    tcp.send(ACK, ISN, OUR_ISS + 1)  # a window/keep-alive probe: seq = rcv_nxt - 1
    assert [s.ack for s in tcp.out()] == [ISN + 1] * 3
    assert c(tcp, "tcp.segment.out_of_window") == 1
    assert c(tcp, "tcp.segment.duplicate") == 2
    assert tcp.sock.written == b""


def test_ack_for_unsent_data_is_dropped(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1000, b"data")
    (s,) = tcp.out()
    assert s.ack == ISN + 1
    assert tcp.sock.written == b""
    assert c(tcp, "tcp.segment.ack_unsent") == 1


# -- host to guest ----------------------------------------------------------------------


def test_host_data_segmented_by_mss_and_kept_until_acked(tcp: Tcp) -> None:
    tcp.open(mss=1000)
    data = bytes(range(256)) * 10  # 2560 bytes
    tcp.host_data(data)
    segs = tcp.out()
    assert [len(s.payload) for s in segs] == [1000, 1000, 560]
    assert b"".join(s.payload for s in segs) == data
    assert [s.seq for s in segs] == [OUR_ISS + 1, OUR_ISS + 1001, OUR_ISS + 2001]
    assert all(s.ack == ISN + 1 and s.flags & ACK for s in segs)
    assert len(tcp.flow.unacked) == 2560
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 2000)
    assert len(tcp.flow.unacked) == 560
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 2560)
    assert len(tcp.flow.unacked) == 0
    assert tcp.out() == []
    assert tcp.flow.bytes_to_guest == 2560


def test_host_read_only_while_guest_window_has_room(tcp: Tcp) -> None:
    tcp.open(wscale=None, window=1500)
    tcp.host_data(b"a" * 4000)
    segs = tcp.out()
    assert sum(len(s.payload) for s in segs) == 1500
    assert len(tcp.sock.readable) == 2500, "the rest stays in the host socket"
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 1500, window=1500)
    assert sum(len(s.payload) for s in tcp.out()) == 1500
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 3000, window=3000)
    assert sum(len(s.payload) for s in tcp.out()) == 1000
    assert tcp.sock.readable == b""


def test_zero_window_probed_then_resumed(tcp: Tcp) -> None:
    tcp.open(window=0)
    tcp.host_data(b"q" * 10)
    assert tcp.out() == []
    assert c(tcp, "tcp.window.zero") == 1
    tcp.advance(0.21)
    (probe,) = tcp.out()
    assert probe.seq == OUR_ISS and probe.payload == b"" and probe.flags == ACK
    tcp.advance(0.2)
    assert tcp.out() == [], "probes back off"
    tcp.advance(0.21)
    assert len(tcp.out()) == 1
    assert c(tcp, "tcp.window.probe") == 2
    # The guest answers a probe with its (now open) window: data flows.
    tcp.send(ACK, ISN + 1, OUR_ISS + 1, window=100)
    (s,) = tcp.out()
    assert s.payload == b"q" * 10


def test_retransmission_on_timeout_with_backoff(tcp: Tcp) -> None:
    tcp.open()
    tcp.host_data(b"lost segment")
    (s,) = tcp.out()
    tcp.advance(0.99)
    assert tcp.out() == []
    tcp.advance(0.02)
    (r,) = tcp.out()
    assert (r.seq, r.payload) == (s.seq, b"lost segment")
    tcp.advance(1.9)
    assert tcp.out() == [], "the second timeout waits twice as long"
    tcp.advance(0.2)
    (r,) = tcp.out()
    assert r.seq == s.seq
    assert c(tcp, "tcp.retransmit.timeout") == 2
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 12)
    tcp.advance(10)
    assert tcp.out() == []


def test_fast_retransmit_on_three_dup_acks_and_partial_ack(tcp: Tcp) -> None:
    tcp.open(mss=100)
    tcp.host_data(bytes(500))
    segs = tcp.out()
    assert len(segs) == 5
    for _ in range(2):
        tcp.send(ACK, ISN + 1, OUR_ISS + 1)
    assert tcp.out() == []
    tcp.send(ACK, ISN + 1, OUR_ISS + 1)
    (r,) = tcp.out()
    assert r.seq == OUR_ISS + 1 and len(r.payload) == 100
    assert c(tcp, "tcp.retransmit.fast") == 1
    # A partial ACK (the guest also lost the third segment) retransmits the next hole at once.
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 200)
    (r,) = tcp.out()
    assert r.seq == OUR_ISS + 1 + 200
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 500)
    assert tcp.out() == []
    assert not tcp.flow.in_recovery


def test_rtt_estimate_sets_rto_floor(tcp: Tcp) -> None:
    tcp.open()
    tcp.host_data(b"x")
    tcp.out()
    tcp.advance(0.001)
    tcp.send(ACK, ISN + 1, OUR_ISS + 2)
    assert tcp.flow.srtt == pytest.approx(0.001)
    assert tcp.flow.rto == pytest.approx(0.2)


# -- closing ----------------------------------------------------------------------


def test_guest_fin_is_half_close(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(ACK | FIN, ISN + 1, OUR_ISS + 1, b"bye")
    assert bytes(tcp.sock.written) == b"bye"
    assert tcp.sock.shut_wr
    assert tcp.out() == [], "the ACK is held for our FIN to carry"
    tcp.advance(DELACK_S)  # the host did not close: it goes out bare
    (s,) = tcp.out()
    assert s.ack == ISN + 1 + 4
    assert tcp.flow.state_name == "CLOSE_WAIT"
    # The other direction still works.
    tcp.host_data(b"reply")
    (s,) = tcp.out()
    assert s.payload == b"reply"


def test_host_eof_is_fin_after_data_then_reaped(tcp: Tcp) -> None:
    tcp.open()
    tcp.sock.eof = True
    tcp.host_data(b"last words")
    data, fin = tcp.out()
    assert data.payload == b"last words"
    assert fin.flags == FIN | ACK and fin.seq == OUR_ISS + 1 + 10
    assert tcp.flow.state_name == "FIN_WAIT"
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 11)
    assert tcp.flow.fin_acked
    # The guest can still send; then its FIN closes both.
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 12, b"more")
    assert bytes(tcp.sock.written) == b"more"
    tcp.out()
    flow = tcp.flow
    tcp.send(ACK | FIN, ISN + 5, OUR_ISS + 12)
    (s,) = tcp.out()
    assert s.ack == ISN + 6
    assert flow.io_data.closed and not flow.io_data.reset
    assert flow.state_name == "CLOSED"
    # A retransmitted FIN while it lingers is acknowledged again.
    tcp.send(ACK | FIN, ISN + 5, OUR_ISS + 12)
    (s,) = tcp.out()
    assert s.ack == ISN + 6
    tcp.advance(REAP_DELAY_S + 0.01)
    assert len(tcp.nat.table) == 0
    assert c(tcp, "tcp.flow.closed") == 1


def test_guest_closed_first_is_freed_when_our_fin_is_acked(tcp: Tcp) -> None:
    """The guest's FIN came first: once our FIN is acknowledged we are where a kernel is in
    LAST_ACK -> CLOSED (the guest holds TIME_WAIT): no linger, no timer, no table entry."""
    tcp.open()
    flow, sock = tcp.flow, tcp.sock
    tcp.send(ACK | FIN, ISN + 1, OUR_ISS + 1)
    assert flow.state_name == "CLOSE_WAIT"
    sock.eof = True
    tcp.nat.host_readable(flow, tcp.now)
    (fin,) = tcp.out()
    assert fin.flags == FIN | ACK and fin.ack == ISN + 2
    assert flow.state_name == "LAST_ACK"
    tcp.send(ACK, ISN + 2, fin.seq + 1)
    assert tcp.out() == []
    assert sock.closed and not sock.reset
    assert flow.state == CLOSED and flow.reap_deadline is None
    assert len(tcp.nat.table) == 0
    assert flow not in tcp.io.timers, "no reap timer"
    assert c(tcp, "tcp.flow.closed") == 1
    # The 4-tuple is free for the guest's next connection at once.
    tcp.send(SYN, ISN + 100, options=build_syn_options(1460, 7))
    assert tcp.flow is not flow and tcp.flow.state_name == "CONNECTING"


def test_we_closed_first_lingers_for_the_guests_fin(tcp: Tcp) -> None:
    """Host EOF first: our FIN goes first and the guest, in LAST_ACK, may retransmit its FIN
    until it hears our ACK, so the flow lingers REAP_DELAY_S answering it."""
    tcp.open()
    flow = tcp.flow
    tcp.sock.eof = True
    tcp.nat.host_readable(flow, tcp.now)
    (fin,) = tcp.out()
    tcp.send(ACK | FIN, ISN + 1, fin.seq + 1)
    (ack,) = tcp.out()
    assert ack.flags == ACK and ack.ack == ISN + 2
    assert flow.state_name == "CLOSED" and flow.io_data.closed
    assert list(tcp.nat.table) == [flow]
    assert tcp.io.timers[flow] == pytest.approx(tcp.now + REAP_DELAY_S)
    tcp.advance(REAP_DELAY_S / 2)
    tcp.send(ACK | FIN, ISN + 1, fin.seq + 1)
    (again,) = tcp.out()
    assert again.flags == ACK and again.ack == ISN + 2
    assert c(tcp, "tcp.segment.fin_retransmit") == 1
    tcp.advance(REAP_DELAY_S / 2 + 0.01)
    assert len(tcp.nat.table) == 0


def test_simultaneous_close_lingers(tcp: Tcp) -> None:
    """Both FINs cross (the guest's does not acknowledge ours): both sides end in TIME_WAIT
    as RFC 9293 has it, so ours lingers too."""
    tcp.open()
    flow = tcp.flow
    tcp.sock.eof = True
    tcp.nat.host_readable(flow, tcp.now)
    (fin,) = tcp.out()
    tcp.send(ACK | FIN, ISN + 1, fin.seq)
    tcp.out()
    assert flow.state_name == "LAST_ACK"
    tcp.send(ACK, ISN + 2, fin.seq + 1)
    assert flow.state_name == "CLOSED" and flow.io_data.closed
    assert list(tcp.nat.table) == [flow]
    assert tcp.io.timers[flow] == pytest.approx(tcp.now + REAP_DELAY_S)


def test_fin_retransmitted(tcp: Tcp) -> None:
    tcp.open()
    tcp.sock.eof = True
    tcp.nat.host_readable(tcp.flow, tcp.now)
    (fin,) = tcp.out()
    tcp.advance(1.01)
    (r,) = tcp.out()
    assert r.flags & FIN and r.seq == fin.seq


def test_guest_rst_resets_host(tcp: Tcp) -> None:
    tcp.open()
    flow = tcp.flow
    tcp.send(RST, ISN + 1)
    assert flow.io_data.closed and flow.io_data.reset
    assert len(tcp.nat.table) == 0
    assert tcp.out() == []


def test_in_window_rst_gets_challenge_ack(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(RST, ISN + 100)
    (s,) = tcp.out()
    assert s.flags == ACK and s.ack == ISN + 1
    assert len(tcp.nat.table) == 1
    tcp.send(SYN, ISN + 77)
    (s,) = tcp.out()
    assert s.flags == ACK
    assert c(tcp, "tcp.segment.rst_challenge") == 1
    assert c(tcp, "tcp.segment.syn_challenge") == 1


@pytest.mark.parametrize("exc", [ConnectionResetError(errno.ECONNRESET, "reset")])
def test_host_reset_resets_guest(tcp: Tcp, exc: OSError) -> None:
    tcp.open()
    flow = tcp.flow
    tcp.sock.recv_error = exc
    tcp.nat.host_readable(flow, tcp.now)
    (s,) = tcp.out()
    assert s.flags == RST | ACK and s.seq == OUR_ISS + 1
    assert flow.io_data.closed
    assert len(tcp.nat.table) == 0
    assert c(tcp, "tcp.host.reset") == 1


def test_host_write_error_resets_guest(tcp: Tcp) -> None:
    tcp.open()
    tcp.sock.send_error = BrokenPipeError(errno.EPIPE, "pipe")
    tcp.send(ACK, ISN + 1, OUR_ISS + 1, b"x")
    (s,) = tcp.out()
    assert s.flags == RST | ACK
    assert len(tcp.nat.table) == 0


def test_idle_established_flow_kept_2h4m_then_reset(tcp: Tcp) -> None:
    tcp.open()
    flow = tcp.flow
    tcp.advance(IDLE_TIMEOUT_S - 1)
    assert len(tcp.nat.table) == 1
    tcp.advance(2)
    (s,) = tcp.out()
    assert s.flags == RST | ACK
    assert flow.io_data.reset
    assert c(tcp, "tcp.flow.idle_timeout") == 1


def test_guest_gone_gives_up_after_retransmits(tcp: Tcp) -> None:
    tcp.open()
    tcp.host_data(b"x")
    for _ in range(40):
        tcp.advance(60)
    assert len(tcp.nat.table) == 0
    assert c(tcp, "tcp.flow.retransmit_timeout") == 1
    tcp.out()


# -- no flow ----------------------------------------------------------------------


def test_unknown_flow_gets_rst_per_rfc9293(tcp: Tcp) -> None:
    tcp.send(ACK, 1234, 98765, b"data")
    (s,) = tcp.out()
    assert s.flags == RST and s.seq == 98765
    tcp.send(FIN, 1234)
    (s,) = tcp.out()
    assert s.flags == RST | ACK and s.seq == 0 and s.ack == 1235
    tcp.send(RST, 1234)
    assert tcp.out() == []
    assert c(tcp, "tcp.segment.unknown_flow") == 2
    assert c(tcp, "tcp.segment.unknown_flow_rst") == 1


def test_bad_flags_and_options_counted(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(SYN | FIN, ISN + 1)
    assert c(tcp, "tcp.segment.bad_flags") == 1
    # A SYN whose option runs past the header is dropped by the option parser.
    tcp.send(SYN, ISN, sport=999, options=bytes([OPT_MSS, 9, 0, 0]))
    assert c(tcp, "tcp.bad_option") == 1
    assert tcp.out() == []


def test_stats(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(ACK, ISN + 1, OUR_ISS + 1, b"12345")
    tcp.out()
    (info,) = tcp.nat.flows_info(tcp.now + 2)
    assert info["proto"] == "tcp"
    if tcp.version == 4:
        assert info["guest"] == "10.0.2.15:40000" and info["dst"] == "10.0.2.2:8080"
        assert info["host"] == "127.0.0.1:8080"
    else:
        assert info["guest"] == "[fd00::15]:40000" and info["dst"] == "[fd00::2]:8080"
        assert info["host"] == "[::1]:8080"
    assert info["state"] == "ESTABLISHED" and info["bytes_to_host"] == 5
    assert info["age_s"] == 2
    assert tcp.nat.counts_by_state() == {"ESTABLISHED": 1}


def test_host_loopback_unreachable_answers_icmp_net_unreachable(
    make_core: Any, frames: Any
) -> None:
    """slirp4netns's --disable-host-loopback: the SYN gets ICMP net unreachable, not RST."""
    from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
    from scapy.layers.l2 import Ether

    from guestnet.core.icmp import IcmpService

    core = make_core(no_host_loopback=True, host_loopback_unreachable=True)
    policy = Policy(core.config)
    icmp = IcmpService(core.config, core.pool, core.counters, core.switch, policy, None)
    core.classifier.icmp = icmp
    t = Tcp(core, frames)
    t.nat.unreachable = icmp.send_unreachable
    t.send(SYN, ISN, dst=GATEWAY_IP, dport=8080)
    (raw,) = core.take_sent()
    pkt = Ether(raw)
    assert TCP not in pkt or TCPerror in pkt
    assert (pkt[ICMP].type, pkt[ICMP].code, pkt[IP].src) == (3, 0, "10.0.2.2")
    assert pkt[IPerror].dst == "10.0.2.2" and pkt[TCPerror].dport == 8080
    assert core.counters["tcp.policy.host_loopback"] == 1
    assert t.io.connects == []
    # Other refusals keep their RST; so does the gateway without the option (test above).
    t.send(SYN, ISN, dst=bytes([169, 254, 169, 254]))
    (s,) = t.out()
    assert s.flags == RST | ACK
    # The gateway still answers ping.
    core.feed(frames.icmp(dst=GATEWAY_IP))
    (reply,) = core.take_sent()
    assert (Ether(reply)[ICMP].type, Ether(reply)[IP].src) == (0, "10.0.2.2")


@pytest.mark.parametrize(("err", "code"), [(errno.ENETUNREACH, 0), (errno.EHOSTUNREACH, 1)])
def test_unroutable_destination_answered_with_icmp_unreachable(
    tcp: Tcp, err: int, code: int
) -> None:
    """No route on the host (connect fails at once): the guest hears ICMP destination
    unreachable from the gateway, as a router would answer, not an RST."""
    sent: list[tuple[object, int, bytes]] = []
    tcp.nat.unreachable = lambda pkt, code, origin: sent.append((pkt, code, origin))
    tcp.io.connect_error = err
    tcp.send(SYN, ISN, dst=tcp.remote, dport=443)
    assert tcp.out() == [], "no RST"
    # IPv4's codes (net 0, host 1), whatever the family: the ICMP service maps them to ICMPv6's.
    assert [(got, origin) for _pkt, got, origin in sent] == [(code, tcp.gateway)]
    assert len(tcp.nat.table) == 0 and c(tcp, "tcp.connect.unreachable") == 1


def test_refused_connect_still_rst_with_icmp_wired(tcp: Tcp) -> None:
    sent: list[object] = []
    tcp.nat.unreachable = lambda *a: sent.append(a)
    tcp.io.connect_error = errno.ECONNREFUSED
    tcp.send(SYN, ISN)
    (s,) = tcp.out()
    assert s.flags == RST | ACK and sent == []
