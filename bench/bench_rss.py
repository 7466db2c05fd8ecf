"""guestnet's memory: RSS after start and peak RSS, idle and under bulk TCP (issue 12).

Run (root): ``.venv/bin/python bench/bench_rss.py [--mtus 1500,65520] [--duration 3]
[--skip-qemu] [--skip-slirp] [--skip-netns] [--reps N] [--src DIR]`` (``--src``: the guestnet
tree to run, for an A/B against a ``git archive`` of another commit)

Cells, each with a fresh guestnet process in a loopback-only sandbox namespace:

- ``qemu MTU idle``: ``guestnet qemu --socket PATH --mtu MTU`` with no guest attached, read one
  second after its socket appears (what a VM's backend costs before the VM boots).
- ``slirp MTU idle``: ``guestnet slirp4netns --configure --disable-host-loopback --mtu MTU
  --netns-type=path GUEST tap0``, podman's way (``--disable-host-loopback`` makes guestnet list
  the host's addresses), read one second after the guest has its address.
- ``netns MTU``: ``guestnet netns GUEST --configure --mtu MTU``; ``start`` is read once the guest
  has its address, then iperf3 runs guest->host and host->guest (``--duration`` s each, through
  bench/bench_tcp.py's helpers) and ``peak`` is read at the end.

Each cell prints VmRSS at start, VmHWM (the kernel's peak RSS, from /proc/PID/status) at the end,
and, for netns, each iperf3 run's Gbit/s and guestnet's CPU seconds (utime + stime) per GB it
moved, and the frame pools' high-water marks from the stats API (slots in use at once, each
direction), which is what bounds the pools' share of the peak.
Every process and namespace is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

from bench_tcp import guest_ready, in_ns, iperf, sh, wait  # noqa: E402


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mb(kb: int) -> str:
    return f"{kb / 1024:5.1f} MB"


def pool_high_water(api: str) -> str:
    from guestnet.client import request

    status, stats = request(api, "GET", "/stats", timeout=5)
    if status != 200:
        return "pools: stats unavailable"
    pools = stats["pool"]
    parts = []
    for name in ("from_guest", "to_guest"):
        p = pools[name]
        parts.append(f"{name} high_water {p['high_water']} misses {p['misses']}")
    return "pools: " + ", ".join(parts)


def stop(gn: subprocess.Popen[bytes] | None) -> None:
    if gn is None:
        return
    gn.terminate()
    try:
        gn.wait(5)
    except subprocess.TimeoutExpired:
        gn.kill()
        gn.wait(5)


def remove_ns(*names: str) -> None:
    for ns in names:
        for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
            subprocess.run(["kill", "-9", pid], check=False)
        sh(["ip", "netns", "del", ns], check=False)


def add_ns(*names: str) -> None:
    for ns in names:
        sh(["ip", "netns", "add", ns])
        sh(in_ns(ns, ["ip", "link", "set", "lo", "up"]))


def qemu_cell(mtu: int, tmp: str) -> str:
    sandbox = f"gnrsq{os.getpid()}_{mtu}"
    sock = os.path.join(tmp, f"gn{mtu}.sock")
    gn: subprocess.Popen[bytes] | None = None
    try:
        add_ns(sandbox)
        gn = subprocess.Popen(
            in_ns(
                sandbox,
                [sys.executable, "-m", "guestnet", "qemu", "--socket", sock, "--mtu", str(mtu)],
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait(lambda: os.path.exists(sock), 15, "guestnet qemu to listen")
        time.sleep(1.0)
        rss, hwm = status_kb(gn.pid, "VmRSS"), status_kb(gn.pid, "VmHWM")
        return f"qemu  MTU {mtu:>5}: start {mb(rss)}, peak {mb(hwm)} (idle)"
    finally:
        stop(gn)
        remove_ns(sandbox)


def slirp_cell(mtu: int) -> str:
    """``guestnet slirp4netns`` as podman starts it (--disable-host-loopback), idle."""
    tag = f"{os.getpid()}_{mtu}"
    sandbox, guest = f"gnrsl{tag}", f"gnrsm{tag}"
    gn: subprocess.Popen[bytes] | None = None
    try:
        add_ns(sandbox, guest)
        gn = subprocess.Popen(
            in_ns(sandbox, [sys.executable, "-m", "guestnet", "slirp4netns", "--configure",
                            "--disable-host-loopback", "--mtu", str(min(mtu, 65520)),
                            "--netns-type=path", f"/run/netns/{guest}", "tap0"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def configured() -> bool:
            out = sh(in_ns(guest, ["ip", "-4", "-o", "addr", "show", "dev", "tap0"]), check=False)
            return " 10.0.2.100/" in out.stdout

        wait(configured, 15, "guestnet slirp4netns to configure tap0")
        time.sleep(1.0)
        rss, hwm = status_kb(gn.pid, "VmRSS"), status_kb(gn.pid, "VmHWM")
        return f"slirp MTU {mtu:>5}: start {mb(rss)}, peak {mb(hwm)} (idle, podman's argv)"
    finally:
        stop(gn)
        remove_ns(guest, sandbox)


def netns_cell(mtu: int, duration: float, tmp: str) -> str:
    tag = f"{os.getpid()}_{mtu}"
    sandbox, guest = f"gnrss{tag}", f"gnrsg{tag}"
    api = os.path.join(tmp, f"api{mtu}.sock")
    gn: subprocess.Popen[bytes] | None = None
    try:
        add_ns(sandbox, guest)
        gn = subprocess.Popen(
            in_ns(sandbox, [sys.executable, "-m", "guestnet", "netns", f"/run/netns/{guest}",
                            "--configure", "--mtu", str(mtu), "--api-socket", api]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait(lambda: guest_ready(guest, 4), 15, "guestnet to configure the guest")
        rss = status_kb(gn.pid, "VmRSS")
        runs = []
        for reverse in (False, True):
            cpu0 = cpu_seconds(gn.pid)
            gbps, nbytes = iperf(guest, sandbox, 4, duration, reverse)
            runs.append(
                f"{gbps:.2f} Gbit/s {(cpu_seconds(gn.pid) - cpu0) / (nbytes / 1e9):.2f} s/GB"
            )
        hwm = status_kb(gn.pid, "VmHWM")
        return (
            f"netns MTU {mtu:>5}: start {mb(rss)}, peak {mb(hwm)} "
            f"(up {runs[0]}, down {runs[1]}; {pool_high_water(api)})"
        )
    finally:
        stop(gn)
        remove_ns(guest, sandbox)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mtus", default="1500,65520")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--skip-qemu", action="store_true")
    p.add_argument("--skip-netns", action="store_true")
    p.add_argument("--skip-slirp", action="store_true")
    p.add_argument(
        "--src",
        default=os.path.join(ROOT, "src"),
        help="the guestnet source tree to run (an A/B against another checkout)",
    )
    p.add_argument("--reps", type=int, default=1, help="runs of every cell")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_rss: needs root (network namespaces)", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = os.path.abspath(args.src)
    mtus = [int(m) for m in args.mtus.split(",")]
    with tempfile.TemporaryDirectory(prefix="gnrss") as tmp:
        for _ in range(args.reps):
            for mtu in [] if args.skip_qemu else mtus:
                print(qemu_cell(mtu, tmp), flush=True)
            for mtu in [] if args.skip_slirp else mtus:
                print(slirp_cell(mtu), flush=True)
            for mtu in [] if args.skip_netns else mtus:
                print(netns_cell(mtu, args.duration, tmp), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
