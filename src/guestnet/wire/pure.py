"""The per-frame leaf operations in Python: the fallback of the C extension (``_native.c``).

Theory of operation
-------------------
The datapath's per-packet cost in Python is mostly per call and per object (a dozen ints from a
``struct`` unpack, slices, a checksum computed as one big integer), so a few leaf operations have
a C implementation (``src/guestnet/wire/_native.c``) and this one, with identical results:

- :func:`ones_sum`, :func:`checksum`, :func:`pseudo_sum`: the Internet checksum (RFC 1071). The
  ones'-complement sum of 16-bit big-endian words equals the buffer read as one big integer
  modulo 0xffff (2**16 == 1 mod 0xffff), which CPython computes in C: about 0.5 us at 64
  bytes, 3 us at 1.5 KiB, 110 us at 64 KiB (``bench/bench_checksum.py``).
- :func:`tcp_fast4`, :func:`tcp_fast6`: the classifier's test for a segment of an established
  TCP flow (see :mod:`guestnet.core.classifier`), and its fields.
- :func:`udp_fast4`, :func:`udp_fast6`: the classifier's test for a plain unicast IPv4 or IPv6
  UDP datagram from the port's guest (the UDP NAT's per-datagram path and the DNS service's),
  and its fields.
- :func:`fast_parse`: the four above in one call, the one the ethertype and protocol name,
  its result tagged with its kind: what the classifier calls once per frame.
- :func:`dns_question`: a plain DNS query's id and question, for the forwarder (a query that
  is not plain goes to :func:`guestnet.wire.dns.parse_query`).
- :func:`parse_ipv4`: the IPv4 header's fields and checks (:func:`guestnet.wire.ipv4.parse_ipv4`).
- :func:`tcp_options`: the options of a SYN or SYN-ACK from the guest
  (:func:`guestnet.wire.tcp.parse_tcp_options`): a loop over bytes, ~3 us in Python on every
  connection's critical path.
- :func:`build_tcp_frame`, :func:`build_udp_frame`: Ethernet, IP and TCP or UDP headers with
  their checksums in front of a payload already in place: every TCP segment and UDP datagram
  guestnet sends a guest.

:mod:`guestnet.wire.native` picks one implementation at import; ``tests/unit/test_native.py``
checks that both give the same bytes, tuples and errors for random and malformed frames. The
functions take positional arguments only, as the C ones do. This module imports nothing from
the rest of the package but :class:`~guestnet.wire.WireError`, so every wire module can use it.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from typing import Any

from guestnet.wire import WireError

Buffer = bytes | bytearray | memoryview
#: One established-flow TCP segment from the guest, as the TCP NAT's fast path takes it: the
#: segment (a view into the frame), source and destination address, ports, sequence and
#: acknowledgement numbers, TCP header length, flags, window.
FastTcp = tuple[memoryview, bytes, bytes, int, int, int, int, int, int, int]
#: One unicast IPv4/UDP datagram from the guest, as the classifier's UDP fast path takes it:
#: source and destination address, ports, and the payload (a view into the frame).
FastUdp = tuple[bytes, bytes, int, int, memoryview]
#: The kinds :func:`fast_parse` puts first in its tuple: which of the four parses took the frame.
FAST_TCP4 = 0
FAST_TCP6 = 1
FAST_UDP4 = 2
FAST_UDP6 = 3
#: (kind, *fields): the kind, then :data:`FastTcp`'s or :data:`FastUdp`'s fields (typed loosely:
#: the caller unpacks it by kind).
FastFrame = tuple[Any, ...]
#: The same, precisely, as the parses below build them.
TaggedTcp = tuple[int, memoryview, bytes, bytes, int, int, int, int, int, int, int]
TaggedUdp = tuple[int, bytes, bytes, int, int, memoryview]
#: A plain DNS query, as the DNS forwarder takes it: its id, its question (the name in wire form
#: lowered, type and class) and the name's length in it.
DnsQuestion = tuple[int, bytes, int]
#: The fields of :class:`guestnet.wire.ipv4.IPv4Header`, in order.
Ipv4Fields = tuple[int, int, int, int, int, int, int, bytes, bytes]
#: The fields of :class:`guestnet.wire.tcp.TcpOptions`, in order: MSS, window scale (at most
#: 14), SACK permitted, (TSval, TSecr).
TcpOptionFields = tuple[int | None, int | None, bool, tuple[int, int] | None]


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: Buffer, initial: int = 0, /) -> int:
    """The 16-bit ones'-complement sum of ``data`` plus ``initial`` (not complemented).

    An odd length is padded with a zero byte, as RFC 1071 says.
    """
    if len(data) & 1:
        value = int.from_bytes(data, "big") << 8
    else:
        value = int.from_bytes(data, "big")
    if value == 0:
        return _fold(initial)
    rem = value % 0xFFFF
    return _fold((rem if rem else 0xFFFF) + initial)


def checksum(data: Buffer, initial: int = 0, /) -> int:
    """The Internet checksum of ``data``: the complement of its ones'-complement sum."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int, /) -> int:
    """Ones'-complement sum of the TCP/UDP pseudo-header (not complemented), for either family.

    The IPv4 pseudo-header (RFC 768) and the IPv6 one (RFC 8200 8.1) hold the same words: source
    and destination (4 or 16 bytes each), the protocol (next header) and the L4 length; only
    their order and padding differ, which a ones'-complement sum does not see. The addresses are
    summed as one big integer modulo 0xffff, which also beats four 16-bit slices for IPv4.
    """
    return _fold(int.from_bytes(src + dst, "big") % 0xFFFF + proto + length)


#: Ethernet, IPv4 (no options) and the first 16 bytes of TCP in one unpack: dst MAC, src MAC,
#: ethertype, version/IHL, total length, flags/fragment, protocol, src, dst, ports, seq, ack,
#: data offset, flags, window.
_FAST4 = struct.Struct("!6s6sHBxHxxHxBxx4s4sHHIIBBH")
#: The same for IPv6 (a 40-byte header whose next header is TCP, no extension header): dst MAC,
#: src MAC, ethertype, version/class/flow label, payload length, next header, hop limit, src,
#: dst, ports, seq, ack, data offset, flags, window.
_FAST6 = struct.Struct("!6s6sHIHBx16s16sHHIIBBH")


def _tcp4(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    dns_dsts: Container[bytes],
    verify: bool,
    /,
) -> TaggedTcp | None:
    """:func:`tcp_fast4`, its result tagged ``FAST_TCP4`` (what :func:`fast_parse` returns)."""
    if len(frame) < 54:
        return None
    (dst, src, etype, vihl, total_len, frag, proto, sip, dip, sport, dport, seq, ack, off,
     flags, window) = _FAST4.unpack_from(frame, 0)  # fmt: skip
    hlen = (off >> 4) * 4
    if (
        etype == 0x0800
        and vihl == 0x45
        and proto == 6
        and not frag & 0x3FFF
        and dst == our_mac
        and src == guest_mac
        and 40 <= total_len <= len(frame) - 14
        and 20 <= hlen <= total_len - 20
        and dip[0] < 224
        and dip != broadcast
        and (dport != 53 or dip not in dns_dsts)
        and int.from_bytes(frame[14:34], "big") % 0xFFFF == 0
        and (
            not verify
            or checksum(frame[34 : 14 + total_len], pseudo_sum(sip, dip, 6, total_len - 20)) == 0
        )
    ):
        return (FAST_TCP4, frame[34 : 14 + total_len], sip, dip, sport, dport, seq, ack, hlen,
                flags, window)  # fmt: skip
    return None


def tcp_fast4(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    dns_dsts: Container[bytes],
    verify: bool,
    /,
) -> FastTcp | None:
    """The fields of a unicast IPv4/TCP frame to ``our_mac`` from ``guest_mac`` whose header
    has no options and a valid checksum, not a fragment, not to ``broadcast`` nor to port 53
    of an address in ``dns_dsts``, with a valid TCP checksum where ``verify`` (a link that does
    not vouch for it); else None. Never raises on any frame."""
    r = _tcp4(frame, our_mac, guest_mac, broadcast, dns_dsts, verify)
    return None if r is None else r[1:]


def _tcp6(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    dns6_dsts: Container[bytes],
    verify: bool,
    /,
) -> TaggedTcp | None:
    """:func:`tcp_fast6`, its result tagged ``FAST_TCP6`` (what :func:`fast_parse` returns)."""
    if len(frame) < 74:
        return None
    (dst, src, etype, vtf, plen, nh, sip, dip, sport, dport, seq, ack, off, flags,
     window) = _FAST6.unpack_from(frame, 0)  # fmt: skip
    hlen = (off >> 4) * 4
    if (
        etype == 0x86DD
        and nh == 6
        and vtf >> 28 == 6
        and dst == our_mac
        and src == guest_mac
        and 20 <= hlen <= plen <= len(frame) - 54
        and dip[0] != 0xFF
        and (dport != 53 or dip not in dns6_dsts)
        and (not verify or checksum(frame[54 : 54 + plen], pseudo_sum(sip, dip, 6, plen)) == 0)
    ):
        return (
            FAST_TCP6,
            frame[54 : 54 + plen],
            sip,
            dip,
            sport,
            dport,
            seq,
            ack,
            hlen,
            flags,
            window,
        )
    return None


def tcp_fast6(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    dns6_dsts: Container[bytes],
    verify: bool,
    /,
) -> FastTcp | None:
    """The same for IPv6: TCP right after a bare 40-byte header, to a unicast address, not to
    port 53 of an address in ``dns6_dsts``, checksum verified where ``verify``; else None.
    Never raises on any frame."""
    r = _tcp6(frame, our_mac, guest_mac, dns6_dsts, verify)
    return None if r is None else r[1:]


#: Ethernet, IPv4 (no options) and UDP in one unpack: dst MAC, src MAC, ethertype,
#: version/IHL, total length, flags/fragment, protocol, src, dst, ports, UDP length, checksum.
_UFAST4 = struct.Struct("!6s6sHBxHxxHxBxx4s4sHHHH")
#: The largest frame a link may deliver (the classifier's MAX_FRAME): a 64 KiB IP packet plus
#: Ethernet and a VLAN tag; the ordinary path drops larger ones (eth.giant).
MAX_FRAME = 14 + 4 + 65535


def _udp4(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    verify: bool,
    /,
) -> TaggedUdp | None:
    """:func:`udp_fast4`, its result tagged ``FAST_UDP4`` (what :func:`fast_parse` returns)."""
    n = len(frame)
    if n < 42 or n > MAX_FRAME:
        return None
    (dst, src, etype, vihl, total_len, frag, proto, sip, dip, sport, dport, ulen,
     csum) = _UFAST4.unpack_from(frame, 0)  # fmt: skip
    if (
        etype == 0x0800
        and vihl == 0x45
        and proto == 17
        and not frag & 0x3FFF
        and dst == our_mac
        and src == guest_mac
        and 28 <= total_len <= n - 14
        and 8 <= ulen <= total_len - 20
        and dip[0] < 224
        and dip != broadcast
        and int.from_bytes(frame[14:34], "big") % 0xFFFF == 0
        and (
            not verify
            or csum == 0
            or checksum(frame[34 : 34 + ulen], pseudo_sum(sip, dip, 17, ulen)) == 0
        )
    ):
        return (FAST_UDP4, sip, dip, sport, dport, frame[42 : 34 + ulen])
    return None


def udp_fast4(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    verify: bool,
    /,
) -> FastUdp | None:
    """The fields of a unicast IPv4/UDP frame to ``our_mac`` from ``guest_mac`` whose IP header
    has no options and a valid checksum, not a fragment, whose UDP length fits the IP packet,
    not to a multicast, reserved or broadcast address nor to ``broadcast``, with a valid UDP
    checksum (or none: 0) where ``verify``; else None. The payload is the UDP length's worth
    (IP or Ethernet padding after it left out). Never raises on any frame."""
    r = _udp4(frame, our_mac, guest_mac, broadcast, verify)
    return None if r is None else r[1:]


#: Ethernet, a bare IPv6 header and UDP in one unpack: dst MAC, src MAC, ethertype,
#: version/class/flow label, payload length, next header, src, dst, ports, UDP length, checksum.
_UFAST6 = struct.Struct("!6s6sHIHBx16s16sHHHH")
_UNSPECIFIED6 = bytes(16)


def _udp6(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    verify: bool,
    /,
) -> TaggedUdp | None:
    """:func:`udp_fast6`, its result tagged ``FAST_UDP6`` (what :func:`fast_parse` returns)."""
    n = len(frame)
    if n < 62 or n > MAX_FRAME:
        return None
    (dst, src, etype, vtf, plen, nh, sip, dip, sport, dport, ulen,
     csum) = _UFAST6.unpack_from(frame, 0)  # fmt: skip
    if (
        etype == 0x86DD
        and vtf >> 28 == 6
        and nh == 17
        and dst == our_mac
        and src == guest_mac
        and 8 <= ulen <= plen <= n - 54
        and sip[0] != 0xFF
        and dip[0] != 0xFF
        and dip != _UNSPECIFIED6
        and (
            not verify
            or (csum != 0 and checksum(frame[54 : 54 + ulen], pseudo_sum(sip, dip, 17, ulen)) == 0)
        )
    ):
        return (FAST_UDP6, sip, dip, sport, dport, frame[62 : 54 + ulen])
    return None


def udp_fast6(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    verify: bool,
    /,
) -> FastUdp | None:
    """The same for IPv6: UDP right after a bare 40-byte header (no extension header), from
    ``guest_mac`` to ``our_mac``, the UDP length inside the payload length and that inside the
    frame, the source not multicast, the destination neither multicast nor unspecified, and
    where ``verify`` a checksum present (IPv6 makes it mandatory) and valid; else None. The
    payload is the UDP length's worth. Never raises on any frame."""
    r = _udp6(frame, our_mac, guest_mac, verify)
    return None if r is None else r[1:]


def fast_parse(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    dns_dsts: Container[bytes],
    dns6_dsts: Container[bytes],
    verify: bool,
    /,
) -> FastFrame | None:
    """The one of :func:`tcp_fast4`, :func:`tcp_fast6`, :func:`udp_fast4`, :func:`udp_fast6`
    that the frame's ethertype and IP protocol (next header) name, as ``(kind, *its fields)``,
    or None. Their conditions exclude one another (each wants its own ethertype and protocol),
    so this is the first of the four, applied in that order, that is not None; the classifier
    makes one call per frame instead of up to four that each check Ethernet, MACs and lengths
    again. Never raises on any frame."""
    if len(frame) < 42:
        return None
    # The low byte of the ethertype tells IPv4 (0x0800) from IPv6 (0x86dd); each parse checks
    # the whole of it, and its protocol, again.
    low = frame[13]
    if low == 0x00:
        proto = frame[23]
        if proto == 17:
            return _udp4(frame, our_mac, guest_mac, broadcast, verify)
        if proto == 6:
            return _tcp4(frame, our_mac, guest_mac, broadcast, dns_dsts, verify)
    elif low == 0xDD:
        nh = frame[20]
        if nh == 17:
            return _udp6(frame, our_mac, guest_mac, verify)
        if nh == 6:
            return _tcp6(frame, our_mac, guest_mac, dns6_dsts, verify)
    return None


_DNS_HDR = struct.Struct("!HHHHHH")


def dns_question(data: Buffer, /) -> DnsQuestion | None:
    """The id, question and name length of a plain DNS query, or None for anything else.

    Plain: a query (QR clear, opcode QUERY) with exactly one question whose name is
    uncompressed labels (at most 255 bytes in wire form), no answer or authority records, and
    either no additional record or one OPT record whose owner is the root, every length within
    the message and nothing after it: what resolvers send. Such a message is well formed for
    :func:`guestnet.wire.dns.parse_query` too, which reads the same question. The question
    comes back as the DNS forwarder matches answers on it: the name in wire form lowered
    (ASCII, RFC 4343), then type and class as sent; ``name_len`` is the name's part of it.
    Anything else (None) goes to the full parser, which says what is wrong or answers it."""
    n = len(data)
    if n < 12:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = _DNS_HDR.unpack_from(data, 0)
    if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    off = 12
    while True:
        if off >= n:
            return None
        length = data[off]
        if length == 0:
            break
        if length >= 0x40:
            return None
        off += 1 + length
        if off - 12 >= 255:
            return None
    name_end = off + 1
    off = name_end + 4
    if off > n:
        return None
    if arcount:
        if off + 11 > n or data[off] != 0 or ((data[off + 1] << 8) | data[off + 2]) != 41:
            return None
        off += 11 + ((data[off + 9] << 8) | data[off + 10])
    if off != n:
        return None
    question = bytes(data[12:name_end]).lower() + bytes(data[name_end : name_end + 4])
    return (ident, question, name_end - 12)


_IPV4 = struct.Struct("!BBHHHBBH4s4s")


def parse_ipv4(data: Buffer, verify: bool, /) -> Ipv4Fields:
    """The fields of the IPv4 header at the start of ``data`` (which may carry Ethernet
    padding), ``total_len`` checked against what is there and the header checksum verified
    unless ``verify`` is False; WireError otherwise."""
    if len(data) < 20:
        raise WireError("ipv4.truncated")
    vihl, tos, total_len, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(data, 0)
    if vihl >> 4 != 4:
        raise WireError("ipv4.bad_version")
    header_len = (vihl & 0x0F) * 4
    if header_len < 20:
        raise WireError("ipv4.bad_header_length")
    if total_len < header_len or total_len > len(data):
        raise WireError("ipv4.bad_total_length")
    if verify and checksum(data[:header_len]) != 0:
        raise WireError("ipv4.bad_checksum")
    return (header_len, tos, total_len, ident, frag, ttl, proto, src, dst)


#: Ethernet + IPv4 (20 bytes) + TCP (20 bytes), or + UDP (8 bytes), in one pack each; the same
#: with IPv6 (40 bytes). The TCP/UDP checksum field is written afterwards.
_ETH_IP4_TCP = struct.Struct("!6s6sH BBHHHBBH4s4s HHIIBBHHH")
_ETH_IP6_TCP = struct.Struct("!6s6sH IHBB16s16s HHIIBBHHH")
_ETH_IP4_UDP = struct.Struct("!6s6sH BBHHHBBH4s4s HHHH")
_ETH_IP6_UDP = struct.Struct("!6s6sH IHBB16s16s HHHH")
_ZEROS = bytes(60)


def build_tcp_frame(
    buf: memoryview | bytearray,
    start: int,
    version: int,
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    ident: int,
    plen: int,
    options: bytes,
    partial: bool,
    /,
) -> int:
    """Ethernet, IP (``version`` 4 or 6; DF, hop limit 64, ``ident``) and TCP headers at
    ``start`` for the ``plen`` payload bytes already after them (``options``, a multiple of 4
    bytes, only without payload), padded to 60 bytes; return the frame length.

    With ``partial`` the checksum field holds the pseudo-header sum only, for a link that
    completes it (virtio-net ``NEEDS_CSUM``); else the full TCP checksum. The IPv4 header
    checksum is computed from the fields (the addresses' sum serves the pseudo-header too), so
    the headers are one ``pack_into``.
    """
    if version != 4 and version != 6:
        raise ValueError("version must be 4 or 6")
    v6 = version == 6
    nopt = len(options)
    if nopt > 40 or nopt & 3:
        raise ValueError("TCP options must be a multiple of 4, at most 40")
    alen = 16 if v6 else 4
    if len(dst_mac) != 6 or len(src_mac) != 6 or len(src) != alen or len(dst) != alen:
        raise ValueError("a MAC must be 6 bytes and an address 4 or 16")
    hlen = 20 + nopt
    tcp_len = hlen + plen
    if plen < 0 or tcp_len > (65535 if v6 else 65515):
        raise OverflowError("segment too long for one IP packet")
    tcp = start + (54 if v6 else 34)
    length = tcp - start + tcp_len
    if start < 0 or start + (length if length > 60 else 60) > len(buf):
        raise ValueError("frame does not fit the buffer")
    addrs = int.from_bytes(src + dst, "big") % 0xFFFF
    off = (hlen >> 2) << 4
    if v6:
        _ETH_IP6_TCP.pack_into(
            buf, start, dst_mac, src_mac, 0x86DD, 6 << 28, tcp_len, 6, 64, src, dst,
            sport, dport, seq, ack, off, flags, window, 0, 0,
        )  # fmt: skip
    else:
        total = 20 + tcp_len
        # The header's words: 0x4500, total, ident, DF, TTL 64 and protocol 6, the addresses.
        ipsum = -(0x4500 + total + ident + 0x4000 + 0x4006 + addrs) % 0xFFFF
        _ETH_IP4_TCP.pack_into(
            buf, start, dst_mac, src_mac, 0x0800, 0x45, 0, total, ident, 0x4000, 64, 6, ipsum,
            src, dst, sport, dport, seq, ack, off, flags, window, 0, 0,
        )  # fmt: skip
    if nopt:
        buf[tcp + 20 : tcp + hlen] = options
    csum = _fold(addrs + 6 + tcp_len)
    if not partial:
        csum = checksum(buf[tcp : tcp + tcp_len], csum)
    buf[tcp + 16] = csum >> 8
    buf[tcp + 17] = csum & 0xFF
    if length < 60:
        buf[start + length : start + 60] = _ZEROS[: 60 - length]
        length = 60
    return length


def build_udp_frame(
    buf: memoryview | bytearray,
    start: int,
    version: int,
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload_len: int,
    ident: int,
    dont_fragment: bool,
    /,
) -> int:
    """Ethernet, IP (``version`` 4 or 6, hop limit 64, ``ident`` and DF as given) and UDP
    headers at ``start`` for the payload already after them; return the frame length.

    The UDP checksum covers the pseudo-header and the payload; a computed 0 is sent as 0xffff,
    since 0 means "no checksum".
    """
    if version != 4 and version != 6:
        raise ValueError("version must be 4 or 6")
    v6 = version == 6
    l4_len = 8 + payload_len
    if not 0 <= payload_len <= 0xFFFF - 8 or (not v6 and l4_len > 65515):
        raise OverflowError("datagram too long for one IP packet")
    alen = 16 if v6 else 4
    if len(dst_mac) != 6 or len(src_mac) != 6 or len(src) != alen or len(dst) != alen:
        raise ValueError("a MAC must be 6 bytes and an address 4 or 16")
    udp = start + (54 if v6 else 34)
    length = udp - start + l4_len
    if start < 0 or start + length > len(buf):
        raise ValueError("frame does not fit the buffer")
    addrs = int.from_bytes(src + dst, "big") % 0xFFFF
    if v6:
        _ETH_IP6_UDP.pack_into(
            buf, start, dst_mac, src_mac, 0x86DD, 6 << 28, l4_len, 17, 64, src, dst,
            sport, dport, l4_len, 0,
        )  # fmt: skip
    else:
        total = 20 + l4_len
        frag = 0x4000 if dont_fragment else 0
        ipsum = -(0x4500 + total + ident + frag + 0x4011 + addrs) % 0xFFFF
        _ETH_IP4_UDP.pack_into(
            buf, start, dst_mac, src_mac, 0x0800, 0x45, 0, total, ident, frag, 64, 17, ipsum,
            src, dst, sport, dport, l4_len, 0,
        )  # fmt: skip
    csum = checksum(buf[udp : udp + l4_len], _fold(addrs + 17 + l4_len)) or 0xFFFF
    buf[udp + 6] = csum >> 8
    buf[udp + 7] = csum & 0xFF
    return length


_TS = struct.Struct("!II")


def tcp_options(data: Buffer, header_len: int, /) -> TcpOptionFields:
    """The options between byte 20 and ``header_len`` of the TCP segment ``data``: MSS,
    window scale (capped at 14, RFC 7323 2.3), SACK permitted and the timestamps; unknown
    kinds are skipped, an option that runs past the header is ``WireError("tcp.bad_option")``.
    ``header_len`` beyond ``data`` is a ValueError (callers pass a checked one)."""
    if header_len > len(data):
        raise ValueError("header_len beyond the segment")
    mss: int | None = None
    wscale: int | None = None
    sack = False
    ts: tuple[int, int] | None = None
    i = 20
    while i < header_len:
        kind = data[i]
        if kind == 0:  # end of options
            break
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= header_len:
            raise WireError("tcp.bad_option")
        olen = data[i + 1]
        if olen < 2 or i + olen > header_len:
            raise WireError("tcp.bad_option")
        if kind == 2 and olen == 4:
            mss = (data[i + 2] << 8) | data[i + 3]
        elif kind == 3 and olen == 3:
            wscale = min(data[i + 2], 14)
        elif kind == 4 and olen == 2:
            sack = True
        elif kind == 8 and olen == 10:
            ts = _TS.unpack_from(data, i + 2)
        i += olen
    return mss, wscale, sack, ts
