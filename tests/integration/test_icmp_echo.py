"""ICMP echo against real stacks: ``ping`` in the guest namespace, guestnet in the sandbox.

Echo to the gateway and DNS addresses is answered by guestnet itself. Echo to the ``outside``
namespace (see test_udp_nat.py) goes through a ping socket: the sandbox's
``net.ipv4.ping_group_range`` is opened (in that namespace only) before guestnet starts, so its
start-up probe picks ping sockets; the guest must get its own identifier, sequence and payload
back although the ping socket chose another identifier.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest
from nsutil import OUTSIDE_IP, OUTSIDE_IP6, SANDBOX_VETH_IP6, Guestnet, Netns

pytestmark = pytest.mark.root

#: Raw-socket echo in the guest: argv = ADDR IDENT SEQ HEXPAYLOAD; prints the reply's fields.
RAW_ECHO = r"""
import json, socket, struct, sys, time
addr, ident, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes.fromhex(sys.argv[4])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(1)
s.sendto(msg, (addr, 0))
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        data, src = s.recvfrom(65535)
    except socket.timeout:
        continue
    ihl = (data[0] & 15) * 4
    t, code, ck, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
    if t == 0 and src[0] == addr:
        ok = csum(data[ihl:]) == 0
        print(json.dumps([src[0], rid, rseq, data[ihl + 8:].hex(), ok]))
        sys.exit(0)
print("null")
"""


def raw_echo(guest: Netns, addr: str, ident: int, seq: int, payload: bytes) -> object:
    out = guest.run(
        [sys.executable, "-c", RAW_ECHO, addr, str(ident), str(seq), payload.hex()], timeout=20
    ).stdout
    return json.loads(out)


@pytest.mark.parametrize("addr", ["10.0.2.2", "10.0.2.3"])
def test_ping_our_addresses(attach_guest: Callable[..., Guestnet], addr: str) -> None:
    gn = attach_guest()
    proc = gn.guest.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", addr], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0% packet loss" in proc.stdout
    payload = b"guestnet-echo" * 10
    assert raw_echo(gn.guest, addr, 0xBEEF, 4242, payload) == [
        addr, 0xBEEF, 4242, payload.hex(), True
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["ping", "raw"])
def test_ping_outside(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, outside: Netns, mode: str
) -> None:
    """Ping sockets when the sandbox's sysctl allows them, else (we are root) the raw socket."""
    if mode == "ping":
        sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])
    else:
        sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=1 0"])
    gn = attach_guest("--log-level", "info")
    proc = gn.guest.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", OUTSIDE_IP], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = bytes(range(64))
    for ident, seq in ((0x1234, 1), (0x1234, 2), (0x0001, 65535)):
        got = raw_echo(gn.guest, OUTSIDE_IP, ident, seq, payload)
        assert got == [OUTSIDE_IP, ident, seq, payload.hex(), True]
    assert f"through {mode} sockets" in gn.stderr_text()


def test_big_ping_to_the_gateway_at_mtu_1500(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest("--mtu", "1500")
    proc = gn.guest.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "4000", "10.0.2.2"],
                        check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4008 bytes from 10.0.2.2" in proc.stdout


@pytest.mark.parametrize("mode", ["ping", "raw"])
def test_ping6_outside(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, outside: Netns, mode: str
) -> None:
    """ICMPv6 echo beyond the host, through an ICMPv6 ping socket or the raw ICMPv6 socket;
    big enough at MTU 1500 that both the request and the reply travel in fragments."""
    if mode == "ping":
        sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"])
    else:
        sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=1 0"])
    gn = attach_guest("--mtu", "1500", "--log-level", "info")
    for size in ("56", "3000"):
        proc = gn.guest.run(
            ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-s", size, OUTSIDE_IP6],
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr + gn.stderr_text()
        assert f"{int(size) + 8} bytes from {OUTSIDE_IP6}" in proc.stdout


def test_ping6_refused_destination_is_unreachable(
    attach_guest: Callable[..., Guestnet], outside: Netns
) -> None:
    """--no-host-loopback refuses the host's own IPv6 addresses: guestnet answers the echo
    with an ICMPv6 "administratively prohibited" from the gateway at once."""
    gn = attach_guest("--no-host-loopback")
    proc = gn.guest.run(["ping", "-6", "-c", "1", "-W", "2", SANDBOX_VETH_IP6], check=False)
    assert proc.returncode != 0
    assert "From fd00::2" in proc.stdout and "prohibited" in proc.stdout, proc.stdout
