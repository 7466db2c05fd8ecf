"""TimerHeap: deadlines for the sans-I/O core, driven by whoever owns the clock.

Services schedule callbacks at absolute times (seconds on the monotonic clock the loop passes
in). The loop asks :meth:`TimerHeap.next_deadline` to size its epoll timeout and calls
:meth:`TimerHeap.run_due` with the current time; tests call ``run_due`` with a scripted time
instead.

Theory of operation. The timers sit in a binary heap of ``(when, seq, timer)`` entries; ``seq``
keeps equal deadlines in the order they were set. Cancelling does not search the heap (that
would be O(n)): the timer is only marked, and its entry is dropped when it reaches the top. A
cancelled entry must not pin memory meanwhile, though, and some deadlines are hours away (a TCP
flow's idle timeout: every closed connection cancels one). So ``cancel`` also drops the
callback, which is what holds the caller's state (a closure over a whole flow), and the heap
counts its cancelled entries: when they outnumber the live ones it is rebuilt from the live ones
alone (O(n), after at least n/2 cancels since the last rebuild: amortised O(1) per cancel). The
heap therefore never holds more than about twice the live timers, and ``len()`` (live timers:
entries minus cancelled ones) is O(1).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

#: Below this many entries the heap is never rebuilt (not worth it).
COMPACT_MIN = 64


def _cancelled_callback(_now: float) -> None:
    """What a cancelled timer holds instead of its callback (never called)."""


class Timer:
    """A scheduled callback; ``cancel()`` makes it a no-op and lets go of the callback."""

    __slots__ = ("_heap", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[float], None], heap: TimerHeap) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        #: The heap while the timer is in it; None once it fired or left.
        self._heap: TimerHeap | None = heap

    def cancel(self) -> None:
        """Stop this timer from firing (idempotent; harmless after it fired)."""
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = _cancelled_callback
        heap = self._heap
        if heap is not None:
            self._heap = None
            heap._cancelled_one()


class TimerHeap:
    """A heap of timers keyed by deadline, with lazy deletion and compaction."""

    __slots__ = ("_cancelled", "_seq", "heap")

    def __init__(self) -> None:
        #: The entries; read-only outside this class (the loop peeks at the top to skip
        #: calls on turns with nothing due, see ``Loop.run_once``).
        self.heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        #: Entries in ``heap`` whose timer was cancelled.
        self._cancelled = 0

    def call_at(self, when: float, callback: Callable[[float], None]) -> Timer:
        """Run ``callback(now)`` once the clock reaches ``when``."""
        timer = Timer(when, callback, self)
        heapq.heappush(self.heap, (when, next(self._seq), timer))
        return timer

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        heap = self.heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> int:
        """Fire every timer due at ``now``; return how many fired.

        A callback may set or cancel timers (and so rebuild the heap): the loop looks at the
        top afresh each time.
        """
        heap = self.heap
        fired = 0
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer._heap = None
            timer.cancelled = True
            callback = timer.callback
            timer.callback = _cancelled_callback
            callback(now)
            fired += 1
        if fired:
            # Timers that fire leave the cancelled ones behind as a larger share.
            self._compact_if_due()
        return fired

    def _cancelled_one(self) -> None:
        """A timer in the heap was cancelled: count it, rebuild when cancelled ones dominate."""
        self._cancelled += 1
        self._compact_if_due()

    def _compact_if_due(self) -> None:
        """Rebuild the heap from its live entries when cancelled ones are more than half."""
        heap = self.heap
        if self._cancelled * 2 > len(heap) and len(heap) >= COMPACT_MIN:
            # In place: run_due holds a reference to this list.
            heap[:] = [entry for entry in heap if not entry[2].cancelled]
            heapq.heapify(heap)
            self._cancelled = 0

    def entries(self) -> int:
        """Entries in the heap, live and cancelled: what it holds in memory."""
        return len(self.heap)

    def __len__(self) -> int:
        """Live (pending, not cancelled) timers."""
        return len(self.heap) - self._cancelled
