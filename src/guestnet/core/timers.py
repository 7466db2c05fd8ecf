"""TimerWheel: deadlines for the sans-I/O core, driven by whoever owns the clock.

Services schedule callbacks at absolute times (seconds on the monotonic clock the loop passes
in). The loop asks :meth:`next_deadline` to size its epoll timeout and calls :meth:`run_due`
with the current time; tests call ``run_due`` with a scripted time instead. Cancelled timers are
left in the heap and skipped when they surface, which keeps cancel O(1).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Timer:
    """A scheduled callback; ``cancel()`` makes it a no-op."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[float], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Stop this timer from firing."""
        self.cancelled = True


class TimerWheel:
    """A heap of timers keyed by deadline."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_at(self, when: float, callback: Callable[[float], None]) -> Timer:
        """Run ``callback(now)`` once the clock reaches ``when``."""
        timer = Timer(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> int:
        """Fire every timer due at ``now``; return how many fired."""
        heap = self._heap
        fired = 0
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback(now)
                fired += 1
        return fired

    def __len__(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)
