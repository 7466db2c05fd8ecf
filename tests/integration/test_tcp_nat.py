"""TCP NAT end to end: a guest namespace's kernel talks TCP through guestnet to servers on the
sandbox's 127.0.0.1 (the guest reaches them as the gateway, 10.0.2.2), and over IPv6 to servers
on the sandbox's ::1 (the guest reaches them as fd00::2): the transfer, half-close, refusal and
loopback tests run for both families.

Transfers are checked byte for byte (sha256 on both ends), with and without 2% random loss both
ways injected in the guest namespace with nftables. Servers run in the sandbox and clients in
the guest, as small Python programs; every one has a timeout, and the fixtures kill whatever is
left in either namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nsutil import Guestnet, Netns, wait_for

pytestmark = pytest.mark.root

GATEWAY = "10.0.2.2"
GATEWAY6 = "fd00::2"
PORT = 5001
#: Per family: the guest's name for the host, the host's loopback the server listens on.
FAMILIES = {4: (GATEWAY, "127.0.0.1"), 6: (GATEWAY6, "::1")}
MIB = 1 << 20

# A server on the sandbox's loopback: prints "ready", serves one mode, prints its result.
SERVER = r"""
import hashlib, os, socket, struct, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
arg = int(sys.argv[3]) if len(sys.argv) > 3 else 0
host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(512)
print("ready", flush=True)
def chunks(n, seed):
    block = hashlib.sha256(seed).digest() * 32768  # 1 MiB, same on both ends
    while n > 0:
        yield block[: min(n, len(block))]
        n -= len(block)
if mode == "sink":
    c, _ = ls.accept(); h = hashlib.sha256(); n = 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        h.update(d); n += len(d)
    c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
elif mode == "source":
    c, _ = ls.accept()
    for b in chunks(arg, b"down"):
        c.sendall(b)
    c.close()
elif mode == "halfclose":
    c, _ = ls.accept()
    c.sendall(b"from host"); c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        got += d
    print(got.decode(), flush=True); c.close()
elif mode == "abort":
    c, _ = ls.accept()
    c.recv(100)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
    print("aborted", flush=True)
elif mode == "echo":
    def serve(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Clients in the guest namespace.
UPLOAD = r"""
import hashlib, socket, sys, time
n = int(sys.argv[1])
block = hashlib.sha256(b"up").digest() * 32768
h = hashlib.sha256(); s = socket.create_connection((sys.argv[2], 5001), timeout=60)
t = time.monotonic(); left = n
while left > 0:
    b = block[: min(left, len(block))]; s.sendall(b); h.update(b); left -= len(b)
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(1000)
    if not d:
        break
    reply += d
print(reply.decode(), h.hexdigest(), f"{n * 8 / (time.monotonic() - t) / 1e9:.3f}")
"""

DOWNLOAD = r"""
import hashlib, socket, sys, time
s = socket.create_connection((sys.argv[1], 5001), timeout=60)
h = hashlib.sha256(); n = 0; t = time.monotonic()
while True:
    d = s.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), f"{n * 8 / (time.monotonic() - t) / 1e9:.3f}")
"""

CONNECT = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET); s.settimeout(10)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"hi")
    print("data", s.recv(100))
except OSError as e:
    print(type(e).__name__)
"""

HALFCLOSE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 5001), timeout=10)
got = b""
while True:
    d = s.recv(100)
    if not d:
        break
    got += d
s.sendall(b"guest still talks after " + got); s.shutdown(socket.SHUT_WR)
print(got.decode(), s.recv(10) == b"")
"""

MANY = r"""
import selectors, socket, sys
total, batch = int(sys.argv[1]), int(sys.argv[2])
ok = 0
for start in range(0, total, batch):
    socks = []
    for i in range(min(batch, total - start)):
        s = socket.create_connection(("10.0.2.2", 5001), timeout=10)
        s.sendall(b"conn %d\n" % (start + i)); socks.append((s, b"conn %d\n" % (start + i)))
    for s, want in socks:
        got = b""
        while len(got) < len(want):
            d = s.recv(100)
            if not d:
                break
            got += d
        ok += got == want
        s.close()
print(ok)
"""


def _sha(seed: bytes, n: int) -> str:
    import hashlib

    block = hashlib.sha256(seed).digest() * 32768
    h = hashlib.sha256()
    while n > 0:
        h.update(block[: min(n, len(block))])
        n -= len(block)
    return h.hexdigest()


@pytest.fixture
def server(sandbox: Netns) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Factory: ``server(mode, arg=0, host="127.0.0.1")`` starts SERVER in the sandbox and waits
    for "ready"."""
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str, arg: int = 0, host: str = "127.0.0.1") -> subprocess.Popen[str]:
        proc = sandbox.popen(
            [sys.executable, "-c", SERVER, mode, str(PORT), str(arg), host],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


def _guest(gn: Guestnet) -> Netns:
    assert gn.guest is not None
    return gn.guest


def _run(gn: Guestnet, script: str, *args: str, timeout: float = 120) -> str:
    proc = _guest(gn).run([sys.executable, "-c", script, *args], check=False, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stderr}\nguestnet stderr:\n{gn.stderr_text()}"
    return proc.stdout


def _add_loss(ns: Netns, percent: int) -> None:
    ns.run(["nft", "add", "table", "inet", "loss"])
    for hook in ("input", "output"):
        ns.run(
            ["nft", "add", "chain", "inet", "loss", hook,
             f"{{ type filter hook {hook} priority 0; }}"]
        )  # fmt: skip
        ns.run(
            ["nft", "add", "rule", "inet", "loss", hook,
             "numgen", "random", "mod", "100", "<", str(percent), "drop"]
        )  # fmt: skip


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(the guest's address for the host, the host loopback the server listens on)."""
    return FAMILIES[request.param]


def _transfer_both_ways(
    gn: Guestnet, server: Any, size: int, timeout: float, family: tuple[str, str] = FAMILIES[4]
) -> list[str]:
    gateway, loopback = family
    server("sink", host=loopback)
    out = _run(gn, UPLOAD, str(size), gateway, timeout=timeout).split()
    n, host_sha, guest_sha, up_gbps = out
    assert int(n) == size
    assert host_sha == guest_sha == _sha(b"up", size)
    server("source", size, host=loopback)
    n, sha, down_gbps = _run(gn, DOWNLOAD, gateway, timeout=timeout).split()
    assert int(n) == size
    assert sha == _sha(b"down", size)
    return [up_gbps, down_gbps]


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_exact_transfers_both_ways(
    attach_guest: Any, server: Any, mtu: int, family: tuple[str, str]
) -> None:
    gn = attach_guest("--mtu", str(mtu))
    _transfer_both_ways(gn, server, 64 * MIB, timeout=120, family=family)


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_exact_transfers_under_2_percent_loss(
    attach_guest: Any, server: Any, mtu: int, family: tuple[str, str]
) -> None:
    gn = attach_guest("--mtu", str(mtu))
    _add_loss(_guest(gn), 2)
    _transfer_both_ways(gn, server, 64 * MIB, timeout=180, family=family)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_exact_transfers_1gib(attach_guest: Any, server: Any, mtu: int) -> None:
    gn = attach_guest("--mtu", str(mtu))
    _transfer_both_ways(gn, server, 1024 * MIB, timeout=600)


def test_half_close_both_ways(attach_guest: Any, server: Any, family: tuple[str, str]) -> None:
    gn = attach_guest()
    srv = server("halfclose", host=family[1])
    out = _run(gn, HALFCLOSE, family[0], timeout=30).split()
    assert out == ["from", "host", "True"]
    assert srv.stdout is not None
    assert srv.stdout.readline().strip() == "guest still talks after from host"
    # The upload test covers the other way: the guest half-closes, then reads the reply.


def test_refused_port_is_rst(attach_guest: Any, family: tuple[str, str]) -> None:
    gn = attach_guest()
    assert _run(gn, CONNECT, family[0], "9", timeout=30).strip() == "ConnectionRefusedError"


def test_abrupt_host_close_resets_guest(attach_guest: Any, server: Any) -> None:
    gn = attach_guest()
    server("abort")
    out = _run(gn, CONNECT, GATEWAY, str(PORT), timeout=30).strip()
    assert out == "ConnectionResetError"


def test_no_host_loopback_refuses(attach_guest: Any, server: Any, family: tuple[str, str]) -> None:
    gateway, loopback = family
    gn = attach_guest("--no-host-loopback")
    server("echo", host=loopback)
    assert _run(gn, CONNECT, gateway, str(PORT), timeout=30).strip() == "ConnectionRefusedError"
    assert _run(gn, CONNECT, loopback, str(PORT), timeout=30).strip() in (
        "ConnectionRefusedError",
        "OSError",  # the guest's own kernel may refuse 127/8 on eth0 before guestnet sees it
        "TimeoutError",
    )


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_thousand_connections_and_no_fd_leak(attach_guest: Any, server: Any) -> None:
    gn = attach_guest()
    server("echo")
    assert _run(gn, CONNECT, GATEWAY, str(PORT), timeout=30).strip() == "data b'hi'"
    time.sleep(2.5)  # that flow is reaped
    before = _fds(gn.pid)
    assert _run(gn, MANY, "1000", "100", timeout=120).strip() == "1000"
    wait_for(lambda: _fds(gn.pid) <= before, timeout=10, what="host sockets to be closed")


ERRNO_CONNECT = r"""
import errno, socket, sys, time
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET); s.settimeout(10)
t = time.monotonic()
try:
    s.connect((sys.argv[1], 80))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), round(time.monotonic() - t, 3))
"""


@pytest.mark.parametrize("addr", ["203.0.113.5", "2001:db8:ffff::5"])
def test_unroutable_destination_fails_at_once(attach_guest: Any, addr: str) -> None:
    """The sandbox (guestnet's host) has no route there: the guest's connect fails at once with
    "Network is unreachable" (guestnet answers the SYN with ICMP/ICMPv6 no route), not
    "Connection refused"."""
    gn = attach_guest()
    name, seconds = _run(gn, ERRNO_CONNECT, addr, timeout=30).split()
    assert name == "ENETUNREACH" and float(seconds) < 2.0, (name, seconds)
