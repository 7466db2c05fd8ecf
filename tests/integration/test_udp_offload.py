"""UDP segmentation offloads against real stacks: every datagram checked, both ways.

guestnet serves a namespace guest over its TAP, at MTU 1500 and 65520, with offloads (the
default: checksums, TSO and USO) and without (``--no-offloads``). The transfers are
``udpx.py``'s: a windowed sender and a receiver that checks each datagram's sequence number,
length and content and acknowledges what it got, so no buffer on the path may overflow and any
loss, duplicate or corrupted byte is a failure. A sender with ``UDP_SEGMENT`` makes its kernel
hand over UDP GSO super-frames: the guest's, through the TAP with USO (guestnet sends them on with
one ``sendmsg`` each), and the host's, which guestnet's ``UDP_GRO`` sockets read whole (and
guestnet writes to the guest as USO super-frames). About 300 MiB of datagrams in all. Datagrams
exactly at the MTU edge, fragmented ones, and ICMP port unreachable for a refused port complete
the picture, over IPv4 and IPv6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

UDPX = str(Path(__file__).resolve().parent / "udpx.py")
MIB = 1 << 20
PORT = 7300
#: Bytes a sender may have unacknowledged: well inside every socket buffer on the path.
WINDOW_BYTES = 2 * MIB
#: Frames a sender may have unacknowledged: well inside the TAP's queue (txqueuelen 1000) and
#: the guest's backlog (netdev_max_backlog 1000), counting each fragment.
WINDOW_FRAMES = 256
FAMILIES = {4: ("10.0.2.2", "127.0.0.1", "0.0.0.0"), 6: ("fd00::2", "::1", "::")}


def _stats(api: str) -> dict[str, int]:
    status, body = request(api, "GET", "/stats")
    assert status == 200, body
    drops: dict[str, int] = body["drops"]
    return drops


def transfer(
    gn: Guestnet, sandbox: Netns, to_host: bool, family: int, size: int, total: int,
    gso: int = 0,
) -> None:  # fmt: skip
    """``total`` bytes in datagrams of ``size`` one way; asserts every one arrived intact."""
    guest = gn.guest
    assert guest is not None
    gateway, loopback, anyaddr = FAMILIES[family]
    count = max(1, total // size)
    mtu = int(guest.run(["cat", f"/sys/class/net/{gn.ifname}/mtu"]).stdout)
    frames = -(-(size + 8) // (mtu - (40 if family == 6 else 20) - 8))
    window = max(8, min(WINDOW_BYTES // size, WINDOW_FRAMES // frames))
    seconds = 150  # generous: the machine may be loaded; a loss still fails the test
    common = {"count": count, "size": size, "seconds": seconds}
    send = {**common, "batch": gso or 16, "gso": bool(gso), "window": window}
    if to_host:
        rx_ns, rx = sandbox, {**common, "bind": loopback, "port": PORT}
        tx_ns, tx = guest, {**send, "bind": anyaddr, "peer": [gateway, PORT]}
    else:
        rx_ns, rx = guest, {**common, "bind": anyaddr, "peer": [gateway, PORT], "hello": True}
        tx_ns, tx = sandbox, {**send, "bind": loopback, "port": PORT, "hello": True}
    argv = [sys.executable, UDPX]
    first, second = (rx_ns, ["recv", rx]) if to_host else (tx_ns, ["send", tx])
    last_ns, last = (tx_ns, ["send", tx]) if to_host else (rx_ns, ["recv", rx])
    proc = first.popen(
        [*argv, str(second[0]), json.dumps(second[1])], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: _bound(first, PORT) or proc.poll() is not None, 30, "the first end")
        out = last_ns.run([*argv, str(last[0]), json.dumps(last[1])], timeout=seconds + 30)
        other, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    results = {"recv" if to_host else "send": json.loads(other)}
    results["send" if to_host else "recv"] = json.loads(out.stdout)
    got = results["recv"]
    assert got == {"got": count, "bad": 0, "dup": 0}, (results, gn.stderr_text()[-2000:])


def _bound(ns: Netns, port: int) -> bool:
    out = ns.run(["ss", "-Huan", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def _attach(attach_guest: Callable[..., Guestnet], tmp_path: Path, mtu: int, offloads: bool
            ) -> tuple[Guestnet, str]:  # fmt: skip
    api = str(tmp_path / "api.sock")
    extra = [] if offloads else ["--no-offloads"]
    gn = attach_guest("--mtu", str(mtu), "--api-socket", api, *extra)
    wait_for(lambda: os.path.exists(api), 10, "the API socket")
    return gn, api


def _resolve(gn: Guestnet, family: int) -> None:
    """The guest's kernel knows the gateway's MAC before a transfer starts: datagrams sent
    while it asks are queued in a small per-neighbour queue (unres_qlen_bytes) and the rest
    dropped, before guestnet ever sees them. IPv6 waits for the address too."""
    guest = gn.guest
    assert guest is not None
    if family == 6:
        wait_for(lambda: "fd00::15" in guest.run(["ip", "-6", "addr"]).stdout, 10, "IPv6")

    def answered() -> bool:
        ping = ["ping", f"-{family}", "-c", "1", "-W", "1", FAMILIES[family][0]]
        return guest.run(ping, check=False, timeout=10).returncode == 0

    wait_for(answered, 10, "the gateway to answer a ping")


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "no-offloads"])
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_datagrams_exact_both_ways(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path, mtu: int,
    offloads: bool,
) -> None:  # fmt: skip
    """Per case 4 x 16 MiB: GSO senders both ways (super-frames where offloads are on), then
    plain datagrams exactly at the MTU edge both ways."""
    gn, api = _attach(attach_guest, tmp_path, mtu, offloads)
    _resolve(gn, 4)
    edge = mtu - 28  # the largest IPv4 datagram payload that needs no fragment
    seg = 1472 if mtu == 1500 else 8000
    for to_host in (True, False):
        transfer(gn, sandbox, to_host, 4, seg, 16 * MIB, gso=32 if mtu == 1500 else 8)
        transfer(gn, sandbox, to_host, 4, edge, 16 * MIB)
    stats = _stats(api)
    if offloads:
        assert stats.get("nat.udp.to_host.gso", 0) > 0, stats
        assert stats.get("nat.udp.to_guest.uso", 0) > 0, stats
    else:
        assert stats.get("nat.udp.to_host.gso", 0) == 0, stats
        assert stats.get("nat.udp.to_guest.uso", 0) == 0, stats
    assert not {k: v for k, v in stats.items() if "checksum" in k or "gso_unsupported" in k}


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "no-offloads"])
def test_ipv6_datagrams_exact_both_ways(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path, offloads: bool
) -> None:
    gn, api = _attach(attach_guest, tmp_path, 1500, offloads)
    _resolve(gn, 6)
    for to_host in (True, False):
        transfer(gn, sandbox, to_host, 6, 1452, 8 * MIB, gso=32)  # 1452: the IPv6 MTU edge
        transfer(gn, sandbox, to_host, 6, 1000, 4 * MIB)
    stats = _stats(api)
    assert (stats.get("nat.udp.to_guest.uso", 0) > 0) == offloads, stats


@pytest.mark.parametrize("family", [4, 6])
def test_fragmented_datagrams_both_ways(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path, family: int
) -> None:
    """Datagrams larger than the MTU are fragmented both ways, with USO on the link."""
    gn, api = _attach(attach_guest, tmp_path, 1500, True)
    _resolve(gn, family)
    for to_host in (True, False):
        transfer(gn, sandbox, to_host, family, 4000, 2 * MIB)
        transfer(gn, sandbox, to_host, family, 1473 - 20 * (family == 6), 1 * MIB)
    stats = _stats(api)
    assert stats.get("nat.udp.to_guest.fragmented", 0) > 0, stats


#: A guest program: sends one UDP_SEGMENT super-send to a port nobody listens on, from a
#: connected socket, then a plain datagram; prints the errno the socket reports.
REFUSED = r"""
import socket, struct, sys, time
v6 = ":" in sys.argv[1]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(3)
err = 0
for _ in range(10):
    try:
        s.sendmsg([bytes(1200 * 4)], [(17, 103, struct.pack("=H", 1200))])
        time.sleep(0.1)
        s.send(b"x")
        s.recv(100)
    except OSError as exc:
        err = exc.errno
        break
print(err)
"""


@pytest.mark.parametrize("family", [4, 6])
def test_refused_port_gives_icmp_port_unreachable_after_a_super_frame(
    attach_guest: Callable[..., Guestnet], tmp_path: Path, family: int
) -> None:
    gn, api = _attach(attach_guest, tmp_path, 1500, True)
    assert gn.guest is not None
    _resolve(gn, family)
    gateway = FAMILIES[family][0]
    out = gn.guest.run([sys.executable, "-c", REFUSED, gateway, "9"], timeout=30).stdout
    assert out.strip() == "111"  # ECONNREFUSED: guestnet's ICMP port unreachable
    assert _stats(api).get("nat.udp.to_host.gso", 0) >= 1
