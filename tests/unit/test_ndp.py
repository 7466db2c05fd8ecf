"""NdpService: neighbour and router solicitations, router advertisements, echo, validation.

Frames from the guest are built with scapy (``scapy.layers.inet6``) and fed through the
classifier; what guestnet sends back is compared byte for byte with what scapy builds for the
same message, and the advertisement's options with golden bytes.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from guestnet.config import Config
from guestnet.core.ndp import (
    INITIAL_ADVERTS,
    MAX_INITIAL_RTR_ADVERT_INTERVAL_S,
    MAX_RTR_ADV_INTERVAL_S,
    MIN_RTR_ADV_INTERVAL_S,
    NdpService,
    build_ra_message,
)
from guestnet.wire.icmpv6 import set_icmpv6_checksum

OUR_MAC = "52:55:0a:00:02:02"
GUEST_MAC = "52:54:00:12:34:56"
OUR_LL = "fe80::5055:aff:fe00:202"
GUEST_LL = "fe80::5054:ff:fe12:3456"
ALL_NODES = "ff02::1"
ALL_NODES_MAC = "33:33:00:00:00:01"


def sn_mac(addr: str) -> str:
    """The solicited-node Ethernet address of ``addr`` (33:33:ff + its low 24 bits)."""
    return "33:33:ff:" + ipaddress.IPv6Address(addr).packed[13:].hex(":")


def sn_addr(addr: str) -> str:
    """The solicited-node group of ``addr``."""
    low = ipaddress.IPv6Address(addr).packed[13:]
    return str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + low))


def with_ndp(core: Any, greeted: bool = True) -> NdpService:
    """Put an NDP service (seeded randomness) into the harness's classifier.

    ``greeted``: the port has already had its first IPv6 packet (and the RA that greets it), so
    a test sees only the answers to what it feeds.
    """
    ndp = NdpService(core.config, core.pool, core.counters, core.switch, random.Random(7))
    core.classifier.ndp = ndp
    core.port.ip6_seen = greeted
    return ndp


def feed(core: Any, pkt: Packet) -> list[bytes]:
    core.feed(bytes(pkt))
    return core.take_sent()


def ns(
    target: str,
    src: str = "fd00::15",
    hlim: int = 255,
    lladdr: str | None = GUEST_MAC,
    dst: str | None = None,
    code: int = 0,
) -> Packet:
    """A Neighbor Solicitation for ``target`` from the guest (to its solicited-node group)."""
    ip_dst = dst or sn_addr(target)
    pkt = Ether(src=GUEST_MAC, dst=sn_mac(target)) / IPv6(src=src, dst=ip_dst, hlim=hlim)
    pkt = pkt / ICMPv6ND_NS(tgt=target, code=code)
    if lladdr is not None:
        pkt = pkt / ICMPv6NDOptSrcLLAddr(lladdr=lladdr)
    return pkt


# -- neighbour solicitation ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["fd00::2", "fd00::3", OUR_LL])
def test_ns_for_our_address_gets_na_byte_for_byte(core: Any, target: str) -> None:
    with_ndp(core)
    sent = feed(core, ns(target))
    expected = (
        Ether(dst=GUEST_MAC, src=OUR_MAC)
        / IPv6(src=target, dst="fd00::15", hlim=255)
        / ICMPv6ND_NA(R=1, S=1, O=1, tgt=target)
        / ICMPv6NDOptDstLLAddr(lladdr=OUR_MAC)
    )
    assert sent == [bytes(expected)]
    assert core.counters["ndp.na.sent"] == 1


def test_na_goes_to_the_source_link_layer_option(core: Any) -> None:
    """The answer's MAC is the one the solicitation names, and without one the frame's."""
    with_ndp(core)
    (sent,) = feed(core, ns("fd00::2", lladdr="02:00:00:00:00:99"))
    assert Ether(sent).dst == "02:00:00:00:00:99"
    (sent,) = feed(core, ns("fd00::2", src=GUEST_LL, lladdr=None, dst="fd00::2"))
    na = Ether(sent)
    assert na.dst == GUEST_MAC and na[IPv6].dst == GUEST_LL and na[ICMPv6ND_NA].S == 1


def test_dad_probe_for_guest_address_not_answered(core: Any) -> None:
    with_ndp(core)
    assert feed(core, ns("fd00::15", src="::", lladdr=None)) == []
    assert feed(core, ns(GUEST_LL, src="::", lladdr=None)) == []
    assert core.counters["ndp.ns.dad_ignored"] == 2
    assert core.port.guest_ip6 == {}  # :: is never learned as the guest's address


def test_dad_probe_for_our_address_defended_to_all_nodes(core: Any) -> None:
    with_ndp(core)
    (sent,) = feed(core, ns("fd00::2", src="::", lladdr=None))
    expected = (
        Ether(dst=ALL_NODES_MAC, src=OUR_MAC)
        / IPv6(src="fd00::2", dst=ALL_NODES, hlim=255)
        / ICMPv6ND_NA(R=1, S=0, O=1, tgt="fd00::2")
        / ICMPv6NDOptDstLLAddr(lladdr=OUR_MAC)
    )
    assert sent == bytes(expected)
    assert core.counters["ndp.ns.dad_conflict"] == 1


def test_ns_for_other_addresses_ignored(core: Any) -> None:
    with_ndp(core)
    assert feed(core, ns("fd00::99")) == []
    assert core.counters.snapshot() == {"ndp.ns.not_ours": 1}


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (ns("fd00::2", hlim=254), "ndp.bad_hop_limit"),
        (ns("fd00::2", hlim=64), "ndp.bad_hop_limit"),
        (ns("fd00::2", code=1), "ndp.bad_code"),
        (ns("fd00::2", src="::"), "ndp.unspecified_with_source_ll"),
        (ns("fd00::2", src="::", lladdr=None, dst="fd00::2"), "ndp.ns.bad_dad_destination"),
        (ns("ff02::1"), "ndp.ns.bad_target"),
        (
            Ether(src=GUEST_MAC, dst=OUR_MAC)
            / IPv6(src="fd00::15", dst="fd00::2", hlim=255)
            / ICMPv6ND_NS(tgt="fd00::2")
            / b"\x01\x00\x00\x00\x00\x00\x00\x00",
            "ndp.option.bad_length",
        ),
        (
            Ether(src=GUEST_MAC, dst=OUR_MAC)
            / IPv6(src="fd00::15", dst="fd00::2", hlim=255)
            / ICMPv6ND_RS()
            / b"\x01\x02\x00\x00\x00\x00\x00\x00",
            "ndp.option.bad_length",
        ),
        (
            Ether(src=GUEST_MAC, dst=OUR_MAC)
            / IPv6(src="fd00::15", dst="fd00::2", hlim=255, nh=58)
            / bytes.fromhex("8700 0000 0000 0000 fd00".replace(" ", "")),
            "ndp.truncated",
        ),
    ],
    ids=[
        "hlim254",
        "hlim64",
        "code",
        "dad_with_sll",
        "dad_unicast",
        "mcast_target",
        "opt0",
        "opt_past_end",
        "short",
    ],
)
def test_bad_ndp_messages_dropped_and_counted(core: Any, pkt: Packet, reason: str) -> None:
    with_ndp(core)
    raw = bytearray(bytes(pkt))
    if reason == "ndp.truncated":  # scapy has no short NS: fix up the checksum by hand
        set_icmpv6_checksum(raw, 54, len(raw), raw[22:38], raw[38:54])
    core.feed(raw)
    assert core.take_sent() == []
    assert core.counters[reason] == 1, core.counters.snapshot()


def test_guest_advertisements_and_redirects_counted(core: Any) -> None:
    with_ndp(core)
    base = Ether(src=GUEST_MAC, dst=ALL_NODES_MAC) / IPv6(src=GUEST_LL, dst=ALL_NODES, hlim=255)
    assert feed(core, base / ICMPv6ND_NA(tgt="fd00::15", O=1)) == []
    assert feed(core, base / ICMPv6ND_NA(tgt="fd00::2", O=1)) == []
    assert feed(core, base / ICMPv6ND_RA()) == []
    assert feed(core, base / ICMPv6ND_Redirect(tgt="fd00::9", dst="2001:db8::1")) == []
    snap = core.counters.snapshot()
    assert snap["ndp.na.ignored"] == 1 and snap["ndp.na.conflict"] == 1
    assert snap["ndp.ra.ignored"] == 1 and snap["ndp.redirect.ignored"] == 1


# -- router advertisements -------------------------------------------------------------------

#: The default configuration's advertisement: header (hop limit 64, M and O, lifetime 1800),
#: source link-layer, MTU 65520, prefix fd00::/64 (L, A, 86400/14400 s), RDNSS fd00::3 (1800 s).
RA_GOLDEN = bytes.fromhex(
    "86000000" "40c00708" "00000000" "00000000"
    "0101" "52550a000202"
    "0501" "0000" "0000fff0"
    "0304" "40" "c0" "00015180" "00003840" "00000000" "fd000000000000000000000000000000"
    "1903" "0000" "00000708" "fd000000000000000000000000000003"
)  # fmt: skip


def test_ra_message_golden() -> None:
    assert build_ra_message(Config()) == RA_GOLDEN


def test_ra_with_search_list_and_mtu() -> None:
    msg = build_ra_message(Config(mtu=1500, dns_search=("example.com", "corp.internal")))
    ra = ICMPv6ND_RA(msg)
    assert ra[ICMPv6NDOptMTU].mtu == 1500
    dnssl = ra[ICMPv6NDOptDNSSL]
    assert [d.rstrip(".") for d in dnssl.searchlist] == ["example.com", "corp.internal"]
    assert dnssl.lifetime == 1800


def test_rs_answered_with_ra_unicast(core: Any) -> None:
    with_ndp(core)
    rs = (
        Ether(src=GUEST_MAC, dst="33:33:00:00:00:02")
        / IPv6(src=GUEST_LL, dst="ff02::2", hlim=255)
        / ICMPv6ND_RS()
        / ICMPv6NDOptSrcLLAddr(lladdr=GUEST_MAC)
    )
    (sent,) = feed(core, rs)
    expected = (
        Ether(dst=GUEST_MAC, src=OUR_MAC)
        / IPv6(src=OUR_LL, dst=GUEST_LL, hlim=255)
        / ICMPv6ND_RA(chlim=64, M=1, O=1, prf=0, routerlifetime=1800)
        / ICMPv6NDOptSrcLLAddr(lladdr=OUR_MAC)
        / ICMPv6NDOptMTU(mtu=65520)
        / ICMPv6NDOptPrefixInfo(
            prefixlen=64, L=1, A=1, validlifetime=86400, preferredlifetime=14400, prefix="fd00::"
        )
        / ICMPv6NDOptRDNSS(lifetime=1800, dns=["fd00::3"])
    )
    assert sent == bytes(expected)
    ra = Ether(sent)
    assert ra[ICMPv6ND_RA].cksum == Ether(bytes(expected))[ICMPv6ND_RA].cksum
    assert core.counters["ndp.ra.solicited"] == 1


def test_rs_from_unspecified_answered_to_all_nodes(core: Any) -> None:
    with_ndp(core)
    rs = (
        Ether(src=GUEST_MAC, dst="33:33:00:00:00:02")
        / IPv6(src="::", dst="ff02::2", hlim=255)
        / ICMPv6ND_RS()
    )
    (sent,) = feed(core, rs)
    ra = Ether(sent)
    assert ra.dst == ALL_NODES_MAC and ra[IPv6].dst == ALL_NODES and ra[IPv6].hlim == 255
    assert ra[IPv6].src == OUR_LL and ICMPv6ND_RA in ra


def test_unsolicited_ra_at_start_and_periodically_to_every_ipv6_port(core: Any) -> None:
    other = core.add_port("guest1")
    other.ip6_seen = True
    ipv4_only = core.add_port("guest2")  # its guest never spoke IPv6: no advertisements
    ndp = with_ndp(core)
    assert ndp.next_deadline() is None
    now = 100.0
    ndp.start(now)
    sent = [core.take_sent(), other.sent]
    assert [len(s) for s in sent] == [1, 1] and sent[0] == sent[1]
    ra = Ether(sent[0][0])
    assert ra.dst == ALL_NODES_MAC and ra[IPv6].dst == ALL_NODES
    assert bytes(ra[ICMPv6ND_RA])[4:] == RA_GOLDEN[4:]
    intervals = []
    for _ in range(10):
        deadline = ndp.next_deadline()
        assert deadline is not None
        ndp.handle_timeout(deadline - 0.5)  # early: nothing
        assert core.take_sent() == []
        intervals.append(deadline - now)
        now = deadline
        ndp.handle_timeout(now)
        assert len(core.take_sent()) == 1
    first, rest = intervals[: INITIAL_ADVERTS - 1], intervals[INITIAL_ADVERTS - 1 :]
    assert all(i <= MAX_INITIAL_RTR_ADVERT_INTERVAL_S for i in first)
    assert all(MIN_RTR_ADV_INTERVAL_S <= i <= MAX_RTR_ADV_INTERVAL_S for i in rest)
    assert len(set(rest)) == len(rest)  # randomised, as RFC 4861 asks
    assert core.counters["ndp.ra.unsolicited"] == 2 * 11
    assert len(other.sent) == 11 and ipv4_only.sent == []


def test_no_ports_no_frame(make_core: Any) -> None:
    core = make_core()
    core.switch.detach(core.port)
    ndp = with_ndp(core)
    ndp.start(0.0)
    assert core.pool.in_use == 0 and core.counters.snapshot() == {}
    assert ndp.next_deadline() is not None


def test_first_ipv6_packet_on_a_port_gets_an_ra(core: Any, frames: Any) -> None:
    with_ndp(core, greeted=False)
    core.feed(frames.arp())
    assert len(core.take_sent()) == 1  # the ARP reply: no RA for an IPv4 frame
    dad = ns("fd00::15", src="::", lladdr=None)
    sent = feed(core, dad)
    assert len(sent) == 1 and ICMPv6ND_RA in Ether(sent[0])
    assert Ether(sent[0])[IPv6].dst == ALL_NODES
    assert feed(core, dad) == []  # once per port
    assert core.port.ip6_seen


def test_prefix_not_64_is_not_autonomous() -> None:
    cfg = Config(
        ipv6_prefix=ipaddress.IPv6Network("fd00::/48"),
        gateway6=ipaddress.IPv6Address("fd00::2"),
    )
    pi = ICMPv6ND_RA(build_ra_message(cfg))[ICMPv6NDOptPrefixInfo]
    assert pi.prefixlen == 48 and pi.L == 1 and pi.A == 0


# -- echo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dst", ["fd00::2", "fd00::3", OUR_LL])
def test_echo_to_our_addresses_answered(core: Any, dst: str) -> None:
    with_ndp(core)
    req = (
        Ether(src=GUEST_MAC, dst=OUR_MAC)
        / IPv6(src="fd00::15", dst=dst)
        / ICMPv6EchoRequest(id=0x4242, seq=9, data=b"payload!" * 8)
    )
    (sent,) = feed(core, req)
    expected = (
        Ether(dst=GUEST_MAC, src=OUR_MAC)
        / IPv6(src=dst, dst="fd00::15", hlim=64)
        / ICMPv6EchoReply(id=0x4242, seq=9, data=b"payload!" * 8)
    )
    assert sent == bytes(expected)
    assert core.counters["icmp6.echo.answered"] == 1


def test_echo_elsewhere_and_errors_not_for_ndp(core: Any) -> None:
    with_ndp(core)
    base = Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="fd00::15", dst="2001:db8::1")
    assert feed(core, base / ICMPv6EchoRequest()) == []
    assert feed(core, base / ICMPv6DestUnreach()) == []
    assert core.counters.snapshot() == {"icmp6.unavailable": 2}
