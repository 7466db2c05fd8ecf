"""Split virtqueues over guest memory: descriptor walking, address translation, used-ring updates.

Theory of operation
-------------------
A vhost-user back-end reads and writes the guest's rings and buffers directly in shared memory.
This module is the sans-I/O half of that: it takes memoryviews over guest memory (mapped by
:mod:`guestnet.io.vhost_user`) and never touches a socket, an fd or the clock.

Guest memory is a list of :class:`Region`: each maps a guest-physical range (``gpa``, ``size``)
that QEMU also sees at virtual address ``uaddr``. The ring addresses (SET_VRING_ADDR) are QEMU
virtual addresses, matched against ``uaddr``; the buffer addresses inside descriptors are
guest-physical, matched against ``gpa``. :meth:`GuestMemory.gpa_view` returns a view only when
the whole range lies inside one region: a memoryview slice silently truncates past its end, so
every bound is checked here, never left to slicing.

A split ring of ``num`` entries (all little-endian): descriptors ``num x (u64 addr, u32 len,
u16 flags, u16 next)``; avail ``u16 flags, u16 idx, u16 ring[num]``; used ``u16 flags, u16 idx,
{u32 id, u32 len}[num]``. The device takes ``avail.ring[last_avail % num]``, walks the chain
(each descriptor read once, into locals: the guest may rewrite it meanwhile), writes
``{head, written}`` into the used ring and only then publishes ``used.idx`` with one 16-bit store.
On x86-64 stores stay in order, so the guest never sees the index before the element (the link
refuses to start elsewhere).

Cost. In Python the per-buffer bookkeeping, not the copy, is what a frame pays for: a 64 KiB
frame toward the guest spreads over about 17 mergeable buffers. So a walk records each buffer as
``(region view, offset, length)`` (:attr:`VirtQueue.spans`) and makes no memoryview for it; the
RX path takes all the chains of one frame in one loop (:meth:`VirtQueue.take_writable`, lone
writable descriptors without a walk) and copies into the spans with one slice assignment each,
and returns the chains with one :meth:`VirtQueue.push_many`.

Guest memory is guest input. A chain longer than ``num`` (a loop), a ``next`` out of range, an
INDIRECT descriptor (never negotiated here), a buffer outside every region, a device-writable
buffer in a TX chain or a read-only one in an RX chain: each makes :meth:`VirtQueue.walk` return
an error code (a counted drop; the chain is still returned to the guest with length 0). An avail
index more than ``num`` ahead of ours means the ring itself is corrupt: the queue is marked
``broken`` and stops, as the virtio spec lets a device do (``DEVICE_NEEDS_RESET``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: Descriptor flags.
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
#: avail.flags: the driver asks for no interrupt (we signal once per batch regardless).
VRING_AVAIL_F_NO_INTERRUPT = 1

#: Virtio feature bits offered by the net device.
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_RING_F_INDIRECT_DESC = 28
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

#: The virtio-net header with VERSION_1 (``num_buffers`` included).
VNET_HDR_LEN = 12

#: Walk results (0 is success).
WALK_OK = 0
WALK_LOOP = 1
WALK_BAD_NEXT = 2
WALK_INDIRECT = 3
WALK_OUT_OF_MEMORY = 4
WALK_WRONG_DIRECTION = 5
WALK_EMPTY = 6
#: :meth:`VirtQueue.take_writable`: the chains posted cannot hold the frame (yet).
TAKE_SHORT = 7
#: Counter names for the walk errors, by code.
WALK_ERRORS = ("ok", "loop", "bad_next", "indirect", "out_of_region", "wrong_direction", "empty")

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
#: Largest ring the spec allows for a split queue.
MAX_QUEUE_SIZE = 32768


@dataclass
class Region:
    """One guest memory region: guest-physical ``gpa`` .. ``gpa + size`` and QEMU's ``uaddr``.

    ``view`` covers exactly the region's ``size`` bytes (the link maps it).
    """

    gpa: int
    size: int
    uaddr: int
    view: memoryview


class GuestMemory:
    """The guest's memory regions, with bounds-checked translation from both address kinds."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = regions

    def gpa_view(self, addr: int, length: int) -> memoryview | None:
        """The view of guest-physical ``addr .. addr + length``; None unless inside one region."""
        for r in self.regions:
            off = addr - r.gpa
            if off >= 0 and off + length <= r.size:
                return r.view[off : off + length]
        return None

    def uaddr_view(self, addr: int, length: int) -> memoryview | None:
        """The view of QEMU virtual ``addr .. addr + length`` (ring addresses), or None."""
        for r in self.regions:
            off = addr - r.uaddr
            if off >= 0 and off + length <= r.size:
                return r.view[off : off + length]
        return None

    def release(self) -> None:
        """Release the region views (before the mappings under them are closed)."""
        for r in self.regions:
            r.view.release()
        self.regions = []


class VirtQueue:
    """One split virtqueue: the device's side of it (see the module docstring)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.last_avail = 0
        self.used_idx = 0
        self.enabled = False
        #: Started by its kick fd (SET_VRING_KICK), stopped by GET_VRING_BASE.
        self.started = False
        self.broken = False
        #: Ring addresses (QEMU virtual), as SET_VRING_ADDR gave them.
        self.addrs: tuple[int, int, int] | None = None
        self.desc: memoryview | None = None
        self.avail: memoryview | None = None
        self.used: memoryview | None = None
        #: Buffers of the chain last walked, as views (:meth:`walk`).
        self.bufs: list[memoryview] = []
        #: Buffers of the chain last walked as ``(region view, offset, length)``: no view is
        #: made per buffer (:meth:`walk_spans`; the RX path copies straight into them).
        self.spans: list[tuple[memoryview, int, int]] = []
        #: Chains popped but not yet pushed back (their heads).
        self.in_flight = 0

    @property
    def ready(self) -> bool:
        """Rings mapped, enabled and not broken: the device may use the queue."""
        return self.desc is not None and self.enabled and self.started and not self.broken

    def map(self, mem: GuestMemory) -> bool:
        """Translate the ring addresses through ``mem``; False (and unmapped) if any is outside."""
        self.unmap()
        if self.addrs is None or not self.num:
            return False
        d, a, u = self.addrs
        n = self.num
        desc = mem.uaddr_view(d, 16 * n)
        avail = mem.uaddr_view(a, 4 + 2 * n)
        used = mem.uaddr_view(u, 4 + 8 * n)
        if desc is None or avail is None or used is None:
            for v in (desc, avail, used):
                if v is not None:
                    v.release()
            return False
        self.desc, self.avail, self.used = desc, avail, used
        return True

    def unmap(self) -> None:
        """Drop the ring views (no view of guest memory left alive)."""
        for v in (self.desc, self.avail, self.used):
            if v is not None:
                v.release()
        self.desc = self.avail = self.used = None
        for b in self.bufs:
            b.release()
        self.bufs.clear()
        self.spans.clear()

    def pending(self) -> int:
        """How many chains the guest has made available; marks the queue broken if nonsense."""
        avail = self.avail
        if avail is None or self.broken:
            return 0
        idx: int = _U16.unpack_from(avail, 2)[0]
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.num:
            self.broken = True
            return 0
        return n

    def pop(self) -> int:
        """The head of the next available chain (call only when :meth:`pending` > 0)."""
        assert self.avail is not None
        head: int = _U16.unpack_from(self.avail, 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.in_flight += 1
        return head

    def walk(self, head: int, mem: GuestMemory, writable: bool) -> tuple[int, int]:
        """Walk the chain at ``head`` into :attr:`bufs` (a view per buffer); return ``(error,
        total_bytes)`` as :meth:`walk_spans` does."""
        err, total = self.walk_spans(head, mem, writable)
        bufs = self.bufs
        for b in bufs:
            b.release()
        bufs.clear()
        for view, off, length in self.spans:
            bufs.append(view[off : off + length])
        return err, total

    def walk_spans(self, head: int, mem: GuestMemory, writable: bool) -> tuple[int, int]:
        """Walk the chain at ``head`` into :attr:`spans`; return ``(error, total_bytes)``.

        ``writable``: the direction every descriptor must have (RX chains are device-writable,
        TX chains read-only). Zero-length descriptors are skipped. Each buffer is checked to lie
        wholly inside one region (:meth:`GuestMemory.gpa_view`'s rule, inlined: this runs per
        descriptor).
        """
        desc = self.desc
        assert desc is not None
        spans = self.spans
        spans.clear()
        regions = mem.regions
        n = self.num
        want = VRING_DESC_F_WRITE if writable else 0
        i = head
        total = 0
        for _ in range(n):
            if i >= n:
                return WALK_BAD_NEXT, total
            addr, length, flags, nxt = _DESC.unpack_from(desc, 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                return WALK_INDIRECT, total
            if (flags & VRING_DESC_F_WRITE) != want:
                return WALK_WRONG_DIRECTION, total
            if length:
                for r in regions:
                    off = addr - r.gpa
                    if off >= 0 and off + length <= r.size:
                        spans.append((r.view, off, length))
                        break
                else:
                    return WALK_OUT_OF_MEMORY, total
                total += length
            if not flags & VRING_DESC_F_NEXT:
                return (WALK_OK if total else WALK_EMPTY), total
            i = nxt
        return WALK_LOOP, total

    def take_writable(
        self,
        mem: GuestMemory,
        need: int,
        spans: list[tuple[memoryview, int, int]],
        used: list[tuple[int, int]],
        mergeable: bool,
    ) -> int:
        """Pop RX chains until their buffers hold ``need`` bytes (the device's side of one frame
        toward the guest): each chain's buffers go on ``spans`` and ``(head, bytes it will hold)``
        on ``used``. Returns :data:`WALK_OK`; :data:`TAKE_SHORT` when the guest has not posted
        enough (or, without ``mergeable``, one chain cannot hold it all); or the walk error of a
        bad chain. On anything but WALK_OK the caller gives the chains back (``len(used)`` of
        them, see the link's rollback) or stops the queue.

        A chain of one writable descriptor (what Linux posts with mergeable buffers) is taken
        here without :meth:`walk_spans`, with the same checks; any other goes through it.
        """
        avail = self.avail
        desc = self.desc
        assert avail is not None and desc is not None
        num = self.num
        regions = mem.regions
        room = 0
        ready = self.pending()
        while room < need:
            if not ready:
                ready = self.pending()  # the guest may have posted more meanwhile
                if not ready:
                    return TAKE_SHORT
            ready -= 1
            last = self.last_avail
            head: int = _U16.unpack_from(avail, 4 + 2 * (last % num))[0]
            self.last_avail = (last + 1) & 0xFFFF
            self.in_flight += 1
            if head < num:
                addr, length, flags, _nxt = _DESC.unpack_from(desc, 16 * head)
                if flags == VRING_DESC_F_WRITE and length:
                    for r in regions:
                        off = addr - r.gpa
                        if off >= 0 and off + length <= r.size:
                            spans.append((r.view, off, length))
                            break
                    else:
                        return WALK_OUT_OF_MEMORY
                    used.append((head, min(length, need - room)))
                    room += length
                    if not mergeable and room < need:
                        return TAKE_SHORT
                    continue
            err, total = self.walk_spans(head, mem, True)
            if err != WALK_OK:
                return err
            used.append((head, min(total, need - room)))
            spans += self.spans
            room += total
            if not mergeable and room < need:
                return TAKE_SHORT
        return WALK_OK

    def release_bufs(self) -> None:
        """Release the views of the chain last walked."""
        for b in self.bufs:
            b.release()
        self.bufs.clear()

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes (visible after :meth:`publish`)."""
        used = self.used
        assert used is not None
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.num), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.in_flight:
            self.in_flight -= 1

    def push_many(self, chains: list[tuple[int, int]]) -> None:
        """Return several chains ``(head, written)`` at once (visible after :meth:`publish`)."""
        used = self.used
        assert used is not None
        num = self.num
        idx = self.used_idx
        pack = _USED_ELEM.pack_into
        for head, written in chains:
            pack(used, 4 + 8 * (idx % num), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self.in_flight = max(0, self.in_flight - len(chains))

    def publish(self) -> None:
        """Publish ``used.idx`` (one 16-bit store, after the elements)."""
        used = self.used
        if used is not None:
            _U16.pack_into(used, 2, self.used_idx)

    def reset(self) -> None:
        """Stop the queue (GET_VRING_BASE, disconnect): rings forgotten until set up again."""
        self.unmap()
        self.addrs = None
        self.started = False
        self.broken = False
        self.in_flight = 0
