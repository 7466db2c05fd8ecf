"""What the classifier hands to the IP services: one parsed guest packet, of either IP version.

An :class:`IpPacket` carries what every service reads whatever the version: the addresses
(packed, 4 or 16 bytes), the L4 protocol (IPv4 protocol, IPv6 next header), the hop limit, the
L4 message and the packet's :class:`~guestnet.wire.l3.L3Family`, through which a service builds
its answer and finds its offsets. ``ip`` keeps the version's own parsed header for the few
version-specific readers (IPv4 reassembly, the header an ICMPv4 error quotes).

Views in an :class:`IpPacket` point into the guest's frame buffer and are valid only during the
``handle_*`` call that receives them: a service that needs bytes later copies them (fragment
reassembly), and the TCP translation acknowledges only what the host socket has taken, so it
never needs to keep guest payload.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from guestnet.core.port import Port
from guestnet.wire.ipv4 import IPv4Header
from guestnet.wire.ipv6 import IPv6Header
from guestnet.wire.l3 import IPV4, L3Family

#: ``tuple.__new__``: builds an :class:`IpPacket` from a tuple of all its fields without the
#: keyword-capable ``__new__`` NamedTuple generates, which costs about 100 ns more per packet
#: (bench/bench_classifier.py). Only for :func:`ipv4_packet` and the classifier's copy of it.
_new = tuple.__new__


class IpPacket(NamedTuple):
    """An IP packet from a guest, with its Ethernet source and the link it came on."""

    port: Port
    #: The guest's MAC (the frame's source).
    src_mac: bytes
    #: The version's parsed header. IPv6's names IPv4's fields the same way (``header_len``,
    #: ``total_len``, ``ident``, ``ttl``, ``frag``...: see guestnet.wire.ipv6).
    ip: IPv4Header | IPv6Header
    #: The L4 message, exactly as long as the IP header says (Ethernet padding cut off).
    l4: memoryview
    #: The link vouches for the L4 checksum (TAP ``DATA_VALID``) or left it partial for an
    #: offload (``NEEDS_CSUM``): it must not be verified.
    csum_trusted: bool
    #: The IP version's family: header writer, pseudo-header sum, offsets.
    family: L3Family
    #: Source and destination addresses, packed (4 bytes for IPv4, 16 for IPv6).
    src: bytes
    dst: bytes
    #: The L4 protocol: IPv4's protocol field, IPv6's last next header.
    proto: int
    #: IPv4 TTL or IPv6 hop limit, as received.
    hop_limit: int


def ipv4_packet(
    port: Port, src_mac: bytes, ip: IPv4Header, l4: memoryview, csum_trusted: bool
) -> IpPacket:
    """The packet view of a parsed IPv4 datagram."""
    return _new(
        IpPacket, (port, src_mac, ip, l4, csum_trusted, IPV4, ip.src, ip.dst, ip.proto, ip.ttl)
    )


class UdpHandler(Protocol):
    """A service that takes UDP datagrams (DHCP, DNS, the UDP NAT)."""

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """Handle one datagram; ``payload`` is the UDP payload."""


class TcpHandler(Protocol):
    """A service that takes TCP segments (DNS over TCP, the TCP NAT)."""

    def handle_tcp(self, pkt: IpPacket, now: float) -> None:
        """Handle one segment; ``pkt.l4`` is the whole TCP segment."""


class IcmpHandler(Protocol):
    """A service that takes ICMP messages (echo)."""

    def handle_icmp(self, pkt: IpPacket, now: float) -> None:
        """Handle one ICMP message; ``pkt.l4`` is the whole message, checksum verified."""


class Icmp6Handler(Protocol):
    """A service that takes ICMPv6 messages (NDP and echo to guestnet's addresses, the rest)."""

    def handle_icmp6(self, pkt: IpPacket, now: float) -> None:
        """Handle one ICMPv6 message; ``pkt.l4`` is the whole message, checksum verified."""


class NdpHandler(Icmp6Handler, Protocol):
    """Neighbor Discovery: ICMPv6 messages, and a greeting for a port that starts IPv6."""

    def port_up(self, port: Port) -> None:
        """The first IPv6 packet came from ``port``: advertise the router there at once."""


class FragmentHandler(Protocol):
    """Reassembly: takes fragments, hands whole datagrams back to the classifier."""

    def handle_fragment(self, pkt: IpPacket, now: float) -> None:
        """Handle one fragment."""
