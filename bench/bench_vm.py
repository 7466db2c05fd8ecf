"""Bulk TCP through a QEMU guest (TCG) over four backends: guestnet and passt, each over
``-netdev stream`` and over vhost-user (issue 14).

Run (root): ``.venv/bin/python bench/bench_vm.py [--backends guestnet-stream,guestnet-vhost,
passt-stream,passt-vhost] [--reps 3] [--rounds 1] [--mib 128] [--json OUT]``

Theory of operation. Each backend gets a boot of the test VM (tests/integration/vm: the Debian
kernel, busybox, the virtio-net modules; 1 vCPU under TCG, 256 MiB, MTU 65520 from the
backend's DHCP) in a sandbox network namespace the bench creates and deletes: the backend runs
there, and so does the bulk server, on the sandbox's 127.0.0.1, which the guest reaches as its
gateway 10.0.2.2 (every backend here maps the gateway to the host's loopback). passt wants an
interface with a default route, so its sandbox also gets a veth to a second namespace holding
nothing else (compare.py's dead end); nothing is addressed to it.

The guest has no iperf3: the transfers are busybox ``nc``, the same for every backend.
Guest to host: ``nc 10.0.2.2 5201 </dev/zero``; the server times from the first byte until it
has ``--mib`` MiB, then closes. Host to guest: ``nc 10.0.2.2 5202 <FIFO >/dev/null`` (the FIFO
is held open, so nc never half-closes); the server sends ``--mib`` MiB, shuts down its side and
times from the accept until the guest's close (nc ends at EOF). Each boot runs ``--reps``
pairs (up, down); ``--rounds`` > 1 boots every backend again, in reverse order every other
round. Reported per backend and direction: the median Gbit/s (min-max), and CPU seconds per GB
moved of the backend process and of QEMU (utime + stime from /proc, read by the server at the
start and end of each transfer). Backend CPU per GB is the figure that carries over to a KVM
guest, where TCG no longer caps the rate: ``8 / (s/GB)`` is the Gbit/s the backend could carry
on one core (printed as "backend ceiling"), at the frame sizes and wake-up pattern of a TCG
guest. For guestnet (``--api-socket``, read by the server around each transfer, outside the CPU
window) also the mean data frame size and the backend's CPU per frame, both directions' frames
counted.

Backends: ``guestnet-stream`` (``guestnet qemu --socket S``, QEMU ``-netdev stream``),
``guestnet-vhost`` (``guestnet vhost-user --socket S``, QEMU ``-netdev vhost-user`` with a
shared memfd), ``passt-stream`` and ``passt-vhost`` (``/opt/passt-new/passt -f [--vhost-user]
-s S -a 10.0.2.15 -n 24 -g 10.0.2.2 -4``; built by /work/shared/peers/build-passt.sh, skipped
when absent). Bounds: every wait has a deadline, the guest script is under ``timeout``, and
every process and namespace is removed in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from vm.initramfs import VmImage, base_initramfs, find_busybox, find_kernel  # noqa: E402
from vm.qemu import (  # noqa: E402
    background_process,
    in_netns,
    sandbox_netns,
    start_vm,
    stream_netdev,
    vhost_user_netdev,
)

PASST = "/opt/passt-new/passt"
UP_PORT = 5201
DOWN_PORT = 5202
BACKENDS = ("guestnet-stream", "guestnet-vhost", "passt-stream", "passt-vhost")
START_TIMEOUT_S = 30.0
BOOT_TIMEOUT_S = 90.0
#: Per transfer, in the guest's script (a stuck transfer ends there, and shows as missing).
TRANSFER_TIMEOUT_S = 120
CHUNK = bytes(1 << 20)

GUEST_SCRIPT = """
section dhcp udhcpc -i eth0 -n -q -t 3 -T 1
section mtu cat /sys/class/net/eth0/mtu
mkfifo /tmp/hold
exec 4<>/tmp/hold
echo "@@BENCH-START@@"
for i in $(seq 1 {reps}); do
    timeout {timeout} nc 10.0.2.2 {up} </dev/zero >/dev/null 2>&1
    timeout {timeout} nc 10.0.2.2 {down} </tmp/hold >/dev/null 2>&1
done
echo "@@BENCH-END@@"
"""


# -- the bulk server (runs in the sandbox: bench_vm.py --serve ...) ------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), seconds; 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_pids(path: str) -> list[int]:
    """The backend's and QEMU's pids, as the bench wrote them once QEMU started."""
    try:
        return [int(p) for p in Path(path).read_text().split()]
    except (OSError, ValueError):
        return []


def cpus(pids: list[int]) -> list[float]:
    return [cpu_seconds(p) for p in pids]


def link_frames(api: str) -> tuple[int, int]:
    """guestnet's frames from and to the guest over all its links (its control API), or (0, 0)
    without one."""
    if not api:
        return 0, 0
    from guestnet.client import ApiError, request

    try:
        _status, stats = request(api, "GET", "/stats")
    except ApiError:
        return 0, 0
    links = stats.get("links", []) if isinstance(stats, dict) else []
    return sum(x["frames_in"] for x in links), sum(x["frames_out"] for x in links)


def serve(out: str, pids_file: str, nbytes: int, api: str) -> None:
    """Serve transfers until killed; append one JSON line per transfer to ``out``."""
    up = socket.create_server(("127.0.0.1", UP_PORT))
    down = socket.create_server(("127.0.0.1", DOWN_PORT))
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(up, selectors.EVENT_READ, "up")
    sel.register(down, selectors.EVENT_READ, "down")
    with open(out, "a") as log:
        while True:
            for key, _ in sel.select():
                server = key.fileobj
                assert isinstance(server, socket.socket)
                conn, _addr = server.accept()
                with conn:
                    record = (sink if key.data == "up" else source)(conn, nbytes, pids_file, api)
                log.write(json.dumps(record) + "\n")
                log.flush()


def sink(conn: socket.socket, nbytes: int, pids_file: str, api: str) -> dict[str, Any]:
    """Guest to host: from the first byte to ``nbytes`` received."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = conn.recv_into(view)
    t0 = time.monotonic()
    pids = read_pids(pids_file)
    f0 = link_frames(api)  # the API's own work stays outside the CPU window
    c0 = cpus(pids)
    while 0 < got < nbytes:
        n = conn.recv_into(view)
        if not n:
            break
        got += n
    t1, c1 = time.monotonic(), cpus(pids)
    return _record("up", got, t1 - t0, c0, c1, f0, link_frames(api))


def source(conn: socket.socket, nbytes: int, pids_file: str, api: str) -> dict[str, Any]:
    """Host to guest: from the accept until the guest closes after ``nbytes`` and our FIN."""
    pids = read_pids(pids_file)
    f0 = link_frames(api)
    t0, c0 = time.monotonic(), cpus(pids)
    sent = 0
    try:
        while sent < nbytes:
            sent += conn.send(memoryview(CHUNK)[: min(len(CHUNK), nbytes - sent)])
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    except OSError:
        pass
    t1, c1 = time.monotonic(), cpus(pids)
    return _record("down", sent, t1 - t0, c0, c1, f0, link_frames(api))


def _record(
    direction: str,
    nbytes: int,
    seconds: float,
    c0: list[float],
    c1: list[float],
    f0: tuple[int, int],
    f1: tuple[int, int],
) -> dict[str, Any]:
    cpu = [b - a for a, b in zip(c0, c1, strict=True)] if len(c0) == 2 else [0.0, 0.0]
    return {"dir": direction, "bytes": nbytes, "seconds": seconds, "backend_cpu": cpu[0],
            "qemu_cpu": cpu[1], "frames_from_guest": f1[0] - f0[0],
            "frames_to_guest": f1[1] - f0[1]}  # fmt: skip


# -- the bench -------------------------------------------------------------------------------------


_dead_end_counter = itertools.count()


@contextlib.contextmanager
def dead_end(sandbox: str) -> Iterator[None]:
    """A veth from the sandbox to a namespace holding nothing else, with the default route: passt
    wants an interface with a route out; nothing is ever addressed to it."""
    dead = f"gnde{os.getpid()}_{next(_dead_end_counter)}"
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        a, b = f"gnvp{os.getpid() % 100000}", f"gnvq{os.getpid() % 100000}"
        subprocess.run(["ip", "link", "add", a, "netns", sandbox, "type", "veth", "peer", b,
                        "netns", dead], check=True)  # fmt: skip
        for ns, dev, addr in ((sandbox, a, "198.18.0.1/24"), (dead, b, "198.18.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "-n", sandbox, "route", "add", "default", "via", "198.18.0.2"],
                       check=True)  # fmt: skip
        yield
    finally:
        subprocess.run(["ip", "netns", "del", dead], check=False)


def backend_argv(backend: str, sock: Path, api: Path) -> list[str]:
    if backend.startswith("guestnet"):
        mode = "qemu" if backend == "guestnet-stream" else "vhost-user"
        return [sys.executable, "-m", "guestnet", mode, "--socket", str(sock),
                "--api-socket", str(api)]  # fmt: skip
    vhost = ["--vhost-user"] if backend == "passt-vhost" else []
    return [PASST, "-f", *vhost, "-s", str(sock), "-a", "10.0.2.15", "-n", "24",
            "-g", "10.0.2.2", "-4", "-t", "none", "-u", "none"]  # fmt: skip


def netdev(backend: str, sock: Path) -> list[str]:
    return vhost_user_netdev(sock) if backend.endswith("-vhost") else stream_netdev(sock)


def wait_for_socket(sock: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no {sock} after {START_TIMEOUT_S} s")
        time.sleep(0.05)


def wait_listening(netns: str, ports: tuple[int, ...]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        out = subprocess.run(in_netns(netns, ["ss", "-Hltn"]), capture_output=True, text=True,
                             timeout=10).stdout  # fmt: skip
        if all(f":{p} " in out for p in ports):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"bulk server not listening on {ports}")
        time.sleep(0.05)


def run_backend(
    backend: str, image: VmImage, work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One boot: the guest runs ``reps`` up/down pairs; the server's records come back."""
    work.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="gnbv-", dir="/tmp"))
    sock = sock_dir / "be.sock"
    api = sock_dir / "api.sock" if backend.startswith("guestnet") else None
    records = work / "records.jsonl"
    pids_file = work / "pids"
    script = GUEST_SCRIPT.format(reps=args.reps, timeout=TRANSFER_TIMEOUT_S, up=UP_PORT,
                                 down=DOWN_PORT)  # fmt: skip
    initrd = image.initrd_with_script(script, work / "initrd.img")
    server = [sys.executable, str(Path(__file__).resolve()), "--serve", str(records),
              str(pids_file), str(args.mib << 20), str(api or "")]  # fmt: skip
    try:
        with contextlib.ExitStack() as stack:
            netns = stack.enter_context(sandbox_netns("gnbv"))
            if backend.startswith("passt"):
                stack.enter_context(dead_end(netns))
            stack.enter_context(background_process(server, work / "server.log", netns=netns))
            wait_listening(netns, (UP_PORT, DOWN_PORT))
            be = stack.enter_context(
                background_process(
                    backend_argv(backend, sock, sock_dir / "api.sock"),
                    work / "backend.log",
                    netns=netns,
                )
            )
            wait_for_socket(sock, be.proc, backend)
            vm = stack.enter_context(
                start_vm(image.kernel, initrd, netdev(backend, sock), work, netns=netns)
            )
            pids_file.write_text(f"{be.proc.pid} {vm.proc.pid}\n")
            vm.wait_for(r"^@@BENCH-END@@$", timeout_s=BOOT_TIMEOUT_S + args.reps * 2 * 60)
            console = vm.console()
            mtu = re.search(r"^@@GUESTNET-BEGIN mtu@@\n(\d+)$", console, re.M)
            if mtu is None:
                print(f"  {backend}: guest console:\n{console}", file=sys.stderr)
            else:
                print(f"  {backend}: guest MTU {mtu[1]}", file=sys.stderr)
    finally:
        with contextlib.suppress(OSError):
            for p in sock_dir.iterdir():
                p.unlink()
            sock_dir.rmdir()
    if not records.exists():
        return []
    return [json.loads(line) for line in records.read_text().splitlines()]


def summarize(recs: list[dict[str, Any]], direction: str, want: int) -> dict[str, Any] | None:
    done = [r for r in recs if r["dir"] == direction and r["bytes"] >= want and r["seconds"] > 0]
    if not done:
        return None
    gbps = [r["bytes"] * 8 / r["seconds"] / 1e9 for r in done]
    gb = [r["bytes"] / 1e9 for r in done]
    be = [r["backend_cpu"] / g for r, g in zip(done, gb, strict=True)]
    qemu = [r["qemu_cpu"] / g for r, g in zip(done, gb, strict=True)]
    out = {
        "n": len(done),
        "gbps": statistics.median(gbps),
        "gbps_min": min(gbps),
        "gbps_max": max(gbps),
        "backend_s_per_gb": statistics.median(be),
        "qemu_s_per_gb": statistics.median(qemu),
    }
    # guestnet only (its API counts frames): the data frames' mean size and CPU per frame.
    data_key = "frames_from_guest" if direction == "up" else "frames_to_guest"
    counted = [r for r in done if r.get(data_key, 0) > 0]
    if counted:
        out["kib_per_data_frame"] = statistics.median(
            r["bytes"] / r[data_key] / 1024 for r in counted
        )
        out["us_per_frame"] = statistics.median(
            r["backend_cpu"] * 1e6 / (r["frames_from_guest"] + r["frames_to_guest"])
            for r in counted
        )
    return out


def render(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| backend | dir | Gbit/s median (min-max) | n | backend CPU s/GB | backend ceiling "
        "Gbit/s | QEMU CPU s/GB | KiB/data frame | backend µs/frame |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, per_dir in results.items():
        for direction, label in (("up", "guest→host"), ("down", "host→guest")):
            s = per_dir.get(direction)
            if s is None:
                lines.append(f"| {backend} | {label} | (no complete transfer) | 0 | | | | | |")
                continue
            be = s["backend_s_per_gb"]
            ceiling = f"{8 / be:.1f}" if be > 0 else "—"
            lines.append(
                f"| {backend} | {label} | {s['gbps']:.2f} ({s['gbps_min']:.2f}-"
                f"{s['gbps_max']:.2f}) | {s['n']} | {be:.2f} | {ceiling} | "
                f"{s['qemu_s_per_gb']:.2f} | {_opt(s, 'kib_per_data_frame')} | "
                f"{_opt(s, 'us_per_frame')} |"
            )
    return "\n".join(lines)


def _opt(s: dict[str, Any], key: str) -> str:
    return f"{s[key]:.1f}" if key in s else "—"


def ratios(results: dict[str, dict[str, Any]]) -> str:
    out = []
    for name in ("guestnet", "passt"):
        for direction in ("up", "down"):
            a = results.get(f"{name}-vhost", {}).get(direction)
            b = results.get(f"{name}-stream", {}).get(direction)
            if a and b:
                out.append(f"{name} {direction}: vhost-user / stream = {a['gbps'] / b['gbps']:.2f}")
    for direction in ("up", "down"):
        a = results.get("guestnet-vhost", {}).get(direction)
        b = results.get("passt-vhost", {}).get(direction)
        if a and b:
            out.append(f"vhost-user {direction}: guestnet / passt = {a['gbps'] / b['gbps']:.2f}")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_vm.py needs root (network namespaces)")
    kernel, busybox = find_kernel(), find_busybox()
    if kernel is None or busybox is None:
        sys.exit("needs a /boot/vmlinuz with /lib/modules and a static /bin/busybox")
    image = VmImage(kernel, base_initramfs(kernel, busybox))
    backends = [b for b in args.backends.split(",") if b]
    if not os.access(PASST, os.X_OK):
        print(f"{PASST} not built: passt rows skipped", file=sys.stderr)
        backends = [b for b in backends if not b.startswith("passt")]
    load0 = os.getloadavg()
    records: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="bench_vm-") as tmp:
        for rnd in range(args.rounds):
            order = backends if rnd % 2 == 0 else backends[::-1]
            for backend in order:
                t0 = time.monotonic()
                try:
                    recs = run_backend(backend, image, Path(tmp) / f"{backend}-{rnd}", args)
                except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
                    print(f"{backend}: {exc}", file=sys.stderr)
                    recs = []
                records[backend] += recs
                print(f"round {rnd + 1} {backend}: {len(recs)} transfers in "
                      f"{time.monotonic() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    want = args.mib << 20
    results = {b: {d: summarize(r, d, want) for d in ("up", "down")} for b, r in records.items()}
    load1 = os.getloadavg()
    print(f"bench_vm.py: {args.mib} MiB per transfer, {args.reps} reps x {args.rounds} rounds; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}")  # fmt: skip
    print(render(results))
    print(ratios(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, "results": results}, indent=1))


if __name__ == "__main__":
    main()
