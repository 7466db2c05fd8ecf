"""Wire codecs (ethernet, arp, ipv4, icmp, udp, tcp) against golden bytes and against scapy.

Golden frames are hex of real frames (a Linux guest's ARP request, a DNS query, a SYN with the
usual Linux options, a ping) with addresses from the default configuration. Scapy is the
independent implementation: what we build, scapy must parse to the same fields and compute the
same checksums for; what scapy builds, we must parse.
"""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from guestnet.wire import WireError
from guestnet.wire.arp import ARP_LEN, ARP_REPLY, ARP_REQUEST, build_arp, parse_arp
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import (
    BROADCAST,
    ETH_HLEN,
    ETHERTYPE_ARP,
    build_ethernet,
    is_multicast,
    parse_ethernet,
)
from guestnet.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    UNREACH_PORT,
    build_icmp,
    parse_icmp,
)
from guestnet.wire.ipv4 import (
    FLAG_DF,
    FLAG_MF,
    IPV4_HLEN,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    build_ipv4,
    parse_ipv4,
)
from guestnet.wire.tcp import (
    ACK,
    PSH,
    SYN,
    build_syn_options,
    build_tcp,
    parse_tcp,
    parse_tcp_options,
    verify_tcp,
)
from guestnet.wire.udp import build_udp, parse_udp, verify_udp

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("52550a000202")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
DNS_IP = bytes([10, 0, 2, 3])
REMOTE_IP = bytes([93, 184, 216, 34])

# Guest 52:54:00:12:34:56 / 10.0.2.15 asks who has 10.0.2.2 (unpadded, as a TAP delivers it).
GOLDEN_ARP = bytes.fromhex(
    "ffffffffffff525400123456 08060001 0800 06 04 0001 525400123456 0a00020f 000000000000 0a000202"
)
# DNS query for example.com A from 10.0.2.15:45000 to 10.0.2.3:53, DF, TTL 64, id 0x1c46.
GOLDEN_UDP = bytes.fromhex(
    "52550a000202525400123456 0800"
    "4500 0039 1c46 4000 40 11 065d 0a00020f 0a000203"
    "afc8 0035 0025 55f3"
    "123401000001000000000000076578616d706c6503636f6d0000010001"
)
# SYN 10.0.2.15:51234 -> 93.184.216.34:80 with MSS 1460, SACK-permitted, TS, NOP, WS 7.
GOLDEN_TCP = bytes.fromhex(
    "52550a000202525400123456 0800"
    "4500 003c beef 4000 40 06 39e3 0a00020f 5db8d822"
    "c822 0050 01020304 00000000 a0 02 faf0 5c6b 0000"
    "020405b4 0402 080a0001e24000000000 01 030307"
)
# Echo request id 7 seq 1 "abcdefgh" to the gateway.
GOLDEN_ICMP = bytes.fromhex(
    "52550a000202525400123456 0800"
    "4500 0024 4242 4000 40 01 e086 0a00020f 0a000202"
    "08 00 6662 0007 0001 6162636465666768"
)
# The IPv4 header everyone checks their checksum against (192.168.0.1 -> 192.168.0.199).
CLASSIC_IPV4 = bytes.fromhex("450000730000400040 11b861c0a80001c0a800c7")


def scapy_recomputed(pkt: Packet, layer: type[Packet]) -> int:
    """The checksum scapy computes for ``layer`` when it rebuilds ``pkt`` from scratch."""
    again = pkt.copy()
    del again[layer].chksum
    return int(Ether(bytes(again))[layer].chksum)


# --- ethernet ----------------------------------------------------------------------------------


def test_ethernet_golden() -> None:
    eth = parse_ethernet(GOLDEN_ARP)
    assert (eth.dst, eth.src, eth.ethertype) == (BROADCAST, GUEST_MAC, ETHERTYPE_ARP)
    buf = bytearray(ETH_HLEN)
    assert build_ethernet(buf, 0, BROADCAST, GUEST_MAC, ETHERTYPE_ARP) == ETH_HLEN
    assert bytes(buf) == GOLDEN_ARP[:ETH_HLEN]


def test_ethernet_truncated() -> None:
    for n in range(ETH_HLEN):
        with pytest.raises(WireError, match=r"^eth\.truncated$"):
            parse_ethernet(GOLDEN_ARP[:n])


def test_ethernet_multicast_bit() -> None:
    assert is_multicast(BROADCAST)
    assert is_multicast(bytes.fromhex("01005e000001"))
    assert is_multicast(bytes.fromhex("333300000001"))
    assert not is_multicast(GUEST_MAC)


def test_ethernet_against_scapy() -> None:
    buf = bytearray(ETH_HLEN)
    build_ethernet(buf, 0, OUR_MAC, GUEST_MAC, 0x88B5)
    pkt = Ether(bytes(buf))
    assert (pkt.dst, pkt.src, pkt.type) == ("52:55:0a:00:02:02", "52:54:00:12:34:56", 0x88B5)
    eth = parse_ethernet(
        bytes(Ether(dst="01:00:5e:00:00:fb", src="02:00:00:00:00:01", type=0x86DD))
    )
    assert eth == (bytes.fromhex("01005e0000fb"), bytes.fromhex("020000000001"), 0x86DD)


# --- arp ---------------------------------------------------------------------------------------


def test_arp_golden() -> None:
    pkt = parse_arp(memoryview(GOLDEN_ARP)[ETH_HLEN:])
    assert pkt == (ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY_IP)
    buf = bytearray(ETH_HLEN + ARP_LEN)
    off = build_ethernet(buf, 0, BROADCAST, GUEST_MAC, ETHERTYPE_ARP)
    assert build_arp(buf, off, ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY_IP) == len(buf)
    assert bytes(buf) == GOLDEN_ARP


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, b"\x00\x06", "arp.bad_hardware"),  # htype IEEE 802
        (4, b"\x08", "arp.bad_hardware"),  # hlen 8
        (2, b"\x86\xdd", "arp.bad_protocol"),  # ptype IPv6
        (5, b"\x10", "arp.bad_protocol"),  # plen 16
    ],
)
def test_arp_wrong_types(offset: int, value: bytes, reason: str) -> None:
    arp = bytearray(GOLDEN_ARP[ETH_HLEN:])
    arp[offset : offset + len(value)] = value
    with pytest.raises(WireError) as exc:
        parse_arp(arp)
    assert exc.value.reason == reason


def test_arp_truncated() -> None:
    with pytest.raises(WireError, match=r"^arp\.truncated$"):
        parse_arp(GOLDEN_ARP[ETH_HLEN:-1])


def test_arp_against_scapy() -> None:
    buf = bytearray(ETH_HLEN + ARP_LEN)
    off = build_ethernet(buf, 0, GUEST_MAC, OUR_MAC, ETHERTYPE_ARP)
    build_arp(buf, off, ARP_REPLY, OUR_MAC, GATEWAY_IP, GUEST_MAC, GUEST_IP)
    pkt = Ether(bytes(buf))[ARP]
    assert (pkt.hwtype, pkt.ptype, pkt.hwlen, pkt.plen, pkt.op) == (1, 0x0800, 6, 4, 2)
    assert (pkt.hwsrc, pkt.psrc) == ("52:55:0a:00:02:02", "10.0.2.2")
    assert (pkt.hwdst, pkt.pdst) == ("52:54:00:12:34:56", "10.0.2.15")

    theirs = bytes(ARP(op=2, hwsrc="02:11:22:33:44:55", psrc="10.0.2.99", pdst="10.0.2.2"))
    ours = parse_arp(theirs)
    assert ours.op == ARP_REPLY
    assert ours.sha == bytes.fromhex("021122334455")
    assert ours.spa == bytes([10, 0, 2, 99])
    assert ours.tpa == GATEWAY_IP


# --- ipv4 --------------------------------------------------------------------------------------


def test_ipv4_classic_header() -> None:
    ip = parse_ipv4(CLASSIC_IPV4 + bytes(95))
    assert (ip.header_len, ip.total_len, ip.ttl, ip.proto, ip.frag) == (20, 115, 64, 17, FLAG_DF)
    assert (ip.src, ip.dst) == (bytes([192, 168, 0, 1]), bytes([192, 168, 0, 199]))
    buf = bytearray(IPV4_HLEN)
    build_ipv4(buf, 0, ip.src, ip.dst, PROTO_UDP, 95, ident=0, ttl=64)
    assert bytes(buf) == CLASSIC_IPV4


def test_ipv4_golden_frames() -> None:
    for frame, proto, ident in (
        (GOLDEN_UDP, PROTO_UDP, 0x1C46),
        (GOLDEN_TCP, PROTO_TCP, 0xBEEF),
        (GOLDEN_ICMP, PROTO_ICMP, 0x4242),
    ):
        data = memoryview(frame)[ETH_HLEN:]
        ip = parse_ipv4(data)
        assert (ip.proto, ip.ident, ip.ttl, ip.src) == (proto, ident, 64, GUEST_IP)
        assert ip.total_len == len(data)
        assert not ip.is_fragment
        buf = bytearray(IPV4_HLEN)
        build_ipv4(buf, 0, ip.src, ip.dst, proto, ip.total_len - 20, ident=ident)
        assert bytes(buf) == bytes(data[:IPV4_HLEN])


def test_ipv4_ethernet_padding_is_allowed() -> None:
    data = bytes(GOLDEN_ICMP[ETH_HLEN:]) + bytes(10)
    assert parse_ipv4(data).total_len == len(GOLDEN_ICMP) - ETH_HLEN


def _ip_mutated(offset: int, value: bytes, fix_checksum: bool = True) -> bytes:
    ip = bytearray(GOLDEN_UDP[ETH_HLEN:])
    ip[offset : offset + len(value)] = value
    if fix_checksum:
        ip[10:12] = b"\x00\x00"
        hlen = max((ip[0] & 0x0F) * 4, 20)
        ip[10:12] = checksum(ip[:hlen]).to_bytes(2, "big")
    return bytes(ip)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (GOLDEN_UDP[ETH_HLEN : ETH_HLEN + 19], "ipv4.truncated"),
        (_ip_mutated(0, b"\x65"), "ipv4.bad_version"),
        (_ip_mutated(0, b"\x44"), "ipv4.bad_header_length"),
        (_ip_mutated(2, b"\x00\x13"), "ipv4.bad_total_length"),  # below the header length
        (_ip_mutated(2, b"\x00\x3a"), "ipv4.bad_total_length"),  # one more than is there
        (_ip_mutated(0, b"\x4f"), "ipv4.bad_total_length"),  # 60-byte header in 57 bytes
        (_ip_mutated(8, b"\x3f", fix_checksum=False), "ipv4.bad_checksum"),
    ],
)
def test_ipv4_bad(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as exc:
        parse_ipv4(data)
    assert exc.value.reason == reason


def test_ipv4_unverified_checksum() -> None:
    data = _ip_mutated(8, b"\x3f", fix_checksum=False)
    assert parse_ipv4(data, verify=False).ttl == 0x3F


def test_ipv4_options_and_fragments_from_scapy() -> None:
    pkt = IP(src="10.0.2.15", dst="10.0.2.2", options=b"\x94\x04\x00\x00", proto=17)
    pkt = IP(bytes(pkt / Raw(b"x" * 8)))
    ip = parse_ipv4(bytes(pkt))
    assert ip.header_len == 24
    assert ip.total_len == 32

    whole = IP(bytes(IP(src="10.0.2.15", dst="1.2.3.4") / UDP() / Raw(bytes(100))))
    frags = [IP(bytes(f)) for f in fragment(whole, fragsize=48)]
    assert len(frags) == 3
    parsed = [parse_ipv4(bytes(f)) for f in frags]
    assert all(p.is_fragment for p in parsed)
    assert [p.frag_offset for p in parsed] == [f.frag * 8 for f in frags]
    assert [bool(p.frag & FLAG_MF) for p in parsed] == [True] * (len(frags) - 1) + [False]


def test_ipv4_ours_to_scapy() -> None:
    rng = random.Random(4)
    for _ in range(50):
        src, dst = rng.randbytes(4), rng.randbytes(4)
        ident, ttl, tos = rng.randrange(65536), rng.randrange(1, 256), rng.randrange(256)
        frag = rng.choice([FLAG_DF, 0, FLAG_MF | 3])
        plen = rng.randrange(0, 200)
        buf = bytearray(IPV4_HLEN + plen)
        build_ipv4(buf, 0, src, dst, 253, plen, ident=ident, ttl=ttl, frag=frag, tos=tos)
        pkt = IP(bytes(buf))
        assert (pkt.id, pkt.ttl, pkt.tos, pkt.proto, pkt.len) == (ident, ttl, tos, 253, 20 + plen)
        assert (int(pkt.flags) << 13 | pkt.frag) == frag
        assert (pkt.src, pkt.dst) == (".".join(map(str, src)), ".".join(map(str, dst)))
        assert scapy_recomputed(Ether() / pkt, IP) == pkt.chksum


def test_ipv4_scapy_to_ours() -> None:
    rng = random.Random(8)
    for _ in range(50):
        pkt = IP(
            src=".".join(str(b) for b in rng.randbytes(4)),
            dst=".".join(str(b) for b in rng.randbytes(4)),
            id=rng.randrange(65536),
            ttl=rng.randrange(256),
            tos=rng.randrange(256),
            flags=rng.choice(["DF", "", "MF"]),
            proto=rng.choice([1, 6, 17, 132]),
        ) / Raw(rng.randbytes(rng.randrange(0, 100)))
        raw = bytes(pkt)
        ip = parse_ipv4(raw)
        again = IP(raw)
        assert (ip.ident, ip.ttl, ip.tos, ip.proto, ip.total_len) == (
            again.id,
            again.ttl,
            again.tos,
            again.proto,
            again.len,
        )
        assert ip.src == raw[12:16] and ip.dst == raw[16:20]


# --- icmp --------------------------------------------------------------------------------------


def test_icmp_golden() -> None:
    msg = memoryview(GOLDEN_ICMP)[ETH_HLEN + IPV4_HLEN :]
    hdr = parse_icmp(msg)
    assert (hdr.type, hdr.code, hdr.checksum, hdr.ident, hdr.seq) == (8, 0, 0x6662, 7, 1)
    buf = bytearray(len(msg))
    buf[8:] = b"abcdefgh"
    assert build_icmp(buf, 0, ICMP_ECHO_REQUEST, 0, 7, 1, 8) == len(msg)
    assert bytes(buf) == bytes(msg)


def test_icmp_bad() -> None:
    msg = bytearray(GOLDEN_ICMP[ETH_HLEN + IPV4_HLEN :])
    with pytest.raises(WireError, match=r"^icmp\.truncated$"):
        parse_icmp(msg[:7])
    msg[-1] ^= 1
    with pytest.raises(WireError, match=r"^icmp\.bad_checksum$"):
        parse_icmp(msg)
    assert parse_icmp(msg, verify=False).type == ICMP_ECHO_REQUEST


def test_icmp_ours_to_scapy() -> None:
    body = bytes(range(37))  # odd length
    buf = bytearray(8 + len(body))
    buf[8:] = body
    build_icmp(buf, 0, ICMP_ECHO_REPLY, 0, 0xABCD, 0x1234, len(body))
    pkt = Ether() / IP(src="10.0.2.2", dst="10.0.2.15") / ICMP(bytes(buf))
    pkt = Ether(bytes(pkt))
    icmp = pkt[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq) == (0, 0, 0xABCD, 0x1234)
    assert bytes(icmp.payload) == body
    assert scapy_recomputed(pkt, ICMP) == icmp.chksum

    # An error message: port unreachable quoting an IP header + 8 bytes.
    quote = bytes(GOLDEN_UDP[ETH_HLEN : ETH_HLEN + 28])
    buf = bytearray(8 + len(quote))
    buf[8:] = quote
    build_icmp(buf, 0, ICMP_DEST_UNREACH, UNREACH_PORT, 0, 0, len(quote))
    pkt = Ether(bytes(Ether() / IP(src="10.0.2.2", dst="10.0.2.15") / ICMP(bytes(buf))))
    assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 3)
    assert scapy_recomputed(pkt, ICMP) == pkt[ICMP].chksum


def test_icmp_scapy_to_ours() -> None:
    for typ, code in ((0, 0), (8, 0), (3, 1), (11, 0)):
        raw = bytes(ICMP(type=typ, code=code, id=99, seq=5) / Raw(b"payload!x"))
        hdr = parse_icmp(raw)
        assert (hdr.type, hdr.code) == (typ, code)
        if typ in (0, 8):
            assert (hdr.ident, hdr.seq) == (99, 5)


# --- udp ---------------------------------------------------------------------------------------


def test_udp_golden() -> None:
    seg = memoryview(GOLDEN_UDP)[ETH_HLEN + IPV4_HLEN :]
    udp = parse_udp(seg)
    assert udp == (45000, 53, 37, 0x55F3)
    assert verify_udp(seg, GUEST_IP, DNS_IP, udp.length)
    buf = bytearray(seg)
    buf[:8] = bytes(8)
    assert build_udp(buf, 0, 45000, 53, 29, GUEST_IP, DNS_IP) == 8
    assert bytes(buf) == bytes(seg)


def test_udp_bad() -> None:
    seg = bytearray(GOLDEN_UDP[ETH_HLEN + IPV4_HLEN :])
    with pytest.raises(WireError, match=r"^udp\.truncated$"):
        parse_udp(seg[:7])
    for bad_len in (0, 7, len(seg) + 1, 0xFFFF):
        mutated = bytearray(seg)
        mutated[4:6] = bad_len.to_bytes(2, "big")
        with pytest.raises(WireError, match=r"^udp\.bad_length$"):
            parse_udp(mutated)
    seg[-1] ^= 0x40
    assert not verify_udp(seg, GUEST_IP, DNS_IP, len(seg))
    seg[6:8] = b"\x00\x00"  # no checksum at all: accepted
    assert verify_udp(seg, GUEST_IP, DNS_IP, len(seg))


def test_udp_shorter_length_than_ip_payload() -> None:
    """The UDP length, not the IP payload, bounds the datagram (trailing bytes ignored)."""
    seg = bytes(GOLDEN_UDP[ETH_HLEN + IPV4_HLEN :]) + b"junk"
    udp = parse_udp(seg)
    assert udp.length == 37
    assert verify_udp(seg, GUEST_IP, DNS_IP, udp.length)


def test_udp_ours_to_scapy() -> None:
    rng = random.Random(17)
    for plen in (0, 1, 2, 13, 512, 767, 768, 769, 1472, 8000):
        payload = rng.randbytes(plen)
        buf = bytearray(8 + plen)
        buf[8:] = payload
        build_udp(buf, 0, 1234, 5678, plen, GUEST_IP, REMOTE_IP)
        pkt = Ether(bytes(Ether() / IP(src="10.0.2.15", dst="93.184.216.34") / UDP(bytes(buf))))
        udp = pkt[UDP]
        assert (udp.sport, udp.dport, udp.len) == (1234, 5678, 8 + plen)
        assert bytes(udp.payload) == payload
        assert scapy_recomputed(pkt, UDP) == udp.chksum


def test_udp_without_checksum() -> None:
    buf = bytearray(12)
    build_udp(buf, 0, 1, 2, 4, GUEST_IP, REMOTE_IP, compute_checksum=False)
    assert buf[6:8] == b"\x00\x00"


def test_udp_scapy_to_ours() -> None:
    rng = random.Random(23)
    for plen in (0, 1, 100, 1001):
        raw = bytes(
            IP(src="10.0.2.15", dst="10.0.2.3") / UDP(sport=5, dport=53) / rng.randbytes(plen)
        )
        l4 = raw[20:]
        udp = parse_udp(l4)
        assert (udp.sport, udp.dport, udp.length) == (5, 53, 8 + plen)
        assert verify_udp(l4, GUEST_IP, DNS_IP, udp.length)
        assert not verify_udp(l4, GUEST_IP, GATEWAY_IP, udp.length)


# --- tcp ---------------------------------------------------------------------------------------


def test_tcp_golden() -> None:
    seg = memoryview(GOLDEN_TCP)[ETH_HLEN + IPV4_HLEN :]
    tcp = parse_tcp(seg)
    assert tcp == (51234, 80, 0x01020304, 0, 40, SYN, 64240, 0x5C6B, 0)
    assert verify_tcp(seg, GUEST_IP, REMOTE_IP)
    opts = parse_tcp_options(seg, tcp.header_len)
    assert opts == (1460, 7, True, (123456, 0))
    buf = bytearray(len(seg))
    options = bytes(seg[20:40])
    end = build_tcp(buf, 0, 51234, 80, 0x01020304, 0, SYN, 64240, 0, GUEST_IP, REMOTE_IP, options)
    assert end == 40
    assert bytes(buf) == bytes(seg)


def test_tcp_bad_header() -> None:
    seg = bytearray(GOLDEN_TCP[ETH_HLEN + IPV4_HLEN :])
    with pytest.raises(WireError, match=r"^tcp\.truncated$"):
        parse_tcp(seg[:19])
    with pytest.raises(WireError, match=r"^tcp\.bad_header_length$"):
        parse_tcp(seg[:39])  # data offset says 40
    for doff in (0, 4):
        mutated = bytearray(seg)
        mutated[12] = doff << 4
        with pytest.raises(WireError, match=r"^tcp\.bad_header_length$"):
            parse_tcp(mutated)
    seg[5] ^= 1
    assert not verify_tcp(seg, GUEST_IP, REMOTE_IP)


def _opts(raw: bytes) -> tuple[bytes, int]:
    """A fake segment carrying ``raw`` options (padded to 4), and its header length."""
    padded = raw + bytes(-len(raw) % 4)
    return bytes(20) + padded, 20 + len(padded)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", (None, None, False, None)),
        (b"\x02\x04\x05\xb4", (1460, None, False, None)),
        (b"\x01\x03\x03\x0e", (None, 14, False, None)),
        (b"\x01\x03\x03\x0f", (None, 14, False, None)),  # RFC 7323: clamp shift counts above 14
        (b"\x04\x02", (None, None, True, None)),
        (b"\x08\x0a" + struct.pack("!II", 0xDEADBEEF, 7), (None, None, False, (0xDEADBEEF, 7))),
        (b"\x01\x01\x01\x01\x02\x04\x00\x40", (64, None, False, None)),
        # Everything after EOL is padding, even if it looks like an option.
        (b"\x00\x02\x04\x05\xb4", (None, None, False, None)),
        (b"\x02\x04\x05\xb4\x00\xff", (1460, None, False, None)),
        # Unknown kinds and known kinds with the wrong length are skipped, as Linux does.
        (b"\xfe\x06abcd\x02\x04\x01\x00", (256, None, False, None)),
        (b"\x02\x03\x05\x01\x01\x01", (None, None, False, None)),
        (b"\x05\x0a" + bytes(8) + b"\x04\x02", (None, None, True, None)),  # SACK blocks
    ],
)
def test_tcp_options(raw: bytes, expected: tuple[object, ...]) -> None:
    seg, hlen = _opts(raw)
    assert tuple(parse_tcp_options(seg, hlen)) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"\x02\x00\x00\x00",  # length 0
        b"\x02\x01\x00\x00",  # length 1
        b"\x02\x08\x05\xb4",  # runs past the header
        b"\x01\x01\x01\x08",  # kind in the last byte, no room for its length
        b"\x08\x0a\x00\x00\x00\x00\x00\x00",  # timestamp cut short by the header length
    ],
)
def test_tcp_options_malformed(raw: bytes) -> None:
    seg, hlen = _opts(raw)
    with pytest.raises(WireError, match=r"^tcp\.bad_option$"):
        parse_tcp_options(seg, hlen)


def test_tcp_ours_to_scapy() -> None:
    rng = random.Random(99)
    for plen, flags, options in (
        (0, SYN, build_syn_options(1460, 7)),
        (0, SYN | ACK, build_syn_options(65480, None)),
        (1, ACK | PSH, b""),
        (1000, ACK | PSH, b""),
        (65000, ACK, b""),
    ):
        payload = rng.randbytes(plen)
        hlen = 20 + len(options)
        buf = bytearray(hlen + plen)
        buf[hlen:] = payload
        end = build_tcp(buf, 0, 40000, 443, 7, 9, flags, 512, plen, GUEST_IP, REMOTE_IP, options)
        assert end == len(buf)
        ip = IP(src="10.0.2.15", dst="93.184.216.34", proto=6) / Raw(bytes(buf))
        pkt = Ether(bytes(Ether() / ip))
        tcp = pkt[TCP]
        assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, int(tcp.flags), tcp.window) == (
            40000,
            443,
            7,
            9,
            flags,
            512,
        )
        assert tcp.dataofs * 4 == hlen
        assert bytes(tcp.payload) == payload
        assert scapy_recomputed(pkt, TCP) == tcp.chksum
        if options:
            got = dict(tcp.options)
            assert got["MSS"] == struct.unpack("!H", options[2:4])[0]
            if len(options) > 4:
                assert got["WScale"] == 7


def test_tcp_partial_checksum_for_offload() -> None:
    """compute_checksum=False leaves the pseudo-header sum, as NEEDS_CSUM expects."""
    buf = bytearray(20 + 100)
    build_tcp(buf, 0, 1, 2, 3, 4, ACK, 5, 100, GUEST_IP, REMOTE_IP, compute_checksum=False)
    assert struct.unpack_from("!H", buf, 16)[0] == pseudo_header_sum(
        GUEST_IP, REMOTE_IP, PROTO_TCP, 120
    )
    # Finishing the job as the kernel does gives the full checksum.
    csum = checksum(buf)
    struct.pack_into("!H", buf, 16, csum)
    assert verify_tcp(buf, GUEST_IP, REMOTE_IP)


def test_tcp_scapy_to_ours() -> None:
    pkt = IP(src="10.0.2.15", dst="93.184.216.34") / TCP(
        sport=33000,
        dport=22,
        seq=0xFFFFFFF0,
        ack=0x80000000,
        flags="SA",
        window=1024,
        options=[
            ("MSS", 1400),
            ("NOP", None),
            ("WScale", 10),
            ("SAckOK", b""),
            ("Timestamp", (1, 2)),
            ("EOL", None),
        ],
    )
    raw = bytes(pkt)
    seg = raw[20:]
    tcp = parse_tcp(seg)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.window) == (
        33000,
        22,
        0xFFFFFFF0,
        0x80000000,
        SYN | ACK,
        1024,
    )
    assert verify_tcp(seg, GUEST_IP, REMOTE_IP)
    assert parse_tcp_options(seg, tcp.header_len) == (1400, 10, True, (1, 2))
