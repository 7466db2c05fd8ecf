"""wire/ipv6, wire/icmpv6 and the IPV6 family: against scapy and golden bytes."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import ETH_HLEN, ETHERTYPE_IPV6
from guestnet.wire.icmpv6 import (
    ICMPV6_ECHO_REQUEST,
    OPT_SOURCE_LL,
    build_icmpv6,
    encode_dns_name,
    icmpv6_checksum,
    ndp_option_dnssl,
    ndp_option_link_layer,
    ndp_option_mtu,
    ndp_option_prefix,
    ndp_option_rdnss,
    parse_icmpv6,
    parse_ndp_options,
    set_icmpv6_checksum,
)
from guestnet.wire.ipv4 import PROTO_TCP, PROTO_UDP
from guestnet.wire.ipv6 import (
    IPV6_HLEN,
    MAX_EXT_HEADERS,
    NH_NONE,
    PROTO_ICMPV6,
    build_ipv6,
    multicast_mac,
    parse_ipv6,
    solicited_node,
)
from guestnet.wire.l3 import BY_ETHERTYPE, IPV6, build_l3_frame, build_udp_frame

SRC = bytes.fromhex("fd000000000000000000000000000015")
DST = bytes.fromhex("20010db8000000000000000000000001")
S_SRC, S_DST = "fd00::15", "2001:db8::1"


def test_build_ipv6_golden_and_scapy() -> None:
    buf = bytearray(IPV6_HLEN)
    assert build_ipv6(buf, 0, SRC, DST, PROTO_UDP, 1234, 255, 0xAB, 0x12345) == IPV6_HLEN
    assert buf[:8] == bytes.fromhex("6ab12345 04d2 11 ff".replace(" ", ""))
    assert buf[8:24] == SRC and buf[24:40] == DST
    pkt = IPv6(bytes(buf))
    assert (pkt.version, pkt.tc, pkt.fl, pkt.plen, pkt.nh, pkt.hlim) == (
        6, 0xAB, 0x12345, 1234, 17, 255,
    )  # fmt: skip
    assert (pkt.src, pkt.dst) == (S_SRC, S_DST)


def test_parse_plain_udp_from_scapy() -> None:
    raw = bytes(IPv6(src=S_SRC, dst=S_DST, hlim=7, tc=3, fl=9) / UDP(sport=1, dport=2) / b"xy")
    ip = parse_ipv6(raw + b"\x00" * 6)  # Ethernet padding after the packet
    assert (ip.header_len, ip.total_len, ip.proto, ip.next_header) == (40, 50, PROTO_UDP, 17)
    assert (ip.hop_limit, ip.ttl, ip.traffic_class, ip.tos, ip.flow_label) == (7, 7, 3, 3, 9)
    assert (ip.src, ip.dst) == (SRC, DST)
    assert not ip.is_fragment and ip.frag == 0 and ip.ident == 0


def test_extension_headers_walked_to_the_upper_layer() -> None:
    chain = (
        IPv6(src=S_SRC, dst=S_DST)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt(options=[])
        / IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=0)
        / IPv6ExtHdrDestOpt()
        / UDP(sport=5, dport=6)
        / b"data"
    )
    raw = bytes(chain)
    ip = parse_ipv6(raw)
    assert ip.next_header == 0 and ip.proto == PROTO_UDP
    udp_at = len(raw) - 12
    assert ip.header_len == udp_at
    assert struct.unpack_from("!HH", raw, ip.header_len) == (5, 6)


def test_fragment_header_ends_the_walk() -> None:
    raw = bytes(
        IPv6(src=S_SRC, dst=S_DST)
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(offset=3, m=1, id=0xDEADBEEF, nh=6)
        / Raw(b"x" * 16)
    )
    ip = parse_ipv6(raw)
    assert ip.is_fragment and ip.more_fragments
    assert (ip.frag_offset, ip.ident, ip.proto) == (24, 0xDEADBEEF, PROTO_TCP)
    assert ip.header_len == 40 + 8 + 8
    assert ip.frag == 0x2000 | 3  # IPv4's layout: MF and the offset in 8-byte units


def test_atomic_fragment_is_whole() -> None:
    """Offset 0 and M clear (RFC 6946): the walk continues to the upper layer."""
    raw = bytes(IPv6(src=S_SRC, dst=S_DST) / IPv6ExtHdrFragment(id=5) / UDP() / b"z")
    ip = parse_ipv6(raw)
    assert not ip.is_fragment and ip.proto == PROTO_UDP and ip.header_len == 48


def _hdr(nh: int, plen: int, version: int = 6, src: bytes = SRC) -> bytearray:
    buf = bytearray(IPV6_HLEN + plen)
    build_ipv6(buf, 0, src, DST, nh, plen)
    buf[0] = (version << 4) | (buf[0] & 0x0F)
    return buf


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes(39), "ipv6.truncated"),
        (bytes(_hdr(59, 0, version=4)), "ipv6.bad_version"),
        (bytes(_hdr(59, 8))[:44], "ipv6.bad_payload_length"),
        (bytes(_hdr(59, 0, src=b"\xff" + bytes(15))), "ipv6.src.multicast"),
        (bytes(_hdr(0, 4)), "ipv6.ext.truncated"),
        (bytes(_hdr(60, 8)[:40]) + bytes([17, 1]) + bytes(6), "ipv6.ext.truncated"),
        (bytes(_hdr(60, 8)[:40]) + bytes([60, 0]) + bytes(6), "ipv6.ext.truncated"),
        (
            bytes(_hdr(60, 16)[:40]) + bytes([0, 0]) + bytes(6) + bytes([17, 0]) + bytes(6),
            "ipv6.ext.misplaced_hop_by_hop",
        ),
        (
            bytes(_hdr(60, 8 * (MAX_EXT_HEADERS + 1))[:40])
            + (bytes([60, 0]) + bytes(6)) * (MAX_EXT_HEADERS + 1),
            "ipv6.ext.too_many",
        ),
    ],
    ids=[
        "short",
        "version",
        "payload_len",
        "src_multicast",
        "hbh_truncated",
        "ext_len",
        "chain_truncated",
        "hbh_misplaced",
        "too_many",
    ],
)
def test_bad_headers_raise_named_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        parse_ipv6(data)
    assert err.value.reason == reason


def test_no_next_header_is_the_upper_layer() -> None:
    ip = parse_ipv6(bytes(_hdr(NH_NONE, 0)))
    assert ip.proto == NH_NONE and ip.header_len == 40


def test_multicast_helpers() -> None:
    addr = bytes.fromhex("fd00000000000000000000000012abcd")
    group = solicited_node(addr)
    assert group == bytes.fromhex("ff0200000000000000000001ff12abcd")
    assert multicast_mac(group) == bytes.fromhex("3333ff12abcd")


# -- the family --------------------------------------------------------------------------------


def test_ipv6_family_facts() -> None:
    assert BY_ETHERTYPE[ETHERTYPE_IPV6] is IPV6
    assert (IPV6.version, IPV6.addr_len, IPV6.header_len) == (6, 16, 40)
    assert (IPV6.l4_off, IPV6.udp_payload_off) == (54, 62)
    assert IPV6.tcp_mss(1500) == 1440 and IPV6.tcp_mss(65520) == 65460
    assert IPV6.not_unicast(bytes.fromhex("ff02" + "00" * 13 + "01"))
    assert IPV6.not_unicast(bytes(16))
    assert not IPV6.not_unicast(SRC)
    assert not IPV6.not_unicast(bytes.fromhex("fe80" + "00" * 13 + "01"))
    assert IPV6.pseudo_sum(SRC, DST, 6, 100) == pseudo_header_sum(SRC, DST, 6, 100)


def test_udp_frame_over_ipv6_matches_scapy() -> None:
    buf = bytearray(200)
    start = 16
    payload = b"hello over six"
    buf[start + IPV6.udp_payload_off : start + IPV6.udp_payload_off + len(payload)] = payload
    mac_a, mac_b = bytes.fromhex("525400123456"), bytes.fromhex("52550a000202")
    n = build_udp_frame(IPV6, buf, start, mac_a, mac_b, DST, SRC, 53, 4000, len(payload))
    frame = bytes(buf[start : start + n])
    assert n == 62 + len(payload)
    pkt = IPv6(frame[ETH_HLEN:])
    ref = IPv6(bytes(IPv6(src=S_DST, dst=S_SRC, hlim=64) / UDP(sport=53, dport=4000) / payload))
    assert bytes(pkt) == bytes(ref)


def test_l3_frame_hop_limit_64() -> None:
    buf = bytearray(100)
    n = build_l3_frame(IPV6, buf, 0, bytes(6), bytes(6), SRC, DST, PROTO_ICMPV6, 8)
    assert n == 62 and buf[ETH_HLEN + 7] == 64 and buf[ETH_HLEN + 6] == PROTO_ICMPV6


# -- ICMPv6 ------------------------------------------------------------------------------------


def test_icmpv6_echo_checksum_matches_scapy() -> None:
    buf = bytearray(8 + 5)
    buf[8:] = b"abcde"
    build_icmpv6(buf, 0, ICMPV6_ECHO_REQUEST, 0, 0x1234, 7, 5, SRC, DST)
    ref = bytes(IPv6(src=S_SRC, dst=S_DST) / ICMPv6EchoRequest(id=0x1234, seq=7, data=b"abcde"))
    assert bytes(buf) == ref[40:]
    hdr = parse_icmpv6(bytes(buf), SRC, DST)
    assert (hdr.type, hdr.code, hdr.ident, hdr.seq) == (128, 0, 0x1234, 7)
    assert icmpv6_checksum(bytes(buf), SRC, DST) == 0


def test_icmpv6_bad_checksum_and_truncated() -> None:
    buf = bytearray(8)
    build_icmpv6(buf, 0, ICMPV6_ECHO_REQUEST, 0, 1, 1, 0, SRC, DST)
    with pytest.raises(WireError, match=r"icmp6\.bad_checksum"):
        parse_icmpv6(bytes(buf), SRC, SRC)  # the pseudo-header is part of the sum
    assert parse_icmpv6(bytes(buf), SRC, SRC, verify=False).type == ICMPV6_ECHO_REQUEST
    with pytest.raises(WireError, match=r"icmp6\.truncated"):
        parse_icmpv6(bytes(7), SRC, DST)


def test_set_checksum_overwrites_garbage() -> None:
    buf = bytearray(bytes.fromhex("8000ffff00010002") + b"xyz")
    set_icmpv6_checksum(buf, 0, len(buf), SRC, DST)
    assert checksum(buf, pseudo_header_sum(SRC, DST, PROTO_ICMPV6, len(buf))) == 0


def test_ndp_options_match_scapy() -> None:
    mac = bytes.fromhex("52550a000202")
    prefix = bytes.fromhex("fd00" + "00" * 14)
    assert ndp_option_link_layer(OPT_SOURCE_LL, mac) == bytes(
        ICMPv6NDOptSrcLLAddr(lladdr="52:55:0a:00:02:02")
    )
    assert ndp_option_mtu(1500) == bytes(ICMPv6NDOptMTU(mtu=1500))
    assert ndp_option_prefix(prefix, 64, 0xC0, 86400, 14400) == bytes(
        ICMPv6NDOptPrefixInfo(
            prefixlen=64, L=1, A=1, validlifetime=86400, preferredlifetime=14400, prefix="fd00::"
        )
    )
    dns = bytes.fromhex("fd00" + "00" * 13 + "03")
    assert ndp_option_rdnss(1800, [dns]) == bytes(ICMPv6NDOptRDNSS(lifetime=1800, dns=["fd00::3"]))
    mine = ndp_option_dnssl(1800, ["example.com", "corp.example"])
    assert len(mine) % 8 == 0
    theirs = ICMPv6NDOptDNSSL(bytes(mine))
    assert theirs.lifetime == 1800 and theirs.len == len(mine) // 8
    assert [d.rstrip(".") for d in theirs.searchlist] == ["example.com", "corp.example"]
    assert encode_dns_name("a.bc") == b"\x01a\x02bc\x00"
    with pytest.raises(ValueError):
        encode_dns_name("a..b")


def test_parse_ndp_options() -> None:
    opts = ndp_option_link_layer(OPT_SOURCE_LL, bytes(6)) + ndp_option_mtu(9000)
    parsed = parse_ndp_options(memoryview(opts))
    assert [o.type for o in parsed] == [1, 5] and [len(o.data) for o in parsed] == [8, 8]
    for bad in (b"\x01\x00" + bytes(6), b"\x01\x02" + bytes(6), b"\x01"):
        with pytest.raises(WireError, match=r"ndp\.option\.bad_length"):
            parse_ndp_options(memoryview(bad))
