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


def fast_harness(
    core: Any, frames: Any, version: int, taken: dict[int, int], trusted: bool
) -> Iterator[base.Tcp]:
    """A TCP harness whose classifier offers every segment to the fast path, counting in
    ``taken`` what it took; with ``trusted`` every frame is fed as ``csum_trusted``."""
    harness = base.Tcp(core, frames, version)
    nat = harness.nat
    taken[id(harness)] = 0

    def fast(*args: Any) -> bool:
        done = nat.handle_fast(*args)
        taken[id(harness)] += done
        return done

    core.classifier.tcp_fast = fast
    if trusted:
        feed = core.feed

        def trusted_feed(frame: bytes | bytearray, port: Any = None, **kw: Any) -> None:
            kw.setdefault("csum_trusted", True)
            feed(frame, port, **kw)

        core.feed = trusted_feed
    yield harness
    harness.nat.close_all()
    del taken[id(harness)]


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def tcp(core: Any, frames: Any, request: pytest.FixtureRequest) -> Iterator[base.Tcp]:
    yield from fast_harness(core, frames, request.param, TAKEN, trusted=True)


def test_fast_path_takes_established_segments_only(tcp: base.Tcp) -> None:
    tcp.open()
    assert TAKEN[id(tcp)] == 1, "the SYN goes the ordinary way, the handshake ACK the fast one"
    tcp.send(base.ACK | base.PSH, base.ISN + 1, base.OUR_ISS + 1, b"hello")
    assert TAKEN[id(tcp)] == 2
    assert bytes(tcp.sock.written) == b"hello"
    assert tcp.flow.rcv_nxt == base.ISN + 6
    # A segment for no flow is not taken (the ordinary path answers it with RST).
    tcp.send(base.ACK, 1, 1, sport=40001)
    assert TAKEN[id(tcp)] == 2
    assert [s.flags for s in tcp.out()][-1] & base.RST


def test_fast_path_leaves_a_bad_ip_checksum_to_the_ordinary_path(tcp: base.Tcp) -> None:
    if tcp.version == 6:
        pytest.skip("IPv6 has no header checksum")
    tcp.open()
    frame = bytearray(tcp.frames.ipv4(base.PROTO_TCP, bytes(20), dst=tcp.dst))
    frame[24] ^= 0xFF  # the IPv4 header checksum
    tcp.core.feed(frame)
    assert TAKEN[id(tcp)] == 1
    assert base.c(tcp, "ipv4.bad_checksum") == 1


def test_fast_path_leaves_ipv6_extension_headers_to_the_ordinary_path(tcp: base.Tcp) -> None:
    """A segment behind a destination-options header is walked by the ordinary path."""
    if tcp.version == 4:
        pytest.skip("IPv6 only")
    tcp.open()
    seg = bytearray(20)
    flags = base.ACK | base.PSH
    base.build_tcp(seg, 0, tcp.sport, tcp.dport, base.ISN + 1, base.OUR_ISS + 1, flags, 65535, 0,
                   tcp.guest_ip, tcp.dst)  # fmt: skip
    dest_opts = bytes([base.PROTO_TCP, 0, 1, 4, 0, 0, 0, 0])  # next header TCP, PadN
    tcp.core.feed(tcp.frames.ipv6(60, dest_opts + bytes(seg), dst=tcp.dst))
    assert TAKEN[id(tcp)] == 1, "not the fast path"
    assert tcp.flow.state_name == "ESTABLISHED"


def test_ipv6_guest_address_learned_on_the_fast_path(tcp: base.Tcp) -> None:
    if tcp.version == 4:
        pytest.skip("IPv6 only")
    tcp.open()
    tcp.core.port.ip6_last = b""
    tcp.send(base.ACK | base.PSH, base.ISN + 1, base.OUR_ISS + 1, b"x")
    assert TAKEN[id(tcp)] == 2 and tcp.core.port.ip6_last == tcp.guest_ip
