"""ICMPv4 messages (RFC 792): echo, and the errors guestnet sends."""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError
from guestnet.wire.checksum import checksum

ICMP_HLEN = 8
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11

UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_PROTOCOL = 2
UNREACH_PORT = 3
UNREACH_FRAG_NEEDED = 4
UNREACH_ADMIN_PROHIBITED = 13

_HDR = struct.Struct("!BBHHH")


class IcmpHeader(NamedTuple):
    type: int
    code: int
    checksum: int
    #: For echo: identifier and sequence; for errors, the "rest of header" split in two.
    ident: int
    seq: int


def parse_icmp(data: memoryview | bytes, verify: bool = True) -> IcmpHeader:
    """Parse an ICMP header; ``data`` is the whole ICMP message."""
    if len(data) < ICMP_HLEN:
        raise WireError("icmp.truncated")
    if verify and checksum(data) != 0:
        raise WireError("icmp.bad_checksum")
    return IcmpHeader(*_HDR.unpack_from(data, 0))


def build_icmp(
    buf: memoryview | bytearray,
    off: int,
    type_: int,
    code: int,
    ident: int,
    seq: int,
    body_len: int,
) -> int:
    """Write an ICMP header at ``off`` for a body already in place after it; return the end."""
    _HDR.pack_into(buf, off, type_, code, 0, ident, seq)
    end = off + ICMP_HLEN + body_len
    struct.pack_into("!H", buf, off + 2, checksum(memoryview(buf)[off:end]))
    return end
