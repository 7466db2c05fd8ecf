"""slirp4netns mode, run the way podman and rootlesskit run it (COMPAT.md has the argv), against
namespaces the tests make; guestnet runs in the loopback-only sandbox.

- podman 4.3.1's argv (path mode, ``-c``, ready and exit pipes): the TAP comes up configured as
  slirp4netns configures it, ``1`` arrives on the ready pipe, closing the exit pipe ends guestnet;
  ``--disable-host-loopback`` makes a connect to the gateway fail at once with ENETUNREACH while
  ping to the gateway works.
- rootlesskit 1.1.0's argv (PID mode, no ``-c``, a ``tap0`` that rootlesskit already made and
  configured, the API socket): the TAP is served as it is; ports published through the API socket
  (a client speaking the protocol) reach a server in the guest and show in guestnet's own control
  API; SIGKILL leaves no process behind.
- the program name (a ``slirp4netns`` symlink) with ``--disable-dns``: nothing answers on 10.0.2.3.
- ``--outbound-addr``: the host's servers see the NAT's sockets come from that address.
- rootless PID mode: an unprivileged user's ``unshare -Urn`` process, served by guestnet run as
  that user (it joins the user namespace first).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import Netns, addresses, link_info, wait_for

pytestmark = pytest.mark.root

SCRIPT = Path(sys.executable).parent / "guestnet-slirp4netns"
GUEST_IP = "10.0.2.100"
GATEWAY = "10.0.2.2"


class Helper:
    """A guestnet-slirp4netns process in the sandbox, its ready/exit pipes and output files."""

    def __init__(self, sandbox: Netns, argv: list[str], fds: tuple[int, ...], env: Any) -> None:
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = sandbox.popen(
            argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out, env=env
        )

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


@pytest.fixture
def helpers(sandbox: Netns) -> Iterator[Any]:
    """Factory ``start(args, fds=(), env=None, program=None, prefix=())``: the helper (or
    ``program``, a link to guestnet), after ``prefix`` (setpriv...); all killed at teardown."""
    started: list[Helper] = []

    def start(
        args: list[str],
        fds: tuple[int, ...] = (),
        env: Any = None,
        program: str | None = None,
        prefix: tuple[str, ...] | list[str] = (),
    ) -> Helper:
        if not SCRIPT.exists():
            pytest.skip("guestnet-slirp4netns is not installed (pip install -e .)")
        helper = Helper(sandbox, [*prefix, program or str(SCRIPT), *args], fds, env)
        started.append(helper)
        return helper

    try:
        yield start
    finally:
        for helper in started:
            helper.stop()


def _wait_ready(helper: Helper, ready_r: int, timeout: float = 15.0) -> bytes:
    """What guestnet writes on the ready pipe before closing it (bounded in time)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([ready_r], [], [], 0.2)
        if r:
            chunk = os.read(ready_r, 16)
            if not chunk:
                return data
            data += chunk
        elif helper.proc.poll() is not None:
            break
    raise AssertionError(f"not ready (got {data!r}); output:\n{helper.output()}")


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of its fields."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _guest_py(ns: Netns, code: str, *args: str, timeout: float = 20) -> str:
    return ns.run([sys.executable, "-c", code, *args], timeout=timeout).stdout.strip()


CONNECT = """
import socket, sys, time
s = socket.socket()
s.settimeout(5)
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", s.recv(100).decode())
except OSError as e:
    print(type(e).__name__, e.errno, round(time.monotonic() - t, 3))
"""


def test_podman_argv_configure_ready_exit_and_no_host_loopback(
    sandbox: Netns, guest_ns: Netns, helpers: Any
) -> None:
    server = sandbox.popen(
        [sys.executable, "-c", SERVE_ONCE, "127.0.0.1", "18081", "host-side"],
        stdout=subprocess.PIPE,
    )
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    try:
        # podman 4.3.1, rootful: --network slirp4netns (literal argv but for the fd numbers).
        helper = helpers(
            ["--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
             "--enable-ipv6", "-c", "-e", str(exit_r), "-r", str(ready_w),
             "--netns-type=path", guest_ns.path, "tap0"],
            fds=(exit_r, ready_w),
        )  # fmt: skip
        os.close(ready_w)
        os.close(exit_r)
        ready_w = exit_r = -1
        assert _wait_ready(helper, ready_r) == b"1"
        info = link_info(guest_ns, "tap0")
        assert info is not None and "UP" in info["flags"] and info["mtu"] == 65520
        assert addresses(guest_ns, "tap0") == [f"{GUEST_IP}/24"]
        route = guest_ns.run(["ip", "-4", "route", "show", "default"]).stdout
        assert f"default via {GATEWAY} dev tap0" in route
        # --disable-host-loopback: at once "Network is unreachable", from an ICMP answer.
        out = _guest_py(guest_ns, CONNECT, GATEWAY, "18081").split()
        assert out[:2] == ["OSError", str(errno.ENETUNREACH)], out
        assert float(out[2]) < 2.0
        ping = guest_ns.run(["ping", "-c", "1", "-W", "3", GATEWAY], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # --enable-ipv6 (podman passes it): IPv6 through the gateway too.
        ping6 = guest_ns.run(["ping", "-6", "-c", "1", "-W", "3", "fd00::2"], check=False)
        assert ping6.returncode == 0, ping6.stdout + ping6.stderr
        # --enable-sandbox and --enable-seccomp (podman passes both): in place before "ready".
        root = sorted(os.listdir(f"/proc/{helper.proc.pid}/root"))
        assert root == ["etc", "run"], root
        status = _status(helper.proc.pid)
        assert status["CapEff"] == status["CapPrm"] == f"{1 << 10:016x}"  # NET_BIND_SERVICE
        assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1")
        assert "not available" not in helper.output()
        # Closing the exit pipe (POLLHUP) ends guestnet, with status 0; the TAP goes with it.
        os.close(exit_w)
        exit_w = -1
        assert helper.proc.wait(10) == 0
        wait_for(lambda: link_info(guest_ns, "tap0") is None, 5, "tap0 to go away")
    finally:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            if fd >= 0:
                os.close(fd)
        server.kill()
        server.wait(5)


SERVE_ONCE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("listening", flush=True)
s.settimeout(30)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[3].encode())
    c.close()
"""


def _slirp_api(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request as podman and rootlesskit send it: JSON, newline, half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(json.dumps(request).encode() + b"\n")
        c.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    assert not data.endswith(b"\n")
    answer: dict[str, Any] = json.loads(data)
    return answer


def _fetch(ns: Netns, port: int) -> str:
    code = (
        "import socket,sys\n"
        "try:\n"
        " c=socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=5)\n"
        " print(c.recv(100).decode() or 'eof')\n"
        "except OSError as e:\n"
        " print(type(e).__name__)\n"
    )
    return ns.run([sys.executable, "-c", code, str(port)]).stdout.strip()


def test_rootlesskit_argv_existing_tap_and_api_socket(
    sandbox: Netns, guest_ns: Netns, helpers: Any, tmp_path: Path
) -> None:
    # What rootlesskit's child does before starting the helper: tap0, configured.
    g = guest_ns
    g.run(["ip", "tuntap", "add", "name", "tap0", "mode", "tap"])
    g.run(["ip", "link", "set", "tap0", "mtu", "65520"])
    g.run(["ip", "addr", "add", f"{GUEST_IP}/24", "dev", "tap0"])
    g.run(["ip", "link", "set", "tap0", "up"])
    g.run(["ip", "route", "add", "default", "via", GATEWAY, "dev", "tap0"])
    mac_before = link_info(g, "tap0")["address"]  # type: ignore[index]
    target = g.popen(["sleep", "60"])  # the PID rootlesskit names
    web = g.popen([sys.executable, "-c", SERVE_ONCE, GUEST_IP, "80", "from-guest"],
                  stdout=subprocess.PIPE)  # fmt: skip
    api = str(tmp_path / ".s4nn.sock")
    control = str(tmp_path / "guestnet.sock")
    ready_r, ready_w = os.pipe()
    try:
        env = dict(os.environ, GUESTNET_API_SOCKET=control)
        helper = helpers(
            ["--mtu", "65520", "-r", str(ready_w), "--disable-host-loopback",
             "--api-socket", api, str(target.pid), "tap0"],
            fds=(ready_w,),
            env=env,
        )  # fmt: skip
        os.close(ready_w)
        ready_w = -1
        assert _wait_ready(helper, ready_r) == b"1"
        assert os.path.exists(api) and os.path.exists(control)  # bound before "ready"
        info = link_info(g, "tap0")
        assert info is not None and info["address"] == mac_before and info["mtu"] == 65520
        assert addresses(g, "tap0") == [f"{GUEST_IP}/24"]
        assert web.stdout is not None and web.stdout.readline().strip() == b"listening"

        # rootlesskit's port driver: add, list, then rootlessctl remove-ports.
        port = _free_port(sandbox)
        add = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
               "host_port": port, "guest_addr": GUEST_IP, "guest_port": 80}}  # fmt: skip
        assert _slirp_api(api, add) == {"return": {"id": 1}}
        assert _fetch(sandbox, port) == "from-guest"
        assert _slirp_api(api, {"execute": "list_hostfwd"}) == {
            "entries": [{"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
                         "guest_addr": GUEST_IP, "guest_port": 80}]
        }  # fmt: skip
        assert _slirp_api(api, add) == {
            "error": {"desc": "bad request: add_hostfwd: slirp_add_hostfwd failed"}
        }
        # guestnet's own control API sees the same forward.
        ls = sandbox.run(
            [sys.executable, "-m", "guestnet", "forward", "ls", "--api-socket", control, "--json"]
        )
        (fwd,) = json.loads(ls.stdout)
        assert (fwd["id"], fwd["host_port"], fwd["guest_ip"], fwd["guest_port"]) == (
            "1", port, GUEST_IP, 80
        )  # fmt: skip
        assert _slirp_api(api, {"execute": "remove_hostfwd", "arguments": {"id": 1}}) == {
            "return": {}
        }
        assert _fetch(sandbox, port) == "ConnectionRefusedError"
        # rootlesskit ends its helper with SIGKILL: nothing of guestnet stays behind.
        helper.proc.send_signal(signal.SIGKILL)
        helper.proc.wait(5)
        wait_for(lambda: not sandbox.pids(), 5, "no process left in the sandbox")
    finally:
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        for proc in (target, web):
            proc.kill()
            proc.wait(5)


def _free_port(ns: Netns) -> int:
    code = "import socket\ns=socket.socket()\ns.bind(('127.0.0.1',0))\nprint(s.getsockname()[1])"
    return int(ns.run([sys.executable, "-c", code]).stdout)


DNS_QUERY = """
import socket, sys
q = bytes.fromhex("123401000001000000000000")
q += b"\\x07example\\x03com\\x00" + b"\\x00\\x01\\x00\\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.5)
s.sendto(q, (sys.argv[1], 53))
try:
    print("answer", len(s.recv(2048)))
except OSError as e:
    print(type(e).__name__)
"""


def test_program_name_disable_dns_and_sigterm(
    sandbox: Netns, guest_ns: Netns, helpers: Any, tmp_path: Path
) -> None:
    link = tmp_path / "slirp4netns"
    link.symlink_to(Path(sys.executable).parent / "guestnet")
    control = str(tmp_path / "gn.sock")
    helper = helpers(
        ["-c", "--disable-dns", "--guestnet-api-socket", control, "--netns-type=path",
         guest_ns.path, "tap0"],
        program=str(link),
    )  # fmt: skip
    wait_for(lambda: os.path.exists(control) or helper.proc.poll() is not None, 15, "start")
    wait_for(lambda: bool(addresses(guest_ns, "tap0")), 5, "tap0 configured")
    assert _guest_py(guest_ns, DNS_QUERY, "10.0.2.3") == "TimeoutError"
    stats = sandbox.run(
        [sys.executable, "-m", "guestnet", "stats", "--api-socket", control, "--json"]
    )
    assert json.loads(stats.stdout)["drops"].get("dns.unavailable", 0) >= 1
    assert "Starting slirp" in helper.output()
    helper.proc.send_signal(signal.SIGTERM)
    assert helper.proc.wait(10) == 0
    assert not os.path.exists(control)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: link_info(guest_ns, "tap0") is None, 5, "tap0 to go away")
    assert link_info(guest_ns, "tap0") is None


PEER_SERVERS = """
import socket, sys, threading
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", int(sys.argv[1])))
t.listen(4)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", int(sys.argv[1])))
def udp():
    while True:
        data, peer = u.recvfrom(100)
        u.sendto(peer[0].encode(), peer)
threading.Thread(target=udp, daemon=True).start()
print("listening", flush=True)
while True:
    c, peer = t.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

ASK_PEER = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("tcp", c.recv(100).decode())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"?", (sys.argv[1], int(sys.argv[2])))
print("udp", u.recv(100).decode())
"""


def test_outbound_addr_binds_nat_sockets(sandbox: Netns, guest_ns: Netns, helpers: Any) -> None:
    """--outbound-addr: the host's servers see the NAT's TCP and UDP sockets come from it."""
    servers = sandbox.popen([sys.executable, "-c", PEER_SERVERS, "18085"], stdout=subprocess.PIPE)
    try:
        assert servers.stdout is not None and servers.stdout.readline().strip() == b"listening"
        # Also: joining a user namespace we are in already fails (EINVAL), and is ignored.
        helper = helpers(
            ["-c", "--outbound-addr=127.0.0.5", "--userns-path=/proc/self/ns/user",
             "--netns-type=path", guest_ns.path, "tap0"]
        )  # fmt: skip
        wait_for(lambda: bool(addresses(guest_ns, "tap0")), 15, "tap0 configured")
        wait_for(lambda: "default" in guest_ns.run(["ip", "route"]).stdout, 5, "the default route")
        out = _guest_py(guest_ns, ASK_PEER, GATEWAY, "18085").splitlines()
        assert out == ["tcp 127.0.0.5", "udp 127.0.0.5"], helper.output()
        assert "* Outbound IPv4:    127.0.0.5" in helper.output()
    finally:
        servers.kill()
        servers.wait(5)


@pytest.mark.parametrize("hardening", [[], ["--enable-sandbox", "--enable-seccomp", "--mtu=65520"]])
def test_rootless_pid_mode_joins_the_user_namespace(
    sandbox: Netns, helpers: Any, tmp_path: Path, hardening: list[str]
) -> None:
    """Rootless, as podman runs it for a user: an unprivileged user's ``unshare -Urn`` process
    is the target; guestnet-slirp4netns, run as that user, joins its user namespace first.
    With podman's ``--enable-sandbox --enable-seccomp --mtu=65520`` the sandbox is made in that
    user namespace too (as slirp4netns makes it; the process must not have become threaded), and
    the NAT still works."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    target = sandbox.popen([*nobody, "unshare", "-Urn", "sleep", "60"])
    server = sandbox.popen(
        [sys.executable, "-c", SERVE_ONCE, "127.0.0.1", "18086", "via-gateway"],
        stdout=subprocess.PIPE,
    )
    try:
        ours = os.readlink("/proc/self/ns/user")
        wait_for(lambda: os.readlink(f"/proc/{target.pid}/ns/user") != ours, 5, "unshare")
        assert server.stdout is not None and server.stdout.readline().strip() == b"listening"
        helper = helpers(
            ["-c", "--mtu", "1500", *hardening, str(target.pid), "tap0"], prefix=nobody
        )
        guest = ["nsenter", "-t", str(target.pid), "-n"]

        def configured() -> bool:
            show = subprocess.run([*guest, "ip", "-4", "addr", "show", "tap0"],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            return f"{GUEST_IP}/24" in show.stdout

        wait_for(configured, 15, "tap0 configured in the user's namespace")
        out = subprocess.run(
            [*guest, sys.executable, "-c", CONNECT, GATEWAY, "18086"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout.split()  # fmt: skip
        assert out == ["connected", "via-gateway"], helper.output()
        if hardening:
            pid = helper.proc.pid
            assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"]
            status = _status(pid)
            assert status["Uid"].split()[0] == "65534"
            assert status["Seccomp"] == "2"
            assert status["CapEff"] == f"{1 << 10:016x}"
    finally:
        for proc in (target, server):
            proc.kill()
            proc.wait(5)
