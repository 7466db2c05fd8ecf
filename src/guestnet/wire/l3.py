"""The address-family seam: one IP header writer per family behind one small interface.

Theory of operation
-------------------
Everything guestnet builds toward a guest is Ethernet, then an IP header, then an L4 header and
payload, written into a pooled frame. What differs between IPv4 and IPv6 at that level is small
and fixed: the EtherType, the header guestnet writes (20 bytes without options for IPv4, 40 bytes
without extension headers for IPv6), the address length, and the pseudo-header the L4 checksum
covers. An :class:`L3Family` holds exactly that, so a service builds its frames and finds its
offsets through the family of the packet or flow it answers, and IPv6 adds one more family
object (``IPV6``) instead of copying any builder.

*Offsets.* A host reply is received straight into a pooled frame at the place its payload will
have once the headers are written in front (no copy): :attr:`L3Family.l4_off` for a message
whose L4 header is part of what the host hands over (ICMP echo), and
:attr:`L3Family.udp_payload_off` for a UDP payload. Both count from ``frame.start``.

*Checksums.* The IPv4 and IPv6 pseudo-headers (RFC 768/9293, RFC 8200 8.1) sum the same words
for an L4 length below 65,536: source, destination, protocol (next header) and length, so
:func:`~guestnet.wire.checksum.pseudo_header_sum` serves both, and the UDP and TCP codecs
(``wire/udp.py``, ``wire/tcp.py``), which call it with the addresses they are given, work for
either family unchanged. :meth:`L3Family.pseudo_sum` is the family's name for it, for callers
that store the partial sum for an offload (the TCP NAT's ``NEEDS_CSUM`` frames).

*Building.* :meth:`L3Family.build` writes the IP header in place. ``ident`` and
``dont_fragment`` say whether guestnet may fragment the packet later on its way to the guest
(IPv4: the identification field and DF; IPv6 has neither in its fixed header and would carry
them in a Fragment extension header only when fragmenting). :func:`build_l3_frame` and
:func:`build_udp_frame` write Ethernet + IP (+ UDP) in one call: the header writers of the UDP
NAT, ICMP, DNS and DHCP services all go through them. :func:`build_udp_frame`, on the UDP NAT's
per-datagram path, is one call into :mod:`guestnet.wire.native` (C or its Python twin).
"""

from __future__ import annotations

from typing import Protocol

from guestnet.wire.checksum import pseudo_header_sum
from guestnet.wire.ethernet import ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, build_ethernet
from guestnet.wire.ipv4 import FLAG_DF, IPV4_HLEN, build_ipv4
from guestnet.wire.ipv6 import IPV6_HLEN, build_ipv6
from guestnet.wire.native import build_udp_frame as _build_udp_frame
from guestnet.wire.tcp import TCP_HLEN
from guestnet.wire.udp import UDP_HLEN

#: Largest IP packet (IPv4 total length, IPv6 payload length without jumbograms).
MAX_IP_PACKET = 65535


class L3Family(Protocol):
    """What a service needs to know about an IP version to build and place frames."""

    @property
    def version(self) -> int:
        """4 or 6: the IP header's version field."""

    @property
    def ethertype(self) -> int:
        """The EtherType of a frame carrying this family."""

    @property
    def addr_len(self) -> int:
        """Bytes in a packed address: 4 or 16."""

    @property
    def header_len(self) -> int:
        """Length of the IP header :meth:`build` writes (no options, no extension headers)."""

    @property
    def l4_off(self) -> int:
        """Where the L4 header starts in a frame guestnet builds, counted from ``frame.start``."""

    @property
    def udp_payload_off(self) -> int:
        """Where a UDP payload starts in a frame guestnet builds, from ``frame.start``."""

    @property
    def max_l4_len(self) -> int:
        """The largest L4 message (header and payload) one packet of this family carries."""

    def build(
        self,
        buf: memoryview | bytearray,
        off: int,
        src: bytes,
        dst: bytes,
        proto: int,
        l4_len: int,
        ident: int = 0,
        ttl: int = 64,
        dont_fragment: bool = True,
    ) -> int:
        """Write the IP header at ``off`` for ``l4_len`` bytes of ``proto``; return the L4 offset.

        ``ttl`` is the hop limit; ``ident`` and ``dont_fragment`` matter only where the family
        fragments (see the module docstring).
        """

    def pseudo_sum(self, src: bytes, dst: bytes, proto: int, l4_len: int) -> int:
        """Ones'-complement sum of the pseudo-header an L4 checksum over ``l4_len`` covers."""

    def tcp_mss(self, mtu: int) -> int:
        """The TCP MSS for a link of ``mtu``: what is left after this IP header and TCP's."""

    def not_unicast(self, addr: bytes) -> bool:
        """True for a destination no single host has (multicast and the like), which is never
        translated. The subnet's directed broadcast (IPv4) is the caller's to check."""


class Ipv4Family:
    """IPv4 (RFC 791): 20-byte headers without options, a checksum, DF and identification."""

    __slots__ = ()

    version = 4
    ethertype = ETHERTYPE_IPV4
    addr_len = 4
    header_len = IPV4_HLEN
    l4_off = ETH_HLEN + IPV4_HLEN
    udp_payload_off = ETH_HLEN + IPV4_HLEN + UDP_HLEN
    max_l4_len = MAX_IP_PACKET - IPV4_HLEN

    def build(
        self,
        buf: memoryview | bytearray,
        off: int,
        src: bytes,
        dst: bytes,
        proto: int,
        l4_len: int,
        ident: int = 0,
        ttl: int = 64,
        dont_fragment: bool = True,
    ) -> int:
        """Write a 20-byte IPv4 header with its checksum (see :meth:`L3Family.build`)."""
        frag = FLAG_DF if dont_fragment else 0
        return build_ipv4(buf, off, src, dst, proto, l4_len, ident, ttl, frag)

    def pseudo_sum(self, src: bytes, dst: bytes, proto: int, l4_len: int) -> int:
        """The IPv4 pseudo-header sum (RFC 768)."""
        return pseudo_header_sum(src, dst, proto, l4_len)

    def tcp_mss(self, mtu: int) -> int:
        """MTU minus 20 bytes of IPv4 and 20 of TCP."""
        return mtu - IPV4_HLEN - TCP_HLEN

    def not_unicast(self, addr: bytes) -> bool:
        """224.0.0.0/4 multicast, 240.0.0.0/4 reserved and 255.255.255.255 (limited broadcast).

        The datapath asks this per datagram, so it reads the first byte; the policy, which
        caches its verdicts, says the same with ``ipaddress`` (is_multicast, is_reserved).
        """
        return addr[0] >= 224

    def __repr__(self) -> str:
        return "IPV4"


class Ipv6Family:
    """IPv6 (RFC 8200): 40-byte headers without extension headers; no header checksum.

    ``ident`` and ``dont_fragment`` are ignored: guestnet never fragments what it builds as an
    IPv6 packet on the way (a source that must fragment adds a Fragment header itself).
    """

    __slots__ = ()

    version = 6
    ethertype = ETHERTYPE_IPV6
    addr_len = 16
    header_len = IPV6_HLEN
    l4_off = ETH_HLEN + IPV6_HLEN
    udp_payload_off = ETH_HLEN + IPV6_HLEN + UDP_HLEN
    max_l4_len = MAX_IP_PACKET

    def build(
        self,
        buf: memoryview | bytearray,
        off: int,
        src: bytes,
        dst: bytes,
        proto: int,
        l4_len: int,
        ident: int = 0,
        ttl: int = 64,
        dont_fragment: bool = True,
    ) -> int:
        """Write a 40-byte IPv6 header (see :meth:`L3Family.build`)."""
        return build_ipv6(buf, off, src, dst, proto, l4_len, ttl)

    def pseudo_sum(self, src: bytes, dst: bytes, proto: int, l4_len: int) -> int:
        """The IPv6 pseudo-header sum (RFC 8200 8.1)."""
        return pseudo_header_sum(src, dst, proto, l4_len)

    def tcp_mss(self, mtu: int) -> int:
        """MTU minus 40 bytes of IPv6 and 20 of TCP."""
        return mtu - IPV6_HLEN - TCP_HLEN

    def not_unicast(self, addr: bytes) -> bool:
        """Multicast (ff00::/8) and the unspecified address ``::``."""
        return addr[0] == 0xFF or addr == _UNSPECIFIED6

    def __repr__(self) -> str:
        return "IPV6"


_UNSPECIFIED6 = bytes(16)

#: The IPv4 family.
IPV4: L3Family = Ipv4Family()
#: The IPv6 family.
IPV6: L3Family = Ipv6Family()
#: Families by the EtherType of the frames that carry them.
BY_ETHERTYPE: dict[int, L3Family] = {ETHERTYPE_IPV4: IPV4, ETHERTYPE_IPV6: IPV6}


def build_l3_frame(
    family: L3Family,
    buf: memoryview | bytearray,
    start: int,
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    proto: int,
    l4_len: int,
    ident: int = 0,
    dont_fragment: bool = True,
) -> int:
    """Ethernet and IP headers at ``start`` for ``l4_len`` bytes of ``proto``; return the frame
    length (``family.l4_off + l4_len``). The L4 message is the caller's, at ``start +
    family.l4_off``."""
    off = build_ethernet(buf, start, dst_mac, src_mac, family.ethertype)
    family.build(buf, off, src, dst, proto, l4_len, ident, 64, dont_fragment)
    return family.l4_off + l4_len


def build_udp_frame(
    family: L3Family,
    buf: memoryview | bytearray,
    start: int,
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload_len: int,
    ident: int = 0,
    dont_fragment: bool = True,
) -> int:
    """Ethernet, IP and UDP headers (UDP checksum included) in front of a payload already at
    ``start + family.udp_payload_off``; return the frame length. The UDP NAT writes every
    datagram to the guest through here: the work is one call of
    :func:`guestnet.wire.native.build_udp_frame` (C, or its Python twin)."""
    return _build_udp_frame(
        buf, start, family.version, dst_mac, src_mac, src, dst, sport, dport, payload_len,
        ident, dont_fragment,
    )  # fmt: skip
