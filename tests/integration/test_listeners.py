"""Listeners out of descriptors (issue 9, defect c): guestnet under a small RLIMIT_NOFILE.

The QEMU stream socket, a published TCP port and the control API socket each accept through the
one listener helper. With every descriptor in use, a pending connection must not make guestnet
spin (it used to: a level-triggered listener failing accept() with EMFILE, for ever, at 100 %
CPU), and once a descriptor is freed (a QEMU client goes away) the pending connection is served.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import Netns, wait_for

from guestnet.io.netns import setns

pytestmark = pytest.mark.root

#: guestnet's descriptor limit in these tests: start-up needs about twenty.
NOFILE = 48
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def _in_netns(ns: Netns) -> Iterator[None]:
    """Make sockets in ``ns`` (they stay there when we step back out)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(ns.path, os.O_RDONLY)
    try:
        setns(target)
        yield
    finally:
        setns(home)
        os.close(home)
        os.close(target)


def _qemu_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    s.connect(path)
    return s


def _arp_round_trip(sock: socket.socket, frames: Any) -> bytes:
    """Send an ARP request for the gateway; the (length-prefixed) reply."""
    request = frames.arp()
    sock.sendall(struct.pack("!I", len(request)) + request)
    head = sock.recv(4)
    (n,) = struct.unpack("!I", head)
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.mark.parametrize("kind", ["qemu", "forward", "api"])
def test_listener_pauses_without_descriptors_and_resumes(
    sandbox: Netns, start_gn: Any, tmp_path: Path, frames: Any, kind: str
) -> None:
    qemu_path = str(tmp_path / "q.sock")
    api_path = str(tmp_path / "api.sock")
    with socket.socket() as probe:  # a free port number (the sandbox has its own ports)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gn = start_gn(
        ["qemu", "--socket", qemu_path, "--api-socket", api_path, "-p", f"{port}:80"],
        ready=lambda: os.path.exists(api_path),
        preexec_fn=_limit,
    )
    clients: list[socket.socket] = []
    try:
        # Eat guestnet's descriptors with QEMU connections until one is left in the backlog.
        qemu_pending = None
        for _ in range(NOFILE):
            before = _fd_count(gn.pid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(2.0)
            c.connect(qemu_path)
            try:
                wait_for(lambda b=before: _fd_count(gn.pid) > b, 1.0, "an accept")
            except TimeoutError:
                qemu_pending = c  # not accepted: guestnet is out of descriptors
                break
            clients.append(c)
        assert qemu_pending is not None, "guestnet never ran out of descriptors"
        assert gn.alive()
        # The connection under test waits in its listener's backlog.
        if kind == "qemu":
            pending = qemu_pending
        else:
            clients.append(qemu_pending)
            if kind == "api":
                pending = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                pending.settimeout(2.0)
                pending.connect(api_path)
                pending.sendall(b"GET /stats HTTP/1.1\r\nConnection: close\r\n\r\n")
            else:
                with _in_netns(sandbox):
                    pending = socket.socket()
                pending.settimeout(2.0)
                pending.connect(("127.0.0.1", port))
        clients.append(pending)
        # No spinning while it waits.
        time.sleep(0.3)
        cpu0, t0 = _cpu_s(gn.pid), time.monotonic()
        time.sleep(1.5)
        used = _cpu_s(gn.pid) - cpu0
        assert used < 0.25 * (time.monotonic() - t0), f"guestnet used {used:.2f} s of CPU"
        # Free descriptors: QEMU clients go away, guestnet closes their links. Two, since the
        # QEMU listener (with its own connection pending) may win the first.
        clients.pop(0).close()
        time.sleep(0.3)
        clients.pop(0).close()
        if kind == "qemu":
            pending.setblocking(True)
            pending.settimeout(5.0)
            reply = _arp_round_trip(pending, frames)
            assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"  # ARP reply
        elif kind == "api":
            pending.settimeout(5.0)
            assert pending.recv(12) == b"HTTP/1.1 200"
        else:
            pending.settimeout(5.0)
            # Accepted at last: no guest has spoken on any link, so the client is reset.
            with contextlib.suppress(ConnectionResetError):
                assert pending.recv(1) == b""
        assert gn.alive()
    finally:
        for c in clients:
            c.close()
