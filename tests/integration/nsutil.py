"""Network namespaces and guestnet processes for integration tests.

Theory of operation: every integration test runs guestnet inside a *sandbox* namespace of its own
whose only interface is loopback, so whatever guestnet sends to "the host" stays on that loopback;
servers the test wants guestnet to reach are started in the same sandbox on 127.0.0.1. A guest is
either another namespace (``guestnet netns``) or one guestnet makes itself (``guestnet run``), or a
VM / socket client speaking to guestnet's unix socket (paths are reachable from any namespace).

Everything here cleans up after itself: :class:`Netns` is a context manager that kills every
process still in the namespace and deletes it; :class:`Guestnet` stops its process (SIGTERM, then
SIGKILL). The conftest fixtures wrap both so cleanup happens even when a test fails.

Names are unique per test process: ``PREFIX<pid>_<counter>``. Interface names guestnet creates
stay at the default ``eth0``, inside namespaces of their own, so they never collide.

API (kept stable; other test modules build on it):

- ``make_netns(prefix) -> Netns``; ``Netns.name``, ``.path``, ``.run(cmd, **kw)``,
  ``.popen(cmd, **kw)``, ``.pids()``, ``.kill_all()``, ``.delete()``;
  ``with make_netns(...) as ns``.
- ``start_guestnet(sandbox, args, ready=None, timeout=10) -> Guestnet``; ``Guestnet.pid``,
  ``.proc``, ``.stop()``, ``.wait(timeout)``, ``.stderr_text()``, ``.stdout_text()``,
  ``.alive()``.
- ``wait_for(predicate, timeout, what)``: poll a condition, bounded in time.
- ``link_info(ns, ifname)``, ``addresses(ns, ifname)``: the interface as ``ip -j`` reports it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = "/run/netns"
_counter = itertools.count()


def unique_name(prefix: str) -> str:
    """A name unique to this test process: ``PREFIX<pid>_<n>``."""
    return f"{prefix}{os.getpid()}_{next(_counter)}"


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
    step: float = 0.05,
) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class Netns:
    """A named network namespace under /run/netns, made by ``ip netns add``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"{NETNS_DIR}/{name}"
        self.deleted = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run in the namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the namespace; text output captured; raises on failure unless told."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            self.argv(cmd), check=False, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(
                proc.returncode, proc.args, proc.stdout, proc.stderr
            )
        return proc

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in the namespace; :meth:`kill_all` (and deletion) will end it."""
        return subprocess.Popen(self.argv(cmd), **kw)

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_all(self, grace: float = 2.0) -> None:
        """SIGTERM every process in the namespace, then SIGKILL what is left after ``grace``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for p in self.pids() if p != os.getpid()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not self.pids(), grace, "processes to exit")

    def delete(self) -> None:
        """Kill what runs inside and delete the namespace (idempotent)."""
        if self.deleted:
            return
        self.deleted = True
        self.kill_all()
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.delete()


def make_netns(prefix: str = "gn", lo_up: bool = True) -> Netns:
    """A new uniquely named namespace with ``lo`` up. Delete it (``with`` or ``.delete()``)."""
    ns = Netns(unique_name(prefix))
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    try:
        if lo_up:
            ns.run(["ip", "link", "set", "lo", "up"])
    except BaseException:
        ns.delete()
        raise
    return ns


@contextlib.contextmanager
def netns(prefix: str = "gn", lo_up: bool = True) -> Iterator[Netns]:
    """``with netns("x") as ns``: a namespace deleted on the way out, whatever happens."""
    ns = make_netns(prefix, lo_up)
    try:
        yield ns
    finally:
        ns.delete()


def guestnet_argv(args: Sequence[str]) -> list[str]:
    """The interpreter running the tests runs guestnet too: the checkout under test answers."""
    return [sys.executable, "-m", "guestnet", *args]


class Guestnet:
    """A guestnet process running in a sandbox namespace; stderr and stdout go to temp files."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sandbox: Netns,
        args: Sequence[str],
        stdout_path: str,
        stderr_path: str,
    ) -> None:
        self.proc = proc
        self.sandbox = sandbox
        self.args = list(args)
        self._stdout_path = stdout_path
        self._stderr_path = stderr_path
        #: Set by the ``attach_guest`` fixture: the guest namespace and its interface name.
        self.guest: Netns | None = None
        self.ifname = "eth0"

    @property
    def pid(self) -> int:
        """guestnet's own pid (``ip netns exec`` execs it)."""
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def open_fds(self) -> int:
        """How many descriptors guestnet has open (/proc/PID/fd)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status_kb(self, field: str) -> int:
        """A ``kB`` field of guestnet's /proc/PID/status (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for guestnet to exit by itself; its exit status."""
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def stderr_text(self) -> str:
        with open(self._stderr_path, errors="replace") as f:
            return f.read()

    def stdout_text(self) -> str:
        with open(self._stdout_path, errors="replace") as f:
            return f.read()

    def cleanup(self) -> None:
        """Stop the process and remove its output files."""
        self.stop()
        for path in (self._stdout_path, self._stderr_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> Guestnet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()


#: Subcommands that take --pcap (the datapath options).
_CAPTURING = frozenset({"run", "netns", "qemu", "dgram"})


def with_capture(args: Sequence[str]) -> list[str]:
    """``args`` with ``--pcap DIR/test-N.pcap`` when GUESTNET_TEST_PCAP_DIR asks for captures.

    ``bench/fuzz.py record`` sets it to seed the fuzz corpus with what real clients send (the
    first 4 MiB of each run is plenty: bulk transfers repeat themselves); the test's own --pcap,
    if any, wins.
    """
    out = list(args)
    directory = os.environ.get("GUESTNET_TEST_PCAP_DIR")
    if not directory or not out or out[0] not in _CAPTURING or "--pcap" in out:
        return out
    test = os.environ.get("PYTEST_CURRENT_TEST", "guestnet").split(" ")[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", test)[-120:]
    fd, path = tempfile.mkstemp(prefix=stem + "-", suffix=".pcap", dir=directory)
    os.close(fd)
    return [out[0], "--pcap", path, "--pcap-max-bytes", str(4 << 20), *out[1:]]


def start_guestnet(
    sandbox: Netns,
    args: Sequence[str],
    ready: Callable[[], bool] | None = None,
    timeout: float = 10.0,
    **popen_kw: Any,
) -> Guestnet:
    """Start ``guestnet ARGS`` inside ``sandbox``; wait until ``ready()`` (if given) is true.

    Raises RuntimeError (with guestnet's stderr) if it exits first, TimeoutError if it never
    becomes ready; in both cases the process is stopped first.
    """
    args = with_capture(args)
    fd_out, out_path = tempfile.mkstemp(prefix="guestnet-out-", suffix=".txt")
    fd_err, err_path = tempfile.mkstemp(prefix="guestnet-err-", suffix=".txt")
    try:
        proc = sandbox.popen(
            guestnet_argv(args),
            stdin=subprocess.DEVNULL,
            stdout=fd_out,
            stderr=fd_err,
            **popen_kw,
        )
    finally:
        os.close(fd_out)
        os.close(fd_err)
    gn = Guestnet(proc, sandbox, args, out_path, err_path)
    if ready is None:
        return gn

    def ready_or_dead() -> bool:
        return proc.poll() is not None or ready()

    try:
        wait_for(ready_or_dead, timeout, f"guestnet {' '.join(args)} to be ready")
    except BaseException:
        gn.stop()
        raise TimeoutError(
            f"guestnet {' '.join(args)} not ready after {timeout} s; stderr:\n{gn.stderr_text()}"
        ) from None
    if proc.poll() is not None:
        raise RuntimeError(
            f"guestnet {' '.join(args)} exited with {proc.returncode}; stderr:\n{gn.stderr_text()}"
        )
    return gn


# -- what the kernel says about an interface ------------------------------------------------------


def link_info(ns: Netns, ifname: str = "eth0") -> dict[str, Any] | None:
    """``ip -j -d link show dev IFNAME`` in ``ns`` (None when there is no such interface)."""
    proc = ns.run(["ip", "-j", "-d", "link", "show", "dev", ifname], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    info: list[dict[str, Any]] = json.loads(proc.stdout)
    return info[0] if info else None


def addresses(ns: Netns, ifname: str = "eth0") -> list[str]:
    """IPv4 addresses on ``ifname`` in ``ns`` as ``ADDR/PREFIX`` strings."""
    proc = ns.run(["ip", "-j", "-4", "addr", "show", "dev", ifname], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    out: list[str] = []
    for link in json.loads(proc.stdout):
        for a in link.get("addr_info", []):
            out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def is_up(ns: Netns, ifname: str = "eth0") -> bool:
    """True when the interface exists and is administratively up."""
    info = link_info(ns, ifname)
    return info is not None and "UP" in info.get("flags", [])


def neighbour_mac(ns: Netns, addr: str, ifname: str = "eth0") -> str | None:
    """The MAC ``ip neigh`` has for ``addr`` (None if unresolved)."""
    proc = ns.run(["ip", "-j", "neigh", "show", addr, "dev", ifname], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    for entry in json.loads(proc.stdout):
        mac = entry.get("lladdr")
        if mac:
            return str(mac)
    return None


#: A command that makes the kernel resolve ``ADDR`` by ARP: one UDP datagram to port 9 (discard).
def poke_cmd(addr: str) -> list[str]:
    """``python -c`` sending one datagram to ``addr``: the kernel ARPs for it first.

    Used instead of ``ping``: it needs no ping binary and no raw-socket privilege.
    """
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "try:\n s.sendto(b'x',(sys.argv[1],9))\n"
        "except OSError:\n pass\n"
    )
    return [sys.executable, "-c", code, addr]


#: The stand-in for the internet: a namespace joined to the sandbox by a veth, addresses in
#: 198.18.0.0/15 (the benchmarking range) and no route to anything else.
SANDBOX_VETH_IP = "198.18.0.1"
OUTSIDE_IP = "198.18.0.2"
#: The same veth's IPv6 addresses (2001:db8::/32 is the documentation range: routed nowhere).
SANDBOX_VETH_IP6 = "2001:db8:18::1"
OUTSIDE_IP6 = "2001:db8:18::2"


def make_outside(sandbox: Netns) -> Netns:
    """A namespace joined to ``sandbox`` by a veth: 198.18.0.1 (sandbox) - 198.18.0.2 (outside),
    and 2001:db8:18::1 - ::2 (no DAD, so the addresses work at once)."""
    outside = make_netns("gnout")
    try:
        a, b = unique_name("gv")[:15], unique_name("gw")[:15]
        subprocess.run(
            ["ip", "link", "add", a, "netns", sandbox.name, "type", "veth", "peer", "name", b,
             "netns", outside.name],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        sandbox.run(["ip", "addr", "add", f"{SANDBOX_VETH_IP}/24", "dev", a])
        sandbox.run(["ip", "link", "set", a, "up"])
        outside.run(["ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", b])
        sandbox.run(["ip", "-6", "addr", "add", f"{SANDBOX_VETH_IP6}/64", "dev", a, "nodad"])
        outside.run(["ip", "-6", "addr", "add", f"{OUTSIDE_IP6}/64", "dev", b, "nodad"])
        outside.run(["ip", "link", "set", b, "up"])

        def reachable() -> bool:
            probe = sandbox.run(["ping", "-c", "1", "-W", "1", OUTSIDE_IP], check=False)
            return probe.returncode == 0

        wait_for(reachable, 10, "the veth to come up", step=0.2)
    except BaseException:
        outside.delete()
        raise
    return outside


#: dnsmasq (Debian dnsmasq-base), the local upstream DNS server the tests start in a sandbox.
DNSMASQ = "/usr/sbin/dnsmasq"


def dnsmasq_argv(port: int) -> list[str]:
    """dnsmasq authoritative for test.internal (www.test.internal is 198.18.0.10 and
    2001:db8::10), forwarding nowhere, listening on 127.0.0.1:``port`` and [::1]:``port`` of the
    namespace it runs in."""
    return [
        DNSMASQ,
        "--no-resolv",
        "--no-hosts",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--user=root",
        "--local=/test.internal/",
        "--address=/www.test.internal/198.18.0.10",
        "--address=/www.test.internal/2001:db8::10",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--listen-address=::1",
        "--bind-interfaces",
    ]
