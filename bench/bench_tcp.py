"""TCP through guestnet: iperf3 guest->host and host->guest, and connections per second.

Run (root): ``.venv/bin/python bench/bench_tcp.py [--mtus 1500,65520] [--families 4,6]
[--duration 5] [--reps 1] [--loss 0] [--no-offloads] [--directions both|up|down]
[--profile DIR] [--strace N] [--src OTHER/src]``

For each MTU: a loopback-only sandbox namespace runs guestnet (``netns GUEST --configure``, which
sets both families) and the "host" servers (``iperf3 -s`` and bench/netbench.py's echo server on
127.0.0.1, over IPv6 on ::1); the guest namespace runs the clients against the gateway 10.0.2.2
(over IPv6 fd00::2, which guestnet maps to the sandbox's ::1). With both ``--families`` the two
families' runs alternate within the one guestnet (IPv4 first in even repetitions, IPv6 first in
odd ones), so the IPv6/IPv4 ratio is not a ratio of two set-ups or of two moments of a noisy
machine. Prints one line per MTU and family: Gbit/s each way (median of ``--reps``) with
guestnet's CPU seconds per GB moved in that direction, the CPU seconds per GB over all those
runs, then connections/s and the median connect time (``--directions`` limits the runs to one
direction, and then skips the connection rate).
``--loss N`` drops N% of packets both ways in the guest namespace (nftables), for a look at
recovery speed. ``--no-offloads`` runs guestnet without TAP offloads (the before/after lever);
``--profile DIR`` samples guestnet with py-spy (``pip install py-spy`` into the venv) during the
first run of each direction, writes collapsed stacks (``DIR/guestnet_MTU_up.txt``...) and
prints the hottest functions (share of samples in the function itself, and under it).
``--strace N`` also counts guestnet's system calls (``strace -c -f`` attached to it) during N more
guest->host connections, per connection (bench/bench_forward.py's ``--strace`` for the
forwarded direction). Every process and namespace is removed at the end, also on error or Ctrl-C.
bench/compare.py is the side-by-side harness against the peers; this is the quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Per IP version: the gateway the guest dials, where the servers listen, the guest's address.
FAMILIES = {4: ("10.0.2.2", "127.0.0.1", "10.0.2.15"), 6: ("fd00::2", "::1", "fd00::15")}
IPERF_PORT = 5201
ECHO_PORT = 5301


def sh(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def guest_ready(ns: str, family: int) -> bool:
    """guestnet has configured the guest's address (past duplicate address detection)."""
    out = sh(in_ns(ns, ["ip", f"-{family}", "-o", "addr", "show", "dev", "eth0"]), check=False)
    address = FAMILIES[family][2]
    return any(
        f" {address}/" in line and "tentative" not in line for line in out.stdout.splitlines()
    )


def listening(ns: str, port: int) -> bool:
    out = sh(in_ns(ns, ["ss", "-Hltn", f"sport = :{port}"]), check=False).stdout
    return bool(out.strip())


def add_loss(ns: str, percent: int) -> None:
    sh(in_ns(ns, ["nft", "add", "table", "inet", "loss"]))
    for hook in ("input", "output"):
        sh(in_ns(ns, ["nft", "add", "chain", "inet", "loss", hook,
                      f"{{ type filter hook {hook} priority 0; }}"]))  # fmt: skip
        sh(in_ns(ns, ["nft", "add", "rule", "inet", "loss", hook, "numgen", "random",
                      "mod", "100", "<", str(percent), "drop"]))  # fmt: skip


def iperf(
    guest: str,
    sandbox: str,
    family: int,
    duration: float,
    reverse: bool,
    prof: tuple[int, str] | None = None,
) -> tuple[float, int]:
    """One iperf3 run: Gbit/s and bytes received; ``prof`` (pid, path prefix): py-spy samples the
    pid."""
    gateway, bind, _ = FAMILIES[family]
    server = subprocess.Popen(
        in_ns(sandbox, ["iperf3", "-s", "-1", "-B", bind, "-p", str(IPERF_PORT)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait(lambda: listening(sandbox, IPERF_PORT), 5, "iperf3 -s")
        cmd = ["iperf3", "-c", gateway, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J"]
        spy = None
        if prof is not None:
            path = f"{prof[1]}_{'down' if reverse else 'up'}.txt"
            spy = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid",
                 str(prof[0]), "--duration", str(max(1, int(duration) - 1)), "--rate", "250",
                 "--nonblocking", "-f", "raw", "-o", path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        out = sh(in_ns(guest, cmd + (["-R"] if reverse else [])), timeout=duration + 30)
        if spy is not None:
            spy.wait(30)
            print(summarize(path), flush=True)
        received = json.loads(out.stdout)["end"]["sum_received"]
        return float(received["bits_per_second"]) / 1e9, int(received["bytes"])
    finally:
        server.kill()
        server.wait(5)


def summarize(path: str, top: int = 12) -> str:
    """The hottest functions of a py-spy raw (collapsed) profile: self and total share."""
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(count)
            samples += n
            frames = [fr.split(" (")[0] for fr in stack.split(";")]
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
            for fr in set(frames):
                total_n[fr] = total_n.get(fr, 0) + n
    lines = [f"{path}: {samples} samples; self% total% function"]
    for name, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / samples:5.1f} {100 * total_n[name] / samples:5.1f}  {name}")
    return "\n".join(lines)


def connrate(guest: str, sandbox: str, family: int, seconds: float) -> dict[str, float]:
    netbench = os.path.join(HERE, "netbench.py")
    gateway, bind, _ = FAMILIES[family]
    server = subprocess.Popen(
        in_ns(sandbox, [sys.executable, netbench, "serve", "--bind", bind, "--port",
                        str(ECHO_PORT), "--max-seconds", str(seconds + 30)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait(lambda: listening(sandbox, ECHO_PORT), 5, "echo server")
        out = sh(in_ns(guest, [sys.executable, netbench, "connrate", "--host", gateway,
                               "--port", str(ECHO_PORT), "--seconds", str(seconds)]),
                 timeout=seconds + 30)  # fmt: skip
        result: dict[str, float] = json.loads(out.stdout)
        return result
    finally:
        server.kill()
        server.wait(5)


def strace_conns(pid: int, guest: str, sandbox: str, family: int, count: int) -> str:
    """``strace -c -f`` on guestnet (``pid``) during ``count`` guest->host connections
    (netbench connrate, after 200 unmeasured ones): each row's calls per connection."""
    netbench = os.path.join(HERE, "netbench.py")
    gateway, bind, _ = FAMILIES[family]
    server = subprocess.Popen(
        in_ns(sandbox, [sys.executable, netbench, "serve", "--bind", bind, "--port",
                        str(ECHO_PORT), "--max-seconds", "150"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    tracer: subprocess.Popen[str] | None = None
    try:
        wait(lambda: listening(sandbox, ECHO_PORT), 5, "echo server")

        def run(n: int) -> None:
            sh(in_ns(guest, [sys.executable, netbench, "connrate", "--host", gateway, "--port",
                             str(ECHO_PORT), "--seconds", "60", "--max", str(n)]),
               timeout=90)  # fmt: skip

        run(200)  # warm-up: caches, the pool, the flow table
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # let it attach before the traffic starts
        run(count)
    finally:
        err = ""
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            _, err = tracer.communicate(timeout=20)
        server.kill()
        server.wait(5)
    lines = []
    for line in err.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[3].isdigit():
            errors = f", {int(cols[4]) / count:.2f} failed" if len(cols) == 6 else ""
            lines.append(f"{cols[-1]:>14} {int(cols[3]) / count:6.2f} per connection{errors}")
    return "\n".join(lines)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cell(mtu: int, families: list[int], args: argparse.Namespace) -> list[str]:
    """One guestnet at ``mtu``; every family's runs, interleaved; one line per family."""
    tag = f"{os.getpid()}_{mtu}"
    sandbox, guest = f"gnbsb{tag}", f"gnbgu{tag}"
    gn: subprocess.Popen[bytes] | None = None
    try:
        for ns in (sandbox, guest):
            sh(["ip", "netns", "add", ns])
            sh(in_ns(ns, ["ip", "link", "set", "lo", "up"]))
        gn_cmd = [sys.executable, "-m", "guestnet", "netns", f"/run/netns/{guest}",
                  "--configure", "--mtu", str(mtu)]  # fmt: skip
        if args.no_offloads:
            gn_cmd.append("--no-offloads")
        gn = subprocess.Popen(
            in_ns(sandbox, gn_cmd),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        wait(lambda: all(guest_ready(guest, f) for f in families), 15, "the guest's addresses")
        if args.loss:
            add_loss(guest, args.loss)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
        gbps: dict[tuple[int, bool], list[float]] = {}
        cpu = dict.fromkeys(families, 0.0)
        moved = dict.fromkeys(families, 0)
        #: Per family and direction (False: guest->host), for the per-direction CPU s/GB.
        cpu_dir: dict[tuple[int, bool], float] = {}
        moved_dir: dict[tuple[int, bool], int] = {}
        directions = {"both": (False, True), "up": (False,), "down": (True,)}[args.directions]
        for reverse in directions:
            for i in range(args.reps):
                for family in families if i % 2 == 0 else families[::-1]:
                    prof = None
                    if args.profile and i == 0:
                        prof = (gn.pid, os.path.join(args.profile, f"guestnet_{mtu}_ipv{family}"))
                    cpu0 = cpu_seconds(gn.pid)
                    rate, nbytes = iperf(guest, sandbox, family, args.duration, reverse, prof)
                    used = cpu_seconds(gn.pid) - cpu0
                    cpu[family] += used
                    moved[family] += nbytes
                    cpu_dir[family, reverse] = cpu_dir.get((family, reverse), 0.0) + used
                    moved_dir[family, reverse] = moved_dir.get((family, reverse), 0) + nbytes
                    gbps.setdefault((family, reverse), []).append(rate)
        lines = []
        for family in families:
            cr = connrate(guest, sandbox, family, 3.0) if args.directions == "both" else {}
            if args.strace:
                lines.append(f"--- MTU {mtu} IPv{family}: strace -c -f, {args.strace} connections")
                lines.append(strace_conns(gn.pid, guest, sandbox, family, args.strace))
            per_dir = []
            for reverse, name in ((False, "guest->host"), (True, "host->guest")):
                if (family, reverse) not in gbps:
                    continue
                per_gb = cpu_dir[family, reverse] / max(moved_dir[family, reverse] / 1e9, 1e-9)
                per_dir.append(
                    f"{name} {statistics.median(gbps[family, reverse]):6.2f} Gbit/s "
                    f"({per_gb:.3f} CPU s/GB)"
                )
            lines.append(
                f"MTU {mtu:>5} IPv{family}: {', '.join(per_dir)}, "
                f"{cpu[family] / max(moved[family] / 1e9, 1e-9):.3f} CPU s/GB, "
                f"{cr.get('per_s', 0):7.0f} connections/s "
                f"(connect median {cr.get('connect_median_ms', 0):.3f} ms)"
            )
        return lines
    finally:
        if gn is not None:
            gn.terminate()
            try:
                gn.wait(5)
            except subprocess.TimeoutExpired:
                gn.kill()
                gn.wait(5)
        for ns in (guest, sandbox):
            pids = sh(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], check=False)
            sh(["ip", "netns", "del", ns], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mtus", default="1500,65520")
    p.add_argument("--families", default="4,6", help="IP versions: 4, 6 or 4,6")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--loss", type=int, default=0, help="percent dropped both ways in the guest")
    p.add_argument("--no-offloads", action="store_true", help="guestnet without TAP offloads")
    p.add_argument(
        "--directions",
        choices=("both", "up", "down"),
        default="both",
        help="up: guest->host only; down: host->guest only (no connection rate)",
    )
    p.add_argument("--profile", metavar="DIR", help="py-spy flame graph per MTU into DIR")
    p.add_argument(
        "--strace",
        type=int,
        default=0,
        metavar="N",
        help="also count guestnet's system calls during N guest->host connections",
    )
    p.add_argument(
        "--src",
        metavar="DIR",
        default=os.path.join(ROOT, "src"),
        help="the source tree whose guestnet runs (A/B); default: this one's",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_tcp: needs root (network namespaces)", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = args.src
    families = [int(f) for f in args.families.split(",") if f]
    if not families or any(f not in FAMILIES for f in families):
        p.error(f"--families takes 4, 6 or 4,6, not {args.families!r}")
    for mtu in (int(m) for m in args.mtus.split(",")):
        for line in cell(mtu, families, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
