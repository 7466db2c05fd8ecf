"""Internet checksum cost by buffer size: the C extension against the pure-Python fallback.

Run: .venv/bin/python bench/bench_checksum.py [--quick]

Prints the thread CPU time per call in microseconds, the best of several batches. ``pure`` is
:func:`guestnet.wire.pure.checksum` (the buffer as one big integer modulo 0xffff, CPython's
C arithmetic), ``native`` the C extension's (``guestnet.wire._native``: 32-bit words summed into
64 bits). The ratio says what the extension buys at each size; numpy, which this package once
used from 768 bytes up (12 us at 64 KiB here), is gone because the C sum beats it everywhere.
Bounded: each cell runs for about 0.1 s (0.02 s with --quick).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable

from guestnet.wire import pure

SIZES = [20, 64, 256, 512, 1024, 1500, 4096, 9000, 16384, 65536]
REPEATS = 7


def best_us(fn: Callable[[bytes], int], data: bytes, budget_s: float) -> float:
    """Thread CPU µs per call, the best of REPEATS batches (robust to other jobs)."""
    clock = time.thread_time
    n, t = 1, 0.0
    while t < budget_s / REPEATS / 4 and n < 1 << 20:  # calibrate the batch size
        n *= 4
        t0 = clock()
        for _ in range(n):
            fn(data)
        t = clock() - t0
    n = max(1, int(n * (budget_s / REPEATS) / max(t, 1e-9)))
    best = float("inf")
    for _ in range(REPEATS):
        t0 = clock()
        for _ in range(n):
            fn(data)
        best = min(best, (clock() - t0) / n * 1e6)
    return best


def main() -> None:
    budget = 0.02 if "--quick" in sys.argv else 0.1
    try:
        from guestnet.wire import _native
    except ImportError:
        print("guestnet.wire._native is not built: only the pure path is measured")
        _native = None  # type: ignore[assignment]
    print("checksum, thread CPU µs per call (best batch)")
    print(f"{'bytes':>7} {'pure':>9} {'native':>9} {'pure/native':>12}")
    for size in SIZES:
        data = random.Random(size).randbytes(size)
        a = best_us(pure.checksum, data, budget)
        if _native is None:
            print(f"{size:>7} {a:>9.2f}")
            continue
        b = best_us(_native.checksum, data, budget)
        print(f"{size:>7} {a:>9.2f} {b:>9.2f} {a / b:>11.1f}x")


if __name__ == "__main__":
    main()
