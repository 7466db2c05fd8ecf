"""pasta mode, run with the argv podman 5.x and rootlesskit 2.x build (COMPAT.md), against
namespaces the tests make; guestnet runs in the loopback-only sandbox.

- podman 5.3+'s argv (``--netns PATH``, ``--config-net``, ``-t 8080-8080:80-80``,
  ``--dns-forward 169.254.1.1``, ``--quiet``), run to completion as podman runs it, reading
  stdout and stderr to their end: the parent exits 0 with the namespace configured and no
  process holds the pipes; the published port reaches a server in the namespace, DNS is
  answered on 169.254.1.1; deleting the namespace ends the daemon.
- rootlesskit 2.x's argv (PID, ``--ns-ifname=tap0``, ``--address/--netmask/--gateway``,
  ``--no-map-gw``, ``--ipv4-only``), through a ``pasta`` symlink: the interface as asked,
  the gateway pings but does not stand for the host; the target's exit ends the daemon.
- failures (no such namespace; a published port already taken) exit non-zero with the reason
  and leave no process and no interface behind.
- pasta COMMAND: runs it in new namespaces, in the foreground, and exits with its status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nsutil import Netns, addresses, link_info, wait_for

pytestmark = pytest.mark.root

BIN = Path(sys.executable).parent
PASTA = BIN / "guestnet-pasta"
GATEWAY = "10.0.2.2"
#: Run to completion: bounded, and long past what a healthy start takes (about a second).
RUN_TIMEOUT_S = 30


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path.name} is not installed (pip install -e .)")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def _daemon_killed(pid_file: Path) -> Iterator[None]:
    """Whatever happens, the daemon named by ``pid_file`` is gone afterwards."""
    try:
        yield
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _dns_query(name: str) -> bytes:
    header = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\x00\x00\x01\x00\x01"


ASK_DNS = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 53))
print(s.recv(512).hex())
"""

SERVE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
print("listening", flush=True)
s.settimeout(20)
c, peer = s.accept()
c.sendall(b"from-namespace")
c.close()
"""


def test_podman5_argv_daemon_forward_dns_and_netns_removal(
    sandbox: Netns, guest_ns: Netns, tmp_path: Path
) -> None:
    _need(PASTA)
    pid_file = tmp_path / "pasta.pid"
    web = guest_ns.popen([sys.executable, "-c", SERVE, "80"], stdout=subprocess.PIPE)
    try:
        with _daemon_killed(pid_file):
            # podman 5.3+ for `-p 8080:80` (its literal argv), plus -P to find the daemon.
            done = sandbox.run(
                [str(PASTA), "--config-net", "-t", "8080-8080:80-80",
                 "--dns-forward", "169.254.1.1", "-u", "none", "-T", "none", "-U", "none",
                 "--no-map-gw", "--quiet", "--netns", guest_ns.path,
                 "--map-guest-addr", "169.254.1.2", "-P", str(pid_file)],
                check=False, timeout=RUN_TIMEOUT_S,
            )  # fmt: skip
            # subprocess.run read stdout and stderr to their end: nobody holds them now.
            assert done.returncode == 0, done.stderr
            assert done.stdout == "" and done.stderr == ""  # --quiet
            daemon = int(pid_file.read_text())
            assert _alive(daemon)
            assert os.getsid(daemon) == daemon  # a session of its own
            fds = [os.readlink(f"/proc/{daemon}/fd/{n}") for n in (0, 1, 2)]
            assert fds == ["/dev/null"] * 3, fds

            # Configured before the parent exited.
            assert addresses(guest_ns, "eth0") == ["10.0.2.15/24"]
            route = guest_ns.run(["ip", "-4", "route", "show", "default"]).stdout
            assert f"default via {GATEWAY} dev eth0" in route

            # -t 8080-8080:80-80: the host's 8080 reaches the namespace's 80.
            assert web.stdout is not None and web.stdout.readline().strip() == b"listening"
            got = sandbox.run(
                [sys.executable, "-c",
                 "import socket; c = socket.create_connection(('127.0.0.1', 8080), timeout=5);"
                 "print(c.recv(100).decode())"],
            ).stdout.strip()  # fmt: skip
            assert got == "from-namespace"

            # --dns-forward 169.254.1.1: guestnet answers there (its built-in host name).
            answer = bytes.fromhex(
                guest_ns.run(
                    [sys.executable, "-c", ASK_DNS, "169.254.1.1",
                     _dns_query("host.guestnet.internal").hex()]
                ).stdout.strip()
            )  # fmt: skip
            assert answer[:2] == b"\x42\x42" and answer[3] & 0x0F == 0  # NOERROR
            assert socket.inet_aton(GATEWAY) in answer

            # The namespace goes away (podman unmounts and removes the file): so does the daemon.
            guest_ns.delete()
            wait_for(lambda: not _alive(daemon), 10, "the daemon to exit")
    finally:
        web.kill()
        web.wait(5)


def test_rootlesskit2_argv_via_program_name_and_target_exit(
    sandbox: Netns, guest_ns: Netns, tmp_path: Path
) -> None:
    guestnet = BIN / "guestnet"
    _need(guestnet)
    link = tmp_path / "pasta"
    link.symlink_to(guestnet)
    pid_file = tmp_path / "pasta.pid"
    target = guest_ns.popen(["sleep", "60"])  # the child rootlesskit names by PID
    server = sandbox.popen([sys.executable, "-c", SERVE, "18082"], stdout=subprocess.PIPE)
    try:
        with _daemon_killed(pid_file):
            done = sandbox.run(
                [str(link), "--stderr", "--ns-ifname=tap0", "--mtu=65520", "--config-net",
                 "--address=10.0.2.100", "--netmask=24", "--gateway=10.0.2.2",
                 "--dns-forward=10.0.2.3", "--no-map-gw", "--ipv4-only", "--tcp-ports=none",
                 "--udp-ports=none", "-P", str(pid_file), str(target.pid)],
                check=False, timeout=RUN_TIMEOUT_S,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "tap0" in done.stderr and "10.0.2.100/24" in done.stderr  # not --quiet
            daemon = int(pid_file.read_text())
            info = link_info(guest_ns, "tap0")
            assert info is not None and "UP" in info["flags"] and info["mtu"] == 65520
            assert addresses(guest_ns, "tap0") == ["10.0.2.100/24"]
            # --ipv4-only: no IPv6 address configured.
            six = guest_ns.run(["ip", "-6", "addr", "show", "dev", "tap0", "scope", "global"])
            assert six.stdout.strip() == ""
            ping = guest_ns.run(["ping", "-c", "1", "-W", "3", GATEWAY], check=False)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            # --no-map-gw: the gateway is not the host's loopback (a server listens there).
            assert server.stdout is not None and server.stdout.readline().strip() == b"listening"
            refused = guest_ns.run(
                [sys.executable, "-c",
                 "import socket\ntry:\n socket.create_connection(('10.0.2.2', 18082), timeout=5)"
                 "\n print('connected')\nexcept OSError as e:\n print(type(e).__name__)"],
            ).stdout.strip()  # fmt: skip
            assert refused != "connected"
            # The target exits (rootlesskit's child is gone): the daemon follows.
            target.kill()
            target.wait(5)
            wait_for(lambda: not _alive(daemon), 10, "the daemon to exit")
    finally:
        for proc in (target, server):
            proc.kill()
            proc.wait(5)


def test_failures_leave_nothing_behind(sandbox: Netns, guest_ns: Netns) -> None:
    _need(PASTA)
    missing = sandbox.run(
        [sys.executable, "-m", "guestnet", "pasta", "--config-net", "--netns", "/run/netns/nope"],
        check=False,
        timeout=RUN_TIMEOUT_S,
    )
    assert missing.returncode == 1
    assert "no such network namespace" in missing.stderr
    assert missing.stderr.count("\n") == 1
    # A published port already taken: the daemon reports it through the parent and exits.
    busy = sandbox.popen(
        [sys.executable, "-c",
         "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 8090)); s.listen();"
         "print('bound', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == b"bound"
        taken = sandbox.run(
            [str(PASTA), "--config-net", "-q", "-4", "-t", "8090", "--netns", guest_ns.path],
            check=False,
            timeout=RUN_TIMEOUT_S,
        )
        assert taken.returncode == 1
        assert "8090" in taken.stderr
        # Nothing left: no guestnet in the sandbox, no interface in the namespace.
        assert sandbox.pids() == [busy.pid]
        wait_for(lambda: link_info(guest_ns, "eth0") is None, 5, "eth0 to go away")
    finally:
        busy.kill()
        busy.wait(5)


def test_command_mode_runs_in_the_foreground(sandbox: Netns) -> None:
    _need(PASTA)
    done = sandbox.run(
        [str(PASTA), "--config-net", "-q", "-a", "192.168.50.7", "-n", "24",
         "sh", "-c", "ip -4 -o addr show eth0; exit 3"],
        check=False, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "192.168.50.7/24" in done.stdout
    assert sandbox.pids() == []


def test_foreground_serves_until_sigterm(sandbox: Netns, guest_ns: Netns) -> None:
    _need(PASTA)
    proc = sandbox.popen(
        [str(PASTA), "-f", "--config-net", "-4", "-I", "fg0", "--netns", guest_ns.path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: addresses(guest_ns, "fg0") == ["10.0.2.15/24"], 10, "fg0 configured")
        assert proc.poll() is None  # -f: no fork, the process we started serves
        ping = guest_ns.run(["ping", "-c", "1", "-W", "3", GATEWAY], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        wait_for(lambda: link_info(guest_ns, "fg0") is None, 5, "fg0 to go away")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        assert proc.stderr is not None
        proc.stderr.close()
