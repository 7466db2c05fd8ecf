"""Software segmentation of super-frames (core/gso.py, tso.py, uso.py), byte by byte.

Each test builds a super-frame as a guest kernel hands it over (one IP packet of many MSS, the
checksum field holding only the pseudo-header sum), cuts it, and compares every piece with the
frame the test's own builders (checked against scapy in test_wire.py) make for that piece:
headers, lengths, identification, sequence numbers, flags and checksums. scapy then checks
each piece's checksums independently, and the payloads joined must be the original.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from guestnet.core.gso import MAX_SEGMENTS, piece_count
from guestnet.core.tso import segment_tcp
from guestnet.core.uso import segment_udp
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import pseudo_header_sum
from guestnet.wire.ipv4 import FLAG_DF, FLAG_MF, PROTO_TCP, PROTO_UDP
from guestnet.wire.tcp import ACK, CWR, ECE, FIN, PSH

MAC_B = bytes.fromhex("5254000000bb")
IP_B = bytes([10, 0, 2, 16])
IP6_B = bytes.fromhex("fd000000000000000000000000000016")
#: Timestamps option (NOP, NOP, TS), as Linux puts on every segment.
TS_OPTION = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)
MSS = 1428  # IPv6 with timestamps at MTU 1500 (IPv4 would take 1448)
SEQ = 0xFFFFF000  # wraps within the super-frame


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 256) & 0xFF for i in range(n))


class Collect:
    """``emit``: keeps each frame's bytes and gives the buffer back."""

    def __init__(self, pool: FramePool) -> None:
        self.pool = pool
        self.frames: list[bytes] = []

    def __call__(self, frame: Frame) -> None:
        self.frames.append(bytes(frame.data))
        self.pool.release(frame)


@pytest.fixture
def pool() -> Any:
    p = FramePool(1500, 8)
    yield p
    assert p.in_use == 0


def _tcp_l4(frames: Any, v6: bool, flags: int, payload: bytes, seq: int = SEQ) -> bytes:
    src, dst = (frames.GUEST_IP6, IP6_B) if v6 else (frames.GUEST_IP, IP_B)
    return frames.tcp_segment(40000, 5001, flags, payload, TS_OPTION, src, dst, seq, 777)


def _frame(frames: Any, v6: bool, proto: int, l4: bytes, ident: int = 0x1234) -> bytes:
    if v6:
        return frames.ipv6(proto, l4, frames.GUEST_IP6, IP6_B, eth_dst=MAC_B)
    return frames.ipv4(proto, l4, frames.GUEST_IP, IP_B, eth_dst=MAC_B, ident=ident)


def _partial(frame: bytes, v6: bool, proto: int) -> bytes:
    """``frame`` with its L4 checksum replaced by the pseudo-header sum (offload)."""
    buf = bytearray(frame)
    l4 = 54 if v6 else 34
    src, dst = (buf[22:38], buf[38:54]) if v6 else (buf[26:30], buf[30:34])
    at = l4 + (16 if proto == PROTO_TCP else 6)
    struct.pack_into("!H", buf, at, pseudo_header_sum(bytes(src), bytes(dst), proto, len(buf) - l4))
    return bytes(buf)


def tcp_super(frames: Any, v6: bool, flags: int, payload: bytes) -> bytes:
    """A TCP super-frame A -> B as a guest kernel with TSO hands it over."""
    return _partial(_frame(frames, v6, PROTO_TCP, _tcp_l4(frames, v6, flags, payload)), v6,
                    PROTO_TCP)  # fmt: skip


def udp_super(frames: Any, v6: bool, payload: bytes) -> bytes:
    """A UDP super-frame A -> B (USO): one UDP header in front of every datagram's payload."""
    src, dst = (frames.GUEST_IP6, IP6_B) if v6 else (frames.GUEST_IP, IP_B)
    l4 = frames.udp_segment(40000, 5001, payload, src, dst)
    return _partial(_frame(frames, v6, PROTO_UDP, l4), v6, PROTO_UDP)


def expected_tcp(frames: Any, v6: bool, flags: int, payload: bytes) -> list[bytes]:
    """The segments a kernel cuts the super-frame into, built piece by piece."""
    chunks = [payload[i : i + MSS] for i in range(0, len(payload), MSS)]
    out = []
    for i, chunk in enumerate(chunks):
        f = flags
        if i:
            f &= ~CWR
        if i < len(chunks) - 1:
            f &= ~(FIN | PSH)
        l4 = _tcp_l4(frames, v6, f, chunk, (SEQ + i * MSS) & 0xFFFFFFFF)
        out.append(_frame(frames, v6, PROTO_TCP, l4, ident=0x1234 + i))
    return out


def _scapy_checks(data: bytes, v6: bool, proto: int) -> None:
    """scapy recomputes every checksum of ``data``: each must equal what is there."""
    pkt = Ether(data)
    layer = TCP if proto == PROTO_TCP else UDP
    fresh = pkt.copy()
    if not v6:
        del fresh[IP].chksum
    del fresh[layer].chksum
    fresh = Ether(bytes(fresh))
    if not v6:
        assert fresh[IP].chksum == pkt[IP].chksum
    assert fresh[layer].chksum == pkt[layer].chksum


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_super_frame_cut_into_segments(frames: Any, pool: FramePool, v6: bool) -> None:
    payload = _pattern(5 * MSS + 321)
    flags = ACK | PSH | FIN | CWR | ECE
    out = Collect(pool)
    count = segment_tcp(memoryview(tcp_super(frames, v6, flags, payload)), 6 if v6 else 4, MSS,
                        1500, pool, out)  # fmt: skip
    want = expected_tcp(frames, v6, flags, payload)
    assert count == 6 == len(want)
    assert out.frames == want
    joined = b""
    seq = SEQ
    for i, data in enumerate(out.frames):
        _scapy_checks(data, v6, PROTO_TCP)
        tcp = Ether(data)[TCP]
        assert tcp.seq == seq & 0xFFFFFFFF
        seq += len(bytes(tcp.payload))
        assert bool(tcp.flags & CWR) == (i == 0)
        assert bool(tcp.flags & (FIN | PSH)) == (i == 5)
        assert tcp.flags & (ACK | ECE) == ACK | ECE
        joined += bytes(tcp.payload)
        if v6:
            assert Ether(data)[IPv6].plen == len(data) - 54
        else:
            assert Ether(data)[IP].len == len(data) - 14
            assert Ether(data)[IP].id == 0x1234 + i
    assert joined == payload


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_super_frame_cut_into_datagrams(frames: Any, pool: FramePool, v6: bool) -> None:
    size = 1200
    payload = _pattern(7 * size + 5)
    out = Collect(pool)
    count = segment_udp(memoryview(udp_super(frames, v6, payload)), 6 if v6 else 4, size, 1500,
                        pool, out)  # fmt: skip
    assert count == 8
    src, dst = (frames.GUEST_IP6, IP6_B) if v6 else (frames.GUEST_IP, IP_B)
    chunks = [payload[at : at + size] for at in range(0, len(payload), size)]
    udp = [frames.udp_segment(40000, 5001, chunk, src, dst) for chunk in chunks]
    want = [_frame(frames, v6, PROTO_UDP, l4, ident=0x1234 + i) for i, l4 in enumerate(udp)]
    assert out.frames == want
    joined = b""
    for data in out.frames:
        _scapy_checks(data, v6, PROTO_UDP)
        udp = Ether(data)[UDP]
        assert udp.len == len(data) - (54 if v6 else 34)
        joined += bytes(udp.payload)
    assert joined == payload


def test_udp_checksum_computed_zero_is_sent_as_ones(frames: Any, pool: FramePool) -> None:
    """A datagram whose checksum computes to 0 carries 0xffff (RFC 768)."""
    for n in range(65536):
        chunk = struct.pack("!H", n)
        l4 = bytearray(frames.udp_segment(40000, 5001, chunk, frames.GUEST_IP, IP_B))
        if l4[6:8] == b"\xff\xff":
            break
    else:
        raise AssertionError("no payload with a zero checksum")
    payload = chunk + b"\x00\x00"  # the second datagram: two zero bytes
    out = Collect(pool)
    segment_udp(memoryview(udp_super(frames, False, payload)), 4, 2, 1500, pool, out)
    assert out.frames[0][40:42] == b"\xff\xff"
    _scapy_checks(out.frames[1], False, PROTO_UDP)


def test_payload_within_one_piece_is_one_whole_segment(frames: Any, pool: FramePool) -> None:
    payload = _pattern(1000)
    out = Collect(pool)
    sent = tcp_super(frames, False, ACK | PSH, payload)
    assert segment_tcp(memoryview(sent), 4, MSS, 1500, pool, out) == 1
    assert out.frames == expected_tcp(frames, False, ACK | PSH, payload)


def test_ident_and_sequence_wrap(frames: Any, pool: FramePool) -> None:
    frame = bytearray(tcp_super(frames, False, ACK, _pattern(3 * MSS)))
    struct.pack_into("!H", frame, 18, 0xFFFF)  # identification
    struct.pack_into("!H", frame, 24, 0)
    out = Collect(pool)
    segment_tcp(memoryview(frame), 4, MSS, 1500, pool, out)
    assert [struct.unpack_from("!H", f, 18)[0] for f in out.frames] == [0xFFFF, 0, 1]
    for data in out.frames:
        _scapy_checks(data, False, PROTO_TCP)


def _bad(frames: Any) -> list[tuple[str, bytes, int, int, str]]:
    """(name, frame, version, gso_size, reason) of super-frames that cannot be cut."""
    good = tcp_super(frames, False, ACK, _pattern(3 * MSS))
    truncated = bytearray(good)
    struct.pack_into("!H", truncated, 16, len(good))  # total length beyond the frame
    fragment = bytearray(good)
    struct.pack_into("!H", fragment, 20, FLAG_DF | FLAG_MF)
    short_doff = bytearray(good)
    short_doff[34 + 12] = 4 << 4
    many = tcp_super(frames, False, ACK, _pattern(MAX_SEGMENTS + 1))
    return [
        ("gso_size 0", good, 4, 0, "gso.bad_size"),
        ("over the mtu", good, 4, 1500, "gso.over_mtu"),
        ("too many", many, 4, 1, "gso.too_many"),
        ("version", good, 6, MSS, "gso.family"),
        ("truncated", bytes(truncated), 4, MSS, "gso.ipv4.bad_header"),
        ("fragment", bytes(fragment), 4, MSS, "gso.ipv4.fragment"),
        ("tcp header", bytes(short_doff), 4, MSS, "gso.tcp.bad_header"),
        ("not tcp", udp_super(frames, False, _pattern(3000)), 4, MSS, "gso.proto"),
        ("runt", good[:30], 4, MSS, "gso.truncated"),
    ]


def test_bad_super_frames_raise_before_anything_is_sent(frames: Any) -> None:
    pool = FramePool(1500, 8)
    for name, data, version, gso, reason in _bad(frames):
        out = Collect(pool)
        with pytest.raises(WireError) as exc:
            segment_tcp(memoryview(data), version, gso, 1500, pool, out)
        assert exc.value.reason == reason, name
        assert out.frames == [] and pool.in_use == 0, name


def test_piece_count_bounds() -> None:
    assert piece_count(0, 1448, 52, 1500) == 1
    assert piece_count(1448, 1448, 52, 1500) == 1
    assert piece_count(1449, 1448, 52, 1500) == 2
    assert piece_count(1448 * 3, 1448, 52, 1500) == 3
    with pytest.raises(WireError):
        piece_count(3000, 1449, 52, 1500)
