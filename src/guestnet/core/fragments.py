"""IPv4 fragments: reassembly of the guest's datagrams, fragmentation of datagrams toward it.

Theory of operation
-------------------
*From the guest.* The NAT works on whole datagrams (a UDP datagram is one ``sendto``), so the
classifier hands every fragment to :class:`Reassembler`, which keeps the pieces of each datagram
in progress, keyed by (source, destination, protocol, identification) as RFC 791 says, and hands
the whole datagram back to ``classifier.route_ipv4`` once every byte from 0 to the end (known
from the piece without MF) is there. The reassembled datagram is checked like any other: its L4
checksum covers all of it, so it is verified after reassembly.

Memory is bounded: at most :data:`MAX_DATAGRAMS` datagrams in progress (a new one evicts the
oldest, counted), each at most 65,535 bytes of IP packet, and each given
:data:`REASSEMBLY_TIMEOUT_S` from its first piece. Pieces are copied (the guest's frame buffer is
only lent for the call).

Overlaps are refused, after RFC 5722 (written for IPv6, and the safe policy for IPv4 too): a
piece that overlaps another piece of the same datagram, other than an exact duplicate, means the
datagram is dropped, and later pieces of it are dropped too until its timeout ends. An exact
duplicate (same offset, same length) is a retransmission and is ignored.

*Toward the guest.* A datagram from the host larger than the guest's MTU (a UDP reply, an echo
reply) is built whole in one pooled frame and then split by :func:`fragment_frame`: the first
fragment stays in that frame (its header is rewritten and its length cut), the others are copied
into fresh pooled frames. Each fragment carries a multiple of 8 bytes except the last. TCP never
needs this: it segments by MSS.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

from guestnet.core.packet import IpPacket, ipv4_packet
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire.checksum import checksum
from guestnet.wire.ethernet import ETH_HLEN
from guestnet.wire.ipv4 import FLAG_MF, IPV4_HLEN, build_ipv4, parse_ipv4
from guestnet.wire.ipv6 import FRAG_HLEN, IPV6_HLEN, NH_FRAGMENT

#: Datagrams in reassembly at once; a new one beyond this evicts the oldest.
MAX_DATAGRAMS = 64
#: Seconds a datagram may take to arrive whole, counted from its first piece (RFC 791 suggests 15).
REASSEMBLY_TIMEOUT_S = 30.0
#: Largest IP payload a datagram can carry (65,535 minus a 20-byte header).
MAX_PAYLOAD = 65535 - IPV4_HLEN

FragmentKey = tuple[bytes, bytes, int, int]


class _Datagram:
    """One datagram in reassembly: its pieces, sorted by offset when complete."""

    __slots__ = ("dead", "deadline", "first", "pieces", "received", "total")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        #: (offset, data) for every piece kept so far.
        self.pieces: list[tuple[int, bytes]] = []
        #: Payload length, known once the last piece (MF clear) has arrived.
        self.total = -1
        #: Bytes held in ``pieces``.
        self.received = 0
        #: The piece at offset 0, whose header fields (TOS, TTL) the whole datagram takes.
        self.first: IpPacket | None = None
        #: Set after an overlap: the datagram is dropped, its later pieces too.
        self.dead = False


class Reassembler:
    """Collects the guest's IPv4 fragments and re-injects whole datagrams into the classifier."""

    __slots__ = ("_datagrams", "counters", "deliver", "max_datagrams", "timeout")

    def __init__(
        self,
        counters: Counters,
        deliver: Callable[[IpPacket, float], None],
        max_datagrams: int = MAX_DATAGRAMS,
        timeout: float = REASSEMBLY_TIMEOUT_S,
    ) -> None:
        """``deliver`` is ``route_ipv4(pkt, now)``: usually ``classifier.route_ipv4``."""
        self.counters = counters
        self.deliver = deliver
        self.max_datagrams = max_datagrams
        self.timeout = timeout
        self._datagrams: OrderedDict[FragmentKey, _Datagram] = OrderedDict()

    def __len__(self) -> int:
        return len(self._datagrams)

    def held_bytes(self) -> int:
        """Payload bytes held across every datagram in progress (for tests and stats)."""
        return sum(d.received for d in self._datagrams.values())

    def expire(self, now: float) -> int:
        """Drop datagrams whose time is up; return how many. Oldest first, so stop early."""
        datagrams = self._datagrams
        n = 0
        while datagrams:
            key, dgram = next(iter(datagrams.items()))
            if dgram.deadline > now:
                break
            del datagrams[key]
            if not dgram.dead:
                self.counters.inc("ipv4.fragment.timeout")
            n += 1
        return n

    def handle_fragment(self, pkt: IpPacket, now: float) -> None:
        """Take one fragment; deliver the datagram when it is whole."""
        self.expire(now)
        ip = pkt.ip
        offset = ip.frag_offset
        data = pkt.l4
        size = len(data)
        more = bool(ip.frag & FLAG_MF)
        counters = self.counters
        if more and (size == 0 or size % 8):
            counters.inc("ipv4.fragment.bad_length")
            return
        end = offset + size
        if end > MAX_PAYLOAD:
            counters.inc("ipv4.fragment.too_big")
            return
        key = (ip.src, ip.dst, ip.proto, ip.ident)
        dgram = self._datagrams.get(key)
        if dgram is None:
            if len(self._datagrams) >= self.max_datagrams:
                self._datagrams.popitem(last=False)
                counters.inc("ipv4.fragment.evicted")
            dgram = _Datagram(now + self.timeout)
            self._datagrams[key] = dgram
        if dgram.dead:
            counters.inc("ipv4.fragment.after_overlap")
            return
        if dgram.total >= 0 and (end > dgram.total or (not more and end != dgram.total)):
            self._kill(dgram, "ipv4.fragment.bad_end")
            return
        for p_off, p_data in dgram.pieces:
            p_end = p_off + len(p_data)
            if offset < p_end and p_off < end:
                if p_off == offset and p_end == end:
                    counters.inc("ipv4.fragment.duplicate")
                    return
                self._kill(dgram, "ipv4.fragment.overlap")
                return
        if not more:
            if any(p_off + len(p_data) > end for p_off, p_data in dgram.pieces):
                self._kill(dgram, "ipv4.fragment.bad_end")
                return
            dgram.total = end
        dgram.pieces.append((offset, bytes(data)))
        dgram.received += size
        if offset == 0:
            dgram.first = pkt
        counters.inc("ipv4.fragment.accepted")
        if dgram.total >= 0 and dgram.received == dgram.total:
            del self._datagrams[key]
            self._complete(dgram, now)

    def _kill(self, dgram: _Datagram, reason: str) -> None:
        self.counters.inc(reason)
        dgram.dead = True
        dgram.pieces = []
        dgram.received = 0
        dgram.first = None

    def _complete(self, dgram: _Datagram, now: float) -> None:
        first = dgram.first
        assert first is not None  # no overlaps and every byte present: offset 0 is there
        buf = bytearray(IPV4_HLEN + dgram.total)
        ip = first.ip
        build_ipv4(buf, 0, ip.src, ip.dst, ip.proto, dgram.total, ip.ident, ip.ttl, 0, ip.tos)
        for p_off, p_data in dgram.pieces:
            buf[IPV4_HLEN + p_off : IPV4_HLEN + p_off + len(p_data)] = p_data
        view = memoryview(buf)
        whole = parse_ipv4(view, verify=False)
        self.counters.inc("ipv4.fragment.reassembled")
        # The checksum of a reassembled datagram is always verified: no link vouches for it.
        out = ipv4_packet(first.port, first.src_mac, whole, view[IPV4_HLEN:], False)
        self.deliver(out, now)


def fragment_frame(frame: Frame, mtu: int, pool: FramePool) -> list[Frame]:
    """Split an Ethernet + IPv4 frame whose packet exceeds ``mtu`` into fragments.

    ``frame`` holds a 20-byte-header IPv4 packet (as guestnet builds them) and becomes the first
    fragment; the list holds it and the rest, in order, each owned by the caller. The packet's
    identification must already be set (unique per datagram toward that guest) and DF clear.
    """
    buf = frame.view
    l3 = frame.start + ETH_HLEN
    total_len = struct.unpack_from("!H", buf, l3 + 2)[0]
    payload_len = total_len - IPV4_HLEN
    chunk = (mtu - IPV4_HLEN) & ~7
    assert chunk > 0 and payload_len > chunk
    eth = bytes(buf[frame.start : l3])
    frames = [frame]
    offset = chunk
    while offset < payload_len:
        size = min(chunk, payload_len - offset)
        more = offset + size < payload_len
        frag = pool.acquire()
        fbuf = frag.view
        f_l3 = frag.start + ETH_HLEN
        fbuf[frag.start : f_l3] = eth
        fbuf[f_l3 : f_l3 + IPV4_HLEN] = buf[l3 : l3 + IPV4_HLEN]
        src = l3 + IPV4_HLEN + offset
        fbuf[f_l3 + IPV4_HLEN : f_l3 + IPV4_HLEN + size] = buf[src : src + size]
        _set_fragment(fbuf, f_l3, size, offset, more)
        frag.length = ETH_HLEN + IPV4_HLEN + size
        frames.append(frag)
        offset += size
    _set_fragment(buf, l3, chunk, 0, True)
    frame.length = ETH_HLEN + IPV4_HLEN + chunk
    return frames


def _set_fragment(buf: memoryview, l3: int, size: int, offset: int, more: bool) -> None:
    """Rewrite total length, flags/offset and checksum of the header at ``l3``."""
    struct.pack_into("!H", buf, l3 + 2, IPV4_HLEN + size)
    struct.pack_into("!H", buf, l3 + 6, (offset >> 3) | (FLAG_MF if more else 0))
    struct.pack_into("!H", buf, l3 + 10, 0)
    struct.pack_into("!H", buf, l3 + 10, checksum(buf[l3 : l3 + IPV4_HLEN]))


def send_ipv4_to_guest(
    frame: Frame, mtu: int, pool: FramePool, send: Callable[[Frame], None]
) -> int:
    """Send a built Ethernet + IPv4 frame, fragmented first when its packet exceeds ``mtu``.

    Takes ownership of ``frame``; returns how many frames were sent.
    """
    if frame.length - ETH_HLEN <= mtu:
        send(frame)
        return 1
    frames = fragment_frame(frame, mtu, pool)
    for part in frames:
        send(part)
    return len(frames)


def fragment_ipv6_frame(frame: Frame, mtu: int, pool: FramePool, ident: int) -> list[Frame]:
    """Split an Ethernet + IPv6 frame whose packet exceeds ``mtu`` into fragments (RFC 8200 4.5).

    ``frame`` holds a packet with a bare 40-byte header (as guestnet builds them): all of its
    payload is the fragmentable part. Each fragment carries the header (next header 44), an
    8-byte Fragment header with the original next header, the offset, M and ``ident`` (32
    bits, unique per datagram toward that guest), and a piece of the payload; pieces but the
    last are multiples of 8 bytes. ``frame`` becomes the first fragment.
    """
    buf = frame.view
    l3 = frame.start + ETH_HLEN
    payload_len, next_header = struct.unpack_from("!HB", buf, l3 + 4)
    chunk = (mtu - IPV6_HLEN - FRAG_HLEN) & ~7
    assert chunk > 0 and payload_len > chunk
    head = bytes(buf[frame.start : l3 + IPV6_HLEN])
    data_at = l3 + IPV6_HLEN
    frames = []
    offset = chunk  # the first fragment is written last, in place
    while offset < payload_len:
        size = min(chunk, payload_len - offset)
        frag = pool.acquire()
        fbuf = frag.view
        f_l3 = frag.start + ETH_HLEN
        fbuf[frag.start : f_l3 + IPV6_HLEN] = head
        body = f_l3 + IPV6_HLEN + FRAG_HLEN
        fbuf[body : body + size] = buf[data_at + offset : data_at + offset + size]
        _set_fragment6(fbuf, f_l3, next_header, size, offset, offset + size < payload_len, ident)
        frag.length = ETH_HLEN + IPV6_HLEN + FRAG_HLEN + size
        frames.append(frag)
        offset += size
    # The first piece moves up by the Fragment header's 8 bytes.
    buf[data_at + FRAG_HLEN : data_at + FRAG_HLEN + chunk] = bytes(buf[data_at : data_at + chunk])
    _set_fragment6(buf, l3, next_header, chunk, 0, True, ident)
    frame.length = ETH_HLEN + IPV6_HLEN + FRAG_HLEN + chunk
    frame.csum_start = -1  # every piece carries whole checksums (a fragment has no offload)
    return [frame, *frames]


def _set_fragment6(
    buf: memoryview, l3: int, next_header: int, size: int, offset: int, more: bool, ident: int
) -> None:
    """Payload length and next header of the IPv6 header at ``l3``, and its Fragment header."""
    struct.pack_into("!HB", buf, l3 + 4, FRAG_HLEN + size, NH_FRAGMENT)
    flags = offset | (1 if more else 0)  # offset is a multiple of 8: its low bits hold M
    struct.pack_into("!BBHI", buf, l3 + IPV6_HLEN, next_header, 0, flags, ident)


def send_to_guest(
    frame: Frame, mtu: int, pool: FramePool, send: Callable[[Frame], None], ident: int = 0
) -> int:
    """Send a built Ethernet + IP frame of either family, fragmented when it exceeds ``mtu``.

    IPv4 uses the frame's own identification; IPv6 fragments carry ``ident``. Takes ownership;
    returns how many frames were sent.
    """
    if frame.length - ETH_HLEN <= mtu:
        send(frame)
        return 1
    buf = frame.view
    if buf[frame.start + 12] == 0x86 and buf[frame.start + 13] == 0xDD:
        frames = fragment_ipv6_frame(frame, mtu, pool, ident)
    else:
        frames = fragment_frame(frame, mtu, pool)
    for part in frames:
        send(part)
    return len(frames)
