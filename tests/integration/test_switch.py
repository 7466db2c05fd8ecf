"""Several guests on one guestnet (issue 15): two namespaces on one switch.

``guestnet netns NS1 NS2`` serves a TAP in each, on one switch: each namespace gets its own
address (``--configure``: the guest address plus its rank; or its own DHCP lease), they ping
and open TCP to each other directly (switched, never NATed: each resolves the other's MAC by
ARP, answered by the other guest, not by guestnet), a broadcast reaches the other guest, and
each reaches the host through the gateway, and a published port reaches the guest it names
(``-p 18090:10.0.2.16:80``). ``--isolate`` refuses guest to guest and still
lets each reach the host. TCP between the guests moves 64 MiB each way, content-checked. Over
IPv6 (``--configure``'s fd00::15 and fd00::16) each finds the other by NDP (the solicitation is
multicast, flooded to the other port) and they ping and move TCP directly, and through the
gateway when a guest routes there. Several ``--tap`` are in test_switch_taps.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import (
    Guestnet,
    Netns,
    addresses,
    is_up,
    link_info,
    make_netns,
    neighbour_mac,
    wait_for,
)

from guestnet.client import request

pytestmark = pytest.mark.root

BUSYBOX = shutil.which("busybox")
MAC1 = "52:54:00:12:34:56"
MAC2 = "52:54:00:12:34:57"
NBYTES = 64 * 1024 * 1024

#: Receives NBYTES on TCP port argv[1] of every address (IPv4 and IPv6), prints how many and
#: their sha256.
SINK = """
import hashlib, socket, sys
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
srv.settimeout(20)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(20)
h, n = hashlib.sha256(), 0
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    h.update(data)
    n += len(data)
print(n, h.hexdigest(), flush=True)
"""

#: Sends NBYTES of a known pattern to argv[1]:argv[2]; prints their sha256.
SOURCE = """
import hashlib, socket, sys
n = int(sys.argv[3])
data = bytes(range(256)) * (n // 256)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(data)
s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""

#: Receives one UDP datagram on argv[1] (broadcast allowed); prints it.
UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(10)
print("ready", flush=True)
print(s.recvfrom(100)[0].decode(), flush=True)
"""

#: Sends a few broadcast datagrams to argv[1]:argv[2].
UDP_BCAST = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for _ in range(3):
    s.sendto(b"hello-all", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
"""

#: Connects to argv[1]:argv[2], prints what the server sends.
CONNECT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(s.recv(100).decode(), flush=True)
"""

#: In a guest: answers one connection on port argv[1] with argv[2].
GUEST_SERVER = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
srv.settimeout(20)
print("ready", flush=True)
conn, _ = srv.accept()
conn.sendall(sys.argv[2].encode())
conn.close()
"""

#: In the sandbox (the host): answers each connection with the peer address it saw, 2 times.
HOST_SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
srv.settimeout(20)
print("ready", flush=True)
for _ in range(2):
    conn, peer = srv.accept()
    conn.sendall(b"host-says-hi")
    conn.close()
"""


@pytest.fixture
def second_ns() -> Iterator[Netns]:
    """A second guest namespace; deleted at teardown."""
    ns = make_netns("gngv")
    try:
        yield ns
    finally:
        ns.delete()


def _ready(ns: Netns, mac: str, configure: bool) -> bool:
    info = link_info(ns, "eth0")
    if info is None or info.get("address") != mac:
        return False
    if not configure:
        return True
    route = ns.run(["ip", "-4", "route", "show", "default"], check=False)
    return is_up(ns, "eth0") and bool(addresses(ns, "eth0")) and "default" in route.stdout


def _attach_two(
    start_gn: Callable[..., Guestnet],
    ns1: Netns,
    ns2: Netns,
    *extra: str,
    configure: bool = True,
) -> Guestnet:
    args = ["netns", ns1.path, ns2.path, *(["--configure"] if configure else []), *extra]

    def ready() -> bool:
        return _ready(ns1, MAC1, configure) and _ready(ns2, MAC2, configure)

    gn: Guestnet = start_gn(args, ready=ready, timeout=20)
    return gn


def _py(ns: Netns, code: str, *args: str, timeout: float = 30.0) -> str:
    return ns.run([sys.executable, "-c", code, *args], timeout=timeout).stdout.strip()


def _ping(ns: Netns, addr: str) -> bool:
    """``ping`` (IPv4 or IPv6 by the address) gets its answers."""
    proc = ns.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", addr], check=False, timeout=10)
    return proc.returncode == 0


def _tcp_exact(sender: Netns, receiver: Netns, addr: str, port: int) -> None:
    sink = receiver.popen([sys.executable, "-c", SINK, str(port)], stdout=-1, stderr=-1, text=True)
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        sent = _py(sender, SOURCE, addr, str(port), str(NBYTES))
        out, err = sink.communicate(timeout=30)
        assert out.strip() == sent, err
        assert sent.startswith(f"{NBYTES} ")
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def _host_server(sandbox: Netns, port: int) -> subprocess.Popen[str]:
    server = sandbox.popen(
        [sys.executable, "-c", HOST_SERVER, str(port)], stdout=-1, stderr=-1, text=True
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def test_two_namespaces_switched(
    start_gn: Callable[..., Guestnet], sandbox: Netns, guest_ns: Netns, second_ns: Netns
) -> None:
    gn = _attach_two(start_gn, guest_ns, second_ns, "-p", "18090:10.0.2.16:80", "-p", "18091:80")
    assert "10.0.2.15/24" in addresses(guest_ns, "eth0")
    assert "10.0.2.16/24" in addresses(second_ns, "eth0")
    # Guest to guest, both ways, directly: each learned the other's own MAC by ARP (guestnet
    # would have answered with its own MAC, had it answered).
    assert _ping(guest_ns, "10.0.2.16")
    assert _ping(second_ns, "10.0.2.15")
    assert neighbour_mac(guest_ns, "10.0.2.16") == MAC2
    assert neighbour_mac(second_ns, "10.0.2.15") == MAC1
    # Through the gateway (a guest that routes to the other one): guestnet delivers it.
    guest_ns.run(["ip", "route", "add", "10.0.2.16/32", "via", "10.0.2.2"])
    assert _ping(guest_ns, "10.0.2.16")
    guest_ns.run(["ip", "route", "del", "10.0.2.16/32"])
    _tcp_exact(guest_ns, second_ns, "10.0.2.16", 5001)
    _tcp_exact(second_ns, guest_ns, "10.0.2.15", 5002)
    # A broadcast from one guest reaches the other.
    sink = second_ns.popen([sys.executable, "-c", UDP_SINK, "5353"], stdout=-1, text=True)
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        _py(guest_ns, UDP_BCAST, "10.0.2.255", "5353")
        out, _ = sink.communicate(timeout=15)
        assert out.strip() == "hello-all"
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    # Each reaches the host through the gateway.
    server = _host_server(sandbox, 18080)
    for ns in (guest_ns, second_ns):
        assert _py(ns, CONNECT, "10.0.2.2", "18080") == "host-says-hi"
    server.wait(timeout=10)
    # A published port reaches the guest it names; without a name, the first guest.
    for port, ns, name in ((18090, second_ns, "guest-two"), (18091, guest_ns, "guest-one")):
        srv = ns.popen([sys.executable, "-c", GUEST_SERVER, "80", name], stdout=-1, text=True)
        try:
            assert srv.stdout is not None
            assert srv.stdout.readline().strip() == "ready"
            assert _py(sandbox, CONNECT, "127.0.0.1", str(port)) == name
            srv.wait(timeout=10)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
    assert gn.alive


def test_two_namespaces_ipv6(
    start_gn: Callable[..., Guestnet],
    sandbox: Netns,
    guest_ns: Netns,
    second_ns: Netns,
    tmp_path: Path,
) -> None:
    """IPv6 between two guests: switched at L2 (each resolves the other by NDP: the multicast
    solicitation is flooded, the other guest answers), and delivered by guestnet when a guest
    sends it to the gateway."""
    api = tmp_path / "api.sock"
    _attach_two(start_gn, guest_ns, second_ns, "--api-socket", str(api))
    assert "fd00::16/64" in _addresses6(second_ns)
    assert _ping(guest_ns, "fd00::16")
    assert _ping(second_ns, "fd00::15")
    assert neighbour_mac(guest_ns, "fd00::16") == MAC2
    assert neighbour_mac(second_ns, "fd00::15") == MAC1
    _tcp_exact(guest_ns, second_ns, "fd00::16", 5003)
    _tcp_exact(second_ns, guest_ns, "fd00::15", 5004)
    # Through the gateway (a guest that routes to the other one): guestnet delivers it.
    guest_ns.run(["ip", "-6", "route", "add", "fd00::16/128", "via", "fd00::2"])
    assert _ping(guest_ns, "fd00::16")
    _tcp_exact(guest_ns, second_ns, "fd00::16", 5005)
    guest_ns.run(["ip", "-6", "route", "del", "fd00::16/128"])
    status, stats = request(str(api), "GET", "/stats")
    assert status == 200
    assert stats["drops"].get("switch.routed", 0) > 0


def _addresses6(ns: Netns) -> list[str]:
    out = ns.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0"]).stdout
    return [line.split()[3] for line in out.splitlines()]


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_two_namespaces_each_get_their_own_lease(
    start_gn: Callable[..., Guestnet],
    sandbox: Netns,
    guest_ns: Netns,
    second_ns: Netns,
    tmp_path: Path,
) -> None:
    api = tmp_path / "api.sock"
    _attach_two(start_gn, guest_ns, second_ns, "--api-socket", str(api), configure=False)
    script = tmp_path / "udhcpc.sh"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in bound|renew)\n'
        '  ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"\n'
        '  ip route replace default via "$router" dev "$interface";;\n'
        "esac\n"
    )
    script.chmod(0o755)
    for ns in (guest_ns, second_ns):
        ns.run(["ip", "link", "set", "eth0", "up"])
        ns.run(
            [str(BUSYBOX), "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
             "-s", str(script)],
            timeout=30,
        )  # fmt: skip
    assert "10.0.2.15/24" in addresses(guest_ns, "eth0")
    assert "10.0.2.16/24" in addresses(second_ns, "eth0")
    assert _ping(guest_ns, "10.0.2.16")
    # /leases names each lease's port.
    leases = _api_get(api, "/leases")
    assert sorted((lease["mac"], lease["ip"], lease["port"]) for lease in leases) == [
        (MAC1, "10.0.2.15", "tap0"),
        (MAC2, "10.0.2.16", "tap1"),
    ]
    # /stats shows each port with its MAC and the address its guest uses.
    status, stats = request(str(api), "GET", "/stats")
    assert status == 200
    ports = {link["name"]: (link["macs"], link["guest_ip4"]) for link in stats["links"]}
    assert ports == {"tap0": ([MAC1], ["10.0.2.15"]), "tap1": ([MAC2], ["10.0.2.16"])}


def test_isolate_refuses_guest_to_guest_and_allows_the_host(
    start_gn: Callable[..., Guestnet], sandbox: Netns, guest_ns: Netns, second_ns: Netns
) -> None:
    _attach_two(start_gn, guest_ns, second_ns, "--isolate")
    assert not _ping(guest_ns, "10.0.2.16")
    assert not _ping(second_ns, "10.0.2.15")
    assert neighbour_mac(guest_ns, "10.0.2.16") is None
    proc = guest_ns.run([sys.executable, "-c", CONNECT, "10.0.2.16", "22"], check=False, timeout=20)
    assert proc.returncode != 0
    server = _host_server(sandbox, 18081)
    for ns in (guest_ns, second_ns):
        assert _py(ns, CONNECT, "10.0.2.2", "18081") == "host-says-hi"
    server.wait(timeout=10)


def _api_get(api: Path, target: str) -> list[dict[str, Any]]:
    wait_for(lambda: api.exists(), 10, "the API socket")
    status, body = request(str(api), "GET", target)
    assert status == 200, body
    assert isinstance(body, list)
    return body
