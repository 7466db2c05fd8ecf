"""IPv4 headers (RFC 791)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire.checksum import checksum
from guestnet.wire.native import parse_ipv4 as _parse_fields

IPV4_HLEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FLAG_DF = 0x4000
FLAG_MF = 0x2000
FRAG_OFFSET_MASK = 0x1FFF

_HDR = struct.Struct("!BBHHHBBH4s4s")
#: ``tuple.__new__``: an :class:`IPv4Header` from the tuple of its fields, without the keyword
#: handling of the NamedTuple's own ``__new__``.
_new = tuple.__new__


class IPv4Header(NamedTuple):
    header_len: int
    tos: int
    total_len: int
    ident: int
    #: Flags and fragment offset as on the wire (FLAG_DF, FLAG_MF, FRAG_OFFSET_MASK).
    frag: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes

    @property
    def is_fragment(self) -> bool:
        """True when this datagram is one piece of a larger one."""
        return bool(self.frag & (FLAG_MF | FRAG_OFFSET_MASK))

    @property
    def frag_offset(self) -> int:
        """Offset of this fragment's data, in bytes."""
        return (self.frag & FRAG_OFFSET_MASK) * 8


def parse_ipv4(data: memoryview | bytes, verify: bool = True) -> IPv4Header:
    """Parse the IPv4 header at the start of ``data`` (which may carry Ethernet padding).

    ``total_len`` is checked against what is there; the header checksum is verified unless
    ``verify`` is False. The checks run in :func:`guestnet.wire.native.parse_ipv4` (C or its
    Python twin); a bad header raises :class:`WireError` with a dotted reason.
    """
    return _new(IPv4Header, _parse_fields(data, verify))


def build_ipv4(
    buf: memoryview | bytearray,
    off: int,
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ident: int = 0,
    ttl: int = 64,
    frag: int = FLAG_DF,
    tos: int = 0,
) -> int:
    """Write a 20-byte IPv4 header with its checksum at ``off``; return the payload offset."""
    _HDR.pack_into(
        buf, off, 0x45, tos, IPV4_HLEN + payload_len, ident, frag, ttl, proto, 0, src, dst
    )
    csum = checksum(memoryview(buf)[off : off + IPV4_HLEN])
    struct.pack_into("!H", buf, off + 10, csum)
    return off + IPV4_HLEN
