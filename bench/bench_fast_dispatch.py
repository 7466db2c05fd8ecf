"""CPU per guest frame in the classifier's fast dispatch (``FrameClassifier.handle_frame``).

Run: ``.venv/bin/python bench/bench_fast_dispatch.py [--count 200000] [--reps 7]``; for an A/B
put another checkout first: ``PYTHONPATH=OTHER/src .venv/bin/python bench/bench_fast_dispatch.py``
(it uses only ``handle_frame`` and the fast-handler slots, which both sides have).

Theory of operation. A classifier whose fast handlers (``tcp_fast``, ``udp_fast``, ``dns_fast``)
are set, as the assembly sets them, to functions that take every frame at once (return True):
what is timed is the classifier's own work per frame (counters, capture check, the fast parse
or parses, the routing by kind), not the NAT's. Rows: a 64-byte UDP payload over IPv4 and
over IPv6 to a remote address, a 64-byte TCP segment over IPv4 and IPv6, each with the
transport checksum verified (``verify``: a link without offloads) and vouched for
(``trusted``: TAP with offloads); and an ICMP echo with the fast handlers set (a frame that
no fast path takes: it pays the fast test, then the ordinary path's counted drop, there being
no ICMP service). The result is ns per frame (``time.process_time_ns``), median of ``--reps``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire import native, pure
from guestnet.wire.checksum import checksum

GUEST_MAC = bytes.fromhex("525400123456")
GUEST4 = bytes([10, 0, 2, 15])
REMOTE4 = bytes([93, 184, 216, 34])
GUEST6 = bytes.fromhex("fd000000000000000000000000000015")
REMOTE6 = bytes.fromhex("20010db8000000000000000000000001")


def frames(our_mac: bytes) -> dict[str, bytes]:
    """One frame per row, valid in every checksum."""
    out = {}
    payload = bytes(range(64))
    for version, src, dst in ((4, GUEST4, REMOTE4), (6, GUEST6, REMOTE6)):
        ip = 20 if version == 4 else 40
        buf = bytearray(14 + ip + 8 + 64)
        buf[14 + ip + 8 :] = payload
        pure.build_udp_frame(
            buf, 0, version, our_mac, GUEST_MAC, src, dst, 40000, 5001, 64, 7, False
        )
        out[f"udp{version}"] = bytes(buf)
        buf = bytearray(14 + ip + 20 + 64)
        buf[14 + ip + 20 :] = payload
        n = pure.build_tcp_frame(
            buf, 0, version, our_mac, GUEST_MAC, src, dst, 40000, 5001, 1, 1, 0x18, 1000, 1, 64,
            b"", False,
        )  # fmt: skip
        out[f"tcp{version}"] = bytes(buf[:n])
    icmp = bytearray(14 + 20 + 8 + 56)
    icmp[0:14] = our_mac + GUEST_MAC + b"\x08\x00"
    ip = bytearray(b"\x45\x00" + (84).to_bytes(2, "big") + b"\x00\x01\x00\x00\x40\x01\x00\x00")
    ip += GUEST4 + REMOTE4
    ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
    icmp[14:34] = ip
    icmp[34] = 8
    icmp[36:38] = checksum(bytes(icmp[34:])).to_bytes(2, "big")
    out["icmp4"] = bytes(icmp)
    return out


def setup() -> tuple[FrameClassifier, Port]:
    config = Config()
    pool = FramePool(config.mtu, 64)
    counters = Counters()
    switch = Switch(pool, counters, config.isolate)
    c = FrameClassifier(config, pool, counters, switch)
    port = Port("guest0", lambda frame: None)
    switch.attach(port)
    port.guest_mac = GUEST_MAC
    port.ip6_seen = True
    port.learn_ip6(GUEST6)

    def take(*args: Any) -> bool:
        return True

    c.tcp_fast = take
    c.udp_fast = take
    c.dns_fast = take
    c.dns_fast6 = take
    return c, port


def per_frame(c: FrameClassifier, port: Port, frame: bytes, trusted: bool, count: int) -> float:
    view = memoryview(frame)
    handle = c.handle_frame
    t0 = time.process_time_ns()
    for _ in range(count):
        handle(view, port, 1.0, trusted)
    return (time.process_time_ns() - t0) / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=200000)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    c, port = setup()
    rows = frames(c.config.mac)
    print(f"native={native.NATIVE}  ns per frame, median of {args.reps} x {args.count}")
    for name, frame in rows.items():
        for trusted in (False, True):
            runs = [per_frame(c, port, frame, trusted, args.count) for _ in range(args.reps)]
            label = f"{name} {'trusted' if trusted else 'verify'}"
            print(f"{label:<16} {statistics.median(runs):8.1f}")


if __name__ == "__main__":
    main()
