"""CPU per UDP datagram through a whole guestnet datapath, in process, both ways.

Run: ``.venv/bin/python bench/bench_udp_paths.py [--count 40000] [--size 1400] [--round 1000]
[--modes uso,plain]``; for an A/B put another checkout first: ``PYTHONPATH=OTHER/src
.venv/bin/python bench/bench_udp_paths.py --modes plain`` (a version without USO knows only
``plain``).

Theory of operation. An :class:`~guestnet.assembly.Instance` with a
:class:`~guestnet.io.tap.TapLink` on a unix datagram socketpair (one read is one virtio-net header
and one frame, as on a TAP) and real UDP sockets on loopback for the host. Datagrams go in rounds
of ``--round``: the sender writes a round (guest frames into the socketpair, or host datagrams to
the flow's socket), then the loop runs until the round has arrived on the other side; only the
loop's time is counted (``time.process_time`` around ``run_once``: user and system time of
guestnet's own work, its system calls included, not the test's senders and receivers). The
result is CPU µs per datagram, median of ``--reps`` passes. Modes: ``uso`` (the port takes
partial checksums and UDP super-frames and vouches for the guest's checksums, as a TAP with
offloads does), ``plain`` (a link without offloads: every checksum computed and verified).
Nothing here depends on other load on the machine beyond cache effects, which is why it
complements bench/bench_udp.py's iperf3 runs.

Bounds: every wait is bounded (``run_once`` with a timeout, at most 10,000 turns per round).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import time
from collections.abc import Callable

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.tap import TapLink
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import build_ethernet
from guestnet.wire.ipv4 import build_ipv4

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("52550a000202")
GUEST4 = bytes([10, 0, 2, 15])
GW4 = bytes([10, 0, 2, 2])
VNET_HDR_LEN = 12


def guest_frame(sport: int, dport: int, payload: bytes, flags: int = 0) -> bytes:
    """vnet header (``flags`` only) + a whole guest UDP frame to the gateway."""
    l4_len = 8 + len(payload)
    buf = bytearray(34 + l4_len)
    off = build_ethernet(buf, 0, OUR_MAC, GUEST_MAC, 0x0800)
    off = build_ipv4(buf, off, GUEST4, GW4, 17, l4_len, ident=1, frag=0)
    struct.pack_into("!HHHH", buf, off, sport, dport, l4_len, 0)
    buf[off + 8 :] = payload
    csum = checksum(buf[off:], pseudo_header_sum(GUEST4, GW4, 17, l4_len)) or 0xFFFF
    struct.pack_into("!H", buf, off + 6, csum)
    return bytes([flags]) + bytes(VNET_HDR_LEN - 1) + bytes(buf)


def one_pass(mode: str, count: int, size: int, rnd: int) -> tuple[float, float, int, int]:
    """(µs per datagram delivered guest->host, host->guest, datagrams lost each way) for one
    fresh datapath. A round ends when all of it arrived or nothing came for 20 turns."""
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (guest,):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 20)
    inst = Instance(Config(mtu=1500), echo_mode=None)
    link = TapLink(inst.hub, ours.detach(), "tap0", "eth0")
    if mode == "uso":
        link.port.offload_max = 65535
        link.port.udp_offload = True
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    host.bind(("127.0.0.1", 0))
    host.setblocking(False)
    hport = host.getsockname()[1]
    guest.setblocking(False)
    run = inst.loop.run_once
    payload = bytes(size)
    # A TAP with checksum offload vouches for the guest's checksums (DATA_VALID here; the
    # kernel sends NEEDS_CSUM): the classifier skips verifying them, as in production.
    frame = guest_frame(40000, hport, payload, 2 if mode == "uso" else 0)
    flow_addr = None

    def rounds(send_one: Callable[[], object], drain: Callable[[], int]) -> tuple[float, int]:
        """Send ``count`` datagrams in rounds of ``rnd``, turning the loop (its CPU time
        counted) and draining the far end after each turn until the round arrived or nothing
        came for 20 turns: (µs per datagram delivered, datagrams lost)."""
        spent = 0.0
        done = delivered = 0
        while done < count:
            n = min(rnd, count - done)
            for _ in range(n):
                send_one()
            got = idle = 0
            for _ in range(10_000):
                t0 = time.process_time()
                run(max_wait=0.01)
                spent += time.process_time() - t0
                before = got
                got += drain()
                idle = 0 if got > before else idle + 1
                if got >= n or idle > 20:
                    break
            done += n
            delivered += got
        return spent / max(1, delivered) * 1e6, count - delivered

    def drain_host() -> int:
        nonlocal flow_addr
        got = 0
        while True:
            try:
                _data, flow_addr = host.recvfrom(65535)
            except BlockingIOError:
                return got
            got += 1

    def drain_guest() -> int:
        got = 0
        while True:
            try:
                raw = guest.recv(70000)
            except BlockingIOError:
                return got
            # datagrams in this frame: a USO super-frame carries several
            hdr_gso = struct.unpack_from("<H", raw, 4)[0]
            plen = len(raw) - VNET_HDR_LEN - 42
            got += -(-plen // hdr_gso) if raw[1] == 5 and hdr_gso else 1

    try:
        up, lost_up = rounds(lambda: guest.send(frame), drain_host)
        # host -> guest, to the flow's socket
        assert flow_addr is not None
        addr = flow_addr
        down, lost_down = rounds(lambda: host.sendto(payload, addr), drain_guest)
    finally:
        inst.close()
        guest.close()
        host.close()
    return up, down, lost_up, lost_down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=40000)
    p.add_argument("--size", type=int, default=1400)
    p.add_argument("--round", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", default="uso,plain")
    a = p.parse_args()
    import guestnet

    print(f"guestnet from {guestnet.__file__}; {a.count} datagrams of {a.size} B, rounds of "
          f"{a.round}, median of {a.reps}")  # fmt: skip
    for mode in a.modes.split(","):
        ups, downs, lost = [], [], [0, 0]
        for _ in range(a.reps):
            up, down, lu, ld = one_pass(mode, a.count, a.size, a.round)
            ups.append(up)
            downs.append(down)
            lost[0] += lu
            lost[1] += ld
        print(
            f"{mode:6s} guest->host {statistics.median(ups):6.2f} µs/datagram "
            f"(min {min(ups):.2f}, lost {lost[0]})   host->guest {statistics.median(downs):6.2f} "
            f"µs/datagram (min {min(downs):.2f}, lost {lost[1]})"
        )


if __name__ == "__main__":
    main()
