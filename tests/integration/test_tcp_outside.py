"""TCP to "the internet": the guest reaches a server in another namespace by its own address.

The ``outside`` namespace (198.18.0.2, joined to the sandbox by a veth, nothing else routed)
stands for a remote host. guestnet connects to it from the sandbox as an ordinary host socket
would; the server sees the sandbox's veth address as the client, and the data comes back intact.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable

import pytest
from nsutil import OUTSIDE_IP, SANDBOX_VETH_IP, Guestnet, Netns

pytestmark = pytest.mark.root

PORT = 8443

#: Serves one connection: sends back "<peer ip> <sha256 of what it got>" after the client's FIN.
SERVER = r"""
import hashlib, socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(4); ls.settimeout(30)
print("ready", flush=True)
c, addr = ls.accept(); c.settimeout(30); h = hashlib.sha256()
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d)
c.sendall(f"{addr[0]} {h.hexdigest()}".encode()); c.close()
"""

#: Sends N bytes, half-closes, prints the server's answer.
CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(bytes(range(256)) * (int(sys.argv[3]) // 256)); s.shutdown(socket.SHUT_WR)
out = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    out += d
print(out.decode())
"""


def test_guest_reaches_outside_host_by_its_address(
    attach_guest: Callable[..., Guestnet], outside: Netns
) -> None:
    server = outside.popen(
        [sys.executable, "-c", SERVER, OUTSIDE_IP, str(PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        gn = attach_guest()
        assert gn.guest is not None
        size = 4 << 20
        out = gn.guest.run(
            [sys.executable, "-c", CLIENT, OUTSIDE_IP, str(PORT), str(size)], timeout=60
        ).stdout.split()
        expected = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
        assert out == [SANDBOX_VETH_IP, expected]
        assert gn.alive(), gn.stderr_text()
    finally:
        server.kill()
        server.wait(5)
