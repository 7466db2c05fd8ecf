"""Each per-frame leaf operation, C extension against its Python twin, in one process.

Run: .venv/bin/python bench/bench_leaf.py [--quick]

Calls :mod:`guestnet.wire.pure` and ``guestnet.wire._native`` directly (the datapath picks one
through guestnet.wire.native) on the same prepared frames and prints the thread CPU µs per call
(the minimum over batches, robust to other jobs on the machine) and the ratio. The rows are
what the datapath calls per packet: the established-flow TCP parse of a guest frame
(``tcp_fast4``/``tcp_fast6``), the IPv4 header parse (every IPv4 packet off the fast path), the
headers of a TCP segment toward the guest with its checksum (full: a link without offloads;
partial: a TAP with offloads) and of a UDP datagram (always full).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from typing import Any

from guestnet.wire import pure

try:
    from guestnet.wire import _native
except ImportError:
    print("guestnet.wire._native is not built: nothing to compare")
    sys.exit(0)

MAC1 = bytes.fromhex("52550a000202")
MAC2 = bytes.fromhex("525400123456")
IP1, IP2 = bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34])
IP61 = bytes.fromhex("fd000000000000000000000000000015")
IP62 = bytes.fromhex("fd000000000000000000000000000002")
DNS4 = frozenset((bytes([10, 0, 2, 3]),))


def cpu_us(fn: Callable[[], object], n: int, batches: int) -> float:
    clock = time.thread_time
    best = float("inf")
    for _ in range(batches):
        t0 = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - t0) / n * 1e6)
    return best


def guest_tcp(v6: bool, plen: int) -> memoryview:
    buf = bytearray(max(60, 74 + plen))
    n = pure.build_tcp_frame(
        buf, 0, 6 if v6 else 4, MAC1, MAC2, IP61 if v6 else IP1, IP62 if v6 else IP2,
        40000, 80, 1, 2, 0x10, 1000, 0, plen, b"", False,
    )  # fmt: skip
    return memoryview(buf)[:n]


def main() -> None:
    quick = "--quick" in sys.argv
    n, batches = (2000, 5) if quick else (10000, 15)
    f4, f6 = guest_tcp(False, 0), guest_tcp(True, 0)
    ip = f4[14:]
    out = memoryview(bytearray(2048))
    rnd = random.Random(1)
    d64, d1500, d65535 = rnd.randbytes(64), rnd.randbytes(1500), rnd.randbytes(65535)
    rows: list[tuple[str, Callable[[Any], Callable[[], object]]]] = [
        ("checksum 64 B", lambda m: lambda: m.checksum(d64, 0)),
        ("checksum 1500 B", lambda m: lambda: m.checksum(d1500, 0)),
        ("checksum 65535 B", lambda m: lambda: m.checksum(d65535, 0)),
        ("pseudo_sum v4", lambda m: lambda: m.pseudo_sum(IP1, IP2, 6, 1480)),
        ("tcp_fast4", lambda m: lambda: m.tcp_fast4(f4, MAC1, MAC2, IP1, DNS4, False)),
        ("tcp_fast4 verify", lambda m: lambda: m.tcp_fast4(f4, MAC1, MAC2, IP1, DNS4, True)),
        ("tcp_fast6", lambda m: lambda: m.tcp_fast6(f6, MAC1, MAC2, DNS4, False)),
        ("fast_parse tcp4", lambda m: lambda: m.fast_parse(f4, MAC1, MAC2, IP1, DNS4, DNS4, False)),
        ("fast_parse tcp6", lambda m: lambda: m.fast_parse(f6, MAC1, MAC2, IP1, DNS4, DNS4, False)),
        ("parse_ipv4", lambda m: lambda: m.parse_ipv4(ip, True)),
        ("build_tcp 1 B full", lambda m: lambda: m.build_tcp_frame(
            out, 64, 4, MAC2, MAC1, IP2, IP1, 80, 40000, 1, 2, 0x18, 1000, 7, 1, b"", False)),
        ("build_tcp 1460 B full", lambda m: lambda: m.build_tcp_frame(
            out, 64, 4, MAC2, MAC1, IP2, IP1, 80, 40000, 1, 2, 0x18, 1000, 7, 1460, b"", False)),
        ("build_tcp partial", lambda m: lambda: m.build_tcp_frame(
            out, 64, 4, MAC2, MAC1, IP2, IP1, 80, 40000, 1, 2, 0x18, 1000, 7, 1460, b"", True)),
        ("build_udp 64 B", lambda m: lambda: m.build_udp_frame(
            out, 64, 4, MAC2, MAC1, IP2, IP1, 53, 40000, 64, 7, False)),
        ("build_udp 1400 B", lambda m: lambda: m.build_udp_frame(
            out, 64, 4, MAC2, MAC1, IP2, IP1, 53, 40000, 1400, 7, False)),
    ]  # fmt: skip
    print(f"thread CPU µs per call, best of {batches} batches of {n}")
    print(f"{'operation':<22} {'pure':>8} {'native':>8} {'pure/native':>12}")
    for name, make in rows:
        a = cpu_us(make(pure), n, batches)
        b = cpu_us(make(_native), n, batches)
        print(f"{name:<22} {a:8.3f} {b:8.3f} {a / b:11.1f}x")


if __name__ == "__main__":
    main()
