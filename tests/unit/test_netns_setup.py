"""The TAP's transmit queue length guestnet sets on a namespace guest's interface (issue 12)."""

from __future__ import annotations

from guestnet.io.netns import (
    TAP_QUEUE_BYTES,
    TAP_TXQLEN_DEFAULT,
    TAP_TXQLEN_MAX,
    tap_txqueuelen,
)


def test_txqueuelen_holds_eight_mib_of_full_frames_at_mtu_1500() -> None:
    assert tap_txqueuelen(1500) == 5592
    assert tap_txqueuelen(1500) * 1500 <= TAP_QUEUE_BYTES


def test_txqueuelen_never_below_the_kernel_default_at_a_large_mtu() -> None:
    assert tap_txqueuelen(9000) == TAP_TXQLEN_DEFAULT == 1000
    assert tap_txqueuelen(65520) == 1000


def test_txqueuelen_capped_at_a_small_mtu() -> None:
    assert tap_txqueuelen(576) == TAP_TXQLEN_MAX == 8192
    assert tap_txqueuelen(68) == TAP_TXQLEN_MAX
