"""Software segmentation of a guest's super-frames, for a port that cannot take them.

Theory of operation
-------------------
A TAP guest with offloads hands over *super-frames*: one Ethernet frame carrying up to a 64 KiB
IP packet, with a virtio-net header saying how the kernel would cut it (``gso_type`` TCPV4,
TCPV6 or UDP_L4 and ``gso_size``, the payload of each piece). Switched to another guest whose
link takes the same offload, the frame goes whole with that metadata and the receiving kernel
takes it as it is. A link that cannot (a QEMU stream or datagram connection, a TAP or vhost-user
guest without that offload) must get what the sender's kernel would have put on a wire: MTU-sized
packets with whole checksums. A Linux bridge does this in software for a port without the
offload (``skb_gso_segment``), and so does the switch here, through this module:

- :mod:`guestnet.core.tso` cuts a TCP super-frame into segments: each gets its own sequence
  number, FIN and PSH only on the last, CWR only on the first, and a whole TCP checksum;
- :mod:`guestnet.core.uso` cuts a UDP super-frame into datagrams, each with its own UDP length
  and checksum.

This module holds what both share: the IP layer of a super-frame (:func:`ip_layer`: IPv4 or
IPv6, where the L4 header starts, where the packet ends, checked), the number of pieces
(:func:`piece_count`, which refuses a ``gso_size`` of 0, pieces that would not fit the link's
MTU, and more than :data:`MAX_SEGMENTS` of them), and the per-piece fix of the IP header
(:func:`fix_ip`: total length, identification and header checksum for IPv4, as the kernel's own
segmentation numbers them one after another; payload length for IPv6), and the copying of each
piece into its frame (:func:`pieces`).

Every piece is written into its own pooled frame (one copy of the headers and of its slice of
the payload) and handed to ``emit``, which takes ownership (the switch's port send). A bad
super-frame raises :class:`~guestnet.wire.WireError` before the first frame is taken, so a drop
never leaves anything sent or checked out. Sans-I/O: bytes in, frames out.

Only the headers Linux builds for a super-frame are taken: an IPv4 header (options allowed) that
is not a fragment, or a 40-byte IPv6 header followed directly by TCP or UDP (no extension
headers). Anything else with a ``gso_type`` is a counted drop.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum
from guestnet.wire.ethernet import ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6
from guestnet.wire.ipv4 import FLAG_MF, FRAG_OFFSET_MASK, IPV4_HLEN
from guestnet.wire.ipv6 import IPV6_HLEN

#: virtio-net ``gso_type`` values (linux/virtio_net.h); ECN may be or-ed onto the TCP ones.
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
#: Most pieces one super-frame may be cut into: more than Linux ever makes (its smallest TCP
#: MSS, 48 bytes, cuts a 64 KiB packet into 1,366; UDP_SEGMENT allows 128 datagrams). It bounds
#: the frames one guest frame can make us send.
MAX_SEGMENTS = 2048

_U16 = struct.Struct("!H")


def ip_layer(data: memoryview, proto: int, version: int) -> tuple[int, int]:
    """``(l4_at, end)`` of the IP packet in Ethernet super-frame ``data``: where its ``proto``
    header starts and where the packet ends (both from the frame's start).

    ``version`` (4 or 6) is what the ``gso_type`` says. WireError for another version, a
    fragment, a packet longer than the frame, another protocol or (IPv6) extension headers.
    """
    n = len(data)
    if n < ETH_HLEN + IPV4_HLEN:
        raise WireError("gso.truncated")
    ethertype = (data[12] << 8) | data[13]
    vh = data[ETH_HLEN]
    if version == 4:
        if ethertype != ETHERTYPE_IPV4 or vh >> 4 != 4:
            raise WireError("gso.family")
        ihl = (vh & 0x0F) * 4
        total = (data[ETH_HLEN + 2] << 8) | data[ETH_HLEN + 3]
        if ihl < IPV4_HLEN or total < ihl or ETH_HLEN + total > n:
            raise WireError("gso.ipv4.bad_header")
        frag = (data[ETH_HLEN + 6] << 8) | data[ETH_HLEN + 7]
        if frag & (FLAG_MF | FRAG_OFFSET_MASK):
            raise WireError("gso.ipv4.fragment")
        if data[ETH_HLEN + 9] != proto:
            raise WireError("gso.proto")
        return ETH_HLEN + ihl, ETH_HLEN + total
    if ethertype != ETHERTYPE_IPV6 or vh >> 4 != 6 or n < ETH_HLEN + IPV6_HLEN:
        raise WireError("gso.family")
    plen = (data[ETH_HLEN + 4] << 8) | data[ETH_HLEN + 5]
    if ETH_HLEN + IPV6_HLEN + plen > n:
        raise WireError("gso.ipv6.bad_header")
    if data[ETH_HLEN + 6] != proto:
        raise WireError("gso.proto")
    return ETH_HLEN + IPV6_HLEN, ETH_HLEN + IPV6_HLEN + plen


def addresses(data: memoryview, version: int) -> tuple[bytes, bytes]:
    """The source and destination addresses of the IP packet in Ethernet frame ``data``."""
    if version == 4:
        return bytes(data[26:30]), bytes(data[30:34])
    return bytes(data[22:38]), bytes(data[38:54])


def piece_count(payload: int, gso_size: int, hdrs: int, mtu: int) -> int:
    """How many pieces of ``gso_size`` bytes ``payload`` bytes make (the last may be shorter).

    ``hdrs`` is the IP and L4 header bytes in front of each piece. WireError for a
    ``gso_size`` of 0, a piece whose IP packet would exceed ``mtu`` (the link's: what the other
    guest takes), or more than :data:`MAX_SEGMENTS` pieces. A payload that fits one piece is
    one (a super-frame the kernel need not have marked).
    """
    if gso_size <= 0:
        raise WireError("gso.bad_size")
    if payload <= gso_size:
        if hdrs + payload > mtu:
            raise WireError("gso.over_mtu")
        return 1
    if hdrs + gso_size > mtu:
        raise WireError("gso.over_mtu")
    count = -(-payload // gso_size)
    if count > MAX_SEGMENTS:
        raise WireError("gso.too_many")
    return count


def pieces(
    data: memoryview, at: int, total: int, count: int, gso_size: int, pool: FramePool
) -> Iterator[tuple[Frame, int, int, int]]:
    """Yield ``(frame, index, offset, n)`` for each of ``count`` pieces: a pooled frame holding
    the super-frame's headers (its first ``at`` bytes) and the ``n`` payload bytes at
    ``offset`` of the ``total`` after them. The caller fixes the headers and emits the frame
    before asking for the next."""
    headers = data[:at]
    off = 0
    for index in range(count):
        n = min(gso_size, total - off)
        frame = pool.acquire()
        view = frame.view
        s = frame.start
        view[s : s + at] = headers
        view[s + at : s + at + n] = data[at + off : at + off + n]
        frame.length = at + n
        yield frame, index, off, n
        off += n


def fix_ip(view: memoryview, ip_at: int, l4_at: int, l4_len: int, version: int, index: int) -> None:
    """Make the IP header at ``ip_at`` (the L4 header at ``l4_at``) that of piece ``index``
    carrying ``l4_len`` L4 bytes.

    IPv4: the total length, the identification (the super-frame's plus ``index``, as the
    kernel's segmentation numbers them) and the header checksum. IPv6: the payload length.
    """
    if version == 4:
        _U16.pack_into(view, ip_at + 2, l4_at - ip_at + l4_len)
        ident = (view[ip_at + 4] << 8) | view[ip_at + 5]
        _U16.pack_into(view, ip_at + 4, (ident + index) & 0xFFFF)
        view[ip_at + 10] = 0
        view[ip_at + 11] = 0
        _U16.pack_into(view, ip_at + 10, checksum(view[ip_at:l4_at]))
    else:
        _U16.pack_into(view, ip_at + 4, l4_at - ip_at - IPV6_HLEN + l4_len)
