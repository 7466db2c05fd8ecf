"""The forwarded DNS query through guestnet's whole loop: CPU, round trip, system calls.

Run: .venv/bin/python bench/bench_dns_forward.py [--count N] [--reps R] [--profile]
[--strace] [--only cpu,rtt] [--family 4|6]

The path is the one bench/compare.py's "DNS fwd" cell times end to end, without namespaces,
dnsmasq or the guest's kernel: a :class:`~guestnet.io.tap.TapLink` over a unix datagram
socketpair (one read, one frame, as a TAP; the other end plays the guest, writing a
virtio-net header and an A query for www.example.com to the DNS address, over IPv4 or with
``--family 6`` IPv6), and a real UDP
server on 127.0.0.1 as the upstream (it copies the query's id into a prepared answer).

Rows:

- ``cpu``: in one process. The bench sends the query, turns guestnet's loop until the
  upstream has it, answers, turns the loop until the guest has the answer. Only
  ``Loop.run_once`` is timed (``time.thread_time``: guestnet's user and system time, its system
  calls included, not the bench's). The median per query of each batch; the median and min of
  the batches. ``--profile`` adds a cProfile of ``run_once`` over one more batch (top 25 by
  own time).
- ``rtt``: guestnet's loop runs in a child process (``Loop.run``), the bench is the guest and
  the upstream with blocking sockets: the median round trip per query (wall clock: two
  wake-ups of guestnet per query, as in a real deployment, and the bench's own wake-ups), and
  guestnet's CPU per query from ``/proc/PID/schedstat`` (nanoseconds on the CPU). Both
  processes are pinned to CPU 0 by default (``--cpus BENCH,GUESTNET``; ``any`` leaves them to
  the scheduler): on this 2-vCPU VM the round trip across two CPUs swings between ~45 and
  ~145 µs with the other CPU's load and idle state, while on one CPU it is the sum of both
  sides' work and two context switches per leg, steady to a microsecond or two.
  ``--strace`` traces the child with ``strace -c -f`` during one more batch and prints its
  system calls per query.

A/B: run this file with ``PYTHONPATH=OTHER/src`` beside it, interleaved.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.tap import VNET_HDR_LEN, TapLink
from guestnet.wire.dns import encode_name
from guestnet.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, build_ethernet
from guestnet.wire.ipv4 import PROTO_UDP, build_ipv4
from guestnet.wire.ipv6 import build_ipv6
from guestnet.wire.udp import build_udp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
DNS_IP = bytes([10, 0, 2, 3])
GUEST_IP6 = bytes.fromhex("fd000000000000000000000000000015")
DNS_IP6 = bytes.fromhex("fd000000000000000000000000000003")
NAME = "www.example.com"
#: A query with an EDNS OPT record, as dig and the C library's resolver send by default.
OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"


def query_payload(qid: int, name: str = NAME) -> bytes:
    """An A query for ``name`` with RD and EDNS, id ``qid``."""
    header = qid.to_bytes(2, "big") + bytes.fromhex("0100 0001 0000 0000 0001")
    return header + encode_name(name) + b"\x00\x01\x00\x01" + OPT


def answer_payload(name: str = NAME) -> bytes:
    """An answer to :func:`query_payload` (id 0, patched per query): one A record."""
    header = bytes.fromhex("0000 8180 0001 0001 0000 0001")
    record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" + bytes([198, 51, 100, 7])
    return header + encode_name(name) + b"\x00\x01\x00\x01" + record + OPT


def query_frame(qid: int, our_mac: bytes, family: int = 4, sport: int = 40000) -> bytes:
    """Virtio-net header (zeros) + Ethernet + IPv4 or IPv6 + UDP + the query, from the guest
    to the DNS address."""
    payload = query_payload(qid)
    hdrs = 42 if family == 4 else 62
    buf = bytearray(hdrs + len(payload))
    buf[hdrs:] = payload
    if family == 4:
        src, dst = GUEST_IP, DNS_IP
        off = build_ethernet(buf, 0, our_mac, GUEST_MAC, ETHERTYPE_IPV4)
        off = build_ipv4(buf, off, src, dst, PROTO_UDP, 8 + len(payload))
    else:
        src, dst = GUEST_IP6, DNS_IP6
        off = build_ethernet(buf, 0, our_mac, GUEST_MAC, ETHERTYPE_IPV6)
        off = build_ipv6(buf, off, src, dst, PROTO_UDP, 8 + len(payload))
    build_udp(buf, off, sport, 53, len(payload), src, dst)
    return bytes(VNET_HDR_LEN) + bytes(buf)


class Rig:
    """guestnet with one TAP-like link (the bench's ``guest`` socket is the other end) and a
    UDP upstream on 127.0.0.1 (``server``)."""

    def __init__(self, blocking: bool, family: int) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.setblocking(blocking)
        self.ours, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.guest.setblocking(blocking)
        self.config = Config(dns_upstreams=(("127.0.0.1", self.server.getsockname()[1]),))
        self.frames = [query_frame(i, self.config.mac, family) for i in range(256)]
        self.answer = bytearray(answer_payload())
        self.inst: Instance | None = None

    def start(self) -> Instance:
        """guestnet itself (in the process that runs its loop)."""
        self.inst = Instance(self.config)
        TapLink(self.inst.hub, self.ours.detach(), "tap0", "eth0", offloads=0)
        return self.inst

    def serve_one(self) -> bool:
        """Answer one query if the upstream has one (False if none waits)."""
        try:
            data, addr = self.server.recvfrom(4096)
        except BlockingIOError:
            return False
        answer = self.answer
        answer[0:2] = data[0:2]
        self.server.sendto(answer, addr)
        return True

    def take_answer(self) -> bool:
        """Take the answer frame the guest got, if any."""
        try:
            self.guest.recv(70000)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self.inst is not None:
            self.inst.close()
        self.ours.close()
        self.guest.close()
        self.server.close()


def bench_cpu(count: int, reps: int, profile: bool, family: int) -> None:
    rig = Rig(blocking=False, family=family)
    run = rig.start().loop.run_once
    cpu = time.thread_time
    prof: cProfile.Profile | None = None

    def turn_until(ready: Callable[[], bool]) -> float:
        spent = 0.0
        for _ in range(10_000):
            if prof is not None:
                prof.enable()
            t0 = cpu()
            run(0.05)
            spent += cpu() - t0
            if prof is not None:
                prof.disable()
            if ready():
                return spent
        raise RuntimeError("no progress")

    def batch() -> list[float]:
        spent = []
        for i in range(count):
            rig.guest.send(rig.frames[i & 255])
            spent.append(turn_until(rig.serve_one) + turn_until(rig.take_answer))
        return spent

    try:
        batch()  # warm-up: the guest's MAC learned, the upstream socket opened, pools filled
        medians = [statistics.median(batch()) * 1e6 for _ in range(reps)]
        print(f"cpu   forwarded IPv{family}, TAP link  {statistics.median(medians):6.1f} µs/query "
              f"of guestnet's loop (median of {reps} batches of {count}; min "
              f"{min(medians):.1f})")  # fmt: skip
        if profile:
            prof = cProfile.Profile()
            batch()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
    finally:
        rig.close()


def _oncpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def bench_rtt(
    count: int, reps: int, strace: bool, cpus: tuple[int, int] | None, family: int
) -> None:
    rig = Rig(blocking=True, family=family)
    pid = os.fork()
    if pid == 0:  # guestnet
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            rig.guest.close()
            rig.server.close()
            loop = rig.start().loop
            loop.install_signal_handlers()
            loop.run()
        finally:
            os._exit(0)
    rig.ours.close()
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    guest, server, answer = rig.guest, rig.server, rig.answer
    guest.settimeout(5)
    server.settimeout(5)
    clock = time.perf_counter_ns

    def batch() -> list[int]:
        rtts = []
        for i in range(count):
            t0 = clock()
            guest.send(rig.frames[i & 255])
            data, addr = server.recvfrom(4096)
            answer[0:2] = data[0:2]
            server.sendto(answer, addr)
            guest.recv(70000)
            rtts.append(clock() - t0)
        return rtts

    try:
        batch()
        rtt, cpu = [], []
        for _ in range(reps):
            c0 = _oncpu_ns(pid)
            rtt.append(statistics.median(batch()) / 1000)
            cpu.append((_oncpu_ns(pid) - c0) / count / 1000)
        print(f"rtt   forwarded IPv{family}, TAP link  {statistics.median(rtt):6.1f} µs round trip "
              f"(min {min(rtt):.1f}), guestnet CPU {statistics.median(cpu):5.1f} µs/query "
              f"(median of {reps} batches of {count})")  # fmt: skip
        if strace:
            print("strace", _strace_batch(pid, batch, count))
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        guest.close()
        server.close()


def _strace_batch(pid: int, batch: Callable[[], list[int]], count: int) -> str:
    """System calls per query of ``pid`` over one batch (strace -c -f attached to it)."""
    with tempfile.NamedTemporaryFile(suffix=".strace", delete=False) as f:
        out = f.name
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(1.0)  # attached
        batch()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    calls: list[tuple[int, str]] = []
    for line in Path(out).read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] not in ("total", "syscall"):
            calls.append((int(f[3]), f[-1]))
    os.unlink(out)
    calls.sort(reverse=True)
    total = sum(n for n, _ in calls)
    top = ", ".join(f"{name} {n / count:.2f}" for n, name in calls[:8])
    return f"{total / count:.2f} system calls/query ({top})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="queries per batch")
    p.add_argument("--reps", type=int, default=5, help="batches")
    p.add_argument("--only", default="cpu,rtt", help="rows: cpu, rtt")
    p.add_argument("--profile", action="store_true", help="cProfile run_once (cpu row)")
    p.add_argument("--family", type=int, choices=(4, 6), default=4, help="the query's IP version")
    p.add_argument("--strace", action="store_true", help="system calls per query (rtt row)")
    p.add_argument("--cpus", default="0,0", help="rtt row: the bench's CPU and guestnet's "
                   "(default 0,0: one CPU, the steadiest; 'any': unpinned)")  # fmt: skip
    args = p.parse_args()
    rows = args.only.split(",")
    if "cpu" in rows:
        bench_cpu(args.count, args.reps, args.profile, args.family)
    if "rtt" in rows:
        cpus = None if args.cpus == "any" else tuple(int(c) for c in args.cpus.split(","))
        bench_rtt(args.count, args.reps, args.strace, cpus, args.family)  # type: ignore[arg-type]
    sys.stdout.flush()


if __name__ == "__main__":
    main()
