"""End to end, the C leaf operations against their Python twins: guestnet's CPU per packet.

Run (root): ``.venv/bin/python bench/bench_native.py [--mtu 1500] [--rounds 3] [--count 5000]
[--duration 3] [--rate 200M]``

One guestnet per cell in a namespace guest (bench/compare.py's harness: ``guestnet netns
--configure``, servers on the sandbox's 127.0.0.1, PM QoS held), started with
``GUESTNET_PURE=1`` (pure) or ``0`` (native, the C extension), alternating, ``--rounds`` times
each. Per cell:

- ``rr``: ``--count`` 1-byte round trips on one connection (bench/netbench.py): median ms, and
  guestnet's CPU (utime+stime, /proc/PID/stat) per round trip;
- ``udp h→g`` / ``udp g→h``: iperf3 ``-u -l 1400 -b RATE`` for ``--duration`` s, receiver-side
  loss and guestnet's CPU per datagram sent (the UDP NAT builds every datagram toward the guest
  with its full checksum: the path the extension shortens most);
- ``tcp h→g``: iperf3 bulk for ``--duration`` s: Gbit/s and CPU s/GB (with TAP offloads the
  checksums are the kernel's, so this is the control: little for the extension to change).

CPU time is what this compares: on the shared machine wall-clock rates swing with other jobs,
the CPU a packet costs much less. Prints medians over the rounds, both ways, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (bench/ is not a package)


def _udp_cell(h: compare.Harness, topo: Any, pid: int, extra: list[str], a: Any) -> list[float]:
    c0 = compare.cpu_seconds(pid) or 0.0
    data = h.iperf(topo, ["-u", "-l", "1400", "-b", a.rate, *extra], a.duration)
    c1 = compare.cpu_seconds(pid) or 0.0
    sent = data["end"].get("sum_sent", data["end"]["sum"])
    datagrams = max(1, int(sent["bytes"]) // 1400)
    _gbit, loss = compare.udp_result(data)
    return [loss, (c1 - c0) * 1e6 / datagrams]


def cell(h: compare.Harness, mode: str, a: Any) -> dict[str, list[float]]:
    """One guestnet, pure or native, measured; {metric: [values]}."""
    os.environ["GUESTNET_PURE"] = "1" if mode == "pure" else "0"
    procs_before, ns_before = len(h.box.procs), len(h.box.namespaces)
    out: dict[str, list[float]] = {}
    try:
        topo = h.setup("guestnet", a.mtu)
        h.box.popen(
            topo.sandbox,
            [sys.executable, str(compare.NETBENCH), "serve", "--bind", topo.bind, "--port",
             str(compare.ECHO_PORT), "--max-seconds", "600"],
        )  # fmt: skip
        compare.wait_until(
            lambda: compare.listening(topo.sandbox, compare.ECHO_PORT), 5.0, "echo server"
        )
        h.probe(topo)
        assert topo.backend is not None
        pid = topo.backend.pid
        c0 = compare.cpu_seconds(pid) or 0.0
        r = h.netbench(
            topo,
            ["rr", "--host", topo.gateway, "--port", str(compare.ECHO_PORT), "--count",
             str(a.count), "--timeout", "60"],
            timeout=90,
        )  # fmt: skip
        c1 = compare.cpu_seconds(pid) or 0.0
        out["rr median ms"] = [r["median_ms"]]
        out["rr CPU us/rt"] = [(c1 - c0) * 1e6 / (r["count"] + 20)]
        loss, cpu = _udp_cell(h, topo, pid, ["-R"], a)
        out["udp h→g loss %"], out["udp h→g CPU us/dgram"] = [loss], [cpu]
        loss, cpu = _udp_cell(h, topo, pid, [], a)
        out["udp g→h loss %"], out["udp g→h CPU us/dgram"] = [loss], [cpu]
        c0 = compare.cpu_seconds(pid) or 0.0
        data = h.iperf(topo, ["-R"], a.duration)
        c1 = compare.cpu_seconds(pid) or 0.0
        rx = data["end"]["sum_received"]
        out["tcp h→g Gbit/s"] = [rx["bits_per_second"] / 1e9]
        out["tcp h→g CPU s/GB"] = [(c1 - c0) / (int(rx["bytes"]) / 1e9)]
    except compare.CellError as exc:
        print(f"  {mode}: {exc}", file=sys.stderr)
    finally:
        h.teardown(procs_before, ns_before)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--rate", default="200M")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench_native.py needs root (network namespaces)", file=sys.stderr)
        return 2
    cargs = compare.parse_args(["--backends", "guestnet", "--budget", "1200"])
    qos = compare.hold_pm_qos()
    h = compare.Harness(cargs, lambda msg: print(msg, file=sys.stderr, flush=True))
    results: dict[str, dict[str, list[float]]] = {"pure": {}, "native": {}}
    try:
        for i in range(a.rounds):
            for mode in ("pure", "native"):
                print(f"round {i + 1}: {mode}", file=sys.stderr, flush=True)
                for k, v in cell(h, mode, a).items():
                    results[mode].setdefault(k, []).extend(v)
    finally:
        h.box.cleanup()
        if qos is not None:
            os.close(qos)
    print(f"MTU {a.mtu}, medians over {a.rounds} rounds (pure and native alternating)")
    print(f"{'metric':<24} {'pure':>9} {'native':>9} {'native/pure':>12}")
    for key in results["pure"]:
        if key not in results["native"]:
            continue
        x = statistics.median(results["pure"][key])
        y = statistics.median(results["native"][key])
        ratio = f"{y / x:11.2f}x" if x else "—"
        print(f"{key:<24} {x:9.3f} {y:9.3f} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
