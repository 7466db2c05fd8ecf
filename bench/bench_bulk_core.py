"""CPU per MB of host->guest bulk through the TCP core alone (issue 12: the retransmit copy).

Run: ``.venv/bin/python bench/bench_bulk_core.py [--lag FRAMES] [--mb N] [--runs N]``; for an
A/B, ``PYTHONPATH=OTHER/src`` runs another tree (runs of the two interleaved by the caller).

The sans-I/O TCP NAT on the unit tests' harness (tests/unit/test_offload.py: a port that takes
TSO super-frames, a fake host socket): the host side is given 1 MiB at a time, the core reads it
into super-frames and keeps the retransmit copy, and the guest acknowledges all but the last
``--lag`` frames after each read, so up to ``lag`` super-frames (8: ~0.5 MiB, 48: ~3 MiB) stay
in flight as under real bulk. Frames to the guest are released without a copy. Prints the
thread CPU time per MB moved, min and median over ``--runs``: robust to a busy machine, and
what the retransmit buffer and the read batch cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from guestnet.io.tap import TSO_MAX_PACKET  # noqa: E402
from guestnet.pool import Frame  # noqa: E402
from guestnet.wire.tcp import ACK  # noqa: E402
from tests.conftest import CoreHarness, FrameBuilders  # noqa: E402
from tests.unit.test_offload import ISN, OUR_ISS, Harness  # noqa: E402


def run(total_mb: int, lag: int) -> float:
    """µs of CPU per MB for ``total_mb`` MB host to guest."""
    core = CoreHarness(mtu=1500)
    h = Harness(core, FrameBuilders, TSO_MAX_PACKET)
    h.open()
    lengths: list[int] = []

    def collect(frame: Frame) -> None:
        lengths.append(frame.length - 54)
        core.pool.release(frame)

    h.port.send = collect  # type: ignore[method-assign]
    chunk = bytes(1 << 20)
    acked = OUR_ISS + 1
    t0 = time.thread_time()
    for _ in range(total_mb):
        h.sock.readable += chunk
        h.nat.host_readable(h.flow, core.now)
        while len(lengths) > lag:
            done = len(lengths) - lag
            acked += sum(lengths[:done])
            del lengths[:done]
            h.send(ACK, ISN + 1, acked & 0xFFFFFFFF)
    spent = time.thread_time() - t0
    h.nat.close_all()
    return spent / total_mb * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lag", type=int, default=48, help="super-frames left unacknowledged")
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    res = [run(a.mb, a.lag) for _ in range(a.runs)]
    import guestnet

    print(
        f"{os.path.dirname(os.path.dirname(guestnet.__file__))}: lag {a.lag}: CPU per MB "
        f"host->guest min {min(res):.0f} µs, median {statistics.median(res):.0f} µs"
    )


if __name__ == "__main__":
    main()
