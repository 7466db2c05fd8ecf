"""TimerHeap: order, cancel, honest len(), and cancelled timers that pin nothing (issue 9e)."""

from __future__ import annotations

import gc
import weakref

from hypothesis import given, settings
from hypothesis import strategies as st

from guestnet.core.timers import COMPACT_MIN, TimerHeap


class Holder:
    """Stands for the state a callback closes over (a TCP flow and its socket)."""

    def __init__(self) -> None:
        self.fired: list[float] = []

    def on_timer(self, now: float) -> None:
        self.fired.append(now)


def test_cancelled_timer_lets_go_of_its_callback() -> None:
    heap = TimerHeap()
    holder = Holder()
    timer = heap.call_at(7440.0, holder.on_timer)
    gone = weakref.ref(holder)
    del holder
    timer.cancel()
    gc.collect()
    assert gone() is None, "a cancelled timer still holds its callback's state"
    assert heap.run_due(10_000.0) == 0


def test_fired_timer_lets_go_of_its_callback() -> None:
    heap = TimerHeap()
    holder = Holder()
    timer = heap.call_at(1.0, holder.on_timer)
    gone = weakref.ref(holder)
    del holder
    assert heap.run_due(2.0) == 1
    gc.collect()
    assert gone() is None
    assert timer.cancelled
    timer.cancel()  # after firing: harmless, and len() is not disturbed
    assert len(heap) == 0 and heap.entries() == 0


def test_len_counts_live_timers_only() -> None:
    heap = TimerHeap()
    timers = [heap.call_at(float(i), lambda _n: None) for i in range(10)]
    assert len(heap) == 10
    timers[3].cancel()
    timers[3].cancel()  # twice: counted once
    assert len(heap) == 9
    assert heap.run_due(4.5) == 4  # 0, 1, 2, 4 fire; 3 was cancelled
    assert len(heap) == 5
    assert heap.next_deadline() == 5.0


def test_heap_compacts_when_cancelled_entries_outnumber_live_ones() -> None:
    heap = TimerHeap()
    n = 10 * COMPACT_MIN
    timers = [heap.call_at(1000.0 + i, lambda _n: None) for i in range(n)]
    for t in timers[: n - COMPACT_MIN]:
        t.cancel()
        assert heap.entries() <= 2 * len(heap) + 1 or heap.entries() < COMPACT_MIN
    assert len(heap) == COMPACT_MIN
    assert heap.entries() <= 2 * COMPACT_MIN
    assert heap.run_due(1e9) == COMPACT_MIN
    assert len(heap) == 0


def test_firing_order_after_compaction_and_cancels_from_callbacks() -> None:
    heap = TimerHeap()
    order: list[int] = []
    far = [heap.call_at(500.0 + i, lambda _n: None) for i in range(4 * COMPACT_MIN)]

    def first(_now: float) -> None:
        order.append(1)
        for t in far:  # cancelled from inside run_due: the heap is rebuilt under it
            t.cancel()

    heap.call_at(1.0, first)
    heap.call_at(2.0, lambda _n: order.append(2))
    heap.call_at(2.0, lambda _n: order.append(3))  # same deadline: in the order set
    heap.call_at(3.0, lambda _n: order.append(4))
    assert heap.run_due(10.0) == 4
    assert order == [1, 2, 3, 4]
    assert len(heap) == 0
    assert heap.entries() < COMPACT_MIN


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 50)),
            st.tuples(st.just("cancel"), st.integers(0, 10_000)),
            st.tuples(st.just("run"), st.integers(0, 50)),
        ),
        max_size=300,
    )
)
def test_matches_a_plain_model(ops: list[tuple[str, int]]) -> None:
    """Against a list of (deadline, id) pairs: same firings, same order, same len()."""
    heap = TimerHeap()
    model: dict[int, float] = {}
    handles = []
    fired: list[int] = []
    expected: list[int] = []
    for op, arg in ops:
        if op == "add":
            ident = len(handles)
            handles.append(heap.call_at(float(arg), lambda _n, i=ident: fired.append(i)))
            model[ident] = float(arg)
        elif op == "cancel" and handles:
            ident = arg % len(handles)
            handles[ident].cancel()
            model.pop(ident, None)
        elif op == "run":
            due = sorted((w, i) for i, w in model.items() if w <= arg)
            expected += [i for _, i in due]
            for _, i in due:
                del model[i]
            heap.run_due(float(arg))
        assert len(heap) == len(model)
        assert heap.entries() <= max(2 * len(model) + 1, COMPACT_MIN)
        assert heap.next_deadline() == (min(model.values()) if model else None)
    assert fired == expected
