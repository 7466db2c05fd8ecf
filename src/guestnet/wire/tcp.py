"""TCP headers and options (RFC 9293, RFC 7323 window scaling and timestamps)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ipv4 import PROTO_TCP
from guestnet.wire.native import tcp_options

TCP_HLEN = 20

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_HDR = struct.Struct("!HHIIBBHHH")
#: ``tuple.__new__``: a :class:`TcpOptions` from the tuple of its fields.
_new = tuple.__new__


class TcpHeader(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    header_len: int
    flags: int
    window: int
    checksum: int
    urgent: int


class TcpOptions(NamedTuple):
    mss: int | None
    wscale: int | None
    sack_permitted: bool
    #: (TSval, TSecr) when the timestamp option is present.
    timestamp: tuple[int, int] | None


def parse_tcp(data: memoryview | bytes) -> TcpHeader:
    """Parse a TCP header; ``data`` is the whole segment (IP payload, no padding)."""
    if len(data) < TCP_HLEN:
        raise WireError("tcp.truncated")
    sport, dport, seq, ack, off_byte, flags, window, csum, urgent = _HDR.unpack_from(data, 0)
    header_len = (off_byte >> 4) * 4
    if header_len < TCP_HLEN or header_len > len(data):
        raise WireError("tcp.bad_header_length")
    return TcpHeader(sport, dport, seq, ack, header_len, flags, window, csum, urgent)


def parse_tcp_options(data: memoryview | bytes, header_len: int) -> TcpOptions:
    """Parse the options between byte 20 and ``header_len``; unknown kinds are skipped.

    The loop runs in :func:`guestnet.wire.native.tcp_options` (C, or its Python twin).
    """
    return _new(TcpOptions, tcp_options(data, header_len))


def verify_tcp(data: memoryview | bytes, src: bytes, dst: bytes) -> bool:
    """True if the segment's checksum is right."""
    n = len(data)
    return checksum(data, pseudo_header_sum(src, dst, PROTO_TCP, n)) == 0


def build_syn_options(mss: int, wscale: int | None) -> bytes:
    """Options for a SYN or SYN-ACK: MSS, then window scale when offered (padded to 4)."""
    opts = struct.pack("!BBH", OPT_MSS, 4, mss)
    if wscale is not None:
        opts += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale)
    return opts


def build_tcp(
    buf: memoryview | bytearray,
    off: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload_len: int,
    src: bytes,
    dst: bytes,
    options: bytes = b"",
    compute_checksum: bool = True,
) -> int:
    """Write a TCP header (and options) at ``off`` for a payload already in place after it.

    The payload must already sit at ``off + 20 + len(options)``. Returns the end of the segment.
    With ``compute_checksum`` False the checksum field holds the pseudo-header sum only, as a
    virtio-net ``NEEDS_CSUM`` frame expects.
    """
    hlen = TCP_HLEN + len(options)
    _HDR.pack_into(buf, off, sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, 0)
    if options:
        buf[off + TCP_HLEN : off + hlen] = options
    seg_len = hlen + payload_len
    psum = pseudo_header_sum(src, dst, PROTO_TCP, seg_len)
    if compute_checksum:
        csum = checksum(memoryview(buf)[off : off + seg_len], psum)
    else:
        csum = psum
    struct.pack_into("!H", buf, off + 16, csum)
    return off + seg_len
