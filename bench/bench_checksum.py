"""Internet checksum cost by buffer size: the integer path, the numpy path, and the dispatch.

Run: .venv/bin/python bench/bench_checksum.py [--quick]

Prints the median time per call in microseconds over several repeats. ``int`` is the
``int.from_bytes(...) % 0xffff`` path, ``numpy`` the vectorised ``>u2`` sum, ``dispatch`` what
``guestnet.wire.checksum.checksum`` does (numpy from ``NUMPY_THRESHOLD`` bytes up). The last
column says which path wins at that size, so the threshold can be checked on a new machine.
Bounded: each cell runs for about 0.1 s (0.02 s with --quick).
"""

from __future__ import annotations

import os
import statistics
import sys
import timeit

from guestnet.wire import checksum as ck

SIZES = [64, 256, 512, 640, 768, 896, 1024, 1500, 4096, 9000, 16384, 65536]
REPEATS = 7


def median_us(fn: object, data: bytes, budget_s: float) -> float:
    timer = timeit.Timer(lambda: fn(data))  # type: ignore[operator]
    # Calibrate the loop count so one repeat takes about budget_s / REPEATS.
    n, t = 1, 0.0
    while True:
        t = timer.timeit(n)
        if t >= budget_s / REPEATS / 4 or n >= 1 << 20:
            break
        n *= 4
    n = max(1, int(n * (budget_s / REPEATS) / max(t, 1e-9)))
    runs = timer.repeat(REPEATS, n)
    return statistics.median(runs) / n * 1e6


def with_threshold(threshold: int) -> object:
    def run(data: bytes) -> int:
        saved = ck.NUMPY_THRESHOLD
        ck.NUMPY_THRESHOLD = threshold
        try:
            return ck.checksum(data)
        finally:
            ck.NUMPY_THRESHOLD = saved

    return run


def main() -> None:
    budget = 0.02 if "--quick" in sys.argv else 0.1
    ck.load_vector_path()  # as the datapath does above VECTOR_MIN_MTU
    pure = with_threshold(1 << 40)
    vect = with_threshold(0)
    # The wrappers above cost the same for both paths; time the dispatch through one too.
    disp = with_threshold(ck.NUMPY_THRESHOLD)
    print(f"checksum, median us per call (NUMPY_THRESHOLD = {ck.NUMPY_THRESHOLD})")
    print(f"{'bytes':>7} {'int':>9} {'numpy':>9} {'dispatch':>9}  faster")
    for size in SIZES:
        data = os.urandom(size)
        a = median_us(pure, data, budget)
        b = median_us(vect, data, budget)
        c = median_us(disp, data, budget)
        print(f"{size:>7} {a:>9.2f} {b:>9.2f} {c:>9.2f}  {'int' if a <= b else 'numpy'}")


if __name__ == "__main__":
    main()
