"""Least privilege (issue 13, item 3): ``--runas``, ``--sandbox`` and ``--seccomp`` against real
guests, real clients and the kernel's own account of the process (``/proc/PID``).

- A namespace guest served by ``guestnet netns --runas nobody --sandbox --seccomp`` with a
  published port, the control API and a capture still gets a DHCP lease, DNS answers, ping
  (gateway and outside, both families), TCP both ways and UDP through the NAT; ``/proc/PID``
  says uid 65534, only CAP_NET_BIND_SERVICE, seccomp filter mode and a root holding only
  ``etc`` and ``run``; the capture file, opened before the drop, keeps growing.
- Run from the test's own mount namespace (``nsenter --net``, where ``/run/netns`` is shared),
  ``--sandbox`` leaves the caller's mounts under ``/run`` as they are, while a namespace the
  caller adds (and deletes) later shows up (and goes) in guestnet's sandbox too.
- The seccomp allow-list refuses what is outside it (open, getcwd, fork, a thread, exec) with
  EPERM, in the very process that keeps serving a guest; the same probes without the filter
  succeed, so the refusals are the filter's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import (
    DNSMASQ,
    OUTSIDE_IP,
    OUTSIDE_IP6,
    Guestnet,
    Netns,
    dnsmasq_argv,
    guestnet_argv,
    link_info,
    make_netns,
    wait_for,
)
from test_links import GATEWAY_IP, arp_request, check_arp_reply, stream_client, stream_exchange

pytestmark = pytest.mark.root

GATEWAY = "10.0.2.2"
GATEWAY6 = "fd00::2"
DNS_PORT = 15353
CAP_NET_BIND_SERVICE = 1 << 10

#: Echo servers for the outside namespace: TCP and UDP on [::]:PORT (dual-stack), one line of
#: "ready" once both listen; each TCP connection gets its first message back.
ECHO_SERVERS = """
import socket, sys, threading
port = int(sys.argv[1])
t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", port)); t.listen(16)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::", port))
def tcp():
    for _ in range(64):
        c, _a = t.accept(); c.settimeout(5)
        with c:
            c.sendall(b"echo:" + c.recv(100))
def udp():
    for _ in range(64):
        d, a = u.recvfrom(2000); u.sendto(b"echo:" + d, a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait(120)
"""

#: In the guest: TCP and UDP to ADDR:PORT, each printing what came back (or the error).
CLIENT = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
    s = socket.socket(fam, kind); s.settimeout(5)
    try:
        if kind == socket.SOCK_STREAM:
            s.connect((addr, port)); s.sendall(b"tcp"); print(s.recv(100).decode())
        else:
            s.sendto(b"udp", (addr, port)); print(s.recv(100).decode())
    except OSError as e:
        print(type(e).__name__, e.errno)
"""

#: A guest-side server on PORT answering one TCP connection with "from-guest".
GUEST_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, _ = s.accept(); c.sendall(b"from-guest"); c.close()
"""


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of its fields."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test starts; every one is stopped at teardown."""
    started: list[subprocess.Popen[Any]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            _stop(proc)


def _readline(proc: subprocess.Popen[Any], timeout: float = 10.0) -> str:
    """One line of ``proc``'s stdout, bounded in time."""
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("no line from the process")
    line: bytes = proc.stdout.readline()
    return line.decode().strip()


def _add_forward(sandbox: Netns, api: str, host_port: int) -> tuple[int, object]:
    """POST /forwards (tcp HOST_PORT -> guest 8091): the HTTP status and the bound port."""
    body = json.dumps({"proto": "tcp", "host_port": host_port, "guest_port": 8091})
    out = sandbox.run(
        ["curl", "-s", "--unix-socket", api, "-X", "POST", "-d", body, "-w", "\n%{http_code}",
         "http://x/forwards"],
        timeout=10,
    ).stdout.rsplit("\n", 1)  # fmt: skip
    return int(out[1]), json.loads(out[0]).get("host_port")


def _guest_py(ns: Netns, code: str, *args: str) -> list[str]:
    return ns.run([sys.executable, "-c", code, *args], timeout=30).stdout.split()


def test_hardened_guest_keeps_dhcp_dns_ping_tcp_udp_and_published_port(
    attach_guest: Callable[..., Guestnet],
    sandbox: Netns,
    outside: Netns,
    procs: list[subprocess.Popen[Any]],
    tmp_path: Path,
) -> None:
    if (
        shutil.which("busybox") is None
        or not os.path.exists(DNSMASQ)
        or shutil.which("dig") is None
    ):
        pytest.skip("needs busybox, dnsmasq and dig")
    dns = sandbox.popen(dnsmasq_argv(DNS_PORT), stdout=subprocess.DEVNULL)
    procs.append(dns)
    echo = outside.popen([sys.executable, "-c", ECHO_SERVERS, "7777"], stdout=subprocess.PIPE)
    procs.append(echo)
    assert _readline(echo) == "ready"
    os.chmod(tmp_path, 0o755)
    pcap = tmp_path / "cap.pcap"
    api = f"/run/gn-harden-{os.getpid()}.sock"
    gn = attach_guest(
        "--runas", "nobody", "--sandbox", "--seccomp",
        "--dns-upstream", f"127.0.0.1:{DNS_PORT}", "-p", "127.0.0.1:18090:8090",
        "--api-socket", api, "--pcap", str(pcap),
    )  # fmt: skip
    try:
        _exercise_hardened(gn, sandbox, procs, api, pcap)
    finally:
        gn.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(api)  # /run is read-only in the sandbox: guestnet could not remove it


def _exercise_hardened(
    gn: Guestnet, sandbox: Netns, procs: list[subprocess.Popen[Any]], api: str, pcap: Path
) -> None:
    guest = gn.guest
    assert guest is not None
    wait_for(lambda: _status(gn.pid)["Seccomp"] == "2" or not gn.alive(), 10, "the filter")
    assert gn.alive(), gn.stderr_text()
    # What the kernel says about the process serving.
    status = _status(gn.pid)
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == CAP_NET_BIND_SERVICE
    assert int(status["CapBnd"], 16) == CAP_NET_BIND_SERVICE
    assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
    root = sorted(os.listdir(f"/proc/{gn.pid}/root"))
    assert root == ["etc", "run"], root
    size_at_drop = pcap.stat().st_size

    # DHCP: a real client gets a lease (the link is configured already; -n: fail if none).
    busybox = shutil.which("busybox")
    assert busybox is not None
    lease = guest.run(
        [busybox, "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
         "-s", "/bin/true"],
        check=False, timeout=30,
    )  # fmt: skip
    assert lease.returncode == 0, lease.stdout + lease.stderr
    # DNS through the upstream (a socket opened after the drop).
    dig = ["dig", "+short", "+time=2", "+tries=3", "@10.0.2.3", "www.test.internal"]
    assert guest.run(dig, timeout=20).stdout.split() == ["198.18.0.10"]
    # ICMP echo: the gateway (answered inside) and outside (the raw socket opened as root).
    for target in (GATEWAY, OUTSIDE_IP, GATEWAY6, OUTSIDE_IP6):
        ping = guest.run(["ping", "-c", "1", "-W", "3", target], check=False, timeout=10)
        assert ping.returncode == 0, (target, ping.stdout, ping.stderr, gn.stderr_text())
    # TCP and UDP NAT, both families: new host sockets as nobody, under the filter.
    assert _guest_py(guest, CLIENT, OUTSIDE_IP, "7777") == ["echo:tcp", "echo:udp"]
    assert _guest_py(guest, CLIENT, OUTSIDE_IP6, "7777") == ["echo:tcp", "echo:udp"]
    # Host to guest: the published port, bound as root before the drop.
    server = guest.popen([sys.executable, "-c", GUEST_SERVER, "8090"], stdout=subprocess.PIPE)
    procs.append(server)
    assert _readline(server) == "listening"
    fetch = [sys.executable, "-c", "import socket; c = socket.create_connection("
             "('127.0.0.1', 18090), timeout=5); print(c.recv(100).decode())"]  # fmt: skip
    assert sandbox.run(fetch, timeout=20).stdout.strip() == "from-guest"
    # The control API (its socket bound before the drop) answers; a forward added now binds,
    # below 1024 too: CAP_NET_BIND_SERVICE is what --sandbox keeps.
    stats = sandbox.run(["curl", "-sf", "--unix-socket", api, "http://x/stats"], timeout=10)
    assert json.loads(stats.stdout)["links"][0]["frames_in"] > 0
    assert _add_forward(sandbox, api, 81) == (201, 81)
    assert gn.alive()
    # SIGTERM: a clean exit under the filter, the capture (opened before the drop) flushed
    # with everything above in it.
    assert gn.stop() == 0, gn.stderr_text()
    assert pcap.stat().st_size > size_at_drop + 20 * 64


def _run_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points under /run in a mount namespace, as its own root sees them."""
    with open(mountinfo) as f:
        return sorted(p for p in (line.split()[4] for line in f) if p.startswith("/run/"))


def test_sandbox_leaves_the_callers_run_mounts_and_follows_new_ones(
    sandbox: Netns, guest_ns: Netns, procs: list[subprocess.Popen[Any]]
) -> None:
    """guestnet started in the test's own mount namespace (``nsenter --net``: ``/run/netns`` is
    a shared mount here, so a careless sandbox would unmount the caller's namespaces). Other
    jobs add and delete namespaces on this machine meanwhile: only our own mounts are counted."""
    ours = ["/run/netns", *(f"/run/netns/{ns.name}" for ns in (sandbox, guest_ns))]
    assert set(ours) <= set(_run_mounts())
    gn = subprocess.Popen(
        ["nsenter", f"--net={sandbox.path}",
         *guestnet_argv(["netns", guest_ns.path, "--configure", "--sandbox"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    procs.append(gn)
    pid = gn.pid
    wait_for(
        lambda: gn.poll() is not None or sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"],
        15,
        "the sandbox",
    )
    assert gn.poll() is None, gn.stderr.read() if gn.stderr else ""
    # The caller's mounts under /run: all there, and visible inside the sandbox too.
    assert set(ours) <= set(_run_mounts())
    assert set(ours) <= set(_run_mounts(f"/proc/{pid}/mountinfo"))
    # A namespace the caller adds later appears inside (slave propagation), and goes when the
    # caller deletes it: guestnet's copy of /run does not pin it, nor refuse the unlink.
    late = make_netns("gnlate")
    where = f"/run/netns/{late.name}"
    try:
        wait_for(lambda: where in _run_mounts(f"/proc/{pid}/mountinfo"), 5, "propagation in")
    finally:
        late.delete()
    assert not os.path.exists(where)
    wait_for(lambda: where not in _run_mounts(f"/proc/{pid}/mountinfo"), 5, "propagation out")
    assert link_info(guest_ns, "eth0") is not None
    gn.terminate()
    assert gn.wait(10) == 0
    assert set(ours) <= set(_run_mounts())
    assert where not in _run_mounts()


#: The library face, hardened with the seccomp filter only (or not at all), serving a guest
#: namespace; it then tries calls outside the allow-list, prints the errno of each (0: it
#: worked) as one JSON line, and serves until SIGTERM.
SECCOMP_PROBE = """
import json, os, sys, threading
from guestnet.config import Config
from guestnet.io.harden import Hardening
from guestnet.network import Network

net = Network(Config())
net.attach_netns(sys.argv[1], configure=True)
net.loop.install_signal_handlers()
filtered = sys.argv[2] == "seccomp"
if filtered:
    net.harden(Hardening(seccomp=True))
else:
    net.start_services()

def attempt(fn):
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno
    except RuntimeError as exc:  # "can't start new thread"
        return str(exc)

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

results = {
    "open": attempt(lambda: os.close(os.open("/etc/hostname", os.O_RDONLY))),
    "getcwd": attempt(os.getcwd),
    "fork": attempt(fork),
    "thread": attempt(lambda: threading.Thread(target=lambda: None).start()),
}
if filtered:  # without the filter this would replace the process
    results["execve"] = attempt(lambda: os.execv("/bin/true", ["true"]))
print(json.dumps(results), flush=True)
net.run()
net.close()
"""


@pytest.mark.parametrize("mode", ["seccomp", "none"])
def test_seccomp_refuses_calls_outside_the_list_while_serving(
    sandbox: Netns, guest_ns: Netns, procs: list[subprocess.Popen[Any]], mode: str
) -> None:
    host = sandbox.popen(
        [sys.executable, "-c", GUEST_SERVER.replace("0.0.0.0", "127.0.0.1"), "18095"],
        stdout=subprocess.PIPE,
    )
    procs.append(host)
    assert _readline(host) == "listening"
    probe = sandbox.popen(
        [sys.executable, "-c", SECCOMP_PROBE, guest_ns.path, mode], stdout=subprocess.PIPE
    )
    procs.append(probe)
    results = json.loads(_readline(probe, timeout=20))
    if mode == "seccomp":
        assert _status(probe.pid)["Seccomp"] == "2"
        assert results["open"] == results["getcwd"] == results["fork"] == errno.EPERM
        assert results["execve"] == errno.EPERM
        assert "can't start new thread" in results["thread"]
    else:
        assert _status(probe.pid)["Seccomp"] == "0"
        assert results == {"open": 0, "getcwd": 0, "fork": 0, "thread": 0}
    # Meanwhile the datapath serves: ping the gateway, TCP to the host through the NAT.
    ping = guest_ns.run(["ping", "-c", "1", "-W", "3", GATEWAY], check=False, timeout=10)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    fetch = [sys.executable, "-c", "import socket; c = socket.create_connection("
             f"('{GATEWAY}', 18095), timeout=5); print(c.recv(100).decode())"]  # fmt: skip
    assert guest_ns.run(fetch, timeout=20).stdout.strip() == "from-guest"
    probe.terminate()
    assert probe.wait(10) == 0


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_qemu_stream_served_hardened_as_root_and_rootless(
    sandbox: Netns, procs: list[subprocess.Popen[Any]], user: str
) -> None:
    """``qemu --socket``: connections accepted after the drop are served. Root drops to nobody;
    started as nobody, the sandbox is made in a user namespace guestnet makes for itself."""
    with tempfile.TemporaryDirectory(prefix="gnh-", dir="/tmp") as where:
        os.chmod(where, 0o777)  # nobody binds its socket here
        _qemu_hardened(sandbox, procs, user, Path(where) / "q.sock")


def _qemu_hardened(
    sandbox: Netns, procs: list[subprocess.Popen[Any]], user: str, path: Path
) -> None:
    args = ["qemu", "--socket", str(path), "--sandbox", "--seccomp"]
    prefix: list[str] = []
    if user == "root":
        args += ["--runas", "nobody"]
    else:
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    gn = sandbox.popen([*prefix, *guestnet_argv(args)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)  # fmt: skip
    procs.append(gn)
    wait_for(
        lambda: gn.poll() is not None or (path.exists() and _status(gn.pid)["Seccomp"] == "2"),
        15,
        "the filter",
    )
    assert gn.poll() is None, gn.stderr.read() if gn.stderr else ""
    assert sorted(os.listdir(f"/proc/{gn.pid}/root")) == ["etc", "run"]
    status = _status(gn.pid)
    assert status["Uid"].split()[0] == "65534"
    # Root: CAP_NET_BIND_SERVICE in the initial namespace; rootless: the same bit, in its own.
    assert int(status["CapEff"], 16) == CAP_NET_BIND_SERVICE
    for _ in range(2):  # two connections, both accepted under the filter
        with stream_client(path) as sock:
            check_arp_reply(stream_exchange(sock, arp_request(GATEWAY_IP)), GATEWAY_IP)
    gn.terminate()
    assert gn.wait(10) == 0


def test_run_with_sandbox_and_seccomp_passes_the_exit_status(sandbox: Netns) -> None:
    """``run``: the command (forked before the drop) is served, signalled and reaped."""
    cmd = ["run", "--sandbox", "--seccomp", "--", "sh", "-c",
           f"ping -c 1 -W 3 {GATEWAY} >/dev/null && exit 7"]  # fmt: skip
    proc = sandbox.run(guestnet_argv(cmd), check=False, timeout=60)
    assert proc.returncode == 7, proc.stderr


def test_runas_alone_keeps_no_capability(
    attach_guest: Callable[..., Guestnet], sandbox: Netns
) -> None:
    """``--runas`` without ``--sandbox``: an ordinary user (passt's way), so a port below 1024
    can no longer be bound, one above still can; the filesystem is not hidden."""
    api = f"/run/gn-runas-{os.getpid()}.sock"
    gn = attach_guest("--runas", "nobody", "--api-socket", api)
    try:
        wait_for(lambda: _status(gn.pid)["Uid"].startswith("65534"), 10, "the drop")
        status = _status(gn.pid)
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
        assert status["Seccomp"] == "0"
        assert "usr" in os.listdir(f"/proc/{gn.pid}/root")
        assert _add_forward(sandbox, api, 82)[0] >= 400
        assert _add_forward(sandbox, api, 18092) == (201, 18092)
    finally:
        gn.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(api)
