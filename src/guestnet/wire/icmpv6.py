"""ICMPv6 (RFC 4443) and Neighbor Discovery messages and options (RFC 4861, 8106).

Theory of operation
-------------------
Every ICMPv6 message starts with type, code and a checksum over the IPv6 pseudo-header (source,
destination, length, next header 58) and the message: unlike ICMPv4, a message cannot be checked
or written without its addresses, so :func:`parse_icmpv6` and :func:`build_icmpv6` take them.

Neighbor Discovery messages carry a fixed part (:data:`NDP_FIXED_LEN`) and then *options*, each
a type, a length in 8-byte units (0 is invalid: a receiver must drop the whole message) and a
value. :func:`parse_ndp_options` checks the chain and returns the options in order;
``ndp_option_*`` build one option each, as bytes, since guestnet's options are computed once
from the configuration and copied into each message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ipv6 import PROTO_ICMPV6

ICMPV6_HLEN = 8

ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAM_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
MLD_QUERY = 130
MLD_REPORT = 131
MLD_DONE = 132
MLD2_REPORT = 143
ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_REDIRECT = 137
#: The Neighbor Discovery types (Router Solicitation .. Redirect).
NDP_TYPES = frozenset(range(ND_ROUTER_SOLICIT, ND_REDIRECT + 1))
#: Multicast Listener Discovery (RFC 2710, 3810): group membership, nothing for guestnet to do.
MLD_TYPES = frozenset((MLD_QUERY, MLD_REPORT, MLD_DONE, MLD2_REPORT))
#: Every Neighbor Discovery message is sent with this hop limit and dropped with any other.
NDP_HOP_LIMIT = 255

#: Length of each NDP message's fixed part, header included: options start there.
NDP_FIXED_LEN = {
    ND_ROUTER_SOLICIT: 8,
    ND_ROUTER_ADVERT: 16,
    ND_NEIGHBOR_SOLICIT: 24,
    ND_NEIGHBOR_ADVERT: 24,
    ND_REDIRECT: 40,
}

OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
OPT_PREFIX_INFO = 3
OPT_REDIRECTED = 4
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

#: Neighbor Advertisement flags (first byte after the checksum).
NA_ROUTER = 0x80
NA_SOLICITED = 0x40
NA_OVERRIDE = 0x20
#: Router Advertisement flags: M (addresses by DHCPv6) and O (other configuration by DHCPv6).
RA_MANAGED = 0x80
RA_OTHER = 0x40
#: Prefix information flags: L (on-link) and A (autonomous: hosts form addresses by SLAAC).
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40

_HDR = struct.Struct("!BBHHH")
_RA = struct.Struct("!BBHBBHII")
_PREFIX = struct.Struct("!BBBBIII16s")


class Icmpv6Header(NamedTuple):
    type: int
    code: int
    checksum: int
    #: For echo: identifier and sequence; otherwise the first 4 bytes of the body, in two.
    ident: int
    seq: int


def icmpv6_checksum(data: memoryview | bytes | bytearray, src: bytes, dst: bytes) -> int:
    """The checksum field ``data`` (a whole message, its own field zero or not) needs or has."""
    return checksum(data, pseudo_header_sum(src, dst, PROTO_ICMPV6, len(data)))


def parse_icmpv6(
    data: memoryview | bytes, src: bytes, dst: bytes, verify: bool = True
) -> Icmpv6Header:
    """Parse an ICMPv6 header; ``data`` is the whole message, sent from ``src`` to ``dst``."""
    if len(data) < ICMPV6_HLEN:
        raise WireError("icmp6.truncated")
    if verify and icmpv6_checksum(data, src, dst) != 0:
        raise WireError("icmp6.bad_checksum")
    return Icmpv6Header(*_HDR.unpack_from(data, 0))


def build_icmpv6(
    buf: memoryview | bytearray,
    off: int,
    type_: int,
    code: int,
    word1: int,
    word2: int,
    body_len: int,
    src: bytes,
    dst: bytes,
) -> int:
    """Write an ICMPv6 header at ``off`` for a body already in place after it, with the checksum
    over the pseudo-header of ``src`` -> ``dst``; return the end. ``word1``/``word2`` are the
    two 16-bit words after the checksum (echo identifier and sequence; NDP flags and reserved)."""
    _HDR.pack_into(buf, off, type_, code, 0, word1, word2)
    end = off + ICMPV6_HLEN + body_len
    struct.pack_into("!H", buf, off + 2, icmpv6_checksum(memoryview(buf)[off:end], src, dst))
    return end


def set_icmpv6_checksum(
    buf: memoryview | bytearray, off: int, end: int, src: bytes, dst: bytes
) -> int:
    """Fill in the checksum of the message already written at ``buf[off:end]``; return ``end``.

    For messages written whole from a template (NDP), whose checksum field may hold anything.
    """
    struct.pack_into("!H", buf, off + 2, 0)
    struct.pack_into("!H", buf, off + 2, icmpv6_checksum(memoryview(buf)[off:end], src, dst))
    return end


# -- Neighbor Discovery options ------------------------------------------------------------------


class NdpOption(NamedTuple):
    type: int
    #: The whole option, type and length bytes included (its length is a multiple of 8).
    data: memoryview


def parse_ndp_options(data: memoryview) -> list[NdpOption]:
    """The options of an NDP message (``data`` from the end of the fixed part).

    An option of length 0 or running past the message makes the whole message invalid
    (RFC 4861 4.6): WireError ``ndp.option.bad_length``.
    """
    out: list[NdpOption] = []
    off = 0
    n = len(data)
    while off < n:
        if off + 2 > n:
            raise WireError("ndp.option.bad_length")
        length = data[off + 1] * 8
        if length == 0 or off + length > n:
            raise WireError("ndp.option.bad_length")
        out.append(NdpOption(data[off], data[off : off + length]))
        off += length
    return out


def link_layer_option(options: Iterable[NdpOption], type_: int) -> bytes | None:
    """The MAC in the first source (1) or target (2) link-layer option of ``type_``, if any."""
    for opt in options:
        if opt.type == type_ and len(opt.data) >= 8:
            return bytes(opt.data[2:8])
    return None


def ndp_option_link_layer(type_: int, mac: bytes) -> bytes:
    """A source (1) or target (2) link-layer address option for an Ethernet ``mac``."""
    return bytes((type_, 1)) + mac


def ndp_option_prefix(
    prefix: bytes, prefix_len: int, flags: int, valid_s: int, preferred_s: int
) -> bytes:
    """A prefix information option (RFC 4861 4.6.2): 32 bytes."""
    return _PREFIX.pack(OPT_PREFIX_INFO, 4, prefix_len, flags, valid_s, preferred_s, 0, prefix)


def ndp_option_mtu(mtu: int) -> bytes:
    """An MTU option (RFC 4861 4.6.4): 8 bytes."""
    return struct.pack("!BBHI", OPT_MTU, 1, 0, mtu)


def ndp_option_rdnss(lifetime_s: int, servers: Iterable[bytes]) -> bytes:
    """A Recursive DNS Server option (RFC 8106 5.1): 8 bytes and 16 per server."""
    addrs = b"".join(servers)
    return struct.pack("!BBHI", OPT_RDNSS, 1 + len(addrs) // 8, 0, lifetime_s) + addrs


def ndp_option_dnssl(lifetime_s: int, domains: Iterable[str]) -> bytes:
    """A DNS Search List option (RFC 8106 5.2): the names in DNS wire form (no compression),
    zero-padded to a multiple of 8 bytes. ValueError for a name DNS cannot carry."""
    names = b"".join(encode_dns_name(d) for d in domains)
    body = names + bytes(-(8 + len(names)) % 8)
    return struct.pack("!BBHI", OPT_DNSSL, (8 + len(body)) // 8, 0, lifetime_s) + body


def encode_dns_name(name: str) -> bytes:
    """``example.com`` as DNS labels: ``\\x07example\\x03com\\x00``."""
    out = bytearray()
    for label in name.strip(".").split("."):
        raw = label.encode("idna") if label else b""
        if not 0 < len(raw) < 64:
            raise ValueError(f"not a DNS name: {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"DNS name too long: {name!r}")
    return bytes(out)


def ra_header(hop_limit: int, flags: int, router_lifetime_s: int) -> bytes:
    """The 16-byte fixed part of a Router Advertisement (RFC 4861 4.2), checksum 0, reachable
    time and retransmit timer 0 (unspecified: hosts keep their own defaults)."""
    return _RA.pack(ND_ROUTER_ADVERT, 0, 0, hop_limit, flags, router_lifetime_s, 0, 0)
