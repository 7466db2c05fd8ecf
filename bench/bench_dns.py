"""DNS queries per second through the DNS service in process, with median latency.

Run: .venv/bin/python bench/bench_dns.py [--quick]

Rows:

- ``builtin``: A queries for host.guestnet.internal through the classifier; the answer is built
  by dnspython in a pooled frame. Latency is one query in, one answer frame out.
- ``forward, core``: queries forwarded by the sans-I/O core to a fake upstream played in process
  (the answer is a prepared message with the query's id patched in): parse, id mapping, outbox,
  answer matching, id restore, answer frame. No sockets.
- ``forward, loopback 1``: the whole Instance with its loop and the real upstream socket; the
  fake upstream is a UDP socket on 127.0.0.1 served by the same loop. One query at a time:
  the latency is the round trip through guestnet's loop and the kernel twice.
- ``forward, loopback 64``: the same with 64 queries outstanding at once (throughput).

Each row prints the median rate over ``REPEATS`` batches and the median per-query latency.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from collections.abc import Callable

import dns.message
import dns.rrset

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.dns import DnsService
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.io.loop import EPOLLIN
from guestnet.pool import Frame, FramePool
from guestnet.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from guestnet.wire.ipv4 import PROTO_UDP, build_ipv4
from guestnet.wire.udp import build_udp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
DNS_IP = bytes([10, 0, 2, 3])
OUR_MAC = bytes.fromhex("52550a000202")
REPEATS = 5


def query_frame(name: str, qid: int, sport: int = 40000) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    payload = q.to_wire()
    buf = bytearray(42 + len(payload))
    buf[42:] = payload
    off = build_ethernet(buf, 0, OUR_MAC, GUEST_MAC, ETHERTYPE_IPV4)
    off = build_ipv4(buf, off, GUEST_IP, DNS_IP, PROTO_UDP, 8 + len(payload))
    build_udp(buf, off, sport, 53, len(payload), GUEST_IP, DNS_IP)
    return bytes(buf)


def canned_answer(name: str) -> bytes:
    q = dns.message.make_query(name, "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", "198.51.100.7"))
    return r.to_wire()


def core_parts(
    upstreams: tuple[tuple[str, int], ...],
) -> tuple[FrameClassifier, DnsService, Port, list[int]]:
    config = Config()
    pool = FramePool(config.mtu, config.pool_slots)
    counters = Counters()
    switch = Switch(pool, counters)
    classifier = FrameClassifier(config, pool, counters, switch)
    svc = DnsService(config, pool, counters, upstreams)
    classifier.dns_udp = svc
    answered = [0]

    def send(frame: Frame) -> None:
        answered[0] += 1
        pool.release(frame)

    port = Port("bench0", send)
    switch.attach(port)
    return classifier, svc, port, answered


def measure(run_one: Callable[[int], None], n: int) -> tuple[float, float]:
    """(queries/s over the batch, median µs per query)."""
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter_ns()
        run_one(i)
        lat.append(time.perf_counter_ns() - s)
    elapsed = time.perf_counter() - t0
    return n / elapsed, statistics.median(lat) / 1000


def report(name: str, results: list[tuple[float, float]]) -> None:
    rate = statistics.median(r for r, _ in results)
    lat = statistics.median(m for _, m in results)
    print(f"{name:24s} {rate:10,.0f} queries/s   median {lat:8.1f} µs")


def bench_builtin(n: int) -> None:
    classifier, _svc, port, answered = core_parts(())
    frame = memoryview(query_frame("host.guestnet.internal", 7))

    def one(_i: int) -> None:
        classifier.handle_frame(frame, port, 0.0)

    results = [measure(one, n) for _ in range(REPEATS)]
    assert answered[0] == n * REPEATS
    report("builtin", results)


def bench_forward_core(n: int) -> None:
    classifier, svc, port, answered = core_parts((("192.0.2.1", 53),))
    name = "www.example.com"
    frames = [memoryview(query_frame(name, i & 0xFFFF)) for i in range(256)]
    answer = bytearray(canned_answer(name))
    outbox = svc.outbox

    def one(i: int) -> None:
        classifier.handle_frame(frames[i & 255], port, 0.0)
        upstream, data = outbox.pop()
        answer[0:2] = data[0:2]
        svc.handle_upstream_answer(upstream, answer, 0.0)

    results = [measure(one, n) for _ in range(REPEATS)]
    assert answered[0] == n * REPEATS and svc.pending_count == 0
    report("forward, core", results)


def bench_forward_loopback(n: int, window: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    inst = Instance(Config(dns_upstreams=(("127.0.0.1", server.getsockname()[1]),)))
    name = "www.example.com"
    answer = bytearray(canned_answer(name))
    answered = [0]

    def serve(_events: int) -> None:
        for _ in range(256):
            try:
                data, addr = server.recvfrom(4096)
            except BlockingIOError:
                return
            answer[0:2] = data[0:2]
            server.sendto(answer, addr)

    inst.loop.add_fd(server.fileno(), EPOLLIN, serve)

    def send(frame: Frame) -> None:
        answered[0] += 1
        inst.pool_to_guest.release(frame)

    port = Port("bench0", send)
    inst.switch.attach(port)
    frames = [memoryview(query_frame(name, i, 40000 + i)) for i in range(window)]
    classifier = inst.classifier
    loop = inst.loop

    def one_window(_i: int) -> None:
        target = answered[0] + window
        now = loop.now()
        for f in frames:
            classifier.handle_frame(f, port, now)
        deadline = time.monotonic() + 5
        while answered[0] < target and time.monotonic() < deadline:
            loop.run_once(max_wait=0.1)
        assert answered[0] == target, "answers lost"

    try:
        results = []
        for _ in range(REPEATS):
            rate, lat = measure(one_window, max(1, n // window))
            results.append((rate * window, lat))
        report(f"forward, loopback {window}", results)
    finally:
        inst.close()
        server.close()


def main() -> None:
    quick = "--quick" in sys.argv
    n = 2000 if quick else 20000
    print(f"DNS service, {REPEATS} batches of {n} queries (latency: per query, or per window)")
    bench_builtin(n)
    bench_forward_core(n)
    bench_forward_loopback(n // 4, 1)
    bench_forward_loopback(n, 64)


if __name__ == "__main__":
    main()
