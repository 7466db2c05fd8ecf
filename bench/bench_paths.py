"""CPU time per frame through the core's paths, robust to a busy machine (for A/B runs).

Run: .venv/bin/python bench/bench_paths.py [--quick] [--ab]

Each row feeds one prepared frame through the :class:`FrameClassifier` (or hands one reply to the
UDP NAT) in batches and reports the *CPU* time of the calling thread per frame
(``time.thread_time``), the minimum and the median over the batches. On the shared 2-vCPU
machines wall-clock rates swing by 2x when other jobs run; CPU time of the thread, and the best
batch especially, do not, so two trees can be compared in one sitting (``PYTHONPATH=OTHER/src``
for the other tree, runs interleaved).

Rows:

- ``arp``: an ARP request for the gateway, answered.
- ``udp->null`` / ``udp->null trusted``: a 64-byte UDP datagram parsed, checksum verified (or
  trusted) and routed to a NAT that does nothing.
- ``udp->nat``: the same datagram through the real UDP NAT: source and destination policy, the
  flow lookup and a ``sendto`` on a socket that does nothing.
- ``nat reply->guest`` / ``nat reply 1400B``: a 64-byte (1400-byte) reply from the host through
  ``UdpNat.deliver_reply``: headers and UDP checksum written, frame sent (to a port that
  releases it).
- ``icmp echo gateway``: an echo request to the gateway, answered by the ICMP service.
- ``dns builtin``: an A query for host.guestnet.internal, answered (dnspython dominates).
- ``dhcp discover``: a DHCPDISCOVER answered with an OFFER.
- ``tcp ack ipv4`` / ``tcp ack ipv6``: a bare ACK of an established TCP flow from a link that
  vouches for checksums (a TAP with offloads), through the classifier's fast path into the TCP
  NAT (nothing in flight, nothing sent): the per-segment cost of each family.
- ``tcp rr 1B ipv4`` / ``ipv6`` / ``1460B``: one request-response turn of an established flow in
  the core: the host socket has N bytes (read by ``host_readable`` into a frame, headers and
  full TCP checksum written, sent to a link without offloads that releases it), then the
  guest's data segment of N bytes arrives through the classifier's fast path, taken by the
  NAT (its payload "sent" to the host, and the host data acknowledged).
- ``... qemu``: the same from a link that does not vouch for checksums (QEMU stream/dgram): the
  guest's TCP checksum is verified (since the native fast path, on the fast path too).

The leaf operations run in the C extension unless ``GUESTNET_PURE=1`` (guestnet.wire.native);
run the script both ways back to back for an A/B (``--ab`` does that in child processes,
interleaved, and prints both columns and their ratio).

Only in-process objects: no sockets, no namespaces.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import dns.message
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.dhcp import DhcpServer
from guestnet.core.dns import DnsService
from guestnet.core.icmp import IcmpService
from guestnet.core.policy import Policy
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.core.tcp import TcpFlow, TcpNat
from guestnet.core.udp import UdpFlow, UdpNat
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.arp import ARP_REQUEST, build_arp
from guestnet.wire.ethernet import (
    BROADCAST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    build_ethernet,
)
from guestnet.wire.icmp import ICMP_ECHO_REQUEST, build_icmp
from guestnet.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, build_ipv4
from guestnet.wire.ipv6 import build_ipv6
from guestnet.wire.tcp import ACK, SYN, build_syn_options, build_tcp
from guestnet.wire.udp import build_udp

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("52550a000202")
GUEST_IP = bytes([10, 0, 2, 15])
REMOTE_IP = bytes([93, 184, 216, 34])
GATEWAY_IP = bytes([10, 0, 2, 2])
DNS_IP = bytes([10, 0, 2, 3])


class NullSocket:
    """A host socket that takes every datagram and does nothing."""

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        return len(data)

    def close(self) -> None:
        pass


class NullUdp:
    def handle_udp(self, *args: object) -> None:
        pass


class Rig:
    """A classifier with every UDP/ICMP service attached; frames to the guest are released."""

    def __init__(self, null_nat: bool) -> None:
        config = Config()
        self.pool = pool = FramePool(config.mtu, config.pool_slots)
        counters = Counters()
        switch = Switch(pool, counters)
        self.classifier = cl = FrameClassifier(config, pool, counters, switch)
        self.port = Port("bench0", pool.release)
        switch.attach(self.port)
        policy = Policy(config)
        icmp = IcmpService(config, pool, counters, switch, policy)
        self.nat = UdpNat(config, pool, counters, switch, policy, icmp, self._open)
        cl.udp_nat = NullUdp() if null_nat else self.nat
        cl.icmp = icmp
        cl.dns_udp = DnsService(config, pool, counters, [])
        cl.dhcp = DhcpServer(config, pool, counters)

    def _open(self, _flow: UdpFlow) -> NullSocket:
        return NullSocket()


def ip_frame(dst: bytes, proto: int, l4: bytes) -> memoryview:
    buf = bytearray(34 + len(l4))
    off = build_ethernet(buf, 0, OUR_MAC, GUEST_MAC, ETHERTYPE_IPV4)
    off = build_ipv4(buf, off, GUEST_IP, dst, proto, len(l4))
    buf[off:] = l4
    return memoryview(buf)


def udp_frame(dst: bytes, dport: int, payload: bytes) -> memoryview:
    frame = ip_frame(dst, PROTO_UDP, bytes(8) + payload)
    build_udp(frame, 34, 40000, dport, len(payload), GUEST_IP, dst)
    return frame


def echo_frame() -> memoryview:
    frame = ip_frame(GATEWAY_IP, PROTO_ICMP, bytes(8) + bytes(range(56)))
    build_icmp(frame, 34, ICMP_ECHO_REQUEST, 0, 7, 1, 56)
    return frame


def arp_frame() -> memoryview:
    buf = bytearray(42)
    off = build_ethernet(buf, 0, BROADCAST, GUEST_MAC, ETHERTYPE_ARP)
    build_arp(buf, off, ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY_IP)
    return memoryview(buf)


def dhcp_frame() -> memoryview:
    pkt = (
        Ether(src="52:54:00:12:34:56", dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=GUEST_MAC, xid=0x1234, flags=0x8000)
        / DHCP(options=[("message-type", "discover"), "end"])
    )
    return memoryview(bytes(pkt))


GUEST_IP6 = bytes.fromhex("fd000000000000000000000000000015")
GATEWAY_IP6 = bytes.fromhex("fd000000000000000000000000000002")


class NullTcpIo:
    """A TcpIo whose host socket takes everything and has ``pending`` bytes to read (once)."""

    pending = 0

    def connect(self, flow: TcpFlow) -> int:
        flow.io_data = object()
        return 0

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        return len(data)

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        n, self.pending = self.pending, 0
        return n if n else -1

    def send_room(self, flow: TcpFlow) -> int:
        return 1 << 20

    def shutdown_write(self, flow: TcpFlow) -> None:
        pass

    def close(self, flow: TcpFlow, reset: bool) -> None:
        pass

    def set_timer(self, flow: TcpFlow, when: float | None) -> None:
        pass

    def request_flush(self) -> None:
        pass


def tcp_frame(
    v6: bool, flags: int, seq: int, ack: int, options: bytes = b"", payload: bytes = b""
) -> memoryview:
    src, dst = (GUEST_IP6, GATEWAY_IP6) if v6 else (GUEST_IP, GATEWAY_IP)
    hlen = 20 + len(options) + len(payload)
    l4 = bytearray(hlen)
    l4[20 + len(options) :] = payload
    build_tcp(l4, 0, 40000, 8080, seq, ack, flags, 65535, len(payload), src, dst, options)
    l3 = 54 if v6 else 34
    buf = bytearray(l3 + hlen)
    off = build_ethernet(buf, 0, OUR_MAC, GUEST_MAC, ETHERTYPE_IPV6 if v6 else ETHERTYPE_IPV4)
    if v6:
        build_ipv6(buf, off, src, dst, PROTO_TCP, hlen, 64)
    else:
        build_ipv4(buf, off, src, dst, PROTO_TCP, hlen)
    buf[l3:] = l4
    return memoryview(buf)


def tcp_rr_call(v6: bool, size: int, turns: int, trusted: bool = True) -> Callable[[], object]:
    """An established flow on a link without offloads; each call is one turn: ``size`` bytes
    from the host to the guest (segment built with its checksum), then ``size`` bytes from the
    guest acknowledging them (classifier fast path, NAT), for up to ``turns`` calls."""
    config = Config()
    pool = FramePool(config.mtu, config.pool_slots)
    counters = Counters()
    switch = Switch(pool, counters)
    cl = FrameClassifier(config, pool, counters, switch)
    port = Port("bench0", pool.release)
    port.guest_mac = GUEST_MAC
    switch.attach(port)
    io = NullTcpIo()
    nat = TcpNat(config, pool, counters, Policy(config), io, isn=lambda: 1000)
    cl.tcp_nat = cl.tcp_nat6 = nat
    cl.tcp_fast = nat.handle_fast
    handle = cl.handle_frame
    handle(tcp_frame(v6, SYN, 5000, 0, build_syn_options(1460, 7)), port, 0.0, True)
    (flow,) = nat.table
    nat.host_connected(flow, 0, 0.0)
    handle(tcp_frame(v6, ACK, 5001, 1001), port, 0.0, True)
    assert flow.state_name == "ESTABLISHED"
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frames = iter(
        [
            tcp_frame(v6, ACK | 0x08, 5001 + k * size, 1001 + (k + 1) * size, b"", payload)
            for k in range(turns)
        ]
    )
    readable = nat.host_readable

    def turn() -> None:
        io.pending = size
        readable(flow, 0.0)
        handle(next(frames), port, 0.0, trusted)

    return turn


def tcp_ack_call(v6: bool, trusted: bool = True) -> Callable[[], object]:
    """A classifier with the TCP NAT on its fast path and one established flow; the call
    feeds that flow's bare ACK, as a TAP with offloads hands it over."""
    config = Config()
    pool = FramePool(config.mtu, config.pool_slots)
    counters = Counters()
    switch = Switch(pool, counters)
    cl = FrameClassifier(config, pool, counters, switch)
    port = Port("bench0", pool.release)
    port.guest_mac = GUEST_MAC
    switch.attach(port)
    nat = TcpNat(config, pool, counters, Policy(config), NullTcpIo(), isn=lambda: 1000)
    cl.tcp_nat = cl.tcp_nat6 = nat
    cl.tcp_fast = nat.handle_fast
    handle = cl.handle_frame
    handle(tcp_frame(v6, SYN, 5000, 0, build_syn_options(1460, 7)), port, 0.0, True)
    (flow,) = nat.table
    nat.host_connected(flow, 0, 0.0)
    handle(tcp_frame(v6, ACK, 5001, 1001), port, 0.0, True)
    assert flow.state_name == "ESTABLISHED"
    ack = tcp_frame(v6, ACK, 5001, 1001)
    return lambda: handle(ack, port, 0.0, trusted)


def cpu_per_call(fn: Callable[[], object], n: int, batches: int) -> tuple[float, float]:
    """(min, median) thread CPU µs per call over ``batches`` batches of ``n`` calls."""
    clock = time.thread_time
    per: list[float] = []
    for _ in range(batches):
        t0 = clock()
        for _ in range(n):
            fn()
        per.append((clock() - t0) / n * 1e6)
    return min(per), statistics.median(per)


def ab(rounds: int) -> None:
    """Run this script pure and native, interleaved, ``rounds`` times each, in child processes;
    print each row's median (over rounds) of the per-round minimum, both ways, and the ratio."""
    args = [a for a in sys.argv[1:] if a != "--ab"]
    mins: dict[str, dict[str, list[float]]] = {"pure": {}, "native": {}}
    order: list[str] = []
    for _ in range(rounds):
        for mode in ("pure", "native"):
            env = dict(os.environ, GUESTNET_PURE="1" if mode == "pure" else "0")
            out = subprocess.run(
                [sys.executable, __file__, *args], env=env, check=True, capture_output=True,
                text=True, timeout=600,
            ).stdout  # fmt: skip
            for line in out.splitlines()[1:]:
                name, lo = line[:20].strip(), float(line[20:].split()[0])
                if name not in order:
                    order.append(name)
                mins[mode].setdefault(name, []).append(lo)
    print(f"thread CPU µs per frame, median over {rounds} rounds of the best batch")
    print(f"{'':<20} {'pure':>8} {'native':>8} {'pure/native':>12}")
    for name in order:
        a = statistics.median(mins["pure"][name])
        b = statistics.median(mins["native"][name])
        print(f"{name:<20} {a:8.2f} {b:8.2f} {a / b:11.2f}x")


def main() -> None:
    if "--ab" in sys.argv:
        ab(3)
        return
    quick = "--quick" in sys.argv
    batches = 8 if quick else 30
    query = dns.message.make_query("host.guestnet.internal", "A").to_wire()
    rows: list[tuple[str, bool, memoryview, bool, int]] = [
        ("arp", True, arp_frame(), False, 2000),
        ("udp->null", True, udp_frame(REMOTE_IP, 9999, bytes(range(64))), False, 2000),
        ("udp->null trusted", True, udp_frame(REMOTE_IP, 9999, bytes(range(64))), True, 2000),
        ("udp->nat", False, udp_frame(REMOTE_IP, 9999, bytes(range(64))), False, 2000),
        ("icmp echo gateway", False, echo_frame(), False, 2000),
        ("dns builtin", False, udp_frame(DNS_IP, 53, query), False, 200),
        ("dhcp discover", False, dhcp_frame(), False, 200),
    ]
    print(f"thread CPU µs per frame ({batches} batches): min, median")
    for name, null_nat, frame, trusted, n in rows:
        rig = Rig(null_nat)
        handle = rig.classifier.handle_frame
        port = rig.port
        lo, med = cpu_per_call(lambda: handle(frame, port, 0.0, trusted), n, batches)  # noqa: B023
        print(f"{name:<20} {lo:8.2f} {med:8.2f}")
    rig = Rig(False)
    rig.classifier.handle_frame(udp_frame(REMOTE_IP, 9999, b"x"), rig.port, 0.0)
    flow = next(iter(rig.nat.flows.values()))
    off = flow.family.udp_payload_off
    payload = bytes(64)
    pool = rig.pool
    nat = rig.nat

    def reply() -> None:
        frame = pool.acquire()
        start = frame.start + off
        frame.view[start : start + 64] = payload
        nat.deliver_reply(flow, frame, 64, "93.184.216.34", 9999, 0.0)

    lo, med = cpu_per_call(reply, 2000, batches)
    print(f"{'nat reply->guest':<20} {lo:8.2f} {med:8.2f}")
    big = bytes(1400)

    def reply_1400() -> None:
        frame = pool.acquire()
        start = frame.start + off
        frame.view[start : start + 1400] = big
        nat.deliver_reply(flow, frame, 1400, "93.184.216.34", 9999, 0.0)

    lo, med = cpu_per_call(reply_1400, 2000, batches)
    print(f"{'nat reply 1400B':<20} {lo:8.2f} {med:8.2f}")
    for name, v6, trusted in (
        ("tcp ack ipv4", False, True),
        ("tcp ack ipv6", True, True),
        ("tcp ack ipv4 qemu", False, False),
    ):
        lo, med = cpu_per_call(tcp_ack_call(v6, trusted), 2000, batches)
        print(f"{name:<20} {lo:8.2f} {med:8.2f}")
    for name, v6, size, trusted in (
        ("tcp rr 1B ipv4", False, 1, True),
        ("tcp rr 1B ipv6", True, 1, True),
        ("tcp rr 1460B ipv4", False, 1460, True),
        ("tcp rr 1B ipv4 qemu", False, 1, False),
        ("tcp rr 1460B qemu", False, 1460, False),
    ):
        lo, med = cpu_per_call(tcp_rr_call(v6, size, 2000 * batches, trusted), 2000, batches)
        print(f"{name:<20} {lo:8.2f} {med:8.2f}")


if __name__ == "__main__":
    main()
