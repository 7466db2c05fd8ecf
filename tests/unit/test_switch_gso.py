"""Super-frames between switch ports with different offloads (issue 15).

A TAP guest with offloads hands over TCP (TSO) and UDP (USO) super-frames. Switched to a port
that takes the same offload they go whole with their metadata; to one that does not (a QEMU
stream port, a TAP without USO) they are segmented in software, each piece in a pooled frame,
as a Linux bridge does; a super-frame that cannot be cut is a counted drop. IPv6 routed between
guests through guestnet's MAC (``Switch.route6``) is here too.
"""

from __future__ import annotations

import struct
from typing import Any

from guestnet.pool import Frame
from guestnet.wire.ipv4 import PROTO_UDP
from guestnet.wire.tcp import ACK, CWR, FIN, PSH

from .test_gso import (
    IP6_B,
    MAC_B,
    MSS,
    _pattern,
    _scapy_checks,
    expected_tcp,
    tcp_super,
    udp_super,
)
from .test_switch import two_guests  # port B is added without offloads


def _vnet(flags: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int) -> Any:
    return memoryview(struct.pack("<BBHHHH", flags, gso_type, 0, gso_size, csum_start,
                                  csum_offset))  # fmt: skip


def _metadata(port: Any) -> list[tuple[int, int, int]]:
    """Record (csum_start, csum_offset, gso_size) of every frame sent to ``port``."""
    seen: list[tuple[int, int, int]] = []
    collect = port.send

    def send(frame: Frame) -> None:
        seen.append((frame.csum_start, frame.csum_offset, frame.gso_size))
        collect(frame)

    port.send = send
    return seen


def test_tcp_super_frame_segmented_for_a_port_without_offloads(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    seen = _metadata(port_b)
    payload = _pattern(10 * MSS + 17)
    flags = ACK | PSH | FIN | CWR
    core.port.rx_vnet = _vnet(1, 1, MSS, 34, 16)
    core.feed(tcp_super(frames, False, flags, payload), csum_trusted=True)
    assert port_b.sent == expected_tcp(frames, False, flags, payload)
    assert seen == [(-1, 0, 0)] * 11  # plain frames: whole checksums, no offload asked
    assert core.counters["switch.gso.segmented"] == 1
    assert core.counters["switch.gso.segments"] == 11


def test_tcp6_super_frame_segmented(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    core.feed(frames.icmp6(src=IP6_B, eth_src=MAC_B), port=port_b)  # B's address learned
    core.take_sent()
    port_b.sent.clear()
    payload = _pattern(3 * MSS)
    core.port.rx_vnet = _vnet(1, 4 | 0x80, MSS, 54, 16)  # TCPV6 with the ECN bit
    core.feed(tcp_super(frames, True, ACK, payload), csum_trusted=True)
    assert port_b.sent == expected_tcp(frames, True, ACK, payload)


def test_tcp_super_frame_kept_whole_for_a_port_with_offloads(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    port_b.offload_max = 65535
    seen = _metadata(port_b)
    frame = tcp_super(frames, False, ACK, _pattern(3000))
    core.port.rx_vnet = _vnet(1, 1, MSS, 34, 16)
    core.feed(frame, csum_trusted=True)
    assert port_b.sent == [frame]
    assert seen == [(34, 16, MSS)]
    assert core.counters["switch.gso.segmented"] == 0


def test_udp_super_frame_whole_with_uso_segmented_without(core: Any, frames: Any) -> None:
    """USO: whole to a port that takes UDP offloads; to a TSO-only port, datagrams."""
    port_b = two_guests(core, frames)
    port_b.offload_max = 65535  # TSO, but no USO
    seen = _metadata(port_b)
    size = 1000
    payload = _pattern(4 * size + 1)
    frame = udp_super(frames, False, payload)
    core.port.rx_vnet = _vnet(1, 5, size, 34, 6)
    core.feed(frame, csum_trusted=True)
    assert len(port_b.sent) == 5
    assert seen == [(-1, 0, 0)] * 5
    joined = b""
    for data in port_b.sent:
        _scapy_checks(data, False, PROTO_UDP)
        joined += data[42:]
    assert joined == payload
    port_b.sent.clear()
    seen.clear()
    port_b.udp_offload = True
    core.feed(frame, csum_trusted=True)
    assert port_b.sent == [frame]
    assert seen == [(34, 6, size)]


def test_udp6_super_frame_segmented(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    size = 1200
    payload = _pattern(3 * size)
    core.port.rx_vnet = _vnet(1, 5, size, 54, 6)
    core.feed(udp_super(frames, True, payload), csum_trusted=True)
    assert len(port_b.sent) == 3
    for data in port_b.sent:
        _scapy_checks(data, True, PROTO_UDP)
    assert b"".join(data[62:] for data in port_b.sent) == payload


def test_super_frame_flooded_is_segmented_per_port(core: Any, frames: Any) -> None:
    """To an unknown MAC: flooded, each port getting what it can take."""
    port_b = two_guests(core, frames)
    port_c = core.add_port("guest2")
    port_c.offload_max = 65535
    frame = bytearray(tcp_super(frames, False, ACK, _pattern(2 * MSS)))
    frame[0:6] = bytes.fromhex("5254000000ee")  # nobody's
    core.port.rx_vnet = _vnet(1, 1, MSS, 34, 16)
    core.feed(bytes(frame), csum_trusted=True)
    assert len(port_b.sent) == 2
    assert port_c.sent == [bytes(frame)]


def test_bad_super_frame_is_a_counted_drop(make_core: Any, frames: Any) -> None:
    core = make_core(mtu=1500)
    port_b = two_guests(core, frames)
    frame = tcp_super(frames, False, ACK, _pattern(3 * MSS))
    core.port.rx_vnet = _vnet(1, 1, 0, 34, 16)  # gso_size 0
    core.feed(frame, csum_trusted=True)
    core.port.rx_vnet = _vnet(1, 1, 4000, 34, 16)  # segments beyond the MTU
    core.feed(frame, csum_trusted=True)
    core.port.rx_vnet = _vnet(1, 4, MSS, 34, 16)  # TCPV6 on an IPv4 packet
    core.feed(frame, csum_trusted=True)
    core.port.rx_vnet = _vnet(1, 3, MSS, 34, 6)  # UFO: never asked for
    core.feed(frame, csum_trusted=True)
    assert port_b.sent == []
    assert core.counters["switch.gso.bad_size"] == 1
    assert core.counters["switch.gso.over_mtu"] == 1
    assert core.counters["switch.gso.family"] == 1
    assert core.counters["switch.gso.unsupported"] == 1
    assert core.counters["switch.gso.segmented"] == 0
    assert core.pool.in_use == 0


def test_routed_super_frame_segmented_and_readdressed(core: Any, frames: Any) -> None:
    """To guestnet's MAC for B's address: each segment readdressed, TTL one less."""
    port_b = two_guests(core, frames)
    payload = _pattern(2 * MSS + 5)
    frame = bytearray(tcp_super(frames, False, ACK, payload))
    frame[0:6] = frames.OUR_MAC
    core.port.rx_vnet = _vnet(1, 1, MSS, 34, 16)
    core.feed(bytes(frame), csum_trusted=True)
    want = expected_tcp(frames, False, ACK, payload)
    assert len(port_b.sent) == 3
    for got, seg in zip(port_b.sent, want, strict=True):
        assert got[0:6] == MAC_B and got[6:12] == frames.OUR_MAC
        assert got[22] == seg[22] - 1  # TTL
        assert got[34:] == seg[34:]
        _scapy_checks(got, False, 6)
    assert core.counters["switch.routed"] == 1


# --- IPv6 routed between guests --------------------------------------------------------------


def _learn_b6(core: Any, frames: Any, port_b: Any) -> None:
    core.feed(frames.icmp6(src=IP6_B, eth_src=MAC_B), port=port_b)
    core.take_sent()
    port_b.sent.clear()


def test_ipv6_to_guestnet_mac_for_another_guest_is_routed(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    _learn_b6(core, frames, port_b)
    frame = frames.udp6(dst=IP6_B)  # to guestnet's MAC, hop limit 64
    core.feed(frame)
    (got,) = port_b.sent
    assert got[0:6] == MAC_B and got[6:12] == frames.OUR_MAC
    assert got[21] == 63
    assert got[12:21] == frame[12:21] and got[22:] == frame[22:]
    assert core.take_sent() == []
    assert core.counters["switch.routed"] == 1


def test_ipv6_to_guestnet_own_or_unknown_address_not_routed(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    _learn_b6(core, frames, port_b)
    core.feed(frames.icmp6(dst=frames.GATEWAY_IP6))  # echo to guestnet: to its NDP service
    assert core.counters["ndp.unavailable"] == 2  # (none in this harness; B's echo was first)
    core.feed(frames.udp6(dst=bytes.fromhex("fd000000000000000000000000000099")))
    assert port_b.sent == []
    assert core.counters["switch.routed"] == 0


def test_ipv6_routed_hop_limit_expired_dropped(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    _learn_b6(core, frames, port_b)
    core.feed(_frame_hop1(frames))
    assert port_b.sent == []
    assert core.counters["switch.route.ttl_expired"] == 1


def _frame_hop1(frames: Any) -> bytes:
    seg = frames.udp_segment(40000, 9999, b"x", frames.GUEST_IP6, IP6_B)
    return frames.ipv6(PROTO_UDP, seg, frames.GUEST_IP6, IP6_B, hop_limit=1)


def test_isolate_drops_routed_ipv6(make_core: Any, frames: Any) -> None:
    core = make_core(isolate=True)
    port_b = two_guests(core, frames)
    _learn_b6(core, frames, port_b)
    core.feed(frames.udp6(dst=IP6_B))
    assert port_b.sent == []
    assert core.counters["switch.isolated"] >= 1
    assert core.pool.in_use == 0


def test_ipv6_address_learned_from_frames_switched_between_guests(core: Any, frames: Any) -> None:
    """B only ever answers A directly (L2): its address is still learned, so A's packets for
    it through the gateway reach it."""
    port_b = two_guests(core, frames)
    back = frames.udp6(9999, 40000, b"back", src=IP6_B, dst=frames.GUEST_IP6, eth_src=MAC_B,
                       eth_dst=frames.GUEST_MAC)  # fmt: skip
    core.feed(back, port=port_b)
    assert core.take_sent() == [back]
    core.feed(frames.udp6(dst=IP6_B))
    (got,) = port_b.sent
    assert got[0:6] == MAC_B
    assert core.counters["switch.routed"] == 1


def test_ipv6_routed_both_ways_through_the_gateway(core: Any, frames: Any) -> None:
    """Both guests route to each other through guestnet: each learned from its routed frames."""
    port_b = two_guests(core, frames)
    _learn_b6(core, frames, port_b)
    core.feed(frames.udp6(dst=IP6_B))
    assert len(port_b.sent) == 1
    back = frames.udp6(9999, 40000, b"back", src=IP6_B, dst=frames.GUEST_IP6, eth_src=MAC_B)
    core.feed(back, port=port_b)
    (got,) = core.take_sent()
    assert got[0:6] == frames.GUEST_MAC and got[21] == 63
    assert core.counters["switch.routed"] == 2
