"""Request/response latency and connection rate, guestnet beside its peers, quickly.

Run (root): ``.venv/bin/python bench/bench_latency.py [--backends guestnet,slirp4netns]
[--mtus 1500] [--reps 3] [--count 2000] [--conn-seconds 2] [--profile DIR] [--strace]``

A focused cut of bench/compare.py for working on issue 6's latency target: the same per-cell
topology (compare.Harness builds and tears it down, PM QoS held the same way), but only the
1-byte ping-pong (``netbench rr``) and the connection rate (``netbench connrate``), so one cell
takes seconds. Medians over ``--reps``.

``--profile DIR`` samples the guestnet process with py-spy (``.venv/bin/pip install py-spy``)
during one extra rr run and one extra connrate run, writes the raw (collapsed) stacks to DIR
and prints the hottest functions. ``--strace`` counts guestnet's system calls (``strace -c``)
during one extra run of each and prints them with the number of round trips/connections, so the
calls per request can be read off. ``--attach CMD`` runs any tool on the guestnet process the
same way (``{pid}`` and ``{what}`` in CMD are replaced; e.g. ``"perf stat -p {pid}"``).
"CPU us/rr" and "CPU us/conn" are the backend process's utime+stime per round trip and per
connection (/proc/PID/stat, 10 ms ticks: use --count >= 2000).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (bench/ is not a package)
from bench_tcp import summarize  # noqa: E402


def _utime_stime(pid: int) -> tuple[float, float]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _rr_argv(count: int) -> list[str]:
    return ["rr", "--host", compare.GATEWAY, "--port", str(compare.ECHO_PORT), "--count",
            str(count), "--timeout", "30"]  # fmt: skip


def _conn_argv(seconds: float) -> list[str]:
    return ["connrate", "--host", compare.GATEWAY, "--port", str(compare.ECHO_PORT),
            "--seconds", str(seconds), "--max", "5000", "--timeout", str(seconds + 10)]  # fmt: skip


def _attach(tool: list[str], pid: int) -> subprocess.Popen[Any]:
    argv = [*tool, "-p", str(pid)] if tool[0] == "strace" else [*tool, "--pid", str(pid)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # let it attach before the traffic starts
    return proc


def _detach(proc: subprocess.Popen[Any], stream: str = "stderr") -> str:
    proc.send_signal(2)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    return str(out if stream == "stdout" else err)


def measure(h: compare.Harness, backend: str, mtu: int, args: argparse.Namespace) -> dict[str, Any]:
    procs_before, ns_before = len(h.box.procs), len(h.box.namespaces)
    out: dict[str, Any] = {"backend": backend, "mtu": mtu}
    try:
        topo = h.setup(backend, mtu)
        h.box.popen(
            topo.sandbox,
            [sys.executable, str(compare.NETBENCH), "serve", "--bind", topo.bind, "--port",
             str(compare.ECHO_PORT), "--max-seconds", "600"],
        )  # fmt: skip
        compare.wait_until(
            lambda: compare.listening(topo.sandbox, compare.ECHO_PORT), 5.0, "echo server"
        )
        h.probe(topo)
        pid = topo.backend.pid if topo.backend is not None else 0
        med, p99, rate, rr_cpu, conn_cpu = [], [], [], [], []
        for _ in range(args.reps):
            u0, s0 = _utime_stime(pid)
            r = h.netbench(topo, _rr_argv(args.count), timeout=45)
            u1, s1 = _utime_stime(pid)
            t0, t1 = u0 + s0, u1 + s1
            print(
                f"  rr: user {(u1 - u0) * 1e6 / r['count']:.1f} us, "
                f"sys {(s1 - s0) * 1e6 / r['count']:.1f} us per round trip",
                file=sys.stderr,
            )
            med.append(r["median_ms"])
            p99.append(r["p99_ms"])
            rr_cpu.append((t1 - t0) * 1e6 / (r["count"] + 20))  # netbench's 20 warm-up trips
            c = h.netbench(topo, _conn_argv(args.conn_seconds), timeout=args.conn_seconds + 20)
            t2 = compare.cpu_seconds(pid) or 0.0
            rate.append(c["per_s"])
            conn_cpu.append((t2 - t1) * 1e6 / c["count"])
        out.update(
            rr_median=statistics.median(med), rr_p99=statistics.median(p99),
            conn_per_s=statistics.median(rate), rr_cpu_us=statistics.median(rr_cpu),
            conn_cpu_us=statistics.median(conn_cpu),
        )  # fmt: skip
        if backend == "guestnet" and pid and args.profile:
            os.makedirs(args.profile, exist_ok=True)
            for what, argv in (("rr", _rr_argv(args.count * 3)),
                               ("connrate", _conn_argv(args.conn_seconds * 2))):  # fmt: skip
                path = os.path.join(args.profile, f"{what}_{mtu}.txt")
                spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                prof = _attach([spy, "record", "--format", "raw", "-r", "2000", "-o", path], pid)
                h.netbench(topo, argv, timeout=90)
                _detach(prof)
                print(summarize(path, 25), flush=True)
        if backend == "guestnet" and pid and args.attach:
            for what, argv in (("rr", _rr_argv(args.count)),
                               ("connrate", _conn_argv(args.conn_seconds))):  # fmt: skip
                tool = subprocess.Popen(
                    shlex.split(args.attach.replace("{pid}", str(pid)).replace("{what}", what)),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
                time.sleep(1.0)
                r = h.netbench(topo, argv, timeout=90)
                text = _detach(tool, stream="stdout")
                print(f"--- {args.attach} during {what}: {r.get('count')} ---\n{text}", flush=True)
        if backend == "guestnet" and pid and args.strace:
            for what, argv in (("rr", _rr_argv(args.count)),
                               ("connrate", _conn_argv(args.conn_seconds))):  # fmt: skip
                st = _attach(["strace", "-c", "-f"], pid)
                r = h.netbench(topo, argv, timeout=90)
                err = _detach(st)
                n = r.get("count", 0) + (20 if what == "rr" else 0)  # netbench warm-up
                print(f"--- strace -c during {what}: {n} requests ---\n{err}", flush=True)
    except compare.CellError as exc:
        out["error"] = str(exc)
    finally:
        h.teardown(procs_before, ns_before)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="guestnet,slirp4netns")
    p.add_argument("--mtus", default="1500")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--conn-seconds", type=float, default=2.0)
    p.add_argument("--profile", metavar="DIR")
    p.add_argument("--strace", action="store_true")
    p.add_argument("--attach", metavar="CMD", help="run CMD ({pid}: guestnet's) during extra runs")
    args = p.parse_args()
    if not (1 <= args.reps <= 20 and 10 <= args.count <= 100000 and args.conn_seconds <= 30):
        p.error("--reps 1..20, --count 10..100000, --conn-seconds <= 30")
    cargs = compare.parse_args(["--backends", args.backends, "--mtus", args.mtus])
    qos = compare.hold_pm_qos()
    h = compare.Harness(cargs, lambda m: print(m, file=sys.stderr, flush=True))
    rows = []
    try:
        for mtu in cargs.mtus:
            for backend in cargs.backends:
                rows.append(measure(h, backend, mtu, args))
    finally:
        h.box.cleanup()
        shutil.rmtree(h.tmp, ignore_errors=True)
        if qos is not None:
            os.close(qos)
    print(f"{'backend':<12} {'MTU':>5} {'RR med ms':>9} {'RR p99 ms':>9} {'conn/s':>7} "
          f"{'CPU us/rr':>9} {'CPU us/conn':>11}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<12} {r['mtu']:>5} error: {r['error']}")
            continue
        print(f"{r['backend']:<12} {r['mtu']:>5} {r['rr_median']:9.3f} {r['rr_p99']:9.3f} "
              f"{r['conn_per_s']:7.0f} {r['rr_cpu_us']:9.1f} {r['conn_cpu_us']:11.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
