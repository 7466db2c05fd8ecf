"""IPv4 reassembly (guest -> guestnet) and fragmentation (guestnet -> guest).

Guest fragments are made by scapy's ``fragment`` and fed through the classifier; a recording
UDP handler shows what the reassembler re-injected. Fragments toward the guest are put back
together by scapy's ``defragment``.
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, UDP, defragment, fragment
from scapy.layers.l2 import Ether

from guestnet.core.fragments import (
    MAX_DATAGRAMS,
    MAX_HELD_BYTES,
    MAX_PIECES,
    PIECE_OVERHEAD,
    REASSEMBLY_TIMEOUT_S,
    Reassembler,
    fragment_frame,
    send_ipv4_to_guest,
)
from guestnet.core.packet import IpPacket
from guestnet.wire.ethernet import ETH_HLEN, ETHERTYPE_IPV4, build_ethernet
from guestnet.wire.ipv4 import PROTO_UDP, build_ipv4
from guestnet.wire.udp import build_udp

GUEST_MAC = "52:54:00:12:34:56"
OUR_MAC = "52:55:0a:00:02:02"


class Recorder:
    """A UDP handler keeping (sport, dport, payload) of every whole datagram."""

    def __init__(self) -> None:
        self.got: list[tuple[int, int, bytes]] = []

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        self.got.append((sport, dport, bytes(payload)))


@pytest.fixture
def rig(core: Any) -> tuple[Any, Reassembler, Recorder]:
    rec = Recorder()
    core.classifier.udp_nat = rec
    reasm = Reassembler(core.counters, core.classifier.route_ipv4)
    core.classifier.reassembly = reasm
    return core, reasm, rec


def guest_fragments(payload: bytes, size: int = 1480, ident: int = 77, **ip: Any) -> list[bytes]:
    pkt = Ether(dst=OUR_MAC, src=GUEST_MAC) / IP(
        src="10.0.2.15", dst="198.18.0.9", id=ident, **ip
    ) / UDP(sport=40000, dport=9999) / payload  # fmt: skip
    return [bytes(Ether(dst=OUR_MAC, src=GUEST_MAC) / f) for f in fragment(pkt[IP], size)]


def raw_fragment(offset: int, data: bytes, more: bool, ident: int = 5) -> bytes:
    """A hand-made fragment of a UDP datagram (protocol 17), any offset and length."""
    buf = bytearray(ETH_HLEN + 20 + len(data))
    off = build_ethernet(buf, 0, bytes.fromhex("52550a000202"), bytes.fromhex("525400123456"),
                         ETHERTYPE_IPV4)  # fmt: skip
    frag = (offset // 8) | (0x2000 if more else 0)
    off = build_ipv4(buf, off, bytes([10, 0, 2, 15]), bytes([198, 18, 0, 9]), PROTO_UDP,
                     len(data), ident=ident, frag=frag)  # fmt: skip
    buf[off:] = data
    return bytes(buf)


PAYLOAD = bytes(range(256)) * 16  # 4096 bytes: three fragments at MTU 1500


def test_in_order(rig: Any) -> None:
    core, reasm, rec = rig
    parts = guest_fragments(PAYLOAD)
    assert len(parts) == 3
    for p in parts:
        core.feed(p)
    assert rec.got == [(40000, 9999, PAYLOAD)]
    assert core.counters["ipv4.fragment.reassembled"] == 1
    assert len(reasm) == 0


def test_out_of_order(rig: Any) -> None:
    core, _reasm, rec = rig
    parts = guest_fragments(PAYLOAD, size=600)
    for p in reversed(parts):
        core.feed(p)
    assert rec.got == [(40000, 9999, PAYLOAD)]


def test_interleaved_datagrams_and_exact_duplicates(rig: Any) -> None:
    core, _reasm, rec = rig
    a = guest_fragments(b"A" * 3000, ident=1)
    b = guest_fragments(b"B" * 3000, ident=2)
    core.feed(a[0])
    core.feed(b[1])
    core.feed(a[0])  # retransmission: ignored
    core.feed(b[0])
    core.feed(a[1])
    core.feed(b[2])
    core.feed(a[2])
    assert rec.got == [(40000, 9999, b"B" * 3000), (40000, 9999, b"A" * 3000)]
    assert core.counters["ipv4.fragment.duplicate"] == 1


def test_overlap_drops_the_datagram(rig: Any) -> None:
    core, reasm, rec = rig
    udp = bytearray(8 + 40)
    build_udp(udp, 0, 40000, 9999, 40, bytes([10, 0, 2, 15]), bytes([198, 18, 0, 9]))
    core.feed(raw_fragment(0, bytes(udp[:24]), more=True))
    core.feed(raw_fragment(16, bytes(udp[16:48]), more=False))  # overlaps bytes 16..23
    core.feed(raw_fragment(24, bytes(udp[24:48]), more=False))  # would complete it: too late
    assert rec.got == []
    assert core.counters["ipv4.fragment.overlap"] == 1
    assert core.counters["ipv4.fragment.after_overlap"] == 1
    assert reasm.held_bytes() == 0


def test_bad_pieces(rig: Any) -> None:
    core, _reasm, rec = rig
    core.feed(raw_fragment(0, b"x" * 13, more=True))  # not a multiple of 8
    core.feed(raw_fragment(65528, b"x" * 16, more=False))  # beyond 64 KiB
    core.feed(raw_fragment(16, b"x" * 8, more=False, ident=9))  # the end is 24
    core.feed(raw_fragment(32, b"x" * 8, more=True, ident=9))  # past the known end
    assert core.counters["ipv4.fragment.bad_length"] == 1
    assert core.counters["ipv4.fragment.too_big"] == 1
    assert core.counters["ipv4.fragment.bad_end"] == 1
    assert rec.got == []


def test_timeout(rig: Any) -> None:
    core, reasm, rec = rig
    parts = guest_fragments(PAYLOAD)
    core.feed(parts[0])
    core.feed(parts[1])
    assert reasm.expire(core.now + REASSEMBLY_TIMEOUT_S - 0.1) == 0
    core.now += REASSEMBLY_TIMEOUT_S
    core.feed(parts[2])  # arrives too late: the old pieces are gone, this one starts afresh
    assert rec.got == []
    assert core.counters["ipv4.fragment.timeout"] == 1
    assert len(reasm) == 1
    assert reasm.expire(core.now + REASSEMBLY_TIMEOUT_S) == 1


def test_memory_bound(rig: Any) -> None:
    core, reasm, rec = rig
    big = guest_fragments(b"z" * 60000, ident=1000)
    for p in big[:-1]:
        core.feed(p)
    held = reasm.held_bytes()
    assert 58000 < held <= 65535
    for ident in range(MAX_DATAGRAMS + 10):
        core.feed(guest_fragments(b"y" * 2000, ident=ident)[0])
    assert len(reasm) == MAX_DATAGRAMS
    assert core.counters["ipv4.fragment.evicted"] == 11
    assert reasm.held_bytes() <= MAX_DATAGRAMS * 65535
    core.feed(big[-1])  # the big datagram was evicted: its last piece completes nothing
    assert rec.got == []


def test_tiny_pieces_are_bounded_per_datagram_and_in_bytes(rig: Any) -> None:
    """8-byte pieces: a datagram is dropped at MAX_PIECES; across datagrams, the bytes charged
    (payload plus per-piece overhead) never pass MAX_HELD_BYTES, the oldest go first."""
    core, reasm, rec = rig
    for i in range(MAX_PIECES + 5):
        core.feed(raw_fragment(8 * (2 * i + 1), b"t" * 8, True, ident=1))
    assert core.counters["ipv4.fragment.too_many_pieces"] == 1
    assert core.counters["ipv4.fragment.after_overlap"] == 4  # the dead datagram's later pieces
    assert reasm.charged_bytes() == 0
    # Many datagrams of many 1,480-byte pieces each: the byte bound holds, oldest evicted.
    for ident in range(2, 40):
        for i in range(40):
            core.feed(raw_fragment(1480 * i, b"p" * 1480, True, ident=ident))
        assert reasm.charged_bytes() <= MAX_HELD_BYTES
    assert core.counters["ipv4.fragment.evicted_bytes"] > 0
    assert reasm.held_bytes() + len(reasm) * 40 * PIECE_OVERHEAD >= reasm.charged_bytes() > 0
    # A datagram that completes gives its bytes back; the count stays exact.
    for p in guest_fragments(b"w" * 3000, ident=999):
        core.feed(p)
    assert rec.got == [(40000, 9999, b"w" * 3000)]
    reasm.expire(core.now + 3600)
    assert len(reasm) == 0 and reasm.charged_bytes() == 0


def _udp_frame(pool: Any, payload: bytes) -> Any:
    frame = pool.acquire()
    buf = frame.view
    start = frame.start
    src, dst = bytes([198, 18, 0, 9]), bytes([10, 0, 2, 15])
    off = build_ethernet(buf, start, bytes.fromhex("525400123456"), bytes.fromhex("52550a000202"),
                         ETHERTYPE_IPV4)  # fmt: skip
    l4 = off + 20
    buf[l4 + 8 : l4 + 8 + len(payload)] = payload
    build_udp(buf, l4, 9999, 40000, len(payload), src, dst)
    build_ipv4(buf, off, src, dst, PROTO_UDP, 8 + len(payload), ident=4242, frag=0)
    frame.length = ETH_HLEN + 28 + len(payload)
    return frame


def test_fragment_4000_bytes_at_mtu_1500(core: Any) -> None:
    payload = bytes(range(250)) * 16
    frames = fragment_frame(_udp_frame(core.pool, payload), 1500, core.pool)
    raws = [bytes(f.data) for f in frames]
    for f in frames:
        core.pool.release(f)
    assert len(raws) == 3
    ips = [Ether(r)[IP] for r in raws]
    assert all(len(bytes(ip)) <= 1500 for ip in ips)
    assert [ip.frag * 8 for ip in ips] == [0, 1480, 2960]
    assert [ip.flags.MF for ip in ips] == [1, 1, 0]
    assert all(ip.id == 4242 for ip in ips)
    for ip in ips:  # header checksums as scapy computes them
        ours = ip.chksum
        del ip.chksum
        assert IP(bytes(ip)).chksum == ours
    (whole,) = defragment([Ether(r)[IP] for r in raws])
    whole = IP(bytes(whole))
    assert bytes(whole[UDP].payload) == payload
    udp_sum = whole[UDP].chksum
    del whole[UDP].chksum
    assert IP(bytes(whole))[UDP].chksum == udp_sum


def test_send_ipv4_to_guest_only_fragments_when_needed(core: Any) -> None:
    sent: list[bytes] = []

    def send(frame: Any) -> None:
        sent.append(bytes(frame.data))
        core.pool.release(frame)

    assert send_ipv4_to_guest(_udp_frame(core.pool, b"s" * 1472), 1500, core.pool, send) == 1
    assert send_ipv4_to_guest(_udp_frame(core.pool, b"s" * 1473), 1500, core.pool, send) == 2
    assert [len(s) - ETH_HLEN for s in sent] == [1500, 1500, 21]
