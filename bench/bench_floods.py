"""Floods from a guest: how many hostile frames a second guestnet takes in, and what a
legitimate connection sees meanwhile.

Run (root): ``.venv/bin/python bench/bench_floods.py [--kinds syn,udp,frag,dhcp,dns,arp,ndp]
[--rates 10000,30000] [--seconds 5] [--markdown OUT]``

For each flood kind and offered rate, one fresh topology as tests/integration/test_floods.py
builds it (a loopback-only sandbox with guestnet and the host-side servers, a namespace guest;
the same frame makers, ``tests/integration/flood.py``): the flood runs for ``--seconds`` while a
legitimate TCP connection (connect, 5 bytes echoed, close) is timed every 0.5 s. Reported: the
frames offered per second, the frames guestnet took in per second (its link counter), the
legitimate connections' median and worst time (and how many failed), guestnet's CPU seconds per
second of flood, and its peak RSS growth. The rows are read as: guestnet keeps up where the
frames taken in match the frames offered; a legitimate connection is served while the worst
time stays well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_rss import cpu_seconds  # noqa: E402
from nsutil import addresses, netns, start_guestnet  # noqa: E402
from test_floods import DNS_UPSTREAM_PORT, ECHO_PORT, FLOOD, Host, legit_tcp  # noqa: E402

from guestnet.client import request  # noqa: E402

KINDS = ("syn", "udp", "frag", "dhcp", "dns", "arp", "ndp")
PORTS = {"syn": ECHO_PORT, "udp": 9, "frag": 9, "dhcp": 67, "dns": 53, "arp": 9, "ndp": 9}


def one(kind: str, rate: int, seconds: float) -> dict[str, object]:
    with netns("bfsb") as sb, netns("bfgu") as gu:
        api = f"/tmp/bench-floods-{os.getpid()}.sock"
        args = ["netns", gu.path, "--configure", "--api-socket", api,
                "--dns-upstream", f"127.0.0.1:{DNS_UPSTREAM_PORT}"]  # fmt: skip
        gn = start_guestnet(sb, args, ready=lambda: bool(addresses(gu)), timeout=20)
        host = Host(sb)
        try:
            legit_tcp(gu)
            time.sleep(0.5)
            frames0 = request(api, "GET", "/stats")[1]["links"][0]["frames_in"]
            cpu0, hwm0 = cpu_seconds(gn.pid), gn.status_kb("VmHWM")
            argv = [sys.executable, FLOOD, kind, "--rate", str(rate), "--seconds", str(seconds),
                    "--count", str(int(rate * seconds)), "--port", str(PORTS[kind])]  # fmt: skip
            flood = gu.popen(argv, stdout=subprocess.PIPE, text=True)
            times: list[float] = []
            failed = 0
            while flood.poll() is None:
                time.sleep(0.5)
                if flood.poll() is not None:
                    break
                probe = legit_tcp(gu)
                try:
                    times.append(float(probe))
                except ValueError:
                    failed += 1
            sent = json.loads(flood.communicate(timeout=30)[0])
            cpu = cpu_seconds(gn.pid) - cpu0
            frames = request(api, "GET", "/stats")[1]["links"][0]["frames_in"] - frames0
            grown_kb = gn.status_kb("VmHWM") - hwm0
        finally:
            host.stop()
            gn.cleanup()
    secs = float(sent["seconds"]) or 1.0
    return {
        "kind": kind,
        "offered_per_s": round(sent["sent"] / secs),
        "taken_per_s": round(frames / secs),
        "legit_median_ms": round(statistics.median(times) * 1000, 1) if times else None,
        "legit_worst_ms": round(max(times) * 1000, 1) if times else None,
        "legit_failed": failed,
        "legit_runs": len(times) + failed,
        "cpu_s_per_s": round(cpu / secs, 2),
        "rss_growth_mb": round(grown_kb / 1024, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--rates", default="10000,30000")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--markdown")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_floods: needs root (namespaces)")
    rows = []
    for rate in (int(r) for r in args.rates.split(",")):
        for kind in args.kinds.split(","):
            row = one(kind, rate, args.seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()[0]
    lines = [
        f"Command: `.venv/bin/python bench/bench_floods.py {' '.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f})",
        "",
        "| flood | offered frames/s | taken in/s | legit median ms | legit worst ms | "
        "legit failed | guestnet CPU s/s | peak RSS growth MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['offered_per_s']:,} | {r['taken_per_s']:,} | "
            f"{r['legit_median_ms']} | {r['legit_worst_ms']} | "
            f"{r['legit_failed']}/{r['legit_runs']} | {r['cpu_s_per_s']} | {r['rss_growth_mb']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
