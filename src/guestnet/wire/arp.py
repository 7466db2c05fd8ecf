"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError

ARP_LEN = 28
ARP_REQUEST = 1
ARP_REPLY = 2
HTYPE_ETHERNET = 1
PTYPE_IPV4 = 0x0800

_ARP = struct.Struct("!HHBBH6s4s6s4s")


class ArpPacket(NamedTuple):
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse_arp(data: memoryview | bytes) -> ArpPacket:
    """Parse an Ethernet/IPv4 ARP packet; anything else is a WireError."""
    if len(data) < ARP_LEN:
        raise WireError("arp.truncated")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data, 0)
    if htype != HTYPE_ETHERNET or hlen != 6:
        raise WireError("arp.bad_hardware")
    if ptype != PTYPE_IPV4 or plen != 4:
        raise WireError("arp.bad_protocol")
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(
    buf: memoryview | bytearray, off: int, op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes
) -> int:
    """Write an ARP packet at ``off``; return the offset just after it."""
    _ARP.pack_into(buf, off, HTYPE_ETHERNET, PTYPE_IPV4, 6, 4, op, sha, spa, tha, tpa)
    return off + ARP_LEN
