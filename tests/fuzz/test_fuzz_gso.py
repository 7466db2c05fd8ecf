"""Fuzz the switch's software segmentation with mutated super-frames (Hypothesis).

A guest chooses both the bytes of a super-frame and its virtio-net header (``gso_type``,
``gso_size``, checksum offsets). Starting from valid TCP and UDP super-frames over IPv4 and
IPv6, each example mutates the frame and draws the header, and switches the frame to a port
without offloads and to one with them. Whatever comes in: nothing raises, no pooled frame is
left checked out, every frame sent to the port without offloads fits the MTU (a piece is cut
to fit or the super-frame is dropped) and carries no offload metadata, and there are never more
than ``MAX_SEGMENTS`` of them per super-frame.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.core.gso import MAX_SEGMENTS
from guestnet.pool import Frame
from guestnet.wire.tcp import ACK, FIN, PSH

MAC_B = bytes.fromhex("5254000000bb")
MAC_C = bytes.fromhex("5254000000cc")
IP_B = bytes([10, 0, 2, 16])
IP6_B = bytes.fromhex("fd000000000000000000000000000016")
MTU = 1500


def seeds(f: Any) -> list[bytes]:
    payload = bytes(range(256)) * 20
    return [
        f.ipv4(6, f.tcp_segment(1, 2, ACK | PSH | FIN, payload, b"", f.GUEST_IP, IP_B),
               f.GUEST_IP, IP_B, eth_dst=MAC_B),
        f.ipv6(6, f.tcp_segment(1, 2, ACK, payload, b"", f.GUEST_IP6, IP6_B),
               f.GUEST_IP6, IP6_B, eth_dst=MAC_B),
        f.ipv4(17, f.udp_segment(1, 2, payload, f.GUEST_IP, IP_B), f.GUEST_IP, IP_B,
               eth_dst=MAC_B),
        f.ipv6(17, f.udp_segment(1, 2, payload, f.GUEST_IP6, IP6_B), f.GUEST_IP6, IP6_B,
               eth_dst=MAC_B),
    ]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, base: list[bytes]) -> bytes:
    frame = bytearray(draw(st.sampled_from(base)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(frame) - 1))
        kind = draw(st.sampled_from(["byte", "truncate", "extend"]))
        if kind == "byte":
            frame[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del frame[max(at, 14) :]
        else:
            frame += draw(st.binary(max_size=64))
    return bytes(frame)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_super_frames_never_escape(make_core: Any, frames: Any, data: Any) -> None:
    core = make_core(mtu=MTU)
    port_b = core.add_port("plain")
    port_c = core.add_port("offloads")
    port_c.offload_max = 65535
    port_c.udp_offload = data.draw(st.booleans())
    core.feed(frames.arp())
    core.feed(frames.arp(sha=MAC_B, spa=IP_B), port=port_b)
    core.take_sent()
    port_b.sent.clear()
    meta: list[tuple[int, int]] = []
    collect = port_b.send

    def send(frame: Frame) -> None:
        meta.append((frame.csum_start, frame.gso_size))
        collect(frame)

    port_b.send = send
    frame = bytearray(data.draw(mutated(seeds(frames))))
    if data.draw(st.booleans()):
        frame[0:6] = MAC_C  # unknown: flooded to both ports
    gso_type = data.draw(st.sampled_from([1, 4, 5, 3, 0x81, 0x84, 2, 0xFF]))
    gso_size = data.draw(st.one_of(st.integers(0, 3), st.integers(0, 2000), st.just(1448)))
    cs = data.draw(st.integers(0, 120))
    co = data.draw(st.sampled_from([6, 16, 0, 200]))
    flags = data.draw(st.sampled_from([0, 1, 2, 3]))
    core.port.rx_vnet = memoryview(struct.pack("<BBHHHH", flags, gso_type, 0, gso_size, cs, co))
    core.feed(bytes(frame), csum_trusted=True)
    assert core.pool.in_use == 0
    assert len(port_b.sent) <= MAX_SEGMENTS
    for out, (cstart, gso) in zip(port_b.sent, meta, strict=True):
        assert cstart == -1 and gso == 0
        assert len(out) - 14 <= MTU
