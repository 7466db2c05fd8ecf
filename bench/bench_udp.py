"""UDP through guestnet beside the peers: loss at a fixed rate, and the highest rate under 1 %.

Run (root): ``.venv/bin/python bench/bench_udp.py [--backends guestnet,pasta,pasta-new,slirp4netns]
[--mtus 1500,65520] [--fixed 500M] [--reps 3] [--duration 4] [--rates 200M,400M,...]
[--budget 1800] [--markdown OUT] [--json OUT]``

Theory of operation. The topology is ``bench/compare.py``'s (:class:`compare.Harness`): a fresh
guest namespace served by the backend, iperf3 servers on the sandbox's loopback, the guest's
client dialling the gateway 10.0.2.2. ``pasta-new`` is the same pasta cell with
``/opt/passt-new/pasta`` (``peers/build-passt.sh``) first on PATH.

Per backend and MTU, both directions (``g→h``: the guest sends; ``h→g``: ``iperf3 -R``, the
sandbox sends), 1400-byte datagrams (no fragments at MTU 1500):

- *fixed*: ``--reps`` runs at ``--fixed`` offered rate; loss as the receiver counted it, median;
- *ceiling*: offered rates from ``--rates`` in order, one run each, until the loss reaches 1 %
  twice in a row; the highest rate whose run lost less than 1 % is the cell's ceiling, with the
  receiver's measured Gbit/s at that rate.

``guestnet-base`` is guestnet from another checkout's ``src`` (``--base-src``, put on PYTHONPATH):
an A/B of two versions in one run. For every user-mode backend, CPU µs per datagram of the backend
process over the fixed-rate runs of each direction (utime+stime from ``/proc/PID/stat``), per
datagram it carried (guestnet: its ``nat.udp.to_host``/``to_guest`` counters; the peers: the
datagrams iperf3 sent): the measure least disturbed by other load on the machine.

Also, for guestnet, the backend's CPU seconds over the cell (``/proc/PID/stat``) and its
``nat.udp``/``link`` counters from the stats API, to tell where datagrams went missing.

Bounds: every run is an iperf3 with ``-t`` and a subprocess timeout; the whole run has
``--budget`` seconds; every namespace and process is removed at the end of its cell and on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare

PASTA_NEW_DIR = "/opt/passt-new"
DEFAULT_RATES = "200M,400M,600M,800M,1G,1.2G,1.5G,2G,2.5G,3G,4G,5G,6G,8G"
UDP_LEN = 1400
LOSS_LIMIT = 1.0
DIRECTIONS = (("g→h", []), ("h→g", ["-R"]))


def _rate_bits(text: str) -> float:
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}
    if text[-1].upper() in mult:
        return float(text[:-1]) * mult[text[-1].upper()]
    return float(text)


def udp_run(h: compare.Harness, topo: compare.Topology, rate: str, extra: list[str],
            duration: float) -> tuple[float, float, int]:  # fmt: skip
    """One iperf3 UDP run: (received Gbit/s, loss %, datagrams sent) as the receiver saw them."""
    window = ["-w", h.args.window] if h.args.window else []
    data = h.iperf(topo, ["-u", "-b", rate, "-l", str(UDP_LEN), *window, *extra], duration)
    end = data["end"]
    rx = end.get("sum_received") or end["sum"]
    packets = int(end["sum"].get("packets", 0))
    return float(rx["bits_per_second"]) / 1e9, float(rx["lost_percent"]), packets


def api_stats(api_socket: str | None) -> dict[str, Any] | None:
    if api_socket is None:
        return None
    from guestnet.client import ApiError, request

    try:
        status, stats = request(api_socket, "GET", "/stats", timeout=5)
    except ApiError:
        return None
    return stats if status == 200 else None


def handled(api_socket: str | None, label: str) -> int | None:
    """Datagrams guestnet has carried so far in direction ``label`` (its NAT counters)."""
    stats = api_stats(api_socket)
    if stats is None:
        return None
    drops = stats.get("drops", {})
    return int(drops.get("nat.udp.to_host" if label == "g→h" else "nat.udp.to_guest", 0))


def interesting(counters: dict[str, Any]) -> dict[str, int]:
    """The counters that say where a datagram went: NAT UDP, links, pools."""
    out = {}
    for key, value in counters.items():
        if key.startswith(("nat.udp", "link.", "udp.", "ipv4.fragment")) and isinstance(value, int):
            out[key] = value
    return out


def measure(h: compare.Harness, backend: str, mtu: int, args: argparse.Namespace) -> dict[str, Any]:
    """One backend at one MTU: fixed-rate loss and the ceiling, both ways."""
    cell: dict[str, Any] = {"backend": backend, "mtu": mtu, "errors": {}}
    real = {"pasta-new": "pasta", "guestnet-base": "guestnet"}.get(backend, backend)
    old_path = os.environ.get("PATH", "")
    old_pythonpath = os.environ.get("PYTHONPATH")
    if backend == "pasta-new":
        os.environ["PATH"] = f"{PASTA_NEW_DIR}:{old_path}"
    if backend == "guestnet-base":
        if not args.base_src:
            cell["errors"]["cell"] = "guestnet-base needs --base-src"
            return cell
        os.environ["PYTHONPATH"] = args.base_src
    procs_before, ns_before = len(h.box.procs), len(h.box.namespaces)
    try:
        topo = h.setup(real, mtu)
        pid = topo.backend.pid if topo.backend is not None else None
        cpu0 = compare.cpu_seconds(pid) if pid else None
        for label, extra in DIRECTIONS:
            losses = []
            datagrams = 0
            c0 = compare.cpu_seconds(pid) if pid else None
            handled0 = handled(topo.api_socket, label)
            for _ in range(args.reps):
                try:
                    _gbps, loss, n = udp_run(h, topo, args.fixed, extra, args.duration)
                    losses.append(loss)
                    datagrams += n
                except (compare.CellError, KeyError, TypeError) as exc:
                    cell["errors"][f"fixed {label}"] = str(exc)
                    break
            c1 = compare.cpu_seconds(pid) if pid else None
            handled1 = handled(topo.api_socket, label)
            if handled0 is not None and handled1 is not None:
                # guestnet: per datagram it carried (its own counter), not per datagram sent.
                datagrams = handled1 - handled0
                cell[f"carried {label}"] = datagrams
            if c0 is not None and c1 is not None and datagrams:
                cell[f"cpu us/datagram {label}"] = round((c1 - c0) / datagrams * 1e6, 2)
            if losses:
                cell[f"fixed {label}"] = statistics.median(losses)
                cell[f"fixed {label} samples"] = losses
            best, best_gbps, fails, steps = None, None, 0, []
            for rate in args.rates:
                try:
                    gbps, loss, _n = udp_run(h, topo, rate, extra, args.duration)
                except (compare.CellError, KeyError, TypeError) as exc:
                    cell["errors"][f"ceiling {label}"] = str(exc)
                    break
                steps.append((rate, round(gbps, 3), round(loss, 2)))
                if loss < LOSS_LIMIT:
                    best, best_gbps, fails = rate, gbps, 0
                else:
                    fails += 1
                    if fails >= 2:
                        break
            cell[f"ceiling {label}"] = best
            cell[f"ceiling {label} Gbit/s"] = best_gbps
            cell[f"steps {label}"] = steps
        cpu1 = compare.cpu_seconds(pid) if pid else None
        if cpu0 is not None and cpu1 is not None:
            cell["cpu_s"] = round(cpu1 - cpu0, 2)
        stats = api_stats(topo.api_socket)
        if stats is not None:
            cell["counters"] = interesting(stats.get("drops", {}))
            cell["pool"] = stats.get("pool")
    except (compare.CellError, OSError) as exc:
        cell["errors"]["cell"] = str(exc)
    finally:
        h.teardown(procs_before, ns_before)
        os.environ["PATH"] = old_path
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
    return cell


def render(cells: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"### UDP loss and ceiling ({now})",
        "",
        f"Command: `{command}`",
        "",
        f"{UDP_LEN}-byte datagrams; fixed rate {args.fixed}bit/s, median of {args.reps} runs of "
        f"{args.duration:g} s (receiver-side loss %); ceiling: highest offered rate of "
        f"{','.join(args.rates)} with < {LOSS_LIMIT:g} % loss ({args.duration:g} s each), and "
        f"the Gbit/s received there. iperf3 socket buffers (-w): {args.window or 'default'}.",
        "",
        "| backend | MTU | loss g→h % | loss h→g % | ceiling g→h | ceiling h→g "
        "| CPU µs/datagram g→h | h→g |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:

        def fmt_loss(key: str, c: dict[str, Any] = c) -> str:
            return f"{c[key]:.2f}" if key in c else "—"

        def fmt_ceil(label: str, c: dict[str, Any] = c) -> str:
            rate = c.get(f"ceiling {label}")
            gbps = c.get(f"ceiling {label} Gbit/s")
            return "—" if rate is None else f"{rate} ({gbps:.2f} Gbit/s)"

        lines.append(
            f"| {c['backend']} | {c['mtu']} | {fmt_loss('fixed g→h')} | {fmt_loss('fixed h→g')} "
            f"| {fmt_ceil('g→h')} | {fmt_ceil('h→g')} "
            f"| {c.get('cpu us/datagram g→h', '—')} | {c.get('cpu us/datagram h→g', '—')} |"
        )
    errors = [
        f"- {c['backend']} {c['mtu']}: {k}: {v}" for c in cells for k, v in c["errors"].items()
    ]
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="guestnet,pasta,pasta-new,slirp4netns")
    p.add_argument("--mtus", default="1500,65520")
    p.add_argument("--fixed", default="500M")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--rates", default=DEFAULT_RATES)
    p.add_argument("--no-ceiling", action="store_true", help="fixed-rate runs only")
    p.add_argument(
        "--window",
        help="iperf3 -w (socket buffers of both ends, e.g. 4M): the receiving application's "
        "buffer then no longer caps the rate (default: iperf3's, 208 KiB here)",
    )
    p.add_argument("--budget", type=float, default=1800.0)
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--json", metavar="FILE")
    p.add_argument(
        "--base-src",
        metavar="DIR",
        help="the src/ of another guestnet checkout, run as backend guestnet-base (A/B)",
    )
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.mtus = [int(m) for m in args.mtus.split(",") if m]
    args.rates = [] if args.no_ceiling else [r for r in args.rates.split(",") if r]
    args.rates.sort(key=_rate_bits)
    if not (1 <= args.reps <= 20 and 0.5 <= args.duration <= 60):
        p.error("--reps 1..20, --duration 0.5..60")
    return args


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_udp.py needs root (network namespaces)", file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "bench/bench_udp.py", *(argv or sys.argv[1:])])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    qos_fd = compare.hold_pm_qos()
    h = compare.Harness(args, log)
    cells: list[dict[str, Any]] = []
    try:
        for mtu in args.mtus:
            for backend in args.backends:
                log(f"[{h.time_left():5.0f} s left] {backend} MTU {mtu} ...")
                cell = measure(h, backend, mtu, args)
                log(json.dumps(cell))
                cells.append(cell)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
    finally:
        h.box.cleanup()
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(h.tmp, ignore_errors=True)
        if qos_fd is not None:
            os.close(qos_fd)
    text = render(cells, command, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
