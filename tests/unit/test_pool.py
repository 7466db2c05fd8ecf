"""FramePool: lazy, bounded, burst-tolerant, and allocation-free in steady state."""

from __future__ import annotations

import pytest

from guestnet.pool import HEADROOM, LINK_HEADERS, Frame, FramePool, slot_size_for


def test_lazy_nothing_allocated_before_first_acquire() -> None:
    pool = FramePool(1500, capacity=8)
    assert pool.free_count == 0
    assert pool.stats() == {
        "capacity": 8,
        "mtu": 1500,
        "free_count": 0,
        "in_use": 0,
        "hits": 0,
        "misses": 0,
        "high_water": 0,
    }
    frame = pool.acquire()
    assert (pool.misses, pool.hits, pool.in_use, pool.free_count) == (1, 0, 1, 0)
    pool.release(frame)
    assert (pool.in_use, pool.free_count) == (0, 1)
    again = pool.acquire()
    assert again is frame
    assert (pool.misses, pool.hits) == (1, 1)
    pool.release(again)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FramePool(1500, capacity=0)


def test_frame_layout() -> None:
    pool = FramePool(1500, capacity=2, slot_size=2048)
    frame = pool.acquire()
    assert isinstance(frame, Frame)
    assert len(frame.buf) == 2048
    assert frame.start == HEADROOM
    assert frame.length == 0
    assert len(frame.room) == 2048 - HEADROOM
    frame.room[:3] = b"abc"
    frame.length = 3
    assert bytes(frame.data) == b"abc"
    assert frame.buf[HEADROOM : HEADROOM + 3] == b"abc"
    # A link may move start back into the headroom; acquire resets it.
    frame.start -= 4
    frame.length = 99
    pool.release(frame)
    frame = pool.acquire()
    assert (frame.start, frame.length) == (HEADROOM, 0)
    pool.release(frame)


def test_slot_size() -> None:
    assert slot_size_for(1500) == HEADROOM + LINK_HEADERS + 65535  # offloads: super-frames
    assert slot_size_for(1500, offloads=False) == HEADROOM + LINK_HEADERS + 1500
    assert slot_size_for(65520, offloads=False) == HEADROOM + LINK_HEADERS + 65520
    assert FramePool(9000).slot_size == slot_size_for(9000)


def test_burst_is_served_but_memory_stays_bounded() -> None:
    cap, extra = 16, 5
    pool = FramePool(1500, capacity=cap, slot_size=256)
    frames = [pool.acquire() for _ in range(cap + extra)]
    assert len({id(f) for f in frames}) == cap + extra
    assert (pool.misses, pool.hits, pool.in_use, pool.high_water) == (
        cap + extra,
        0,
        cap + extra,
        cap + extra,
    )
    for f in frames:
        pool.release(f)
        assert pool.free_count <= cap
    assert pool.free_count == cap
    assert pool.in_use == 0
    assert pool.high_water == cap + extra

    # The next burst of the same size: the kept buffers are hits, the rest misses again.
    frames = [pool.acquire() for _ in range(cap + extra)]
    assert pool.hits == cap
    assert pool.misses == 2 * (cap + extra) - cap
    for f in frames:
        pool.release(f)
    assert pool.free_count == cap


def test_free_list_never_exceeds_capacity_under_interleaving() -> None:
    pool = FramePool(1500, capacity=3, slot_size=64)
    held: list[Frame] = []
    for step in range(200):
        if step % 7 < 4:
            held.append(pool.acquire())
        elif held:
            pool.release(held.pop(0))
        assert pool.free_count <= pool.capacity
        assert pool.in_use == len(held)
    for f in held:
        pool.release(f)
    assert pool.in_use == 0


def test_double_release_is_an_assertion() -> None:
    pool = FramePool(1500, capacity=4, slot_size=64)
    frame = pool.acquire()
    pool.release(frame)
    with pytest.raises(AssertionError, match="released twice"):
        pool.release(frame)
    assert (pool.in_use, pool.free_count) == (0, 1)


def test_double_release_when_dropped_beyond_capacity() -> None:
    pool = FramePool(1500, capacity=1, slot_size=64)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)  # dropped: the free list is full
    with pytest.raises(AssertionError):
        pool.release(b)


def test_steady_state_has_no_misses_after_warm_up() -> None:
    pool = FramePool(1500, capacity=8, slot_size=128)
    # Warm up with the deepest pattern the workload uses: 3 frames in flight at once.
    for _ in range(3):
        warm = [pool.acquire() for _ in range(3)]
        for f in warm:
            pool.release(f)
    misses = pool.misses
    for _ in range(10_000):
        a = pool.acquire()
        b = pool.acquire()
        pool.release(a)
        c = pool.acquire()
        pool.release(c)
        pool.release(b)
    assert pool.misses == misses == 3
    assert pool.hits == 6 + 30_000
    assert pool.high_water == 3
    assert pool.in_use == 0


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_slots_are_resident_only_where_written() -> None:
    """64 super-frame slots holding small frames (a QEMU link's, ACKs, DNS answers) cost a page
    or two each, not 64 KiB: a large slot is an anonymous mapping, not a zero-filled buffer."""
    pool = FramePool(1500, capacity=64)
    assert pool.slot_size > 65536
    before = _rss_kb()
    frames = [pool.acquire() for _ in range(64)]
    for frame in frames:
        frame.room[:1514] = bytes(range(256)) * 5 + bytes(234)
        frame.length = 1514
    grown = _rss_kb() - before
    assert grown < 64 * 16, f"{grown} kB for 64 frames of 1514 bytes"
    assert bytes(frames[7].data[:3]) == b"\x00\x01\x02"
    # and the whole slot is usable: a full super-frame fits
    frames[0].room[: 65535 + LINK_HEADERS] = b"\xab" * (65535 + LINK_HEADERS)
    assert frames[0].room[65535 + LINK_HEADERS - 1] == 0xAB
    for frame in frames:
        pool.release(frame)


def test_small_slots_stay_bytearrays() -> None:
    frame = FramePool(1500, slot_size=2048).acquire()
    assert isinstance(frame.buf, bytearray)
