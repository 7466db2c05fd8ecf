"""UDP segmentation offloads through a whole datapath, without root.

A unix datagram socketpair stands in for the TAP fd (as in test_tap.py: one read is one
virtio-net header and one frame), the port is told it takes USO (a socketpair refuses the
TUNSETOFFLOAD ioctl), and the host side is real UDP sockets on loopback: guest super-frames in,
datagrams counted and compared on a host socket; host datagrams in, the frames toward the guest
cut as the guest's kernel would and compared byte for byte. The core alone is checked with a
fake socket for the exact ``sendto_segments`` call.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether

import guestnet.io.tap as tap_mod
from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.icmp import IcmpService
from guestnet.core.policy import Policy
from guestnet.core.udp import UdpFlow, UdpNat
from guestnet.io.tap import (
    DEFAULT_OFFLOADS,
    TSO_MAX_PACKET,
    USO_OFFLOADS,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_UDP_L4,
    VNET_HDR_LEN,
    TapLink,
    build_vnet_hdr,
    parse_vnet_hdr,
)
from guestnet.pool import FramePool
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import build_ethernet
from guestnet.wire.ipv4 import build_ipv4
from guestnet.wire.ipv6 import build_ipv6

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("52550a000202")
GUEST4 = bytes([10, 0, 2, 15])
GW4 = bytes([10, 0, 2, 2])
GUEST6 = bytes.fromhex("fd000000000000000000000000000015")
GW6 = bytes.fromhex("fd000000000000000000000000000002")
SOL_UDP, UDP_SEGMENT = 17, 103


def datagram(i: int, size: int) -> bytes:
    """Datagram ``i`` of ``size`` bytes: its sequence number, then a pattern of it."""
    head = struct.pack("!I", i)
    return (head + bytes([(i * 7 + k) & 0xFF for k in range(size - 4)]))[:size]


def guest_frame(v6: bool, sport: int, dport: int, payload: bytes, partial: bool) -> bytes:
    """A guest frame to the gateway: UDP over IPv4 or IPv6, with a partial checksum (as a
    kernel hands over a super-frame) or a whole one."""
    src, dst = (GUEST6, GW6) if v6 else (GUEST4, GW4)
    l4_len = 8 + len(payload)
    hlen = 40 if v6 else 20
    buf = bytearray(14 + hlen + l4_len)
    off = build_ethernet(buf, 0, OUR_MAC, GUEST_MAC, 0x86DD if v6 else 0x0800)
    if v6:
        off = build_ipv6(buf, off, src, dst, 17, l4_len, 64)
    else:
        off = build_ipv4(buf, off, src, dst, 17, l4_len, ident=7, frag=0)
    pseudo = pseudo_header_sum(src, dst, 17, l4_len)
    buf[off + 8 :] = payload
    struct.pack_into("!HHHH", buf, off, sport, dport, l4_len, 0)
    csum = pseudo if partial else (checksum(buf[off:], pseudo) or 0xFFFF)
    struct.pack_into("!H", buf, off + 6, csum)
    return bytes(buf)


def vnet(gso_size: int, v6: bool) -> bytes:
    cs = 14 + (40 if v6 else 20)
    return struct.pack("<BBHHHHH", VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4, cs + 8, gso_size, cs, 6, 0)


def cut(raw: bytes) -> list[tuple[bytes, int]]:
    """What the guest's kernel makes of one frame from guestnet: [(UDP payload, sport)], after
    checking its header. A USO super-frame is cut at ``gso_size`` and must carry the
    pseudo-header sum of its whole length; a plain frame must carry a valid checksum (scapy
    recomputes it), or a partial one when the header says NEEDS_CSUM."""
    hdr = parse_vnet_hdr(raw)
    frame = raw[VNET_HDR_LEN:]
    pkt = Ether(frame)
    v6 = IPv6 in pkt
    ip = pkt[IPv6] if v6 else pkt[IP]
    udp = pkt[UDP]
    l4_off = 14 + (40 if v6 else 20)
    l4 = frame[l4_off:]
    src = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip.src)
    dst = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip.dst)
    assert udp.len == len(l4)
    if hdr.flags & VNET_F_NEEDS_CSUM:
        assert (hdr.csum_start, hdr.csum_offset) == (l4_off, 6)
        assert udp.chksum == pseudo_header_sum(src, dst, 17, udp.len)
    else:
        assert checksum(l4, pseudo_header_sum(src, dst, 17, udp.len)) == 0
    payload = l4[8:]
    if hdr.gso_type == VNET_GSO_UDP_L4:
        assert hdr.hdr_len == l4_off + 8 and hdr.gso_size > 0
        assert len(payload) > hdr.gso_size
        step = hdr.gso_size
        return [(payload[at : at + step], udp.sport) for at in range(0, len(payload), step)]
    assert hdr.gso_type == 0
    return [(payload, udp.sport)]


class Rig:
    """An Instance with a TapLink on a socketpair; the port takes USO (and checksums) unless
    told otherwise; a host UDP socket on loopback stands for the host."""

    def __init__(self, v6: bool, uso: bool, mtu: int = 1500) -> None:
        ours, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.guest.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.guest.settimeout(2.0)
        self.inst = Instance(Config(mtu=mtu), echo_mode=None)
        self.link = TapLink(self.inst.hub, ours.detach(), "tap0", "eth0")
        port = self.link.port
        port.offload_max = TSO_MAX_PACKET if uso else 0
        port.udp_offload = uso
        self.v6 = v6
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        self.host = socket.socket(fam, socket.SOCK_DGRAM)
        self.host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.host.bind(("::1" if v6 else "127.0.0.1", 0))
        self.host.settimeout(2.0)
        self.hport = self.host.getsockname()[1]
        self.flow_addr: Any = None

    def send_guest(self, payload: bytes, gso: int = 0, sport: int = 40000) -> None:
        frame = guest_frame(self.v6, sport, self.hport, payload, partial=bool(gso))
        hdr = vnet(gso, self.v6) if gso else bytes(VNET_HDR_LEN)
        self.guest.send(hdr + frame)
        self.inst.loop.run_once(max_wait=1.0)

    def open_flow(self) -> None:
        """One datagram from the guest: the flow exists and we know its host address."""
        self.send_guest(b"hello")
        data, self.flow_addr = self.host.recvfrom(65535)
        assert data == b"hello"

    def host_recv(self, count: int) -> list[bytes]:
        return [self.host.recv(65535) for _ in range(count)]

    def run_until(self, frames: int) -> list[bytes]:
        """Run the loop until the guest has ``frames`` frames (bounded)."""
        got: list[bytes] = []
        self.guest.setblocking(False)
        for _ in range(200):
            self.inst.loop.run_once(max_wait=0.05)
            while True:
                try:
                    raw = self.guest.recv(70000)
                except BlockingIOError:
                    break
                if raw[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] == b"\x86\xdd" and (
                    raw[VNET_HDR_LEN + 20] == 58
                ):
                    continue  # NDP (the router advertisement an IPv6 guest gets first)
                got.append(raw)
            if len(got) >= frames:
                break
        self.guest.settimeout(2.0)
        return got

    def close(self) -> None:
        self.inst.close()
        self.guest.close()
        self.host.close()
        assert self.inst.pool_from_guest.in_use == 0
        assert self.inst.pool_to_guest.in_use == 0


@pytest.fixture(params=[False, True], ids=["ipv4", "ipv6"])
def v6(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def rig(v6: bool) -> Iterator[Rig]:
    r = Rig(v6, uso=True)
    yield r
    r.close()


@pytest.fixture
def plain(v6: bool) -> Iterator[Rig]:
    r = Rig(v6, uso=False)
    yield r
    r.close()


# -- guest -> host ----------------------------------------------------------------------------


def test_guest_super_frame_leaves_as_datagrams_of_its_segment_size(rig: Rig) -> None:
    sizes = [1400] * 46 + [700]
    payload = b"".join(datagram(i, n) for i, n in enumerate(sizes))
    rig.send_guest(payload, gso=1400)
    got = rig.host_recv(len(sizes))
    assert got == [datagram(i, n) for i, n in enumerate(sizes)]
    counters = rig.inst.counters
    assert counters["nat.udp.to_host.gso"] == 1
    assert counters["nat.udp.to_host"] == len(sizes)
    assert counters["link.tap.read.gso_unsupported"] == 0


def test_guest_super_frame_beyond_64_segments_takes_several_sends(rig: Rig) -> None:
    payload = b"".join(datagram(i, 100) for i in range(150))
    rig.send_guest(payload, gso=100)
    assert rig.host_recv(150) == [datagram(i, 100) for i in range(150)]
    assert rig.inst.counters["nat.udp.to_host"] == 150


def test_udp_super_frame_without_uso_is_dropped_and_counted(plain: Rig) -> None:
    plain.send_guest(b"".join(datagram(i, 1000) for i in range(3)), gso=1000)
    assert plain.inst.counters["link.tap.read.gso_unsupported"] == 1
    assert plain.inst.counters["nat.udp.to_host"] == 0


def test_a_burst_of_guest_datagrams_leaves_in_one_gathered_send(rig: Rig) -> None:
    sizes = [1000] * 20 + [400] + [1000] * 5
    for i, n in enumerate(sizes):
        frame = guest_frame(rig.v6, 40000, rig.hport, datagram(i, n), partial=False)
        rig.guest.send(bytes(VNET_HDR_LEN) + frame)
    rig.inst.loop.run_once(max_wait=1.0)
    assert rig.host_recv(len(sizes)) == [datagram(i, n) for i, n in enumerate(sizes)]
    counters = rig.inst.counters
    assert counters["nat.udp.to_host"] == len(sizes)
    # 21 datagrams (the short one closes the batch), then 5 more at the end of the burst.
    assert counters["nat.udp.to_host.gathered"] == 2


def test_gathering_keeps_flows_and_sizes_apart(rig: Rig) -> None:
    other = socket.socket(rig.host.family, socket.SOCK_DGRAM)
    other.bind((rig.host.getsockname()[0], 0))
    other.settimeout(2.0)
    oport = other.getsockname()[1]
    plan = [(40000, rig.hport, 1000), (40000, rig.hport, 1000), (40001, rig.hport, 1000),
            (40000, oport, 1000), (40000, rig.hport, 1200), (40000, rig.hport, 0),
            (40000, rig.hport, 1000), (40000, rig.hport, 1000)]  # fmt: skip
    for i, (sport, dport, n) in enumerate(plan):
        frame = guest_frame(rig.v6, sport, dport, datagram(i, n) if n else b"", partial=False)
        rig.guest.send(bytes(VNET_HDR_LEN) + frame)
    rig.inst.loop.run_once(max_wait=1.0)
    want = [datagram(i, n) if n else b"" for i, (_s, d, n) in enumerate(plan) if d == rig.hport]
    assert rig.host_recv(len(want)) == want
    assert other.recv(65535) == datagram(3, 1000)
    other.close()
    assert rig.inst.counters["nat.udp.to_host"] == len(plan)


class SegSocket:
    """A fake host socket recording what the core asked for."""

    def __init__(self, flow: UdpFlow) -> None:
        self.calls: list[tuple[str, bytes, tuple[str, int], int]] = []

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        self.calls.append(("sendto", bytes(data), addr, 0))
        return len(data)

    def sendto_segments(self, data: memoryview, addr: tuple[str, int], size: int) -> int:
        self.calls.append(("segments", bytes(data), addr, size))
        return -(-len(data) // size)

    def close(self) -> None:
        pass


def test_core_hands_the_segment_size_to_the_socket(core: Any, frames: Any) -> None:
    socks: list[SegSocket] = []

    def open_socket(flow: UdpFlow) -> SegSocket:
        socks.append(SegSocket(flow))
        return socks[-1]

    policy = Policy(core.config)
    icmp = IcmpService(core.config, core.pool, core.counters, core.switch, policy)
    nat = UdpNat(core.config, core.pool, core.counters, core.switch, policy, icmp, open_socket)
    core.classifier.udp_nat = nat
    payload = b"".join(datagram(i, 1000) for i in range(5))
    core.port.rx_gso_size = 1000
    core.feed(frames.udp(sport=40000, dport=9999, payload=payload), csum_trusted=True)
    core.port.rx_gso_size = 0
    core.feed(frames.udp(sport=40000, dport=9999, payload=b"one"))
    addr = (str(ipaddress.ip_address(frames.REMOTE_IP)), 9999)
    assert socks[0].calls == [("segments", payload, addr, 1000), ("sendto", b"one", addr, 0)]
    assert core.counters["nat.udp.to_host"] == 6
    # Gathering: nothing leaves until the burst ends (or a sweep comes), then one call.
    socks[0].calls.clear()
    nat.gather_sends = True
    for i in range(3):
        core.feed(frames.udp(sport=40000, dport=9999, payload=datagram(i, 700)))
    assert socks[0].calls == []
    nat.expire(core.now)
    gathered = b"".join(datagram(i, 700) for i in range(3))
    assert socks[0].calls == [("segments", gathered, addr, 700)]
    core.feed(frames.udp(sport=40000, dport=9999, payload=b"lone"))
    nat.flush_sends()
    nat.flush_sends()
    assert socks[0].calls[1:] == [("sendto", b"lone", addr, 0)]
    nat.close_all()


# -- host -> guest ----------------------------------------------------------------------------


def _payloads(frames: list[bytes]) -> list[bytes]:
    return [p for raw in frames for p, _sport in cut(raw)]


def test_replies_of_one_source_become_one_uso_frame(rig: Rig) -> None:
    rig.open_flow()
    sizes = [1400] * 40 + [333]
    for i, n in enumerate(sizes):
        rig.host.sendto(datagram(i, n), rig.flow_addr)
    got = rig.run_until(1)
    assert _payloads(got) == [datagram(i, n) for i, n in enumerate(sizes)]
    first = parse_vnet_hdr(got[0])
    assert first.gso_type == VNET_GSO_UDP_L4 and first.gso_size == 1400
    assert len(got) < 5  # gathered: a handful of frames at most, not 41
    assert rig.inst.counters["nat.udp.to_guest"] == len(sizes)


def test_replies_of_mixed_sizes_arrive_whole_and_in_order(rig: Rig) -> None:
    rig.open_flow()
    sizes = [1000, 1000, 1000, 200, 1000, 1400, 1400, 0, 5, 5, 1472 - 20 * rig.v6, 9]
    for i, n in enumerate(sizes):
        rig.host.sendto(datagram(i, n) if n >= 4 else b"x" * n, rig.flow_addr)
    want = [datagram(i, n) if n >= 4 else b"x" * n for i, n in enumerate(sizes)]
    got: list[bytes] = []
    for _ in range(20):
        got += rig.run_until(1)
        if len(_payloads(got)) >= len(want):
            break
    assert _payloads(got) == want


def test_a_host_gso_batch_reaches_the_guest_as_one_uso_frame(rig: Rig) -> None:
    rig.open_flow()
    batch = b"".join(datagram(i, 1200) for i in range(30))
    rig.host.sendmsg([batch], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1200))], 0, rig.flow_addr)
    got = rig.run_until(1)
    assert len(got) == 1
    assert parse_vnet_hdr(got[0]).gso_size == 1200
    assert _payloads(got) == [datagram(i, 1200) for i in range(30)]


def test_without_uso_replies_go_one_datagram_per_frame(plain: Rig) -> None:
    plain.open_flow()
    batch = b"".join(datagram(i, 1200) for i in range(10))
    plain.host.sendmsg([batch], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 1200))], 0,
                       plain.flow_addr)  # fmt: skip
    for i in range(10, 15):
        plain.host.sendto(datagram(i, 1200), plain.flow_addr)
    got = plain.run_until(15)
    assert len(got) == 15
    assert all(raw[:VNET_HDR_LEN] == bytes(VNET_HDR_LEN) for raw in got)
    assert _payloads(got) == [datagram(i, 1200) for i in range(15)]


def test_datagrams_above_the_mtu_are_fragmented_not_offloaded(rig: Rig) -> None:
    rig.open_flow()
    for i in range(3):
        rig.host.sendto(datagram(i, 3000), rig.flow_addr)
    got = rig.run_until(9)
    assert all(parse_vnet_hdr(raw).gso_type == 0 for raw in got)
    assert all(len(raw) - VNET_HDR_LEN - 14 <= 1500 for raw in got)
    if rig.v6:
        assert all(IPv6ExtHdrFragment in Ether(raw[VNET_HDR_LEN:]) for raw in got)
    else:
        assert all(Ether(raw[VNET_HDR_LEN:])[IP].flags.MF or Ether(raw[VNET_HDR_LEN:])[IP].frag
                   for raw in got)  # fmt: skip
    assert len(got) == 9
    assert rig.inst.counters["nat.udp.to_guest.fragmented"] == 3


def test_one_datagram_carries_a_partial_checksum_to_a_link_that_takes_it(rig: Rig) -> None:
    rig.open_flow()
    rig.host.sendto(b"single", rig.flow_addr)
    (raw,) = rig.run_until(1)
    hdr = parse_vnet_hdr(raw)
    assert (hdr.flags, hdr.gso_type) == (VNET_F_NEEDS_CSUM, 0)
    assert _payloads([raw]) == [b"single"]


# -- the TAP's virtio-net header and offload flags ----------------------------------------------


def test_golden_vnet_header_for_a_udp_super_frame() -> None:
    pool = FramePool(1500, 2)
    frame = pool.acquire()
    frame.length = 42 + 3 * 1400
    frame.csum_start, frame.csum_offset, frame.gso_size = 34, 6, 1400
    buf = bytearray(VNET_HDR_LEN)
    build_vnet_hdr(buf, 0, frame)
    # flags NEEDS_CSUM, gso_type UDP_L4 (5), hdr_len 42, gso_size 1400, csum_start 34,
    # csum_offset 6, num_buffers 0; little-endian.
    assert bytes(buf) == bytes.fromhex("01052a007805220006000000")
    frame.csum_start = 54
    build_vnet_hdr(buf, 0, frame)
    assert bytes(buf) == bytes.fromhex("01053e007805360006000000")  # IPv6: 14 + 40 + 8
    pool.release(frame)


def test_uso_is_asked_for_and_dropped_when_the_kernel_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []

    def fake(fd: int, flags: int) -> None:
        asked.append(flags)
        if flags & USO_OFFLOADS:
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(tap_mod, "set_offloads", fake)
    ours, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inst = Instance(Config(), echo_mode=None)
    try:
        link = TapLink(inst.hub, ours.detach(), "tap0", "eth0")
        assert asked == [DEFAULT_OFFLOADS, DEFAULT_OFFLOADS & ~USO_OFFLOADS]
        assert link.port.offload_max == TSO_MAX_PACKET and not link.port.udp_offload
        assert inst.counters["link.tap.offload.uso_unsupported"] == 1
        assert inst.counters["link.tap.offload.unsupported"] == 0
        asked.clear()
        monkeypatch.setattr(tap_mod, "set_offloads", lambda fd, flags: asked.append(flags))
        link2 = TapLink(inst.hub, os.dup(link.fd), "tap1", "eth1")
        assert asked == [DEFAULT_OFFLOADS]
        assert link2.port.udp_offload
    finally:
        inst.close()
        other.close()


def test_a_super_frame_to_a_published_ports_client_goes_one_datagram_at_a_time(
    core: Any, frames: Any
) -> None:
    policy = Policy(core.config)
    icmp = IcmpService(core.config, core.pool, core.counters, core.switch, policy)
    nat = UdpNat(core.config, core.pool, core.counters, core.switch, policy, icmp,
                 lambda flow: SegSocket(flow))  # fmt: skip
    core.classifier.udp_nat = nat
    to_client: list[bytes] = []
    nat.deliver_inbound(("1", ("127.0.0.1", 5000)), lambda d: to_client.append(bytes(d)),
                        frames.GUEST_IP, 7000, 5000, memoryview(b"ping"), core.now)  # fmt: skip
    assert len(core.take_sent()) == 1
    payload = b"".join(datagram(i, 900) for i in range(4)) + datagram(4, 100)
    core.port.rx_gso_size = 900
    core.feed(frames.udp(sport=7000, dport=5000, payload=payload, dst=frames.GATEWAY_IP),
              csum_trusted=True)  # fmt: skip
    core.port.rx_gso_size = 0
    assert to_client == [datagram(i, 900) for i in range(4)] + [datagram(4, 100)]
    assert core.counters["nat.udp.forward.to_host"] == 5
    nat.close_all()


def test_a_super_frame_to_a_one_datagram_service_arrives_one_datagram_at_a_time(
    core: Any, frames: Any
) -> None:
    got: list[bytes] = []

    class Recorder:
        def handle_udp(self, pkt: Any, sport: int, dport: int, payload: Any, now: float) -> None:
            got.append(bytes(payload))

    core.classifier.dns_udp = Recorder()
    payload = b"".join(datagram(i, 60) for i in range(3)) + b"tail"
    core.port.rx_gso_size = 60
    core.feed(frames.udp(sport=5353, dport=53, payload=payload, dst=frames.DNS_IP),
              csum_trusted=True)  # fmt: skip
    core.port.rx_gso_size = 0
    assert got == [datagram(i, 60) for i in range(3)] + [b"tail"]
