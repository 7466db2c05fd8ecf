"""SendQueue: the bytes sent to the guest and not yet acknowledged, kept for retransmission.

Theory of operation
-------------------
Host to guest, every segment's payload is appended here when it is sent and dropped from the
front when the guest acknowledges it; a retransmission reads a prefix. The queue was a
``bytearray`` (``+=`` at the end, ``del b[:n]`` at the front), which costs more than it looks
under bulk: after a front deletion CPython's bytearray keeps an offset, and the next append that
does not fit allocates a new buffer, copies everything still queued into it and frees the old
one. With up to ``MAX_UNACKED`` (4 MiB) in flight that is a copy of megabytes every few appends
and, for a moment, two buffers of that size alive at once, which is what set the process's peak
RSS under bulk host-to-guest (issue 12).

Here the queue is a deque of the appended chunks (one per segment, up to a TSO super-frame) and
an offset into the first: an append copies only its own bytes, an acknowledgement pops whole
chunks and moves the offset, and memory is what is in flight plus the allocator's slack. The
interface is the bytearray's as the TCP code used it (``len``, ``+=``, ``del q[:n]``, ``q[:n]``,
``bytes(q)``), so nothing else changed.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class SendQueue:
    """Unacknowledged bytes as a queue of chunks; only prefix reads and deletions."""

    __slots__ = ("_chunks", "_head", "_len")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        #: Bytes of the first chunk already acknowledged.
        self._head = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iadd__(self, data: bytes | bytearray | memoryview) -> SendQueue:
        n = len(data)
        if n:
            self._chunks.append(bytes(data))
            self._len += n
        return self

    def __delitem__(self, key: slice) -> None:
        """``del q[:n]``: drop the first ``n`` bytes (all of them if fewer are queued)."""
        n = _prefix_len(key, self._len)
        self._len -= n
        chunks = self._chunks
        head = self._head + n
        while chunks and head >= len(chunks[0]):
            head -= len(chunks.popleft())
        self._head = head

    def __getitem__(self, key: slice) -> bytes:
        """``q[:n]``: a copy of the first ``n`` bytes."""
        n = _prefix_len(key, self._len)
        out = []
        start = self._head
        for chunk in self._chunks:
            if n <= 0:
                break
            piece = chunk[start : start + n]
            out.append(piece)
            n -= len(piece)
            start = 0
        return b"".join(out)

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
