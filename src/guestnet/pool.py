"""FramePool: bounded, lazily allocated, single-owner frame buffers.

Theory of operation
-------------------
Every frame guestnet emits is written into a :class:`Frame` taken from a :class:`FramePool`, and
links that can read one frame per call (TAP, datagram) read guest frames straight into one. A
frame is a fixed-size ``bytearray`` slot with a ``memoryview`` over it; the frame's bytes start at
``HEADROOM`` so that a link can write its own prefix in front (the QEMU stream's 4-byte length,
the TAP's virtio-net header) and send header and frame with one system call, without a copy.

The pool hands out slots lazily: nothing is allocated until the first ``acquire()``, and at most
``capacity`` slots are ever kept. When the free list is empty, ``acquire()`` allocates a fresh
buffer (a *miss*); on ``release()`` a buffer is kept only while the free list holds fewer than
``capacity``, so a burst is served but never grows memory for good. In steady state every
acquire is a *hit* and the datapath allocates nothing.

Memory: a slot is sized for the largest frame any link may deliver (a TAP with offloads: a
64 KiB super-frame, at any MTU), but most frames are far smaller: every frame a QEMU stream or
datagram link carries is at most its MTU, and a bare ACK or a DNS answer is under 100 bytes. So
a large slot is a private anonymous ``mmap`` (:data:`MMAP_MIN`; private: plain process memory,
not the shared memory Python's default would make, and not shared with a forked helper), whose
pages the kernel provides only when first written: a slot costs resident memory for the bytes
frames actually used in it, not its size (a ``bytearray`` is zero-filled, which touches every
page at once). Slots are allocated only on a miss, so the ``mmap``/``munmap`` system calls stay
off the steady path.

The pool belongs to the one loop that uses it. Nothing here is thread-safe, by design: the loop is
the only owner (OpenVMM removed the locks from its single-owner RX pools for the same reason).
"""

from __future__ import annotations

import mmap

#: Bytes kept free in front of every frame for a link prefix (virtio-net header is 10 or 12).
HEADROOM = 16
#: Ethernet header plus one VLAN tag.
LINK_HEADERS = 18
#: Slots from this size up are anonymous mappings, resident only where written (see above).
MMAP_MIN = 16384


def slot_size_for(mtu: int, offloads: bool = True) -> int:
    """Slot size for a link of ``mtu``: the largest frame it can deliver, plus headroom.

    With TAP offloads a super-frame carries up to a full 64 KiB IP packet at any MTU, so the
    slot is sized for that unless the caller knows offloads are off.
    """
    l3 = max(mtu, 65535) if offloads else mtu
    return HEADROOM + LINK_HEADERS + l3


class Frame:
    """One frame buffer. The frame is ``view[start:start + length]``; ``start`` is HEADROOM.

    Offload metadata (set by the core only for a port that accepts offloads, reset by
    :meth:`FramePool.acquire`): ``csum_start >= 0`` means the L4 checksum is partial, the field
    at ``csum_start + csum_offset`` (offsets from ``start``) holding the pseudo-header sum, for
    the link (or the guest's kernel) to complete; ``gso_size > 0`` means the frame is a TCP
    (or, with the checksum at UDP's offset, a UDP) super-frame to be cut into segments of that
    many payload bytes where it must be (by the guest's kernel, or by the switch for a port
    without the offload: guestnet.core.gso).
    """

    __slots__ = ("buf", "csum_offset", "csum_start", "gso_size", "length", "start", "taken", "view")

    def __init__(self, size: int) -> None:
        self.buf: bytearray | mmap.mmap = (
            bytearray(size) if size < MMAP_MIN else mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        )
        self.view = memoryview(self.buf)
        self.start = HEADROOM
        self.length = 0
        self.taken = False
        self.csum_start = -1
        self.csum_offset = 0
        self.gso_size = 0

    @property
    def data(self) -> memoryview:
        """The frame's bytes."""
        return self.view[self.start : self.start + self.length]

    @property
    def room(self) -> memoryview:
        """Writable space from the frame's start to the end of the slot."""
        return self.view[self.start :]


class FramePool:
    """A bounded pool of frame buffers for one direction of one loop."""

    __slots__ = ("_free", "capacity", "high_water", "hits", "in_use", "misses", "mtu", "slot_size")

    def __init__(self, mtu: int, capacity: int = 256, slot_size: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("pool capacity must be at least 1")
        self.mtu = mtu
        self.capacity = capacity
        self.slot_size = slot_size if slot_size is not None else slot_size_for(mtu)
        self._free: list[Frame] = []
        self.in_use = 0
        self.hits = 0
        self.misses = 0
        self.high_water = 0

    @property
    def free_count(self) -> int:
        """Buffers on the free list now."""
        return len(self._free)

    def acquire(self) -> Frame:
        """Take an empty frame: from the free list if it has one, else a fresh buffer."""
        if self._free:
            frame = self._free.pop()
            self.hits += 1
        else:
            frame = Frame(self.slot_size)
            self.misses += 1
        frame.start = HEADROOM
        frame.length = 0
        frame.taken = True
        frame.csum_start = -1
        frame.csum_offset = 0
        frame.gso_size = 0
        self.in_use += 1
        if self.in_use > self.high_water:
            self.high_water = self.in_use
        return frame

    def release(self, frame: Frame) -> None:
        """Give a frame back. Beyond capacity the buffer is dropped, bounding memory."""
        assert frame.taken, "frame released twice"
        frame.taken = False
        self.in_use -= 1
        if len(self._free) < self.capacity:
            self._free.append(frame)

    def stats(self) -> dict[str, int]:
        """Counters for the stats API."""
        return {
            "capacity": self.capacity,
            "mtu": self.mtu,
            "free_count": len(self._free),
            "in_use": self.in_use,
            "hits": self.hits,
            "misses": self.misses,
            "high_water": self.high_water,
        }
