"""IPv6 headers (RFC 8200): the fixed header, the extension-header chain, the Fragment header.

Theory of operation
-------------------
An IPv6 packet is a 40-byte fixed header and a chain of *next headers*. :func:`parse_ipv6`
checks the fixed header (one :class:`~guestnet.wire.WireError` reason per bad field) and walks
the chain to the upper layer, so that the classifier routes on what the packet carries whatever
options ride in front of it:

- Hop-by-Hop Options (0, only directly after the fixed header), Routing (43) and Destination
  Options (60) all have the same shape: next header, length in 8-byte units not counting the
  first 8, and are skipped. guestnet is the packet's destination (a router hands it on only to
  the host's own socket, which knows nothing of these headers), so none of their options need
  acting on; a Routing header with segments left is delivered as the destination would see it.
- The Fragment header (44) ends the walk: what follows is a piece of the fragmentable part, and
  only the reassembled packet has an upper layer. An *atomic fragment* (offset 0, M clear,
  RFC 6946) is not a fragment of anything, and the walk goes on through it.
- Anything else (TCP, UDP, ICMPv6, No Next Header 59, ESP, ...) is the upper layer: its number is
  :attr:`IPv6Header.proto` and its bytes start at :attr:`IPv6Header.header_len`.

The chain is bounded (:data:`MAX_EXT_HEADERS`) so a packet of nothing but empty options costs
no more than a few lookups.

:class:`IPv6Header` names what IPv4's header calls the same things the same way (``header_len``,
``total_len``, ``proto``, ``ident``, ``ttl``, ``tos``, ``frag``, ``is_fragment``,
``frag_offset``), so code reading a packet's header by those fields serves both versions; ``frag``
gives the Fragment header's offset and M flag in IPv4's layout.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError

IPV6_HLEN = 40
#: IPv6 is version 6; the upper-layer number of ICMPv6 (the others are IPv4's: 6, 17).
PROTO_ICMPV6 = 58
NH_HOP_BY_HOP = 0
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_NONE = 59
NH_DEST_OPTS = 60
#: Extension headers skipped on the way to the upper layer (same layout each).
SKIPPED_EXT = frozenset((NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS))
#: More extension headers than this in one packet is an attack, not a packet.
MAX_EXT_HEADERS = 8
FRAG_HLEN = 8
#: IPv4's flag "more fragments", used in :attr:`IPv6Header.frag` for the M flag.
FRAG_MF = 0x2000

_HDR = struct.Struct("!IHBB16s16s")
_FRAG = struct.Struct("!BxHI")
_UNSPECIFIED = bytes(16)


class IPv6Header(NamedTuple):
    """A parsed IPv6 header, its extension chain walked."""

    #: Bytes before the upper layer: 40 plus the extension headers walked.
    header_len: int
    #: Traffic class (IPv4's TOS byte).
    traffic_class: int
    flow_label: int
    #: 40 + the payload length field: where the packet ends (Ethernet padding cut off).
    total_len: int
    #: The fixed header's next header.
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes
    #: The upper-layer protocol (after the extension headers); for a fragment, the Fragment
    #: header's next header.
    proto: int
    #: Fragment header: identification, offset (bytes) and M flag; all 0 without one.
    ident: int
    frag_offset: int
    more_fragments: bool
    #: True when a (non-atomic) Fragment header was found: the rest is a piece of a packet.
    is_fragment: bool

    @property
    def ttl(self) -> int:
        """The hop limit, under IPv4's name."""
        return self.hop_limit

    @property
    def tos(self) -> int:
        """The traffic class, under IPv4's name."""
        return self.traffic_class

    @property
    def frag(self) -> int:
        """Offset (8-byte units) and M flag in IPv4's flags/offset layout (``FRAG_MF``)."""
        return (self.frag_offset >> 3) | (FRAG_MF if self.more_fragments else 0)


def parse_ipv6(data: memoryview | bytes) -> IPv6Header:
    """Parse the IPv6 header at the start of ``data`` (which may carry Ethernet padding).

    Walks hop-by-hop, routing and destination options to the upper layer and stops at a Fragment
    header (see the module docstring). Raises WireError with the reason of the first bad field.
    """
    n = len(data)
    if n < IPV6_HLEN:
        raise WireError("ipv6.truncated")
    word, payload_len, next_header, hop_limit, src, dst = _HDR.unpack_from(data, 0)
    if word >> 28 != 6:
        raise WireError("ipv6.bad_version")
    total_len = IPV6_HLEN + payload_len
    if total_len > n:
        raise WireError("ipv6.bad_payload_length")
    if src[0] == 0xFF:
        raise WireError("ipv6.src.multicast")
    off = IPV6_HLEN
    proto = next_header
    ident = frag_offset = 0
    more = is_fragment = False
    walked = 0
    while proto in SKIPPED_EXT or proto == NH_FRAGMENT:
        walked += 1
        if walked > MAX_EXT_HEADERS:
            raise WireError("ipv6.ext.too_many")
        if proto == NH_HOP_BY_HOP and off != IPV6_HLEN:
            raise WireError("ipv6.ext.misplaced_hop_by_hop")
        if off + 8 > total_len:
            raise WireError("ipv6.ext.truncated")
        if proto == NH_FRAGMENT:
            nxt, offset_m, ident = _FRAG.unpack_from(data, off)
            off += FRAG_HLEN
            proto = nxt
            frag_offset = offset_m & 0xFFF8
            more = bool(offset_m & 1)
            if frag_offset or more:
                is_fragment = True
                break
            continue  # an atomic fragment (RFC 6946): the packet is whole
        ext_len = (data[off + 1] + 1) * 8
        if off + ext_len > total_len:
            raise WireError("ipv6.ext.truncated")
        proto = data[off]
        off += ext_len
    return IPv6Header(
        off,
        (word >> 20) & 0xFF,
        word & 0xFFFFF,
        total_len,
        next_header,
        hop_limit,
        src,
        dst,
        proto,
        ident,
        frag_offset,
        more,
        is_fragment,
    )


def build_ipv6(
    buf: memoryview | bytearray,
    off: int,
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> int:
    """Write a 40-byte IPv6 header at ``off``; return the payload offset."""
    word = (6 << 28) | (traffic_class << 20) | flow_label
    _HDR.pack_into(buf, off, word, payload_len, next_header, hop_limit, src, dst)
    return off + IPV6_HLEN


def is_unspecified(addr: bytes) -> bool:
    """True for ``::``, the source of a guest that has no address yet (DAD, RFC 4862)."""
    return addr == _UNSPECIFIED


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast group of ``addr``: ff02::1:ff + its low 24 bits."""
    return b"\xff\x02" + bytes(9) + b"\x01\xff" + addr[13:16]


def multicast_mac(group: bytes) -> bytes:
    """The Ethernet address of IPv6 multicast ``group``: 33:33 + its low 32 bits (RFC 2464)."""
    return b"\x33\x33" + group[12:16]
