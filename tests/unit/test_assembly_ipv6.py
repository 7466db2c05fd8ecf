"""The assembly's IPv6 wiring: NDP in the classifier, the router-advertisement timer on the loop
(driven here by a scripted clock), DNS over IPv6 routed, ``ipv6=False`` building none of it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.ndp import MAX_INITIAL_RTR_ADVERT_INTERVAL_S
from guestnet.io.links import StreamLink
from guestnet.io.loop import Loop
from guestnet.wire.icmpv6 import ND_ROUTER_ADVERT


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _frames(sock: socket.socket) -> list[bytes]:
    """Every stream frame waiting on ``sock`` (4-byte big-endian length, then the frame)."""
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    out = []
    while data:
        (n,) = struct.unpack_from("!I", data)
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def inst(clock: Clock) -> Iterator[Instance]:
    instance = Instance(Config(), loop=Loop(clock), echo_mode=None)
    try:
        yield instance
    finally:
        instance.close()


def test_ipv6_slots_plugged(inst: Instance) -> None:
    c = inst.classifier
    assert c.ndp is inst.ndp is not None
    assert c.dns6_udp is inst.dns
    assert c.reassembly6 is inst.reassembly6
    # The NAT services and DNS over TCP are family-neutral: the same objects take IPv6.
    assert c.udp_nat6 is c.udp_nat is inst.udp_nat.nat
    assert c.tcp_nat6 is c.tcp_nat and c.dns6_tcp is c.dns_tcp
    assert c.icmp6 is inst.icmp.icmp


def test_periodic_ra_on_the_loop_timer(inst: Instance, clock: Clock) -> None:
    ours, theirs = socket.socketpair()
    link = StreamLink(inst.hub, ours, "qemu0")
    link.port.ip6_seen = True  # its guest has spoken IPv6 (else it gets no advertisements)
    try:
        ndp = inst.ndp
        assert ndp is not None
        deadline = ndp.next_deadline()
        assert deadline is not None
        assert 0 < deadline - clock.now <= MAX_INITIAL_RTR_ADVERT_INTERVAL_S
        inst.loop.run_once(0)
        assert _frames(theirs) == []  # not due yet
        clock.now = deadline
        inst.loop.run_once(0)
        (ra,) = _frames(theirs)
        assert ra[0:6] == bytes.fromhex("333300000001") and ra[12:14] == b"\x86\xdd"
        assert ra[54] == ND_ROUTER_ADVERT and ra[21] == 255
        assert inst.counters["ndp.ra.unsolicited"] == 1  # the one at start found no port
        nxt = ndp.next_deadline()
        assert nxt is not None and nxt > deadline
        clock.now = nxt  # the timer was re-armed: the next one goes out on time too
        inst.loop.run_once(0)
        assert len(_frames(theirs)) == 1
    finally:
        theirs.close()


def test_no_ipv6_builds_nothing(clock: Clock) -> None:
    instance = Instance(Config(ipv6=False), loop=Loop(clock), echo_mode=None)
    try:
        assert instance.ndp is None and instance.classifier.ndp is None
        assert instance.classifier.reassembly6 is None and instance.classifier.dns6_udp is None
    finally:
        instance.close()


def test_close_cancels_the_ra_timer(clock: Clock) -> None:
    instance = Instance(Config(), loop=Loop(clock), echo_mode=None)
    assert instance.ndp is not None
    deadline = instance.ndp.next_deadline()
    instance.close()
    assert instance.loop.timers.next_deadline() is None
    assert deadline is not None


def test_dhcp6_slot_plugged(clock: Clock) -> None:
    instance = Instance(Config(), loop=Loop(clock), echo_mode=None)
    try:
        assert instance.dhcp6 is not None
        assert instance.classifier.dhcp6 is instance.dhcp6
        assert instance.dhcp6.leases(clock.now) == []
    finally:
        instance.close()
    off = Instance(Config(ipv6=False), loop=Loop(clock), echo_mode=None)
    try:
        assert off.dhcp6 is None and off.classifier.dhcp6 is None
    finally:
        off.close()
