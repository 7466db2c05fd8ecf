"""The half-open bound (``--max-half-open``) and SYN cookies: a SYN flood from the guest, random
source ports, holds at most the cap of flows with an unfinished handshake (each a host connect);
past it every SYN is answered with a SYN cookie and nothing is kept, while an established flow
keeps carrying data both ways and a guest that answers a cookie gets its connection. Fake host
I/O and a scripted clock."""

from __future__ import annotations

import errno
import random
from typing import Any

import pytest

from guestnet.core.tcp.cookies import SLOT_S
from guestnet.core.tcp.flow import CONNECTING, ESTABLISHED, SYN_RCVD
from guestnet.wire.tcp import ACK, PSH, RST, SYN, build_syn_options

from .test_tcp import ISN, OUR_ISS, FakeSock, Tcp

CAP = 64
FLOOD = 30_000


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def tcp(make_core: Any, frames: Any, request: pytest.FixtureRequest) -> Any:
    core = make_core(max_half_open=CAP, max_flows=FLOOD * 2)
    harness = Tcp(core, frames, request.param)
    yield harness
    harness.nat.close_all()
    assert core.pool.in_use == 0


def test_syn_flood_keeps_half_open_flows_at_the_cap(tcp: Tcp) -> None:
    tcp.open()
    legit = tcp.flow
    legit_sock: FakeSock = legit.io_data
    rng = random.Random(13)
    for i in range(FLOOD):
        tcp.send(SYN, rng.getrandbits(32), sport=rng.randrange(1024, 65536), dst=tcp.remote)
        if i % 1000 == 0:
            tcp.advance(0.001)
            assert tcp.nat.half_open <= CAP
    assert tcp.nat.half_open == CAP
    # The first CAP SYNs hold flows (host connects); every later one got a cookie and nothing
    # was kept or evicted (random ports may repeat: a repeated SYN is absorbed by its flow).
    accepted = tcp.core.counters["tcp.syn.accepted"]
    cookies = tcp.core.counters["tcp.syn.cookie_sent"]
    assert accepted == CAP + 1  # 1: the legitimate flow
    assert cookies > FLOOD - 1000 and tcp.core.counters["tcp.half_open.evicted"] == 0
    assert len(tcp.nat.table) == CAP + 1 and len(tcp.io.connects) == CAP + 1
    states = [f.state for f in tcp.nat.table]
    assert states.count(CONNECTING) == CAP and states.count(ESTABLISHED) == 1
    synacks = tcp.out()
    assert len(synacks) == cookies and all(s.flags == SYN | ACK for s in synacks)
    assert all(s.options.mss for s in synacks)  # a cookie SYN-ACK carries our options
    # The established flow still carries data both ways.
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, payload=b"ping")
    tcp.flush()
    assert bytes(legit_sock.written) == b"ping"
    legit_sock.readable += b"pong"
    tcp.nat.host_readable(legit, tcp.now)
    tcp.flush()
    data = [s for s in tcp.out() if s.payload]
    assert [s.payload for s in data] == [b"pong"] and data[0].dport == tcp.sport
    assert legit.state == ESTABLISHED and legit in list(tcp.nat.table)


def _fill(tcp: Tcp) -> None:
    """CAP flows waiting on their host connects: the half-open table is full."""
    for port in range(30000, 30000 + CAP):
        tcp.send(SYN, ISN, sport=port, dst=tcp.remote)
    assert tcp.nat.half_open == CAP
    assert tcp.out() == []


def test_a_cookie_answered_opens_the_connection(tcp: Tcp) -> None:
    """Past the cap, a SYN gets a cookie; the guest's ACK of it opens the flow (host connect),
    which is ESTABLISHED once the host accepts, with the options the SYN offered; data the
    guest sent before that is not acknowledged, and comes again."""
    _fill(tcp)
    tcp.send(SYN, ISN, sport=41000, dst=tcp.remote, options=build_syn_options(1400, 5))
    (synack,) = tcp.out()
    assert synack.flags == SYN | ACK and synack.ack == ISN + 1 and synack.dport == 41000
    assert synack.options.wscale is not None
    cookie = synack.seq
    connects = len(tcp.io.connects)
    tcp.send(ACK, ISN + 1, cookie + 1, sport=41000, dst=tcp.remote, window=100)
    assert len(tcp.io.connects) == connects + 1
    flow = list(tcp.nat.table)[-1]
    assert flow.cookie and flow.state == CONNECTING and flow.key[1] == 41000
    assert flow.mss == 1220 and flow.guest_wscale == 5  # 1400 rounds down to the table's 1220
    tcp.send(ACK | PSH, ISN + 1, cookie + 1, sport=41000, dst=tcp.remote, payload=b"early")
    assert tcp.out() == [] and bytes(flow.io_data.written) == b""
    tcp.nat.host_connected(flow, 0, tcp.now)
    assert flow.state == ESTABLISHED and flow.snd_wnd == 100 << 5
    assert tcp.core.counters["tcp.half_open.evicted"] == 1  # the cookie flow made its room
    tcp.send(ACK | PSH, ISN + 1, cookie + 1, sport=41000, dst=tcp.remote, payload=b"early")
    assert bytes(flow.io_data.written) == b"early"
    flow.io_data.readable += b"late"
    tcp.nat.host_readable(flow, tcp.now)
    tcp.flush()
    data = [s for s in tcp.out() if s.dport == 41000 and s.payload]
    assert data[0].payload == b"late" and data[0].seq == cookie + 1


def test_a_refused_cookie_connection_gets_rst_in_its_sequence_space(tcp: Tcp) -> None:
    _fill(tcp)
    tcp.send(SYN, ISN, sport=41001, dst=tcp.remote)
    (synack,) = tcp.out()
    tcp.send(ACK, ISN + 1, synack.seq + 1, sport=41001, dst=tcp.remote)
    flow = list(tcp.nat.table)[-1]
    tcp.out()  # the evicted oldest half-open flow's RST
    tcp.nat.host_connected(flow, errno.ECONNREFUSED, tcp.now)
    (rst,) = tcp.out()
    assert rst.flags & RST and rst.seq == synack.seq + 1 and rst.dport == 41001
    assert flow not in list(tcp.nat.table)


def test_forged_or_stale_cookies_are_refused(tcp: Tcp) -> None:
    _fill(tcp)
    tcp.send(SYN, ISN, sport=41002, dst=tcp.remote)
    (synack,) = tcp.out()
    connects = len(tcp.io.connects)
    for bad_ack in (synack.seq, synack.seq + 2, (synack.seq + 1) ^ 0x10):  # not cookie + 1
        tcp.send(ACK, ISN + 1, bad_ack, sport=41002, dst=tcp.remote)
        (rst,) = tcp.out()
        assert rst.flags == RST
    tcp.send(ACK, ISN + 2, synack.seq + 1, sport=41002, dst=tcp.remote)  # another guest ISN
    tcp.send(ACK, ISN + 1, synack.seq + 1, sport=41003, dst=tcp.remote)  # another port
    assert len(tcp.out()) == 2
    tcp.advance(2 * SLOT_S + 1)  # two time slots later the cookie has expired
    tcp.out()  # (the half-open flows' connects timed out meanwhile: RSTs)
    tcp.send(ACK, ISN + 1, synack.seq + 1, sport=41002, dst=tcp.remote)
    assert [s.flags for s in tcp.out()] == [RST]
    assert len(tcp.io.connects) == connects
    assert tcp.core.counters["tcp.syn.cookie_accepted"] == 0


def test_evicted_syn_rcvd_gets_rst_and_a_finished_handshake_leaves_the_count(tcp: Tcp) -> None:
    """A flow whose host connect completed waits on the guest: evicted to make room for a flow
    a cookie opened, the guest gets RST and the host connection is reset. A flow that completes
    its handshake is no longer counted."""
    first_sport = 20000
    tcp.send(SYN, ISN, sport=first_sport, dst=tcp.remote)
    (first,) = list(tcp.nat.table)
    tcp.nat.host_connected(first, 0, tcp.now)
    assert first.state == SYN_RCVD
    (synack,) = tcp.out()
    assert synack.flags == SYN | ACK
    # A second one completes its handshake: it leaves the half-open count.
    tcp.send(SYN, ISN, sport=20001, dst=tcp.remote)
    second = list(tcp.nat.table)[-1]
    tcp.nat.host_connected(second, 0, tcp.now)
    tcp.out()
    tcp.send(ACK, ISN + 1, OUR_ISS + 1, sport=20001, dst=tcp.remote)
    assert second.state == ESTABLISHED and tcp.nat.half_open == 1
    for port in range(30000, 30000 + CAP - 1):
        tcp.send(SYN, ISN, sport=port, dst=tcp.remote)
    assert tcp.nat.half_open == CAP and tcp.out() == []
    tcp.send(SYN, ISN, sport=31000, dst=tcp.remote)  # past the cap: a cookie
    (synack,) = tcp.out()
    tcp.send(ACK, ISN + 1, synack.seq + 1, sport=31000, dst=tcp.remote)
    assert tcp.nat.half_open == CAP
    assert tcp.core.counters["tcp.half_open.evicted"] == 1
    (rst,) = tcp.out()
    assert rst.flags & RST and rst.dport == first_sport
    assert first.io_data.closed and first.io_data.reset
    assert first not in list(tcp.nat.table)
    assert second.state == ESTABLISHED and not second.io_data.closed


def test_a_backlogged_link_gets_cookies_from_a_sixteenth_of_the_cap(tcp: Tcp) -> None:
    """While the link reports a backlog (the guest sends faster than we read), SYNs get cookies
    once CAP/16 handshakes are open; without a backlog the full path goes on to the cap."""
    tcp.core.port.backlog = True
    for port in range(30000, 30000 + CAP // 16):
        tcp.send(SYN, ISN, sport=port, dst=tcp.remote)
    assert tcp.out() == [] and tcp.nat.half_open == CAP // 16
    tcp.send(SYN, ISN, sport=31000, dst=tcp.remote)
    (synack,) = tcp.out()
    assert synack.flags == SYN | ACK and tcp.nat.half_open == CAP // 16
    tcp.core.port.backlog = False
    tcp.send(SYN, ISN, sport=31001, dst=tcp.remote)
    assert tcp.out() == [] and tcp.nat.half_open == CAP // 16 + 1
