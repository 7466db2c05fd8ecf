"""Frames per second through FrameClassifier in process, and pool misses in steady state.

Run: .venv/bin/python bench/bench_classifier.py [--quick]

Rows:

- ``arp``: ARP requests for the gateway through the classifier and the ArpResponder; each reply
  is built in a pooled frame and released by the port (as a link does after writing it).
- ``udp->null``: 64-byte UDP datagrams to the NAT slot, held by a service that does nothing: the
  cost of Ethernet + IPv4 + UDP parsing and checksum verification.
- ``udp->null trusted``: the same with ``csum_trusted`` (a TAP with offloads vouching for it).
- ``udp6->null`` (and ``trusted``): the same datagram over IPv6 to the IPv6 NAT slot: the
  IPv6 header, its (empty) extension-header walk and the guest-address learning.
- ``ns->na``: Neighbor Solicitations for the gateway answered by the NDP service (validation,
  options, the advertisement built in a pooled frame with its ICMPv6 checksum).

Each row runs ``REPEATS`` batches and prints the median rate. Then one million ARP requests are
answered after a warm-up, and the pool's misses over them are printed (expected: 0).
"""

from __future__ import annotations

import statistics
import sys
import time

from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.ndp import NdpService
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire.arp import ARP_REQUEST, build_arp
from guestnet.wire.ethernet import (
    BROADCAST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    build_ethernet,
)
from guestnet.wire.icmpv6 import ND_NEIGHBOR_SOLICIT, build_icmpv6
from guestnet.wire.ipv4 import PROTO_UDP, build_ipv4
from guestnet.wire.ipv6 import PROTO_ICMPV6, build_ipv6, multicast_mac, solicited_node
from guestnet.wire.udp import build_udp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
REMOTE_IP = bytes([93, 184, 216, 34])
REPEATS = 7
GUEST_IP6 = bytes.fromhex("fd000000000000000000000000000015")
GATEWAY_IP6 = bytes.fromhex("fd000000000000000000000000000002")
REMOTE_IP6 = bytes.fromhex("20010db8000000000000000000000001")


class NullUdp:
    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        pass


def make() -> tuple[FrameClassifier, Port, FramePool]:
    config = Config()
    pool = FramePool(config.mtu, config.pool_slots)
    counters = Counters()
    switch = Switch(pool, counters)
    classifier = FrameClassifier(config, pool, counters, switch)
    release = pool.release

    def send(frame: Frame) -> None:
        release(frame)

    port = Port("bench0", send)
    switch.attach(port)
    classifier.udp_nat = NullUdp()
    classifier.udp_nat6 = NullUdp()
    classifier.ndp = NdpService(config, pool, counters, switch)
    port.ip6_seen = True
    return classifier, port, pool


def arp_request() -> memoryview:
    buf = bytearray(42)
    off = build_ethernet(buf, 0, BROADCAST, GUEST_MAC, ETHERTYPE_ARP)
    build_arp(buf, off, ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), bytes([10, 0, 2, 2]))
    return memoryview(buf)


def udp_datagram(payload_len: int = 64) -> memoryview:
    buf = bytearray(14 + 20 + 8 + payload_len)
    off = build_ethernet(buf, 0, bytes.fromhex("52550a000202"), GUEST_MAC, ETHERTYPE_IPV4)
    off = build_ipv4(buf, off, GUEST_IP, REMOTE_IP, PROTO_UDP, 8 + payload_len)
    buf[off + 8 :] = bytes(range(payload_len))
    build_udp(buf, off, 40000, 9999, payload_len, GUEST_IP, REMOTE_IP)
    return memoryview(buf)


def udp6_datagram(payload_len: int = 64) -> memoryview:
    buf = bytearray(14 + 40 + 8 + payload_len)
    off = build_ethernet(buf, 0, bytes.fromhex("52550a000202"), GUEST_MAC, ETHERTYPE_IPV6)
    off = build_ipv6(buf, off, GUEST_IP6, REMOTE_IP6, PROTO_UDP, 8 + payload_len)
    buf[off + 8 :] = bytes(range(payload_len))
    build_udp(buf, off, 40000, 9999, payload_len, GUEST_IP6, REMOTE_IP6)
    return memoryview(buf)


def neighbor_solicitation() -> memoryview:
    group = solicited_node(GATEWAY_IP6)
    body = GATEWAY_IP6 + bytes((1, 1)) + GUEST_MAC
    buf = bytearray(14 + 40 + 8 + len(body))
    off = build_ethernet(buf, 0, multicast_mac(group), GUEST_MAC, ETHERTYPE_IPV6)
    off = build_ipv6(buf, off, GUEST_IP6, group, PROTO_ICMPV6, 8 + len(body), 255)
    buf[off + 8 :] = body
    build_icmpv6(buf, off, ND_NEIGHBOR_SOLICIT, 0, 0, 0, len(body), GUEST_IP6, group)
    return memoryview(buf)


def rate(frame: memoryview, count: int, trusted: bool = False) -> float:
    classifier, port, _pool = make()
    handle = classifier.handle_frame
    rates = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(count):
            handle(frame, port, 0.0, trusted)
        rates.append(count / (time.perf_counter() - t0))
    return statistics.median(rates)


def steady_state_misses(total: int) -> tuple[int, int, float]:
    classifier, port, pool = make()
    frame = arp_request()
    handle = classifier.handle_frame
    for _ in range(1000):  # warm-up
        handle(frame, port, 0.0)
    misses = pool.misses
    t0 = time.perf_counter()
    for _ in range(total):
        handle(frame, port, 0.0)
    elapsed = time.perf_counter() - t0
    assert pool.in_use == 0
    return pool.misses - misses, pool.hits, total / elapsed


def main() -> None:
    quick = "--quick" in sys.argv
    count = 5_000 if quick else 50_000
    print(f"classifier, frames/s in process (median of {REPEATS} x {count})")
    print(f"{'row':<20} {'frames/s':>12} {'us/frame':>9}")
    for name, frame, trusted in (
        ("arp", arp_request(), False),
        ("udp->null", udp_datagram(), False),
        ("udp->null trusted", udp_datagram(), True),
        ("udp6->null", udp6_datagram(), False),
        ("udp6->null trusted", udp6_datagram(), True),
        ("ns->na", neighbor_solicitation(), False),
    ):
        r = rate(frame, count, trusted)
        print(f"{name:<20} {r:>12,.0f} {1e6 / r:>9.2f}")
    total = 100_000 if quick else 1_000_000
    misses, hits, r = steady_state_misses(total)
    print(
        f"pool misses over {total:,} ARP replies after warm-up: {misses} (hits {hits:,}, "
        f"{r:,.0f} frames/s)"
    )


if __name__ == "__main__":
    main()
