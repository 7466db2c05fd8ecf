"""Soak: mixed traffic through a namespace guest for minutes; RSS, descriptors, flows over time.

Run (root; matplotlib for the plot: ``.venv/bin/pip install -e '.[bench]'``)::

    .venv/bin/python bench/soak.py [--minutes 20] [--mtu 1500] [--interval 5]
        [--csv soak.csv] [--png soak.png]

Theory of operation. One topology as bench/compare.py builds it (its ``Sandbox``): a
loopback-only *sandbox* namespace with ``guestnet netns GUEST --configure --api-socket S``, the
host-side servers on the sandbox's 127.0.0.1 (iperf3 servers, the netbench echo server, and a
dnsmasq that answers ``*.soak.test`` as the upstream DNS), and a *guest* namespace where the
load runs. Five load loops run side by side in the guest for the whole time, each a sequence of
bounded runs that stops at the deadline:

- bulk TCP, alternating guest→host and host→guest (iperf3 20 s runs);
- 1-byte round trips on one connection (netbench ``rr``, 2,000 at a time);
- connect churn (netbench ``connrate``, connect + 1 byte + close, 5 s at a time);
- DNS: a UDP query loop against guestnet's 10.0.2.3 for built-in and forwarded names, plus a
  TCP query now and then (``dig +tcp``);
- UDP: iperf3 ``-u`` at 50 Mbit/s in 10 s runs, alternating directions.

Every ``--interval`` seconds the sampler records guestnet's RSS (VmRSS) and descriptor count
(/proc/PID/fd), the flows per protocol and pool use from the API's ``/stats`` (frames
checked out and misses). After the load stops, it waits (at most 210 s, past the UDP idle
timeout) for the flows to drain. The CSV has one row per sample; the PNG plots RSS, descriptors,
flows and pool use against time, with the end of the load marked. The summary says how RSS and
descriptors moved between the first minute and the end of the load (flat lines are the point:
no leak, no stuck flows) and how many flows remained after the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import (  # noqa: E402
    FAMILIES,
    NETBENCH,
    NETNS_DIR,
    Sandbox,
    guest_ready,
    listening,
    ns_run,
    wait_until,
)

GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
IPERF_TCP, IPERF_UDP, ECHO = 5201, 5202, 5301
#: Longest wait for flows to drain after the load: past the UDP idle timeout (180 s) and a sweep.
DRAIN_S = 210.0
FIELDS = ("t", "rss_mb", "fds", "tcp", "udp", "icmp", "pool_in_use", "pool_misses", "load")


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.box = Sandbox(lambda msg: print(msg, file=sys.stderr))
        self.stop_load = threading.Event()
        self.rows: list[dict[str, float]] = []
        self.errors: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.lock = threading.Lock()

    # -- topology ----------------------------------------------------------------------------

    def setup(self) -> None:
        box = self.box
        self.guest, self.sandbox = box.netns("gu"), box.netns("sb")
        self.api = os.path.join(box.tmpdir, "api.sock")
        self.log = open(os.path.join(box.tmpdir, "guestnet.log"), "w")  # noqa: SIM115
        conf = os.path.join(box.tmpdir, "dnsmasq.conf")
        Path(conf).write_text(
            "no-resolv\nno-hosts\nlisten-address=127.0.0.1\nbind-interfaces\nport=53\n"
            "address=/soak.test/192.0.2.77\n"
        )
        box.popen(self.sandbox, ["dnsmasq", "-k", f"--conf-file={conf}", "--user=root"])
        wait_until(lambda: self._udp53(), 5.0, "dnsmasq")
        argv = [sys.executable, "-m", "guestnet", "netns", f"{NETNS_DIR}/{self.guest}",
                "--configure", "--mtu", str(self.args.mtu), "--api-socket", self.api,
                "--dns-upstream", "127.0.0.1"]  # fmt: skip
        self.gn = box.popen(self.sandbox, argv, self.log)
        wait_until(lambda: guest_ready(self.guest, "10.0.2.15", FAMILIES[4]), 20.0, "the guest")
        for port in (IPERF_TCP, IPERF_UDP):
            box.popen(self.sandbox, ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)])
        box.popen(self.sandbox, [sys.executable, str(NETBENCH), "serve", "--port", str(ECHO),
                                 "--max-seconds", str(self.args.minutes * 60 + 600)])  # fmt: skip
        for port in (IPERF_TCP, IPERF_UDP, ECHO):
            wait_until(lambda p=port: listening(self.sandbox, p), 10.0, f"port {port}")

    def _udp53(self) -> bool:
        out = ns_run(self.sandbox, ["ss", "-Hlun", "sport = :53"], check=False).stdout
        return bool(out.strip())

    # -- load ----------------------------------------------------------------------------------

    def _guest(self, argv: list[str], timeout: float) -> bool:
        """One bounded client run in the guest; whether it succeeded."""
        try:
            proc = subprocess.run(["ip", "netns", "exec", self.guest, *argv],
                                  capture_output=True, timeout=timeout, check=False)  # fmt: skip
            return proc.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _loop(self, name: str, step: Callable[[int], bool]) -> None:
        i = 0
        while not self.stop_load.is_set():
            ok = step(i)
            with self.lock:
                self.done[name] = self.done.get(name, 0) + 1
                if not ok:
                    self.errors[name] = self.errors.get(name, 0) + 1
            i += 1
            if not ok:
                self.stop_load.wait(1.0)

    def _left(self) -> float:
        return max(1.0, self.load_end - time.monotonic())

    def bulk(self, i: int) -> bool:
        secs = int(min(20, self._left()))
        argv = ["iperf3", "-c", GATEWAY, "-p", str(IPERF_TCP), "-t", str(secs), "-J"]
        return self._guest(argv + (["-R"] if i % 2 else []), secs + 30)

    def rr(self, i: int) -> bool:
        argv = [sys.executable, str(NETBENCH), "rr", "--host", GATEWAY, "--port", str(ECHO),
                "--count", "2000", "--timeout", "30"]  # fmt: skip
        return self._guest(argv, 40)

    def churn(self, i: int) -> bool:
        argv = [sys.executable, str(NETBENCH), "connrate", "--host", GATEWAY, "--port",
                str(ECHO), "--seconds", "5", "--max", "20000", "--timeout", "30"]  # fmt: skip
        return self._guest(argv, 40)

    def dns(self, i: int) -> bool:
        if i % 10 == 9:
            return self._guest(["dig", "+tcp", "+time=2", "+tries=1", f"@{DNS}", "a.soak.test"], 10)
        code = DNS_LOOP.replace("SERVER", DNS)
        return self._guest([sys.executable, "-c", code], 30)

    def udp(self, i: int) -> bool:
        secs = int(min(10, self._left()))
        argv = ["iperf3", "-c", GATEWAY, "-p", str(IPERF_UDP), "-u", "-b", "50M", "-l", "1400",
                "-t", str(secs), "-J"]  # fmt: skip
        return self._guest(argv + (["-R"] if i % 2 else []), secs + 30)

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, t0: float, load: bool) -> dict[str, float]:
        pid = self.gn.pid
        row: dict[str, float] = {"t": time.monotonic() - t0, "load": 1.0 if load else 0.0}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    row["rss_mb"] = int(line.split()[1]) / 1024
            row["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        stats = api_get(self.api, "/stats") or {}
        by_proto = (stats.get("flows") or {}).get("by_proto") or {}
        for proto in ("tcp", "udp", "icmp"):
            row[proto] = int((by_proto.get(proto) or {}).get("total", 0))
        in_use = misses = 0
        for pool in (stats.get("pool") or {}).values():
            in_use += int(pool.get("in_use", 0))
            misses += int(pool.get("misses", 0))
        row["pool_in_use"], row["pool_misses"] = in_use, misses
        return row

    def run(self) -> int:
        self.setup()
        t0 = time.monotonic()
        self.load_end = t0 + self.args.minutes * 60
        loops = {"bulk": self.bulk, "rr": self.rr, "churn": self.churn, "dns": self.dns,
                 "udp": self.udp}  # fmt: skip
        loops = {k: v for k, v in loops.items() if k in self.args.loads.split(",")}
        threads = [threading.Thread(target=self._loop, args=(n, f), daemon=True)
                   for n, f in loops.items()]  # fmt: skip
        for th in threads:
            th.start()
        while time.monotonic() < self.load_end:
            self.rows.append(self.sample(t0, True))
            time.sleep(min(self.args.interval, max(0.0, self.load_end - time.monotonic())))
        self.stop_load.set()
        for th in threads:
            th.join(timeout=90)
        drain_end = time.monotonic() + self.args.drain
        while time.monotonic() < drain_end:
            row = self.sample(t0, False)
            self.rows.append(row)
            if row.get("tcp", 1) == 0 and row.get("udp", 1) == 0 and row.get("icmp", 1) == 0:
                break
            time.sleep(self.args.interval)
        return self.report()

    # -- output ----------------------------------------------------------------------------------

    def report(self) -> int:
        args = self.args
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for row in self.rows:
                w.writerow({k: row.get(k, "") for k in FIELDS})
        plot(self.rows, args.png, f"guestnet soak, MTU {args.mtu}, {args.minutes:g} min")
        loaded = [r for r in self.rows if r["load"] and "rss_mb" in r]
        first = [r for r in loaded if r["t"] <= 60] or loaded[:1]
        last = self.rows[-1]
        rss0, rss1 = max(r["rss_mb"] for r in first), loaded[-1]["rss_mb"]
        fds0, fds1 = max(r["fds"] for r in first), loaded[-1]["fds"]
        peak = max(r["rss_mb"] for r in loaded)
        stuck = int(last.get("tcp", 0) + last.get("udp", 0) + last.get("icmp", 0))
        print(json.dumps({
            "minutes": args.minutes, "mtu": args.mtu, "samples": len(self.rows),
            "rss_first_minute_mb": round(rss0, 1), "rss_end_of_load_mb": round(rss1, 1),
            "rss_peak_mb": round(peak, 1), "fds_first_minute": fds0, "fds_end_of_load": fds1,
            "fds_after_drain": last.get("fds"), "flows_after_drain": stuck,
            "runs": self.done, "failed_runs": self.errors, "csv": args.csv, "png": args.png,
        }, indent=1))  # fmt: skip
        alive = self.gn.poll() is None
        return 0 if alive and stuck == 0 else 1

    def cleanup(self) -> None:
        self.stop_load.set()
        self.box.cleanup()
        with contextlib.suppress(Exception):
            self.log.close()


#: The guest's DNS loop: 200 A queries over UDP, built-in and forwarded names alternating.
DNS_LOOP = r"""
import random, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
names = [b"host.guestnet.internal", b"x.soak.test", b"y.soak.test"]
ok = 0
for i in range(200):
    qid = random.getrandbits(16)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for part in names[i % 3].split(b"."):
        q += bytes([len(part)]) + part
    q += b"\x00\x00\x01\x00\x01"
    s.sendto(q, ("SERVER", 53))
    try:
        data = s.recv(2048)
        ok += data[:2] == q[:2]
    except OSError:
        pass
raise SystemExit(0 if ok >= 190 else 1)
"""


def api_get(path: str, route: str) -> Any:
    """GET a route of guestnet's API over its unix socket (None if it does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(f"GET {route} HTTP/1.0\r\nHost: guestnet\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        body = data.split(b"\r\n\r\n", 1)[1]
        return json.loads(body)
    except (OSError, ValueError, IndexError):
        return None


def plot(rows: list[dict[str, float]], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = (
        ("RSS (MB)", ("rss_mb",)),
        ("descriptors", ("fds",)),
        ("flows", ("tcp", "udp", "icmp")),
        ("pool frames", ("pool_in_use", "pool_misses")),
    )
    end = next((r["t"] / 60 for r in rows if not r["load"]), None)
    for ax, (label, keys) in zip(axes, series, strict=True):
        for key in keys:
            ax.plot(t, [r.get(key, float("nan")) for r in rows], label=key)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if end is not None:
            ax.axvline(end, color="grey", linestyle="--", linewidth=1)
        if len(keys) > 1:
            ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("minutes (dashed: load stops)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--loads", default="bulk,rr,churn,dns,udp", help="which load loops run")
    p.add_argument("--drain", type=float, default=DRAIN_S, help="longest wait for flows to end")
    p.add_argument("--csv", default="soak.csv")
    p.add_argument("--png", default="soak.png")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("soak: needs root (namespaces)")
    soak = Soak(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return soak.run()
    finally:
        soak.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
