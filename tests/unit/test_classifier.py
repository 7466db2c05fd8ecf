"""FrameClassifier: every routing branch, counted drops for bad input, and MAC learning."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from guestnet.core.classifier import MAX_FRAME
from guestnet.core.packet import IpPacket
from guestnet.core.port import MAX_GUEST_IP6, Port
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum
from guestnet.wire.ethernet import BROADCAST, ETHERTYPE_IPV4, build_ethernet
from guestnet.wire.ipv4 import FLAG_MF, PROTO_TCP, PROTO_UDP, build_ipv4
from guestnet.wire.ipv6 import parse_ipv6
from guestnet.wire.l3 import IPV6
from guestnet.wire.tcp import ACK, SYN


class Recorder:
    """A fake service for every handler Protocol; copies what it is given (views expire)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.raise_reason: str | None = None

    def _record(self, kind: str, pkt: IpPacket, now: float, **extra: Any) -> None:
        self.calls.append(
            (
                kind,
                {
                    "src_mac": pkt.src_mac,
                    "src": pkt.ip.src,
                    "dst": pkt.ip.dst,
                    "proto": pkt.ip.proto,
                    "l4": bytes(pkt.l4),
                    "trusted": pkt.csum_trusted,
                    "port": pkt.port.name,
                    "now": now,
                    **extra,
                },
            )
        )
        if self.raise_reason:
            raise WireError(self.raise_reason)

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        self._record("udp", pkt, now, sport=sport, dport=dport, payload=bytes(payload))

    def handle_tcp(self, pkt: IpPacket, now: float) -> None:
        self._record("tcp", pkt, now)

    def handle_icmp(self, pkt: IpPacket, now: float) -> None:
        self._record("icmp", pkt, now)

    def handle_fragment(self, pkt: IpPacket, now: float) -> None:
        self._record("fragment", pkt, now)

    def handle_icmp6(self, pkt: IpPacket, now: float) -> None:
        self._record("icmp6", pkt, now, hop_limit=pkt.hop_limit, family=pkt.family)

    def port_up(self, port: Port) -> None:
        self.calls.append(("port_up", {"port": port.name}))


SERVICES = ("dhcp", "dns_udp", "dns_tcp", "icmp", "udp_nat", "tcp_nat", "reassembly")


@pytest.fixture
def services(core: Any) -> dict[str, Recorder]:
    """One Recorder per classifier service slot, installed on ``core.classifier``."""
    recs = {name: Recorder() for name in SERVICES}
    for name, rec in recs.items():
        setattr(core.classifier, name, rec)
    return recs


def only_call(services: dict[str, Recorder], name: str) -> tuple[str, dict[str, Any]]:
    """Assert exactly one service was called, exactly once, and return that call."""
    called = {n: r.calls for n, r in services.items() if r.calls}
    assert list(called) == [name], called
    assert len(called[name]) == 1
    return called[name][0]


# --- routing -----------------------------------------------------------------------------------


def test_dhcp_discover_broadcast(core: Any, frames: Any, services: dict[str, Recorder]) -> None:
    zero, bcast = bytes(4), b"\xff" * 4
    core.feed(frames.udp(68, 67, b"discover", src=zero, dst=bcast, eth_dst=BROADCAST))
    kind, call = only_call(services, "dhcp")
    assert (kind, call["sport"], call["dport"], call["payload"]) == ("udp", 68, 67, b"discover")
    assert call["src_mac"] == frames.GUEST_MAC
    assert call["now"] == core.now
    assert call["port"] == "guest0"


@pytest.mark.parametrize("dst_name", ["DNS_IP", "GATEWAY_IP"])
def test_dns_udp(core: Any, frames: Any, services: dict[str, Recorder], dst_name: str) -> None:
    dst = getattr(frames, dst_name)
    core.feed(frames.udp(5353, 53, b"query", dst=dst))
    _kind, call = only_call(services, "dns_udp")
    assert (call["dst"], call["payload"], call["sport"]) == (dst, b"query", 5353)


@pytest.mark.parametrize("dst_name", ["DNS_IP", "GATEWAY_IP"])
def test_dns_tcp(core: Any, frames: Any, services: dict[str, Recorder], dst_name: str) -> None:
    dst = getattr(frames, dst_name)
    frame = frames.tcp(40001, 53, SYN, dst=dst)
    core.feed(frame)
    kind, call = only_call(services, "dns_tcp")
    assert kind == "tcp"
    assert call["l4"] == frame[34:]


def test_port_53_elsewhere_goes_to_nat(
    core: Any, frames: Any, services: dict[str, Recorder]
) -> None:
    core.feed(frames.udp(5353, 53, b"q", dst=frames.REMOTE_IP))
    only_call(services, "udp_nat")
    services["udp_nat"].calls.clear()
    core.feed(frames.tcp(40001, 53, SYN, dst=frames.REMOTE_IP))
    only_call(services, "tcp_nat")


def test_udp_nat(core: Any, frames: Any, services: dict[str, Recorder]) -> None:
    core.feed(frames.udp(40000, 9999, b"payload"))
    _kind, call = only_call(services, "udp_nat")
    assert (call["sport"], call["dport"], call["payload"]) == (40000, 9999, b"payload")
    assert (call["src"], call["dst"], call["proto"]) == (
        frames.GUEST_IP,
        frames.REMOTE_IP,
        PROTO_UDP,
    )
    assert call["trusted"] is False


def test_tcp_nat(core: Any, frames: Any, services: dict[str, Recorder]) -> None:
    frame = frames.tcp(40000, 443, ACK, payload=b"GET / HTTP/1.0\r\n\r\n")
    core.feed(frame)
    kind, call = only_call(services, "tcp_nat")
    assert (kind, call["proto"], call["l4"]) == ("tcp", PROTO_TCP, frame[34:])


def test_icmp(core: Any, frames: Any, services: dict[str, Recorder]) -> None:
    frame = frames.icmp(ident=3, seq=4, body=b"xyz")
    core.feed(frame)
    _kind, call = only_call(services, "icmp")
    assert call["l4"] == frame[34:]


@pytest.mark.parametrize("frag", [FLAG_MF, FLAG_MF | 10, 10])
def test_fragments_go_to_reassembly(
    core: Any, frames: Any, services: dict[str, Recorder], frag: int
) -> None:
    core.feed(frames.ipv4(PROTO_UDP, b"\x00" * 16, frag=frag))
    kind, call = only_call(services, "reassembly")
    assert kind == "fragment"
    assert call["l4"] == b"\x00" * 16


def test_reassembled_datagram_reenters_route_ipv4(
    core: Any, frames: Any, services: dict[str, Recorder]
) -> None:
    """What reassembly hands back is routed as if it had come whole."""
    whole = frames.udp(40000, 9999, b"big")
    captured: list[IpPacket] = []

    class Reassembly:
        def handle_fragment(self, pkt: IpPacket, now: float) -> None:
            captured.append(pkt)

    core.classifier.reassembly = Reassembly()
    core.feed(frames.ipv4(PROTO_UDP, whole[34:], frag=FLAG_MF))
    assert captured
    pkt = captured[0]
    # A reassembler would copy; the test does the same and hands a whole datagram back.
    pkt = pkt._replace(ip=pkt.ip._replace(frag=0), l4=memoryview(bytes(pkt.l4)))
    core.classifier.route_ipv4(pkt, core.now)
    _kind, call = only_call(services, "udp_nat")
    assert call["payload"] == b"big"


def test_ethernet_padding_is_cut_off(core: Any, frames: Any, services: dict[str, Recorder]) -> None:
    frame = frames.udp(40000, 9999, b"ab")
    padded = frame + bytes(60 - len(frame))
    core.feed(padded)
    _kind, call = only_call(services, "udp_nat")
    assert call["payload"] == b"ab"
    assert len(call["l4"]) == 10


@pytest.mark.parametrize(
    ("ethertype", "reason"),
    [
        (0x8100, "eth.vlan.unsupported"),
        (0x88CC, "eth.type.unsupported"),
    ],
)
def test_other_ethertypes(
    core: Any, frames: Any, services: dict[str, Recorder], ethertype: int, reason: str
) -> None:
    frame = bytearray(60)
    build_ethernet(frame, 0, frames.OUR_MAC, frames.GUEST_MAC, ethertype)
    core.feed(frame)
    assert core.counters.snapshot() == {reason: 1}
    assert not any(r.calls for r in services.values())


def test_ipv6_when_off(make_core: Any, frames: Any) -> None:
    """With ``ipv6=False`` (--no-ipv6) an IPv6 frame is counted as unsupported, as before."""
    core = make_core(ipv6=False)
    frame = bytearray(60)
    build_ethernet(frame, 0, frames.OUR_MAC, frames.GUEST_MAC, 0x86DD)
    core.feed(frame)
    assert core.counters.snapshot() == {"ipv6.unsupported": 1}
    assert core.take_sent() == []


@pytest.mark.parametrize(
    ("dst", "kind"),
    [
        (b"\xff\xff\xff\xff", "udp"),
        (bytes([10, 0, 2, 255]), "udp"),  # the subnet's directed broadcast
        (bytes([224, 0, 0, 251]), "udp"),  # mDNS
        (bytes([239, 255, 255, 250]), "udp"),  # SSDP
        (b"\xff\xff\xff\xff", "tcp"),
        (bytes([224, 0, 0, 1]), "tcp"),
    ],
)
def test_broadcast_and_multicast_not_natted(
    core: Any, frames: Any, services: dict[str, Recorder], dst: bytes, kind: str
) -> None:
    if kind == "udp":
        frame = frames.udp(5000, 5000, b"x", dst=dst, eth_dst=BROADCAST)
    else:
        frame = frames.tcp(5000, 80, SYN, dst=dst, eth_dst=BROADCAST)
    core.feed(frame)
    assert core.counters.snapshot() == {f"{kind}.dst.broadcast": 1}
    assert not any(r.calls for r in services.values())


def test_other_ip_protocol(core: Any, frames: Any, services: dict[str, Recorder]) -> None:
    core.feed(frames.ipv4(132, b"sctp" * 4))  # SCTP
    assert core.counters.snapshot() == {"ipv4.proto.unsupported": 1}


def test_csum_trusted_skips_l4_verification(
    core: Any, frames: Any, services: dict[str, Recorder]
) -> None:
    frame = bytearray(frames.udp(40000, 9999, b"payload"))
    frame[-1] ^= 0xFF
    core.feed(frame)
    assert core.counters["udp.bad_checksum"] == 1
    core.feed(frame, csum_trusted=True)
    _kind, call = only_call(services, "udp_nat")
    assert call["trusted"] is True


def test_udp_without_checksum_accepted(
    core: Any, frames: Any, services: dict[str, Recorder]
) -> None:
    frame = bytearray(frames.udp(40000, 9999, b"payload"))
    frame[40:42] = b"\x00\x00"
    core.feed(frame)
    only_call(services, "udp_nat")


@pytest.mark.parametrize(
    ("make", "offset", "reason"),
    [
        (lambda f: f.udp(40000, 9999, b"abc"), -1, "udp.bad_checksum"),
        (lambda f: f.tcp(40000, 80, ACK, b"abc"), -1, "tcp.bad_checksum"),
        (lambda f: f.icmp(body=b"abc"), -1, "icmp.bad_checksum"),
        (lambda f: f.udp(40000, 9999, b"abc"), 22, "ipv4.bad_checksum"),  # TTL
    ],
)
def test_bad_checksums_counted(
    core: Any, frames: Any, services: dict[str, Recorder], make: Any, offset: int, reason: str
) -> None:
    frame = bytearray(make(frames))
    frame[offset] ^= 0x5A
    core.feed(frame)
    assert core.counters.snapshot() == {reason: 1}
    assert not any(r.calls for r in services.values())


def test_handler_wire_error_is_counted(
    core: Any, frames: Any, services: dict[str, Recorder]
) -> None:
    services["udp_nat"].raise_reason = "nat.udp.test_reason"
    core.feed(frames.udp())
    assert core.counters.snapshot() == {"nat.udp.test_reason": 1}


# --- services not there yet --------------------------------------------------------------------


def test_unavailable_services_counted(core: Any, frames: Any) -> None:
    for name in SERVICES:
        assert getattr(core.classifier, name) is None
    core.feed(frames.udp(68, 67, b"d", src=bytes(4), dst=b"\xff" * 4, eth_dst=BROADCAST))
    core.feed(frames.udp(5353, 53, b"q", dst=frames.DNS_IP))
    core.feed(frames.tcp(40000, 53, SYN, dst=frames.GATEWAY_IP))
    core.feed(frames.udp())
    core.feed(frames.tcp())
    core.feed(frames.icmp())
    core.feed(frames.ipv4(PROTO_UDP, bytes(16), frag=FLAG_MF))
    assert core.counters.snapshot() == {
        "dhcp.unavailable": 1,
        "dns.unavailable": 1,
        "dns.tcp.unavailable": 1,
        "nat.udp.unavailable": 1,
        "nat.tcp.unavailable": 1,
        "icmp.unavailable": 1,
        "ipv4.fragment.unsupported": 1,
    }
    assert core.take_sent() == []


# --- malformed input: counted, never raised -----------------------------------------------------


def _ip_with_total_len(frames: Any, total_len: int) -> bytes:
    frame = bytearray(frames.udp(40000, 9999, b"abcdef"))
    struct.pack_into("!H", frame, 16, total_len)
    struct.pack_into("!H", frame, 24, 0)
    struct.pack_into("!H", frame, 24, checksum(frame[14:34]))
    return bytes(frame)


def _udp_with_length(frames: Any, length: int) -> bytes:
    frame = bytearray(frames.udp(40000, 9999, b"abcdef"))
    struct.pack_into("!H", frame, 38, length)
    return bytes(frame)


def _tcp_with_doff(frames: Any, doff: int) -> bytes:
    frame = bytearray(frames.tcp(40000, 80, ACK, b"abcd"))
    frame[46] = doff << 4
    return bytes(frame)


MALFORMED = [
    ("empty", lambda f: b"", "eth.truncated"),
    ("runt13", lambda f: f.arp()[:13], "eth.truncated"),
    ("giant", lambda f: f.udp()[:14] + bytes(MAX_FRAME - 13), "eth.giant"),
    ("arp_short", lambda f: f.arp()[:41], "arp.truncated"),
    ("arp_htype", lambda f: f.arp()[:14] + b"\x00\x06" + f.arp()[16:], "arp.bad_hardware"),
    ("arp_ptype", lambda f: f.arp()[:16] + b"\x86\xdd" + f.arp()[18:], "arp.bad_protocol"),
    ("arp_hlen", lambda f: f.arp()[:18] + b"\x10" + f.arp()[19:], "arp.bad_hardware"),
    ("ip_short", lambda f: f.udp()[:33], "ipv4.truncated"),
    ("ip_v6_in_v4", lambda f: f.udp()[:14] + b"\x65" + f.udp()[15:], "ipv4.bad_version"),
    ("ip_ihl4", lambda f: f.udp()[:14] + b"\x44" + f.udp()[15:], "ipv4.bad_header_length"),
    ("ip_total_long", lambda f: _ip_with_total_len(f, 60), "ipv4.bad_total_length"),
    ("ip_total_short", lambda f: _ip_with_total_len(f, 19), "ipv4.bad_total_length"),
    ("ip_total_cuts_udp", lambda f: _ip_with_total_len(f, 27), "udp.truncated"),
    ("udp_len_long", lambda f: _udp_with_length(f, 15), "udp.bad_length"),
    ("udp_len_short", lambda f: _udp_with_length(f, 7), "udp.bad_length"),
    ("tcp_doff_long", lambda f: _tcp_with_doff(f, 15), "tcp.bad_header_length"),
    ("tcp_doff_short", lambda f: _tcp_with_doff(f, 4), "tcp.bad_header_length"),
    ("icmp_short", lambda f: f.ipv4(1, b"\x08\x00\xf7\xff"), "icmp.truncated"),
    ("src_multicast", lambda f: f.udp(eth_src=bytes.fromhex("01005e000001")), "eth.src.multicast"),
    ("dst_not_ours", lambda f: f.udp(eth_dst=bytes.fromhex("020000000099")), "eth.dst.not_ours"),
]


@pytest.mark.parametrize(
    ("make", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_frames_are_counted_drops(
    core: Any, frames: Any, services: dict[str, Recorder], make: Any, reason: str
) -> None:
    frame = make(frames)
    core.feed(frame)
    assert core.counters.snapshot() == {reason: 1}
    assert not any(r.calls for r in services.values())
    assert core.take_sent() == []
    assert core.port.rx_frames == 1
    assert core.port.rx_bytes == len(frame)


def test_largest_frame_is_not_a_giant(core: Any, frames: Any) -> None:
    frame = bytearray(MAX_FRAME)
    build_ethernet(frame, 0, frames.OUR_MAC, frames.GUEST_MAC, ETHERTYPE_IPV4)
    frame[14:18] = b"\x45\x00\xff\xff"  # a 65535-byte datagram; checksum left wrong
    core.feed(frame)
    assert core.counters.snapshot() == {"ipv4.bad_checksum": 1}


# --- MAC learning and the switch ------------------------------------------------------------------


def test_mac_learned_from_first_frame(core: Any, frames: Any) -> None:
    assert core.port.guest_mac is None
    core.feed(frames.udp())
    assert core.port.guest_mac == frames.GUEST_MAC
    assert core.switch.port_for(frames.GUEST_MAC) is core.port
    assert "eth.guest_mac.changed" not in core.counters.snapshot()


def test_mac_learned_even_from_dropped_frames(core: Any, frames: Any) -> None:
    core.feed(frames.ipv4(132, b"x"))
    assert core.port.guest_mac == frames.GUEST_MAC


def test_new_mac_on_port_becomes_guest_mac_and_old_stays_known(core: Any, frames: Any) -> None:
    """Issue 15 changed this: a port holds several MACs (a guest that bridges), so the old MAC
    stays on its port (it ages out) instead of being forgotten and flooded."""
    new_mac = bytes.fromhex("5254000000aa")
    other = core.add_port("guest1")
    core.feed(frames.udp())
    core.feed(frames.udp(eth_src=new_mac))
    assert core.port.guest_mac == new_mac
    assert core.counters["eth.guest_mac.changed"] == 1
    assert core.switch.port_for(new_mac) is core.port
    assert core.switch.port_for(frames.GUEST_MAC) is core.port

    # A frame for either MAC goes to that port only.
    for dst in (new_mac, frames.GUEST_MAC):
        frame = core.pool.acquire()
        build_ethernet(frame.view, frame.start, dst, frames.OUR_MAC, 0x88B5)
        frame.length = 60
        core.switch.send(frame)
    to_port = core.take_sent()
    assert [f[:6] for f in to_port] == [new_mac, frames.GUEST_MAC]
    assert other.sent == []
    assert core.pool.in_use == 0


def test_two_ports_two_guests(core: Any, frames: Any) -> None:
    mac_b = bytes.fromhex("5254000000bb")
    port_b = core.add_port("guest1")
    core.feed(frames.udp())
    core.feed(frames.udp(eth_src=mac_b), port=port_b)
    assert core.switch.port_for(frames.GUEST_MAC) is core.port
    assert core.switch.port_for(mac_b) is port_b
    # ARP from guest B is answered on B's port only; A sees B's broadcast request (issue 15:
    # broadcasts are flooded to the other ports), not guestnet's reply.
    request = frames.arp(sha=mac_b)
    core.feed(request, port=port_b)
    assert core.take_sent() == [request]
    assert len(port_b.sent) == 1 and port_b.sent[0][:6] == mac_b
    # A MAC moving to another port follows the move.
    core.feed(frames.udp(eth_src=mac_b))
    assert core.switch.port_for(mac_b) is core.port


def test_switch_without_ports_releases(make_core: Any, frames: Any) -> None:
    harness = make_core()
    harness.switch.detach(harness.port)
    frame = harness.pool.acquire()
    frame.length = 60
    harness.switch.send(frame)
    assert harness.counters["switch.no_port"] == 1
    assert harness.pool.in_use == 0


def test_detach_forgets_mac(core: Any, frames: Any) -> None:
    core.feed(frames.udp())
    core.switch.detach(core.port)
    assert core.switch.port_for(frames.GUEST_MAC) is None
    core.switch.attach(core.port)


def test_every_frame_counted_on_port(core: Any, frames: Any) -> None:
    sizes = [len(f) for f in (frames.udp(), frames.arp(), b"\x00" * 5)]
    core.feed(frames.udp())
    core.feed(frames.arp())
    core.feed(b"\x00" * 5)
    assert core.port.rx_frames == 3
    assert core.port.rx_bytes == sum(sizes)


def test_build_ipv4_helper_sanity(frames: Any) -> None:
    """The harness builders produce what the classifier expects (guards the fixtures)."""
    frame = frames.udp(1, 2, b"z")
    assert frame[12:14] == b"\x08\x00"
    buf = bytearray(20)
    build_ipv4(buf, 0, frames.GUEST_IP, frames.REMOTE_IP, PROTO_UDP, 9, ident=0x1234)
    assert bytes(buf) == frame[14:34]


def test_mac_moving_back_is_relearned(core: Any, frames: Any) -> None:
    """A MAC seen on port B, then A, then B again is routed to B (no stale mapping)."""
    mac_b = bytes.fromhex("5254000000bb")
    port_b = core.add_port("guest1")
    core.feed(frames.udp(eth_src=mac_b), port=port_b)
    core.feed(frames.udp(eth_src=mac_b))
    assert core.switch.port_for(mac_b) is core.port
    core.feed(frames.udp(eth_src=mac_b), port=port_b)
    assert core.switch.port_for(mac_b) is port_b


# --- IPv6 --------------------------------------------------------------------------------------

SERVICES6 = (
    "ndp",
    "icmp6",
    "dhcp6",
    "dns6_udp",
    "dns6_tcp",
    "udp_nat6",
    "tcp_nat6",
    "reassembly6",
)
ALL_DHCP6 = bytes.fromhex("ff020000000000000000000000010002")
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
MDNS6 = bytes.fromhex("ff0200000000000000000000000000fb")


@pytest.fixture
def services6(core: Any, services: dict[str, Recorder]) -> dict[str, Recorder]:
    """Recorders in every IPv4 and IPv6 slot; the port counts as greeted by NDP already."""
    recs = dict(services)
    for name in SERVICES6:
        recs[name] = Recorder()
        setattr(core.classifier, name, recs[name])
    core.port.ip6_seen = True
    return recs


def test_ipv6_udp_and_tcp_to_the_nat(
    core: Any, frames: Any, services6: dict[str, Recorder]
) -> None:
    core.feed(frames.udp6(4000, 9999, b"six"))
    kind, call = only_call(services6, "udp_nat6")
    assert (kind, call["sport"], call["dport"], call["payload"]) == ("udp", 4000, 9999, b"six")
    assert (call["src"], call["dst"], call["proto"]) == (
        frames.GUEST_IP6, frames.REMOTE_IP6, PROTO_UDP,
    )  # fmt: skip
    services6["udp_nat6"].calls.clear()
    core.feed(frames.tcp6(4000, 443, SYN))
    kind, call = only_call(services6, "tcp_nat6")
    assert kind == "tcp" and call["proto"] == PROTO_TCP and call["l4"][:4] == b"\x0f\xa0\x01\xbb"
    assert core.counters.snapshot() == {}


@pytest.mark.parametrize("dst_name", ["DNS_IP6", "GATEWAY_IP6"])
def test_ipv6_dns(core: Any, frames: Any, services6: dict[str, Recorder], dst_name: str) -> None:
    dst = getattr(frames, dst_name)
    core.feed(frames.udp6(5353, 53, b"query", dst=dst))
    assert only_call(services6, "dns6_udp")[1]["payload"] == b"query"
    services6["dns6_udp"].calls.clear()
    core.feed(frames.tcp6(5353, 53, SYN, dst=dst))
    assert only_call(services6, "dns6_tcp")[0] == "tcp"


def test_ipv6_port_53_elsewhere_goes_to_the_nat(
    core: Any, frames: Any, services6: dict[str, Recorder]
) -> None:
    core.feed(frames.udp6(5353, 53, b"q"))
    only_call(services6, "udp_nat6")


@pytest.mark.parametrize("dst", [ALL_DHCP6, bytes.fromhex("fd00" + "00" * 13 + "02")])
def test_dhcpv6_to_servers_group_or_ours(
    core: Any, frames: Any, services6: dict[str, Recorder], dst: bytes
) -> None:
    eth = bytes.fromhex("333300010002") if dst[0] == 0xFF else frames.OUR_MAC
    core.feed(frames.udp6(546, 547, b"\x01abc", src=frames.GUEST_LL6, dst=dst, eth_dst=eth))
    _, call = only_call(services6, "dhcp6")
    assert (call["sport"], call["dport"], call["payload"]) == (546, 547, b"\x01abc")


@pytest.mark.parametrize(
    ("type_", "dst_name", "slot"),
    [
        (133, "ALL_ROUTERS", "ndp"),
        (135, "GATEWAY_IP6", "ndp"),
        (136, "GATEWAY_IP6", "ndp"),
        (134, "ALL_NODES", "ndp"),
        (137, "GATEWAY_IP6", "ndp"),
        (128, "GATEWAY_IP6", "ndp"),
        (128, "DNS_IP6", "ndp"),
        (128, "OUR_LL6", "ndp"),
        (128, "REMOTE_IP6", "icmp6"),
        (1, "REMOTE_IP6", "icmp6"),
        (129, "REMOTE_IP6", "icmp6"),
    ],
)
def test_icmpv6_routing(
    core: Any, frames: Any, services6: dict[str, Recorder], type_: int, dst_name: str, slot: str
) -> None:
    dst = {
        "ALL_ROUTERS": bytes.fromhex("ff020000000000000000000000000002"),
        "ALL_NODES": ALL_NODES,
    }.get(dst_name) or getattr(frames, dst_name)
    core.feed(frames.icmp6(type_, 0, 0, 0, bytes(16), dst=dst, hop_limit=255))
    kind, call = only_call(services6, slot)
    assert kind == "icmp6" and call["hop_limit"] == 255 and call["dst"] == dst
    assert call["l4"][0] == type_ and repr(call["family"]) == "IPV6"


def test_multicast_and_mld_dropped(core: Any, frames: Any, services6: dict[str, Recorder]) -> None:
    mcast = bytes.fromhex("3333000000fb")
    core.feed(frames.udp6(5353, 5353, b"mdns", dst=MDNS6, eth_dst=mcast))
    core.feed(frames.tcp6(5000, 80, SYN, dst=MDNS6, eth_dst=mcast))
    core.feed(frames.icmp6(128, dst=ALL_NODES, eth_dst=bytes.fromhex("333300000001")))
    mld_dst = bytes.fromhex("ff020000000000000000000000000016")
    core.feed(frames.icmp6(143, 0, 0, 1, bytes(20), dst=mld_dst, hop_limit=1))
    assert core.counters.snapshot() == {"ipv6.dst.multicast": 3, "icmp6.mld.ignored": 1}
    assert not any(r.calls for r in services6.values())


def test_ipv6_unavailable_services_counted(core: Any, frames: Any) -> None:
    for name in SERVICES6:
        assert getattr(core.classifier, name) is None
    core.port.ip6_seen = True
    core.feed(frames.icmp6(135, 0, 0, 0, bytes(16), hop_limit=255))
    core.feed(frames.icmp6(128, dst=frames.REMOTE_IP6))
    core.feed(frames.udp6(546, 547, b"x", dst=ALL_DHCP6, eth_dst=bytes.fromhex("333300010002")))
    core.feed(frames.udp6(5353, 53, b"q", dst=frames.DNS_IP6))
    core.feed(frames.tcp6(5353, 53, SYN, dst=frames.DNS_IP6))
    core.feed(frames.udp6())
    core.feed(frames.tcp6())
    frag = bytes([PROTO_UDP, 0, 0, 1, 0, 0, 0, 9]) + bytes(16)  # offset 0, M set
    core.feed(frames.ipv6(44, frag))
    core.feed(frames.ipv6(132, b"sctp" * 4))
    assert core.counters.snapshot() == {
        "ndp.unavailable": 1,
        "icmp6.unavailable": 1,
        "dhcp6.unavailable": 1,
        "dns6.unavailable": 1,
        "dns6.tcp.unavailable": 1,
        "nat6.udp.unavailable": 1,
        "nat6.tcp.unavailable": 1,
        "ipv6.fragment.unsupported": 1,
        "ipv6.proto.unsupported": 1,
    }
    assert core.take_sent() == []


def test_ipv6_extension_headers_walked_to_udp(
    core: Any, frames: Any, services6: dict[str, Recorder]
) -> None:
    src, dst = frames.GUEST_IP6, frames.REMOTE_IP6
    udp = frames.udp_segment(4000, 9999, b"behind options", src, dst)
    hop_by_hop = bytes([60, 0, 1, 4, 0, 0, 0, 0])  # PadN
    dest_opts = bytes([17, 1]) + bytes(14)
    core.feed(frames.ipv6(0, hop_by_hop + dest_opts + udp))
    _, call = only_call(services6, "udp_nat6")
    assert call["payload"] == b"behind options" and call["proto"] == PROTO_UDP
    assert call["l4"] == udp


def test_ipv6_fragment_goes_to_reassembly6(
    core: Any, frames: Any, services6: dict[str, Recorder]
) -> None:
    frag = bytes([PROTO_UDP, 0, 0, 8 | 1, 0, 0, 0, 9]) + b"y" * 16  # offset 8, M set
    core.feed(frames.ipv6(44, frag))
    kind, call = only_call(services6, "reassembly6")
    assert kind == "fragment" and call["proto"] == PROTO_UDP and call["l4"] == b"y" * 16


def test_ipv6_reassembled_packet_reenters_route_ipv6(
    core: Any, frames: Any, services6: dict[str, Recorder]
) -> None:
    """``route_ipv6`` is the entry for whole packets; its WireErrors are counted, not raised."""
    frame = frames.udp6(1, 2, b"whole")
    ip = parse_ipv6(frame[14:])
    l4 = memoryview(frame)[14 + 40 :]
    pkt = IpPacket(core.port, frames.GUEST_MAC, ip, l4, False, IPV6, ip.src, ip.dst, 17, 64)
    core.classifier.route_ipv6(pkt, core.now)
    assert only_call(services6, "udp_nat6")[1]["payload"] == b"whole"
    bad = pkt._replace(l4=l4[:5])
    core.classifier.route_ipv6(bad, core.now)
    assert core.counters.snapshot() == {"udp.truncated": 1}


def test_ipv6_checksums(core: Any, frames: Any, services6: dict[str, Recorder]) -> None:
    good = frames.udp6(4000, 9999, b"abc")
    zero = bytearray(good)
    zero[60:62] = b"\x00\x00"  # IPv6 forbids "no checksum"
    core.feed(zero)
    bad = bytearray(good)
    bad[-1] ^= 1
    core.feed(bad)
    tcp = bytearray(frames.tcp6())
    tcp[-1] ^= 1
    core.feed(tcp)
    icmp = bytearray(frames.icmp6())
    icmp[-1] ^= 1
    core.feed(icmp)
    assert core.counters.snapshot() == {
        "udp6.zero_checksum": 1,
        "udp.bad_checksum": 1,
        "tcp.bad_checksum": 1,
        "icmp6.bad_checksum": 1,
    }
    core.feed(bad, csum_trusted=True)  # the link vouches: not verified
    assert only_call(services6, "udp_nat6")[1]["trusted"] is True


MALFORMED6 = [
    ("short", lambda f: f.udp6()[:53], "ipv6.truncated"),
    ("version", lambda f: f.udp6()[:14] + b"\x40" + f.udp6()[15:], "ipv6.bad_version"),
    (
        "payload_len",
        lambda f: f.udp6()[:18] + b"\x01\x00" + f.udp6()[20:],
        "ipv6.bad_payload_length",
    ),
    ("udp_short", lambda f: f.ipv6(17, b"\x00" * 7), "udp.truncated"),
    ("icmp_short", lambda f: f.ipv6(58, b"\x80\x00"), "icmp6.truncated"),
    ("ext_truncated", lambda f: f.ipv6(60, b"\x11\x05" + bytes(6)), "ipv6.ext.truncated"),
]


@pytest.mark.parametrize(
    ("make", "reason"), [m[1:] for m in MALFORMED6], ids=[m[0] for m in MALFORMED6]
)
def test_malformed_ipv6_counted(
    core: Any, frames: Any, services6: dict[str, Recorder], make: Any, reason: str
) -> None:
    core.feed(make(frames))
    assert core.counters.snapshot() == {reason: 1}
    assert not any(r.calls for r in services6.values())


def test_guest_ipv6_addresses_learned(
    core: Any, frames: Any, services6: dict[str, Recorder]
) -> None:

    core.feed(frames.icmp6(135, 0, 0, 0, bytes(16), src=bytes(16), hop_limit=255))  # DAD: ::
    assert core.port.guest_ip6 == {}
    core.feed(frames.udp6(src=frames.GUEST_LL6))
    core.feed(frames.udp6())
    core.feed(frames.udp6())
    core.feed(frames.udp6(src=frames.GUEST_LL6))
    assert list(core.port.guest_ip6) == [frames.GUEST_IP6, frames.GUEST_LL6]
    assert core.port.stats()["guest_ip6"] == ["fd00::15", "fe80::5054:ff:fe12:3456"]
    assert core.switch.port_for_ip6(frames.GUEST_IP6) is core.port
    assert core.switch.port_for_ip6(frames.REMOTE_IP6) is None
    privacy = [bytes.fromhex("fd00" + "00" * 12 + f"{i:04x}") for i in range(100, 120)]
    for addr in privacy:
        core.feed(frames.udp6(src=addr))
    assert len(core.port.guest_ip6) == MAX_GUEST_IP6
    assert list(core.port.guest_ip6) == privacy[-MAX_GUEST_IP6:]  # least recently used go


def test_first_ipv6_packet_greets_once(
    core: Any, frames: Any, services: dict[str, Recorder]
) -> None:
    ndp = Recorder()
    core.classifier.ndp = ndp
    core.feed(frames.udp())
    assert ndp.calls == []
    core.feed(frames.udp6())
    core.feed(frames.udp6())
    assert ndp.calls == [("port_up", {"port": "guest0"})]
