"""guestnet side by side with pasta (Debian's 2023 build and 2026-07 from source), slirp4netns
and a plain veth pair: every cell of issue 12's targets in one command, one table.

Run (root): ``.venv/bin/python bench/compare.py [--quick]
[--peers guestnet,pasta,pasta2026,slirp4netns,veth] [--mtus 1500,65520] [--families 4]
[--reps 3] [--duration 8] [--budget 1800] [--udp-window 4M|default] [--markdown OUT]
[--json OUT]``
(``--backends`` is the same option as ``--peers``.)

Theory of operation. For every MTU, backend and address family (a *cell*) the harness builds a
fresh topology of its own namespaces, measures, and tears it all down before the next cell. A
backend's IPv4 and IPv6 cells run one after the other, so their ratio is taken on the same machine
state. What follows describes IPv4; an IPv6 cell (``--families``, class ``Family``) is the same
cell with the family's addresses: the gateway fd00::2 and the sandbox's ``::1``:

- a *guest* namespace (only ``lo`` at first): the kernel stack the backend serves; the clients
  of the guest→host cells (iperf3 -c, bench/netbench.py rr/connrate/dns) run here and talk to
  the gateway 10.0.2.2 (DNS: the backend's DNS address); an echo server listens here on
  :data:`FWD_GUEST_PORT` for the published-port cell;
- a *sandbox* namespace where the backend runs and the "host" servers listen (iperf3 -s, the
  netbench echo server on 127.0.0.1, and a dnsmasq on 127.0.0.1:53 that answers ``*.bench.test``
  itself: the upstream resolver of every backend's DNS forwarder). Each user-mode backend maps
  the gateway to its own host loopback, so the guest's traffic to 10.0.2.2 ends on the sandbox's
  127.0.0.1 and never leaves the harness's namespaces. The sandbox's ``/etc/resolv.conf`` is
  ``nameserver 127.0.0.1`` (``/etc/netns/SANDBOX/resolv.conf``, which ``ip netns exec``
  bind-mounts), so the peers that read it forward there too;
- guestnet: ``python -m guestnet netns GUEST --configure --mtu N --dns-upstream 127.0.0.1
  -p 127.0.0.1:5401:5402`` in a loopback-only sandbox; DNS at 10.0.2.3; its built-in name
  ``host.guestnet.internal`` is the built-in DNS cell;
- pasta (Debian's 2023-03 ``pasta``) and pasta2026 (``/opt/passt-new/pasta``, built from the
  upstream v2026_07_16 source by ``../shared/peers/build-passt.sh``; skipped with "not built"
  when missing): both refuse a loopback-only namespace ("External interface not usable"), so the
  sandbox gets a veth to a dead-end namespace (198.18.0.1/24 <-> 198.18.0.2/24, default route to
  it, nothing else there); ``pasta --runas 0 --netns GUEST --config-net -a 10.0.2.15 -g 10.0.2.2
  --dns-forward 10.0.2.3 -t 5401:5402 -u none -T none -U none -f -q ...``. The two builds take
  the same options here; 2026 also gets ``--dns-host 127.0.0.1`` (2023 has no such option and
  forwards to the first nameserver of resolv.conf, the same address). The gateway maps to the
  host's loopback in both (2026: ``--map-host-loopback`` defaults to the gateway);
- slirp4netns: ``slirp4netns --configure --mtu N --api-socket S --netns-type=path GUEST tap0``
  (guest 10.0.2.100, DNS 10.0.2.3, forwarding to resolv.conf); the published port is added with
  the API's ``add_hostfwd`` (127.0.0.1:5401 -> guest 5402; IPv4 only);
- veth: the kernel's own path and the ceiling: a veth pair sandbox 10.0.2.2/24 <-> guest
  10.0.2.15/24; the servers bind 10.0.2.2 (dnsmasq too); the "published port" is the guest's port
  dialled directly.

Over IPv6: guestnet's ``--configure`` sets fd00::15/64 and the default route via fd00::2, which
stands for the sandbox's ``::1``. pasta gets ``-6 -a fd00::15 -g fd00::2`` (its gateway is mapped
to the host's loopback unless ``--no-map-gw``) and its dead-end veth also carries fd99::1/64 with
an IPv6 default route (pasta disables IPv6 without an IPv6 route out). slirp4netns gets
``--enable-ipv6``: the guest does SLAAC on its RA for fd00::/64 and reaches the host's loopback at
fd00::2, as with guestnet. veth: sandbox fd00::2/64 <-> guest fd00::15/64. The servers bind
``::1`` (veth: fd00::2). DNS is measured in IPv4 cells only.

Measured per cell (medians over ``--reps``; the issue-12 cells):

- TCP bulk: iperf3 guest->host and host->guest (``-R``) for ``--duration`` s;
- TCP connect median (ms, ``connect()`` call to its return) and connections per second
  (connect + 1 byte + echo + close, one thread): bench/netbench.py connrate from the guest;
- forwarded connections per second: the same client run in the sandbox against the published
  port 127.0.0.1:5401, which the backend forwards to the guest's echo server on 5402. pasta
  splices such loopback connections (no TAP on its path), which is its fast path and what
  podman's ``-p`` uses;
- 1-byte round trip (median, p99) on one connection: netbench rr;
- UDP at a fixed offered 500 Mbit/s (1400-byte datagrams, so no fragments at MTU 1500), both
  ways (host->guest with ``-R``), receiver-side loss (iperf3's ``sum_received``); the iperf3
  ends get 4 MiB socket buffers (``--udp-window``, :data:`UDP_WINDOW`), so what is lost is lost
  in the backend, not in an endpoint waiting for a CPU;
- UDP's highest rate with < 1 % loss, both ways: iperf3 ``-u -l 1400`` probes of
  ``--udp-probe`` s at offered rates from 100 Mbit/s to 20 Gbit/s, a geometric bisection of
  ``--udp-steps`` steps after probing both ends. The cell is the *received* Gbit/s of the best
  probe under 1 % loss (if 20 Gbit/s offered passes, the iperf3 sender was the limit, and the
  cell says so in the JSON's ``notes``). No probe under 1 %: the cell is an error saying so;
- DNS A query median (ms): netbench dns, one query at a time from the guest to the backend's DNS
  address; forwarded (``q.bench.test``, answered by the sandbox's dnsmasq) and built-in (a name
  the backend answers itself: guestnet's ``host.guestnet.internal``; "—" for peers without such
  names);
- for the user-mode backends their CPU seconds per GB moved by the TCP runs (utime+stime of the
  backend process from /proc/PID/stat, before and after) and peak RSS (VmHWM) after all of it.

A measurement that fails puts ``error: ...`` in its cell and the harness goes on. The markdown
report has the cells (one table per family and MTU), the ratio table against the *best peer*
per metric (pasta, pasta2026, slirp4netns: which one, its value, guestnet / best) with issue 12's
targets read off it (pass/fail), guestnet against each peer, and IPv6/IPv4 per backend.

Idle states: on this VM (cpuidle driver ``haltpoll``) a vCPU that halts takes tens of
microseconds to wake, and whether it halts depends on what else runs on the machine: 1-byte
round trips then swing by 10x between cells of one run. The harness therefore holds
``/dev/cpu_dma_latency`` at 0 for the whole run (PM QoS: idle vCPUs poll instead of halting, the
tuned "latency-performance" practice); the kernel drops the request when the file is closed,
at the latest when the harness exits. ``--no-pm-qos`` measures without it.

Bounds: every subprocess has a timeout, every wait a deadline, and the whole run a time budget
(``--budget``, 30 min per family by default; cells past it are skipped with an error). The
default run (five backends, two MTUs, IPv4: ten cells of 80-120 s) takes 16-20 minutes.
Every namespace, ``/etc/netns`` directory and process is removed at the end of its cell and
again in a ``finally`` on exit, Ctrl-C or SIGTERM. The load average at start and end is in the
report: a busy machine shows in the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
NETBENCH = HERE / "netbench.py"
NETNS_DIR = "/run/netns"
GATEWAY = "10.0.2.2"
IPERF_PORT = 5201
ECHO_PORT = 5301
#: The published port: the sandbox's 127.0.0.1:FWD_HOST_PORT goes to the guest's FWD_GUEST_PORT.
FWD_HOST_PORT = 5401
FWD_GUEST_PORT = 5402
UDP_RATE = "500M"
UDP_LEN = 1400
#: The UDP rate search: offered rates between these (bit/s), and the loss that fails a probe.
UDP_MIN_BPS = 100e6
UDP_MAX_BPS = 20e9
UDP_MAX_LOSS = 1.0
#: iperf3 -w for UDP: the endpoints' socket buffers. With iperf3's default (rmem_default, about
#: 90 datagrams) a receiver that waits a few milliseconds for a CPU drops datagrams itself: on a
#: busy 2-CPU machine a veth pair lost 33-49 % at 500 Mbit/s, with 4 MiB none (BENCHMARKS.md).
#: The loss measured is then the backend's. Linux caps it at net.core.rmem_max/wmem_max.
UDP_WINDOW = "4M"
#: DNS: the names dnsmasq answers in the sandbox (forwarded) and guestnet answers itself.
DNS_FORWARD_NAME = "q.bench.test"
DNS_ANSWER = "192.0.2.7"
GUESTNET_BUILTIN_NAME = "host.guestnet.internal"
BACKENDS = ("guestnet", "pasta", "pasta2026", "slirp4netns", "veth")
#: The C peers issue 12 compares guestnet against (veth is the kernel's ceiling, not a peer).
PEERS = ("pasta", "pasta2026", "slirp4netns")
USER_MODE = ("guestnet", *PEERS)
#: pasta 2026-07 built from source by ../shared/peers/build-passt.sh (not packaged in Debian).
PASTA2026 = os.environ.get("GUESTNET_BENCH_PASTA2026", "/opt/passt-new/pasta")
#: Binary each backend needs, and the Debian package that brings it.
BINARIES = {"pasta": ("pasta", "passt"), "slirp4netns": ("slirp4netns", "slirp4netns")}
READY_TIMEOUT_S = 15.0
PROBE_TIMEOUT_S = 8.0
#: A bound, not the expected time: the default IPv4 run takes 16-20 minutes.
BUDGET_PER_FAMILY_S = 30 * 60


@dataclass(frozen=True)
class Family:
    """The addresses one IP version gives a cell: the rest of the harness is family-neutral."""

    version: int
    gateway: str  # what the guest's clients dial: the backend's stand-in for the host
    loopback: str  # where the host-side servers listen in the sandbox (user-mode backends)
    guest: str  # the guest address guestnet, pasta and veth configure
    prefix_len: int
    #: slirp4netns's guest: its --configure address for IPv4; over IPv6 whatever SLAAC makes of
    #: fd00::/64, so only the prefix is known.
    slirp_guest: str

    @property
    def ip(self) -> str:
        """``ip``'s family switch: -4 or -6."""
        return f"-{self.version}"


FAMILIES = {
    4: Family(4, GATEWAY, "127.0.0.1", "10.0.2.15", 24, "10.0.2.100"),
    6: Family(6, "fd00::2", "::1", "fd00::15", 64, "fd00::"),
}


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool
    fmt: str


METRICS = (
    Metric("tcp_up", "TCP g→h Gbit/s", True, "{:.2f}"),
    Metric("tcp_down", "TCP h→g Gbit/s", True, "{:.2f}"),
    Metric("connect_ms", "connect ms", False, "{:.3f}"),
    Metric("conn_per_s", "conn/s", True, "{:.0f}"),
    Metric("fwd_conn_per_s", "fwd conn/s", True, "{:.0f}"),
    Metric("rr_median", "RR median ms", False, "{:.3f}"),
    Metric("rr_p99", "RR p99 ms", False, "{:.3f}"),
    Metric("udp_gbps", "UDP 500M g→h Gbit/s", True, "{:.3f}"),
    Metric("udp_loss", "UDP 500M g→h loss %", False, "{:.2f}"),
    Metric("udp_loss_down", "UDP 500M h→g loss %", False, "{:.2f}"),
    Metric("udp_max_up", "UDP <1% g→h Gbit/s", True, "{:.3f}"),
    Metric("udp_max_down", "UDP <1% h→g Gbit/s", True, "{:.3f}"),
    Metric("dns_builtin_ms", "DNS built-in ms", False, "{:.3f}"),
    Metric("dns_forward_ms", "DNS fwd ms", False, "{:.3f}"),
    Metric("cpu_s_per_gb", "CPU s/GB", False, "{:.2f}"),
    Metric("rss_mb", "peak RSS MB", False, "{:.1f}"),
    Metric("pool_misses", "pool misses after warm-up", False, "{:.0f}"),
)
METRIC = {m.key: m for m in METRICS}


class CellError(Exception):
    """A measurement (or the whole cell) failed; the message goes into the table."""


@dataclass
class Cell:
    """One backend at one MTU: medians, every sample, and errors per metric."""

    backend: str
    mtu: int
    family: int = 4
    values: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: Remarks that are not errors (a UDP search bounded by the sender, a skipped cell's reason).
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def cell_text(self, metric: Metric, spread: bool = False) -> str:
        if metric.key in self.values:
            text = metric.fmt.format(self.values[metric.key])
            s = self.samples.get(metric.key, [])
            if spread and len(s) > 1:
                text += f" ({metric.fmt.format(min(s))}-{metric.fmt.format(max(s))})"
            return text
        if metric.key in self.errors:
            return "error: " + _short(self.errors[metric.key], 30)
        return "—"


def _short(text: str, width: int = 40) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- namespaces and processes, all tracked for cleanup --------------------------------------------


class Sandbox:
    """Every namespace and process the harness made; :meth:`cleanup` removes them all."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.counter = 0
        self.tag = f"{os.getpid() % 100000}"
        #: Unix sockets (guestnet's API) live here; removed at cleanup.
        self.tmpdir = tempfile.mkdtemp(prefix="gnbench")
        #: /etc/netns/NAME directories made for a namespace's own resolv.conf.
        self.etc_dirs: dict[str, Path] = {}

    def name(self, role: str) -> str:
        self.counter += 1
        return f"gnb{role}{self.tag}_{self.counter}"

    def ifname(self, role: str) -> str:
        """A unique interface name of at most 15 characters."""
        self.counter += 1
        name = f"gb{role}{self.tag}{self.counter}"
        assert len(name) <= 15, name
        return name

    def netns(self, role: str) -> str:
        name = self.name(role)
        self.namespaces.append(name)  # first: an interrupt right after the add still cleans up
        run(["ip", "netns", "add", name])
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        return name

    def resolv_conf(self, ns: str, nameserver: str) -> None:
        """Give programs started in ``ns`` by ``ip netns exec`` their own /etc/resolv.conf (it
        bind-mounts /etc/netns/NS/resolv.conf over it); removed with the namespace."""
        etc = Path("/etc/netns") / ns
        self.etc_dirs[ns] = etc
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {nameserver}\n")

    def popen(
        self, ns: str, argv: Sequence[str], out: TextIO | None = None
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` (``ip netns exec`` execs it: the pid is the program's)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out if out is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if out is not None else subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 2.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def delete_netns(self, name: str) -> None:
        """Kill whatever still runs in ``name`` (TERM, then KILL) and delete it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = ns_pids(name)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 2.0
            while pids and ns_pids(name) and time.monotonic() < deadline:
                time.sleep(0.05)
        run(["ip", "netns", "del", name], check=False)
        if name in self.namespaces:
            self.namespaces.remove(name)
        etc = self.etc_dirs.pop(name, None)
        if etc is not None:
            shutil.rmtree(etc, ignore_errors=True)

    def cleanup(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)
        for name in list(reversed(self.namespaces)):
            self.delete_netns(name)
        for etc in self.etc_dirs.values():
            shutil.rmtree(etc, ignore_errors=True)
        self.etc_dirs.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def run(
    argv: Sequence[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CellError(f"{shlex.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def ns_run(
    ns: str, argv: Sequence[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)


def ns_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def wait_until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise CellError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def listening(ns: str, port: int) -> bool:
    out = ns_run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def guest_ready(ns: str, address: str, fam: Family = FAMILIES[4]) -> bool:
    """The guest has ``address`` (over IPv6 a prefix such as ``fd00::`` is enough: SLAAC picks
    the rest) past duplicate address detection, and a default route of that family."""
    addrs = ns_run(ns, ["ip", fam.ip, "-o", "addr", "show"], check=False).stdout
    route = ns_run(ns, ["ip", fam.ip, "route", "show", "default"], check=False).stdout
    word = "inet6" if fam.version == 6 else "inet"
    wanted = f" {word} {address}" + ("" if address.endswith("::") else "/")
    have = any(wanted in line and "tentative" not in line for line in addrs.splitlines())
    return have and "default" in route


# -- per-cell topology ----------------------------------------------------------------------------


@dataclass
class Topology:
    guest: str
    sandbox: str
    bind: str  # where host-side servers listen in the sandbox
    gateway: str  # what the guest's clients dial
    backend: subprocess.Popen[Any] | None = None
    backend_log: str | None = None
    #: guestnet's control API socket (guestnet only): pool counters before and after the runs.
    api_socket: str | None = None
    #: The published port as a client in the sandbox dials it; ``fwd_skip`` says why there is none.
    fwd_host: str = ""
    fwd_port: int = FWD_HOST_PORT
    fwd_skip: str | None = None
    #: Where the guest asks DNS (None: not measured in this cell), and a name the backend answers
    #: itself (None: the backend has no built-in names).
    dns_server: str | None = None
    builtin_name: str | None = None
    #: Why forwarded DNS is not measured although ``dns_server`` is set (no dnsmasq here).
    dns_forward_skip: str | None = None
    #: Set when a UDP iperf3 run hung (pasta 2023 over IPv6 never delivers iperf3's UDP end of
    #: test): the cell's other UDP runs are skipped rather than each waiting out its timeout.
    udp_hung: str | None = None

    def backend_output(self) -> str:
        if not self.backend_log:
            return ""
        with contextlib.suppress(OSError):
            return Path(self.backend_log).read_text(errors="replace")[-2000:]
        return ""


class Harness:
    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.args = args
        self.log = log
        self.box = Sandbox(log)
        self.deadline = time.monotonic() + float(args.budget)
        self.tmp = tempfile.mkdtemp(prefix="gn-compare-")

    # topology builders -------------------------------------------------------------------------

    def _start_backend(
        self, topo: Topology, argv: list[str], address: str, fam: Family = FAMILIES[4]
    ) -> None:
        topo.backend_log = os.path.join(self.tmp, f"{topo.sandbox}.log")
        with open(topo.backend_log, "w") as out:
            topo.backend = self.box.popen(topo.sandbox, argv, out)
        backend = topo.backend

        def ready() -> bool:
            if backend.poll() is not None:
                tail = _short(topo.backend_output(), 200)
                raise CellError(f"backend exited with {backend.returncode}: {tail}")
            return guest_ready(topo.guest, address, fam)

        wait_until(ready, READY_TIMEOUT_S, "the guest's address and default route")

    def setup(self, backend: str, mtu: int, fam: Family = FAMILIES[4]) -> Topology:
        guest = self.box.netns("gu")
        sandbox = self.box.netns("sb")
        topo = Topology(guest=guest, sandbox=sandbox, bind=fam.loopback, gateway=fam.gateway)
        v4 = fam.version == 4
        # Every backend forwards DNS to the sandbox's dnsmasq (IPv4 cells): by option where it
        # has one, by the resolv.conf it reads otherwise.
        self.box.resolv_conf(sandbox, "127.0.0.1")
        topo.fwd_host = fam.loopback
        topo.dns_server = "10.0.2.3" if v4 else None
        guest_path = f"{NETNS_DIR}/{guest}"
        if backend == "guestnet":
            topo.api_socket = os.path.join(self.box.tmpdir, f"{guest}.api")
            host = fam.loopback if v4 else f"[{fam.loopback}]"
            argv = [sys.executable, "-m", "guestnet", "netns", guest_path, "--configure",
                    "--api-socket", topo.api_socket, "--dns-upstream", "127.0.0.1",
                    "-p", f"{host}:{FWD_HOST_PORT}:{FWD_GUEST_PORT}"]  # fmt: skip
            topo.builtin_name = GUESTNET_BUILTIN_NAME if v4 else None
            self._start_backend(topo, [*argv, "--mtu", str(mtu)], fam.guest, fam)
        elif backend in ("pasta", "pasta2026"):
            self._dead_end(sandbox, fam)
            if v4:
                only = ["-n", str(fam.prefix_len), "--no-ndp", "--no-dhcpv6", "--ipv4-only",
                        "--dns-forward", "10.0.2.3"]  # fmt: skip
            else:
                # NDP on: the guest resolves the gateway fd00::2 through pasta's answers.
                only = ["--no-ra", "--no-dhcpv6", "--ipv6-only"]
            binary = "pasta"
            if backend == "pasta2026":
                binary = PASTA2026
                if v4:
                    only += ["--dns-host", "127.0.0.1"]
            argv = [
                binary, "--runas", "0", "--netns", guest_path, "--config-net",
                "-a", fam.guest, "-g", fam.gateway, "-m", str(mtu), *only,
                "-t", f"{FWD_HOST_PORT}:{FWD_GUEST_PORT}", "-u", "none", "-T", "none",
                "-U", "none", "-f", "-q",
            ]  # fmt: skip
            self._start_backend(topo, argv, fam.guest, fam)
        elif backend == "slirp4netns":
            api = os.path.join(self.box.tmpdir, f"{guest}.s4nn")
            argv = [
                "slirp4netns", "--configure", "--mtu", str(min(mtu, 65521)),
                *(["--enable-ipv6"] if fam.version == 6 else []),
                "--api-socket", api, "--netns-type=path", guest_path, "tap0",
            ]  # fmt: skip
            self._start_backend(topo, argv, fam.slirp_guest, fam)
            if v4:
                try:
                    slirp_add_hostfwd(api, "127.0.0.1", FWD_HOST_PORT, FWD_GUEST_PORT)
                except CellError as exc:
                    topo.fwd_skip = str(exc)
            else:
                topo.fwd_skip = "slirp4netns add_hostfwd takes IPv4 host addresses only"
        elif backend == "veth":
            a, b = self.box.ifname("v"), self.box.ifname("w")
            run(["ip", "link", "add", a, "netns", sandbox, "type", "veth", "peer", b, "netns",
                 guest])  # fmt: skip
            # nodad: the addresses are usable at once (no neighbour can hold them).
            nodad = ["nodad"] if fam.version == 6 else []
            for ns, dev, addr in ((sandbox, a, fam.gateway), (guest, b, fam.guest)):
                ns_run(ns, ["ip", "link", "set", dev, "mtu", str(mtu)])
                ns_run(ns, ["ip", "addr", "add", f"{addr}/{fam.prefix_len}", "dev", dev, *nodad])
                ns_run(ns, ["ip", "link", "set", dev, "up"])
            ns_run(guest, ["ip", fam.ip, "route", "add", "default", "via", fam.gateway])
            topo.bind = fam.gateway
            # No backend: the sandbox dials the guest's port itself, DNS goes straight to dnsmasq.
            topo.fwd_host, topo.fwd_port = fam.guest, FWD_GUEST_PORT
            topo.dns_server = fam.gateway if v4 else None
        else:
            raise CellError(f"unknown backend {backend}")
        return topo

    def _dead_end(self, sandbox: str, fam: Family) -> None:
        """pasta wants an external interface with a default route: a veth to a namespace that
        holds nothing else, so no traffic of the harness can leave through it."""
        dead = self.box.netns("de")
        a, b = self.box.ifname("p"), self.box.ifname("q")
        run(["ip", "link", "add", a, "netns", sandbox, "type", "veth", "peer", b, "netns", dead])
        ns_run(sandbox, ["ip", "addr", "add", "198.18.0.1/24", "dev", a])
        ns_run(sandbox, ["ip", "link", "set", a, "up"])
        ns_run(dead, ["ip", "addr", "add", "198.18.0.2/24", "dev", b])
        ns_run(dead, ["ip", "link", "set", b, "up"])
        ns_run(sandbox, ["ip", "route", "add", "default", "via", "198.18.0.2"])
        if fam.version == 6:
            ns_run(sandbox, ["ip", "-6", "addr", "add", "fd99::1/64", "dev", a, "nodad"])
            ns_run(dead, ["ip", "-6", "addr", "add", "fd99::2/64", "dev", b, "nodad"])
            ns_run(sandbox, ["ip", "-6", "route", "add", "default", "via", "fd99::2"])

    def teardown(self, procs_before: int, namespaces_before: int) -> None:
        """Stop every process and delete every namespace made since the cell began.

        By count rather than through the Topology, so a setup that failed half-way (a veth
        refused, a backend that never came up) leaves nothing behind for the next cell either.
        """
        for proc in list(reversed(self.box.procs[procs_before:])):
            self.box.stop(proc)
        for ns in list(reversed(self.box.namespaces[namespaces_before:])):
            self.box.delete_netns(ns)

    # measurements --------------------------------------------------------------------------------

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float) -> None:
        if self.time_left() < seconds:
            raise CellError("skipped: time budget (--budget) used up")

    def netbench(
        self, topo: Topology, argv: list[str], timeout: float, ns: str | None = None
    ) -> dict[str, Any]:
        """Run a netbench client in the guest (or ``ns``); its JSON answer, or CellError."""
        try:
            proc = ns_run(
                ns or topo.guest,
                [sys.executable, str(NETBENCH), *argv],
                check=False,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise CellError(f"netbench {argv[0]} gave no answer in {timeout:g} s") from None
        try:
            result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise CellError(f"netbench {argv[0]}: {_short(proc.stderr, 200)}") from None
        if "error" in result:
            raise CellError(f"netbench {argv[0]}: {result['error']}")
        return result

    def probe(self, topo: Topology) -> None:
        """The backend carries a TCP connection to the echo server (bounded retries)."""
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            try:
                self.netbench(
                    topo,
                    ["rr", "--host", topo.gateway, "--port", str(ECHO_PORT), "--count", "5",
                     "--timeout", "3"],
                    timeout=6,
                )  # fmt: skip
                return
            except CellError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise CellError(f"probe: no TCP echo through the backend ({last})")

    def iperf(self, topo: Topology, extra: list[str], duration: float) -> dict[str, Any]:
        """One iperf3 client run from the guest against a fresh one-off server in the sandbox."""
        self.need(duration + 5)
        server = self.box.popen(
            topo.sandbox, ["iperf3", "-s", "-1", "-B", topo.bind, "-p", str(IPERF_PORT)]
        )
        try:
            wait_until(lambda: listening(topo.sandbox, IPERF_PORT), 5.0, "iperf3 -s")
            argv = [
                "iperf3", "-c", topo.gateway, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J",
                "--connect-timeout", "3000", *extra,
            ]  # fmt: skip
            try:
                proc = ns_run(topo.guest, argv, check=False, timeout=duration + 15)
            except subprocess.TimeoutExpired:
                raise CellError(f"iperf3 {' '.join(extra)} hung past {duration + 15:g} s") from None
            try:
                data: dict[str, Any] = json.loads(proc.stdout)
            except ValueError:
                raise CellError(f"iperf3: {_short(proc.stderr or proc.stdout, 200)}") from None
            if "error" in data:
                raise CellError(f"iperf3: {data['error']}")
            return data
        finally:
            self.box.stop(server, grace=1.0)

    def measure(self, backend: str, mtu: int, family: int = 4) -> Cell:
        cell = Cell(backend, mtu, family)
        start = time.monotonic()
        procs_before, namespaces_before = len(self.box.procs), len(self.box.namespaces)
        try:
            self.need(10)
            fam = FAMILIES[family]
            topo = self.setup(backend, mtu, fam)
            self._start_servers(topo, fam)
            self.probe(topo)
            self._measure_all(cell, topo)
            if topo.backend is not None and topo.backend.poll() is not None:
                msg = f"backend exited with {topo.backend.returncode} during the cell"
                for m in METRICS:
                    cell.errors.setdefault(m.key, msg)
        except (CellError, subprocess.SubprocessError, OSError) as exc:
            for m in METRICS:
                if m.key not in cell.values:
                    cell.errors.setdefault(m.key, str(exc) or type(exc).__name__)
        finally:
            self.teardown(procs_before, namespaces_before)
            cell.seconds = time.monotonic() - start
        if backend == "veth":
            for key in ("cpu_s_per_gb", "rss_mb", "dns_builtin_ms"):
                cell.errors.pop(key, None)
        if backend not in ("guestnet", "veth") or family != 4:
            # Not measured by design ("—"), whatever else went wrong in the cell.
            cell.errors.pop("dns_builtin_ms", None)
        if family != 4:
            cell.errors.pop("dns_forward_ms", None)
        return cell

    def _start_servers(self, topo: Topology, fam: Family) -> None:
        """The echo servers (host side and, for the published port, guest side) and dnsmasq."""
        life = f"{max(60.0, self.time_left()):.0f}"
        self.box.popen(
            topo.sandbox,
            [sys.executable, str(NETBENCH), "serve", "--bind", topo.bind, "--port",
             str(ECHO_PORT), "--max-seconds", life],
        )  # fmt: skip
        self.box.popen(
            topo.guest,
            [sys.executable, str(NETBENCH), "serve", "--bind",
             "0.0.0.0" if fam.version == 4 else "::", "--port", str(FWD_GUEST_PORT),
             "--max-seconds", life],
        )  # fmt: skip
        if topo.dns_server is not None and not shutil.which("dnsmasq"):
            topo.dns_forward_skip = "dnsmasq not installed (Debian package dnsmasq-base)"
        elif topo.dns_server is not None:
            listen = sorted({"127.0.0.1", topo.bind})
            self.box.popen(
                topo.sandbox,
                ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                 "--no-hosts", "--bind-interfaces", *(f"--listen-address={a}" for a in listen),
                 "--port=53", f"--address=/bench.test/{DNS_ANSWER}", "--user=root",
                 "--group=root", f"--pid-file={self.box.tmpdir}/{topo.sandbox}.dnsmasq.pid",
                 "--cache-size=0"],
            )  # fmt: skip
        wait_until(lambda: listening(topo.sandbox, ECHO_PORT), 5.0, "the echo server")
        wait_until(lambda: listening(topo.guest, FWD_GUEST_PORT), 5.0, "the guest's echo server")

    def _measure_all(self, cell: Cell, topo: Topology) -> None:
        pid = topo.backend.pid if topo.backend is not None else None
        only = self.args.only
        misses0 = self._measure_tcp(cell, topo, pid) if "tcp" in only else None
        if "rr" in only:
            self._measure_rr(cell, topo)
        if "conn" in only:
            self._measure_connrate(cell, topo)
        if "udp" in only:
            self._measure_udp(cell, topo)
            self._measure_udp_max(cell, topo)
        if "dns" in only:
            self._measure_dns(cell, topo)
        if pid:
            rss = peak_rss_mb(pid)
            if rss is not None:
                cell.values["rss_mb"] = rss
        misses1 = pool_misses(topo.api_socket)
        if misses0 is not None and misses1 is not None:
            cell.values["pool_misses"] = misses1 - misses0
        for key, samples in cell.samples.items():
            if samples:
                cell.values[key] = statistics.median(samples)
                cell.errors.pop(key, None)

    def _measure_tcp(self, cell: Cell, topo: Topology, pid: int | None) -> int | None:
        """TCP bulk both ways, with the backend's CPU time around them; the pool misses after
        the warm-up. The first TCP run each way is the pools' warm-up (each fills lazily to its
        direction's high water, e.g. one host read's batch of frames): after both, a pool miss
        is a fresh buffer in steady state."""
        a = self.args
        misses0: int | None = None
        cpu0 = cpu_seconds(pid) if pid else None
        moved = 0
        for key, extra in (("tcp_up", []), ("tcp_down", ["-R"])):
            for _ in range(a.reps):
                try:
                    data = self.iperf(topo, extra, a.duration)
                    received = data["end"]["sum_received"]
                    cell.samples.setdefault(key, []).append(received["bits_per_second"] / 1e9)
                    moved += int(received["bytes"])
                    if key == "tcp_down" and misses0 is None:
                        misses0 = pool_misses(topo.api_socket)
                except (CellError, KeyError, TypeError) as exc:
                    cell.errors[key] = str(exc) if isinstance(exc, CellError) else repr(exc)
                    break
        cpu1 = cpu_seconds(pid) if pid else None
        if cpu0 is not None and cpu1 is not None:
            if moved > 0:
                cell.values["cpu_s_per_gb"] = (cpu1 - cpu0) / (moved / 1e9)
            else:
                cell.errors["cpu_s_per_gb"] = "no TCP bytes moved"
        return misses0

    def _measure_rr(self, cell: Cell, topo: Topology) -> None:
        """1-byte round trips on one connection through our own client."""
        a = self.args
        for _ in range(a.reps):
            try:
                self.need(a.rr_timeout)
                r = self.netbench(
                    topo,
                    ["rr", "--host", topo.gateway, "--port", str(ECHO_PORT), "--count",
                     str(a.rr_count), "--timeout", str(a.rr_timeout)],
                    timeout=a.rr_timeout + 10,
                )  # fmt: skip
                cell.samples.setdefault("rr_median", []).append(r["median_ms"])
                cell.samples.setdefault("rr_p99", []).append(r["p99_ms"])
            except CellError as exc:
                cell.errors["rr_median"] = cell.errors["rr_p99"] = str(exc)
                break

    def _connrate(self, topo: Topology, host: str, port: int, ns: str | None) -> dict[str, Any]:
        a = self.args
        self.need(a.conn_seconds + 5)
        return self.netbench(
            topo,
            ["connrate", "--host", host, "--port", str(port), "--seconds", str(a.conn_seconds),
             "--max", str(a.conn_max), "--timeout", str(a.conn_seconds + 10)],
            timeout=a.conn_seconds + 20,
            ns=ns,
        )  # fmt: skip

    def _measure_connrate(self, cell: Cell, topo: Topology) -> None:
        """Connections guest→host (rate and connect time), then host→guest through the
        published port (a client in the sandbox)."""
        for _ in range(self.args.reps):
            try:
                r = self._connrate(topo, topo.gateway, ECHO_PORT, None)
                cell.samples.setdefault("conn_per_s", []).append(r["per_s"])
                cell.samples.setdefault("connect_ms", []).append(r["connect_median_ms"])
            except CellError as exc:
                cell.errors["conn_per_s"] = cell.errors["connect_ms"] = str(exc)
                break
        if topo.fwd_skip is not None:
            cell.errors["fwd_conn_per_s"] = "skipped: " + topo.fwd_skip
            return
        for _ in range(self.args.reps):
            try:
                r = self._connrate(topo, topo.fwd_host, topo.fwd_port, topo.sandbox)
                cell.samples.setdefault("fwd_conn_per_s", []).append(r["per_s"])
            except CellError as exc:
                cell.errors["fwd_conn_per_s"] = str(exc)
                break

    def _measure_udp(self, cell: Cell, topo: Topology) -> None:
        """UDP at a fixed offered rate both ways; loss as the receiver counted it."""
        a = self.args
        for keys, extra in ((("udp_gbps", "udp_loss"), []), ((None, "udp_loss_down"), ["-R"])):
            for _ in range(a.reps):
                try:
                    if topo.udp_hung:
                        raise CellError(f"skipped: {topo.udp_hung}")
                    data = self.iperf(
                        topo, ["-u", "-b", UDP_RATE, *self._udp_opts(), *extra], a.udp_duration
                    )
                    gbps, loss = udp_result(data)
                    if keys[0] is not None:
                        cell.samples.setdefault(keys[0], []).append(gbps)
                    cell.samples.setdefault(keys[1], []).append(loss)
                except (CellError, KeyError, TypeError) as exc:
                    msg = str(exc) if isinstance(exc, CellError) else repr(exc)
                    if "hung past" in msg and not topo.udp_hung:
                        topo.udp_hung = f"an earlier UDP run in this cell hung ({msg})"
                    for key in keys:
                        if key is not None:
                            cell.errors[key] = msg
                    break

    def _measure_udp_max(self, cell: Cell, topo: Topology) -> None:
        """The highest rate with < 1 % loss each way (one search per cell, not per rep)."""
        for key, extra in (("udp_max_up", []), ("udp_max_down", ["-R"])):
            try:
                if topo.udp_hung:
                    raise CellError(f"skipped: {topo.udp_hung}")
                gbps, note = self.udp_search(topo, extra)
                cell.samples.setdefault(key, []).append(gbps)
                if note:
                    cell.notes[key] = note
            except (CellError, KeyError, TypeError) as exc:
                cell.errors[key] = str(exc) if isinstance(exc, CellError) else repr(exc)

    def _udp_opts(self) -> list[str]:
        """Datagram size, and the socket buffers if ``--udp-window`` asks for them."""
        window = ["-w", self.args.udp_window] if self.args.udp_window != "default" else []
        return ["-l", str(UDP_LEN), *window]

    def udp_search(self, topo: Topology, extra: list[str]) -> tuple[float, str]:
        """Offered rates from UDP_MIN_BPS to UDP_MAX_BPS: both ends, then a geometric
        bisection of ``--udp-steps`` steps between the highest passing and the lowest failing
        rate. Returns the best received Gbit/s among probes under UDP_MAX_LOSS, and a note."""
        a = self.args
        probes: list[tuple[float, float, float]] = []  # offered bit/s, received Gbit/s, loss %

        def probe(bps: float) -> bool:
            data = self.iperf(
                topo, ["-u", "-b", f"{bps:.0f}", *self._udp_opts(), *extra], a.udp_probe
            )
            gbps, loss = udp_result(data)
            probes.append((bps, gbps, loss))
            return loss < UDP_MAX_LOSS

        lo, hi = UDP_MIN_BPS, UDP_MAX_BPS
        if not probe(lo):
            raise CellError(f"loss {probes[-1][2]:.1f} % already at {lo / 1e6:.0f} Mbit/s offered")
        note = ""
        if probe(hi):
            note = f"no loss at {hi / 1e9:.0f} Gbit/s offered: the iperf3 sender is the limit"
        else:
            for _ in range(a.udp_steps):
                mid = (lo * hi) ** 0.5
                if probe(mid):
                    lo = mid
                else:
                    hi = mid
            note = f"passes {lo / 1e9:.2f}, fails {hi / 1e9:.2f} Gbit/s offered"
        best = max(gbps for _, gbps, loss in probes if loss < UDP_MAX_LOSS)
        return best, note

    def _measure_dns(self, cell: Cell, topo: Topology) -> None:
        """DNS A query medians from the guest: forwarded to dnsmasq, and built-in."""
        if topo.dns_server is None:
            return
        a = self.args
        names = []
        if topo.dns_forward_skip is not None:
            cell.errors["dns_forward_ms"] = "skipped: " + topo.dns_forward_skip
        else:
            names.append(("dns_forward_ms", DNS_FORWARD_NAME))
        if topo.builtin_name is not None:
            names.append(("dns_builtin_ms", topo.builtin_name))
        for key, name in names:
            for _ in range(a.reps):
                try:
                    self.need(a.dns_timeout)
                    r = self.netbench(
                        topo,
                        ["dns", "--server", topo.dns_server, "--name", name, "--count",
                         str(a.dns_count), "--timeout", str(a.dns_timeout)],
                        timeout=a.dns_timeout + 10,
                    )  # fmt: skip
                    cell.samples.setdefault(key, []).append(r["median_ms"])
                    if r.get("lost"):
                        cell.notes[key] = f"{r['lost']} of {a.dns_count} queries lost"
                except CellError as exc:
                    cell.errors[key] = str(exc)
                    break


def slirp_add_hostfwd(api: str, host_addr: str, host_port: int, guest_port: int) -> None:
    """Publish ``host_addr:host_port`` to the guest's ``guest_port`` through slirp4netns's API
    socket (one JSON request per connection; the answer has ``return`` or ``error``)."""
    request = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": host_addr,
               "host_port": host_port, "guest_addr": "", "guest_port": guest_port}}  # fmt: skip
    deadline = time.monotonic() + 5.0
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5.0)
                sock.connect(api)
                sock.sendall(json.dumps(request).encode())
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                    if len(answer) > 65536:
                        break
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise CellError(f"slirp4netns API {api}: {exc}") from None
            time.sleep(0.05)
    try:
        reply = json.loads(answer)
    except ValueError:
        text = _short(answer.decode(errors="replace"))
        raise CellError(f"slirp4netns add_hostfwd: {text}") from None
    if "return" not in reply:
        raise CellError(f"slirp4netns add_hostfwd: {reply}")


def udp_result(data: dict[str, Any]) -> tuple[float, float]:
    """Received Gbit/s and loss % as the receiving side (the server) counted them."""
    rx = data["end"]["sum_received"]
    return float(rx["bits_per_second"]) / 1e9, float(rx["lost_percent"])


def pool_misses(api_socket: str | None) -> int | None:
    """Both frame pools' misses (fresh buffers) so far, from guestnet's stats API."""
    if api_socket is None:
        return None
    from guestnet.client import ApiError, request

    try:
        status, stats = request(api_socket, "GET", "/stats", timeout=5)
    except ApiError:
        return None
    if status != 200:
        return None
    pools = stats["pool"]
    return int(pools["from_guest"]["misses"]) + int(pools["to_guest"]["misses"])


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- report ---------------------------------------------------------------------------------------


def render_table(cells: list[Cell], markdown: bool) -> str:
    headers = ["backend", "MTU", "IP", *(m.title for m in METRICS)]
    rows = [
        [c.backend, str(c.mtu), f"IPv{c.family}",
         *(c.cell_text(m, spread=m.key.startswith("tcp")) for m in METRICS)]
        for c in cells
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines = [line.rstrip() for line in lines]
    return "\n".join(lines)


def render_errors(cells: list[Cell]) -> str:
    lines = []
    for c in cells:
        seen: set[str] = set()
        for key, msg in c.errors.items():
            if msg not in seen:
                seen.add(msg)
                lines.append(
                    f"- {c.backend} MTU {c.mtu} IPv{c.family} ({key}): {' '.join(msg.split())}"
                )
    return "\n".join(lines)


def _ratio(a: Cell | None, b: Cell | None, key: str) -> str:
    """a's median over b's, or a dash when either is missing."""
    x = a.values.get(key) if a is not None else None
    y = b.values.get(key) if b is not None else None
    return f"{x / y:.2f}" if x is not None and y else "—"


def _title(m: Metric) -> str:
    return m.title + ("" if m.higher_is_better else " (lower is better)")


def ratios(cells: list[Cell]) -> list[tuple[str, str, dict[str, str]]]:
    """(metric title, "MTU[ IPv6]", {peer: guestnet/peer}) for every metric, MTU and family
    guestnet has: guestnet beside each peer in the same family."""
    by = {(c.backend, c.mtu, c.family): c for c in cells}
    out = []
    for family in sorted({c.family for c in cells}):
        for mtu in sorted({c.mtu for c in cells}):
            gn = by.get(("guestnet", mtu, family))
            if gn is None:
                continue
            label = str(mtu) + ("" if family == 4 else f" IPv{family}")
            for m in METRICS:
                row = {
                    peer: _ratio(gn, by.get((peer, mtu, family)), m.key)
                    for peer in BACKENDS
                    if peer != "guestnet" and (peer, mtu, family) in by
                }
                out.append((_title(m), label, row))
    return out


@dataclass(frozen=True)
class Target:
    """One of issue 12's targets, read off one run: guestnet against the best peer's value (or
    an absolute bound), per MTU and family."""

    key: str
    #: The target in words, as the report prints it.
    text: str
    #: guestnet / best peer must be at least (higher is better) or at most this; None: no ratio.
    ratio: float | None = None
    #: An absolute bound on guestnet's value (at most, lower-is-better metrics; at least else).
    bound: float | None = None
    #: Also at least this fraction of veth measured in the same run (bulk TCP).
    veth: float | None = None
    #: The peers that count (default: all of PEERS); the peer metric compared (default: key).
    peers: tuple[str, ...] = PEERS
    peer_key: str | None = None


TARGETS = (
    Target("tcp_up", "≥ best peer and ≥ 0.85 x veth", ratio=1.0, veth=0.85),
    Target("tcp_down", "≥ best peer and ≥ 0.85 x veth", ratio=1.0, veth=0.85),
    Target("connect_ms", "≤ best peer", ratio=1.0),
    Target("conn_per_s", "≥ best peer", ratio=1.0),
    Target("fwd_conn_per_s", "≥ pasta's -t", ratio=1.0, peers=("pasta", "pasta2026")),
    Target("rr_median", "≤ best peer", ratio=1.0),
    Target("udp_loss", "≤ 0.1 %", bound=0.1),
    Target("udp_loss_down", "≤ 0.1 %", bound=0.1),
    Target("udp_max_up", "≥ 2 x best peer", ratio=2.0),
    Target("udp_max_down", "≥ 2 x best peer", ratio=2.0),
    Target(
        "dns_builtin_ms", "≤ best peer (peers: forwarded)", ratio=1.0, peer_key="dns_forward_ms"
    ),
    Target("dns_forward_ms", "≤ best peer", ratio=1.0),
    Target("rss_mb", "≤ 40 MB", bound=40.0),
    Target("cpu_s_per_gb", "no worse than before (not a one-run target)"),
)


@dataclass
class TargetRow:
    target: Target
    mtu: int
    family: int
    guestnet: float | None
    best_peer: str | None
    best_value: float | None
    veth: float | None
    #: True pass, False fail, None cannot tell (a value missing, or no target to read).
    passed: bool | None

    @property
    def ratio(self) -> float | None:
        if self.guestnet is None or not self.best_value:
            return None
        return self.guestnet / self.best_value


def best_peer(
    by: dict[tuple[str, int, int], Cell], key: str, mtu: int, family: int, peers: Sequence[str]
) -> tuple[str | None, float | None]:
    """The peer with the best median of ``key`` in this MTU and family, and that median."""
    m = METRIC[key]
    found = [
        (cell.values[key], peer)
        for peer in peers
        if (cell := by.get((peer, mtu, family))) is not None and key in cell.values
    ]
    if not found:
        return None, None
    value, peer = max(found) if m.higher_is_better else min(found)
    return peer, value


def target_rows(cells: list[Cell]) -> list[TargetRow]:
    """Every target, per MTU and family guestnet was measured in, judged on this run."""
    by = {(c.backend, c.mtu, c.family): c for c in cells}
    rows = []
    for family in sorted({c.family for c in cells}):
        for mtu in sorted({c.mtu for c in cells}):
            gn = by.get(("guestnet", mtu, family))
            if gn is None:
                continue
            veth_cell = by.get(("veth", mtu, family))
            for t in TARGETS:
                higher = METRIC[t.key].higher_is_better
                peer, best = best_peer(by, t.peer_key or t.key, mtu, family, t.peers)
                value = gn.values.get(t.key)
                vv = veth_cell.values.get(t.key) if veth_cell is not None else None
                checks: list[bool | None] = []
                if t.ratio is not None:
                    if value is None or best is None:
                        checks.append(None)
                    else:
                        checks.append(
                            value >= t.ratio * best if higher else value <= t.ratio * best
                        )
                if t.bound is not None:
                    checks.append(
                        None
                        if value is None
                        else (value >= t.bound if higher else value <= t.bound)
                    )
                if t.veth is not None:
                    checks.append(None if value is None or vv is None else value >= t.veth * vv)
                passed: bool | None
                if not checks or None in checks:
                    passed = False if False in checks else None
                else:
                    passed = all(checks)
                rows.append(TargetRow(t, mtu, family, value, peer, best, vv, passed))
    return rows


def render_targets(rows: list[TargetRow]) -> str:
    lines = [
        "| cell | MTU | guestnet | best peer | guestnet / best peer | veth | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = METRIC[r.target.key]
        label = str(r.mtu) + ("" if r.family == 4 else f" IPv{r.family}")
        gn = "—" if r.guestnet is None else m.fmt.format(r.guestnet)
        peer = "—" if r.best_peer is None else f"{r.best_peer} {m.fmt.format(r.best_value)}"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
        veth = "—" if r.veth is None else m.fmt.format(r.veth)
        result = {True: "pass", False: "**FAIL**", None: "—"}[r.passed]
        lines.append(
            f"| {_title(m)} | {label} | {gn} | {peer} | {ratio} | {veth} | {r.target.text} "
            f"| {result} |"
        )
    return "\n".join(lines)


def render_cells_md(cells: list[Cell]) -> str:
    """One table per family and MTU: a row per metric, a column per backend (median, and for
    TCP the range over the repetitions)."""
    out = []
    for family in sorted({c.family for c in cells}):
        for mtu in sorted({c.mtu for c in cells}):
            row_cells = [c for c in cells if c.family == family and c.mtu == mtu]
            if not row_cells:
                continue
            out += [
                f"MTU {mtu}, IPv{family}:",
                "",
                "| metric | " + " | ".join(c.backend for c in row_cells) + " |",
                "|---|" + "---|" * len(row_cells),
            ]
            for m in METRICS:
                texts = [c.cell_text(m, spread=m.key.startswith("tcp")) for c in row_cells]
                out.append(f"| {_title(m)} | " + " | ".join(texts) + " |")
            out.append("")
    return "\n".join(out).rstrip()


def render_notes(cells: list[Cell]) -> str:
    return "\n".join(
        f"- {c.backend} MTU {c.mtu} IPv{c.family} ({key}): {note}"
        for c in cells
        for key, note in c.notes.items()
    )


#: The metrics the IPv6/IPv4 table compares: the traffic a family could change.
FAMILY_METRICS = ("tcp_up", "tcp_down", "rr_median", "conn_per_s", "udp_gbps", "cpu_s_per_gb")


def family_ratios(cells: list[Cell]) -> list[tuple[str, int, dict[str, str]]]:
    """(metric title, MTU, {backend: IPv6/IPv4}) for every backend measured in both families:
    what IPv6 costs each backend, from cells run back to back."""
    by = {(c.backend, c.mtu, c.family): c for c in cells}
    backends = [b for b in BACKENDS if any((b, c.mtu, 6) in by and (b, c.mtu, 4) in by
                                           for c in cells)]  # fmt: skip
    out = []
    for mtu in sorted({c.mtu for c in cells}):
        for m in METRICS:
            if m.key not in FAMILY_METRICS:
                continue
            row = {b: _ratio(by.get((b, mtu, 6)), by.get((b, mtu, 4)), m.key) for b in backends}
            if row:
                out.append((_title(m), mtu, row))
    return out


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}"


def versions() -> str:
    parts = []
    for argv in (["iperf3", "--version"], ["slirp4netns", "--version"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout
            parts.append(out.splitlines()[0].strip() if out else argv[0])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "passt"],
            capture_output=True, text=True, timeout=5,
        ).stdout  # fmt: skip
        if out:
            parts.append(f"pasta (passt {out})")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        if rev:
            parts.append(f"guestnet {rev}")
    return ", ".join(parts)


def render_markdown(cells: list[Cell], command: str, args: argparse.Namespace) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    backends = list(dict.fromkeys(c.backend for c in cells))
    load = getattr(args, "load", {})
    lines = [
        f"## Side by side: {', '.join(backends)} ({now})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}. Versions: {versions()}. Load average (1 min) at start "
        f"{load.get('start', float('nan')):.2f}, at end {load.get('end', float('nan')):.2f}"
        f" (2 CPUs shared: above ~1 the numbers are a busy machine's).",
        "",
        f"Medians over {args.reps} repetition(s); iperf3 TCP {args.duration:g} s per run (TCP "
        "cells show the median and, in parentheses, the range); UDP 500M: offered "
        f"{UDP_RATE}bit/s in {UDP_LEN}-byte datagrams for {args.udp_duration:g} s each way, "
        "receiver-side loss"
        + (
            f" (iperf3 -w {args.udp_window} on every UDP run)"
            if args.udp_window != "default"
            else " (iperf3's default socket buffers)"
        )
        + "; UDP <1%: received Gbit/s of the best probe under 1 % loss in a "
        f"search of {args.udp_probe:g}-s probes from {UDP_MIN_BPS / 1e6:.0f} Mbit/s to "
        f"{UDP_MAX_BPS / 1e9:.0f} Gbit/s offered ({args.udp_steps} bisection steps, one search "
        f"per cell); RR: {args.rr_count} 1-byte round trips on one connection; conn/s: connect "
        f"+ 1 byte + close for {args.conn_seconds:g} s (at most {args.conn_max}), guest to "
        "host; connect ms: the median connect() of those; fwd conn/s: the same from the host "
        f"side to the published port (127.0.0.1:{FWD_HOST_PORT} -> guest {FWD_GUEST_PORT}); DNS: "
        f"{args.dns_count} A queries one at a time from the guest to the backend's DNS address "
        f"(fwd: {DNS_FORWARD_NAME}, answered by dnsmasq on the sandbox's loopback; built-in: "
        f"{GUESTNET_BUILTIN_NAME}, guestnet only); CPU s/GB and RSS: the backend process "
        "(utime+stime over the TCP runs / bytes moved; VmHWM). "
        + (
            "CPU idle states: /dev/cpu_dma_latency held at 0 (idle vCPUs poll)."
            if args.pm_qos
            else "CPU idle states left alone (--no-pm-qos or no /dev/cpu_dma_latency)."
        ),
        "",
        render_cells_md(cells),
    ]
    rows = target_rows(cells)
    if rows:
        lines += [
            "",
            "Issue 12's targets, read off this run (best peer among "
            f"{', '.join(PEERS)} per cell; veth is the kernel's ceiling, not a peer):",
            "",
            render_targets(rows),
        ]
    rat = ratios(cells)
    if rat:
        peers = [p for p in BACKENDS if any(p in r for _, _, r in rat)]
        lines += [
            "",
            "Ratios guestnet / peer (throughput and conn/s: above 1 is better; latency, CPU, "
            "RSS and loss: below 1 is better):",
            "",
            "| metric | MTU | " + " | ".join(f"guestnet / {p}" for p in peers) + " |",
            "|---|---|" + "---|" * len(peers),
        ]
        for title, label, row in rat:
            lines.append(
                f"| {title} | {label} | " + " | ".join(row.get(p, "—") for p in peers) + " |"
            )
    fam = family_ratios(cells)
    if fam:
        fam_backends = [b for b in BACKENDS if any(b in r for _, _, r in fam)]
        lines += [
            "",
            "Ratios IPv6 / IPv4 per backend (same MTU, cells run back to back; throughput and "
            "conn/s: below 1 means IPv6 is slower; latency and CPU: above 1 means it costs more):",
            "",
            "| metric | MTU | " + " | ".join(fam_backends) + " |",
            "|---|---|" + "---|" * len(fam_backends),
        ]
        for title, mtu, row in fam:
            lines.append(
                f"| {title} | {mtu} | " + " | ".join(row.get(b, "—") for b in fam_backends) + " |"
            )
    notes = render_notes(cells)
    if notes:
        lines += ["", "Notes:", "", notes]
    errors = render_errors(cells)
    if errors:
        lines += ["", "Errors and skipped cells:", "", errors]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------


def ensure_binaries(backends: list[str], log: Callable[[str], None]) -> dict[str, str]:
    """Install missing peers with apt-get (bounded); backends still missing get an error."""
    missing: dict[str, str] = {}
    needed = [("iperf3", "iperf3")] + [BINARIES[b] for b in backends if b in BINARIES]
    for binary, package in needed:
        if shutil.which(binary):
            continue
        log(f"{binary} missing: apt-get install -y {package}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["apt-get", "install", "-y", package],
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                capture_output=True, timeout=300, check=False,
            )  # fmt: skip
        if not shutil.which(binary):
            missing[binary] = f"{binary} not installed (Debian package {package})"
    if "pasta2026" in backends and not os.access(PASTA2026, os.X_OK):
        missing["pasta2026"] = (
            f"skipped: not built ({PASTA2026} missing; ../shared/peers/build-passt.sh builds it)"
        )
    if not shutil.which("dnsmasq"):
        log("dnsmasq missing: apt-get install -y dnsmasq-base")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["apt-get", "install", "-y", "dnsmasq-base"],
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                capture_output=True, timeout=300, check=False,
            )  # fmt: skip
    return missing


#: Measurement groups (``--only``): TCP bulk with CPU s/GB, round trips, connection rates, UDP
#: (fixed rate and the <1 % search), DNS.
GROUPS = ("tcp", "rr", "conn", "udp", "dns")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 rep, 2 s runs, fewer round trips")
    p.add_argument(
        "--peers",
        "--backends",
        dest="backends",
        default=",".join(BACKENDS),
        help=f"backends to measure, in order ({','.join(BACKENDS)})",
    )
    p.add_argument("--mtus", default="1500,65520")
    p.add_argument("--reps", type=int, help="repetitions per measurement (3; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds per iperf3 TCP run (8; --quick 2)")
    p.add_argument("--families", default="4", help="IP versions to measure: 4, 6 or 4,6")
    p.add_argument(
        "--budget", type=float, help="whole-run seconds (25 min per family in --families)"
    )
    p.add_argument(
        "--udp-probe", type=float, help="seconds per probe of the UDP rate search (2; --quick 1)"
    )
    p.add_argument(
        "--udp-steps", type=int, help="bisection steps of the UDP rate search (4; --quick 2)"
    )
    p.add_argument(
        "--udp-window",
        metavar="BYTES",
        default=UDP_WINDOW,
        help=f"iperf3 -w for every UDP run: the socket buffers of both iperf3 ends ({UDP_WINDOW}; "
        "'default' leaves iperf3's own, as issue 12's first figures were taken)",
    )
    p.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"measurement groups to run ({','.join(GROUPS)}); the others' cells stay empty (—)",
    )
    p.add_argument("--markdown", metavar="FILE", help="write a markdown section to FILE")
    p.add_argument("--json", metavar="FILE", help="write every cell as JSON to FILE")
    p.add_argument(
        "--no-pm-qos",
        action="store_true",
        help="leave CPU idle states alone (default: hold /dev/cpu_dma_latency at 0)",
    )
    args = p.parse_args(argv)
    args.only = {g for g in args.only.split(",") if g}
    if not args.only or not args.only <= set(GROUPS):
        p.error(f"--only takes some of {','.join(GROUPS)}")
    args.backends = [b for b in args.backends.split(",") if b]
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    try:
        args.families = [int(f) for f in args.families.split(",") if f]
    except ValueError:
        p.error(f"--families takes 4, 6 or 4,6, not {args.families!r}")
    if not args.families or any(f not in FAMILIES for f in args.families):
        p.error(f"--families takes 4, 6 or 4,6, not {args.families!r}")
    if args.budget is None:
        args.budget = float(BUDGET_PER_FAMILY_S * len(args.families))
    args.mtus = [int(m) for m in args.mtus.split(",") if m]
    for m in args.mtus:
        if not 576 <= m <= 65520:
            p.error(f"MTU {m} out of range 576..65520")
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 2.0 if args.quick else 8.0
    if not (1 <= args.reps <= 20 and 0.5 <= args.duration <= 120):
        p.error("--reps must be 1..20 and --duration 0.5..120")
    args.udp_duration = min(args.duration, 3.0)
    if args.udp_probe is None:
        args.udp_probe = 1.0 if args.quick else 2.0
    if args.udp_steps is None:
        args.udp_steps = 2 if args.quick else 4
    if not (1 <= args.udp_probe <= 30 and 0 <= args.udp_steps <= 10):
        p.error("--udp-probe must be 1..30 and --udp-steps 0..10")
    args.dns_count = 200 if args.quick else 1000
    args.dns_timeout = 10.0 if args.quick else 20.0
    args.rr_count = 200 if args.quick else 2000
    args.rr_timeout = 10.0 if args.quick else 20.0
    args.conn_seconds = min(args.duration, 1.0) if args.quick else 2.0
    args.conn_max = 1000 if args.quick else 5000
    return args


def hold_pm_qos() -> int | None:
    """Ask for zero wake-up latency (idle vCPUs poll) until the returned fd is closed."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError:
        return None
    try:
        os.write(fd, struct.pack("=i", 0))
    except OSError:
        os.close(fd)
        return None
    return fd


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("compare.py needs root (network namespaces)", file=sys.stderr)
        return 2
    command = (
        shlex.join([".venv/bin/python", "bench/compare.py", *sys.argv[1:]])
        if argv is None
        else shlex.join(["bench/compare.py", *argv])
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and we still want Ctrl-C
    # (or kill -INT) to clean up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    missing = ensure_binaries(args.backends, log)
    qos_fd = None if args.no_pm_qos else hold_pm_qos()
    args.pm_qos = qos_fd is not None
    args.load = {"start": os.getloadavg()[0]}
    harness = Harness(args, log)
    cells: list[Cell] = []
    interrupted = False
    try:
        for mtu in args.mtus:
            for backend in args.backends:
                binary = BINARIES.get(backend, (backend, ""))[0]
                if binary in missing:
                    cells += [
                        Cell(backend, mtu, f, errors={m.key: missing[binary] for m in METRICS})
                        for f in args.families
                    ]
                    continue
                # A backend's families back to back: their ratio sees the same machine state.
                for family in args.families:
                    left = harness.time_left()
                    log(f"[{left:5.0f} s left] {backend} MTU {mtu} IPv{family} ...")
                    cell = harness.measure(backend, mtu, family)
                    cells.append(cell)
                    log(f"  done in {cell.seconds:.1f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        harness.box.cleanup()
        shutil.rmtree(harness.tmp, ignore_errors=True)
        if qos_fd is not None:
            os.close(qos_fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    args.load["end"] = os.getloadavg()[0]
    print(render_table(cells, markdown=False))
    errors = render_errors(cells)
    if errors:
        print("\nErrors:\n" + errors)
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(cells, command, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": machine(),
                    "load_average_1min": args.load,
                    "cells": [
                        {
                            "backend": c.backend,
                            "mtu": c.mtu,
                            "family": c.family,
                            "values": c.values,
                            "samples": c.samples,
                            "errors": c.errors,
                            "notes": c.notes,
                            "seconds": c.seconds,
                        }
                        for c in cells
                    ],
                },
                indent=1,
            )
        )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
