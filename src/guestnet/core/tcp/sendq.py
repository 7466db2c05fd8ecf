"""SendQueue: the bytes sent to the guest and not yet acknowledged, kept for retransmission.

Theory of operation
-------------------
Host to guest, every segment's payload is appended here when it is sent and dropped from the
front when the guest acknowledges it; a retransmission reads a prefix. The queue was a
``bytearray`` (``+=`` at the end, ``del b[:n]`` at the front), which costs more than it looks
under bulk: after a front deletion CPython's bytearray keeps an offset, and the next append that
does not fit allocates a new buffer, copies everything still queued into it and frees the old
one. With up to ``MAX_UNACKED`` (4 MiB) in flight that is a copy of megabytes every few appends
and, for a moment, two buffers of that size alive at once, which set the process's peak RSS
under bulk host-to-guest (issue 12). A deque of one ``bytes`` per segment fixed the memory but
cost more CPU per GB (an allocation and a free of up to 64 KiB per segment).

Here the queue is a ring in one ``bytearray``: an append copies its bytes in at the tail (two
pieces where it wraps), an acknowledgement moves the head, and nothing is allocated while the
flight fits. When it does not, the ring doubles in place (``buf *= 2``: a ``realloc`` and one
copy of the old contents into the new half), and the doubled buffer needs no fix-up: what
wrapped to the front of the old ring now also sits right after its end, so the queued bytes are
contiguous from the same head. So the buffer is the power of two above the largest flight the
flow has had (at most ``MAX_UNACKED``), and the CPU cost one ``memcpy`` per segment. When the
queue empties the buffer is dropped if it grew past :data:`KEEP`, so an idle flow that once
moved bulk holds little. The interface is the bytearray's as the TCP code used it (``len``,
``+=``, ``del q[:n]``, ``q[:n]``, ``bytes(q)``), so nothing else changed.
"""

from __future__ import annotations

from typing import Any

#: Smallest ring, and the most an empty queue keeps: a request/response flow's few bytes fit,
#: and thousands of short connections (lingering closed for a while) do not hold 16 KiB each.
KEEP = 1 << 11


class SendQueue:
    """Unacknowledged bytes in a ring that doubles when full; prefix reads and deletions only."""

    __slots__ = ("_buf", "_head", "_len")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iadd__(self, data: bytes | bytearray | memoryview) -> SendQueue:
        n = len(data)
        if not n:
            return self
        buf = self._buf
        size = self._len
        cap = len(buf)
        if size + n > cap:
            buf = self._grow(size + n)
            cap = len(buf)
        tail = self._head + size
        if tail >= cap:
            tail -= cap
        first = cap - tail
        if n <= first:
            buf[tail : tail + n] = data
        else:
            buf[tail:] = data[:first]
            buf[: n - first] = data[first:]
        self._len = size + n
        return self

    def _grow(self, need: int) -> bytearray:
        buf = self._buf
        if not buf:
            cap = KEEP
            while cap < need:
                cap *= 2
            self._buf = buf = bytearray(cap)
            self._head = 0
            return buf
        while len(buf) < need:
            buf *= 2  # in place; the wrapped part reappears after the old end (see above)
        return buf

    def __delitem__(self, key: slice) -> None:
        """``del q[:n]``: drop the first ``n`` bytes (all of them if fewer are queued)."""
        self.drop(_prefix_len(key, self._len))

    def drop(self, n: int) -> None:
        """Drop the first ``n`` bytes (all of them if fewer are queued): ``del q[:n]`` without
        the slice (the per-ACK call)."""
        if n > self._len:
            n = self._len
        self._len -= n
        if not self._len:
            self._head = 0
            if len(self._buf) > KEEP:
                self._buf = bytearray()
            return
        head = self._head + n
        cap = len(self._buf)
        self._head = head - cap if head >= cap else head

    def release(self) -> None:
        """Empty the queue and let go of its buffer: the flow will send nothing more (both
        directions closed), and a closed flow that lingers should not hold a ring."""
        self._buf = bytearray()
        self._head = self._len = 0

    def __getitem__(self, key: slice) -> bytes:
        """``q[:n]``: a copy of the first ``n`` bytes."""
        n = _prefix_len(key, self._len)
        buf = self._buf
        head = self._head
        end = head + n
        cap = len(buf)
        if end <= cap:
            return bytes(buf[head:end])
        return bytes(buf[head:]) + bytes(buf[: end - cap])

    def __bytes__(self) -> bytes:
        return self[: self._len]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SendQueue):
            other = bytes(other)
        if isinstance(other, bytes | bytearray | memoryview):
            return bytes(self) == bytes(other)
        return NotImplemented

    __hash__: Any = None


def _prefix_len(key: slice, length: int) -> int:
    """``n`` of a ``[:n]`` slice, clamped to ``length``; anything else is our own bug."""
    assert isinstance(key, slice) and key.start is None and key.step is None, key
    n = length if key.stop is None else key.stop
    assert n >= 0, key
    return n if n < length else length
