"""A hostile guest: floods of crafted frames sent raw on an interface (AF_PACKET), bounded.

Run inside the guest namespace: ``python flood.py KIND --ifname eth0 --count N --seconds S
[--port P] [--rate R]``. Frames are built with the test suite's builders (guestnet's own codecs,
checked against scapy in the unit tests) from the interface's MAC and IPv4 address; a flood
sends at most ``--rate`` frames per second and stops after ``--count`` frames or ``--seconds``,
whichever comes first, then prints ``{"sent": N, "seconds": T}`` as JSON.

Kinds: ``syn`` (TCP SYNs from random source ports to the gateway's ``--port``), ``udp`` (a
source-port sweep: each datagram from a new source port to the gateway's ``--port``), ``frag``
(IPv4 fragments that never complete: first pieces, overlapping pieces and tiny ones, random
IDs), ``dhcp`` (DHCPDISCOVERs from random MACs), ``dns`` (A queries for random names to the DNS
address), ``arp`` (ARP requests for the gateway from random MACs and addresses), ``ndp``
(neighbour solicitations for the gateway's IPv6 address from random link-local sources).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the frame builders

from conftest import (
    arp_frame,
    icmp6_frame,
    ipv4_frame,
    tcp_segment,
    udp_frame,
    udp_segment,
)

from guestnet.wire.ethernet import BROADCAST
from guestnet.wire.ipv4 import FLAG_MF, PROTO_TCP, PROTO_UDP
from guestnet.wire.tcp import SYN

GATEWAY = bytes([10, 0, 2, 2])
DNS = bytes([10, 0, 2, 3])
GATEWAY6 = bytes.fromhex("fd000000000000000000000000000002")
SOLICITED_GW6 = bytes.fromhex("ff0200000000000000000001ff000002")
SIOCGIFADDR = 0x8915


def own_ipv4(ifname: str) -> bytes:
    """The interface's IPv4 address (10.0.2.15 if it has none yet)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("256s", ifname.encode())
        return fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]
    except OSError:
        return bytes([10, 0, 2, 15])
    finally:
        s.close()


def random_mac() -> bytes:
    return bytes([0x02]) + os.urandom(5)


class Flood:
    """Frame makers, one per kind; each call makes the next frame of its flood."""

    def __init__(self, ifname: str, port: int) -> None:
        text = Path(f"/sys/class/net/{ifname}/address").read_text().strip()
        self.mac = bytes.fromhex(text.replace(":", ""))
        self.ip = own_ipv4(ifname)
        self.port = port
        self.rng = random.Random(os.getpid())

    def _sport(self) -> int:
        return self.rng.randrange(1024, 65536)

    def syn(self) -> bytes:
        seg = tcp_segment(self._sport(), self.port, SYN, src=self.ip, dst=GATEWAY,
                          seq=self.rng.getrandbits(32))  # fmt: skip
        return ipv4_frame(PROTO_TCP, seg, self.ip, GATEWAY, eth_src=self.mac)

    def udp(self) -> bytes:
        return udp_frame(self._sport(), self.port, b"sweep", self.ip, GATEWAY, eth_src=self.mac)

    def frag(self) -> bytes:
        ident = self.rng.getrandbits(16)
        kind = self.rng.randrange(3)
        if kind == 0:  # a first piece whose rest never comes
            body, frag = os.urandom(1400), FLAG_MF
        elif kind == 1:  # overlapping middle pieces
            body, frag = os.urandom(800), FLAG_MF | self.rng.randrange(1, 200)
        else:  # tiny pieces anywhere
            body, frag = os.urandom(8), FLAG_MF | self.rng.randrange(1, 8000)
        return ipv4_frame(PROTO_UDP, body, self.ip, GATEWAY, self.mac, frag=frag, ident=ident)

    def dhcp(self) -> bytes:
        mac = random_mac()
        bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, self.rng.getrandbits(32),
                            0, 0x8000, bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10),
                            b"", b"")  # fmt: skip
        payload = bootp + b"\x63\x82\x53\x63\x35\x01\x01\xff"
        return udp_frame(68, 67, payload, bytes(4), b"\xff" * 4, eth_src=mac, eth_dst=BROADCAST)

    def dns(self) -> bytes:
        name = "".join(self.rng.choice("abcdefghij") for _ in range(12))
        q = struct.pack("!HHHHHH", self.rng.getrandbits(16), 0x0100, 1, 0, 0, 0)
        q += bytes([len(name)]) + name.encode() + b"\x04test\x00\x00\x01\x00\x01"
        seg = udp_segment(self._sport(), 53, q, self.ip, DNS)
        return ipv4_frame(PROTO_UDP, seg, self.ip, DNS, self.mac)

    def arp(self) -> bytes:
        mac = random_mac()
        spa = bytes([10, 0, 2, self.rng.randrange(16, 250)])
        return arp_frame(sha=mac, spa=spa, tpa=GATEWAY)

    def ndp(self) -> bytes:
        mac = random_mac()
        src = bytes.fromhex("fe80000000000000") + os.urandom(8)
        body = GATEWAY6 + bytes([1, 1]) + mac
        return icmp6_frame(135, 0, 0, 0, body, src, SOLICITED_GW6, hop_limit=255, eth_src=mac,
                           eth_dst=bytes.fromhex("3333ff000002"))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("syn", "udp", "frag", "dhcp", "dns", "arp", "ndp"))
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--port", type=int, default=9)
    p.add_argument("--rate", type=float, default=0.0, help="frames per second (0: no limit)")
    args = p.parse_args()
    flood = Flood(args.ifname, args.port)
    make: Callable[[], bytes] = getattr(flood, args.kind)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.ifname, 0))
    start = time.monotonic()
    end = start + args.seconds
    sent = 0
    while sent < args.count:
        if sent % 64 == 0:
            now = time.monotonic()
            if now >= end:
                break
            if args.rate and sent > args.rate * (now - start):
                time.sleep(0.001)  # ahead of the rate: let it catch up
                continue
        try:
            sock.send(make())
            sent += 1
        except OSError:  # ENOBUFS: the device queue is full; the flood goes on
            time.sleep(0.0005)
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - start, 3)}))


if __name__ == "__main__":
    main()
