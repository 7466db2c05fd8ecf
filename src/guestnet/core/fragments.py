"""IP fragments: reassembly of the guest's datagrams (IPv4 and IPv6), fragmentation toward it.

Theory of operation
-------------------
*From the guest.* The NAT works on whole datagrams (a UDP datagram is one ``sendto``), so the
classifier hands every fragment to :class:`Reassembler`, which keeps the pieces of each datagram
in progress, keyed by (source, destination, protocol, identification) as RFC 791 says, and hands
the whole datagram back to ``classifier.route_ipv4`` once every byte from 0 to the end (known
from the piece without MF) is there. The reassembled datagram is checked like any other: its L4
checksum covers all of it, so it is verified after reassembly.

Memory is bounded by count and by bytes: at most :data:`MAX_DATAGRAMS` datagrams in progress
(a new one evicts the oldest, counted), each at most 65,535 bytes of IP packet in at most
:data:`MAX_PIECES` pieces, all of them together at most :data:`MAX_HELD_BYTES` (each piece
charged its payload plus :data:`PIECE_OVERHEAD`, so tiny pieces cost what they really cost; the
oldest datagrams make room, counted as ``evicted_bytes``), and each given
:data:`REASSEMBLY_TIMEOUT_S` from its first piece. The piece cap also bounds the overlap check,
which compares a new piece with every kept one. Pieces are copied (the guest's frame buffer is
only lent for the call).

Overlaps are refused, after RFC 5722 (written for IPv6, and the safe policy for IPv4 too): a
piece that overlaps another piece of the same datagram, other than an exact duplicate, means the
datagram is dropped, and later pieces of it are dropped too until its timeout ends. An exact
duplicate (same offset, same length) is a retransmission and is ignored.

*IPv6.* The same reassembly serves IPv6 (one :class:`Reassembler` per family, ``family=IPV6``,
counters under ``ipv6.fragment.*``): the classifier stops its walk of the extension headers at
a Fragment header, whose identification, offset and M flag the parsed header carries under
IPv4's names (``ident``, ``frag_offset``, ``frag``), and its next header as ``proto``. The
whole packet is rebuilt as a 40-byte header with that next header in front of the reassembled
bytes and parsed again, so extension headers of the fragmentable part are walked as in any
packet, then handed to ``classifier.route_ipv6``.

*Toward the guest.* A datagram from the host larger than the guest's MTU (a UDP reply, an echo
reply) is built whole in one pooled frame and then split by :func:`fragment_frame`: the first
fragment stays in that frame (its header is rewritten and its length cut), the others are copied
into fresh pooled frames. Each fragment carries a multiple of 8 bytes except the last. TCP never
needs this: it segments by MSS. An IPv6 packet is split the same way by :func:`fragment_frame6`,
each piece behind a Fragment header (RFC 8200 4.5) with an identification the caller gives.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

from guestnet.core.packet import IpPacket, ipv4_packet
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum
from guestnet.wire.ethernet import ETH_HLEN
from guestnet.wire.ipv4 import FLAG_MF, IPV4_HLEN, build_ipv4, parse_ipv4
from guestnet.wire.ipv6 import (
    FRAG_HLEN,
    IPV6_HLEN,
    NH_FRAGMENT,
    IPv6Header,
    build_ipv6,
    parse_ipv6,
)
from guestnet.wire.l3 import IPV4, IPV6, L3Family

#: Datagrams in reassembly at once; a new one beyond this evicts the oldest.
MAX_DATAGRAMS = 64
#: Bytes held in reassembly at once, across datagrams, each piece charged its payload plus
#: :data:`PIECE_OVERHEAD`; beyond it the oldest datagrams are evicted (Linux's ipfrag_high_thresh
#: is 4 MiB per namespace; one guest needs far less).
MAX_HELD_BYTES = 1 << 20
#: What a kept piece costs beyond its payload (the tuple, the bytes object's header), so a flood
#: of 8-byte pieces is bounded by memory, not only by payload.
PIECE_OVERHEAD = 96
#: Pieces one datagram may have (65,535 bytes in 1,280-byte pieces is 52); more is an attack.
MAX_PIECES = 128
#: Seconds a datagram may take to arrive whole, counted from its first piece (RFC 791 suggests 15).
REASSEMBLY_TIMEOUT_S = 30.0
#: Largest IP payload a datagram can carry (65,535 minus a 20-byte header).
MAX_PAYLOAD = 65535 - IPV4_HLEN
#: Largest IPv6 payload (the payload length field, without jumbograms).
MAX_PAYLOAD6 = 65535

FragmentKey = tuple[bytes, bytes, int, int]


class _Datagram:
    """One datagram in reassembly: its pieces, sorted by offset when complete."""

    __slots__ = ("charge", "dead", "deadline", "first", "pieces", "received", "total")

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
        #: What the pieces cost against :data:`MAX_HELD_BYTES`.
        self.charge = 0


class Reassembler:
    """Collects the guest's fragments of one IP family and re-injects whole datagrams into the
    classifier."""

    __slots__ = (
        "_datagrams",
        "_held",
        "_max_payload",
        "_reason",
        "counters",
        "deliver",
        "family",
        "max_datagrams",
        "max_held",
        "timeout",
    )

    def __init__(
        self,
        counters: Counters,
        deliver: Callable[[IpPacket, float], None],
        max_datagrams: int = MAX_DATAGRAMS,
        timeout: float = REASSEMBLY_TIMEOUT_S,
        family: L3Family = IPV4,
        max_held: int = MAX_HELD_BYTES,
    ) -> None:
        """``deliver`` is the classifier's ``route_ipv4(pkt, now)`` (``route_ipv6`` for
        ``family=IPV6``)."""
        self.counters = counters
        self.deliver = deliver
        self.max_datagrams = max_datagrams
        self.max_held = max_held
        #: The sum of every datagram's ``charge``.
        self._held = 0
        self.timeout = timeout
        self.family = family
        v6 = family is IPV6
        self._max_payload = MAX_PAYLOAD6 if v6 else MAX_PAYLOAD
        #: Counter names: ``ipv4.fragment.<what>`` or ``ipv6.fragment.<what>``.
        self._reason = "ipv6.fragment." if v6 else "ipv4.fragment."
        self._datagrams: OrderedDict[FragmentKey, _Datagram] = OrderedDict()

    def __len__(self) -> int:
        return len(self._datagrams)

    def held_bytes(self) -> int:
        """Payload bytes held across every datagram in progress (for tests and stats)."""
        return sum(d.received for d in self._datagrams.values())

    def charged_bytes(self) -> int:
        """What the held pieces count against ``max_held`` (payload plus per-piece overhead)."""
        return self._held

    def _forget(self, key: FragmentKey) -> _Datagram:
        dgram = self._datagrams.pop(key)
        self._held -= dgram.charge
        return dgram

    def _evict_oldest(self, reason: str) -> None:
        self._forget(next(iter(self._datagrams)))
        self.counters.inc(self._reason + reason)

    def expire(self, now: float) -> int:
        """Drop datagrams whose time is up; return how many. Oldest first, so stop early."""
        datagrams = self._datagrams
        n = 0
        while datagrams:
            key, dgram = next(iter(datagrams.items()))
            if dgram.deadline > now:
                break
            self._forget(key)
            if not dgram.dead:
                self.counters.inc(self._reason + "timeout")
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
            counters.inc(self._reason + "bad_length")
            return
        end = offset + size
        if end > self._max_payload:
            counters.inc(self._reason + "too_big")
            return
        key = (ip.src, ip.dst, ip.proto, ip.ident)
        dgram = self._datagrams.get(key)
        if dgram is None:
            if len(self._datagrams) >= self.max_datagrams:
                self._evict_oldest("evicted")
            dgram = _Datagram(now + self.timeout)
            self._datagrams[key] = dgram
        if dgram.dead:
            counters.inc(self._reason + "after_overlap")
            return
        if dgram.total >= 0 and (end > dgram.total or (not more and end != dgram.total)):
            self._kill(dgram, self._reason + "bad_end")
            return
        for p_off, p_data in dgram.pieces:
            p_end = p_off + len(p_data)
            if offset < p_end and p_off < end:
                if p_off == offset and p_end == end:
                    counters.inc(self._reason + "duplicate")
                    return
                self._kill(dgram, self._reason + "overlap")
                return
        if not more:
            if any(p_off + len(p_data) > end for p_off, p_data in dgram.pieces):
                self._kill(dgram, self._reason + "bad_end")
                return
            dgram.total = end
        if len(dgram.pieces) >= MAX_PIECES:
            self._kill(dgram, self._reason + "too_many_pieces")
            return
        charge = size + PIECE_OVERHEAD
        while self._held + charge > self.max_held and next(iter(self._datagrams)) != key:
            self._evict_oldest("evicted_bytes")
        dgram.pieces.append((offset, bytes(data)))
        dgram.received += size
        dgram.charge += charge
        self._held += charge
        if offset == 0:
            dgram.first = pkt
        counters.inc(self._reason + "accepted")
        if dgram.total >= 0 and dgram.received == dgram.total:
            self._forget(key)
            self._complete(dgram, now)

    def _kill(self, dgram: _Datagram, reason: str) -> None:
        self.counters.inc(reason)
        dgram.dead = True
        dgram.pieces = []
        dgram.received = 0
        dgram.first = None
        self._held -= dgram.charge
        dgram.charge = 0

    def _complete(self, dgram: _Datagram, now: float) -> None:
        first = dgram.first
        assert first is not None  # no overlaps and every byte present: offset 0 is there
        if self.family is IPV6:
            self._complete6(dgram, first, now)
            return
        buf = bytearray(IPV4_HLEN + dgram.total)
        ip = first.ip
        build_ipv4(buf, 0, ip.src, ip.dst, ip.proto, dgram.total, ip.ident, ip.ttl, 0, ip.tos)
        for p_off, p_data in dgram.pieces:
            buf[IPV4_HLEN + p_off : IPV4_HLEN + p_off + len(p_data)] = p_data
        view = memoryview(buf)
        whole = parse_ipv4(view, verify=False)
        self.counters.inc(self._reason + "reassembled")
        # The checksum of a reassembled datagram is always verified: no link vouches for it.
        out = ipv4_packet(first.port, first.src_mac, whole, view[IPV4_HLEN:], False)
        self.deliver(out, now)

    def _complete6(self, dgram: _Datagram, first: IpPacket, now: float) -> None:
        """The whole IPv6 packet: a fixed header with the Fragment header's next header, then
        the reassembled bytes, parsed again (see the module docstring)."""
        ip = first.ip
        assert isinstance(ip, IPv6Header)
        buf = bytearray(IPV6_HLEN + dgram.total)
        build_ipv6(
            buf, 0, ip.src, ip.dst, ip.proto, dgram.total, ip.hop_limit, ip.traffic_class,
            ip.flow_label,
        )  # fmt: skip
        for p_off, p_data in dgram.pieces:
            buf[IPV6_HLEN + p_off : IPV6_HLEN + p_off + len(p_data)] = p_data
        view = memoryview(buf)
        try:
            whole = parse_ipv6(view)
        except WireError as exc:
            self.counters.inc(exc.reason)
            return
        if whole.is_fragment:  # a Fragment header inside the fragmentable part
            self.counters.inc("ipv6.fragment.nested")
            return
        self.counters.inc("ipv6.fragment.reassembled")
        l4 = view[whole.header_len : whole.total_len]
        out = IpPacket(
            first.port, first.src_mac, whole, l4, False, IPV6, whole.src, whole.dst,
            whole.proto, whole.hop_limit,
        )  # fmt: skip
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


def fragment_frame6(frame: Frame, mtu: int, pool: FramePool, ident: int) -> list[Frame]:
    """Split an Ethernet + IPv6 frame whose packet exceeds ``mtu`` into fragments (RFC 8200 4.5).

    ``frame`` holds a packet with a 40-byte header and no extension headers (as guestnet builds
    them); every fragment gets a Fragment header with the packet's next header and ``ident``
    (unique per packet toward that guest) and carries a multiple of 8 bytes except the last.
    ``frame`` becomes the first fragment (its payload moved 8 bytes on, after the others were
    copied out); the list holds it and the rest, in order, each owned by the caller.
    """
    buf = frame.view
    l3 = frame.start + ETH_HLEN
    payload_len = struct.unpack_from("!H", buf, l3 + 4)[0]
    next_header = buf[l3 + 6]
    chunk = (mtu - IPV6_HLEN - FRAG_HLEN) & ~7
    assert chunk > 0 and payload_len > chunk
    head = bytes(buf[frame.start : l3 + IPV6_HLEN])
    frames = [frame]
    offset = chunk
    while offset < payload_len:
        size = min(chunk, payload_len - offset)
        frag = pool.acquire()
        fbuf = frag.view
        f_l3 = frag.start + ETH_HLEN
        fbuf[frag.start : f_l3 + IPV6_HLEN] = head
        data = f_l3 + IPV6_HLEN + FRAG_HLEN
        src = l3 + IPV6_HLEN + offset
        fbuf[data : data + size] = buf[src : src + size]
        _set_fragment6(fbuf, f_l3, next_header, size, offset, offset + size < payload_len, ident)
        frag.length = ETH_HLEN + IPV6_HLEN + FRAG_HLEN + size
        frames.append(frag)
        offset += size
    first = l3 + IPV6_HLEN
    buf[first + FRAG_HLEN : first + FRAG_HLEN + chunk] = bytes(buf[first : first + chunk])
    _set_fragment6(buf, l3, next_header, chunk, 0, True, ident)
    frame.length = ETH_HLEN + IPV6_HLEN + FRAG_HLEN + chunk
    return frames


def _set_fragment6(
    buf: memoryview, l3: int, next_header: int, size: int, offset: int, more: bool, ident: int
) -> None:
    """Payload length and next header of the header at ``l3``, and the Fragment header after."""
    struct.pack_into("!HB", buf, l3 + 4, FRAG_HLEN + size, NH_FRAGMENT)
    struct.pack_into("!BxHI", buf, l3 + IPV6_HLEN, next_header, offset | more, ident)


def send_ipv6_to_guest(
    frame: Frame, mtu: int, pool: FramePool, send: Callable[[Frame], None], ident: int
) -> int:
    """Send a built Ethernet + IPv6 frame, fragmented first (identification ``ident``) when its
    packet exceeds ``mtu``. Takes ownership of ``frame``; returns how many frames were sent."""
    if frame.length - ETH_HLEN <= mtu:
        send(frame)
        return 1
    frames = fragment_frame6(frame, mtu, pool, ident)
    for part in frames:
        send(part)
    return len(frames)


def send_to_guest(
    frame: Frame, mtu: int, pool: FramePool, send: Callable[[Frame], None], ident: int = 0
) -> int:
    """Send a built Ethernet + IP frame of either family, fragmented when it exceeds ``mtu``
    (IPv4 with the frame's own identification, IPv6 with ``ident``). Takes ownership; returns
    how many frames were sent."""
    buf = frame.view
    if buf[frame.start + 12] == 0x86 and buf[frame.start + 13] == 0xDD:
        return send_ipv6_to_guest(frame, mtu, pool, send, ident)
    return send_ipv4_to_guest(frame, mtu, pool, send)
