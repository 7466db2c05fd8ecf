"""UDP NAT against real stacks: the guest is a namespace's kernel, servers are real sockets.

guestnet runs in the loopback-only sandbox. "The host" is the sandbox's 127.0.0.1 (the guest
reaches it as the gateway, 10.0.2.2). "The internet" is a third namespace, ``outside``, joined to
the sandbox by a veth with addresses in 198.18.0.0/15 (the benchmarking range) and no route to
anything else; the guest reaches it by its own address through guestnet's sockets.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nsutil import OUTSIDE_IP, OUTSIDE_IP6, SANDBOX_VETH_IP, SANDBOX_VETH_IP6, Guestnet, Netns

pytestmark = pytest.mark.root


#: A UDP echo server: ``HOST PORT [PORT...]``. Datagrams are echoed from the socket they came in
#: on; ``who`` is answered with the sender's address as JSON; ``eim`` is echoed and then answered
#: from every other port too. Exits after 60 s without traffic.
ECHO_SERVER = r"""
import json, select, socket, sys
host = sys.argv[1]
socks = []
for port in sys.argv[2:]:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    socks.append(s)
print("ready", flush=True)
while True:
    ready, _, _ = select.select(socks, [], [], 60)
    if not ready:
        break
    for s in ready:
        data, addr = s.recvfrom(65535)
        if data == b"who":
            s.sendto(json.dumps(list(addr)).encode(), addr)
            continue
        s.sendto(data, addr)
        if data == b"eim":
            for other in socks:
                if other is not s:
                    other.sendto(b"from %d" % other.getsockname()[1], addr)
"""

#: A guest client: argv[1] is JSON {"sends": [[ip, port, hex]], "expect": N, "connect": bool}.
#: Sends everything from one socket, collects up to N datagrams (3 s each), prints them as JSON
#: [[src_ip, src_port, hex], ...], or {"error": errno} when a connected socket gets an error.
CLIENT = r"""
import json, socket, sys
req = json.loads(sys.argv[1])
v6 = ":" in req["sends"][0][0]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if v6 else "0.0.0.0", 0))
s.settimeout(3)
got = []
try:
    for ip, port, data in req["sends"]:
        if req.get("connect"):
            s.connect((ip, port))
            s.send(bytes.fromhex(data))
        else:
            s.sendto(bytes.fromhex(data), (ip, port))
    while len(got) < req["expect"]:
        data, addr = s.recvfrom(65535)
        got.append([addr[0], addr[1], data.hex()])
except socket.timeout:
    pass
except OSError as exc:
    print(json.dumps({"error": exc.errno}))
    sys.exit(0)
print(json.dumps(got))
"""


def start_echo(ns: Netns, host: str, *ports: int) -> subprocess.Popen[str]:
    """Start the echo server in ``ns``; returns once it has bound its sockets."""
    proc = ns.popen(
        [sys.executable, "-c", ECHO_SERVER, host, *map(str, ports)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(
            f"echo server did not start: {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


def guest_udp(
    guest: Netns, sends: list[tuple[str, int, bytes]], expect: int, connect: bool = False
) -> Any:
    """Run the client in the guest; the datagrams it got as (src_ip, src_port, bytes)."""
    req = {"sends": [[ip, port, data.hex()] for ip, port, data in sends], "expect": expect}
    req["connect"] = connect
    out = guest.run([sys.executable, "-c", CLIENT, json.dumps(req)], timeout=30).stdout
    result = json.loads(out)
    if isinstance(result, dict):
        return result
    return [(ip, port, bytes.fromhex(data)) for ip, port, data in result]


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def test_udp_echo_through_the_gateway(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, servers: list[Any]
) -> None:
    servers.append(start_echo(sandbox, "127.0.0.1", 7007))
    gn = attach_guest()
    got = guest_udp(gn.guest, [("10.0.2.2", 7007, b"hello through the gateway")], 1)
    assert got == [("10.0.2.2", 7007, b"hello through the gateway")]


def test_udp_outside_by_its_address_with_endpoint_independent_mapping(
    attach_guest: Callable[..., Guestnet], outside: Netns, servers: list[Any]
) -> None:
    servers.append(start_echo(outside, OUTSIDE_IP, 7000, 7001, 7002))
    gn = attach_guest()
    # One guest socket, two destinations: the outside sees the same host address and port.
    got = guest_udp(gn.guest, [(OUTSIDE_IP, 7000, b"who"), (OUTSIDE_IP, 7002, b"who")], 2)
    seen = {(src, json.loads(data)[1]) for _, src, data in got}
    assert {src for src, _ in seen} == {7000, 7002}
    assert len({port for _, port in seen}) == 1, f"two host ports for one guest source: {seen}"
    assert all(json.loads(data)[0] == SANDBOX_VETH_IP for _, _, data in got)
    # A reply from other ports of a destination the guest has sent to reaches it.
    got = guest_udp(gn.guest, [(OUTSIDE_IP, 7000, b"eim")], 3)
    assert sorted(got) == [
        (OUTSIDE_IP, 7000, b"eim"),
        (OUTSIDE_IP, 7001, b"from 7001"),
        (OUTSIDE_IP, 7002, b"from 7002"),
    ]


def test_4000_byte_datagrams_both_ways_at_mtu_1500(
    attach_guest: Callable[..., Guestnet], outside: Netns, sandbox: Netns, servers: list[Any]
) -> None:
    servers.append(start_echo(outside, OUTSIDE_IP, 7000))
    servers.append(start_echo(sandbox, "127.0.0.1", 7000))
    gn = attach_guest("--mtu", "1500")
    mtu = gn.guest.run(["cat", f"/sys/class/net/{gn.ifname}/mtu"]).stdout.strip()
    assert mtu == "1500"
    payload = (bytes(range(256)) * 16)[:4000]
    for dst in (OUTSIDE_IP, "10.0.2.2"):
        got = guest_udp(gn.guest, [(dst, 7000, payload)], 1)
        assert got == [(dst, 7000, payload)], f"4000-byte echo via {dst}"


def test_no_host_loopback_refuses_the_gateway(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, servers: list[Any]
) -> None:
    servers.append(start_echo(sandbox, "127.0.0.1", 7007))
    gn = attach_guest("--no-host-loopback")
    got = guest_udp(gn.guest, [("10.0.2.2", 7007, b"x")], 1, connect=True)
    # ICMP "administratively prohibited" reaches a connected socket as EHOSTUNREACH (113).
    assert got == {"error": 113}


def test_host_port_unreachable_reaches_the_guest(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest()
    got = guest_udp(gn.guest, [("10.0.2.2", 9, b"nobody listens")], 1, connect=True)
    assert got == {"error": 111}  # ECONNREFUSED, from guestnet's ICMP port unreachable


def test_published_udp_port_reaches_the_guest(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, servers: list[Any]
) -> None:
    """``-p 127.0.0.1:HOST:GUEST/udp``: a host client's datagram is echoed by the guest."""
    gn = attach_guest("-p", "127.0.0.1:5601:7000/udp")
    servers.append(start_echo(gn.guest, "0.0.0.0", 7000))
    got = guest_udp(sandbox, [("127.0.0.1", 5601, b"who"), ("127.0.0.1", 5601, b"hi")], 2)
    assert [(ip, port) for ip, port, _ in got] == [("127.0.0.1", 5601)] * 2
    who = json.loads(got[0][2])
    assert who[0] == "10.0.2.2"  # the guest sees the client as the gateway
    assert got[1][2] == b"hi"


# -- IPv6 -------------------------------------------------------------------------------------


def test_udp6_echo_through_the_gateway(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, servers: list[Any]
) -> None:
    servers.append(start_echo(sandbox, "::1", 7007))
    gn = attach_guest()
    got = guest_udp(gn.guest, [("fd00::2", 7007, b"hello over IPv6")], 1)
    assert got == [("fd00::2", 7007, b"hello over IPv6")]


def test_udp6_4000_byte_datagrams_both_ways_at_mtu_1500(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, servers: list[Any]
) -> None:
    """Fragments both ways: the guest's kernel fragments toward guestnet (Fragment headers,
    reassembled), guestnet fragments the echo toward the guest."""
    servers.append(start_echo(sandbox, "::1", 7000))
    gn = attach_guest("--mtu", "1500")
    payload = (bytes(range(256)) * 16)[:4000]
    got = guest_udp(gn.guest, [("fd00::2", 7000, payload)], 1)
    assert got == [("fd00::2", 7000, payload)]


def test_udp6_host_port_unreachable(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest()
    got = guest_udp(gn.guest, [("fd00::2", 9, b"nobody listens")], 1, connect=True)
    assert got == {"error": 111}  # ECONNREFUSED, from guestnet's ICMPv6 port unreachable


def test_udp6_no_host_loopback(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, servers: list[Any]
) -> None:
    servers.append(start_echo(sandbox, "::1", 7007))
    gn = attach_guest("--no-host-loopback")
    got = guest_udp(gn.guest, [("fd00::2", 7007, b"x")], 1, connect=True)
    # ICMPv6 "administratively prohibited" reaches a connected socket as EACCES (13).
    assert got == {"error": 13}


def test_udp6_outside_by_its_address(
    attach_guest: Callable[..., Guestnet], outside: Netns, servers: list[Any]
) -> None:
    """An IPv6 address beyond the host, reached from the host's own IPv6 address."""
    servers.append(start_echo(outside, OUTSIDE_IP6, 7000))
    gn = attach_guest()
    got = guest_udp(gn.guest, [(OUTSIDE_IP6, 7000, b"who")], 1)
    assert len(got) == 1 and got[0][:2] == (OUTSIDE_IP6, 7000)
    assert json.loads(got[0][2])[0] == SANDBOX_VETH_IP6
