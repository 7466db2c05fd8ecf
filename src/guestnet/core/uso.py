"""UDP segmentation in software: a guest's UDP super-frame (USO) cut into datagrams.

Theory of operation
-------------------
See :mod:`guestnet.core.gso` for when the switch segments and what both protocols share. A UDP
super-frame (``gso_type`` UDP_L4, Linux 6.2+) is what a guest application's ``UDP_SEGMENT``
send becomes: one UDP header in front of many datagrams' payloads, each ``gso_size`` bytes (the
last may be shorter). :func:`segment_udp` rebuilds the datagrams as Linux's
``__udp_gso_segment`` does: each carries the super-frame's IP and UDP headers (same ports),
with its own UDP length and a whole UDP checksum (a computed 0 is sent as 0xffff, RFC 768), and
its IP header fixed per datagram (:func:`guestnet.core.gso.fix_ip`). The super-frame's UDP
length field (the whole length, or 0 beyond 64 KiB) is not read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from guestnet.core.gso import addresses, fix_ip, ip_layer, piece_count, pieces
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import ETH_HLEN
from guestnet.wire.ipv4 import PROTO_UDP
from guestnet.wire.udp import UDP_HLEN

_U16 = struct.Struct("!H")


def segment_udp(
    data: memoryview,
    version: int,
    gso_size: int,
    mtu: int,
    pool: FramePool,
    emit: Callable[[Frame], object],
) -> int:
    """Cut UDP super-frame ``data`` (IPv4 or IPv6 by ``version``) into datagrams of
    ``gso_size`` payload bytes, each in a pooled frame handed to ``emit``; return how many.

    ``mtu`` bounds each datagram's IP packet. WireError (nothing emitted) for a super-frame that
    is not one (see :func:`guestnet.core.gso.ip_layer` and
    :func:`~guestnet.core.gso.piece_count`).
    """
    l4, end = ip_layer(data, PROTO_UDP, version)
    at = l4 + UDP_HLEN
    if at > end:
        raise WireError("gso.udp.bad_header")
    total = end - at
    count = piece_count(total, gso_size, at - ETH_HLEN, mtu)
    src, dst = addresses(data, version)
    for frame, index, _off, n in pieces(data, at, total, count, gso_size, pool):
        view = frame.view
        s = frame.start
        fix_ip(view, s + ETH_HLEN, s + l4, UDP_HLEN + n, version, index)
        u = s + l4
        _U16.pack_into(view, u + 4, UDP_HLEN + n)
        view[u + 6] = 0
        view[u + 7] = 0
        value = checksum(view[u : s + at + n], pseudo_header_sum(src, dst, PROTO_UDP, UDP_HLEN + n))
        _U16.pack_into(view, u + 6, value or 0xFFFF)
        emit(frame)
    return count
