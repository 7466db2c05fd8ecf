"""DNS queries per second through the DNS service in process, with median latency.

Run: .venv/bin/python bench/bench_dns.py [--quick]

Rows:

- ``builtin``: A queries for host.guestnet.internal through the classifier; the answer is built
  by wire/dns.py in a pooled frame. Latency is one query in, one answer frame out.
- ``forward, core``: queries forwarded by the sans-I/O core to a fake upstream played in process
  (the answer is a prepared message with the query's id patched in): parse, id mapping, outbox,
  answer matching, id restore, answer frame. No sockets.
- ``forward, loopback 1``: the whole Instance with its loop and the real upstream socket; the
  fake upstream is a UDP socket on 127.0.0.1 served by the same loop. One query at a time:
  the latency is the round trip through guestnet's loop and the kernel twice.
- ``forward, loopback 64``: the same with 64 queries outstanding at once (throughput).

Each row prints the median rate over ``REPEATS`` batches and the median per-query latency.

Beside the peers (root): ``.venv/bin/python bench/bench_dns.py --peers
[--backends guestnet,slirp4netns,pasta,pasta-new] [--mtus 1500] [--count 2000] [--reps 3]
[--strace]``. Each backend gets bench/compare.py's topology (its ``Harness``: a guest namespace,
a loopback-only sandbox where the backend runs; pasta's sandbox has its dead-end veth); the
upstream is a dnsmasq on the sandbox's 127.0.0.1:53, authoritative for ``test.internal`` and
forwarding nowhere, named in the sandbox's ``/etc/netns/SANDBOX/resolv.conf`` (which ``ip netns
exec`` binds over ``/etc/resolv.conf`` for the backend, as a host's resolver would be). A client
in the guest (this file, ``client``) asks one A query at a time over one UDP socket and times
each answer: ``forwarded`` asks www.test.internal of each backend's DNS address (guestnet and
slirp4netns 10.0.2.3; pasta 10.0.2.2, its gateway, which is where it points the guest when the
host's resolver is on loopback, and forwards to it); ``built-in`` asks guestnet for
host.guestnet.internal, which it answers itself (the peers have no such names). Every row: the
median and p90 of ``--reps`` runs' medians, the backend's CPU time per query (utime + stime from
/proc, over all runs), its peak RSS. ``--strace`` adds a run under ``strace -c -f`` per row and
prints the backend's system calls per query. ``pasta-new`` is pasta 2026 from /opt/passt-new
(``../shared/peers/build-passt.sh``). /dev/cpu_dma_latency is held at 0, as compare.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from guestnet.io.tap import TapLink
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


def bench_link(n: int, name: str, label: str) -> None:
    """One query at a time through a whole Instance and its TAP link (a unix datagram
    socketpair carrying virtio-net header + frame, as tests/unit/test_tap.py does), the
    upstream a UDP socket on 127.0.0.1 served by this function, not by guestnet's loop. Only
    guestnet's loop is timed (``time.process_time`` around ``run_once``: its user and system
    time, its system calls included): CPU µs per query, the median of the batches, and the
    median of the per-query sums (latency-free, unlike the rows above)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    guest.setblocking(False)
    inst = Instance(Config(dns_upstreams=(("127.0.0.1", server.getsockname()[1]),)))
    TapLink(inst.hub, ours.detach(), "tap0", "eth0", offloads=0)
    answer = bytearray(canned_answer(name))
    frames = [bytes(12) + query_frame(name, i & 0xFFFF) for i in range(256)]
    run = inst.loop.run_once
    cpu = time.process_time

    def turn_until(ready: Callable[[], bool]) -> float:
        spent = 0.0
        for _ in range(10_000):
            t0 = cpu()
            run(0.05)
            spent += cpu() - t0
            if ready():
                return spent
        raise RuntimeError("no progress")

    def upstream_ready() -> bool:
        try:
            data, addr = server.recvfrom(4096)
        except BlockingIOError:
            return False
        answer[0:2] = data[0:2]
        server.sendto(answer, addr)
        return True

    def answered() -> bool:
        try:
            guest.recv(70000)
        except BlockingIOError:
            return False
        return True

    try:
        per_batch = []
        for rep in range(REPEATS + 1):
            spent = []
            for i in range(n):
                guest.send(frames[i & 255])
                t = 0.0
                if label == "forwarded":
                    t += turn_until(upstream_ready)
                t += turn_until(answered)
                spent.append(t)
            if rep:  # the first batch warms up (the guest's MAC learned, pools filled)
                per_batch.append(statistics.median(spent) * 1e6)
        print(f"{label + ', TAP link':24s} CPU {statistics.median(per_batch):7.1f} µs/query "
              f"(median of {REPEATS} batches of {n}; min {min(per_batch):.1f})")  # fmt: skip
    finally:
        inst.close()
        guest.close()
        server.close()


# -- beside the peers, in namespaces ----------------------------------------------------------

HERE = Path(__file__).resolve().parent
PEER_BACKENDS = ("guestnet", "slirp4netns", "pasta", "pasta-new")
PASTA_NEW_DIR = "/opt/passt-new"
FORWARDED_NAME = "www.test.internal"
FORWARDED_ADDR = "198.18.0.10"
BUILTIN_NAME = "host.guestnet.internal"
#: Where each backend's guest sends its queries (see the module docstring).
DNS_SERVER = {"guestnet": "10.0.2.3", "slirp4netns": "10.0.2.3", "pasta": "10.0.2.2"}
WARMUP = 50


def dns_query(name: str, qid: int) -> bytes:
    """An A query with RD, built by hand: the client needs no library."""
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def client_main(argv: list[str]) -> int:
    """In the guest: ``count`` queries one at a time; prints JSON with each latency in µs."""
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=WARMUP)
    a = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((a.server, 53))
    sock.settimeout(1.0)
    rng = random.Random(1)
    lat: list[float] = []
    lost = bad = 0
    for i in range(a.warmup + a.count):
        qid = rng.getrandbits(16)
        query = dns_query(a.name, qid)
        t0 = time.perf_counter_ns()
        sock.send(query)
        try:
            while True:
                answer = sock.recv(4096)
                if answer[:2] == query[:2]:
                    break
        except TimeoutError:
            lost += 1
            continue
        t1 = time.perf_counter_ns()
        # NOERROR with one answer or more, else the row measures errors
        if len(answer) < 12 or answer[3] & 0x0F or answer[6:8] == b"\x00\x00":
            bad += 1
        if i >= a.warmup:
            lat.append((t1 - t0) / 1000)
    print(json.dumps({"lat_us": lat, "lost": lost, "bad": bad}))
    return 0


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _strace_calls(path: str) -> tuple[int, str]:
    """Total calls and the busiest syscalls from an ``strace -c`` summary."""
    total, top = 0, []
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] not in ("total", "syscall"):
            calls = int(f[3])
            top.append((calls, f[-1]))
        elif f and f[-1] == "total" and len(f) >= 5:
            total = int(f[3])
    top.sort(reverse=True)
    return total, " ".join(f"{n} {c}" for c, n in top[:6])


def peers_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="DNS query latency beside slirp4netns and pasta")
    p.add_argument("--peers", action="store_true")
    p.add_argument("--backends", default="guestnet,slirp4netns,pasta,pasta-new")
    p.add_argument("--mtus", default="1500")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--strace", action="store_true")
    p.add_argument("--profile", metavar="DIR", help="py-spy guestnet during one more run")
    p.add_argument("--src", help="the guestnet source tree to run (PYTHONPATH), for an A/B")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_dns --peers needs root (network namespaces)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    import compare

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    class DnsSandbox(compare.Sandbox):  # type: ignore[misc, name-defined]
        """compare.py's sandbox, plus a resolv.conf naming the sandbox's own loopback."""

        def netns(self, role: str) -> str:
            name: str = super().netns(role)
            if role == "sb":
                d = Path("/etc/netns") / name
                d.mkdir(parents=True, exist_ok=True)
                (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            return name

        def delete_netns(self, name: str) -> None:
            super().delete_netns(name)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)

    if a.src:
        os.environ["PYTHONPATH"] = os.path.abspath(a.src)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, compare._raise_interrupt)
    qos_fd = compare.hold_pm_qos()
    harness = compare.Harness(compare.parse_args(["--quick", "--budget", "3600"]), log)
    shutil.rmtree(harness.box.tmpdir, ignore_errors=True)
    harness.box = DnsSandbox(log)
    path = os.environ.get("PATH", "")
    rows: list[str] = []
    try:
        for mtu in [int(m) for m in a.mtus.split(",")]:
            for backend in a.backends.split(","):
                os.environ["PATH"] = f"{PASTA_NEW_DIR}:{path}" if backend == "pasta-new" else path
                rows += _peer_cell(harness, compare, backend, mtu, a)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
    finally:
        os.environ["PATH"] = path
        harness.box.cleanup()
        shutil.rmtree(harness.tmp, ignore_errors=True)
        if qos_fd is not None:
            os.close(qos_fd)
    print(f"DNS A queries from the guest, one at a time: {a.reps} x {a.count} (+{WARMUP} warm-up)")
    print(f"{'backend':12s} {'MTU':>5s} {'query':10s} {'median ms':>9s} {'p90 ms':>7s} "
          f"{'CPU µs/q':>8s} {'RSS MB':>6s}  syscalls/q (strace -c)")  # fmt: skip
    for row in rows:
        print(row)
    return 0


def _peer_cell(
    harness: Any, compare: Any, backend: str, mtu: int, a: argparse.Namespace
) -> list[str]:
    kind = "pasta" if backend.startswith("pasta") else backend
    box = harness.box
    procs_before, ns_before = len(box.procs), len(box.namespaces)
    rows = []
    try:
        topo = harness.setup(kind, mtu)
        pid = topo.backend.pid
        box.popen(
            topo.sandbox,
            ["dnsmasq", "--no-resolv", "--no-hosts", "--keep-in-foreground",
             "--conf-file=/dev/null", "--pid-file=", "--user=root", "--local=/test.internal/",
             f"--address=/{FORWARDED_NAME}/{FORWARDED_ADDR}", "--port=53",
             "--listen-address=127.0.0.1", "--bind-interfaces"],
        )  # fmt: skip
        compare.wait_until(
            lambda: FORWARDED_ADDR in compare.ns_run(
                topo.sandbox, ["dig", "+time=1", "+tries=1", "+short", "@127.0.0.1",
                               FORWARDED_NAME], check=False).stdout,
            10.0, "dnsmasq",
        )  # fmt: skip
        queries = [("forwarded", FORWARDED_NAME)]
        if kind == "guestnet":
            queries.append(("built-in", BUILTIN_NAME))
        for label, name in queries:
            argv = [sys.executable, str(Path(__file__).resolve()), "client", "--server",
                    DNS_SERVER[kind], "--name", name, "--count", str(a.count)]  # fmt: skip
            medians, p90s, lost, bad = [], [], 0, 0
            cpu0 = compare.cpu_seconds(pid) or 0.0
            for _ in range(a.reps):
                out = compare.ns_run(topo.guest, argv, timeout=a.count * 2 + 60).stdout
                res = json.loads(out.strip().splitlines()[-1])
                lat = sorted(res["lat_us"])
                medians.append(statistics.median(lat))
                p90s.append(lat[int(len(lat) * 0.9)])
                lost += res["lost"]
                bad += res["bad"]
            cpu = ((compare.cpu_seconds(pid) or 0.0) - cpu0) / ((a.count + WARMUP) * a.reps)
            calls = ""
            if a.strace:
                calls = _strace_run(compare, topo, pid, argv)
            if a.profile and kind == "guestnet":
                _profile_run(compare, topo, pid, argv, f"{a.profile}/dns_{label}_{mtu}.txt")
            errs = f" lost {lost} bad {bad}" if lost or bad else ""
            rows.append(
                f"{backend:12s} {mtu:5d} {label:10s} {statistics.median(medians) / 1000:9.3f} "
                f"{statistics.median(p90s) / 1000:7.3f} {cpu * 1e6:8.1f} "
                f"{_peak_rss_mb(pid):6.1f}  {calls}{errs}"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    except (compare.CellError, subprocess.SubprocessError, OSError, ValueError) as exc:
        rows.append(f"{backend:12s} {mtu:5d} error: {exc}")
    finally:
        harness.teardown(procs_before, ns_before)
    return rows


def _profile_run(compare: Any, topo: Any, pid: int, argv: list[str], path: str) -> None:
    """One more client run with py-spy sampling guestnet; prints the hottest functions."""
    from bench_tcp import summarize

    os.makedirs(os.path.dirname(path), exist_ok=True)
    spy = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(pid),
         "--rate", "1000", "--nonblocking", "-f", "raw", "-o", path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        compare.ns_run(topo.guest, [*argv, "--count", "10000"], timeout=300)
    finally:
        spy.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)
        if spy.poll() is None:
            spy.kill()
            spy.wait(5)
    print(path, file=sys.stderr)
    print(summarize(path, top=25), file=sys.stderr, flush=True)


def _strace_run(compare: Any, topo: Any, pid: int, argv: list[str]) -> str:
    """One more client run with the backend under ``strace -c -f``: calls per query."""
    fd, out = tempfile.mkstemp(prefix="gndns-strace")
    os.close(fd)
    count = int(argv[argv.index("--count") + 1])
    tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", out, "-p", str(pid)])
    try:
        time.sleep(0.5)
        compare.ns_run(topo.guest, [*argv, "--warmup", "0"], timeout=count * 2 + 60)
    finally:
        tracer.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            tracer.wait(10)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait(5)
    try:
        total, top = _strace_calls(out)
    finally:
        os.unlink(out)
    return f"{total / count:.1f} ({top})"


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        sys.exit(client_main(sys.argv[2:]))
    if "--peers" in sys.argv:
        sys.exit(peers_main(sys.argv[1:]))
    quick = "--quick" in sys.argv
    n = 2000 if quick else 20000
    print(f"DNS service, {REPEATS} batches of {n} queries (latency: per query, or per window)")
    bench_builtin(n)
    bench_forward_core(n)
    bench_forward_loopback(n // 4, 1)
    bench_forward_loopback(n, 64)
    bench_link(n // 4, "host.guestnet.internal", "built-in")
    bench_link(n // 4, "www.example.com", "forwarded")


if __name__ == "__main__":
    main()
