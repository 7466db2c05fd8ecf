"""The vhost-user link without QEMU: a fake front-end and a fake guest driver (see vhost_fake).

Frames cross real shared memory (a memfd both sides map) and real eventfds; the link runs on the
instance's real loop.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.port import Port
from guestnet.io import vhost_user as vu
from guestnet.io.tap import VNET_GSO_TCPV4
from guestnet.wire import virtio

from .test_tap import GATEWAY_MAC, GUEST_MAC, arp_request
from .vhost_fake import GPA_BASE, UADDR_BASE, VNET_HDR, FakeDriver, FakeFrontend, qemu_handshake


class Rig:
    def __init__(self, features: int | None = None, offloads: bool = True) -> None:
        self.inst = Instance(Config())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.link = vu.VhostUserLink(self.inst.hub, ours, "vhost0", offloads)
        self.fe = FakeFrontend(theirs)
        self.drv = FakeDriver(self.fe)
        self.delivered: list[tuple[bytes, bool]] = []
        self.acked = qemu_handshake(self.fe, self.step, features)

    def step(self) -> None:
        for _ in range(2):
            self.inst.loop.run_once(max_wait=0.0)

    def record(self) -> None:
        """Divert guest frames to a list (copies: the views die with the call)."""

        def deliver(view: memoryview, _port: Port, _now: float, trusted: bool) -> None:
            self.delivered.append((bytes(view), trusted))

        self.inst.hub.deliver = deliver

    def close(self) -> None:
        self.inst.close()
        self.fe.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()
    assert r.inst.pool_from_guest.in_use == 0
    assert r.inst.pool_to_guest.in_use == 0


def test_handshake_negotiates_offloads_and_maps_rings(rig: Rig) -> None:
    link = rig.link
    want = vu.BASE_FEATURES | vu.OFFLOAD_FEATURES
    assert rig.acked == want and link.features == want
    assert link.protocol_features == vu.PROTOCOL_FEATURES
    assert all(q.ready for q in link.queues)
    # GUEST_TSO negotiated: the core may send 64 KiB super-frames to this port.
    assert link.port.offload_max == 65535


def test_arp_both_ways_through_the_rings(rig: Rig) -> None:
    rig.drv.post_rx(8, 1536)
    rig.step()
    head = rig.drv.send_frame(arp_request())
    rig.step()
    assert rig.drv.used(1) == [(head, 0)]  # TX chain returned
    frames = rig.drv.received()
    assert len(frames) == 1
    hdr, frame, nbuf = frames[0]
    assert nbuf == 1 and hdr[:10] == bytes(10)
    assert frame[:6] == GUEST_MAC and frame[6:12] == GATEWAY_MAC
    assert frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
    # One call per queue that moved, not per frame.
    assert rig.drv.calls(0) == 1 and rig.drv.calls(1) == 1
    stats = rig.link.stats()
    assert stats["frames_from_guest"] == 1 and stats["frames_to_guest"] == 1
    assert stats["kicks"] == 2


def test_frames_wait_for_rx_buffers_then_flow(rig: Rig) -> None:
    rig.drv.send_frame(arp_request())
    rig.step()
    assert rig.drv.received() == []
    assert rig.link.ring_full == 1 and len(rig.link._txq) == 1
    rig.drv.post_rx(2, 1536)
    rig.step()
    frames = rig.drv.received()
    assert len(frames) == 1 and frames[0][1][20:22] == b"\x00\x02"
    assert not rig.link._txq


def test_tx_scattered_64k_tso_frame(rig: Rig) -> None:
    rig.record()
    frame = bytes(range(256)) * 256  # 65,536 bytes
    hdr = VNET_HDR.pack(1, VNET_GSO_TCPV4, 66, 1448, 34, 16, 0)
    # Header alone, then L2-L4 headers, then 16 x 4 KiB of payload (as Linux posts it).
    split = [12, 12 + 66] + [12 + 66 + 4096 * k for k in range(1, 16)]
    head = rig.drv.send_frame(frame, hdr, split)
    rig.step()
    assert rig.delivered == [(frame, True)]
    assert rig.drv.used(1) == [(head, 0)]
    assert rig.link.gso_from_guest == 1
    assert rig.link.stats()["descs_per_frame_from_guest"] == len(split) + 1


def test_tx_header_in_own_descriptor_is_zero_copy(rig: Rig) -> None:
    rig.record()
    rig.drv.send_frame(arp_request(), split=[12])
    rig.drv.send_frame(arp_request())
    rig.step()
    assert [f for f, _ in rig.delivered] == [arp_request()] * 2
    # Both went to the classifier as views of guest memory: no pool frame taken.
    pool = rig.inst.pool_from_guest
    assert pool.hits + pool.misses == 0


def _tso_frame(payload_len: int) -> tuple[bytes, int]:
    eth = GUEST_MAC + GATEWAY_MAC + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + payload_len, 0, 0, 64, 6, 0,
                     bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15]))  # fmt: skip
    tcp = struct.pack("!HHIIBBHHH", 80, 40000, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    payload = bytes((i * 7) & 0xFF for i in range(payload_len))
    return eth + ip + tcp + payload, 14 + 20


def test_rx_64k_super_frame_over_mergeable_buffers(rig: Rig) -> None:
    data, csum_start = _tso_frame(65535 - 40)
    frame = rig.inst.pool_to_guest.acquire()
    frame.view[frame.start : frame.start + len(data)] = data
    frame.length = len(data)
    frame.csum_start = csum_start
    frame.csum_offset = 16
    frame.gso_size = 1460
    rig.drv.post_rx(20, 4096)
    rig.step()
    rig.link.send(frame)
    rig.step()
    got = rig.drv.received()
    assert len(got) == 1
    hdr, body, nbuf = got[0]
    flags, gso_type, hdr_len, gso_size, cs, co, num_buffers = VNET_HDR.unpack(hdr)
    assert body == data
    assert (flags, gso_type, gso_size, cs, co) == (1, VNET_GSO_TCPV4, 1460, csum_start, 16)
    assert hdr_len == 14 + 20 + 20
    need = 12 + len(data)
    assert num_buffers == nbuf == -(-need // 4096) == 17
    assert rig.link.gso_to_guest == 1
    assert rig.drv.calls(0) == 1


def _gso_frame(rig: Rig) -> tuple[Any, bytes]:
    data, csum_start = _tso_frame(65535 - 40)
    frame = rig.inst.pool_to_guest.acquire()
    frame.view[frame.start : frame.start + len(data)] = data
    frame.length = len(data)
    frame.csum_start, frame.csum_offset, frame.gso_size = csum_start, 16, 1460
    return frame, data


def test_rx_frame_waits_when_buffers_run_out_mid_frame(rig: Rig) -> None:
    """Five 4 KiB buffers cannot hold a 64 KiB frame: none is used (the chains taken are given
    back), and once the guest posts more the frame goes whole into the first 17, in order."""
    frame, data = _gso_frame(rig)
    rig.drv.post_rx(5, 4096)
    rig.step()
    rig.link.send(frame)
    rig.step()
    assert rig.drv.used(0) == [] and rig.link.ring_full == 1
    assert rig.link.queues[0].in_flight == 0
    rig.drv.post_rx(15, 4096)
    rig.step()
    used = rig.drv.used(0)
    assert [head for head, _ in used] == list(range(17))
    assert [n for _, n in used] == [4096] * 16 + [12 + len(data) - 16 * 4096]
    rig.drv.used_seen[0] = 0
    ((_hdr, body, nbuf),) = rig.drv.received()
    assert body == data and nbuf == 17
    assert rig.link.buffers_to_guest == 17 and not rig.link._txq


def test_rx_chain_of_several_descriptors_is_filled_in_order() -> None:
    """Without mergeable buffers a guest may post one chain of several writable descriptors
    (header, then pages): the frame runs through them in chain order, across their ends."""
    features = vu.BASE_FEATURES & ~(1 << virtio.VIRTIO_NET_F_MRG_RXBUF)
    r = Rig(features)
    try:
        sizes = [12, 14, 16, 2000]
        head = r.drv.add_chain(0, list(sizes), writable=True)
        r.drv.kick(0)
        r.step()
        r.drv.send_frame(arp_request())
        r.step()
        ((used_head, written),) = r.drv.used(0)
        assert used_head == head and written > 12 + 14 + 16  # the frame crossed two ends
        d, _a, _u = r.fe.ring_offsets(0)
        got = b""
        for k, size in enumerate(sizes):
            addr = struct.unpack_from("<Q", r.drv.mem, d + 16 * (head + k))[0] - GPA_BASE
            got += bytes(r.drv.mem[addr : addr + size])
        assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
        reply = got[12:written]
        assert reply[:6] == GUEST_MAC and reply[6:12] == GATEWAY_MAC
        assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"  # ARP reply
        assert reply[28:32] == bytes([10, 0, 2, 2])  # the sender is the gateway
    finally:
        r.close()


def test_rx_without_mergeable_buffers_uses_one_buffer() -> None:
    features = vu.BASE_FEATURES & ~(1 << virtio.VIRTIO_NET_F_MRG_RXBUF)
    r = Rig(features)
    try:
        assert r.link.port.offload_max == 0
        r.drv.post_rx(4, 1536)
        r.step()
        r.drv.send_frame(arp_request())
        r.step()
        got = r.drv.received()
        assert len(got) == 1 and got[0][2] == 1
    finally:
        r.close()


def test_need_reply_answered_and_bad_requests_fail(rig: Rig) -> None:
    fe = rig.fe
    fe.send(vu.SET_VRING_NUM, struct.pack("=II", 0, 300), need_reply=True)  # not a power of 2
    rig.step()
    assert struct.unpack("=Q", fe.recv_reply(vu.SET_VRING_NUM))[0] == 1
    fe.send(vu.NET_SET_MTU, struct.pack("=Q", 65520), need_reply=True)
    rig.step()
    assert struct.unpack("=Q", fe.recv_reply(vu.NET_SET_MTU))[0] == 0
    assert rig.link.mtu == 65520
    fe.send(99, b"", need_reply=True)
    rig.step()
    assert struct.unpack("=Q", fe.recv_reply(99))[0] == 1
    fe.send(vu.GET_QUEUE_NUM)
    rig.step()
    assert struct.unpack("=Q", fe.recv_reply(vu.GET_QUEUE_NUM))[0] == 1


def test_get_vring_base_stops_the_ring(rig: Rig) -> None:
    rig.record()
    rig.drv.send_frame(arp_request())
    rig.step()
    assert len(rig.delivered) == 1
    rig.fe.send(vu.GET_VRING_BASE, struct.pack("=II", 1, 0))
    rig.step()
    assert struct.unpack("=II", rig.fe.recv_reply(vu.GET_VRING_BASE)) == (1, 1)
    assert not rig.link.queues[1].ready
    rig.drv.send_frame(arp_request())
    rig.step()
    assert len(rig.delivered) == 1  # stopped: nothing taken


def test_second_mem_table_remaps_and_unmaps_old(rig: Rig) -> None:
    rig.record()
    rig.drv.send_frame(arp_request(), kick=False)  # in flight across the new table
    old = rig.link._mappings[0].mm
    payload = rig.fe.mem_table_payload([(GPA_BASE, rig.fe.mem_size, UADDR_BASE, 0)])
    rig.fe.send(vu.SET_MEM_TABLE, payload, [rig.fe.memfd], need_reply=True)
    rig.step()
    assert struct.unpack("=Q", rig.fe.recv_reply(vu.SET_MEM_TABLE))[0] == 0
    assert old.closed
    assert rig.inst.counters["link.vhost.unmap_deferred"] == 0
    rig.drv.kick(1)
    rig.step()
    assert [f for f, _ in rig.delivered] == [arp_request()]


def test_disconnect_closes_link_and_unmaps(rig: Rig) -> None:
    rig.drv.send_frame(arp_request())
    rig.step()
    mm = rig.link._mappings[0].mm
    rig.fe.sock.shutdown(socket.SHUT_WR)
    rig.step()
    assert rig.link.closed and mm.closed
    assert rig.link.kick_fds == [-1, -1] and rig.link.call_fds == [-1, -1]
    # The connection's totals outlive it in the shared counters.
    assert rig.inst.counters["link.vhost.frames_from_guest"] == 1
    assert rig.inst.counters["link.vhost.kicks"] == 1


def test_server_refuses_second_front_end(tmp_path: object) -> None:
    inst = Instance(Config())
    path = os.path.join(str(tmp_path), "vu.sock")
    server = vu.VhostUserServer(inst.hub, path)
    a = socket.socket(socket.AF_UNIX)
    b = socket.socket(socket.AF_UNIX)
    try:
        a.connect(path)
        inst.loop.run_once(max_wait=0.1)
        b.connect(path)
        inst.loop.run_once(max_wait=0.1)
        assert server.link is not None and not server.link.closed
        assert inst.counters["link.vhost.busy"] == 1
    finally:
        a.close()
        b.close()
        server.close()
        inst.close()
    assert not os.path.exists(path)


def test_network_listen_vhost_user_prints_qemu_args_and_serves(tmp_path: object) -> None:
    from guestnet.network import Network

    path = os.path.join(str(tmp_path), "vu.sock")
    net = Network(Config())
    fe: FakeFrontend | None = None
    try:
        args = net.listen_vhost_user(path, memory="256M", host_mtu=65520)
        assert "memory-backend-memfd,id=mem0,size=256M,share=on" in args
        assert f"-chardev socket,id=chr0,path={path},reconnect=1" in args
        assert "-netdev vhost-user,id=net0,chardev=chr0" in args
        assert "host_mtu=65520,vectors=0" in args
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        fe = FakeFrontend(sock)
        loop = net.instance.loop

        def step() -> None:
            for _ in range(2):
                loop.run_once(max_wait=0.0)

        qemu_handshake(fe, step)
        drv = FakeDriver(fe)
        drv.post_rx(4, 1536)
        drv.send_frame(arp_request())
        step()
        got = drv.received()
        assert len(got) == 1 and got[0][1][20:22] == b"\x00\x02"
        links = net.stats()["links"]
        assert isinstance(links, list)
        assert [v["kind"] for v in links] == ["vhost-user"]
    finally:
        net.close()
        if fe is not None:
            fe.close()
    assert not os.path.exists(path)


def test_mem_table_past_the_files_end_is_refused(rig: Rig) -> None:
    """A region longer than its memfd would fault (SIGBUS) when touched: refused, old kept."""
    payload = rig.fe.mem_table_payload([(GPA_BASE, rig.fe.mem_size * 2, UADDR_BASE, 0)])
    rig.fe.send(vu.SET_MEM_TABLE, payload, [rig.fe.memfd], need_reply=True)
    rig.step()
    assert struct.unpack("=Q", rig.fe.recv_reply(vu.SET_MEM_TABLE))[0] == 1
    assert rig.inst.counters["link.vhost.bad_mem_table"] == 1
    assert all(q.ready for q in rig.link.queues)


def test_refuses_to_start_off_x86_64(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """Without x86-64's store order the used index could overtake its elements: no server."""
    monkeypatch.setattr(vu.platform, "machine", lambda: "aarch64")
    inst = Instance(Config())
    path = os.path.join(str(tmp_path), "vu.sock")
    try:
        with pytest.raises(RuntimeError, match="x86-64"):
            vu.VhostUserServer(inst.hub, path)
    finally:
        inst.close()
    assert not os.path.exists(path)


def test_tx_frame_longer_than_a_pool_slot_is_dropped(rig: Rig) -> None:
    """One huge descriptor would reach the classifier as a view bigger than any link delivers."""
    rig.record()
    head = rig.drv.send_frame(bytes(256 * 1024))
    rig.step()
    assert rig.delivered == []
    assert rig.drv.used(1) == [(head, 0)]
    assert rig.link.drops == {"tx.too_big": 1}


def test_guest_datagrams_leave_at_the_end_of_the_kick(rig: Rig, frames: Any) -> None:
    """The UDP NAT gathers a burst of datagrams into one send; the link ends its burst after a
    TX kick, so the host gets them then, not when some other link next reads."""
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    host.settimeout(2)
    port = host.getsockname()[1]
    try:
        for i in range(3):
            rig.drv.send_frame(frames.udp(40000, port, b"dgram%d" % i, dst=frames.GATEWAY_IP))
        rig.step()
        got = [host.recv(64) for _ in range(3)]
        assert got == [b"dgram0", b"dgram1", b"dgram2"]
    finally:
        host.close()
