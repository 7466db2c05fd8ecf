"""The half-open bound (``--max-half-open``): a SYN flood from the guest, random source ports,
keeps the flows with an unfinished handshake at the cap, oldest evicted and counted, while an
established flow keeps carrying data both ways. Fake host I/O and a scripted clock."""

from __future__ import annotations

import random
from typing import Any

import pytest

from guestnet.core.tcp.flow import CONNECTING, ESTABLISHED, SYN_RCVD
from guestnet.wire.tcp import ACK, PSH, RST, SYN

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
    socks: list[FakeSock] = []
    for i in range(FLOOD):
        tcp.send(SYN, rng.getrandbits(32), sport=rng.randrange(1024, 65536), dst=tcp.remote)
        if i % 1000 == 0:
            tcp.advance(0.001)
            assert tcp.nat.half_open <= CAP
        if i >= FLOOD - CAP:
            socks.append(list(tcp.nat.table)[-1].io_data)
    assert tcp.nat.half_open == CAP
    # The flood's flows still in the table are the newest CAP (random ports may repeat: a
    # repeated SYN is absorbed by its flow, so count only what the counters say).
    accepted = tcp.core.counters["tcp.syn.accepted"]
    evicted = tcp.core.counters["tcp.half_open.evicted"]
    assert accepted - 1 - evicted == CAP and evicted > FLOOD - 1000  # 1: the legitimate flow
    assert len(tcp.nat.table) == CAP + 1
    states = [f.state for f in tcp.nat.table]
    assert states.count(CONNECTING) == CAP and states.count(ESTABLISHED) == 1
    # Evicted connects were reset on the host; the guest was told nothing (it retransmits).
    assert tcp.out() == []
    assert not any(s.closed for s in socks)  # the newest survive
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


def test_evicted_syn_rcvd_gets_rst_and_a_finished_handshake_leaves_the_count(tcp: Tcp) -> None:
    """A flow whose host connect completed waits on the guest: evicted, the guest gets RST and
    the host connection is reset. A flow that completes its handshake is no longer counted."""
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
    for port in range(30000, 30000 + CAP):
        tcp.send(SYN, ISN, sport=port, dst=tcp.remote)
    assert tcp.nat.half_open == CAP
    assert tcp.core.counters["tcp.half_open.evicted"] == 1
    (rst,) = tcp.out()
    assert rst.flags & RST and rst.dport == first_sport
    assert first.io_data.closed and first.io_data.reset
    assert first not in list(tcp.nat.table)
    assert second.state == ESTABLISHED and not second.io_data.closed
