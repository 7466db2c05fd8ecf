"""The TCP NAT's tests again, with every guest segment offered to the classifier's fast path.

A link with trusted checksums (a TAP with offloads) sends established-flow segments through
:meth:`guestnet.core.tcp.TcpNat.handle_fast` instead of the ordinary parse-and-route path. It must
behave exactly the same, so this module re-runs tests/unit/test_tcp.py with the fast path on and
every frame fed as ``csum_trusted``, and checks that the fast path was actually taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from unit import test_tcp as base
from unit.test_tcp import *  # noqa: F403  (re-collect every test with the fixture below)

#: Segments the fast path took, per harness (checked below: the tests above do go through it).
TAKEN: dict[int, int] = {}


@pytest.fixture
def tcp(core: Any, frames: Any) -> Iterator[base.Tcp]:
    harness = base.Tcp(core, frames)
    nat = harness.nat
    TAKEN[id(harness)] = 0

    def fast(*args: Any) -> bool:
        done = nat.handle_fast(*args)
        TAKEN[id(harness)] += done
        return done

    core.classifier.tcp_fast = fast
    feed = core.feed

    def trusted_feed(frame: bytes | bytearray, port: Any = None, **kw: Any) -> None:
        kw.setdefault("csum_trusted", True)
        feed(frame, port, **kw)

    core.feed = trusted_feed
    yield harness
    harness.nat.close_all()
    del TAKEN[id(harness)]


def test_fast_path_takes_established_segments_only(tcp: base.Tcp) -> None:
    tcp.open()
    assert TAKEN[id(tcp)] == 0, "SYN and the handshake ACK go the ordinary way"
    tcp.send(base.ACK | base.PSH, base.ISN + 1, base.OUR_ISS + 1, b"hello")
    assert TAKEN[id(tcp)] == 1
    assert bytes(tcp.sock.written) == b"hello"
    assert tcp.flow.rcv_nxt == base.ISN + 6
    # A segment for no flow is not taken (the ordinary path answers it with RST).
    tcp.send(base.ACK, 1, 1, sport=40001)
    assert TAKEN[id(tcp)] == 1
    assert [s.flags for s in tcp.out()][-1] & base.RST


def test_fast_path_leaves_a_bad_ip_checksum_to_the_ordinary_path(tcp: base.Tcp) -> None:
    tcp.open()
    frame = bytearray(tcp.frames.ipv4(base.PROTO_TCP, bytes(20), dst=tcp.dst))
    frame[24] ^= 0xFF  # the IPv4 header checksum
    tcp.core.feed(frame)
    assert TAKEN[id(tcp)] == 0
    assert base.c(tcp, "ipv4.bad_checksum") == 1
