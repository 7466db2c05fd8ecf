"""The TCP NAT's tests once more, through the fast path on a link that does not vouch for checksums.

A QEMU stream or dgram link (no virtio-net header) hands over frames whose TCP checksums nobody
has checked; the classifier's fast path verifies them itself (``tcp_fast4``/``tcp_fast6`` with
``verify``, in guestnet.wire.native) so established flows on such links skip the ordinary
parse-and-route path too. It must behave exactly as the ordinary path: this module re-runs
tests/unit/test_tcp.py with the fast path on and every frame fed untrusted, checks that the
fast path was taken, and that a wrong TCP checksum is still dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from unit import test_tcp as base
from unit.test_tcp import *  # noqa: F403  (re-collect every test with the fixture below)
from unit.test_tcp_fast import fast_harness

#: Segments the fast path took, per harness.
TAKEN: dict[int, int] = {}


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def tcp(core: Any, frames: Any, request: pytest.FixtureRequest) -> Iterator[base.Tcp]:
    yield from fast_harness(core, frames, request.param, TAKEN, trusted=False)


def test_untrusted_fast_path_takes_established_segments(tcp: base.Tcp) -> None:
    tcp.open()
    assert TAKEN[id(tcp)] == 1, "the SYN goes the ordinary way, the handshake ACK the fast one"
    tcp.send(base.ACK | base.PSH, base.ISN + 1, base.OUR_ISS + 1, b"hello")
    assert TAKEN[id(tcp)] == 2
    assert bytes(tcp.sock.written) == b"hello"
    assert tcp.flow.rcv_nxt == base.ISN + 6


def test_untrusted_fast_path_drops_a_bad_tcp_checksum(tcp: base.Tcp) -> None:
    tcp.open()
    seg = bytearray(25)
    seg[20:] = b"hello"
    base.build_tcp(seg, 0, tcp.sport, tcp.dport, base.ISN + 1, base.OUR_ISS + 1,
                   base.ACK | base.PSH, 65535, 5, tcp.guest_ip, tcp.dst)  # fmt: skip
    seg[17] ^= 0x01  # the TCP checksum
    if tcp.version == 4:
        tcp.core.feed(tcp.frames.ipv4(base.PROTO_TCP, bytes(seg), dst=tcp.dst))
    else:
        tcp.core.feed(tcp.frames.ipv6(base.PROTO_TCP, bytes(seg), dst=tcp.dst))
    assert TAKEN[id(tcp)] == 1
    assert base.c(tcp, "tcp.bad_checksum") == 1
    assert bytes(tcp.sock.written) == b""
    assert tcp.flow.rcv_nxt == base.ISN + 1
