"""TCP segmentation in software: a guest's TCP super-frame cut into MSS-sized segments.

Theory of operation
-------------------
See :mod:`guestnet.core.gso` for when the switch segments and what both protocols share. A TCP
super-frame is one segment whose payload the sender's kernel would have cut every ``gso_size``
bytes (its MSS). :func:`segment_tcp` does that cut as Linux's ``tcp_gso_segment`` does:

- every segment carries the super-frame's headers (IP, TCP with its options: timestamps are the
  same on every segment) and the next ``gso_size`` bytes of payload (the last may be shorter);
- the sequence number advances by the payload before it; the acknowledgement, window and
  options stay;
- FIN and PSH stay only on the last segment (the end of the data), CWR only on the first (the
  congestion window was reduced once); the other flags (ACK, ECE, URG) stay on every one;
- the IP header is fixed per segment (:func:`guestnet.core.gso.fix_ip`) and the TCP checksum is
  computed whole over the pseudo-header and the segment: whatever partial sum the super-frame
  held is overwritten.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from guestnet.core.gso import addresses, fix_ip, ip_layer, piece_count, pieces
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import ETH_HLEN
from guestnet.wire.ipv4 import PROTO_TCP
from guestnet.wire.tcp import CWR, FIN, PSH, TCP_HLEN

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
#: Flags kept only on the last segment.
_LAST_ONLY = FIN | PSH


def segment_tcp(
    data: memoryview,
    version: int,
    gso_size: int,
    mtu: int,
    pool: FramePool,
    emit: Callable[[Frame], object],
) -> int:
    """Cut TCP super-frame ``data`` (IPv4 or IPv6 by ``version``) into segments of ``gso_size``
    payload bytes, each in a pooled frame handed to ``emit``; return how many.

    ``mtu`` bounds each segment's IP packet. WireError (nothing emitted) for a super-frame
    that is not one (see :func:`guestnet.core.gso.ip_layer` and
    :func:`~guestnet.core.gso.piece_count`) or whose TCP header does not fit.
    """
    l4, end = ip_layer(data, PROTO_TCP, version)
    if l4 + TCP_HLEN > end:
        raise WireError("gso.tcp.bad_header")
    thl = (data[l4 + 12] >> 4) * 4
    at = l4 + thl
    if thl < TCP_HLEN or at > end:
        raise WireError("gso.tcp.bad_header")
    total = end - at
    count = piece_count(total, gso_size, at - ETH_HLEN, mtu)
    src, dst = addresses(data, version)
    seq = _U32.unpack_from(data, l4 + 4)[0]
    flags = data[l4 + 13]
    last = count - 1
    for frame, index, off, n in pieces(data, at, total, count, gso_size, pool):
        view = frame.view
        s = frame.start
        fix_ip(view, s + ETH_HLEN, s + l4, thl + n, version, index)
        t = s + l4
        _U32.pack_into(view, t + 4, (seq + off) & 0xFFFFFFFF)
        f = flags
        if index:
            f &= ~CWR
        if index < last:
            f &= ~_LAST_ONLY
        view[t + 13] = f
        view[t + 16] = 0
        view[t + 17] = 0
        pseudo = pseudo_header_sum(src, dst, PROTO_TCP, thl + n)
        _U16.pack_into(view, t + 16, checksum(view[t : s + at + n], pseudo))
        emit(frame)
    return count
