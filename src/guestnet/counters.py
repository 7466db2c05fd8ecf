"""Named counters: every drop and every notable decision has a dotted reason name.

The stats API shows them as ``{"arp.request.not_ours": 3, ...}``. One plain dict keeps the hot
path to a single dictionary update.
"""

from __future__ import annotations


class Counters:
    """A bag of named counters (reason -> count)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def inc(self, reason: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``reason``."""
        counts = self.counts
        counts[reason] = counts.get(reason, 0) + n

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy, sorted by name, for the API."""
        return dict(sorted(self.counts.items()))
