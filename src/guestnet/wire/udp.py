"""UDP headers (RFC 768)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ipv4 import PROTO_UDP

UDP_HLEN = 8
#: DNS (RFC 1035), over UDP and TCP alike: the port the classifier hands to the DNS service.
DNS_PORT = 53

_HDR = struct.Struct("!HHHH")


class UdpHeader(NamedTuple):
    sport: int
    dport: int
    #: UDP length field: header plus payload.
    length: int
    checksum: int


def parse_udp(data: memoryview | bytes) -> UdpHeader:
    """Parse a UDP header; ``data`` is the IP payload (exactly, without padding)."""
    if len(data) < UDP_HLEN:
        raise WireError("udp.truncated")
    sport, dport, length, csum = _HDR.unpack_from(data, 0)
    if length < UDP_HLEN or length > len(data):
        raise WireError("udp.bad_length")
    return UdpHeader(sport, dport, length, csum)


def verify_udp(data: memoryview | bytes, src: bytes, dst: bytes, length: int) -> bool:
    """True if the datagram's checksum is right, or absent (0 means none in IPv4)."""
    if data[6] == 0 and data[7] == 0:
        return True
    return checksum(data[:length], pseudo_header_sum(src, dst, PROTO_UDP, length)) == 0


def build_udp(
    buf: memoryview | bytearray,
    off: int,
    sport: int,
    dport: int,
    payload_len: int,
    src: bytes,
    dst: bytes,
    compute_checksum: bool = True,
) -> int:
    """Write a UDP header at ``off`` for a payload already in place after it.

    The checksum covers the pseudo-header and the payload; a computed 0 is sent as 0xffff, since
    0 means "no checksum". Returns the payload offset.
    """
    length = UDP_HLEN + payload_len
    _HDR.pack_into(buf, off, sport, dport, length, 0)
    if compute_checksum:
        view = memoryview(buf)
        csum = checksum(view[off : off + length], pseudo_header_sum(src, dst, PROTO_UDP, length))
        struct.pack_into("!H", buf, off + 6, csum or 0xFFFF)
    return off + UDP_HLEN
