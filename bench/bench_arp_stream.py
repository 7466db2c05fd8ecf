"""ARP round trips per second over the QEMU stream socket, guestnet running as its own process.

Run: .venv/bin/python bench/bench_arp_stream.py [--quick]

A client speaking QEMU's stream protocol (4-byte big-endian length + frame) connects to
``guestnet qemu --socket`` and measures:

- ``lockstep``: one ARP request, wait for its reply, repeat (round-trip latency bound);
- ``pipelined``: 64 requests written at once, then their 64 replies read (throughput bound).

Only a unix socket is used: no packet leaves the process pair. Prints the median of several
rounds. The stats API is not needed: every reply is checked to be an ARP reply for the gateway.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY = bytes([10, 0, 2, 2])


def arp_request() -> bytes:
    eth = b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY)
    frame = eth + arp + bytes(18)
    return struct.pack("!I", len(frame)) + frame


def read_replies(sock: socket.socket, count: int, buf: bytearray) -> None:
    """Read ``count`` framed replies, checking each is an ARP reply for the gateway."""
    have = 0
    got = 0
    while got < count:
        n = sock.recv_into(memoryview(buf)[have:])
        if n == 0:
            raise RuntimeError("guestnet closed the connection")
        have += n
        pos = 0
        while have - pos >= 4:
            flen = struct.unpack_from("!I", buf, pos)[0]
            if have - pos - 4 < flen:
                break
            frame = buf[pos + 4 : pos + 4 + flen]
            is_arp_reply = frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
            if not is_arp_reply or frame[28:32] != GATEWAY:
                raise RuntimeError("unexpected frame")
            got += 1
            pos += 4 + flen
        buf[: have - pos] = buf[pos:have]
        have -= pos


def run_round(sock: socket.socket, total: int, batch: int) -> float:
    """Round trips per second over ``total`` requests sent ``batch`` at a time."""
    req = arp_request()
    burst = req * batch
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    for _ in range(total // batch):
        sock.sendall(burst)
        read_replies(sock, batch, buf)
    return total / (time.perf_counter() - t0)


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 3 if quick else 7
    total = 2_000 if quick else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gn.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "guestnet", "qemu", "--socket", path],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("guestnet did not start")
                time.sleep(0.05)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            sock.settimeout(10)
            run_round(sock, 256, 64)  # warm-up: pools filled, code paths hot
            print(f"{'mode':<10} {'round trips/s (median of ' + str(rounds) + ')':>34}")
            for name, batch in (("lockstep", 1), ("pipelined", 64)):
                rates = [run_round(sock, total, batch) for _ in range(rounds)]
                print(f"{name:<10} {statistics.median(rates):>34,.0f}")
            sock.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
