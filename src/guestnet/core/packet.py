"""What the classifier hands to the IPv4 services: one parsed guest datagram.

Views in an :class:`Ipv4Packet` point into the guest's frame buffer and are valid only during the
``handle_*`` call that receives them: a service that needs bytes later copies them (fragment
reassembly), and the TCP translation acknowledges only what the host socket has taken, so it
never needs to keep guest payload.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from guestnet.core.port import Port
from guestnet.wire.ipv4 import IPv4Header


class Ipv4Packet(NamedTuple):
    """An IPv4 datagram from a guest, with its Ethernet source and the link it came on."""

    port: Port
    #: The guest's MAC (the frame's source).
    src_mac: bytes
    ip: IPv4Header
    #: The IP payload, exactly ``total_len - header_len`` bytes (Ethernet padding cut off).
    l4: memoryview
    #: The link vouches for the L4 checksum (TAP ``DATA_VALID``) or left it partial for an
    #: offload (``NEEDS_CSUM``): it must not be verified.
    csum_trusted: bool


class UdpHandler(Protocol):
    """A service that takes UDP datagrams (DHCP, DNS, the UDP NAT)."""

    def handle_udp(
        self, pkt: Ipv4Packet, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """Handle one datagram; ``payload`` is the UDP payload."""


class TcpHandler(Protocol):
    """A service that takes TCP segments (DNS over TCP, the TCP NAT)."""

    def handle_tcp(self, pkt: Ipv4Packet, now: float) -> None:
        """Handle one segment; ``pkt.l4`` is the whole TCP segment."""


class IcmpHandler(Protocol):
    """A service that takes ICMP messages (echo)."""

    def handle_icmp(self, pkt: Ipv4Packet, now: float) -> None:
        """Handle one ICMP message; ``pkt.l4`` is the whole message, checksum verified."""


class FragmentHandler(Protocol):
    """Reassembly: takes fragments, hands whole datagrams back to the classifier."""

    def handle_fragment(self, pkt: Ipv4Packet, now: float) -> None:
        """Handle one fragment."""
