"""The library face (:class:`guestnet.Network`) wired to real parts: a QEMU stream socket with a
client speaking QEMU's framing, the loop in a thread of its own, real host sockets, and the
control API on its unix socket. No fakes between the services and what the API lists."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import guestnet
from guestnet.io.icmp_sock import probe_echo_mode

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = bytes([127, 0, 0, 1])


class QemuClient:
    """Speaks QEMU's ``-netdev stream`` framing on a unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(5.0)
        self.buf = b""

    def send(self, frame: bytes) -> None:
        self.sock.sendall(struct.pack("!I", len(frame)) + frame)

    def recv(self) -> bytes:
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from("!I", self.buf)
                if len(self.buf) >= 4 + n:
                    frame, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return frame
            data = self.sock.recv(1 << 16)
            assert data, "guestnet closed the stream"
            self.buf += data

    def recv_until(self, wanted: Any, limit: int = 20) -> bytes:
        for _ in range(limit):
            frame = self.recv()
            if wanted(frame):
                return frame
        raise AssertionError("the frame never came")


def _get(path: str, target: str) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


@pytest.fixture
def echo_server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)
    try:
        yield sock
    finally:
        sock.close()


def test_flows_of_real_services(tmp_path: Path, frames: Any, echo_server: socket.socket) -> None:
    """A UDP exchange and a ping to an address guestnet does not answer itself show in
    ``GET /flows``: the listing comes from the UDP NAT's and the ICMP service's own tables."""
    mode = probe_echo_mode()
    api = str(tmp_path / "api.sock")
    with guestnet.Network(guestnet.Config(mtu=1500, api_socket=api), echo_mode=mode) as net:
        net.listen_qemu(str(tmp_path / "qemu.sock"))
        net.start()
        qemu = QemuClient(str(tmp_path / "qemu.sock"))
        sport = 40000
        qemu.send(frames.udp(sport=sport, dport=echo_server.getsockname()[1], dst=LOOPBACK))
        data, sender = echo_server.recvfrom(100)
        assert data == b"hello"
        echo_server.sendto(b"back", sender)
        reply = qemu.recv_until(lambda f: f[23] == 17)  # IPv4 protocol UDP
        assert reply.endswith(b"back")
        if mode is not None:
            qemu.send(frames.icmp(ident=77, dst=LOOPBACK))
            qemu.recv_until(lambda f: f[23] == 1 and f[34] == 0)  # ICMP echo reply
        flows = _get(api, "/flows")
        udp = [f for f in flows if f["proto"] == "udp"]
        assert len(udp) == 1 and udp[0]["guest"] == f"10.0.2.15:{sport}"
        assert udp[0]["host"] == ["127.0.0.1"] and udp[0]["state"] == "OPEN"
        stats = _get(api, "/stats")
        assert stats["flows"]["by_proto"]["udp"]["total"] == 1
        listing = subprocess.run(
            [sys.executable, "-m", "guestnet", "flows", "--api-socket", api],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert re.search(rf"^udp\s+10\.0\.2\.15:{sport}\s+127\.0\.0\.1\s+OPEN", listing, re.M)
        assert [f["proto"] for f in net.flows()] == [f["proto"] for f in flows]
        if mode is not None:
            icmp = [f for f in flows if f["proto"] == "icmp"]
            assert len(icmp) == 1 and icmp[0]["guest"] == "10.0.2.15"
            assert icmp[0]["ident"] == 77 and icmp[0]["dst"] == ["127.0.0.1"]
            assert stats["flows"]["by_proto"]["icmp"]["total"] == 1
            assert re.search(r"^icmp\s+10\.0\.2\.15\s+127\.0\.0\.1\s+OPEN", listing, re.M)
        qemu.sock.close()
    assert not Path(api).exists() and not (tmp_path / "qemu.sock").exists()


def test_thread_mode_hands_calls_to_the_loop(tmp_path: Path) -> None:
    """Forwards added from another thread while the loop runs are live at once."""
    with guestnet.Network(guestnet.Config()) as net:
        net.listen_qemu(str(tmp_path / "q.sock"))
        net.start()
        fwd = net.add_forward("tcp", 0, 80)
        assert fwd["host_port"] != 0 and net.forwards()[0]["id"] == fwd["id"]
        # No guest has spoken: guestnet resets the client at once (forward.tcp.no_guest), so
        # fast on loopback that the reset may already meet the client inside connect().
        try:
            with socket.create_connection(("127.0.0.1", int(fwd["host_port"])), timeout=2) as c:
                c.settimeout(2)
                got = c.recv(1)
        except ConnectionResetError:
            got = b""
        assert got == b""
        deadline = time.monotonic() + 5
        while net.stats()["drops"].get("forward.tcp.no_guest", 0) < 1:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        net.remove_forward(str(fwd["id"]))
        assert net.forwards() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(fwd["host_port"])), timeout=2).close()


def test_readme_example_runs(tmp_path: Path) -> None:
    """The README's library example, run as it is written (in a scratch directory)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README.md has a python example"
    out = subprocess.run(
        [sys.executable, "-c", match.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("-netdev stream,id=net0,server=off,addr.type=unix")
    assert re.fullmatch(r"published 127\.0\.0\.1:\d+ -> guest port 80; links: \[\]", lines[1])
    assert not (tmp_path / "gn.sock").exists(), "close() removed the socket"


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_leaves_nothing_behind(tmp_path: Path, frames: Any) -> None:
    """Every socket, file, timer and descriptor a network made goes with close()."""
    with guestnet.Network(guestnet.Config(mtu=1500), echo_mode=None) as warm:
        warm.listen_qemu(str(tmp_path / "warm.sock"))  # first use: imports, lazy state
    before = _fds()
    cfg = guestnet.Config(
        mtu=1500,
        api_socket=str(tmp_path / "api.sock"),
        pcap=str(tmp_path / "cap.pcap"),
        publish=(("tcp", "127.0.0.1", 0, 80), ("udp", "127.0.0.1", 0, 53)),
    )
    net = guestnet.Network(cfg, echo_mode=None)
    net.listen_qemu(str(tmp_path / "q.sock"))
    net.attach_dgram(str(tmp_path / "d.sock"))
    net.start()
    qemu = QemuClient(str(tmp_path / "q.sock"))
    qemu.send(frames.arp())
    assert qemu.recv()[12:14] == b"\x08\x06"
    assert len(net.stats()["links"]) == 2  # type: ignore[arg-type]
    assert len(_fds()) > len(before)
    net.close()
    qemu.sock.close()
    assert net.instance.loop.timers.next_deadline() is None, "no timer left armed"
    assert _fds() == before
    for name in ("api.sock", "q.sock", "d.sock"):
        assert not (tmp_path / name).exists(), name
    assert (tmp_path / "cap.pcap").stat().st_size > 24, "the capture was flushed at close"


def test_two_qemu_connections_on_one_socket_are_switched(tmp_path: Path, frames: Any) -> None:
    """Issue 15: every QEMU stream connection on one socket is a port of one switch; a frame
    from one guest to the other's MAC arrives verbatim, a broadcast reaches the other too."""
    mac_b = bytes.fromhex("5254000000bb")
    ip_b = bytes([10, 0, 2, 16])
    path = str(tmp_path / "q.sock")
    with guestnet.Network(guestnet.Config(mtu=1500), echo_mode=None) as net:
        net.listen_qemu(path)
        net.start()
        qa, qb = QemuClient(path), QemuClient(path)
        try:
            request_a = frames.arp()
            qa.send(request_a)
            assert qa.recv()[:6] == frames.GUEST_MAC  # guestnet's reply
            assert qb.recv() == request_a  # B saw A's broadcast
            request_b = frames.arp(sha=mac_b, spa=ip_b)
            qb.send(request_b)
            assert qb.recv()[:6] == mac_b  # guestnet answers B's port too
            assert qa.recv() == request_b  # and A saw B's broadcast
            udp = frames.udp(dst=ip_b, eth_dst=mac_b)
            qa.send(udp)
            assert qb.recv() == udp
            links = net.stats()["links"]
            assert isinstance(links, list)
            assert sorted(link["macs"] for link in links) == sorted(
                [[frames.GUEST_MAC.hex(":")], [mac_b.hex(":")]]
            )
        finally:
            qa.sock.close()
            qb.sock.close()


class DgramClient:
    """A QEMU ``-netdev dgram`` (or vfkit) end: a bound unix datagram socket of its own."""

    def __init__(self, path: str, mine: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(mine)
        self.sock.settimeout(5.0)
        self.path = path

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.path)

    def recv(self) -> bytes:
        return self.sock.recv(1 << 16)


def test_every_dgram_sender_is_a_port_of_the_switch(tmp_path: Path, frames: Any) -> None:
    """Issue 15: several VMs pointed at one ``-netdev dgram`` socket are each a switch port:
    guestnet answers each on its own socket, a broadcast from one reaches the other, unicast
    to the other's MAC arrives verbatim, and a sender whose socket is gone loses its port."""
    mac_b = bytes.fromhex("5254000000bb")
    ip_b = bytes([10, 0, 2, 16])
    path = str(tmp_path / "d.sock")
    with guestnet.Network(guestnet.Config(mtu=1500), echo_mode=None) as net:
        net.attach_dgram(path)
        net.start()
        da = DgramClient(path, str(tmp_path / "a.sock"))
        db = DgramClient(path, str(tmp_path / "b.sock"))
        try:
            request_a = frames.arp()
            da.send(request_a)
            assert da.recv()[:6] == frames.GUEST_MAC  # guestnet's reply, to A's socket
            request_b = frames.arp(sha=mac_b, spa=ip_b)
            db.send(request_b)
            assert db.recv()[:6] == mac_b  # guestnet answers B on B's socket
            assert da.recv() == request_b  # A saw B's broadcast
            udp = frames.udp(dst=ip_b, eth_dst=mac_b)
            da.send(udp)
            assert db.recv() == udp
            links = net.stats()["links"]
            assert isinstance(links, list)
            assert sorted(link["macs"] for link in links) == sorted(
                [[frames.GUEST_MAC.hex(":")], [mac_b.hex(":")]]
            )
            # B goes away: the next frame for it fails to send and its port is closed.
            db.sock.close()
            os.unlink(str(tmp_path / "b.sock"))
            da.send(udp)
            deadline = time.monotonic() + 5
            while len(net.stats()["links"]) > 1 and time.monotonic() < deadline:  # type: ignore[arg-type]
                time.sleep(0.02)
            assert len(net.stats()["links"]) == 1  # type: ignore[arg-type]
            assert net.stats()["drops"].get("link.dgram.send_error", 0) >= 1  # type: ignore[union-attr]
            # A is still served.
            da.send(request_a)
            assert da.recv()[:6] == frames.GUEST_MAC
        finally:
            da.sock.close()
            db.sock.close()
