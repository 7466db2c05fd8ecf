"""SYN cookies: answering a guest's SYN with no state kept, when the half-open table is full.

Theory of operation. Every SYN the NAT takes costs a flow, a host socket and a ``connect``, and
in Python that is tens of microseconds: a SYN flood from the guest (random source ports, tens of
thousands a second) outruns it, the guest's own queue toward guestnet overflows, and its
legitimate connections are lost with the flood. Past ``--max-half-open`` unfinished handshakes,
the NAT therefore answers a SYN as a kernel under SYN flood does: with a SYN-ACK whose initial
sequence number is a *cookie* that encodes what the handshake needs, and keeps nothing. A flood's
SYN then costs one reply frame. A guest that really connects answers with an ACK of ``cookie+1``;
the cookie is checked, and only then the flow is made and the host connect started. Once the host
accepts, the flow is ``ESTABLISHED`` (the guest thinks it already is; what it sent meanwhile is
not acknowledged, so it sends it again). If the host refuses, the guest gets RST: its connect
had succeeded, so it sees "connection reset" instead of "refused" — the price of keeping no
state, paid only while the half-open table is full.

Layout of a cookie (32 bits, most significant first): 5 bits of time slot (``now`` in
:data:`SLOT_S`-second slots, modulo 32), 3 bits for the guest's MSS (an index into
:data:`MSS_TABLE`, rounded down), 4 bits for its window scale (15: none offered), and 20 bits of
a keyed hash (BLAKE2s with a secret drawn at start) over the flow's addresses and ports, the
guest's ISN and the other fields. An ACK is taken when its cookie was made in the current slot or
the one before (a handshake has 64 to 128 s) and the hash matches: forging one means guessing
20 bits per attempt, against a secret the guest never sees.
"""

from __future__ import annotations

import hashlib
import struct

from guestnet.core.flows import FlowKey

#: Seconds per time slot of a cookie; a cookie is good for this to twice this long.
SLOT_S = 64.0
#: MSS values a cookie can carry (the guest's, rounded down to one of these).
MSS_TABLE = (536, 1220, 1440, 1460, 4036, 8940, 16344, 65483)
#: The window-scale field's value for "the guest offered none".
NO_WSCALE = 15
_HASH_BITS = 20
_HASH_MASK = (1 << _HASH_BITS) - 1
_FIELDS = struct.Struct("!IBB")


class SynCookies:
    """Makes and checks cookies with one secret (:mod:`secrets`' bytes, given by the owner)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a SYN cookie secret needs at least 16 bytes")
        self._secret = secret[:32]

    def _hash(self, key: FlowKey, guest_isn: int, slot: int, mss_i: int, ws: int) -> int:
        h = hashlib.blake2s(digest_size=4, key=self._secret)
        h.update(key[0])
        h.update(key[2])
        h.update(struct.pack("!HH", key[1], key[3]))
        h.update(_FIELDS.pack(guest_isn, slot, (mss_i << 4) | ws))
        return int.from_bytes(h.digest(), "big") & _HASH_MASK

    def make(self, key: FlowKey, guest_isn: int, mss: int, wscale: int | None, now: float) -> int:
        """The cookie (our ISN) for a SYN of ``key`` with ``guest_isn``, its MSS and window
        scale (None when not offered)."""
        slot = int(now // SLOT_S) & 0x1F
        mss_i = max((i for i, m in enumerate(MSS_TABLE) if m <= mss), default=0)
        ws = NO_WSCALE if wscale is None else min(wscale, 14)
        mac = self._hash(key, guest_isn, slot, mss_i, ws)
        return (slot << 27) | (mss_i << 24) | (ws << 20) | mac

    def check(
        self, key: FlowKey, guest_isn: int, cookie: int, now: float
    ) -> tuple[int, int | None] | None:
        """(MSS, window scale or None) if ``cookie`` is one :meth:`make` gave for this handshake
        in the current or the previous time slot; else None."""
        slot = (cookie >> 27) & 0x1F
        current = int(now // SLOT_S) & 0x1F
        if slot not in (current, (current - 1) & 0x1F):
            return None
        mss_i = (cookie >> 24) & 0x7
        ws = (cookie >> 20) & 0xF
        if self._hash(key, guest_isn, slot, mss_i, ws) != cookie & _HASH_MASK:
            return None
        return MSS_TABLE[mss_i], None if ws == NO_WSCALE else ws
