"""Published TCP ports (host -> guest forwarding): guestnet ``-p`` side by side with pasta ``-t``.

Run (root): ``.venv/bin/python bench/bench_forward.py [--mtus 1500,65520] [--duration 5]
[--reps 3] [--backends guestnet,pasta] [--conn-seconds 3] [--src OTHER/src]``

For each backend and MTU: a sandbox namespace runs the backend, which serves a guest namespace and
publishes host port 15201 -> guest 5201 (``iperf3 -s`` in the guest) and 15301 -> 5301 (bench/
netbench.py's echo server in the guest). Clients run in the sandbox against 127.0.0.1:HOSTPORT:
``iperf3 -c`` (host->guest: the client sends) and ``iperf3 -c -R`` (guest->host), then
``netbench.py connrate`` (connect, 1 byte echoed by the guest, close: forwarded connections per
second; the connect time itself is the sandbox kernel's accept and says nothing of the backend).

guestnet's sandbox is loopback-only; pasta refuses to start without a routable interface, so its
sandbox also gets a veth to a dead-end namespace (198.18.0.1/24 <-> 198.18.0.2/24, default route
via 198.18.0.2, nothing behind it). pasta: ``pasta --runas 0 --netns /run/netns/GUEST
--config-net -a 10.0.2.15 -n 24 -g 10.0.2.2 -m MTU --no-ndp --no-dhcpv6 --ipv4-only -f -q
-t 15201:5201 -t 15301:5301`` in the sandbox. Prints a table of medians over ``--reps``, with
the backend process's CPU time (utime + stime) per forwarded connection. ``--duration 0`` skips
iperf3 (connections only); ``--src`` runs another tree's guestnet (A/B). ``--strace N`` also
counts guestnet's system calls (``strace -c -f`` attached to it) during N more forwarded
connections and prints them per connection.
Every process and namespace is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GUEST_IP = "10.0.2.15"
IPERF = (15201, 5201)
ECHO = (15301, 5301)


def sh(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def guest_ready(ns: str) -> bool:
    out = sh(in_ns(ns, ["ip", "-4", "-o", "addr", "show"]), check=False).stdout
    route = sh(in_ns(ns, ["ip", "-4", "route", "show", "default"]), check=False).stdout
    return GUEST_IP in out and "default" in route


def listening(ns: str, port: int) -> bool:
    out = sh(in_ns(ns, ["ss", "-Hltn", f"sport = :{port}"]), check=False).stdout
    return bool(out.strip())


class Cell:
    """One backend at one MTU: namespaces, the backend, the guest's servers."""

    def __init__(self, backend: str, mtu: int) -> None:
        tag = f"{os.getpid()}_{backend[0]}{mtu}"
        self.backend = backend
        self.mtu = mtu
        self.sandbox, self.guest, self.deadend = f"fbsb{tag}", f"fbgu{tag}", f"fbde{tag}"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def start(self) -> None:
        names = [self.sandbox, self.guest]
        if self.backend == "pasta":
            names.append(self.deadend)
        for ns in names:
            sh(["ip", "netns", "add", ns])
            self.made.append(ns)
            sh(in_ns(ns, ["ip", "link", "set", "lo", "up"]))
        if self.backend == "pasta":
            self._deadend_veth()
            cmd = ["pasta", "--runas", "0", "--netns", f"/run/netns/{self.guest}",
                   "--config-net", "-a", GUEST_IP, "-n", "24", "-g", "10.0.2.2",
                   "-m", str(self.mtu), "--no-ndp", "--no-dhcpv6", "--ipv4-only", "-f", "-q",
                   "-t", f"{IPERF[0]}:{IPERF[1]}", "-t", f"{ECHO[0]}:{ECHO[1]}"]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "guestnet", "netns", f"/run/netns/{self.guest}",
                   "--configure", "--mtu", str(self.mtu),
                   "-p", f"{IPERF[0]}:{IPERF[1]}", "-p", f"{ECHO[0]}:{ECHO[1]}"]  # fmt: skip
        self.procs.append(
            subprocess.Popen(
                in_ns(self.sandbox, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        )
        wait(lambda: guest_ready(self.guest), 20, f"{self.backend} to configure the guest")
        # The guest speaks once, so that guestnet learns its MAC (a VM would, with DHCP).
        sh(in_ns(self.guest, ["ping", "-c", "1", "-W", "2", "10.0.2.2"]), check=False)
        netbench = os.path.join(HERE, "netbench.py")
        self.procs.append(
            subprocess.Popen(
                in_ns(self.guest, [sys.executable, netbench, "serve", "--bind", "0.0.0.0",
                                   "--port", str(ECHO[1]), "--max-seconds", "900"]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        wait(lambda: listening(self.guest, ECHO[1]), 5, "echo server in the guest")
        wait(lambda: listening(self.sandbox, ECHO[0]), 5, "the published port")

    def _deadend_veth(self) -> None:
        a, b = f"fbva{os.getpid() % 100000}", f"fbvb{os.getpid() % 100000}"
        sh(["ip", "link", "add", a, "netns", self.sandbox, "type", "veth",
            "peer", "name", b, "netns", self.deadend])  # fmt: skip
        sh(in_ns(self.sandbox, ["ip", "addr", "add", "198.18.0.1/24", "dev", a]))
        sh(in_ns(self.sandbox, ["ip", "link", "set", a, "up"]))
        sh(in_ns(self.deadend, ["ip", "addr", "add", "198.18.0.2/24", "dev", b]))
        sh(in_ns(self.deadend, ["ip", "link", "set", b, "up"]))
        sh(in_ns(self.sandbox, ["ip", "route", "add", "default", "via", "198.18.0.2"]))

    def iperf(self, duration: float, reverse: bool) -> float:
        """Gbit/s through the published port; ``reverse``: guest->host."""
        server = subprocess.Popen(
            in_ns(self.guest, ["iperf3", "-s", "-1", "-p", str(IPERF[1])]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait(lambda: listening(self.guest, IPERF[1]), 5, "iperf3 -s in the guest")
            cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(IPERF[0]), "-t", f"{duration:g}", "-J"]
            out = sh(in_ns(self.sandbox, cmd + (["-R"] if reverse else [])), timeout=duration + 30)
            data = json.loads(out.stdout)
            return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
        finally:
            server.kill()
            server.wait(5)

    def cpu_seconds(self) -> float:
        """utime + stime of the backend process (/proc/PID/stat)."""
        with open(f"/proc/{self.procs[0].pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def connrate(self, seconds: float) -> float:
        netbench = os.path.join(HERE, "netbench.py")
        out = sh(
            in_ns(self.sandbox, [sys.executable, netbench, "connrate", "--host", "127.0.0.1",
                                 "--port", str(ECHO[0]), "--seconds", str(seconds),
                                 "--max", "1000000"]),
            timeout=seconds + 30,
        )  # fmt: skip
        result = json.loads(out.stdout)
        if "error" in result:
            raise RuntimeError(f"connrate: {result['error']}")
        return float(result["per_s"])

    def strace(self, count: int) -> str:
        """``strace -c -f`` on the backend during ``count`` forwarded connections: the table,
        and each row's calls per connection."""
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(self.procs[0].pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)  # let it attach before the traffic starts
            netbench = os.path.join(HERE, "netbench.py")
            sh(in_ns(self.sandbox, [sys.executable, netbench, "connrate", "--host", "127.0.0.1",
                                    "--port", str(ECHO[0]), "--seconds", "60",
                                    "--max", str(count)]), timeout=90)  # fmt: skip
        finally:
            tracer.send_signal(2)
            _, err = tracer.communicate(timeout=20)
        lines = []
        for line in err.splitlines():
            cols = line.split()
            if len(cols) >= 5 and cols[3].isdigit():
                errors = f", {int(cols[4]) / count:.2f} failed" if len(cols) == 6 else ""
                lines.append(f"{cols[-1]:>14} {int(cols[3]) / count:6.2f} per connection{errors}")
        return "\n".join(lines)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for ns in reversed(self.made):
            for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            sh(["ip", "netns", "del", ns], check=False)


def run_cell(backend: str, mtu: int, args: argparse.Namespace) -> dict[str, float | str]:
    cell = Cell(backend, mtu)
    try:
        cell.start()
        reps = range(args.reps if args.duration else 0)
        h2g = [cell.iperf(args.duration, False) for _ in reps] or [0.0]
        g2h = [cell.iperf(args.duration, True) for _ in reps] or [0.0]
        conns, cpu = [], []
        for _ in range(args.reps):
            cpu0 = cell.cpu_seconds()
            rate = cell.connrate(args.conn_seconds)
            conns.append(rate)
            cpu.append((cell.cpu_seconds() - cpu0) * 1e6 / max(rate * args.conn_seconds, 1.0))
        if args.strace and backend == "guestnet":
            table = cell.strace(args.strace)
            print(f"--- guestnet, MTU {mtu}: strace -c -f, {args.strace} connections ---")
            print(table, flush=True)
        return {
            "h2g": statistics.median(h2g),
            "g2h": statistics.median(g2h),
            "conns": statistics.median(conns),
            "cpu": statistics.median(cpu),
            "spread": f"{min(h2g):.2f}-{max(h2g):.2f} / {min(g2h):.2f}-{max(g2h):.2f}",
        }
    except Exception as exc:  # one failing cell must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        cell.close()


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--mtus", default="1500,65520")
    p.add_argument("--backends", default="guestnet,pasta")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--conn-seconds", type=float, default=3.0)
    p.add_argument("--strace", type=int, default=0, metavar="N",
                   help="count guestnet's system calls during N more connections")  # fmt: skip
    p.add_argument(
        "--src",
        metavar="DIR",
        default=os.path.join(ROOT, "src"),
        help="the source tree whose guestnet runs (A/B); default: this one's",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_forward: needs root (network namespaces)", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = args.src
    print(
        f"| backend | MTU | host->guest Gbit/s | guest->host Gbit/s | forwarded conn/s | "
        f"CPU us/conn | range h->g / g->h |   ({args.reps} reps x {args.duration:g} s, medians)"
    )
    print("|---|---|---|---|---|---|---|")
    for mtu in (int(m) for m in args.mtus.split(",")):
        for backend in args.backends.split(","):
            r = run_cell(backend, mtu, args)
            if "error" in r:
                print(f"| {backend} | {mtu} | error: {r['error']} | | | | |", flush=True)
                continue
            print(
                f"| {backend} | {mtu} | {r['h2g']:.2f} | {r['g2h']:.2f} | {r['conns']:.0f} | "
                f"{r['cpu']:.0f} | {r['spread']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
