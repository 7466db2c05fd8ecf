"""TAP offloads without root: virtio-net headers, super-frames both ways, and the fallback.

The TCP core runs on the shared core harness with the fake host socket of test_tcp.py; a port
that records each frame's offload metadata stands for a TAP with offloads on. TapLink itself is
driven over a unix datagram socketpair, which behaves like a TAP fd for framing (the ioctls fail
on it, which is the "kernel without offloads" path).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.policy import Policy
from guestnet.core.port import Port
from guestnet.core.tcp import OUR_WSCALE, TcpFlow, TcpNat
from guestnet.io.pcap import complete_partial_checksum
from guestnet.io.tap import (
    TCP_CSUM_OFFSET,
    TSO_MAX_PACKET,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_ECN,
    VNET_GSO_NONE,
    VNET_GSO_TCPV4,
    VNET_GSO_TCPV6,
    VNET_GSO_UDP,
    VNET_HDR_LEN,
    TapLink,
    VnetHdr,
    build_vnet_hdr,
    parse_vnet_hdr,
)
from guestnet.pool import Frame, FramePool
from guestnet.wire.checksum import pseudo_header_sum
from guestnet.wire.ipv4 import PROTO_TCP, parse_ipv4
from guestnet.wire.tcp import ACK, SYN, build_syn_options, build_tcp, parse_tcp, verify_tcp

from .test_tcp import GATEWAY_IP, GUEST_IP, ISN, OUR_ISS, FakeIo, FakeSock

MSS = 1460
#: Payload bytes in one super-frame at MSS 1460: the most whole MSS in a 64 KiB IP packet.
SUPER = (TSO_MAX_PACKET - 40) // MSS * MSS


class Sent(NamedTuple):
    """A frame the core sent, with the offload metadata it carried."""

    data: bytes
    csum_start: int
    csum_offset: int
    gso_size: int


class MetaPort(Port):
    """A Port that keeps each frame's bytes and offload metadata, then releases it."""

    __slots__ = ("pool", "sent")

    def __init__(self, name: str, pool: FramePool, offload_max: int) -> None:
        super().__init__(name, self._collect)
        self.pool = pool
        self.sent: list[Sent] = []
        self.offload_max = offload_max

    def _collect(self, frame: Frame) -> None:
        self.sent.append(
            Sent(bytes(frame.data), frame.csum_start, frame.csum_offset, frame.gso_size)
        )
        self.pool.release(frame)


class Harness:
    """A TcpNat on a 1500-byte core harness, guest on a port with or without offloads."""

    def __init__(self, core: Any, frames: Any, offload_max: int) -> None:
        self.core = core
        self.frames = frames
        self.io = FakeIo()
        self.sends = 0
        real_send = self.io.send

        def counting_send(flow: TcpFlow, data: memoryview) -> int:
            self.sends += 1
            return real_send(flow, data)

        self.io.send = counting_send  # type: ignore[method-assign]
        self.nat = TcpNat(
            core.config, core.pool, core.counters, Policy(core.config), self.io, isn=lambda: OUR_ISS
        )
        core.classifier.tcp_nat = self.nat
        self.port = MetaPort("tap0", core.pool, offload_max)
        core.switch.attach(self.port)

    def send(
        self,
        flags: int,
        seq: int,
        ack: int = 0,
        payload: bytes = b"",
        options: bytes = b"",
        partial: bool = False,
        trusted: bool = False,
    ) -> None:
        """One guest segment; ``partial``: checksum left as the pseudo-header sum (offload)."""
        hlen = 20 + len(options)
        buf = bytearray(hlen + len(payload))
        buf[hlen:] = payload
        build_tcp(buf, 0, 40000, 8080, seq, ack, flags, 0xFFFF, len(payload), GUEST_IP,
                  GATEWAY_IP, options, compute_checksum=not partial)  # fmt: skip
        frame = self.frames.ipv4(PROTO_TCP, bytes(buf), dst=GATEWAY_IP)
        self.core.feed(frame, self.port, csum_trusted=trusted)
        if self.io.flush_requests:
            self.io.flush_requests = 0
            self.nat.flush(self.core.now)

    def take(self) -> list[Sent]:
        sent, self.port.sent = self.port.sent, []
        return sent

    @property
    def flow(self) -> TcpFlow:
        (flow,) = list(self.nat.table)
        return flow

    @property
    def sock(self) -> FakeSock:
        s: FakeSock = self.flow.io_data
        return s

    def open(self) -> None:
        self.send(SYN, ISN, options=build_syn_options(MSS, OUR_WSCALE))
        self.nat.host_connected(self.flow, 0, self.core.now)
        (synack,) = self.take()
        self.send(ACK, ISN + 1, OUR_ISS + 1)
        assert self.take() == []
        assert synack.csum_start == (34 if self.port.offload_max else -1)


@pytest.fixture
def tso(make_core: Any, frames: Any) -> Iterator[Harness]:
    core = make_core(mtu=1500)
    h = Harness(core, frames, TSO_MAX_PACKET)
    yield h
    h.nat.close_all()
    assert core.pool.in_use == 0


@pytest.fixture
def plain(make_core: Any, frames: Any) -> Iterator[Harness]:
    core = make_core(mtu=1500)
    h = Harness(core, frames, 0)
    yield h
    h.nat.close_all()
    assert core.pool.in_use == 0


def tcp_of(sent: Sent) -> tuple[Any, memoryview, Any]:
    ip = parse_ipv4(memoryview(sent.data)[14:])
    l4 = memoryview(sent.data)[14 + ip.header_len : 14 + ip.total_len]
    return ip, l4, parse_tcp(l4)


# -- the virtio-net header ------------------------------------------------------------------------


def _frame_with_tcp_header(data_offset_words: int) -> Frame:
    frame = Frame(4096)
    frame.length = 1000
    frame.view[frame.start + 34 + 12] = data_offset_words << 4
    return frame


def test_vnet_header_for_plain_partial_and_super_frames() -> None:
    buf = bytearray(VNET_HDR_LEN)
    frame = _frame_with_tcp_header(5)
    build_vnet_hdr(buf, 0, frame)
    assert buf == bytes(VNET_HDR_LEN)
    frame.csum_start, frame.csum_offset = 34, TCP_CSUM_OFFSET
    build_vnet_hdr(buf, 0, frame)
    assert parse_vnet_hdr(buf) == VnetHdr(VNET_F_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, 34, 16)
    frame.gso_size = MSS
    build_vnet_hdr(buf, 0, frame)
    assert parse_vnet_hdr(buf) == VnetHdr(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, MSS, 34, 16)
    # Little-endian on a TAP, num_buffers zero.
    assert bytes(buf) == struct.pack("<BBHHHHH", 1, 1, 54, MSS, 34, 16, 0)
    # hdr_len follows the TCP header's own length (options).
    frame = _frame_with_tcp_header(8)
    frame.csum_start, frame.csum_offset, frame.gso_size = 34, 16, 1000
    build_vnet_hdr(buf, 0, frame)
    assert parse_vnet_hdr(buf).hdr_len == 34 + 32


def test_super_frame_gso_type_follows_the_frames_ip_version() -> None:
    """TCPV4 for an IPv4 frame, TCPV6 for an IPv6 one (EtherType 0x86dd, 40-byte header)."""
    buf = bytearray(VNET_HDR_LEN)
    frame = _frame_with_tcp_header(5)
    frame.view[frame.start + 12 : frame.start + 14] = b"\x08\x00"
    frame.csum_start, frame.csum_offset, frame.gso_size = 34, 16, MSS
    build_vnet_hdr(buf, 0, frame)
    assert parse_vnet_hdr(buf).gso_type == VNET_GSO_TCPV4
    frame = Frame(4096)
    frame.length = 1000
    frame.view[frame.start + 12 : frame.start + 14] = b"\x86\xdd"
    frame.view[frame.start + 54 + 12] = 5 << 4
    frame.csum_start, frame.csum_offset, frame.gso_size = 54, 16, MSS
    build_vnet_hdr(buf, 0, frame)
    assert parse_vnet_hdr(buf) == VnetHdr(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 74, MSS, 54, 16)


def test_pool_resets_offload_metadata() -> None:
    pool = FramePool(1500, capacity=1)
    frame = pool.acquire()
    frame.csum_start, frame.csum_offset, frame.gso_size = 34, 16, MSS
    pool.release(frame)
    again = pool.acquire()
    assert again is frame
    assert (again.csum_start, again.gso_size) == (-1, 0)
    pool.release(again)


# -- guest to host --------------------------------------------------------------------------------


def test_guest_super_frame_goes_to_host_in_one_send(tso: Harness) -> None:
    tso.open()
    payload = bytes(range(256)) * 240  # 60 KiB: far above the 1500-byte MTU
    tso.send(ACK, ISN + 1, OUR_ISS + 1, payload, partial=True, trusted=True)
    assert bytes(tso.sock.written) == payload
    assert tso.sends == 1
    assert tso.flow.rcv_nxt == ISN + 1 + len(payload)
    counters = tso.core.counters.snapshot()
    assert not any(k.endswith("bad_checksum") or k.startswith("eth.") for k in counters)
    (ack,) = tso.take()
    _ip, _l4, t = tcp_of(ack)
    assert t.flags == ACK and t.ack == ISN + 1 + len(payload)


def test_partial_checksum_is_dropped_when_the_link_does_not_vouch(tso: Harness) -> None:
    tso.open()
    tso.send(ACK, ISN + 1, OUR_ISS + 1, b"x" * 5000, partial=True, trusted=False)
    assert tso.sock.written == b""
    assert tso.core.counters["tcp.bad_checksum"] == 1


# -- host to guest --------------------------------------------------------------------------------


def test_host_data_leaves_in_super_frames_with_partial_checksums(tso: Harness) -> None:
    tso.open()
    data = bytes(i * 7 & 0xFF for i in range(200_000))
    tso.sock.readable += data
    tso.nat.host_readable(tso.flow, tso.core.now)
    out = tso.take()
    sizes = [len(s.data) - 54 for s in out]
    assert sizes == [SUPER, SUPER, SUPER, len(data) - 3 * SUPER]
    got = bytearray()
    for sent in out:
        ip, l4, t = tcp_of(sent)
        assert sent.csum_start == 34 and sent.csum_offset == 16
        plen = len(l4) - 20
        assert sent.gso_size == (MSS if plen > MSS else 0)
        # The field holds the pseudo-header sum only; completing it gives a valid segment.
        assert struct.unpack_from("!H", l4, 16)[0] == pseudo_header_sum(
            ip.src, ip.dst, PROTO_TCP, len(l4)
        )
        assert not verify_tcp(l4, ip.src, ip.dst)
        done = bytearray(sent.data)
        complete_partial_checksum(done, sent.csum_start, sent.csum_offset)
        assert verify_tcp(memoryview(done)[34:], ip.src, ip.dst)
        assert t.seq == OUR_ISS + 1 + len(got)
        got += l4[20:]
    assert got == data
    assert len(tso.flow.unacked) == len(data)
    tso.send(ACK, ISN + 1, OUR_ISS + 1 + len(data))
    assert len(tso.flow.unacked) == 0


def _count_reads(h: Harness) -> list[int]:
    """Record how many frames each host read of ``h`` is offered."""
    offered: list[int] = []
    real = h.io.recv_into

    def recv_into(flow: TcpFlow, bufs: list[memoryview]) -> int:
        offered.append(len(bufs))
        return real(flow, bufs)

    h.io.recv_into = recv_into  # type: ignore[method-assign]
    return offered


@pytest.mark.parametrize("link", ["tso", "plain"])
def test_first_host_read_offers_one_super_frame(link: str, request: pytest.FixtureRequest) -> None:
    """A flow's first read: one super-frame holds any answer that fits it (a plain ``recv``
    into one pool frame); plain frames, two. Reads that fill every frame grow as before."""
    h: Harness = request.getfixturevalue(link)
    h.open()
    offered = _count_reads(h)
    h.sock.readable += b"a"
    h.nat.host_readable(h.flow, h.core.now)
    (answer,) = h.take()
    assert answer.data[54:55] == b"a"
    assert offered[0] == (1 if link == "tso" else 2), offered
    h.send(ACK, ISN + 1, OUR_ISS + 2)
    offered.clear()
    frame = SUPER if link == "tso" else MSS
    h.sock.readable += bytes(frame * 7)
    h.nat.host_readable(h.flow, h.core.now)
    grow = [1, 2, 4] if link == "tso" else [2, 4]
    assert offered[: len(grow)] == grow, offered
    assert sum(len(s.data) - 54 for s in h.take()) == frame * 7


def test_super_frame_retransmission_keeps_the_unacked_buffer_right(tso: Harness) -> None:
    tso.open()
    data = bytes(i * 13 & 0xFF for i in range(3 * SUPER))
    tso.sock.readable += data
    tso.nat.host_readable(tso.flow, tso.core.now)
    assert len(tso.take()) == 3
    # RTO: the oldest unacknowledged super-frame again.
    tso.core.now += 1.01
    tso.nat.on_timer(tso.flow, tso.core.now)
    (re,) = tso.take()
    _ip, l4, t = tcp_of(re)
    assert t.seq == OUR_ISS + 1 and bytes(l4[20:]) == data[:SUPER] and re.gso_size == MSS
    # The guest had some of it: a partial ACK in recovery resends from the new hole, whole.
    part = 10 * MSS
    tso.send(ACK, ISN + 1, OUR_ISS + 1 + part)
    (re,) = tso.take()
    _ip, l4, t = tcp_of(re)
    assert t.seq == OUR_ISS + 1 + part
    assert bytes(l4[20:]) == data[part : part + SUPER]
    assert bytes(tso.flow.unacked) == data[part:]
    tso.send(ACK, ISN + 1, OUR_ISS + 1 + len(data))
    assert len(tso.flow.unacked) == 0 and tso.flow.rto_deadline is None


def test_no_super_frames_or_partial_checksums_for_a_port_without_offloads(plain: Harness) -> None:
    plain.open()
    data = bytes(i & 0xFF for i in range(20_000))
    plain.sock.readable += data
    plain.nat.host_readable(plain.flow, plain.core.now)
    out = plain.take()
    assert [len(s.data) - 54 for s in out] == [MSS] * 13 + [20_000 - 13 * MSS]
    for sent in out:
        assert (sent.csum_start, sent.gso_size) == (-1, 0)
        ip, l4, _t = tcp_of(sent)
        assert verify_tcp(l4, ip.src, ip.dst)


def test_each_flow_follows_its_own_port(tso: Harness, frames: Any) -> None:
    """A non-offload link attached beside the TAP gets MSS frames; the TAP keeps super-frames."""
    other = MetaPort("qemu1", tso.core.pool, 0)
    tso.core.switch.attach(other)
    tso.open()
    opts = build_syn_options(MSS, OUR_WSCALE)
    buf = bytearray(20 + len(opts))
    build_tcp(buf, 0, 40001, 8080, ISN, 0, SYN, 0xFFFF, 0, GUEST_IP, GATEWAY_IP, opts)
    tso.core.feed(frames.ipv4(PROTO_TCP, bytes(buf), dst=GATEWAY_IP), other)
    flows = {f.guest_port: f for f in tso.nat.table}
    flow2 = flows[40001]
    tso.nat.host_connected(flow2, 0, tso.core.now)
    other.sent.clear()
    buf = bytearray(20)
    build_tcp(buf, 0, 40001, 8080, ISN + 1, OUR_ISS + 1, ACK, 0xFFFF, 0, GUEST_IP, GATEWAY_IP)
    tso.core.feed(frames.ipv4(PROTO_TCP, bytes(buf), dst=GATEWAY_IP), other)
    for flow in (flows[40000], flow2):
        sock: FakeSock = flow.io_data
        sock.readable += bytes(10_000)
        tso.nat.host_readable(flow, tso.core.now)
    assert [len(s.data) - 54 for s in tso.take()] == [10_000]
    assert [len(s.data) - 54 for s in other.sent] == [MSS] * 6 + [10_000 - 6 * MSS]
    assert all(s.csum_start == -1 for s in other.sent)
    other.sent.clear()


# -- TapLink over a socketpair --------------------------------------------------------------------


@pytest.fixture
def tap() -> Iterator[tuple[Instance, TapLink, socket.socket]]:
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inst = Instance(Config(mtu=1500))
    link = TapLink(inst.hub, ours.detach(), "tap0", "eth0")
    guest.settimeout(2.0)
    try:
        yield inst, link, guest
    finally:
        inst.close()
        guest.close()
    assert inst.pool_from_guest.in_use == 0
    assert inst.pool_to_guest.in_use == 0


def test_offloads_fall_back_when_the_fd_refuses_them(
    tap: tuple[Instance, TapLink, socket.socket],
) -> None:
    inst, link, _guest = tap
    assert inst.counters["link.tap.offload.unsupported"] == 1
    assert link.offloads == 0 and link.port.offload_max == 0


def test_link_writes_the_header_and_hands_pcap_the_hint(
    tap: tuple[Instance, TapLink, socket.socket],
) -> None:
    inst, link, guest = tap
    hints: list[tuple[int, int, int]] = []
    inst.hub.capture_to_guest = lambda view, start, off: hints.append((len(view), start, off))
    frame = inst.pool_to_guest.acquire()
    frame.length = 54 + 3 * MSS
    frame.view[frame.start + 34 + 12] = 5 << 4
    frame.csum_start, frame.csum_offset, frame.gso_size = 34, 16, MSS
    link.send(frame)
    got = guest.recv(70000)
    assert parse_vnet_hdr(got) == VnetHdr(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, MSS, 34, 16)
    assert len(got) == VNET_HDR_LEN + 54 + 3 * MSS
    assert hints == [(54 + 3 * MSS, 34, 16)]
    plain = inst.pool_to_guest.acquire()
    plain.length = 60
    link.send(plain)
    assert guest.recv(70000)[:VNET_HDR_LEN] == bytes(VNET_HDR_LEN)
    assert hints[-1] == (60, -1, 0)


@pytest.mark.parametrize(
    ("gso_type", "seen"),
    [(VNET_GSO_TCPV4, 1), (VNET_GSO_TCPV4 | VNET_GSO_ECN, 1), (VNET_GSO_UDP, 0)],
)
def test_guest_gso_types(
    tap: tuple[Instance, TapLink, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    gso_type: int,
    seen: int,
) -> None:
    inst, _link, guest = tap
    got: list[bool] = []
    monkeypatch.setattr(
        inst.hub,
        "deliver",
        lambda frame, port, now, csum_trusted=False: got.append(csum_trusted),
    )
    hdr = struct.pack("<BBHHHHH", VNET_F_NEEDS_CSUM, gso_type, 54, MSS, 34, 16, 0)
    guest.send(hdr + bytes(3000))
    inst.loop.run_once(max_wait=1.0)
    assert got == [True] * seen
    assert inst.counters["link.tap.read.gso_unsupported"] == 1 - seen
