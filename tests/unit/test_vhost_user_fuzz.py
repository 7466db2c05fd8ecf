"""Hostile guests against the virtqueue walker and the vhost-user link.

Guest memory is guest input: descriptors pointing outside every region or across a region's end,
loops, zero and huge lengths, stray INDIRECT flags, nonsense avail indices, and a new memory
table while frames are in flight. Nothing may raise out of the loop; every descriptor that is
accepted must lie wholly inside one region; the link stays open and its pools balance.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.io import vhost_user as vu
from guestnet.wire import virtio
from guestnet.wire.virtio import GuestMemory, Region, VirtQueue

from .test_vhost_user import Rig
from .vhost_fake import GPA_BASE, QUEUE_SIZE, UADDR_BASE

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

N = 16
#: Two regions with a hole between them; descriptors may point anywhere around them.
R0 = (0x1000, 0x2000)
R1 = (0x8000, 0x1000)
RING_BASE = 0x1000

_addr = st.one_of(
    st.integers(0, 0xA000),
    st.sampled_from([R0[0] + R0[1] - 1, R1[0] - 1, 2**64 - 1, 2**63]),
)
_len = st.one_of(st.integers(0, 0x3000), st.sampled_from([0, 1, 2**32 - 1, 2**31]))
_flags = st.integers(0, 7)
_desc = st.tuples(_addr, _len, _flags, st.integers(0, N + 2))


def _memory() -> tuple[GuestMemory, bytearray, bytearray]:
    m0 = bytearray(R0[1])
    m1 = bytearray(R1[1])
    mem = GuestMemory(
        [Region(R0[0], R0[1], R0[0], memoryview(m0)), Region(R1[0], R1[1], R1[0], memoryview(m1))]
    )
    return mem, m0, m1


def _inside(addr: int, length: int) -> bool:
    return any(base <= addr and addr + length <= base + size for base, size in (R0, R1))


@settings(FUZZ_SETTINGS, max_examples=1500)
@given(
    descs=st.lists(_desc, min_size=N, max_size=N),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=N, max_size=N),
    avail_idx=st.one_of(st.integers(0, N), st.integers(0, 0xFFFF)),
    writable=st.booleans(),
)
def test_walker_checks_every_descriptor(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int, writable: bool
) -> None:
    mem, m0, _m1 = _memory()
    # Rings live at the start of region 0 (QEMU virtual = guest-physical here).
    q = _rx_queue(mem, m0, descs, heads, avail_idx, index=1)
    n = q.pending()
    if avail_idx > N:
        assert n == 0 and q.broken
        return
    assert n == avail_idx
    for _ in range(n):
        head = q.pop()
        err, total = q.walk(head, mem, writable)
        if err == virtio.WALK_OK:
            # Re-walk independently: every descriptor of an accepted chain is in one region,
            # has the right direction, no INDIRECT, no loop, and the views match the lengths.
            i, seen, lens = head, set(), []
            while True:
                assert i < N and i not in seen
                seen.add(i)
                a, ln, fl, nx = descs[i]
                assert not fl & virtio.VRING_DESC_F_INDIRECT
                assert bool(fl & virtio.VRING_DESC_F_WRITE) == writable
                if ln:
                    assert _inside(a, ln)
                    lens.append(ln)
                if not fl & virtio.VRING_DESC_F_NEXT:
                    break
                i = nx
            assert [len(b) for b in q.bufs] == lens and total == sum(lens) > 0
        q.release_bufs()
        q.push(head, 0)
    q.publish()
    assert struct.unpack_from("<H", m0, USED_AT + 2)[0] == n
    q.unmap()
    mem.release()


@settings(FUZZ_SETTINGS, max_examples=25)
@given(
    chains=st.lists(
        st.lists(st.tuples(st.integers(-0x1000, 0x900000), _len, _flags), min_size=1, max_size=5),
        min_size=1,
        max_size=12,
    ),
    remap_at=st.integers(0, 12),
    bogus_idx=st.booleans(),
)
def test_link_survives_hostile_tx_ring(
    chains: list[list[tuple[int, int, int]]], remap_at: int, bogus_idx: bool
) -> None:
    rig = Rig()
    try:
        drv = rig.drv
        d = 0
        for k, chain in enumerate(chains):
            head = d
            for j, (off, ln, fl) in enumerate(chain):
                nxt = (d + 1) % QUEUE_SIZE if j < len(chain) - 1 else 0
                flags = fl | (virtio.VRING_DESC_F_NEXT if j < len(chain) - 1 else 0)
                drv.write_desc(1, d, (GPA_BASE + off) & (2**64 - 1), ln, flags, nxt)
                d = (d + 1) % QUEUE_SIZE
            drv.make_avail(1, head)
            if k == remap_at:
                # A new memory table while these chains wait in the ring.
                payload = rig.fe.mem_table_payload([(GPA_BASE, rig.fe.mem_size, UADDR_BASE, 0)])
                rig.fe.send(vu.SET_MEM_TABLE, payload, [rig.fe.memfd], need_reply=True)
                rig.step()
                assert struct.unpack("=Q", rig.fe.recv_reply(vu.SET_MEM_TABLE))[0] == 0
        if bogus_idx:
            _d, a, _u = rig.fe.ring_offsets(1)
            struct.pack_into("<H", rig.fe.mem, a + 2, (drv.avail_idx[1] + 1000) & 0xFFFF)
        drv.kick(1)
        rig.step()
        rig.step()
        link = rig.link
        assert not link.closed
        if bogus_idx:
            assert link.queues[1].broken and link.drops.get("tx.ring_broken", 0) >= 1
        else:
            # Every chain came back, good or bad.
            assert len(drv.used(1)) == len(chains)
            assert link.frames_from_guest + sum(link.drops.values()) >= len(chains)
    finally:
        rig.close()
    assert rig.inst.pool_from_guest.in_use == 0
    assert rig.inst.pool_to_guest.in_use == 0


#: Where a test queue's rings sit in region 0: descriptor table, available ring, used ring.
DESC_AT, AVAIL_AT, USED_AT = 0, 16 * N, 16 * N + 4 + 2 * N + 2


def _rx_queue(mem: GuestMemory, m0: bytearray, descs: list[tuple[int, int, int, int]],
              heads: list[int], avail_idx: int, index: int = 0) -> VirtQueue:  # fmt: skip
    """Queue ``index`` over ring memory at the start of region 0 holding ``descs`` and
    ``heads``, ``avail_idx`` published."""
    q = VirtQueue(index)
    q.num = N
    q.addrs = (RING_BASE + DESC_AT, RING_BASE + AVAIL_AT, RING_BASE + USED_AT)
    q.enabled = q.started = True
    assert q.map(mem)
    for i, (a, ln, fl, nx) in enumerate(descs):
        struct.pack_into("<QIHH", m0, DESC_AT + 16 * i, a & (2**64 - 1), ln, fl, nx)
    for i, h in enumerate(heads):
        struct.pack_into("<H", m0, AVAIL_AT + 4 + 2 * i, h)
    struct.pack_into("<H", m0, AVAIL_AT + 2, avail_idx)
    return q


_any_head = st.integers(0, 0xFFFF)


@settings(FUZZ_SETTINGS, max_examples=1500)
@given(
    descs=st.lists(_desc, min_size=N, max_size=N),
    heads=st.lists(st.one_of(st.integers(0, N - 1), _any_head), min_size=N, max_size=N),
    avail_idx=st.integers(0, N),
    need=st.integers(1, 0x6000),
    mergeable=st.booleans(),
)
def test_take_writable_takes_what_the_walker_would(
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    need: int,
    mergeable: bool,
) -> None:
    """The RX path's own loop (a fast path for lone writable descriptors) takes exactly the
    chains and buffers that popping and walking each chain would, with the same verdict; every
    buffer it takes lies inside a region."""
    mem, m0, _m1 = _memory()
    q = _rx_queue(mem, m0, descs, heads, avail_idx)
    spans: list[tuple[memoryview, int, int]] = []
    used: list[tuple[int, int]] = []
    err = q.take_writable(mem, need, spans, used, mergeable)

    ref = VirtQueue(0)
    ref.num, ref.addrs, ref.enabled, ref.started = N, q.addrs, True, True
    assert ref.map(mem)
    ref_spans: list[tuple[memoryview, int, int]] = []
    ref_used: list[tuple[int, int]] = []
    room, ref_err = 0, virtio.WALK_OK
    while room < need:
        if not ref.pending():
            ref_err = virtio.TAKE_SHORT
            break
        head = ref.pop()
        e, total = ref.walk_spans(head, mem, True)
        if e != virtio.WALK_OK:
            ref_err = e
            break
        ref_used.append((head, min(total, need - room)))
        ref_spans += ref.spans
        room += total
        if not mergeable and room < need:
            ref_err = virtio.TAKE_SHORT
            break
    assert err == ref_err
    assert used == ref_used
    assert [(id(v), o, n) for v, o, n in spans] == [(id(v), o, n) for v, o, n in ref_spans]
    assert (q.last_avail, q.in_flight) == (ref.last_avail, ref.in_flight)
    for view, off, n in spans:
        assert n > 0 and off >= 0 and off + n <= len(view)
    if err == virtio.WALK_OK:
        assert sum(n for _, n in used) == need
    spans.clear()
    ref_spans.clear()
    q.unmap()
    ref.unmap()
    mem.release()


def test_take_writable_refuses_a_lone_buffer_one_byte_past_a_region() -> None:
    """The fast path's bound is exact: a buffer ending at a region's last byte is taken, one
    ending a byte later (past the end of region 0, into the hole) stops the queue's frame."""
    mem, m0, _m1 = _memory()
    end0 = R0[0] + R0[1]
    ok = (end0 - 0x100, 0x100, virtio.VRING_DESC_F_WRITE, 0)
    past = (end0 - 0x100, 0x101, virtio.VRING_DESC_F_WRITE, 0)
    q = _rx_queue(mem, m0, [ok, past] + [(0, 0, 0, 0)] * (N - 2), [0, 1] + [0] * (N - 2), 2)
    spans: list[tuple[memoryview, int, int]] = []
    used: list[tuple[int, int]] = []
    assert q.take_writable(mem, 0x100, spans, used, True) == virtio.WALK_OK
    assert used == [(0, 0x100)] and [(o, n) for _, o, n in spans] == [(R0[1] - 0x100, 0x100)]
    spans.clear()
    used.clear()
    assert q.take_writable(mem, 0x80, spans, used, True) == virtio.WALK_OUT_OF_MEMORY
    assert spans == [] and used == []
    q.unmap()
    mem.release()
