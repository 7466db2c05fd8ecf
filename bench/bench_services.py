"""DHCP exchanges and DNS queries per second through a guest link, with median latency.

Run: .venv/bin/python bench/bench_services.py [--quick]

guestnet runs as ``guestnet qemu --socket`` in its own process; this script is the guest, speaking
QEMU's stream framing on the unix socket, one request in flight at a time:

- ``dhcp``: a full exchange, DISCOVER -> OFFER then REQUEST -> ACK (two round trips);
- ``dns built-in``: an A query for ``host.guestnet.internal`` to 10.0.2.3;
- ``dns forwarded``: an A query for ``www.bench.test`` that guestnet forwards to an upstream on
  127.0.0.1 (a tiny responder started by this script, ``--dns-upstream``), answer relayed back.

Frames are built once with scapy (a test dependency); replies are checked by type. Only a unix
socket and loopback are used. Prints the median rate and latency of several rounds.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

MAC = "52:54:00:12:34:56"
OUR_MAC = "52:55:0a:00:02:02"


def framed(pkt: bytes) -> bytes:
    return struct.pack("!I", len(pkt)) + pkt


def dhcp_frame(kind: str) -> bytes:
    opts: list[object] = [("message-type", kind)]
    if kind == "request":
        opts += [("server_id", "10.0.2.2"), ("requested_addr", "10.0.2.15")]
    pkt = (
        Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(MAC.replace(":", "")), xid=0x1234, flags=0x8000)
        / DHCP(options=[*opts, "end"])
    )
    return framed(bytes(pkt))


def dns_frame(name: str) -> bytes:
    pkt = (
        Ether(src=MAC, dst=OUR_MAC)
        / IP(src="10.0.2.15", dst="10.0.2.3")
        / UDP(sport=40000, dport=53)
        / DNS(id=7, rd=1, qd=DNSQR(qname=name, qtype="A"))
    )
    return framed(bytes(pkt))


class Guest:
    """The client end of the stream link: send a framed request, wait for the matching reply."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(5)
        self.buf = b""

    def frame(self) -> bytes:
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack_from("!I", self.buf)[0]
                if len(self.buf) >= 4 + n:
                    out, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return out
            self.buf += self.sock.recv(1 << 16)

    def exchange(self, request: bytes, udp_sport: int) -> bytes:
        """Send and return the first UDP reply from port ``udp_sport`` (ARP etc. skipped)."""
        self.sock.sendall(request)
        while True:
            f = self.frame()
            if f[12:14] == b"\x08\x00" and f[23] == 17 and f[34:36] == struct.pack("!H", udp_sport):
                return f


def upstream(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every query with one A record, 198.18.0.10 (a thread of this script).

    The answer is spliced from the query's bytes (id, question) so that the upstream costs
    microseconds and the figure measures guestnet, not this responder.
    """
    sock.settimeout(0.2)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([198, 18, 0, 10])
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        end = data.index(b"\x00", 12) + 5  # question: name, type, class
        header = data[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0)
        sock.sendto(header + data[12:end] + record, addr)


def measure(n: int, one: object) -> tuple[float, float]:
    """(operations/s, median latency in µs) over ``n`` calls of ``one()``."""
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        one()  # type: ignore[operator]
        lat.append(time.perf_counter() - t)
    return n / (time.perf_counter() - t0), statistics.median(lat) * 1e6


def main() -> None:
    quick = "--quick" in sys.argv
    rounds, n = (3, 300) if quick else (5, 2000)
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.bind(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=upstream, args=(up, stop), daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gn.sock")
        argv = [sys.executable, "-m", "guestnet", "qemu", "--socket", path,
                "--dns-upstream", f"127.0.0.1:{up.getsockname()[1]}"]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("guestnet did not start")
                time.sleep(0.05)
            g = Guest(path)
            discover, request = dhcp_frame("discover"), dhcp_frame("request")
            builtin, forwarded = dns_frame("host.guestnet.internal"), dns_frame("www.bench.test")

            def dhcp() -> None:
                offer = g.exchange(discover, 67)
                ack = g.exchange(request, 67)
                assert b"\x35\x01\x02" in offer and b"\x35\x01\x05" in ack  # OFFER, ACK

            def dns(frame: bytes) -> None:
                reply = g.exchange(frame, 53)
                # DNS header at 42: NOERROR (rcode in byte 45) and at least one answer record.
                assert reply[45] & 0x0F == 0 and reply[48:50] != b"\x00\x00"

            cases = (
                ("dhcp (DISCOVER/OFFER + REQUEST/ACK)", dhcp),
                ("dns built-in", lambda: dns(builtin)),
                ("dns forwarded (loopback upstream)", lambda: dns(forwarded)),
            )
            print(f"{'case':<38} {'per second':>11} {'median µs':>10}   (median of {rounds})")
            for name, fn in cases:
                for _ in range(50):
                    fn()  # warm-up
                results = [measure(n, fn) for _ in range(rounds)]
                rate = statistics.median(r[0] for r in results)
                lat = statistics.median(r[1] for r in results)
                print(f"{name:<38} {rate:>11,.0f} {lat:>10,.0f}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            stop.set()
            thread.join(2)
            up.close()


if __name__ == "__main__":
    main()
