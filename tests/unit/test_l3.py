"""The address-family seam (wire/l3.py): the IPv4 writer against scapy, byte for byte.

scapy is the independent implementation: the IPv4 header :data:`IPV4` builds, and the whole
Ethernet + IPv4 (+ UDP) frames the services build through :func:`build_l3_frame` and
:func:`build_udp_frame`, must equal what scapy builds from the same fields. The pseudo-header sum
must equal the ones'-complement sum of scapy's pseudo-headers, for IPv4 and (the sum being
version-neutral) for IPv6 addresses too.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, in4_pseudoheader
from scapy.layers.inet6 import IPv6, in6_pseudoheader
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from guestnet.wire.checksum import pseudo_header_sum
from guestnet.wire.ethernet import ETHERTYPE_IPV4, parse_ethernet
from guestnet.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, parse_ipv4
from guestnet.wire.l3 import BY_ETHERTYPE, IPV4, build_l3_frame, build_udp_frame
from guestnet.wire.udp import build_udp

GUEST_MAC = "52:54:00:12:34:56"
OUR_MAC = "52:55:0a:00:02:02"
MAC_B = bytes.fromhex("525400123456")
OUR_B = bytes.fromhex("52550a000202")

addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)


def ip4(packed: bytes) -> str:
    return str(ipaddress.IPv4Address(packed))


def ip6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


def test_ipv4_family_constants() -> None:
    """Offsets a pooled frame is received at: after Ethernet (14) and IPv4 (20) (+ UDP 8)."""
    assert (IPV4.version, IPV4.ethertype, IPV4.addr_len, IPV4.header_len) == (4, 0x0800, 4, 20)
    assert IPV4.l4_off == 34
    assert IPV4.udp_payload_off == 42
    assert IPV4.max_l4_len == 65535 - 20
    assert IPV4.tcp_mss(1500) == 1460
    assert IPV4.tcp_mss(65520) == 65480
    assert BY_ETHERTYPE[ETHERTYPE_IPV4] is IPV4


@given(
    src=addr4,
    dst=addr4,
    proto=st.sampled_from([PROTO_ICMP, PROTO_TCP, PROTO_UDP, 253]),
    l4_len=st.integers(0, 65515),
    ident=st.integers(0, 0xFFFF),
    ttl=st.integers(0, 255),
    df=st.booleans(),
)
def test_ipv4_header_equals_scapy(
    src: bytes, dst: bytes, proto: int, l4_len: int, ident: int, ttl: int, df: bool
) -> None:
    buf = bytearray(2 + 20)
    end = IPV4.build(buf, 2, src, dst, proto, l4_len, ident, ttl, df)
    assert end == 22
    ref = IP(
        src=ip4(src), dst=ip4(dst), proto=proto, id=ident, ttl=ttl, flags="DF" if df else 0,
        len=20 + l4_len,
    )  # fmt: skip
    assert bytes(buf[2:]) == bytes(ref)
    parsed = parse_ipv4(bytes(buf[2:]) + bytes(l4_len))  # checksum verified
    assert (parsed.src, parsed.dst, parsed.total_len) == (src, dst, 20 + l4_len)


def test_ipv4_header_defaults_are_df_ttl_64_id_0() -> None:
    """What DNS and DHCP answers carry: the defaults."""
    buf = bytearray(20)
    IPV4.build(buf, 0, bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15]), PROTO_UDP, 100)
    ref = IP(src="10.0.2.2", dst="10.0.2.15", proto=PROTO_UDP, id=0, ttl=64, flags="DF", len=120)
    assert bytes(buf) == bytes(ref)


def ref_ones_sum(data: bytes) -> int:
    """RFC 1071 word by word: the reference for the pseudo-header sums."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(src=addr4, dst=addr4, proto=st.sampled_from([6, 17]), length=st.integers(0, 65535))
def test_pseudo_sum_ipv4_equals_scapy_pseudoheader(
    src: bytes, dst: bytes, proto: int, length: int
) -> None:
    u = IP(src=ip4(src), dst=ip4(dst))
    header = bytes(in4_pseudoheader(proto, u, length))
    assert IPV4.pseudo_sum(src, dst, proto, length) == ref_ones_sum(header)
    assert pseudo_header_sum(src, dst, proto, length) == ref_ones_sum(header)


@given(src=addr6, dst=addr6, nh=st.sampled_from([6, 17, 58]), length=st.integers(0, 65535))
def test_pseudo_header_sum_ipv6_equals_scapy_pseudoheader(
    src: bytes, dst: bytes, nh: int, length: int
) -> None:
    """The same function serves IPv6's pseudo-header (RFC 8200 8.1), for the next issue."""
    u = IPv6(src=ip6(src), dst=ip6(dst))
    header = bytes(in6_pseudoheader(nh, u, length))
    assert pseudo_header_sum(src, dst, nh, length) == ref_ones_sum(header)


def test_udp_checksum_over_ipv6_addresses_matches_scapy() -> None:
    """build_udp with 16-byte addresses: the checksum scapy computes for UDP over IPv6."""
    rng = random.Random(6)
    for n in (0, 1, 7, 100, 1400):
        src, dst, payload = rng.randbytes(16), rng.randbytes(16), rng.randbytes(n)
        buf = bytearray(8 + n)
        buf[8:] = payload
        build_udp(buf, 0, 5353, 53, n, src, dst)
        ref = IPv6(src=ip6(src), dst=ip6(dst)) / UDP(sport=5353, dport=53) / Raw(payload)
        ref = IPv6(bytes(ref))
        assert bytes(buf) == bytes(ref[UDP])


@pytest.mark.parametrize("n", [0, 1, 64, 1472, 4000])
@pytest.mark.parametrize(("ident", "df"), [(0, True), (0x1234, False)])
def test_udp_frame_equals_scapy(n: int, ident: int, df: bool) -> None:
    payload = random.Random(n).randbytes(n)
    buf = bytearray(2 + IPV4.udp_payload_off + n)
    start = 2
    buf[start + IPV4.udp_payload_off :] = payload
    src, dst = bytes([93, 184, 216, 34]), bytes([10, 0, 2, 15])
    length = build_udp_frame(IPV4, buf, start, MAC_B, OUR_B, src, dst, 9999, 40000, n, ident, df)
    assert length == 42 + n
    ref = (
        Ether(dst=GUEST_MAC, src=OUR_MAC)
        / IP(src="93.184.216.34", dst="10.0.2.15", id=ident, ttl=64, flags="DF" if df else 0)
        / UDP(sport=9999, dport=40000)
        / Raw(payload)
    )
    assert bytes(buf[start : start + length]) == bytes(ref)


def test_l3_frame_for_icmp_equals_scapy() -> None:
    """The ICMP service writes its message at l4_off and the headers through build_l3_frame."""
    msg = bytes(ICMP(type=0, id=7, seq=1) / Raw(b"ping" * 10))
    buf = bytearray(16 + IPV4.l4_off + len(msg))
    buf[16 + IPV4.l4_off :] = msg
    src, dst = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15])
    length = build_l3_frame(
        IPV4, buf, 16, MAC_B, OUR_B, src, dst, PROTO_ICMP, len(msg), ident=99, dont_fragment=False
    )
    assert length == IPV4.l4_off + len(msg)
    ref = (
        Ether(dst=GUEST_MAC, src=OUR_MAC)
        / IP(src="10.0.2.2", dst="10.0.2.15", id=99, proto=1)
        / msg
    )
    assert bytes(buf[16 : 16 + length]) == bytes(ref)
    assert parse_ethernet(bytes(buf[16:])).ethertype == IPV4.ethertype


@pytest.mark.parametrize("first", range(256))
def test_not_unicast_agrees_with_ipaddress(first: int) -> None:
    """The datapath's first-byte test says what ipaddress says: multicast or reserved."""
    for rest in (b"\x00\x00\x00", b"\x01\x02\x03", b"\xff\xff\xff"):
        addr = ipaddress.IPv4Address(bytes([first]) + rest)
        assert IPV4.not_unicast(addr.packed) == (addr.is_multicast or addr.is_reserved)
