"""What ``--runas``/``--sandbox``/``--seccomp`` cost (issue 13, item 3): A/B in one sitting.

Run: .venv/bin/python bench/bench_harden.py [--quick] [--no-e2e]

- ``syscall``: in a child interpreter, the CPU time per call of two calls the loop makes all the
  time (``getpid``, the cheapest, and a 64-byte UDP ``sendto`` on loopback), in batches, before
  and after the allow-list is loaded: the filter's cost per system call (a BPF program of 45
  rules; the median batch, nanoseconds).
- ``preload``: in a child that has imported what ``guestnet netns`` has by then (the CLI), the
  wall time and the resident memory :func:`guestnet.io.harden.preload` adds.
- ``e2e`` (root; namespaces): ``iperf3 -n SIZE`` from a namespace guest to a server on the
  sandbox's loopback through the gateway (TCP NAT), guestnet plain and with ``--runas nobody
  --sandbox --seccomp`` interleaved, ``--repeat`` times each: guestnet's CPU seconds per GiB
  (utime + stime from /proc/PID/stat around the transfer) and the throughput, medians.

Every process and namespace it makes is removed on the way out; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

PY = sys.executable

SYSCALL_CHILD = r"""
import os, socket, statistics, sys, time
from guestnet.io.harden import install_seccomp
batches, per = int(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sink.bind(("127.0.0.1", 0))
sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
addr, payload = sink.getsockname(), b"x" * 64
def getpid():
    f = os.getpid
    for _ in range(per): f()
def sendto():
    f = sock.sendto
    for _ in range(per): f(payload, addr)
def measure(fn):
    out = []
    for _ in range(batches):
        t = time.thread_time_ns(); fn(); out.append((time.thread_time_ns() - t) / per)
    return statistics.median(out)
result = {"before": {"getpid": measure(getpid), "sendto": measure(sendto)}}
install_seccomp()
result["after"] = {"getpid": measure(getpid), "sendto": measure(sendto)}
print(__import__("json").dumps(result))
"""

PRELOAD_CHILD = r"""
import json, time
import guestnet.cli
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
from guestnet.io.harden import preload
before, t = rss(), time.perf_counter()
names = preload(seccomp=True)
print(json.dumps({"ms": (time.perf_counter() - t) * 1e3, "rss_kib": rss() - before,
                  "modules": len(names)}))
"""


def bench_syscall(batches: int, per: int) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [PY, "-c", SYSCALL_CHILD, str(batches), str(per)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result: dict[str, dict[str, float]] = json.loads(out.stdout)
    return result


def bench_preload(repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            [PY, "-c", PRELOAD_CHILD], capture_output=True, text=True, timeout=120, check=True
        )
        runs.append(json.loads(out.stdout))
    return {key: statistics.median(r[key] for r in runs) for key in ("ms", "rss_kib", "modules")}


# -- end to end ------------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _namespaces(tag: str) -> Iterator[tuple[str, str]]:
    sb, gu = f"bhsb{tag}", f"bhgu{tag}"
    try:
        for ns in (sb, gu):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        yield sb, gu
    finally:
        for ns in (sb, gu):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def e2e_once(tag: str, hardened: bool, size: str) -> dict[str, float]:
    """One iperf3 transfer guest -> host through guestnet; its CPU s/GiB and Gbit/s."""
    extra = ["--runas", "nobody", "--sandbox", "--seccomp"] if hardened else []
    with _namespaces(tag) as (sb, gu):
        server = subprocess.Popen(
            ["ip", "netns", "exec", sb, "iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", "5299"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        gn = subprocess.Popen(
            ["ip", "netns", "exec", sb, PY, "-m", "guestnet", "netns", f"/run/netns/{gu}",
             "--configure", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                route = subprocess.run(["ip", "-n", gu, "route", "show", "default"],
                                       capture_output=True, text=True, check=False)  # fmt: skip
                if "default" in route.stdout:
                    break
                time.sleep(0.1)
            time.sleep(1.0 if hardened else 0.5)  # the drop happens after the link is set up
            before = _cpu_s(gn.pid)
            run = subprocess.run(
                ["ip", "netns", "exec", gu, "iperf3", "-c", "10.0.2.2", "-p", "5299", "-n",
                 size, "-J"],
                capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
            cpu = _cpu_s(gn.pid) - before
            report = json.loads(run.stdout)["end"]["sum_received"]
            gib = report["bytes"] / (1 << 30)
            return {"cpu_s_per_gib": cpu / gib, "gbit_s": report["bits_per_second"] / 1e9}
        finally:
            _stop(gn)
            _stop(server)


def bench_e2e(repeat: int, size: str) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "hardened": []}
    for i in range(repeat):
        for mode in ("plain", "hardened"):
            runs[mode].append(e2e_once(f"{os.getpid() % 10000}{i}", mode == "hardened", size))
    return {
        mode: {k: statistics.median(r[k] for r in rs) for k in ("cpu_s_per_gib", "gbit_s")}
        for mode, rs in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", default="2G", help="iperf3 -n (default 2G)")
    args = parser.parse_args()
    batches, per = (5, 20_000) if args.quick else (15, 100_000)
    sc = bench_syscall(batches, per)
    for call in ("getpid", "sendto"):
        b, a = sc["before"][call], sc["after"][call]
        print(f"syscall {call:7s} before {b:7.0f} ns  after {a:7.0f} ns  filter {a - b:+6.0f} ns")
    pre = bench_preload(3 if args.quick else args.repeat)
    print(f"preload {pre['ms']:.0f} ms, +{pre['rss_kib'] / 1024:.1f} MiB RSS, "
          f"{pre['modules']:.0f} modules")  # fmt: skip
    if args.no_e2e or os.geteuid() != 0 or shutil.which("iperf3") is None:
        return 0
    e2e = bench_e2e(1 if args.quick else args.repeat, "256M" if args.quick else args.size)
    for mode, r in e2e.items():
        print(f"e2e {mode:8s} guestnet CPU {r['cpu_s_per_gib']:.3f} s/GiB, "
              f"{r['gbit_s']:.2f} Gbit/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
