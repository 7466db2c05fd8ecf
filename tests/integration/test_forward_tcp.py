"""TCP port forwards end to end: host clients in the sandbox reach servers in the guest namespace.

guestnet runs in the loopback-only sandbox with ``-p HOST_PORT:GUEST_PORT`` (or forwards added
through the API) and serves a TAP in the guest namespace; servers listen on the guest's
10.0.2.15 and clients connect to the sandbox's 127.0.0.1:HOST_PORT. Transfers are checked byte
for byte (sha256 on both ends). Every process has a timeout; the fixtures kill what is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import Guestnet, Netns, poke_cmd, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

GUEST_IP = "10.0.2.15"
MIB = 1 << 20

# A server in the guest: prints "ready", then serves MODE on GUEST_IP:PORT.
GUEST_SERVER = r"""
import hashlib, socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
arg = int(sys.argv[3]) if len(sys.argv) > 3 else 0
host = sys.argv[4] if len(sys.argv) > 4 else "10.0.2.15"
ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(128)
print("ready", flush=True)
def chunks(n, seed):
    block = hashlib.sha256(seed).digest() * 32768  # 1 MiB, same on both ends
    while n > 0:
        yield block[: min(n, len(block))]
        n -= len(block)
def sink(c):
    h = hashlib.sha256(); n = 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        h.update(d); n += len(d)
    c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
def source(c):
    for b in chunks(arg, b"down"):
        c.sendall(b)
    c.close()
def echo(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
serve = {"sink": sink, "source": source, "echo": echo}[mode]
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# A client in the sandbox: MODE against 127.0.0.1:PORT; prints its result.
CLIENT = r"""
import hashlib, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
arg = int(sys.argv[3]) if len(sys.argv) > 3 else 0
host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
def chunks(n, seed):
    block = hashlib.sha256(seed).digest() * 32768
    while n > 0:
        yield block[: min(n, len(block))]
        n -= len(block)
s = socket.create_connection((host, port), timeout=30)
if mode == "up":
    h = hashlib.sha256()
    for b in chunks(arg, b"up"):
        s.sendall(b); h.update(b)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
    print(got.decode(), f"{arg} {h.hexdigest()}")
elif mode == "down":
    h = hashlib.sha256(); n = 0
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        h.update(d); n += len(d)
    want = hashlib.sha256(b"".join(chunks(arg, b"down"))).hexdigest()
    print(n, h.hexdigest(), arg, want)
elif mode == "echo":
    # ARG rounds of 1 KiB, 50 ms apart; reads "go" on stdin first if asked to wait.
    print("connected", flush=True)
    ok = 0
    for i in range(arg):
        msg = bytes([i % 251]) * 1024
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = s.recv(len(msg) - len(got))
            if not d:
                raise SystemExit(f"eof after {ok} rounds")
            got += d
        assert got == msg
        ok += 1
        time.sleep(0.05)
    print("rounds", ok, flush=True)
"""

#: ``python3 -m http.server --bind IP PORT --directory DIR``, without the reverse lookup of IP
#: (``getfqdn``) that delays ``listen`` for many seconds in a namespace with no resolver.
HTTP_SERVER = r"""
import functools, http.server as h, socketserver, sys
def bind(self):
    socketserver.TCPServer.server_bind(self)
    self.server_name, self.server_port = "guest", self.server_address[1]
h.HTTPServer.server_bind = bind
handler = functools.partial(h.SimpleHTTPRequestHandler, directory=sys.argv[3])
h.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
"""

#: Connect to 127.0.0.1:PORT and report how the connection ended, and how fast.
CONNECT = r"""
import socket, sys, time
t0 = time.monotonic()
try:
    # A reset may come before connect() has reported success: inside the try.
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    data = s.recv(100)
    print("eof" if data == b"" else "data", round(time.monotonic() - t0, 3))
except ConnectionResetError:
    print("reset", round(time.monotonic() - t0, 3))
except socket.timeout:
    print("timeout", 5)
"""


@pytest.fixture
def guest_server(guest_ns: Netns) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Factory: ``guest_server(mode, port, arg=0)`` starts GUEST_SERVER in the guest."""
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str, port: int, arg: int = 0, host: str = GUEST_IP) -> subprocess.Popen[str]:
        proc = guest_ns.popen(
            [sys.executable, "-c", GUEST_SERVER, mode, str(port), str(arg), host],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def _attach(attach_guest: Callable[..., Guestnet], *extra: str) -> Guestnet:
    gn = attach_guest(*extra)
    # The guest speaks once so that guestnet knows its MAC (a VM does this with DHCP).
    assert gn.guest is not None
    gn.guest.run(poke_cmd("10.0.2.2"))
    return gn


def _wait_listening(ns: Netns, port: int, proc: subprocess.Popen[str]) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return f":{port}" in out

    wait_for(listening, 10, f"a listener on port {port} in the guest")


def _stats(api: str) -> dict[str, Any]:
    status, body = request(api, "GET", "/stats")
    assert status == 200, body
    return dict(body)


def _client(sandbox: Netns, *args: str, timeout: float = 120) -> str:
    res = sandbox.run([sys.executable, "-c", CLIENT, *args], timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr
    return str(res.stdout).strip()


def test_http_server_in_guest_reached_with_curl(
    attach_guest: Callable[..., Guestnet], guest_ns: Netns, sandbox: Netns, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(300_000)
    (www / "blob.bin").write_bytes(body)
    api = str(tmp_path / "api.sock")
    gn = _attach(attach_guest, "-p", "18080:8080", "--api-socket", api)
    server = guest_ns.popen(
        [sys.executable, "-c", HTTP_SERVER, GUEST_IP, "8080", str(www)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(guest_ns, 8080, server)
        out = tmp_path / "got.bin"
        res = sandbox.run(
            ["curl", "-sS", "--max-time", "20", "-o", str(out), "http://127.0.0.1:18080/blob.bin"],
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, res.stderr + gn.stderr_text()
        assert out.read_bytes() == body
        drops = _stats(api)["drops"]
        assert drops["tcp.forward.established"] >= 1
        assert drops.get("forward.tcp.no_guest", 0) == 0
    finally:
        server.kill()
        server.wait(5)


@pytest.mark.parametrize("mtu", [1500, 65520])
def test_32mib_exact_both_ways(
    attach_guest: Callable[..., Guestnet],
    guest_server: Callable[..., Any],
    sandbox: Netns,
    mtu: int,
) -> None:
    gn = _attach(attach_guest, "--mtu", str(mtu), "-p", "18081:5001", "-p", "18082:5002")
    size = 32 * MIB
    guest_server("sink", 5001)
    guest_server("source", 5002, size)
    got_n, got_sha, sent_n, sent_sha = _client(sandbox, "up", "18081", str(size)).split()
    assert (got_n, got_sha) == (sent_n, sent_sha), gn.stderr_text()
    n, sha, want_n, want_sha = _client(sandbox, "down", "18082", str(size)).split()
    assert (n, sha) == (want_n, want_sha), gn.stderr_text()
    assert gn.alive()


def test_ipv6_published_port_reaches_the_guest_ipv6_address(
    attach_guest: Callable[..., Guestnet], guest_server: Callable[..., Any], sandbox: Netns
) -> None:
    """``-p [::1]:P:G`` reaches the guest over IPv6 and ``-p 127.0.0.1:P:G`` over IPv4, side
    by side (the IPv4 server listens on 10.0.2.15 only)."""
    gn = _attach(
        attach_guest,
        "--mtu",
        "1500",
        "-p",
        "[::1]:18083:5003",
        "-p",
        "127.0.0.1:18084:5004",
        "-p",
        "[::1]:18085:5005",
    )
    size = 8 * MIB
    guest_server("source", 5003, size, "::")
    guest_server("source", 5004, size, GUEST_IP)
    n, sha, want_n, want_sha = _client(sandbox, "down", "18083", str(size), "::1").split()
    assert (n, sha) == (want_n, want_sha), gn.stderr_text()
    n, sha, want_n, want_sha = _client(sandbox, "down", "18084", str(size), "127.0.0.1").split()
    assert (n, sha) == (want_n, want_sha), gn.stderr_text()
    guest_server("sink", 5005, 0, "::")
    got_n, got_sha, sent_n, sent_sha = _client(sandbox, "up", "18085", str(size), "::1").split()
    assert (got_n, got_sha) == (sent_n, sent_sha), gn.stderr_text()


def test_forwards_added_and_removed_while_traffic_flows(
    attach_guest: Callable[..., Guestnet],
    guest_server: Callable[..., Any],
    sandbox: Netns,
    tmp_path: Path,
) -> None:
    api = str(tmp_path / "api.sock")
    gn = _attach(attach_guest, "--api-socket", api)
    wait_for(lambda: os.path.exists(api), 10, "the API socket")
    guest_server("echo", 5003)
    status, fwd = request(
        api, "POST", "/forwards", {"proto": "tcp", "host_port": 18083, "guest_port": 5003}
    )
    assert status == 201, fwd
    # A long conversation on the first forward: 60 rounds, 50 ms apart (~3 s).
    long = sandbox.popen(
        [sys.executable, "-c", CLIENT, "echo", "18083", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert long.stdout is not None
        assert long.stdout.readline().strip() == "connected"
        wait_for(
            lambda: any(f.get("origin") == "host" for f in request(api, "GET", "/flows")[1]),
            5,
            "the forwarded flow in /flows",
        )
        flows = [f for f in request(api, "GET", "/flows")[1] if f.get("origin") == "host"]
        assert flows[0]["forward"] == fwd["id"] and flows[0]["guest"] == f"{GUEST_IP}:5003"
        # Another forward, added with the CLI client, works beside it.
        cli = sandbox.run(
            [sys.executable, "-m", "guestnet", "forward", "add", "--api-socket", api,
             "18084:5003"],
            timeout=20,
            check=False,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert _client(sandbox, "echo", "18084", "3") == "connected\nrounds 3"
        # The first forward goes away: new connections are refused, the running one goes on.
        assert request(api, "DELETE", f"/forwards/{fwd['id']}") == (204, None)
        refused = sandbox.run([sys.executable, "-c", CONNECT, "18083"], check=False, timeout=20)
        assert "ConnectionRefusedError" in refused.stderr
        out, err = long.communicate(timeout=30)
        assert long.returncode == 0, err
        assert out.strip() == "rounds 60"
        # Removing the second with the CLI client.
        ids = [f["id"] for f in request(api, "GET", "/forwards")[1]]
        rm = sandbox.run(
            [sys.executable, "-m", "guestnet", "forward", "rm", "--api-socket", api, *ids],
            timeout=20,
            check=False,
        )
        assert rm.returncode == 0, rm.stderr
        assert request(api, "GET", "/forwards")[1] == []
        assert gn.alive(), gn.stderr_text()
    finally:
        if long.poll() is None:
            long.kill()
        long.wait(5)


def test_port_nobody_listens_on_closes_promptly(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path
) -> None:
    api = str(tmp_path / "api.sock")
    gn = _attach(attach_guest, "-p", "18085:9", "--api-socket", api)
    for _ in range(3):
        how, secs = sandbox.run([sys.executable, "-c", CONNECT, "18085"], timeout=20).stdout.split()
        assert how == "reset" and float(secs) < 1.0, gn.stderr_text()
    assert _stats(api)["drops"]["tcp.forward.refused"] == 3
