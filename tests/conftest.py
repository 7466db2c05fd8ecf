"""Shared fixtures for the unit and fuzz tests: a whole sans-I/O core on a fake guest link.

``core`` (function scope) gives a :class:`CoreHarness`: the default :class:`Config`, a to-guest
:class:`FramePool`, :class:`Counters`, a :class:`Switch`, a :class:`FrameClassifier` and one
attached :class:`CollectingPort` named ``guest0``. Feed guest frames with ``core.feed(bytes)``;
every frame the core sends toward the guest is copied to ``port.sent`` (as ``bytes``) and its
buffer released to the pool, so at teardown the fixture asserts that no frame is still checked
out (``pool.in_use == 0``).

``make_core`` (session scope) is the factory behind it, for tests that need several harnesses,
other settings (``make_core(pool_slots=4)``, any Config field) or a fresh core per Hypothesis
example (function-scoped fixtures do not reset between examples; a factory call does).

``frames`` (session scope) hands out guest frame builders (``frames.arp``, ``frames.udp``,
``frames.tcp``, ``frames.icmp``, ``frames.ipv4``; for IPv6 ``frames.ipv6``, ``frames.udp6``,
``frames.tcp6``, ``frames.icmp6``) and the default addresses; they use guestnet's own codecs,
which tests/unit/test_wire.py and test_ipv6.py check against scapy and golden bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire.arp import ARP_REQUEST, build_arp
from guestnet.wire.ethernet import (
    BROADCAST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    build_ethernet,
)
from guestnet.wire.icmp import ICMP_ECHO_REQUEST, build_icmp
from guestnet.wire.icmpv6 import ICMPV6_ECHO_REQUEST, build_icmpv6
from guestnet.wire.ipv4 import FLAG_DF, PROTO_ICMP, PROTO_TCP, PROTO_UDP, build_ipv4
from guestnet.wire.ipv6 import PROTO_ICMPV6, build_ipv6
from guestnet.wire.tcp import SYN, build_tcp
from guestnet.wire.udp import build_udp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
DNS_IP = bytes([10, 0, 2, 3])
OUR_MAC = bytes.fromhex("52550a000202")
REMOTE_IP = bytes([93, 184, 216, 34])
GUEST_IP6 = bytes.fromhex("fd000000000000000000000000000015")
#: The guest's EUI-64 link-local address (from GUEST_MAC).
GUEST_LL6 = bytes.fromhex("fe80000000000000505400fffe123456")
GATEWAY_IP6 = bytes.fromhex("fd000000000000000000000000000002")
DNS_IP6 = bytes.fromhex("fd000000000000000000000000000003")
#: guestnet's link-local address (EUI-64 of OUR_MAC).
OUR_LL6 = bytes.fromhex("fe8000000000000050550afffe000202")
REMOTE_IP6 = bytes.fromhex("20010db8000000000000000000000001")


class CollectingPort(Port):
    """A Port whose ``send`` keeps a copy of each frame in ``sent`` and releases the buffer."""

    __slots__ = ("pool", "sent")

    def __init__(self, name: str, pool: FramePool) -> None:
        super().__init__(name, self._collect)
        self.pool = pool
        self.sent: list[bytes] = []

    def _collect(self, frame: Frame) -> None:
        data = bytes(frame.data)
        self.sent.append(data)
        self.tx_frames += 1
        self.tx_bytes += len(data)
        self.pool.release(frame)


class CoreHarness:
    """Config, pool, counters, switch, classifier and one collecting port, wired together."""

    def __init__(self, **config: Any) -> None:
        self.config = Config(**config)
        self.pool = FramePool(self.config.mtu, self.config.pool_slots)
        self.counters = Counters()
        self.switch = Switch(self.pool, self.counters, self.config.isolate)
        self.classifier = FrameClassifier(self.config, self.pool, self.counters, self.switch)
        self.port = self.add_port("guest0")
        self.now = 1000.0

    def add_port(self, name: str) -> CollectingPort:
        """Attach another collecting port to the switch."""
        port = CollectingPort(name, self.pool)
        self.switch.attach(port)
        return port

    def feed(self, frame: bytes | bytearray, port: Port | None = None, **kw: Any) -> None:
        """Hand one guest frame to the classifier, as a link would (a memoryview of it)."""
        self.classifier.handle_frame(memoryview(frame), port or self.port, self.now, **kw)

    def take_sent(self) -> list[bytes]:
        """Frames sent to the default port since the last call."""
        sent, self.port.sent = self.port.sent, []
        return sent


@pytest.fixture(scope="session")
def make_core() -> Callable[..., CoreHarness]:
    """Factory: ``make_core(**config_fields)`` builds a fresh :class:`CoreHarness`."""
    return CoreHarness


@pytest.fixture
def core(make_core: Callable[..., CoreHarness]) -> Iterator[CoreHarness]:
    """A default :class:`CoreHarness`; fails the test if a frame is left checked out."""
    harness = make_core()
    yield harness
    assert harness.pool.in_use == 0, "a frame was not released to the pool"


# --- frame builders (guest -> guestnet) --------------------------------------------------------


def arp_frame(
    op: int = ARP_REQUEST,
    sha: bytes = GUEST_MAC,
    spa: bytes = GUEST_IP,
    tha: bytes = b"\x00" * 6,
    tpa: bytes = GATEWAY_IP,
    eth_dst: bytes = BROADCAST,
    eth_src: bytes | None = None,
) -> bytes:
    """An unpadded 42-byte Ethernet ARP frame."""
    buf = bytearray(42)
    off = build_ethernet(buf, 0, eth_dst, eth_src or sha, ETHERTYPE_ARP)
    build_arp(buf, off, op, sha, spa, tha, tpa)
    return bytes(buf)


def ipv4_frame(
    proto: int,
    l4: bytes,
    src: bytes = GUEST_IP,
    dst: bytes = REMOTE_IP,
    eth_src: bytes = GUEST_MAC,
    eth_dst: bytes = OUR_MAC,
    frag: int = FLAG_DF,
    ident: int = 0x1234,
) -> bytes:
    """Ethernet + 20-byte IPv4 header (checksummed) + ``l4`` as given."""
    buf = bytearray(34 + len(l4))
    off = build_ethernet(buf, 0, eth_dst, eth_src, ETHERTYPE_IPV4)
    off = build_ipv4(buf, off, src, dst, proto, len(l4), ident=ident, frag=frag)
    buf[off:] = l4
    return bytes(buf)


def udp_segment(
    sport: int, dport: int, payload: bytes, src: bytes = GUEST_IP, dst: bytes = REMOTE_IP
) -> bytes:
    """A checksummed UDP header + payload."""
    buf = bytearray(8 + len(payload))
    buf[8:] = payload
    build_udp(buf, 0, sport, dport, len(payload), src, dst)
    return bytes(buf)


def udp_frame(
    sport: int = 40000,
    dport: int = 9999,
    payload: bytes = b"hello",
    src: bytes = GUEST_IP,
    dst: bytes = REMOTE_IP,
    **kw: Any,
) -> bytes:
    """A whole guest UDP frame with correct checksums."""
    return ipv4_frame(PROTO_UDP, udp_segment(sport, dport, payload, src, dst), src, dst, **kw)


def tcp_segment(
    sport: int,
    dport: int,
    flags: int = SYN,
    payload: bytes = b"",
    options: bytes = b"",
    src: bytes = GUEST_IP,
    dst: bytes = REMOTE_IP,
    seq: int = 1000,
    ack: int = 0,
) -> bytes:
    """A checksummed TCP header (+ options) + payload."""
    hlen = 20 + len(options)
    buf = bytearray(hlen + len(payload))
    buf[hlen:] = payload
    build_tcp(buf, 0, sport, dport, seq, ack, flags, 65535, len(payload), src, dst, options)
    return bytes(buf)


def tcp_frame(
    sport: int = 40000,
    dport: int = 80,
    flags: int = SYN,
    payload: bytes = b"",
    options: bytes = b"",
    src: bytes = GUEST_IP,
    dst: bytes = REMOTE_IP,
    **kw: Any,
) -> bytes:
    """A whole guest TCP frame with correct checksums."""
    seg = tcp_segment(sport, dport, flags, payload, options, src, dst)
    return ipv4_frame(PROTO_TCP, seg, src, dst, **kw)


def icmp_frame(
    ident: int = 7, seq: int = 1, body: bytes = b"ping", dst: bytes = GATEWAY_IP, **kw: Any
) -> bytes:
    """A guest ICMP echo request frame."""
    buf = bytearray(8 + len(body))
    buf[8:] = body
    build_icmp(buf, 0, ICMP_ECHO_REQUEST, 0, ident, seq, len(body))
    return ipv4_frame(PROTO_ICMP, bytes(buf), dst=dst, **kw)


def ipv6_frame(
    next_header: int,
    payload: bytes,
    src: bytes = GUEST_IP6,
    dst: bytes = REMOTE_IP6,
    eth_src: bytes = GUEST_MAC,
    eth_dst: bytes = OUR_MAC,
    hop_limit: int = 64,
) -> bytes:
    """Ethernet + 40-byte IPv6 header + ``payload`` (extension headers and L4) as given."""
    buf = bytearray(54 + len(payload))
    off = build_ethernet(buf, 0, eth_dst, eth_src, ETHERTYPE_IPV6)
    off = build_ipv6(buf, off, src, dst, next_header, len(payload), hop_limit)
    buf[off:] = payload
    return bytes(buf)


def udp6_frame(
    sport: int = 40000,
    dport: int = 9999,
    payload: bytes = b"hello",
    src: bytes = GUEST_IP6,
    dst: bytes = REMOTE_IP6,
    **kw: Any,
) -> bytes:
    """A whole guest UDP-over-IPv6 frame with its checksum."""
    return ipv6_frame(PROTO_UDP, udp_segment(sport, dport, payload, src, dst), src, dst, **kw)


def tcp6_frame(
    sport: int = 40000,
    dport: int = 80,
    flags: int = SYN,
    payload: bytes = b"",
    src: bytes = GUEST_IP6,
    dst: bytes = REMOTE_IP6,
    **kw: Any,
) -> bytes:
    """A whole guest TCP-over-IPv6 frame with its checksum."""
    seg = tcp_segment(sport, dport, flags, payload, b"", src, dst)
    return ipv6_frame(PROTO_TCP, seg, src, dst, **kw)


def icmp6_message(
    type_: int, code: int, word1: int, word2: int, body: bytes, src: bytes, dst: bytes
) -> bytes:
    """An ICMPv6 message with its checksum over the pseudo-header of ``src`` -> ``dst``."""
    buf = bytearray(8 + len(body))
    buf[8:] = body
    build_icmpv6(buf, 0, type_, code, word1, word2, len(body), src, dst)
    return bytes(buf)


def icmp6_frame(
    type_: int = ICMPV6_ECHO_REQUEST,
    code: int = 0,
    word1: int = 7,
    word2: int = 1,
    body: bytes = b"ping",
    src: bytes = GUEST_IP6,
    dst: bytes = GATEWAY_IP6,
    hop_limit: int = 64,
    **kw: Any,
) -> bytes:
    """A guest ICMPv6 frame (an echo request to the gateway by default)."""
    msg = icmp6_message(type_, code, word1, word2, body, src, dst)
    return ipv6_frame(PROTO_ICMPV6, msg, src, dst, hop_limit=hop_limit, **kw)


def be16(value: int) -> bytes:
    """Two bytes, big-endian."""
    return struct.pack("!H", value)


class FrameBuilders:
    """The builders and addresses above, as the ``frames`` fixture hands them to tests.

    Tests take them from the fixture rather than importing ``conftest`` (whose module name is
    not unique once other test folders add their own).
    """

    GUEST_MAC = GUEST_MAC
    GUEST_IP = GUEST_IP
    GATEWAY_IP = GATEWAY_IP
    DNS_IP = DNS_IP
    OUR_MAC = OUR_MAC
    REMOTE_IP = REMOTE_IP
    GUEST_IP6 = GUEST_IP6
    GUEST_LL6 = GUEST_LL6
    GATEWAY_IP6 = GATEWAY_IP6
    DNS_IP6 = DNS_IP6
    OUR_LL6 = OUR_LL6
    REMOTE_IP6 = REMOTE_IP6
    ipv6 = staticmethod(ipv6_frame)
    udp6 = staticmethod(udp6_frame)
    tcp6 = staticmethod(tcp6_frame)
    icmp6 = staticmethod(icmp6_frame)
    icmp6_message = staticmethod(icmp6_message)
    arp = staticmethod(arp_frame)
    ipv4 = staticmethod(ipv4_frame)
    udp = staticmethod(udp_frame)
    udp_segment = staticmethod(udp_segment)
    tcp = staticmethod(tcp_frame)
    tcp_segment = staticmethod(tcp_segment)
    icmp = staticmethod(icmp_frame)


@pytest.fixture(scope="session")
def frames() -> type[FrameBuilders]:
    """Guest frame builders: ``frames.arp(tpa=...)``, ``frames.udp(dport=53, dst=...)``..."""
    return FrameBuilders
