"""The kernel's share of a guest->host UDP datagram: what guestnet cannot make cheaper.

Run: ``.venv/bin/python bench/bench_udp_floor.py [--size 1400] [--segments 46] [--reps 5]``

Theory of operation. guestnet's guest->host UDP path costs per datagram one read of the TAP
(one frame per read) and its share of one ``UDP_SEGMENT`` sendmsg to the host socket; the rest
is Python (classify, gather). This times the two system calls alone from Python, with the same
calls guestnet makes (a ``FileIO.readinto`` of a unix datagram socket standing in for the TAP, as
bench/bench_udp_paths.py does; ``sendmsg`` with a ``UDP_SEGMENT`` control message to a loopback
UDP socket that has no UDP_GRO, as iperf3's has not, so the kernel splits the super-datagram and
delivers every piece in the sender's system call), plus one ``sendto`` per datagram for
comparison (what a backend without UDP_SEGMENT pays). CPU time of this process
(``time.process_time``), the receiver's draining excluded; median of ``--reps`` passes.
Subtracting both from bench/bench_udp_paths.py's guest->host figure leaves guestnet's own
Python work per datagram.

Bounds: fixed counts; every socket is non-blocking on the receiving side and drained between
batches, so no call waits.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import struct
import time

SOL_UDP = 17
UDP_SEGMENT = 103


def drain(sock: socket.socket) -> None:
    """Read ``sock`` until it is empty."""
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return


def segment_send(size: int, segments: int, batches: int) -> tuple[float, float]:
    """(µs per datagram with UDP_SEGMENT sends of ``segments`` datagrams, µs per datagram with
    one sendto each)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        rx.setblocking(False)
        # Every datagram must be delivered (a full receive buffer drops it, which is cheaper):
        # the batches are drained before they can fill even rmem_max's default 208 KiB.
        if rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 4 * size * segments:
            raise SystemExit("receive buffer too small for one batch: raise net.core.rmem_max")
        addr = rx.getsockname()
        data = memoryview(bytearray(size * segments))
        cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        spent = 0.0
        for _ in range(batches * 10):
            t0 = time.process_time()
            tx.sendmsg([data], cmsg, 0, addr)
            spent += time.process_time() - t0
            drain(rx)
        gathered = spent / (batches * 10 * segments) * 1e6
        one = data[:size]
        spent = 0.0
        for _ in range(batches * 10):
            t0 = time.process_time()
            for _ in range(segments):
                tx.sendto(one, addr)
            spent += time.process_time() - t0
            drain(rx)
        return gathered, spent / (batches * 10 * segments) * 1e6
    finally:
        rx.close()
        tx.close()


def frame_reads(size: int, frames: int, rounds: int) -> float:
    """µs per frame of ``FileIO.readinto`` on a unix datagram socket (the TapLink's read)."""
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 20)
        ours.setblocking(False)
        readinto = io.FileIO(ours.fileno(), "rb", closefd=False).readinto
        buf = memoryview(bytearray(70000))
        frame = bytes(12 + 42 + size)
        spent = 0.0
        got = 0
        for _ in range(rounds):
            for _ in range(frames):  # 1000 frames: far below the 32 MiB send buffer
                guest.send(frame)
            t0 = time.process_time()
            while readinto(buf) is not None:
                got += 1
            spent += time.process_time() - t0
        return spent / max(1, got) * 1e6
    finally:
        ours.close()
        guest.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--segments", type=int, default=46)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    sends, singles, reads = [], [], []
    for _ in range(a.reps):
        gathered, single = segment_send(a.size, a.segments, 40)
        sends.append(gathered)
        singles.append(single)
        reads.append(frame_reads(a.size, 1000, 20))
    med = statistics.median
    print(f"{a.size}-byte datagrams, median of {a.reps}")
    print(f"read one frame (FileIO.readinto, unix dgram)      {med(reads):5.2f} µs/frame")
    print(f"UDP_SEGMENT sendmsg of {a.segments} to loopback        {med(sends):5.2f} µs/datagram")
    print(f"sendto, one per datagram, to loopback          {med(singles):5.2f} µs/datagram")
    print(f"kernel floor of a gathered datagram (read + share of send) "
          f"{med(reads) + med(sends):5.2f} µs")  # fmt: skip


if __name__ == "__main__":
    main()
