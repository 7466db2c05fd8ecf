"""TapLink framing without root: a unix datagram socketpair stands in for the TAP fd.

A TAP fd and a datagram socket behave alike for what TapLink does: one read returns one
virtio-net header plus one frame, one write sends one. The kernel side is tested for real in
tests/integration/test_netns.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.tap import VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM, VNET_HDR_LEN, TapLink
from guestnet.pool import Frame

GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("52550a000202")


def arp_request() -> bytes:
    eth = b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
    arp = struct.pack(
        "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, bytes([10, 0, 2, 15]), bytes(6),
        bytes([10, 0, 2, 2]),
    )  # fmt: skip
    return eth + arp


@pytest.fixture
def tap() -> Iterator[tuple[Instance, TapLink, socket.socket]]:
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inst = Instance(Config())
    link = TapLink(inst.hub, ours.detach(), "tap0", "eth0")
    guest.settimeout(2.0)
    try:
        yield inst, link, guest
    finally:
        inst.close()
        guest.close()
    assert inst.pool_from_guest.in_use == 0
    assert inst.pool_to_guest.in_use == 0


def test_arp_through_vnet_header(tap: tuple[Instance, TapLink, socket.socket]) -> None:
    inst, link, guest = tap
    guest.send(bytes(VNET_HDR_LEN) + arp_request())
    inst.loop.run_once(max_wait=1.0)
    reply = guest.recv(70000)
    assert reply[:VNET_HDR_LEN] == bytes(VNET_HDR_LEN)
    frame = reply[VNET_HDR_LEN:]
    assert frame[:6] == GUEST_MAC and frame[6:12] == GATEWAY_MAC
    assert frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
    assert link.port.rx_frames == 1 and link.port.tx_frames == 1


@pytest.mark.parametrize(
    ("flags", "trusted"),
    [(0, False), (VNET_F_NEEDS_CSUM, True), (VNET_F_DATA_VALID, True)],
)
def test_checksum_trust_follows_header_flags(
    tap: tuple[Instance, TapLink, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    flags: int,
    trusted: bool,
) -> None:
    inst, _link, guest = tap
    seen: list[tuple[bytes, bool]] = []
    monkeypatch.setattr(
        inst.hub,
        "deliver",
        lambda frame, port, now, csum_trusted=False: seen.append((bytes(frame), csum_trusted)),
    )
    frame = arp_request()
    guest.send(bytes([flags]) + bytes(VNET_HDR_LEN - 1) + frame)
    inst.loop.run_once(max_wait=1.0)
    assert seen == [(frame, trusted)]


def test_short_read_is_counted(tap: tuple[Instance, TapLink, socket.socket]) -> None:
    inst, link, guest = tap
    guest.send(bytes(VNET_HDR_LEN))
    inst.loop.run_once(max_wait=1.0)
    assert inst.counters.snapshot().get("link.tap.read.short") == 1
    assert link.port.rx_frames == 0


def test_sparse_traffic_reads_one_frame_per_turn_and_leaves_nothing_behind(
    tap: tuple[Instance, TapLink, socket.socket],
) -> None:
    """After a wake-up that found one frame, the link reads one frame per wake-up (no read
    that can only say EAGAIN); a frame left behind is read in the very next turn, and a burst
    (two frames over those two turns) puts the link back to reading until EAGAIN."""
    inst, link, guest = tap
    frame = bytes(VNET_HDR_LEN) + arp_request()
    guest.send(frame)
    inst.loop.run_once(max_wait=1.0)
    assert link.port.rx_frames == 1
    guest.send(frame)
    guest.send(frame)
    inst.loop.run_once(max_wait=1.0)
    assert link.port.rx_frames == 2  # sparse: one frame, the other waits one turn
    inst.loop.run_once(max_wait=1.0)
    assert link.port.rx_frames == 3  # reported again at once, read
    for _ in range(3):
        guest.send(frame)
    inst.loop.run_once(max_wait=1.0)
    assert link.port.rx_frames == 6  # a burst: read until EAGAIN
    replies = 0
    guest.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while guest.recv(70000):
            replies += 1
    assert replies == 6


def _frame_to_guest(inst: Instance, payload: bytes) -> Frame:
    """A pooled frame holding ``payload`` (what the core hands a link)."""
    frame = inst.pool_to_guest.acquire()
    frame.view[frame.start : frame.start + len(payload)] = payload
    frame.length = len(payload)
    return frame


def test_send_queues_on_eagain_and_flushes_in_order(
    tap: tuple[Instance, TapLink, socket.socket],
) -> None:
    """A frame the fd cannot take now waits in the link's queue (and the ones after it behind
    it) until EPOLLOUT; then they go out in order, each with its header."""
    inst, link, guest = tap
    filler = 0
    with contextlib.suppress(BlockingIOError):
        for _ in range(10000):
            os.write(link.fd, bytes(VNET_HDR_LEN) + b"f" * 60)
            filler += 1
    assert 0 < filler < 10000
    link.send(_frame_to_guest(inst, b"A" * 60))
    link.send(_frame_to_guest(inst, b"B" * 60))
    assert link.stats()["tx_queue"] == 2 and link.port.tx_frames == 2
    for _ in range(filler):
        guest.recv(70000)
    for _ in range(5):
        inst.loop.run_once(max_wait=0.1)
        if not link.stats()["tx_queue"]:
            break
    assert guest.recv(70000) == bytes(VNET_HDR_LEN) + b"A" * 60
    assert guest.recv(70000) == bytes(VNET_HDR_LEN) + b"B" * 60
    assert inst.pool_to_guest.in_use == 0


def test_send_error_is_counted_and_the_frame_released(
    tap: tuple[Instance, TapLink, socket.socket],
) -> None:
    inst, link, guest = tap
    guest.close()  # the far end is gone: the write fails (ECONNREFUSED here)
    link.send(_frame_to_guest(inst, b"x" * 60))
    assert inst.pool_to_guest.in_use == 0 and link.stats()["tx_queue"] == 0
    assert any(k.startswith("link.tap.write.") for k in inst.counters.snapshot())


def test_send_with_partial_checksum_writes_its_header(
    tap: tuple[Instance, TapLink, socket.socket],
) -> None:
    inst, link, guest = tap
    frame = _frame_to_guest(inst, b"y" * 60)
    frame.csum_start, frame.csum_offset = 34, 16
    link.send(frame)
    got = guest.recv(70000)
    assert got[:VNET_HDR_LEN] == struct.pack("<BBHHHHH", VNET_F_NEEDS_CSUM, 0, 0, 0, 34, 16, 0)
    assert got[VNET_HDR_LEN:] == b"y" * 60
