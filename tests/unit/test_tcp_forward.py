"""Forwarded TCP connections (host -> guest): the SYN we open toward the guest, and after.

The core is driven as in test_tcp.py (fake host socket, scripted clock); the last tests run a
whole Instance on loopback sockets (no root) with a collecting guest port, to check the driver:
accept, SYN on the guest link, relay, removal of the forward, and a guest with no MAC yet.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.port import Port
from guestnet.core.tcp import (
    DELACK_S,
    FORWARD_CONNECT_TIMEOUT_S,
    FORWARD_PORT_MAX,
    FORWARD_PORT_MIN,
    OUR_WSCALE,
    TcpFlow,
)
from guestnet.io.loop import Loop
from guestnet.pool import Frame
from guestnet.wire.ipv4 import PROTO_TCP, parse_ipv4
from guestnet.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    build_syn_options,
    build_tcp,
    parse_tcp,
)

from .test_tcp import GATEWAY_IP, GUEST_IP, OUR_ISS, FakeSock, Seg, Tcp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_PORT = 8080
GISN = 777000


class Fwd:
    """A TcpNat harness that opens flows toward the guest, as the driver would on accept."""

    def __init__(self, tcp: Tcp) -> None:
        self.tcp = tcp
        self.nat = tcp.nat

    def open(self, guest_port: int = GUEST_PORT, fid: str = "1") -> tuple[TcpFlow, FakeSock]:
        sock = FakeSock()
        flow = self.nat.open_to_guest(
            self.tcp.core.port,
            GUEST_MAC,
            GUEST_IP,
            guest_port,
            sock,
            ("127.0.0.1", 55555),
            fid,
            self.tcp.now,
        )
        assert flow is not None
        return flow, sock

    def guest(
        self, flow: TcpFlow, flags: int, seq: int, ack: int = 0, payload: bytes = b"", **kw: Any
    ) -> None:
        """A segment from the guest's socket on ``flow`` (guest port -> gateway:flow port)."""
        self.tcp.send(flags, seq, ack, payload, sport=flow.guest_port, dport=flow.dst_port, **kw)

    def establish(self, wscale: int | None = 7) -> tuple[TcpFlow, FakeSock]:
        flow, sock = self.open()
        (syn,) = self.tcp.out()
        self.guest(flow, SYN | ACK, GISN, syn.seq + 1, options=build_syn_options(1460, wscale))
        (ack,) = self.tcp.out()
        assert ack.flags == ACK and ack.seq == OUR_ISS + 1 and ack.ack == GISN + 1
        return flow, sock


@pytest.fixture
def fwd(core: Any, frames: Any) -> Iterator[Fwd]:
    tcp = Tcp(core, frames)
    yield Fwd(tcp)
    tcp.nat.close_all()


def c(fwd: Fwd, name: str) -> int:
    return int(fwd.tcp.core.counters[name])


def test_accept_sends_syn_from_gateway_with_options(fwd: Fwd) -> None:
    flow, _sock = fwd.open()
    (s,) = fwd.tcp.out()
    assert s.flags == SYN
    assert (s.src, s.dst, s.dport) == (GATEWAY_IP, GUEST_IP, GUEST_PORT)
    assert FORWARD_PORT_MIN <= s.sport <= FORWARD_PORT_MAX and s.sport == flow.dst_port
    assert s.seq == OUR_ISS and s.ack == 0
    assert s.options.mss == fwd.tcp.core.config.mtu - 40
    assert s.options.wscale == OUR_WSCALE
    assert not s.options.sack_permitted and s.options.timestamp is None
    assert 0 < s.window <= 0xFFFF
    assert flow.state_name == "SYN_SENT"
    info = flow.info(fwd.tcp.now)
    assert info["origin"] == "host" and info["forward"] == "1"
    assert info["guest"] == f"10.0.2.15:{GUEST_PORT}" and info["host"] == "127.0.0.1:55555"
    assert info["dst"] == f"10.0.2.2:{flow.dst_port}"
    assert c(fwd, "tcp.forward.syn") == 1


def test_source_ports_unique_and_round_the_range(fwd: Fwd) -> None:
    fwd.nat._fwd_port = 39999
    a, _ = fwd.open()
    b, _ = fwd.open()
    other, _ = fwd.open(guest_port=22)
    assert [a.dst_port, b.dst_port, other.dst_port] == [40000, 40001, 40002]
    # Round again from 39999: 40000 and 40001 are still used toward port 8080; 40002 is used
    # only toward port 22, so it is free for 8080.
    fwd.nat._fwd_port = 39999
    d, _ = fwd.open()
    assert d.dst_port == 40002
    fwd.nat._fwd_port = FORWARD_PORT_MAX - 1
    e, _ = fwd.open()
    f, _ = fwd.open()
    assert (e.dst_port, f.dst_port) == (FORWARD_PORT_MAX, FORWARD_PORT_MIN)
    fwd.tcp.out()


def test_syn_ack_then_ack_and_data_both_ways(fwd: Fwd) -> None:
    flow, sock = fwd.establish()
    assert flow.state_name == "ESTABLISHED" and flow.wscale_ok and flow.mss == 1460
    assert c(fwd, "tcp.forward.established") == 1
    # host -> guest
    sock.readable += b"GET / HTTP/1.0\r\n\r\n"
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (d,) = fwd.tcp.out()
    assert d.payload == b"GET / HTTP/1.0\r\n\r\n" and d.flags == ACK | PSH
    assert (d.sport, d.dport, d.seq) == (flow.dst_port, GUEST_PORT, OUR_ISS + 1)
    # guest -> host, with the ACK of that data
    fwd.guest(flow, ACK | PSH, GISN + 1, OUR_ISS + 1 + len(d.payload), b"HTTP/1.0 200 OK\r\n")
    assert bytes(sock.written) == b"HTTP/1.0 200 OK\r\n"
    fwd.tcp.advance(DELACK_S)  # a small segment: its ACK is held for an answer to carry
    (a,) = fwd.tcp.out()
    assert a.flags == ACK and a.ack == GISN + 1 + 17
    assert flow.unacked == b""
    # After the handshake the window we advertise is scaled by our shift.
    assert a.window == sock.room >> OUR_WSCALE


def test_no_window_scaling_when_guest_declines(fwd: Fwd) -> None:
    flow, sock = fwd.establish(wscale=None)
    assert not flow.wscale_ok and flow.guest_wscale == 0
    sock.readable += b"x"
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (d,) = fwd.tcp.out()
    assert d.window == min(sock.room, 0xFFFF)


def test_host_data_before_handshake_sent_after_it(fwd: Fwd) -> None:
    flow, sock = fwd.open()
    (syn,) = fwd.tcp.out()
    sock.readable += b"early"
    fwd.nat.host_readable(flow, fwd.tcp.now)
    assert fwd.tcp.out() == [], "nothing but the SYN before the guest answers"
    fwd.guest(flow, SYN | ACK, GISN, syn.seq + 1, options=build_syn_options(1460, 7))
    ack, data = fwd.tcp.out()
    assert ack.flags == ACK and data.payload == b"early"


def test_guest_rst_resets_host_at_once(fwd: Fwd) -> None:
    flow, sock = fwd.open()
    (syn,) = fwd.tcp.out()
    fwd.guest(flow, RST | ACK, 0, syn.seq + 1)
    assert sock.closed and sock.reset
    assert len(fwd.nat.table) == 0 and flow.io_data is sock
    assert c(fwd, "tcp.forward.refused") == 1
    assert fwd.tcp.io.timers == {}


def test_rst_without_ack_or_with_wrong_ack_ignored(fwd: Fwd) -> None:
    flow, sock = fwd.open()
    (syn,) = fwd.tcp.out()
    fwd.guest(flow, RST, 0)
    fwd.guest(flow, RST | ACK, 0, syn.seq + 5)
    assert not sock.closed and flow.state_name == "SYN_SENT"
    assert c(fwd, "tcp.segment.rst_no_ack") == 1
    assert c(fwd, "tcp.segment.rst_out_of_window") == 1


def test_syn_retransmitted_then_given_up(fwd: Fwd) -> None:
    flow, sock = fwd.open()
    syns: list[Seg] = list(fwd.tcp.out())
    for _ in range(int(FORWARD_CONNECT_TIMEOUT_S * 10)):
        fwd.tcp.advance(0.1)
        syns += fwd.tcp.out()
        if sock.closed:
            break
    assert sock.closed and sock.reset, "host client reset when the guest never answers"
    assert [s.flags for s in syns] == [SYN, SYN, SYN]
    assert {s.seq for s in syns} == {OUR_ISS}
    assert c(fwd, "tcp.forward.syn_retransmit") == 2
    assert c(fwd, "tcp.forward.timeout") == 1
    assert len(fwd.nat.table) == 0 and flow.state_name == "CLOSED"
    assert fwd.tcp.now - 1000.0 == pytest.approx(FORWARD_CONNECT_TIMEOUT_S, abs=0.11)


def test_stale_ack_gets_rst_then_syn_again(fwd: Fwd) -> None:
    """A guest socket in TIME_WAIT on the 4-tuple answers our SYN with its old ACK."""
    flow, sock = fwd.open()
    fwd.tcp.out()
    fwd.guest(flow, ACK, 123, 456)
    rst, syn = fwd.tcp.out()
    assert rst.flags == RST and rst.seq == 456
    assert syn.flags == SYN and syn.seq == OUR_ISS
    fwd.guest(flow, ACK, 123, 456)
    (rst2,) = fwd.tcp.out()  # once only: no SYN/ACK ping-pong with a confused guest
    assert rst2.flags == RST
    assert c(fwd, "tcp.forward.bad_ack") == 2
    fwd.guest(flow, SYN | ACK, GISN, OUR_ISS + 1, options=build_syn_options(1460, 7))
    assert flow.state_name == "ESTABLISHED" and not sock.closed
    fwd.tcp.out()


def test_syn_ack_retransmission_after_established_gets_ack(fwd: Fwd) -> None:
    flow, _sock = fwd.establish()
    fwd.guest(flow, SYN | ACK, GISN, OUR_ISS + 1, options=build_syn_options(1460, 7))
    (a,) = fwd.tcp.out()
    assert a.flags == ACK and a.ack == GISN + 1
    assert flow.state_name == "ESTABLISHED"


def test_table_full_refuses(make_core: Any, frames: Any) -> None:
    core = make_core(max_flows=1)
    tcp = Tcp(core, frames)
    f = Fwd(tcp)
    f.open()
    assert (
        tcp.nat.open_to_guest(
            core.port, GUEST_MAC, GUEST_IP, 80, FakeSock(), ("127.0.0.1", 1), "1", tcp.now
        )
        is None
    )
    assert int(core.counters["tcp.forward.table_full"]) == 1
    tcp.nat.close_all()
    core.take_sent()
    assert core.pool.in_use == 0


# -- a whole instance on loopback sockets ---------------------------------------------------------


class Guest:
    """A collecting port on an Instance's switch, playing the guest's TCP by hand."""

    def __init__(self, inst: Instance, frames: Any, learned: bool = True) -> None:
        self.inst = inst
        self.frames = frames
        self.sent: list[bytes] = []
        self.port = Port("guest0", self._collect)
        inst.switch.attach(self.port)
        if learned:
            inst.switch.learn(self.port, GUEST_MAC)

    def _collect(self, frame: Frame) -> None:
        self.sent.append(bytes(frame.data))
        self.inst.pool_to_guest.release(frame)

    def turn(self, n: int = 5) -> None:
        for _ in range(n):
            self.inst.loop.run_once(0.01)

    def segs(self) -> list[tuple[Any, bytes]]:
        out = []
        for raw in self.sent:
            ip = parse_ipv4(memoryview(raw)[14:])
            if ip.proto != PROTO_TCP:
                continue
            l4 = memoryview(raw)[14 + ip.header_len : 14 + ip.total_len]
            t = parse_tcp(l4)
            assert raw[:6] == GUEST_MAC
            out.append((t, bytes(l4[t.header_len :])))
        self.sent = []
        return out

    def send(
        self, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b""
    ) -> None:
        options = build_syn_options(1460, 7) if flags & SYN else b""
        hlen = 20 + len(options)
        buf = bytearray(hlen + len(payload))
        buf[hlen:] = payload
        build_tcp(
            buf,
            0,
            sport,
            dport,
            seq,
            ack,
            flags,
            65535,
            len(payload),
            GUEST_IP,
            GATEWAY_IP,
            options,
        )
        frame = self.frames.ipv4(PROTO_TCP, bytes(buf), dst=GATEWAY_IP)
        self.inst.classifier.handle_frame(memoryview(frame), self.port, self.inst.loop.now())


@pytest.fixture
def inst() -> Iterator[Instance]:
    instance = Instance(Config(), loop=Loop())
    try:
        yield instance
    finally:
        instance.close()
        assert instance.pool_to_guest.in_use == 0


def test_instance_relays_and_survives_forward_removal(inst: Instance, frames: Any) -> None:
    guest = Guest(inst, frames)
    fw = inst.forwards.add("tcp", 0, GUEST_PORT)
    client = socket.create_connection(("127.0.0.1", fw.host_port), timeout=2)
    try:
        client.sendall(b"ping")
        guest.turn()
        ((syn, _),) = guest.segs()
        assert syn.flags == SYN and syn.dport == GUEST_PORT
        flows = inst.tcp_nat.flows()
        assert len(flows) == 1 and flows[0]["origin"] == "host" and flows[0]["forward"] == fw.id
        guest.send(GUEST_PORT, syn.sport, GISN, syn.seq + 1, SYN | ACK)
        guest.turn()
        segs = guest.segs()
        assert segs[0][0].flags == ACK
        assert b"".join(p for _, p in segs) == b"ping"
        # The forward goes away: the listener closes, the relayed connection does not.
        inst.forwards.remove(fw.id)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", fw.host_port), timeout=1).close()
        guest.send(GUEST_PORT, syn.sport, GISN + 1, syn.seq + 5, ACK | PSH, b"pong")
        guest.turn()
        assert client.recv(16) == b"pong"
        client.sendall(b"more")
        guest.turn()
        assert b"".join(p for _, p in guest.segs()) == b"more"
        assert inst.tcp_nat.flows()[0]["state"] == "ESTABLISHED"
    finally:
        client.close()


def test_instance_guest_refusal_resets_client(inst: Instance, frames: Any) -> None:
    guest = Guest(inst, frames)
    fw = inst.forwards.add("tcp", 0, 9)
    client = socket.create_connection(("127.0.0.1", fw.host_port), timeout=2)
    try:
        guest.turn()
        ((syn, _),) = guest.segs()
        guest.send(9, syn.sport, 0, syn.seq + 1, RST | ACK)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        assert inst.counters["tcp.forward.refused"] == 1
    finally:
        client.close()


def test_instance_without_guest_mac_closes_client(inst: Instance, frames: Any) -> None:
    Guest(inst, frames, learned=False)
    fw = inst.forwards.add("tcp", 0, 80)
    client = socket.create_connection(("127.0.0.1", fw.host_port), timeout=2)
    try:
        for _ in range(10):
            inst.loop.run_once(0.01)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        assert inst.counters["forward.tcp.no_guest"] == 1
        assert inst.tcp_nat.flows() == []
    finally:
        client.close()


def test_closed_flow_rearms_reap_after_an_early_timer(fwd: Fwd) -> None:
    """The driver arms lazily: a timer for an earlier deadline (the RTO of our FIN) may fire
    after the flow closed and before its reap; the core must ask for the reap again."""
    flow, sock = fwd.establish()
    sock.eof = True
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (fin,) = fwd.tcp.out()
    fwd.guest(flow, FIN | ACK, GISN + 1, fin.seq + 1)
    fwd.tcp.out()
    assert flow.state_name == "CLOSED" and sock.closed and not sock.reset
    reap = fwd.tcp.io.timers.pop(flow)
    fwd.nat.on_timer(flow, reap - 0.5)  # the early timer
    assert fwd.tcp.io.timers.get(flow) == reap
    fwd.tcp.advance(reap - fwd.tcp.now)
    assert len(fwd.nat.table) == 0


def test_a_silent_host_client_is_reset_after_the_timeout(fwd: Fwd) -> None:
    """Slowloris: a client of a published port that sends nothing is reset (both ways) once
    ``forward_silent_timeout`` has passed since the accept; one that spoke is not."""
    timeout = fwd.tcp.core.config.forward_silent_timeout
    flow, sock = fwd.establish()
    talker, tsock = fwd.open()
    (syn,) = fwd.tcp.out()
    fwd.guest(talker, SYN | ACK, GISN, syn.seq + 1)
    fwd.tcp.out()
    tsock.readable += b"GET /"  # the host client speaks
    fwd.nat.host_readable(talker, fwd.tcp.now)
    fwd.tcp.flush()
    fwd.tcp.out()
    assert fwd.tcp.io.timers[flow] <= flow.created + timeout  # armed for it
    fwd.tcp.advance(timeout - 1)
    assert flow.state_name == "ESTABLISHED" and not sock.closed
    fwd.tcp.advance(2)
    assert c(fwd, "tcp.forward.silent_timeout") == 1
    assert sock.closed and sock.reset
    to_flow = [s for s in fwd.tcp.out() if s.sport == flow.dst_port]
    assert [s.flags & RST for s in to_flow] == [RST]
    assert talker.state_name == "ESTABLISHED" and not tsock.closed


def test_silent_host_clients_are_bounded_oldest_reset_first(make_core: Any, frames: Any) -> None:
    tcp = Tcp(make_core(max_silent_forwards=3), frames)
    fwd = Fwd(tcp)
    opened = [fwd.open() for _ in range(3)]
    spoke_flow, spoke_sock = opened[1]
    tcp.out()
    # The second one's client speaks (data waits for the handshake): it is no longer silent.
    fwd.guest(spoke_flow, SYN | ACK, GISN, OUR_ISS + 1)
    spoke_sock.readable += b"x"
    tcp.nat.host_readable(spoke_flow, tcp.now)
    tcp.flush()
    tcp.out()
    assert spoke_flow.bytes_to_guest == 1
    fwd.open()  # the fourth: the oldest silent one (the first) is reset
    assert c(fwd, "tcp.forward.silent_evicted") == 1
    assert opened[0][1].closed and not opened[2][1].closed and not spoke_sock.closed
    fwd.open()  # the fifth: the second's entry (it spoke) makes the room, nobody is reset
    assert c(fwd, "tcp.forward.silent_evicted") == 1
    fwd.open()  # the sixth: the third, silent and now the oldest, is reset
    assert c(fwd, "tcp.forward.silent_evicted") == 2
    assert opened[2][1].closed and not spoke_sock.closed
    tcp.nat.close_all()
