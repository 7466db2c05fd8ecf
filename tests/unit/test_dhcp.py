"""DHCP server: frames in through the classifier, replies out, parsed field by field with scapy."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.name
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from guestnet.config import Config, parse_mac
from guestnet.core.classifier import FrameClassifier
from guestnet.core.dhcp import (
    MAX_LEASES,
    MAX_PENDING_OFFERS,
    OFFER_HOLD_S,
    DhcpServer,
    check_config,
)
from guestnet.core.packet import ipv4_packet
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.dhcp import (
    BOOTP_MIN_LEN,
    MAGIC_COOKIE,
    encode_options,
    encode_search_list,
    parse_dhcp,
)
from guestnet.wire.ipv4 import parse_ipv4

MAC1 = "52:54:00:12:34:56"
MAC2 = "52:54:00:00:00:02"
MAC3 = "52:54:00:00:00:03"
GW = "10.0.2.2"
BCAST_MAC = "ff:ff:ff:ff:ff:ff"


@dataclass
class Rig:
    config: Config
    pool: FramePool
    counters: Counters
    server: DhcpServer
    classifier: FrameClassifier
    port: Port
    sent: list[Frame] = field(default_factory=list)

    def send(self, pkt: Any, now: float = 0.0) -> list[Any]:
        """Feed one scapy frame in; return the replies parsed by scapy (frames released)."""
        self.sent.clear()
        self.classifier.handle_frame(memoryview(bytes(pkt)), self.port, now)
        out = []
        for frame in self.sent:
            out.append(Ether(bytes(frame.data)))
            self.pool.release(frame)
        self.sent.clear()
        return out


def make_rig(**kw: Any) -> Rig:
    config = Config(**kw)
    pool = FramePool(config.mtu, 8)
    counters = Counters()
    switch = Switch(pool, counters)
    classifier = FrameClassifier(config, pool, counters, switch)
    server = DhcpServer(config, pool, counters)
    classifier.dhcp = server
    sent: list[Frame] = []
    port = Port("test", sent.append)
    switch.attach(port)
    return Rig(config, pool, counters, server, classifier, port, sent)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = make_rig()
    yield r
    assert r.pool.in_use == 0


def request(
    mac: str,
    kind: str,
    *opts: Any,
    ciaddr: str = "0.0.0.0",
    src: str = "0.0.0.0",
    dst: str = "255.255.255.255",
    flags: int = 0,
    xid: int = 0x1234ABCD,
    eth_dst: str = BCAST_MAC,
) -> Any:
    chaddr = parse_mac(mac) + bytes(10)
    return (
        Ether(src=mac, dst=eth_dst)
        / IP(src=src, dst=dst)
        / UDP(sport=68, dport=67)
        / BOOTP(op=1, xid=xid, flags=flags, ciaddr=ciaddr, chaddr=chaddr)
        / DHCP(options=[("message-type", kind), *opts, "end"])
    )


def options(reply: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in reply[DHCP].options:
        if isinstance(opt, tuple):
            out[opt[0]] = opt[1] if len(opt) == 2 else opt[1:]
    return out


def check_reply(
    reply: Any, kind: int, yiaddr: str, dst_ip: str, dst_mac: str, xid: int = 0x1234ABCD
) -> dict[str, Any]:
    """Check the headers every reply shares; return its options."""
    assert reply[Ether].src == "52:55:0a:00:02:02"
    assert reply[Ether].dst == dst_mac
    assert reply[IP].src == GW
    assert reply[IP].dst == dst_ip
    assert reply[UDP].sport == 67
    assert reply[UDP].dport == 68
    # Checksums as sent must match what scapy computes from scratch.
    ip_raw = bytes(reply[IP])
    again = IP(ip_raw)
    del again[IP].chksum
    del again[UDP].chksum
    again = IP(bytes(again))
    assert again[IP].chksum == reply[IP].chksum
    assert again[UDP].chksum == reply[UDP].chksum
    assert len(bytes(reply[BOOTP])) >= BOOTP_MIN_LEN
    assert reply[BOOTP].op == 2
    assert reply[BOOTP].xid == xid
    assert reply[BOOTP].yiaddr == yiaddr
    assert reply[BOOTP].chaddr[:6] == parse_mac(reply[BOOTP].chaddr[:6].hex(":"))
    opts = options(reply)
    assert opts["message-type"] == kind
    assert opts["server_id"] == GW
    return opts


def assert_full_options(opts: dict[str, Any], lease: bool = True) -> None:
    assert opts["subnet_mask"] == "255.255.255.0"
    assert opts["router"] == GW
    assert opts["name_server"] == "10.0.2.3"
    assert opts["interface-mtu"] == 65520
    if lease:
        assert opts["lease_time"] == 3600
        assert opts["renewal_time"] == 1800
        assert opts["rebinding_time"] == 3150
    else:
        assert "lease_time" not in opts
        assert "renewal_time" not in opts


def bind(rig: Rig, mac: str, now: float = 0.0) -> str:
    """DISCOVER/OFFER/REQUEST/ACK; return the address."""
    (offer,) = rig.send(request(mac, "discover"), now)
    ip = str(offer[BOOTP].yiaddr)
    server_id = str(rig.config.gateway)
    (ack,) = rig.send(
        request(mac, "request", ("server_id", server_id), ("requested_addr", ip)), now
    )
    assert options(ack)["message-type"] == 5
    return ip


# --------------------------------------------------------------------------------- exchanges


def test_discover_offer(rig: Rig) -> None:
    (offer,) = rig.send(request(MAC1, "discover", ("hostname", b"vm1")))
    opts = check_reply(offer, 2, "10.0.2.15", "10.0.2.15", MAC1)
    assert_full_options(opts)
    assert offer[BOOTP].chaddr[:6] == parse_mac(MAC1)
    assert offer[BOOTP].ciaddr == "0.0.0.0"
    assert "domain" not in opts
    assert rig.counters["dhcp.discover"] == 1
    assert rig.counters["dhcp.offer.sent"] == 1
    # An offer is not a lease yet.
    assert rig.server.leases(0.0) == []
    assert rig.server.lease_for_mac(parse_mac(MAC1)) is None


def test_discover_broadcast_flag(rig: Rig) -> None:
    (offer,) = rig.send(request(MAC1, "discover", flags=0x8000))
    check_reply(offer, 2, "10.0.2.15", "255.255.255.255", BCAST_MAC)
    assert offer[BOOTP].flags == 0x8000


def test_selecting_request_ack(rig: Rig) -> None:
    rig.send(request(MAC1, "discover"), 10.0)
    (ack,) = rig.send(
        request(
            MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"),
            ("hostname", b"guest-one"),
        ),
        10.0,
    )  # fmt: skip
    opts = check_reply(ack, 5, "10.0.2.15", "10.0.2.15", MAC1)
    assert_full_options(opts)
    assert rig.counters["dhcp.request.selecting"] == 1
    assert rig.counters["dhcp.ack.sent"] == 1
    assert rig.server.leases(100.0) == [
        {
            "mac": MAC1,
            "ip": "10.0.2.15",
            "hostname": "guest-one",
            "expires_in_s": 3510.0,
            "static": False,
        }
    ]
    assert rig.server.lease_for_mac(parse_mac(MAC1)) == ipaddress.IPv4Address("10.0.2.15")
    assert rig.server.guest_address() == ipaddress.IPv4Address("10.0.2.15")


def test_selecting_wrong_address_nak(rig: Rig) -> None:
    rig.send(request(MAC1, "discover"))
    (nak,) = rig.send(request(MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.99")))
    opts = check_reply(nak, 6, "0.0.0.0", "255.255.255.255", BCAST_MAC)
    assert "lease_time" not in opts
    assert "router" not in opts
    assert rig.counters["dhcp.nak.not_yours"] == 1
    assert rig.counters["dhcp.nak.sent"] == 1


def test_request_other_server_ignored(rig: Rig) -> None:
    rig.send(request(MAC1, "discover"))
    out = rig.send(
        request(MAC1, "request", ("server_id", "10.0.2.77"), ("requested_addr", "10.0.2.15"))
    )
    assert out == []
    assert rig.counters["dhcp.request.other_server"] == 1
    # Our offer was let go: another client may now have the address.
    (offer,) = rig.send(request(MAC2, "discover"))
    assert offer[BOOTP].yiaddr == "10.0.2.15"


def test_renewing_unicast(rig: Rig) -> None:
    bind(rig, MAC1, 0.0)
    (ack,) = rig.send(
        request(
            MAC1, "request", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW,
            eth_dst="52:55:0a:00:02:02",
        ),
        1800.0,
    )  # fmt: skip
    opts = check_reply(ack, 5, "10.0.2.15", "10.0.2.15", MAC1)
    assert ack[BOOTP].ciaddr == "10.0.2.15"
    assert_full_options(opts)
    assert rig.counters["dhcp.request.renewing"] == 1
    assert rig.server.leases(1800.0)[0]["expires_in_s"] == 3600.0


def test_rebinding_broadcast(rig: Rig) -> None:
    bind(rig, MAC1, 0.0)
    (ack,) = rig.send(request(MAC1, "request", ciaddr="10.0.2.15", src="10.0.2.15"), 3200.0)
    # ciaddr set: unicast to it, although the request was broadcast.
    check_reply(ack, 5, "10.0.2.15", "10.0.2.15", MAC1)
    assert rig.counters["dhcp.request.rebinding"] == 1


def test_renewing_someone_elses_address_nak(rig: Rig) -> None:
    bind(rig, MAC1)
    (nak,) = rig.send(request(MAC2, "request", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW))
    check_reply(nak, 6, "0.0.0.0", "255.255.255.255", BCAST_MAC)
    assert nak[BOOTP].ciaddr == "0.0.0.0"
    assert rig.counters["dhcp.nak.not_yours"] == 1


def test_init_reboot(rig: Rig) -> None:
    # After a guestnet restart: the client asks for the address it had; it is free, so granted.
    (ack,) = rig.send(request(MAC1, "request", ("requested_addr", "10.0.2.40")))
    check_reply(ack, 5, "10.0.2.40", "10.0.2.40", MAC1)
    assert rig.counters["dhcp.request.init_reboot"] == 1
    assert rig.server.guest_address() == ipaddress.IPv4Address("10.0.2.40")
    # Another client asking for the same address is refused.
    (nak,) = rig.send(request(MAC2, "request", ("requested_addr", "10.0.2.40")))
    check_reply(nak, 6, "0.0.0.0", "255.255.255.255", BCAST_MAC)
    # The bound client asking for a different address is refused too.
    (nak,) = rig.send(request(MAC1, "request", ("requested_addr", "10.0.2.41")))
    assert options(nak)["message-type"] == 6


@pytest.mark.parametrize("addr", ["192.168.1.50", "10.0.2.2", "10.0.2.3", "10.0.2.255", "10.0.2.0"])
def test_init_reboot_bad_address_nak(rig: Rig, addr: str) -> None:
    (nak,) = rig.send(request(MAC1, "request", ("requested_addr", addr)))
    check_reply(nak, 6, "0.0.0.0", "255.255.255.255", BCAST_MAC)


def test_request_without_address_malformed(rig: Rig) -> None:
    assert rig.send(request(MAC1, "request")) == []
    assert rig.counters["dhcp.request.malformed"] == 1


def test_second_client_next_address(rig: Rig) -> None:
    assert bind(rig, MAC1) == "10.0.2.15"
    assert bind(rig, MAC2) == "10.0.2.16"
    # Offered but not yet requested addresses are held too.
    (offer,) = rig.send(request(MAC3, "discover"))
    assert offer[BOOTP].yiaddr == "10.0.2.17"
    (offer,) = rig.send(request("52:54:00:00:00:04", "discover"))
    assert offer[BOOTP].yiaddr == "10.0.2.18"
    # A client coming back gets the same address again.
    (offer,) = rig.send(request(MAC1, "discover"))
    assert offer[BOOTP].yiaddr == "10.0.2.15"
    assert [d["ip"] for d in rig.server.leases(1.0)] == ["10.0.2.15", "10.0.2.16"]
    assert rig.server.guest_address() == ipaddress.IPv4Address("10.0.2.16")


def test_allocation_skips_reserved_and_wraps() -> None:
    r = make_rig(
        subnet=ipaddress.IPv4Network("192.168.7.0/29"),
        gateway=ipaddress.IPv4Address("192.168.7.1"),
        dns_ip=ipaddress.IPv4Address("192.168.7.5"),
        guest_ip=ipaddress.IPv4Address("192.168.7.4"),
    )
    got = []
    for i in range(4):
        (offer,) = r.send(request(f"52:54:00:00:01:{i:02x}", "discover"))
        got.append(offer[BOOTP].yiaddr)
    assert got == ["192.168.7.4", "192.168.7.6", "192.168.7.2", "192.168.7.3"]
    assert r.send(request(MAC1, "discover")) == []
    assert r.counters["dhcp.pool.exhausted"] == 1
    assert r.pool.in_use == 0


def test_pool_exhausted_and_expired_reuse() -> None:
    r = make_rig(
        subnet=ipaddress.IPv4Network("192.168.7.0/30"),
        gateway=ipaddress.IPv4Address("192.168.7.1"),
        dns_ip=ipaddress.IPv4Address("192.168.7.2"),
        guest_ip=ipaddress.IPv4Address("192.168.7.3"),
    )
    # A /30 with gateway and DNS leaves nothing... except guest_ip? .3 is the broadcast address.
    assert r.send(request(MAC1, "discover")) == []
    assert r.counters["dhcp.pool.exhausted"] == 1

    r = make_rig(
        subnet=ipaddress.IPv4Network("192.168.7.0/29"),
        gateway=ipaddress.IPv4Address("192.168.7.1"),
        dns_ip=ipaddress.IPv4Address("192.168.7.2"),
        guest_ip=ipaddress.IPv4Address("192.168.7.3"),
        lease_time=100,
    )
    for i in range(4):
        bind(r, f"52:54:00:00:01:{i:02x}", 0.0)
    assert r.send(request(MAC1, "discover"), 50.0) == []
    assert r.counters["dhcp.pool.exhausted"] == 1
    # Once the leases expire, a new client takes over the first one.
    (offer,) = r.send(request(MAC1, "discover"), 101.0)
    assert offer[BOOTP].yiaddr == "192.168.7.3"
    assert r.pool.in_use == 0


def test_full_pool_is_not_searched_again_until_an_address_can_be_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DISCOVER storm from new MACs against a full pool: after one search that finds nothing,
    the next ones are refused without walking the subnet, until a hold ends or a RELEASE gives
    an address back; then the search runs again and finds it."""
    r = make_rig(
        subnet=ipaddress.IPv4Network("192.168.7.0/29"),
        gateway=ipaddress.IPv4Address("192.168.7.1"),
        dns_ip=ipaddress.IPv4Address("192.168.7.2"),
        guest_ip=ipaddress.IPv4Address("192.168.7.3"),
        lease_time=100,
    )
    for i in range(4):
        bind(r, f"52:54:00:00:01:{i:02x}", 0.0)
    looked = []
    real = r.server._is_free
    monkeypatch.setattr(r.server, "_is_free", lambda *a: looked.append(a[1]) or real(*a))
    assert r.send(request(MAC1, "discover"), 10.0) == []
    first = len(looked)
    assert first >= 4  # one search over the subnet
    for i in range(50):
        assert r.send(request(f"52:54:00:00:02:{i:02x}", "discover"), 11.0) == []
    assert len(looked) - first <= 2 * 50  # the client's own and guest_ip checks, no walk
    assert r.counters["dhcp.pool.exhausted"] == 51
    # A RELEASE gives an address back: the next DISCOVER finds it at once.
    out = r.send(
        request("52:54:00:00:01:01", "release", ("server_id", "192.168.7.1"),
                ciaddr="192.168.7.4", src="192.168.7.4", dst="192.168.7.1"),
        12.0,
    )  # fmt: skip
    assert out == []
    (offer,) = r.send(request(MAC2, "discover"), 13.0)
    assert offer[BOOTP].yiaddr == "192.168.7.4"
    # Full again; once the holds end by themselves (lease_time 100) a search runs again.
    assert r.send(request(MAC3, "discover"), 14.0) == []
    (offer,) = r.send(request(MAC3, "discover"), 101.0)
    assert offer[BOOTP].yiaddr in {"192.168.7.3", "192.168.7.5", "192.168.7.6"}
    assert r.pool.in_use == 0


def test_offer_hold_expires(rig: Rig) -> None:
    rig.send(request(MAC1, "discover"), 0.0)
    (offer,) = rig.send(request(MAC2, "discover"), OFFER_HOLD_S + 1)
    assert offer[BOOTP].yiaddr == "10.0.2.15"
    # The first client's late REQUEST for its stale offer is refused now.
    (nak,) = rig.send(
        request(MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15")),
        OFFER_HOLD_S + 2,
    )
    assert options(nak)["message-type"] == 6


def test_late_request_for_free_offer_is_granted(rig: Rig) -> None:
    rig.send(request(MAC1, "discover"), 0.0)
    (ack,) = rig.send(
        request(MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15")),
        OFFER_HOLD_S + 5,
    )
    assert options(ack)["message-type"] == 5


def test_static_leases() -> None:
    r = make_rig(
        dhcp_static=(
            (parse_mac(MAC2), ipaddress.IPv4Address("10.0.2.15")),
            (parse_mac(MAC3), ipaddress.IPv4Address("10.0.2.100")),
        )
    )
    # guest_ip is MAC2's static lease, so the first (other) client gets the next address.
    assert bind(r, MAC1) == "10.0.2.16"
    assert bind(r, MAC3) == "10.0.2.100"
    assert bind(r, MAC2) == "10.0.2.15"
    leases = {d["mac"]: d for d in r.server.leases(0.0)}
    assert leases[MAC3]["static"] is True
    assert leases[MAC1]["static"] is False
    # A static client asking for another address is refused.
    (nak,) = r.send(request(MAC3, "request", ("requested_addr", "10.0.2.101")))
    assert options(nak)["message-type"] == 6
    assert r.pool.in_use == 0


def test_static_lease_validation() -> None:
    with pytest.raises(ValueError):
        make_rig(dhcp_static=((parse_mac(MAC2), ipaddress.IPv4Address("10.0.2.2")),))
    with pytest.raises(ValueError):
        make_rig(dhcp_static=((parse_mac(MAC2), ipaddress.IPv4Address("10.9.2.9")),))


def test_decline(rig: Rig) -> None:
    bind(rig, MAC1, 0.0)
    out = rig.send(
        request(MAC1, "decline", ("server_id", GW), ("requested_addr", "10.0.2.15")), 1.0
    )
    assert out == []
    assert rig.counters["dhcp.decline"] == 1
    assert rig.server.lease_for_mac(parse_mac(MAC1)) is None
    # The declined address is kept out of the pool for a while.
    (offer,) = rig.send(request(MAC1, "discover"), 2.0)
    assert offer[BOOTP].yiaddr == "10.0.2.16"
    (offer,) = rig.send(request(MAC2, "discover"), 2.0)
    assert offer[BOOTP].yiaddr == "10.0.2.17"
    # Declining something not leased is counted and ignored.
    rig.send(request(MAC3, "decline", ("server_id", GW), ("requested_addr", "10.0.2.15")), 3.0)
    assert rig.counters["dhcp.decline.unknown"] == 1


def test_release(rig: Rig) -> None:
    bind(rig, MAC1, 0.0)
    out = rig.send(
        request(MAC1, "release", ("server_id", GW), ciaddr="10.0.2.15", src="10.0.2.15", dst=GW),
        5.0,
    )
    assert out == []
    assert rig.counters["dhcp.release"] == 1
    assert rig.server.leases(6.0) == []
    assert rig.server.lease_for_mac(parse_mac(MAC1), 6.0) is None
    # The address is free for others now...
    (offer,) = rig.send(request(MAC2, "discover"), 7.0)
    assert offer[BOOTP].yiaddr == "10.0.2.15"
    # ...a release for an address not held is counted.
    rig.send(request(MAC3, "release", ("server_id", GW), ciaddr="10.0.2.15"), 8.0)
    assert rig.counters["dhcp.release.unknown"] == 1


def test_release_then_same_client_gets_same_address(rig: Rig) -> None:
    bind(rig, MAC1, 0.0)
    rig.send(request(MAC1, "release", ("server_id", GW), ciaddr="10.0.2.15"), 5.0)
    assert bind(rig, MAC1, 6.0) == "10.0.2.15"


def test_inform(rig: Rig) -> None:
    (ack,) = rig.send(request(MAC1, "inform", ciaddr="10.0.2.77", src="10.0.2.77"))
    opts = check_reply(ack, 5, "0.0.0.0", "10.0.2.77", MAC1)
    assert ack[BOOTP].ciaddr == "10.0.2.77"
    assert_full_options(opts, lease=False)
    assert rig.counters["dhcp.inform"] == 1
    assert rig.server.leases(0.0) == []
    rig.send(request(MAC1, "inform"))
    assert rig.counters["dhcp.inform.no_ciaddr"] == 1


def test_dns_search_options() -> None:
    r = make_rig(dns_search=("corp.example.com", "example.com", "lab.example.org."))
    (offer,) = r.send(request(MAC1, "discover"))
    opts = options(offer)
    assert opts["domain"] == b"corp.example.com"
    raw = b"".join(v for code, v in _raw_options(bytes(offer[BOOTP])) if code == 119)
    names, off = [], 0
    while off < len(raw):
        name, used = dns.name.from_wire(raw, off)
        names.append(name.to_text())
        off += used
    assert names == ["corp.example.com.", "example.com.", "lab.example.org."]
    # "example.com" is written once and pointed to from the second name (offset 5).
    assert raw == b"\x04corp\x07example\x03com\x00\xc0\x05\x03lab\x07example\x03org\x00"
    assert r.pool.in_use == 0


def _raw_options(bootp: bytes) -> list[tuple[int, bytes]]:
    assert bootp[236:240] == MAGIC_COOKIE
    out, i = [], 240
    while i < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        out.append((bootp[i], bootp[i + 2 : i + 2 + bootp[i + 1]]))
        i += 2 + bootp[i + 1]
    return out


def test_long_search_list_split_and_max_message_size() -> None:
    domains = tuple(f"host{i}{'x' * 40}.zone{i}.example" for i in range(12))
    r = make_rig(dns_search=domains)
    # Large enough limit: the search list comes whole, split over several option 119 instances.
    (offer,) = r.send(request(MAC1, "discover", ("max_dhcp_size", 1500)))
    raw = _raw_options(bytes(offer[BOOTP]))
    parts = [v for code, v in raw if code == 119]
    assert len(parts) >= 2
    assert b"".join(parts) == encode_search_list(domains)
    assert len(bytes(offer[IP])) <= 1500
    # No option 57: the reply stays within 576 bytes of IP datagram, the search list left out.
    (offer,) = r.send(request(MAC1, "discover"))
    assert len(bytes(offer[IP])) <= 576
    codes = [code for code, _ in _raw_options(bytes(offer[BOOTP]))]
    assert 119 not in codes
    assert 15 in codes
    assert 51 in codes
    assert r.counters["dhcp.reply.option_dropped"] >= 1
    # A bogus small option 57 is raised to the 576 minimum.
    (offer,) = r.send(request(MAC1, "discover", ("max_dhcp_size", 100)))
    assert len(bytes(offer[IP])) <= 576
    assert r.pool.in_use == 0


def test_reply_padded_to_bootp_minimum(rig: Rig) -> None:
    (offer,) = rig.send(request(MAC1, "discover"))
    assert len(bytes(offer[BOOTP])) == BOOTP_MIN_LEN
    assert len(bytes(offer[IP])) == 20 + 8 + BOOTP_MIN_LEN


# ------------------------------------------------------------------------------- bad input


def raw_frame(bootp: bytes, mac: str = MAC1) -> Any:
    return (
        Ether(src=mac, dst=BCAST_MAC)
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / bootp
    )


def good_bootp(mac: str = MAC1) -> bytearray:
    return bytearray(
        bytes(
            BOOTP(op=1, xid=1, chaddr=parse_mac(mac) + bytes(10))
            / DHCP(options=[("message-type", "discover"), "end"])
        )
    )


def test_good_bootp_baseline(rig: Rig) -> None:
    (offer,) = rig.send(raw_frame(bytes(good_bootp())))
    assert offer[BOOTP].yiaddr == "10.0.2.15"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:200], "dhcp.truncated"),
        (lambda b: b[:239], "dhcp.truncated"),
        (lambda b: b[:236] + b"\x63\x82\x53\x64" + b[240:], "dhcp.bad_cookie"),
        (lambda b: b[:240] + b"\x35\x01", "dhcp.options.truncated"),
        (lambda b: b[:240] + b"\x35", "dhcp.options.truncated"),
        (lambda b: b[:240] + b"\x0c\xff" + b"a" * 20, "dhcp.options.truncated"),
        (lambda b: b[:240] + b"\x35\x01\x01" + b"\x0c\x00" * 300, "dhcp.options.too_many"),
        (lambda b: b"\x02" + b[1:], "dhcp.bad_op"),
        (lambda b: b[:1] + b"\x06" + b[2:], "dhcp.bad_htype"),
        (lambda b: b[:2] + b"\x10" + b[3:], "dhcp.bad_htype"),
        (lambda b: b[:24] + b"\x0a\x00\x00\x01" + b[28:], "dhcp.relayed.unsupported"),
        (lambda b: b[:240] + b"\x0c\x01a\xff", "dhcp.bootp.unsupported"),
        (lambda b: b[:240] + b"\x35\x01\x02\xff", "dhcp.message_type.server_only"),
        (lambda b: b[:240] + b"\x35\x01\x63\xff", "dhcp.message_type.unknown"),
    ],
)
def test_bad_input_counted(rig: Rig, mutate: Any, reason: str) -> None:
    out = rig.send(raw_frame(bytes(mutate(good_bootp()))))
    assert out == []
    assert rig.counters[reason] == 1
    assert rig.counters["dhcp.offer.sent"] == 0


def test_dst_not_ours(rig: Rig) -> None:
    out = rig.send(request(MAC1, "discover", dst="192.168.1.1", eth_dst="52:55:0a:00:02:02"))
    assert out == []
    assert rig.counters["dhcp.dst.not_ours"] == 1


def test_option_overload(rig: Rig) -> None:
    b = good_bootp()
    # Options field says: more options in 'file' (overload 1); the hostname lives there.
    b[240:] = b"\x34\x01\x01\x35\x01\x01\xff"
    file_opts = b"\x0c\x04host\xff"
    b[108 : 108 + len(file_opts)] = file_opts
    msg = parse_dhcp(bytes(b))
    assert msg.options[12] == b"host"
    # RFC 3396: repeated instances concatenate.
    msg = parse_dhcp(bytes(b[:240]) + b"\x35\x01\x01\x0c\x02ab\x0c\x02cd\xff")
    assert msg.options[12] == b"abcd"


def test_parse_raises_wire_error_only() -> None:
    with pytest.raises(WireError):
        parse_dhcp(b"")


def test_encode_options_splits_long_values() -> None:
    enc = encode_options([(119, b"a" * 300), (1, b"")])
    assert enc == b"\x77\xff" + b"a" * 255 + b"\x77\x2d" + b"a" * 45 + b"\x01\x00"


@pytest.mark.parametrize("bad", ["", "a..b", "x" * 64 + ".com", "ümlaut.de"])
def test_search_list_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_search_list([bad])


def test_lease_table_bounded() -> None:
    r = make_rig(subnet=ipaddress.IPv4Network("10.0.0.0/16"), gateway=ipaddress.IPv4Address(
        "10.0.0.2"), dns_ip=ipaddress.IPv4Address("10.0.0.3"), guest_ip=ipaddress.IPv4Address(
        "10.0.0.15"))  # fmt: skip
    # One frame built by scapy, without a UDP checksum, then the MAC patched in (fast).
    template = request(MAC1, "discover")
    template[UDP].chksum = 0
    frame = bytearray(bytes(template))
    chaddr_off = 14 + 20 + 8 + 28
    for i in range(MAX_LEASES + 3):
        mac = parse_mac(MAC1)[:3] + i.to_bytes(3, "big")
        frame[6:12] = mac
        frame[chaddr_off : chaddr_off + 6] = mac
        r.classifier.handle_frame(memoryview(frame), r.port, 0.0)
        for f in r.sent:
            r.pool.release(f)
        r.sent.clear()
    assert r.counters["dhcp.offer.sent"] == MAX_LEASES
    assert r.counters["dhcp.lease_table.full"] == 3
    # Once the offers lapse, room is made again.
    (offer,) = r.send(request("52:54:00:ff:ff:ff", "discover"), OFFER_HOLD_S + 1)
    assert r.pool.in_use == 0
    assert offer[BOOTP].yiaddr == "10.0.0.15"


def test_mtu_option_and_small_mtu() -> None:
    r = make_rig(mtu=576, dns_search=("a.example",))
    (offer,) = r.send(request(MAC1, "discover", ("max_dhcp_size", 1500)))
    assert options(offer)["interface-mtu"] == 576
    assert len(bytes(offer[IP])) <= 576
    assert r.pool.in_use == 0


def test_leases_expire_from_api(rig: Rig) -> None:
    bind(rig, MAC1, 0.0)
    assert rig.server.leases(3599.0)[0]["expires_in_s"] == 1.0
    assert rig.server.leases(3600.0) == []
    assert rig.server.lease_for_mac(parse_mac(MAC1), 3600.0) is None
    assert rig.server.lease_for_mac(parse_mac(MAC1)) == ipaddress.IPv4Address("10.0.2.15")


def test_hostname_sanitised(rig: Rig) -> None:
    rig.send(request(MAC1, "discover"))
    rig.send(
        request(
            MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"),
            ("hostname", b"ev\x01il\xff\x00"),
        )
    )  # fmt: skip
    (lease,) = rig.server.leases(0.0)
    assert lease["hostname"] == "ev?il\ufffd"


def test_struct_sizes() -> None:
    assert struct.calcsize("!BBBBIHH4s4s4s4s16s") == 44


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dhcp_static": ((parse_mac(MAC1), ipaddress.IPv4Address("10.0.2.0")),)}, "dhcp-static"),
        (
            {
                "dhcp_static": (
                    (parse_mac(MAC1), ipaddress.IPv4Address("10.0.2.20")),
                    (parse_mac(MAC2), ipaddress.IPv4Address("10.0.2.20")),
                )
            },
            "two MACs",
        ),
        (
            {
                "dhcp_static": (
                    (parse_mac(MAC1), ipaddress.IPv4Address("10.0.2.20")),
                    (parse_mac(MAC1), ipaddress.IPv4Address("10.0.2.21")),
                )
            },
            "two addresses",
        ),
        ({"dns_search": ("ok.example", "bad..example")}, "dns-search"),
        ({"lease_time": 0}, "lease-time"),
    ],
)
def test_check_config(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_config(Config(**kw))


def test_cli_dhcp_options() -> None:
    from guestnet.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["qemu", "--socket", "/nonexistent", "--lease-time", "120", "--dns-search", "a.example",
         "--dns-search", "b.example", "--dhcp-static", f"{MAC2}=10.0.2.50"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.lease_time == 120
    assert config.dns_search == ("a.example", "b.example")
    assert config.dhcp_static == ((parse_mac(MAC2), ipaddress.IPv4Address("10.0.2.50")),)


@settings(max_examples=300, deadline=None)
@given(
    tail=st.binary(max_size=400),
    kind=st.integers(0, 10),
    ciaddr=st.sampled_from([bytes(4), bytes((10, 0, 2, 15)), bytes((10, 0, 2, 99))]),
    flags=st.sampled_from([0, 0x8000]),
)
def test_fuzzed_options_never_raise_other_than_wire_error(
    tail: bytes, kind: int, ciaddr: bytes, flags: int
) -> None:
    """Random option bytes after a valid header: WireError or a well-formed reply, nothing else."""
    r = make_rig(dns_search=("a.example",))
    b = good_bootp()
    b[10:12] = flags.to_bytes(2, "big")
    b[12:16] = ciaddr
    msg = bytes(b[:240]) + bytes((53, 1, kind)) + tail
    ip = parse_ipv4(bytes(IP(src="0.0.0.0", dst="255.255.255.255") / UDP() / b"x"))
    pkt = ipv4_packet(r.port, parse_mac(MAC1), ip, memoryview(b""), True)
    for now in (0.0, 10.0):
        with contextlib.suppress(WireError):
            r.server.handle_udp(pkt, 68, 67, memoryview(msg), now)
        for frame in r.sent:
            reply = Ether(bytes(frame.data))
            assert reply[BOOTP].op == 2
            assert len(bytes(reply[IP])) <= 576
            r.pool.release(frame)
        r.sent.clear()
    assert r.pool.in_use == 0


# ------------------------------------------------------------- addressing and MAC changes (#9)

RANDOM_MAC = "ce:6b:a1:47:67:06"


def test_replies_go_to_chaddr_not_the_learned_mac(rig: Rig) -> None:
    """RFC 2131 §4.1: with ``ciaddr`` 0 and the broadcast bit clear, the reply is unicast to
    ``yiaddr`` at ``chaddr``, whatever source MAC the link has shown (the switch has learned)."""
    rig.send(Ether(src=RANDOM_MAC, dst=BCAST_MAC) / IP(src="0.0.0.0", dst="255.255.255.255"))
    assert rig.port.guest_mac == parse_mac(RANDOM_MAC)
    discover = request(MAC1, "discover")
    discover[Ether].src = RANDOM_MAC  # a frame whose Ethernet source is not its chaddr
    (offer,) = rig.send(discover)
    check_reply(offer, 2, "10.0.2.15", "10.0.2.15", MAC1)
    ask = request(MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"))
    ask[Ether].src = RANDOM_MAC
    (ack,) = rig.send(ask)
    check_reply(ack, 5, "10.0.2.15", "10.0.2.15", MAC1)
    assert rig.server.lease_for_mac(parse_mac(MAC1)) == ipaddress.IPv4Address("10.0.2.15")
    assert rig.server.lease_for_mac(parse_mac(RANDOM_MAC)) is None


def test_broadcast_bit_and_ciaddr_addressing_ignore_the_learned_mac(rig: Rig) -> None:
    """Broadcast bit set: 255.255.255.255 at ff:ff:ff:ff:ff:ff; ``ciaddr`` set: unicast to
    ``ciaddr`` at ``chaddr``; a NAK is broadcast. None of them at the learned MAC."""
    discover = request(MAC1, "discover", flags=0x8000)
    discover[Ether].src = RANDOM_MAC
    (offer,) = rig.send(discover)
    check_reply(offer, 2, "10.0.2.15", "255.255.255.255", BCAST_MAC)
    bind(rig, MAC1)
    renew = request(
        MAC1, "request", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW, eth_dst="52:55:0a:00:02:02"
    )
    renew[Ether].src = RANDOM_MAC
    (ack,) = rig.send(renew)
    check_reply(ack, 5, "10.0.2.15", "10.0.2.15", MAC1)
    assert ack[BOOTP].ciaddr == "10.0.2.15"
    wrong = request(MAC2, "request", ("requested_addr", "10.0.2.15"))
    wrong[Ether].src = RANDOM_MAC
    (nak,) = rig.send(wrong)
    check_reply(nak, 6, "0.0.0.0", "255.255.255.255", BCAST_MAC)


def test_mac_change_mid_transaction_keeps_the_offer(rig: Rig) -> None:
    """The client's MAC changes between DISCOVER and REQUEST (a TAP whose MAC is set after the
    guest started DHCP; busybox udhcpc re-reads it before every send): its REQUEST for the
    address offered in that transaction (same xid, same link) is ACKed to the new chaddr, where
    it used to be NAKed and the client sent on to the next address."""
    (offer,) = rig.send(request(RANDOM_MAC, "discover", xid=0x5EED), 1.0)
    check_reply(offer, 2, "10.0.2.15", "10.0.2.15", RANDOM_MAC, xid=0x5EED)
    ask = request(MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"), xid=0x5EED)
    (ack,) = rig.send(ask, 1.5)
    check_reply(ack, 5, "10.0.2.15", "10.0.2.15", MAC1, xid=0x5EED)
    assert rig.server.lease_for_mac(parse_mac(MAC1)) == ipaddress.IPv4Address("10.0.2.15")
    assert rig.counters["dhcp.request.mac_changed"] == 1
    assert rig.counters["dhcp.nak.not_yours"] == 0
    # The old MAC's offer went with it: nothing is held for it any more.
    (offer,) = rig.send(request(MAC2, "discover", xid=0x77), 2.0)
    assert offer[BOOTP].yiaddr == "10.0.2.16"
    assert [d["mac"] for d in rig.server.leases(2.0)] == [MAC1]


def test_offer_not_taken_by_another_transaction_or_link(rig: Rig) -> None:
    """Only the transaction the offer was made in (its xid, on its link) may take it under a
    new chaddr: another client's REQUEST for it is still NAKed."""
    rig.send(request(MAC1, "discover", xid=0x1111), 1.0)
    other_xid = request(MAC2, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"),
                        xid=0x2222)  # fmt: skip
    (nak,) = rig.send(other_xid, 1.5)
    assert options(nak)["message-type"] == 6
    # Same xid, but from another link.
    other_sent: list[Frame] = []
    other_port = Port("other", other_sent.append)
    rig.classifier.switch.attach(other_port)
    same_xid = request(MAC2, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"),
                       xid=0x1111)  # fmt: skip
    rig.sent.clear()
    rig.classifier.handle_frame(memoryview(bytes(same_xid)), other_port, 1.6)
    (frame,) = other_sent
    assert options(Ether(bytes(frame.data)))["message-type"] == 6
    rig.pool.release(frame)
    # The broadcast REQUEST itself is flooded to the first link (issue 15: a learning bridge).
    (flooded,) = rig.sent
    assert bytes(flooded.data) == bytes(same_xid)
    rig.pool.release(flooded)
    rig.sent.clear()
    # The offer is still MAC1's.
    (ack,) = rig.send(
        request(MAC1, "request", ("server_id", GW), ("requested_addr", "10.0.2.15"), xid=0x1111),
        2.0,
    )
    assert options(ack)["message-type"] == 5
    assert rig.counters["dhcp.request.mac_changed"] == 0
    for copy in other_sent[1:]:  # MAC1's broadcast REQUEST, flooded to the other link
        rig.pool.release(copy)


def test_bound_lease_not_moved_by_a_request_in_its_old_transaction(rig: Rig) -> None:
    """Once ACKed, a lease is its chaddr's: a REQUEST from another MAC repeating that xid is
    NAKed (a guest that comes back with another MAC gets another address, as before)."""
    bind(rig, MAC1)
    (nak,) = rig.send(
        request(MAC2, "request", ("server_id", GW), ("requested_addr", "10.0.2.15")), 1.0
    )
    assert options(nak)["message-type"] == 6
    assert rig.server.lease_for_mac(parse_mac(MAC1)) == ipaddress.IPv4Address("10.0.2.15")


def test_xid_offered_to_two_macs_is_followed_no_more(rig: Rig) -> None:
    """Two clients that drew the same xid: a REQUEST in it from a third MAC moves nothing."""
    rig.send(request(MAC1, "discover", xid=0x4242), 1.0)
    (offer,) = rig.send(request(MAC2, "discover", xid=0x4242), 1.1)
    assert offer[BOOTP].yiaddr == "10.0.2.16"
    (nak,) = rig.send(
        request(MAC3, "request", ("server_id", GW), ("requested_addr", "10.0.2.16"), xid=0x4242),
        1.2,
    )
    assert options(nak)["message-type"] == 6
    assert rig.counters["dhcp.request.mac_changed"] == 0


def test_pending_offers_bounded() -> None:
    """The offers remembered by xid are bounded; the oldest go first."""
    r = make_rig(
        subnet=ipaddress.IPv4Network("10.0.0.0/16"),
        gateway=ipaddress.IPv4Address("10.0.2.2"),
        dns_ip=ipaddress.IPv4Address("10.0.2.3"),
        guest_ip=ipaddress.IPv4Address("10.0.2.15"),
    )
    offered = []
    for i in range(MAX_PENDING_OFFERS + 20):
        (offer,) = r.send(request(f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}", "discover", xid=i))
        offered.append(str(offer[BOOTP].yiaddr))
    assert len(r.server._pending) == MAX_PENDING_OFFERS
    # The oldest transaction is forgotten: a new MAC in it is NAKed ...
    (nak,) = r.send(
        request(MAC1, "request", ("server_id", GW), ("requested_addr", offered[0]), xid=0), 1.0
    )
    assert options(nak)["message-type"] == 6
    # ... the newest is still followed.
    last = MAX_PENDING_OFFERS + 19
    (ack,) = r.send(
        request(MAC1, "request", ("server_id", GW), ("requested_addr", offered[-1]), xid=last),
        1.0,
    )
    assert options(ack)["message-type"] == 5
    assert r.counters["dhcp.request.mac_changed"] == 1
    assert r.pool.in_use == 0


def test_reserved_addresses_of_configured_guests(rig: Rig) -> None:
    """Issue 15: guests guestnet configured itself (``netns A B --configure``) hold their
    addresses: a DHCP client of another guest gets neither, and each reserving MAC gets its
    own; ``--dhcp-static`` entries win."""
    mac_a, mac_b = parse_mac("52:54:00:12:34:56"), parse_mac("52:54:00:12:34:57")
    assert rig.server.reserve(mac_a, ipaddress.IPv4Address("10.0.2.15"))
    assert rig.server.reserve(mac_b, ipaddress.IPv4Address("10.0.2.16"))
    assert not rig.server.reserve(parse_mac(MAC2), ipaddress.IPv4Address("10.0.2.16"))
    assert bind(rig, MAC2) == "10.0.2.17"
    assert bind(rig, "52:54:00:12:34:57") == "10.0.2.16"
