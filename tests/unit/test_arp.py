"""ArpResponder through the classifier: what is answered, what is not, and the pooled reply.

The last test drives a real QEMU stream link (a socketpair, 4-byte big-endian length framing)
through an in-process Instance and its loop.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.links import StreamLink
from guestnet.wire.arp import ARP_REPLY, ARP_REQUEST, parse_arp
from guestnet.wire.ethernet import BROADCAST, ETH_HLEN, ETH_ZLEN, ETHERTYPE_ARP, parse_ethernet


def assert_reply(frame: bytes, frames: Any, asked: bytes, to_mac: bytes, to_ip: bytes) -> None:
    """``frame`` is our padded ARP reply saying ``asked`` is at our MAC, sent to the asker."""
    assert len(frame) == ETH_ZLEN
    eth = parse_ethernet(frame)
    assert (eth.dst, eth.src, eth.ethertype) == (to_mac, frames.OUR_MAC, ETHERTYPE_ARP)
    arp = parse_arp(frame[ETH_HLEN:])
    assert arp == (ARP_REPLY, frames.OUR_MAC, asked, to_mac, to_ip)
    assert frame[ETH_HLEN + 28 :] == bytes(ETH_ZLEN - ETH_HLEN - 28)


@pytest.mark.parametrize("asked_name", ["GATEWAY_IP", "DNS_IP"])
def test_classify_arp_generates_reply(core: Any, frames: Any, asked_name: str) -> None:
    asked = getattr(frames, asked_name)
    core.feed(frames.arp(tpa=asked))
    sent = core.take_sent()
    assert len(sent) == 1
    assert_reply(sent[0], frames, asked, frames.GUEST_MAC, frames.GUEST_IP)
    assert core.counters.snapshot() == {"arp.reply.sent": 1}

    # The reply was built in a pooled frame: after warm-up, answering allocates nothing.
    misses = core.pool.misses
    for _ in range(1000):
        core.feed(frames.arp(tpa=asked))
    assert core.pool.misses == misses
    assert core.pool.hits >= 1000
    assert core.pool.in_use == 0
    assert len(core.take_sent()) == 1000
    assert core.counters["arp.reply.sent"] == 1001


def test_padded_request_from_a_real_nic_is_answered(core: Any, frames: Any) -> None:
    core.feed(frames.arp() + bytes(18))
    assert len(core.take_sent()) == 1


def test_unicast_request_to_our_mac(core: Any, frames: Any) -> None:
    """A guest refreshing its ARP cache asks us directly (unicast), and is answered."""
    core.feed(frames.arp(eth_dst=frames.OUR_MAC, tha=frames.OUR_MAC))
    (reply,) = core.take_sent()
    assert_reply(reply, frames, frames.GATEWAY_IP, frames.GUEST_MAC, frames.GUEST_IP)


def test_reply_goes_to_the_sender_hardware_address(core: Any, frames: Any) -> None:
    sha = bytes.fromhex("5254000000cc")
    spa = bytes([10, 0, 2, 77])
    core.feed(frames.arp(sha=sha, spa=spa, eth_src=sha))
    (reply,) = core.take_sent()
    assert_reply(reply, frames, frames.GATEWAY_IP, sha, spa)


@pytest.mark.parametrize(
    "tpa",
    [bytes([10, 0, 2, 15]), bytes([10, 0, 2, 1]), bytes([10, 0, 2, 100]), bytes([8, 8, 8, 8])],
)
def test_not_ours(core: Any, frames: Any, tpa: bytes) -> None:
    core.feed(frames.arp(spa=bytes([10, 0, 2, 16]), tpa=tpa))
    assert core.take_sent() == []
    assert core.counters.snapshot() == {"arp.request.not_ours": 1}


def test_gratuitous_announcement_is_not_answered(core: Any, frames: Any) -> None:
    core.feed(frames.arp(spa=frames.GUEST_IP, tpa=frames.GUEST_IP))
    # Even a gratuitous ARP claiming our own address gets no reply (nothing to resolve).
    core.feed(frames.arp(spa=frames.GATEWAY_IP, tpa=frames.GATEWAY_IP))
    assert core.take_sent() == []
    assert core.counters.snapshot() == {"arp.request.gratuitous": 2}


def test_replies_from_the_guest_are_ignored(core: Any, frames: Any) -> None:
    core.feed(
        frames.arp(op=ARP_REPLY, tha=frames.OUR_MAC, tpa=frames.GATEWAY_IP, eth_dst=frames.OUR_MAC)
    )
    core.feed(frames.arp(op=3))  # RARP request: not ARP's business
    assert core.take_sent() == []
    assert core.counters.snapshot() == {"arp.reply.ignored": 1, "arp.op.unknown": 1}


@pytest.mark.parametrize("asked_name", ["GATEWAY_IP", "DNS_IP"])
def test_probe_for_our_address_is_answered(core: Any, frames: Any, asked_name: str) -> None:
    """RFC 5227: a probe (sender 0.0.0.0) for an address in use must learn of the conflict."""
    asked = getattr(frames, asked_name)
    core.feed(frames.arp(spa=bytes(4), tpa=asked))
    (reply,) = core.take_sent()
    assert_reply(reply, frames, asked, frames.GUEST_MAC, bytes(4))


def test_probe_for_other_address_is_not_answered(core: Any, frames: Any) -> None:
    core.feed(frames.arp(spa=bytes(4), tpa=frames.GUEST_IP))
    assert core.take_sent() == []
    assert core.counters.snapshot() == {"arp.request.not_ours": 1}


def test_custom_addresses(make_core: Any, frames: Any) -> None:
    harness = make_core(
        subnet=ipaddress.IPv4Network("192.168.77.0/24"),
        gateway=ipaddress.IPv4Address("192.168.77.1"),
        dns_ip=ipaddress.IPv4Address("192.168.77.53"),
        guest_ip=ipaddress.IPv4Address("192.168.77.100"),
        mac=bytes.fromhex("020000000001"),
    )
    for tpa in (bytes([192, 168, 77, 1]), bytes([192, 168, 77, 53]), bytes([10, 0, 2, 2])):
        harness.feed(frames.arp(spa=bytes([192, 168, 77, 100]), tpa=tpa))
    sent = harness.take_sent()
    assert [parse_arp(f[14:]).spa for f in sent] == [
        bytes([192, 168, 77, 1]),
        bytes([192, 168, 77, 53]),
    ]
    assert all(f[6:12] == bytes.fromhex("020000000001") for f in sent)
    assert harness.counters["arp.request.not_ours"] == 1
    assert harness.pool.in_use == 0


# --- a real stream link -------------------------------------------------------------------------


def _read_framed(sock: socket.socket, count: int, timeout_s: float = 5.0) -> list[bytes]:
    """Read ``count`` QEMU-stream frames (4-byte big-endian length + frame) from ``sock``."""
    sock.settimeout(timeout_s)
    buf = b""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        while len(buf) >= 4 and len(buf) - 4 >= struct.unpack_from("!I", buf)[0]:
            n = struct.unpack_from("!I", buf)[0]
            out.append(buf[4 : 4 + n])
            buf = buf[4 + n :]
        if len(out) >= count:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return out


def test_drain_guest_link_reads_and_classifies(frames: Any) -> None:
    inst = Instance(Config())
    guest, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link = StreamLink(inst.hub, ours, "qemu0")
        asked = [frames.GATEWAY_IP, frames.DNS_IP, bytes([10, 0, 2, 99])] * 40
        requests = [frames.arp(tpa=tpa) for tpa in asked]
        wire = b"".join(struct.pack("!I", len(r)) + r for r in requests)
        # Split the stream mid-length and mid-frame, as a kernel may deliver it.
        guest.sendall(wire[:3])
        inst.loop.run_once(0.5)
        guest.sendall(wire[3:100])
        inst.loop.run_once(0.5)
        guest.sendall(wire[100:])
        answered = sum(1 for tpa in asked if tpa != bytes([10, 0, 2, 99]))
        for _ in range(50):
            if inst.counters["arp.reply.sent"] >= answered:
                break
            inst.loop.run_once(0.1)

        replies = _read_framed(guest, answered)
        assert len(replies) == answered
        expected = [tpa for tpa in asked if tpa != bytes([10, 0, 2, 99])]
        for reply, tpa in zip(replies, expected, strict=True):
            assert_reply(reply, frames, tpa, frames.GUEST_MAC, frames.GUEST_IP)
        assert inst.counters["arp.reply.sent"] == answered
        assert inst.counters["arp.request.not_ours"] == len(asked) - answered
        assert link.port.rx_frames == len(asked)
        assert link.port.tx_frames == answered
        assert link.port.guest_mac == frames.GUEST_MAC
        assert inst.pool_to_guest.in_use == 0
        assert inst.pool_to_guest.misses <= 2
    finally:
        guest.close()
        inst.close()


def test_stream_link_closes_on_corrupt_length(frames: Any) -> None:
    inst = Instance(Config())
    guest, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link = StreamLink(inst.hub, ours, "qemu0")
        guest.sendall(struct.pack("!I", 0) + frames.arp())
        for _ in range(20):
            if link.closed:
                break
            inst.loop.run_once(0.1)
        assert link.closed
        assert inst.counters["link.stream.corrupt"] == 1
        assert link not in inst.links
        assert guest.recv(10) == b""
    finally:
        guest.close()
        inst.close()


def test_arp_request_constants(frames: Any) -> None:
    """The builder makes a broadcast request (guards the harness)."""
    frame = frames.arp()
    assert frame[:6] == BROADCAST
    assert parse_arp(frame[14:]).op == ARP_REQUEST
