"""QEMU stream and dgram links, spoken to by real socket clients acting as QEMU or vfkit.

guestnet runs in a loopback-only sandbox; its unix sockets live in a short /tmp directory,
reachable from the test process. Frames are built here by hand with struct, independently of
guestnet's own codecs, and the replies are checked byte by byte.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, guestnet_argv

pytestmark = pytest.mark.root

GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("52550a000202")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
DNS_IP = bytes([10, 0, 2, 3])
QEMU_MAX_FRAME = 69632
TIMEOUT_S = 5.0


def arp_request(target: bytes, mac: bytes = GUEST_MAC, ip: bytes = GUEST_IP) -> bytes:
    """A broadcast ARP request from the guest for ``target``."""
    eth = b"\xff" * 6 + mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, bytes(6), target)
    return eth + arp


def check_arp_reply(frame: bytes, target: bytes, mac: bytes = GUEST_MAC) -> None:
    """``frame`` answers our request for ``target``: from guestnet's MAC, to us."""
    assert frame[0:6] == mac
    assert frame[6:12] == GATEWAY_MAC
    assert frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack_from(
        "!HHBBH6s4s6s4s", frame, 14
    )
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert (sha, spa, tha, tpa) == (GATEWAY_MAC, target, mac, GUEST_IP)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix socket paths (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gnl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- QEMU stream ---------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def stream_exchange(sock: socket.socket, frame: bytes) -> bytes:
    """Send one length-prefixed frame; the first frame that comes back."""
    sock.sendall(struct.pack("!I", len(frame)) + frame)
    (length,) = struct.unpack("!I", _recv_exact(sock, 4))
    assert 0 < length <= QEMU_MAX_FRAME
    return _recv_exact(sock, length)


def stream_client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    sock.connect(str(path))
    return sock


@pytest.fixture
def qemu_server(start_gn: Callable[..., Guestnet], sock_dir: Path) -> tuple[Guestnet, Path]:
    path = sock_dir / "qemu.sock"
    gn = start_gn(["qemu", "--socket", str(path)], ready=path.exists)
    return gn, path


def test_stream_client_gets_arp_replies(qemu_server: tuple[Guestnet, Path]) -> None:
    gn, path = qemu_server
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert f"addr.path={path}" in gn.stdout_text()
    with stream_client(path) as sock:
        for target in (GATEWAY_IP, DNS_IP, GATEWAY_IP):
            check_arp_reply(stream_exchange(sock, arp_request(target)), target)
        # Two frames in one write are both answered, in order.
        req = arp_request(DNS_IP)
        sock.sendall((struct.pack("!I", len(req)) + req) * 2)
        for _ in range(2):
            (length,) = struct.unpack("!I", _recv_exact(sock, 4))
            check_arp_reply(_recv_exact(sock, length), DNS_IP)


@pytest.mark.parametrize("bad_length", [0, QEMU_MAX_FRAME + 1, 0xFFFFFFFF])
def test_stream_garbage_closes_only_that_connection(
    qemu_server: tuple[Guestnet, Path], bad_length: int
) -> None:
    gn, path = qemu_server
    with stream_client(path) as good, stream_client(path) as bad:
        check_arp_reply(stream_exchange(good, arp_request(GATEWAY_IP)), GATEWAY_IP)
        bad.sendall(struct.pack("!I", bad_length) + b"\x00" * 64)
        # Issue 15: both connections are ports of one switch, so the bad one may first get the
        # good one's broadcast ARP request (flooded); then it must be closed.
        flooded = arp_request(GATEWAY_IP)
        seen = b""
        with contextlib.suppress(ConnectionResetError):
            for _ in range(8):
                chunk = bad.recv(4096)
                if not chunk:
                    break
                seen += chunk
            else:
                raise AssertionError("the corrupt connection should be closed")
        assert seen in (b"", struct.pack("!I", len(flooded)) + flooded), seen
        check_arp_reply(stream_exchange(good, arp_request(DNS_IP)), DNS_IP)
        with stream_client(path) as third:
            check_arp_reply(stream_exchange(third, arp_request(GATEWAY_IP)), GATEWAY_IP)
    assert gn.alive(), gn.stderr_text()
    assert "Traceback" not in gn.stderr_text()


# -- dgram ---------------------------------------------------------------------------------------


@pytest.fixture
def dgram_server(start_gn: Callable[..., Guestnet], sock_dir: Path) -> tuple[Guestnet, Path]:
    path = sock_dir / "gn.sock"
    gn = start_gn(["dgram", "--socket", str(path)], ready=path.exists)
    return gn, path


def dgram_client(path: Path) -> socket.socket:
    mine = path.with_name(f"client{os.getpid()}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT_S)
    sock.bind(str(mine))
    sock.connect(str(path))
    return sock


def test_dgram_client_gets_arp_replies(dgram_server: tuple[Guestnet, Path]) -> None:
    _gn, path = dgram_server
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    with dgram_client(path) as sock:
        for target in (GATEWAY_IP, DNS_IP):
            sock.send(arp_request(target))
            check_arp_reply(sock.recv(QEMU_MAX_FRAME), target)


def test_dgram_vfkit_magic_is_skipped(dgram_server: tuple[Guestnet, Path]) -> None:
    gn, path = dgram_server
    with dgram_client(path) as sock:
        sock.send(b"VFKT")
        sock.send(arp_request(GATEWAY_IP))
        # The first datagram back is the ARP reply: VFKT was neither answered nor an error.
        check_arp_reply(sock.recv(QEMU_MAX_FRAME), GATEWAY_IP)
    assert gn.alive(), gn.stderr_text()


# -- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["qemu", "--socket", "/tmp/x.sock", "--mtu", "70000"], "--mtu"),
        (["qemu", "--listen", "not-an-address"], "--listen"),
        (["qemu", "--socket", "/tmp/x.sock", "--mac", "zz:00:00:00:00:00"], "--mac"),
        (["dgram", "--socket", "/tmp/x.sock", "--pool-slots", "0"], "--pool-slots"),
        (["dgram", "--socket", "/tmp/x.sock", "--gateway", "1.2.3.4"], "--gateway"),
    ],
)
def test_invalid_options_exit_2(sandbox: Netns, args: list[str], option: str) -> None:
    proc = sandbox.run(guestnet_argv(args), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert option in lines[0]
