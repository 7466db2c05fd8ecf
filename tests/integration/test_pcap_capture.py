"""--pcap on a real guest: a namespace's kernel does DHCP, DNS, UDP, TCP and ICMP through guestnet;
tshark reads the capture, sees those protocols, and with checksum validation finds nothing wrong.

The guest's TAP may use checksum offload (frames with a partial checksum); the capture must show
them completed, so this also checks the completion on real frames.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, poke_cmd, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

TSHARK = shutil.which("tshark")
BUSYBOX = shutil.which("busybox")

#: A UDP echo server and a TCP server that sends a greeting, on 127.0.0.1 in the sandbox.
SERVERS = r"""
import select, socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen()
print(u.getsockname()[1], t.getsockname()[1], flush=True)
while True:
    r, _, _ = select.select([u, t], [], [], 30)
    if not r:
        break
    if u in r:
        data, addr = u.recvfrom(65535); u.sendto(data, addr)
    if t in r:
        c, _ = t.accept(); c.sendall(b"hello from the host\n" * 100); c.close()
"""

#: In the guest: a DNS query, a UDP echo, a TCP fetch; each bounded, none must succeed for the
#: capture to be checked (the services may still be under construction), but all are tried.
GUEST = r"""
import socket, struct, sys
uport, tport = int(sys.argv[1]), int(sys.argv[2])
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in "host.guestnet.internal".split(".")) + b"\0"
q += struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
for payload, dst in ((q, ("10.0.2.3", 53)), (b"x" * 1400, ("10.0.2.2", uport))):
    try:
        s.sendto(payload, dst); print("udp", dst[1], len(s.recv(65535)))
    except OSError as exc:
        print("udp", dst[1], "failed", exc)
try:
    c = socket.create_connection(("10.0.2.2", tport), timeout=3)
    got = b""
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    print("tcp", len(got))
except OSError as exc:
    print("tcp failed", exc)
"""


def _tshark(path: Path, *args: str) -> str:
    assert TSHARK is not None
    proc = subprocess.run(
        [TSHARK, "-n", "-r", str(path), *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_capture_dhcp_dns_udp_tcp(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path
) -> None:
    pcap = tmp_path / "guest.pcap"
    api = str(tmp_path / "api.sock")
    servers = sandbox.popen(
        [sys.executable, "-c", SERVERS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert servers.stdout is not None
        uport, tport = servers.stdout.readline().split()
        gn = attach_guest("--pcap", str(pcap), "--api-socket", api, configure=False)
        guest = gn.guest
        assert guest is not None and BUSYBOX is not None
        guest.run(["ip", "link", "set", "eth0", "up"])
        dhcp = guest.run(
            [BUSYBOX, "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s",
             "/bin/true"],
            check=False, timeout=30,
        )  # fmt: skip
        assert dhcp.returncode == 0, dhcp.stderr
        guest.run(["ip", "addr", "add", "10.0.2.15/24", "dev", "eth0"])
        guest.run(["ip", "route", "add", "default", "via", "10.0.2.2"])
        guest.run(poke_cmd("10.0.2.2"))
        out = guest.run(
            [sys.executable, "-c", GUEST, uport.decode(), tport.decode()], check=False, timeout=60
        )
        print(out.stdout, out.stderr)
        guest.run(["ping", "-c", "1", "-W", "2", "10.0.2.2"], check=False, timeout=10)
        # The writer flushes every second; stats name the capture's progress.
        wait_for(lambda: _tshark(pcap, "-Y", "dns").strip() != "", 5, "the DNS query in the pcap")
        assert request(api, "GET", "/stats")[0] == 200
    finally:
        servers.kill()
        servers.wait()
    gn.stop()  # closing flushes the rest

    protocols = set(_tshark(pcap, "-T", "fields", "-e", "frame.protocols").split())
    flat = " ".join(protocols)
    for proto in ("arp", "dhcp", "dns", "udp", "tcp"):
        assert f":{proto}" in flat, (proto, protocols)
    # Both directions: guestnet's DHCP offer/ack and ARP reply are there.
    replies = _tshark(
        pcap, "-Y", "dhcp.option.dhcp == 2 || dhcp.option.dhcp == 5 || arp.opcode == 2"
    )
    assert replies.count("\n") >= 3, replies

    bad = _tshark(
        pcap,
        "-o", "ip.check_checksum:TRUE",
        "-o", "udp.check_checksum:TRUE",
        "-o", "tcp.check_checksum:TRUE",
        "-Y",
        "_ws.malformed || _ws.expert.severity >= error || ip.checksum.status == 0 || "
        "udp.checksum.status == 0 || tcp.checksum.status == 0 || icmp.checksum.status == 0",
    )  # fmt: skip
    assert bad.strip() == "", bad
    # Timestamps are wall-clock and non-decreasing.
    times = [float(t) for t in _tshark(pcap, "-T", "fields", "-e", "frame.time_epoch").split()]
    assert times == sorted(times)
    assert abs(times[0] - os.path.getmtime(pcap)) < 120
    json.dumps(times)  # plain floats


def test_pcap_max_bytes_stops(attach_guest: Callable[..., Guestnet], tmp_path: Path) -> None:
    pcap = tmp_path / "small.pcap"
    gn = attach_guest("--pcap", str(pcap), "--pcap-max-bytes", "300", "--log-level", "warning")
    assert gn.guest is not None
    for _ in range(5):
        gn.guest.run(poke_cmd("10.0.2.77"))
    wait_for(lambda: "pcap-max-bytes" in gn.stderr_text(), 10, "the capture-stopped log line")
    gn.stop()
    assert 24 < pcap.stat().st_size <= 300
