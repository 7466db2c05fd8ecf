"""The Internet checksum against a word-by-word reference, in the C extension and in Python.

The names imported from guestnet.wire.checksum are whichever implementation runs (the C one
unless GUESTNET_PURE=1); the tests at the end check both implementations directly.
"""

from __future__ import annotations

import random

import pytest

from guestnet.wire import pure
from guestnet.wire.checksum import checksum, ones_sum, pseudo_header_sum
from guestnet.wire.ipv4 import PROTO_UDP
from guestnet.wire.udp import build_udp, verify_udp

try:
    from guestnet.wire import _native
except ImportError:  # not built: the pure implementation is tested alone
    _native = None  # type: ignore[assignment]

IMPLS = [pure] if _native is None else [pure, _native]


def ref_ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 the slow, obvious way: 16-bit big-endian words, end-around carry."""
    if len(data) % 2:
        data = data + b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes, initial: int = 0) -> int:
    return ~ref_ones_sum(data, initial) & 0xFFFF


#: A size around which an implementation might switch strategy (numpy once took over here).
T = 768
SIZES = [0, 1, 2, 3, 20, 63, 64, 255, 256, T - 2, T - 1, T, T + 1, T + 2, 1500, 9001, 65535, 65536]


@pytest.mark.parametrize("size", SIZES)
def test_random_data_matches_reference(size: int) -> None:
    rng = random.Random(size)
    for _ in range(5):
        data = rng.randbytes(size)
        assert ones_sum(data) == ref_ones_sum(data)
        assert checksum(data) == ref_checksum(data)
        # Same answer whatever the buffer type a caller passes (frames are memoryviews).
        assert checksum(memoryview(bytearray(data))) == ref_checksum(data)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("initial", [0, 1, 0x1234, 0xFFFE, 0xFFFF, 0x2FFFD])
def test_initial_value_matches_reference(size: int, initial: int) -> None:
    data = random.Random(size * 7 + initial).randbytes(size)
    assert ones_sum(data, initial) == ref_ones_sum(data, initial)
    assert checksum(data, initial) == ref_checksum(data, initial)


@pytest.mark.parametrize("size", [1, 2, 3, T - 1, T, T + 1, 65535, 65536])
def test_all_ones_data(size: int) -> None:
    data = b"\xff" * size
    assert ones_sum(data) == ref_ones_sum(data)
    assert checksum(data) == ref_checksum(data)


@pytest.mark.parametrize("size", [0, 2, T, 65536])
def test_all_zero_data(size: int) -> None:
    data = bytes(size)
    assert ones_sum(data) == 0
    assert checksum(data) == 0xFFFF
    assert ones_sum(data, 0x1234) == 0x1234


@pytest.mark.parametrize("size", [T - 1, T])
def test_memoryview_slice_at_odd_offset(size: int) -> None:
    """A slice of a frame buffer starting at an odd address is summed correctly by both paths."""
    raw = bytearray(random.Random(3).randbytes(size + 1))
    view = memoryview(raw)[1:]
    assert checksum(view) == ref_checksum(bytes(raw[1:]))


def test_data_with_its_checksum_sums_to_zero() -> None:
    data = bytearray(random.Random(9).randbytes(1000)) + b"\x00\x00"
    csum = checksum(data)
    data[-2:] = csum.to_bytes(2, "big")
    assert checksum(data) == 0


def test_pseudo_header_sum() -> None:
    src, dst = bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34])
    words = src + dst + bytes([0, PROTO_UDP]) + (1234).to_bytes(2, "big")
    assert pseudo_header_sum(src, dst, PROTO_UDP, 1234) == ref_ones_sum(words)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_each_implementation_matches_reference(impl: object) -> None:
    """Both implementations directly, whichever one the datapath selected."""
    rng = random.Random(5)
    for n in (0, 1, 2, 3, 15, 16, 17, 100, 101, 1499, 1500, 4097, 65535, 65536):
        data = rng.randbytes(n)
        for initial in (0, 0x1F, 0xFFFF, 0x2FFFD, 0xFFFFFFFF):
            assert impl.ones_sum(data, initial) == ref_ones_sum(data, initial)  # type: ignore[attr-defined]
            assert impl.checksum(data, initial) == ref_checksum(data, initial)  # type: ignore[attr-defined]
    # An odd start address (a slice of a frame) changes nothing.
    raw = memoryview(bytearray(rng.randbytes(1001)))
    assert impl.checksum(raw[1:]) == ref_checksum(bytes(raw[1:]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_each_pseudo_sum_matches_reference(impl: object) -> None:
    rng = random.Random(11)
    for alen in (4, 16):
        for _ in range(200):
            src, dst = rng.randbytes(alen), rng.randbytes(alen)
            proto, length = rng.choice((6, 17, 58)), rng.randrange(65536)
            words = src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
            got = impl.pseudo_sum(src, dst, proto, length)  # type: ignore[attr-defined]
            assert got == pure.pseudo_sum(src, dst, proto, length)
            # Congruent to the word sum (the pure value keeps 0 where the sum folds to 0xffff).
            assert got % 0xFFFF == ref_ones_sum(words) % 0xFFFF


def _udp_payload_with_zero_checksum(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """A 2-byte payload chosen so that the UDP checksum computes to 0 (ones' sum 0xffff)."""
    length = 8 + 2
    rest = ref_ones_sum(
        sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + length.to_bytes(2, "big"),
        pseudo_header_sum(src, dst, PROTO_UDP, length),
    )
    # rest + word == 0xffff in ones' complement arithmetic.
    word = 0xFFFF - rest
    return word.to_bytes(2, "big")


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 3])
    payload = _udp_payload_with_zero_checksum(src, dst, 5353, 53)
    buf = bytearray(10)
    buf[8:] = payload
    build_udp(buf, 0, 5353, 53, 2, src, dst)
    # The raw computation really is 0 here ...
    raw = bytearray(buf)
    raw[6:8] = b"\x00\x00"
    assert ref_checksum(bytes(raw), pseudo_header_sum(src, dst, PROTO_UDP, 10)) == 0
    # ... and it goes on the wire as 0xffff, which still verifies.
    assert buf[6:8] == b"\xff\xff"
    assert verify_udp(memoryview(buf), src, dst, 10)
