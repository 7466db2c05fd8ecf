"""Forwarded connections, the per-connection work: what an accept, a handshake toward the guest
and a close cost in frames and socket calls (issue 12).

The core is driven with the fake host socket of test_tcp.py; the accept path runs a whole
Instance on loopback sockets with the collecting guest port of test_tcp_forward.py.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.forwards import Forward
from guestnet.io.loop import Loop
from guestnet.wire.tcp import ACK, FIN, PSH, SYN, build_syn_options

from .test_tcp import ISN, OUR_ISS, OUR_WSCALE, Tcp
from .test_tcp_forward import GISN, GUEST_PORT, Fwd, Guest


@pytest.fixture
def fwd(core: Any, frames: Any) -> Iterator[Fwd]:
    tcp = Tcp(core, frames)
    yield Fwd(tcp)
    tcp.nat.close_all()


@pytest.fixture
def tcp(core: Any, frames: Any) -> Iterator[Tcp]:
    t = Tcp(core, frames)
    yield t
    t.nat.close_all()


@pytest.fixture
def inst() -> Iterator[Instance]:
    instance = Instance(Config(), loop=Loop())
    try:
        yield instance
    finally:
        instance.close()
        assert instance.pool_to_guest.in_use == 0


# -- the handshake toward the guest ---------------------------------------------------------------


def test_syn_ack_then_client_data_in_the_same_turn_is_one_segment(
    fwd: Fwd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's SYN-ACK is handled before the loop reports the client's first bytes (same
    turn): the data segment carries our ACK, no bare ACK goes before it."""
    flow, sock = fwd.open()
    (syn,) = fwd.tcp.out()
    flush = fwd.tcp.flush
    monkeypatch.setattr(fwd.tcp, "flush", lambda: None)  # the turn is not over yet
    fwd.guest(flow, SYN | ACK, GISN, syn.seq + 1, options=build_syn_options(1460, 7))
    assert fwd.tcp.out() == [], "the ACK is held to the end of the turn"
    assert flow.state_name == "ESTABLISHED"
    sock.readable += b"x"
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (d,) = fwd.tcp.out()
    assert d.flags == ACK | PSH and d.payload == b"x"
    assert d.seq == OUR_ISS + 1 and d.ack == GISN + 1
    # The window is scaled from the SYN-ACK on: the field says the room shifted by our scale.
    assert d.window == min(sock.room >> OUR_WSCALE, 0xFFFF)
    flush()  # the end of the turn: nothing left to acknowledge
    assert fwd.tcp.out() == []


def test_syn_ack_without_client_data_acked_bare_at_the_end_of_the_turn(fwd: Fwd) -> None:
    flow, sock = fwd.open()
    (syn,) = fwd.tcp.out()
    fwd.guest(flow, SYN | ACK, GISN, syn.seq + 1, options=build_syn_options(1460, 7))
    (a,) = fwd.tcp.out()
    assert a.flags == ACK and a.payload == b"" and a.ack == GISN + 1
    assert a.window == min(sock.room >> OUR_WSCALE, 0xFFFF)
    # Nothing else is waiting: no second ACK at a later turn or timer.
    fwd.tcp.advance(0.01)
    assert fwd.tcp.out() == []


def test_syn_ack_when_guest_declines_scaling_keeps_the_window_unscaled(
    fwd: Fwd, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow, sock = fwd.open()
    (syn,) = fwd.tcp.out()
    monkeypatch.setattr(fwd.tcp, "flush", lambda: None)
    fwd.guest(flow, SYN | ACK, GISN, syn.seq + 1, options=build_syn_options(1460, None))
    sock.readable += b"hello"
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (d,) = fwd.tcp.out()
    assert d.payload == b"hello" and d.ack == GISN + 1
    assert d.window == min(sock.room, 0xFFFF)


# -- closing ------------------------------------------------------------------------------------


def test_guest_fin_after_our_acked_fin_closes_without_shutdown(fwd: Fwd) -> None:
    """The host client closed first (a forwarded request): the guest's FIN acknowledging ours
    closes the socket at once; no shutdown(SHUT_WR) before that close."""
    flow, sock = fwd.establish()
    sock.eof = True
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (fin,) = fwd.tcp.out()
    assert fin.flags == FIN | ACK
    fwd.guest(flow, FIN | ACK, GISN + 1, fin.seq + 1)
    (a,) = fwd.tcp.out()
    assert a.flags == ACK and a.ack == GISN + 2
    assert flow.state_name == "CLOSED"
    assert sock.closed and not sock.reset
    assert not sock.shut_wr


def test_guest_fin_before_our_fin_is_acked_still_half_closes(tcp: Tcp) -> None:
    """Our FIN sent but not yet acknowledged: the guest's FIN is a half-close (shutdown)."""
    tcp.open()
    tcp.sock.eof = True
    tcp.host_data(b"")
    (fin,) = tcp.out()
    assert fin.flags == FIN | ACK
    tcp.send(ACK | FIN, ISN + 1, OUR_ISS + 1)  # does not acknowledge our FIN
    assert tcp.sock.shut_wr and not tcp.sock.closed


# -- window updates -----------------------------------------------------------------------------


def test_writable_event_with_an_unchanged_small_window_sends_nothing(tcp: Tcp) -> None:
    """EPOLLOUT comes with every event on a writable socket: a small window that did not grow
    is not announced again; one that grew is."""
    tcp.open()
    tcp.sock.room = 1000  # below one MSS
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"x")
    tcp.advance(0.002)  # the held ACK goes out with the small window
    (s,) = tcp.out()
    assert s.window == 1000 >> OUR_WSCALE
    tcp.nat.host_writable(tcp.flow, tcp.now)
    assert tcp.out() == []
    assert tcp.core.counters["tcp.window.update"] == 0
    tcp.sock.room = 1 << 20
    tcp.nat.host_writable(tcp.flow, tcp.now)
    (s,) = tcp.out()
    assert s.flags == ACK and s.ack == ISN + 2 and s.window == (1 << 20) >> OUR_WSCALE
    assert tcp.core.counters["tcp.window.update"] == 1


# -- the accept path, on real sockets -----------------------------------------------------------


def test_forward_hook_gets_the_peer_address_from_accept(inst: Instance) -> None:
    got: list[tuple[Forward, socket.socket, tuple[Any, ...]]] = []
    inst.forwards.on_accept = lambda f, conn, peer: got.append((f, conn, peer))
    fw = inst.forwards.add("tcp", 0, 80)
    with socket.create_connection(("127.0.0.1", fw.host_port), timeout=2) as client:
        for _ in range(5):
            inst.loop.run_once(0.01)
        ((f, conn, peer),) = got
        try:
            assert f is fw and peer == client.getsockname()
            assert isinstance(conn, socket.socket) and conn.getblocking() is False
            assert conn.get_inheritable() is False
            assert conn.family == socket.AF_INET and conn.type == socket.SOCK_STREAM
            # Options set on the listener are the accepted socket's too: none set per accept.
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            conn.close()


def test_forwarded_flow_names_the_client_from_accept_without_getpeername(
    inst: Instance, frames: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = socket.socket.getpeername

    def counting(self: socket.socket) -> Any:
        calls.append(self.fileno())
        return real(self)

    monkeypatch.setattr(socket.socket, "getpeername", counting)
    guest = Guest(inst, frames)
    fw = inst.forwards.add("tcp", 0, GUEST_PORT)
    with socket.create_connection(("127.0.0.1", fw.host_port), timeout=2) as client:
        guest.turn()
        ((syn, _),) = guest.segs()
        assert syn.flags == SYN
        (flow,) = inst.tcp_nat.flows()
        assert flow["host"] == f"127.0.0.1:{client.getsockname()[1]}"
    assert calls == []


def test_large_mtu_forward_asks_the_real_room_and_sends_no_window_update(
    inst: Instance, frames: Any
) -> None:
    """At a 64 KiB MTU the initial-size estimate is below one MSS: the accepted socket's real
    room (grown at its handshake) is announced, and the client's EOF (which comes with
    EPOLLOUT) brings our FIN alone, no window update."""
    assert inst.tcp_nat.fresh_room < inst.tcp_nat.nat.our_mss  # MTU 65520 by default
    guest = Guest(inst, frames)
    fw = inst.forwards.add("tcp", 0, GUEST_PORT)
    client = socket.create_connection(("127.0.0.1", fw.host_port), timeout=2)
    try:
        client.sendall(b"x")
        guest.turn()
        ((syn, _),) = guest.segs()
        assert syn.window == 0xFFFF  # loopback: MiBs of room, more than the field holds
        guest.send(GUEST_PORT, syn.sport, GISN, syn.seq + 1, SYN | ACK)
        guest.turn()
        segs = guest.segs()
        assert b"".join(p for _, p in segs) == b"x"
        assert all(t.window << OUR_WSCALE >= inst.tcp_nat.nat.our_mss for t, _ in segs)
        guest.send(GUEST_PORT, syn.sport, GISN + 1, syn.seq + 2, ACK | PSH, b"y")
        assert client.recv(1) == b"y"  # relayed at once; its ACK is held for our answer
        client.close()
        guest.turn()
        *bare, (fin, _) = guest.segs()
        assert fin.flags == FIN | ACK and fin.ack == GISN + 2
        # A slow turn may have let the held ACK go bare (counted), never a window update.
        assert len(bare) == inst.counters["tcp.ack.delayed"]
        assert inst.counters["tcp.window.update"] == 0
        guest.send(GUEST_PORT, syn.sport, GISN + 2, fin.seq + 1, FIN | ACK)
        guest.turn()
        ((last, _),) = guest.segs()
        assert last.flags == ACK and last.ack == GISN + 3
        assert inst.tcp_nat.flows()[0]["state"] == "CLOSED"
    finally:
        client.close()


def test_guest_address_text_follows_a_new_lease_after_being_asked(inst: Instance) -> None:
    """The text of the guest's address is kept between forwarded connections, and made anew
    when the lease changes."""
    fw = inst.forwards.add("tcp", 0, 80)
    leased = [ipaddress.IPv4Address("10.0.2.15")]

    class Dhcp:
        def guest_address(self) -> ipaddress.IPv4Address:
            return leased[0]

    inst.dhcp = Dhcp()  # type: ignore[assignment]
    assert inst.forwards.guest_ip_for(fw) == "10.0.2.15"
    assert inst.forwards.guest_ip_for(fw) == "10.0.2.15"
    leased[0] = ipaddress.IPv4Address("10.0.2.42")
    assert inst.forwards.guest_ip_for(fw) == "10.0.2.42"


def test_large_mtu_guest_connect_announces_the_real_room(inst: Instance, frames: Any) -> None:
    """The same for a connection the guest opens: at a 64 KiB MTU our SYN-ACK announces the
    connected socket's room, not the initial-size estimate (below one MSS), so a request larger
    than that estimate goes in one segment, with no window check or update."""
    nat = inst.tcp_nat.nat
    assert inst.tcp_nat.fresh_room < nat.our_mss  # MTU 65520 by default
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        guest = Guest(inst, frames)
        port = srv.getsockname()[1]
        guest.send(41000, port, GISN, 0, SYN)
        guest.turn()
        ((synack, _),) = guest.segs()
        assert synack.flags == SYN | ACK
        # A SYN's window is never scaled: loopback's MiBs fill the field (the estimate would
        # have said 14,336 bytes, less than a quarter of one MSS).
        assert synack.window == 0xFFFF
        conn, _ = srv.accept()
        with conn:
            request = bytes(range(256)) * 120  # 30,720 bytes: twice the estimate
            assert len(request) > inst.tcp_nat.fresh_room
            guest.send(41000, port, GISN + 1, synack.seq + 1, ACK | PSH, request)
            guest.turn()
            got = b""
            conn.settimeout(2)
            while len(got) < len(request):
                got += conn.recv(65536)
            assert got == request
            conn.send(b"ok")
            guest.turn()
            # Our ACK of a segment of more than one (guest) MSS went at the end of its turn.
            *acks, (answer, data) = guest.segs()
            assert data == b"ok" and answer.ack == GISN + 1 + len(request)
            assert [t.flags for t, _ in acks] == [ACK] * len(acks)
            assert all(t.window << OUR_WSCALE >= nat.our_mss for t, _ in [*acks, (answer, data)])
            assert inst.counters["tcp.window.update"] == 0
    finally:
        srv.close()
