"""The C leaf operations (guestnet.wire._native) against their Python twins (guestnet.wire.pure).

Property tests: for random and malformed frames both implementations give the same bytes, the
same parsed tuples, None for the same frames and the same WireError reasons. Frames are built
valid and then mutated (bytes overwritten, cut short, lengthened), so the checks after each
early return are reached too. And a test that the extension is really built and selected where
a compiler is present: CI fails if the build broke silently.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.wire import WireError, native, pure

try:
    from guestnet.wire import _native
except ImportError:
    _native = None  # type: ignore[assignment]

OUR_MAC = bytes.fromhex("52550a000202")
GUEST_MAC = bytes.fromhex("525400123456")
BROADCAST = bytes([10, 0, 2, 255])
DNS4 = frozenset((bytes([10, 0, 2, 3]), bytes([10, 0, 2, 2])))
DNS6 = frozenset((bytes.fromhex("fd000000000000000000000000000003"),))


def _toolchain() -> bool:
    """A C compiler and the Python headers: what ``pip install`` needs to build the extension."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = sysconfig.get_paths()["include"]
    return shutil.which(cc) is not None and os.path.exists(os.path.join(include, "Python.h"))


def test_extension_is_built_where_a_compiler_is() -> None:
    """Where a compiler and headers are, ``pip install`` must have built the extension: an
    ImportError here means the optional build failed silently."""
    if not _toolchain():
        pytest.skip("no C compiler or Python headers: the pure fallback is expected")
    assert _native is not None, "guestnet.wire._native did not build (see setup.py)"


def test_selection_follows_the_environment() -> None:
    """The native implementation runs unless GUESTNET_PURE=1 (or it is not built)."""
    if os.environ.get("GUESTNET_PURE") == "1":
        assert not native.NATIVE
        assert native.checksum is pure.checksum
    elif _native is not None:
        assert native.NATIVE, native.WHY_PURE
        assert native.checksum is _native.checksum
        assert native.build_tcp_frame is _native.build_tcp_frame


@pytest.mark.skipif(_native is None, reason="extension not built")
def test_guestnet_pure_forces_the_fallback_in_a_fresh_interpreter() -> None:
    code = "from guestnet.wire import native; print(native.NATIVE)"
    for value, expect in (("1", "False"), ("0", "True")):
        env = dict(os.environ, GUESTNET_PURE=value)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == expect, out.stderr


needs_native = pytest.mark.skipif(_native is None, reason="extension not built")
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def both(name: str, *args: Any) -> tuple[Any, Any]:
    """Call ``name`` in both implementations; an exception becomes ('raise', type, reason)."""
    out = []
    for impl in (pure, _native):
        try:
            res = getattr(impl, name)(*args)
        except WireError as exc:
            res = ("raise", "WireError", exc.reason)
        if isinstance(res, tuple) and res and isinstance(res[0], memoryview | bytes):
            # The TCP segment is a view into the frame: compare its type and contents.
            res = (type(res[0]).__name__, bytes(res[0]), *res[1:])
        out.append(res)
    return out[0], out[1]


# -- mutations of valid frames ------------------------------------------------------------------

mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 200), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 200), st.just(0)),
    st.tuples(st.just("grow"), st.integers(0, 40), st.integers(0, 255)),
)


def mutate(frame: bytes, muts: list[tuple[str, int, int]]) -> bytearray:
    buf = bytearray(frame)
    for kind, a, b in muts:
        if kind == "set" and buf:
            buf[a % len(buf)] = b
        elif kind == "cut":
            del buf[a:]
        elif kind == "grow":
            buf += bytes([b]) * a
    return buf


addr4 = st.sampled_from(
    [bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34]), BROADCAST, *DNS4, bytes([224, 0, 0, 1])]
) | st.binary(min_size=4, max_size=4)
addr6 = st.sampled_from(
    [
        bytes.fromhex("fd000000000000000000000000000015"),
        *DNS6,
        bytes.fromhex("ff02" + "00" * 13 + "01"),
    ]
) | st.binary(min_size=16, max_size=16)
port_st = st.sampled_from([53, 80, 8080, 40000]) | st.integers(0, 65535)
opts_st = st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x01\x03\x03\x07"])


@st.composite
def tcp_frames(draw: st.DrawFn, v6: bool) -> bytes:
    """A valid TCP frame from the guest (built by the pure builder), of either family."""
    addr = addr6 if v6 else addr4
    plen = draw(st.integers(0, 64))
    opts = draw(opts_st)
    hdrs = 14 + (40 if v6 else 20) + 20 + len(opts)
    buf = bytearray(max(hdrs + plen, 60))
    buf[hdrs : hdrs + plen] = draw(st.binary(min_size=plen, max_size=plen))
    n = pure.build_tcp_frame(
        buf, 0, 6 if v6 else 4, OUR_MAC, draw(st.sampled_from([GUEST_MAC, OUR_MAC])),
        draw(addr), draw(addr), draw(port_st), draw(port_st), draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 255)), draw(st.integers(0, 65535)),
        draw(st.integers(0, 65535)), plen, opts, draw(st.booleans()),
    )  # fmt: skip
    return bytes(buf[:n])


@needs_native
@PROPS
@given(st.binary(max_size=2000), st.integers(0, 2**32 - 1))
def test_ones_sum_and_checksum_agree(data: bytes, initial: int) -> None:
    assert both("ones_sum", data, initial)[0] == _native.ones_sum(data, initial)
    assert pure.checksum(data, initial) == _native.checksum(memoryview(data), initial)
    assert pure.ones_sum(data) == _native.ones_sum(bytearray(data))


@needs_native
@PROPS
@given(st.sampled_from([4, 16]).flatmap(lambda n: st.tuples(
    st.binary(min_size=n, max_size=n), st.binary(min_size=n, max_size=n))),
    st.integers(0, 255), st.integers(0, 65535))  # fmt: skip
def test_pseudo_sum_agrees(addrs: tuple[bytes, bytes], proto: int, length: int) -> None:
    a, b = both("pseudo_sum", addrs[0], addrs[1], proto, length)
    assert a == b


@needs_native
@PROPS
@given(st.booleans(), st.data())
def test_tcp_fast_agrees_on_mutated_frames(v6: bool, data: st.DataObject) -> None:
    frame = data.draw(tcp_frames(v6))
    muts = data.draw(st.lists(mutation, max_size=3))
    view = memoryview(mutate(frame, muts))
    guest = data.draw(st.sampled_from([GUEST_MAC, None, OUR_MAC]))
    verify = data.draw(st.booleans())
    a4, b4 = both("tcp_fast4", view, OUR_MAC, guest, BROADCAST, DNS4, verify)
    assert a4 == b4
    a6, b6 = both("tcp_fast6", view, OUR_MAC, guest, DNS6, verify)
    assert a6 == b6


@needs_native
@PROPS
@given(st.binary(max_size=120), st.sampled_from([GUEST_MAC, None]))
def test_tcp_fast_agrees_on_random_bytes(raw: bytes, guest: bytes | None) -> None:
    # Random bytes behind a valid Ethernet header, so the IP checks are reached.
    for etype in (b"\x08\x00", b"\x86\xdd"):
        view = memoryview(OUR_MAC + GUEST_MAC + etype + raw)
        for verify in (False, True):
            a, b = both("tcp_fast4", view, OUR_MAC, guest, BROADCAST, DNS4, verify)
            assert a == b
            a, b = both("tcp_fast6", view, OUR_MAC, guest, DNS6, verify)
            assert a == b


@needs_native
@pytest.mark.parametrize("v6", [False, True])
def test_tcp_fast_takes_a_valid_segment_in_both(v6: bool) -> None:
    """The mutated-frame property also holds when both say None: check segments both take,
    with the fields the NAT gets, and that ``verify`` refuses a wrong TCP checksum in both."""
    src, dst = (DNS6_SRC, DNS6_DST) if v6 else (bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34]))
    l4 = 54 if v6 else 34
    for partial in (False, True):
        buf = bytearray(100)
        buf[l4 + 20 : l4 + 23] = b"abc"
        n = pure.build_tcp_frame(
            buf, 0, 6 if v6 else 4, OUR_MAC, GUEST_MAC, src, dst, 40000, 80, 5, 7, 0x18, 1000,
            1, 3, b"", partial,
        )  # fmt: skip
        frame = memoryview(buf)[:n]
        args = (OUR_MAC, GUEST_MAC, DNS6) if v6 else (OUR_MAC, GUEST_MAC, BROADCAST, DNS4)
        name = "tcp_fast6" if v6 else "tcp_fast4"
        want = ("memoryview", bytes(buf[l4 : l4 + 23]), src, dst, 40000, 80, 5, 7, 20, 0x18, 1000)
        assert both(name, frame, *args, False) == (want, want)
        # Verified: taken with the full checksum, refused with the partial one.
        a, b = both(name, frame, *args, True)
        assert a == b == (None if partial else want)


@st.composite
def udp_frames(draw: st.DrawFn) -> bytes:
    """A valid IPv4 UDP frame from the guest (built by the pure builder), maybe padded."""
    plen = draw(st.integers(0, 64))
    buf = bytearray(42 + plen)
    buf[42:] = draw(st.binary(min_size=plen, max_size=plen))
    pure.build_udp_frame(
        buf, 0, 4, OUR_MAC, draw(st.sampled_from([GUEST_MAC, OUR_MAC])), draw(addr4),
        draw(addr4), draw(port_st), draw(port_st), plen, draw(st.integers(0, 65535)),
        draw(st.booleans()),
    )  # fmt: skip
    if draw(st.booleans()):
        buf[40:42] = b"\x00\x00"  # no checksum (IPv4 allows it)
    return bytes(buf) + draw(st.sampled_from([b"", bytes(6)]))


def both_udp(*args: Any) -> tuple[Any, Any]:
    """udp_fast4 in both implementations, the payload view compared by type and contents."""
    out = []
    for impl in (pure, _native):
        res = impl.udp_fast4(*args)
        if res is not None:
            res = (*res[:4], type(res[4]).__name__, bytes(res[4]))
        out.append(res)
    return out[0], out[1]


@needs_native
@PROPS
@given(st.data())
def test_udp_fast4_agrees_on_mutated_frames(data: st.DataObject) -> None:
    frame = data.draw(udp_frames())
    muts = data.draw(st.lists(mutation, max_size=3))
    view = memoryview(mutate(frame, muts))
    guest = data.draw(st.sampled_from([GUEST_MAC, None, OUR_MAC]))
    a, b = both_udp(view, OUR_MAC, guest, BROADCAST, data.draw(st.booleans()))
    assert a == b


@needs_native
@PROPS
@given(st.binary(max_size=120), st.sampled_from([GUEST_MAC, None]))
def test_udp_fast4_agrees_on_random_bytes(raw: bytes, guest: bytes | None) -> None:
    for head in (b"", b"\x45\x00"):
        view = memoryview(OUR_MAC + GUEST_MAC + b"\x08\x00" + head + raw)
        for verify in (False, True):
            a, b = both_udp(view, OUR_MAC, guest, BROADCAST, verify)
            assert a == b


@needs_native
def test_udp_fast4_takes_a_valid_datagram_in_both() -> None:
    """Datagrams both take, with the fields the NAT gets (padding after the UDP length left
    out); ``verify`` refuses a wrong checksum in both and takes a missing one (0)."""
    src, dst = bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34])
    buf = bytearray(42 + 5 + 6)  # 6 bytes of Ethernet padding after the datagram
    buf[42:47] = b"hello"
    pure.build_udp_frame(buf, 0, 4, OUR_MAC, GUEST_MAC, src, dst, 40000, 9999, 5, 7, False)
    want = (src, dst, 40000, 9999, "memoryview", b"hello")
    for verify in (False, True):
        assert both_udp(memoryview(buf), OUR_MAC, GUEST_MAC, BROADCAST, verify) == (want, want)
    bad = bytearray(buf)
    bad[46] ^= 1
    assert both_udp(memoryview(bad), OUR_MAC, GUEST_MAC, BROADCAST, True) == (None, None)
    assert both_udp(memoryview(bad), OUR_MAC, GUEST_MAC, BROADCAST, False)[0] is not None
    bad[40:42] = b"\x00\x00"
    assert both_udp(memoryview(bad), OUR_MAC, GUEST_MAC, BROADCAST, True)[0] is not None
    # Not for the fast path: another MAC, a broadcast or multicast address, a fragment.
    assert both_udp(memoryview(buf), OUR_MAC, OUR_MAC, BROADCAST, False) == (None, None)
    for dst_ip in (BROADCAST, bytes([224, 0, 0, 251]), b"\xff\xff\xff\xff"):
        other = bytearray(buf)
        pure.build_udp_frame(other, 0, 4, OUR_MAC, GUEST_MAC, src, dst_ip, 1, 2, 5, 7, False)
        assert both_udp(memoryview(other), OUR_MAC, GUEST_MAC, BROADCAST, True) == (None, None)
    frag = bytearray(buf)
    frag[20] |= 0x20  # more fragments, the header checksum made right again
    frag[24:26] = b"\x00\x00"
    frag[24:26] = pure.checksum(frag[14:34]).to_bytes(2, "big")
    assert both_udp(memoryview(frag), OUR_MAC, GUEST_MAC, BROADCAST, False) == (None, None)


@st.composite
def udp6_frames(draw: st.DrawFn) -> bytes:
    """A valid IPv6 UDP frame from the guest (built by the pure builder), maybe padded."""
    plen = draw(st.integers(0, 64))
    buf = bytearray(62 + plen)
    buf[62:] = draw(st.binary(min_size=plen, max_size=plen))
    pure.build_udp_frame(
        buf, 0, 6, OUR_MAC, draw(st.sampled_from([GUEST_MAC, OUR_MAC])), draw(addr6),
        draw(addr6 | st.just(bytes(16))), draw(port_st), draw(port_st), plen, 0, False,
    )  # fmt: skip
    if draw(st.booleans()):
        buf[60:62] = b"\x00\x00"  # no checksum: IPv6 refuses it where verified
    return bytes(buf) + draw(st.sampled_from([b"", bytes(6)]))


def both_udp6(*args: Any) -> tuple[Any, Any]:
    """udp_fast6 in both implementations, the payload view compared by type and contents."""
    out = []
    for impl in (pure, _native):
        res = impl.udp_fast6(*args)
        if res is not None:
            res = (*res[:4], type(res[4]).__name__, bytes(res[4]))
        out.append(res)
    return out[0], out[1]


@needs_native
@PROPS
@given(st.data())
def test_udp_fast6_agrees_on_mutated_frames(data: st.DataObject) -> None:
    frame = data.draw(udp6_frames())
    muts = data.draw(st.lists(mutation, max_size=3))
    view = memoryview(mutate(frame, muts))
    guest = data.draw(st.sampled_from([GUEST_MAC, None, OUR_MAC]))
    a, b = both_udp6(view, OUR_MAC, guest, data.draw(st.booleans()))
    assert a == b


@needs_native
@PROPS
@given(st.binary(max_size=140), st.sampled_from([GUEST_MAC, None]))
def test_udp_fast6_agrees_on_random_bytes(raw: bytes, guest: bytes | None) -> None:
    for head in (b"", b"\x60\x00\x00\x00"):
        view = memoryview(OUR_MAC + GUEST_MAC + b"\x86\xdd" + head + raw)
        for verify in (False, True):
            a, b = both_udp6(view, OUR_MAC, guest, verify)
            assert a == b


@needs_native
def test_udp_fast6_takes_a_valid_datagram_in_both() -> None:
    """Datagrams both take, with the fields the NAT gets (padding after the UDP length left
    out); ``verify`` refuses a wrong checksum and a missing one (0) in both; never a
    multicast source or destination, the unspecified destination, an extension header."""
    src = bytes.fromhex("fd" + "00" * 14 + "15")
    dst = bytes.fromhex("2001db8" + "0" * 24 + "1")
    buf = bytearray(62 + 5 + 6)  # 6 bytes of Ethernet padding after the datagram
    buf[62:67] = b"hello"
    pure.build_udp_frame(buf, 0, 6, OUR_MAC, GUEST_MAC, src, dst, 40000, 53, 5, 0, False)
    want = (src, dst, 40000, 53, "memoryview", b"hello")
    for verify in (False, True):
        assert both_udp6(memoryview(buf), OUR_MAC, GUEST_MAC, verify) == (want, want)
    bad = bytearray(buf)
    bad[66] ^= 1
    assert both_udp6(memoryview(bad), OUR_MAC, GUEST_MAC, True) == (None, None)
    assert both_udp6(memoryview(bad), OUR_MAC, GUEST_MAC, False)[0] is not None
    bad[60:62] = b"\x00\x00"
    assert both_udp6(memoryview(bad), OUR_MAC, GUEST_MAC, True) == (None, None)
    assert both_udp6(memoryview(bad), OUR_MAC, GUEST_MAC, False)[0] is not None
    assert both_udp6(memoryview(buf), OUR_MAC, OUR_MAC, False) == (None, None)
    multicast = bytes.fromhex("ff02" + "00" * 13 + "fb")
    for s, d in ((src, multicast), (multicast, dst), (src, bytes(16))):
        other = bytearray(buf)
        pure.build_udp_frame(other, 0, 6, OUR_MAC, GUEST_MAC, s, d, 1, 2, 5, 0, False)
        assert both_udp6(memoryview(other), OUR_MAC, GUEST_MAC, True) == (None, None)
    hop_by_hop = bytearray(buf)
    hop_by_hop[20] = 0  # next header: hop-by-hop options, not UDP
    assert both_udp6(memoryview(hop_by_hop), OUR_MAC, GUEST_MAC, False) == (None, None)


DNS6_SRC = bytes.fromhex("fd" + "00" * 14 + "15")
DNS6_DST = bytes.fromhex("2001db8" + "0" * 24 + "1")


@needs_native
@PROPS
@given(st.data())
def test_parse_ipv4_agrees(data: st.DataObject) -> None:
    frame = data.draw(tcp_frames(False))
    muts = data.draw(st.lists(mutation, max_size=3))
    ip = bytes(mutate(frame, muts)[14:])
    for verify in (True, False):
        a, b = both("parse_ipv4", memoryview(ip), verify)
        assert a == b


@needs_native
@PROPS
@given(st.binary(max_size=80))
def test_parse_ipv4_agrees_on_random_bytes(raw: bytes) -> None:
    for head in (b"", b"\x45", b"\x46\x00"):
        a, b = both("parse_ipv4", head + raw, True)
        assert a == b


def _outcome(fn: Any, buf: bytearray, *args: Any) -> tuple[str, Any]:
    """The frame length and the whole buffer after a builder ran, or the exception's type."""
    try:
        return "ok", (fn(buf, *args), bytes(buf))
    except Exception as exc:
        return "raise", type(exc).__name__


@needs_native
@PROPS
@given(st.booleans(), st.data())
def test_build_tcp_frame_agrees(v6: bool, data: st.DataObject) -> None:
    addr = addr6 if v6 else addr4
    plen = data.draw(st.integers(0, 1600))
    size = data.draw(st.integers(0, 1800))
    start = data.draw(st.integers(0, 64))
    fill = data.draw(st.binary(min_size=size, max_size=size))
    args = (
        start, 6 if v6 else 4, GUEST_MAC, OUR_MAC, data.draw(addr), data.draw(addr),
        data.draw(port_st), data.draw(port_st), data.draw(st.integers(0, 2**32 - 1)),
        data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, 255)),
        data.draw(st.integers(0, 65535)), data.draw(st.integers(0, 65535)), plen,
        data.draw(opts_st) if plen == 0 else b"", data.draw(st.booleans()),
    )  # fmt: skip
    a = _outcome(pure.build_tcp_frame, bytearray(fill), *args)
    b = _outcome(_native.build_tcp_frame, bytearray(fill), *args)
    assert a == b


@needs_native
@PROPS
@given(st.booleans(), st.data())
def test_build_udp_frame_agrees(v6: bool, data: st.DataObject) -> None:
    addr = addr6 if v6 else addr4
    plen = data.draw(st.integers(0, 1600))
    size = data.draw(st.integers(0, 1800))
    start = data.draw(st.integers(0, 64))
    fill = data.draw(st.binary(min_size=size, max_size=size))
    args = (
        start, 6 if v6 else 4, GUEST_MAC, OUR_MAC, data.draw(addr), data.draw(addr),
        data.draw(port_st), data.draw(port_st), plen, data.draw(st.integers(0, 65535)),
        data.draw(st.booleans()),
    )  # fmt: skip
    a = _outcome(pure.build_udp_frame, bytearray(fill), *args)
    b = _outcome(_native.build_udp_frame, bytearray(fill), *args)
    assert a == b


@needs_native
@pytest.mark.parametrize("v6", [False, True])
def test_builders_reject_bad_fields_in_both(v6: bool) -> None:
    """Values that do not fit their fields raise in both (the type may differ: struct.error in
    Python, OverflowError in C); nothing is written past the buffer."""
    addr = bytes(16 if v6 else 4)
    ver = 6 if v6 else 4
    bad_tcp = [
        (0, ver, GUEST_MAC, OUR_MAC, addr, addr, 70000, 1, 0, 0, 0, 0, 0, 0, b"", False),
        (0, ver, GUEST_MAC, OUR_MAC, addr, addr, 1, 1, 2**32, 0, 0, 0, 0, 0, b"", False),
        (0, ver, GUEST_MAC, OUR_MAC, addr, addr, 1, 1, 0, 0, 0, 0, 0, 70000, b"", False),
        (0, ver, GUEST_MAC, OUR_MAC, bytes(5), addr, 1, 1, 0, 0, 0, 0, 0, 0, b"", False),
        (0, 5, GUEST_MAC, OUR_MAC, addr, addr, 1, 1, 0, 0, 0, 0, 0, 0, b"", False),
        (100, ver, GUEST_MAC, OUR_MAC, addr, addr, 1, 1, 0, 0, 0, 0, 0, 0, b"", False),
        (-1, ver, GUEST_MAC, OUR_MAC, addr, addr, 1, 1, 0, 0, 0, 0, 0, 0, b"", False),
    ]
    for args in bad_tcp:
        for impl in (pure, _native):
            buf = bytearray(120)
            with pytest.raises(Exception):  # noqa: B017 (struct.error or OverflowError)
                impl.build_tcp_frame(buf, *args)
    for impl in (pure, _native):
        with pytest.raises(Exception):  # noqa: B017
            impl.build_udp_frame(bytearray(100), 0, ver, GUEST_MAC, OUR_MAC, addr, addr, 1, 1,
                                 70000, 0, True)  # fmt: skip


option_st = st.sampled_from(
    [b"\x02\x04\x05\xb4", b"\x01", b"\x00", b"\x03\x03\x07", b"\x03\x03\xff", b"\x04\x02",
     b"\x08\x0a" + bytes(range(8)), b"\x05\x0a" + bytes(8), b"\x02\x03\x05", b"\x09\x01",
     b"\x02"]
) | st.binary(min_size=1, max_size=6)  # fmt: skip


@needs_native
@PROPS
@given(st.lists(option_st, max_size=8), st.integers(-4, 44), st.binary(max_size=4))
def test_tcp_options_agree(opts: list[bytes], hlen_delta: int, tail: bytes) -> None:
    """A SYN's options, valid, truncated, overlong or random, and header lengths short of,
    at and past the options: the same fields or the same error from both."""
    seg = bytes(20) + b"".join(opts)
    seg = seg[:60] + tail
    hlen = 20 + hlen_delta
    for data in (seg, memoryview(seg)):
        try:
            a = pure.tcp_options(data, hlen)
        except WireError as exc:
            a = ("raise", exc.reason)
        except ValueError:
            a = ("raise", "ValueError")
        try:
            b = _native.tcp_options(data, hlen)
        except WireError as exc:
            b = ("raise", exc.reason)
        except ValueError:
            b = ("raise", "ValueError")
        assert a == b


# -- dns_question: a plain DNS query's id and question ------------------------------------------


def _dns_query(name: bytes, qtype: int, opt: bytes | None, flags: int = 0x0100) -> bytes:
    head = struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, 1 if opt is not None else 0)
    return head + name + struct.pack("!HH", qtype, 1) + (opt or b"")


label_st = st.binary(min_size=1, max_size=63).map(lambda b: bytes([len(b)]) + b)
dns_name_st = st.lists(label_st, max_size=6).map(lambda ls: b"".join(ls) + b"\x00")
opt_st = st.none() | st.binary(max_size=12).map(
    lambda data: b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00" + struct.pack("!H", len(data)) + data
)


@needs_native
@PROPS
@given(dns_name_st, st.integers(0, 65535), opt_st, st.lists(mutation, max_size=3))
def test_dns_question_agrees_on_mutated_queries(
    name: bytes, qtype: int, opt: bytes | None, muts: list[tuple[str, int, int]]
) -> None:
    """Plain queries and their mutations (any byte, cut short, grown): the same answer, None
    or (id, lowered question, name length), from both, for bytes and views alike."""
    wire = bytes(mutate(_dns_query(name, qtype, opt), muts))
    for data in (wire, memoryview(wire)):
        assert pure.dns_question(data) == _native.dns_question(data)


@needs_native
@PROPS
@given(st.binary(max_size=80))
def test_dns_question_agrees_on_random_bytes(raw: bytes) -> None:
    head = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 1)
    for data in (raw, head[:4] + raw, head + raw):
        assert pure.dns_question(data) == _native.dns_question(data)


@pytest.mark.parametrize("impl", ["pure", "native"])
def test_dns_question_fields_and_refusals(impl: str) -> None:
    """What it takes (A or AAAA, with or without OPT; name lowered, type and class kept) and
    what it leaves to the full parser: responses, other opcodes, pointers, other records,
    an OPT that is not the root's, trailing bytes, truncation, a name over 255 bytes."""
    if impl == "native" and _native is None:
        pytest.skip("extension not built")
    f = (pure if impl == "pure" else _native).dns_question
    name = b"\x03WwW\x07Example\x03COM\x00"
    lowered = b"\x03www\x07example\x03com\x00"
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    assert f(_dns_query(name, 1, None)) == (0x1234, lowered + b"\x00\x01\x00\x01", 17)
    assert f(_dns_query(name, 28, opt)) == (0x1234, lowered + b"\x00\x1c\x00\x01", 17)
    assert f(_dns_query(b"\x00", 1, opt)) == (0x1234, b"\x00\x00\x01\x00\x01", 1)
    longest = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + b"\x00"
    assert f(_dns_query(longest, 1, None)) == (0x1234, longest + b"\x00\x01\x00\x01", 255)
    too_long = (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"a" * 62 + b"\x00"
    plain = _dns_query(name, 1, opt)
    for wire in (
        _dns_query(name, 1, opt, flags=0x8100),  # a response
        _dns_query(name, 1, opt, flags=0x2900),  # opcode 5 (UPDATE)
        _dns_query(b"\x03www\xc0\x0c", 1, None),  # a pointer
        _dns_query(b"\x43" + b"a" * 3 + b"\x00", 1, None),  # label type 0x40
        _dns_query(too_long, 1, None),
        _dns_query(name, 1, b"\x01a" + opt[1:]),  # OPT not owned by the root
        _dns_query(name, 1, opt[:1] + b"\x01" + opt[2:]),  # type 297, not OPT
        _dns_query(name, 1, opt[:-1] + b"\x01"),  # OPT data running past the end
        plain + b"\x00",  # trailing
        plain[:-1],
        plain[:11],
        struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + name + b"\x00\x01\x00\x01" * 2,
        struct.pack("!HHHHHH", 1, 0x0100, 1, 1, 0, 0) + name + b"\x00\x01\x00\x01",
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 1, 0) + name + b"\x00\x01\x00\x01",
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 2) + name + b"\x00\x01\x00\x01" + opt * 2,
    ):
        assert f(wire) is None, wire
