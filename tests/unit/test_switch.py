"""The switch as a learning bridge (issue 15): frames fed on several ports of one core."""

from __future__ import annotations

import struct
from typing import Any

from guestnet.core.switch import MAC_AGE_S, MAX_MACS_PER_PORT
from guestnet.wire.arp import ARP_REPLY
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ipv4 import PROTO_TCP, PROTO_UDP

MAC_B = bytes.fromhex("5254000000bb")
MAC_C = bytes.fromhex("5254000000cc")
IP_B = bytes([10, 0, 2, 16])
BROADCAST = b"\xff" * 6


class NatRecorder:
    """Stands in the NAT slots: a frame switched between guests must never reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def handle_udp(self, *_args: Any) -> None:
        self.calls += 1

    def handle_tcp(self, *_args: Any) -> None:
        self.calls += 1


def two_guests(core: Any, frames: Any) -> Any:
    """Port A (core.port) with GUEST_MAC and port B with MAC_B, both learned."""
    port_b = core.add_port("guest1")
    core.feed(frames.arp())
    core.feed(frames.arp(sha=MAC_B, spa=IP_B), port=port_b)
    core.take_sent()
    port_b.sent.clear()
    return port_b


def test_unicast_to_another_guest_is_switched_not_nated(core: Any, frames: Any) -> None:
    nat = NatRecorder()
    core.classifier.udp_nat = nat
    core.classifier.tcp_nat = nat
    port_b = two_guests(core, frames)
    udp = frames.udp(dst=IP_B, eth_dst=MAC_B)
    core.feed(udp)
    assert port_b.sent == [udp]
    assert core.take_sent() == []
    assert nat.calls == 0
    # And back: B's answer reaches A verbatim.
    back = frames.udp(9999, 40000, b"back", src=IP_B, dst=frames.GUEST_IP, eth_src=MAC_B,
                      eth_dst=frames.GUEST_MAC)  # fmt: skip
    core.feed(back, port=port_b)
    assert core.take_sent() == [back]
    assert nat.calls == 0
    assert core.counters["switch.unicast"] == 2


def test_arp_for_another_guest_is_flooded_and_left_to_it(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    request = frames.arp(tpa=IP_B)
    core.feed(request)
    assert port_b.sent == [request]
    assert core.take_sent() == []  # guestnet does not answer for B
    assert core.counters["arp.request.not_ours"] == 1
    # B's reply is unicast to A and switched to A only.
    reply = frames.arp(ARP_REPLY, sha=MAC_B, spa=IP_B, tha=frames.GUEST_MAC,
                       tpa=frames.GUEST_IP, eth_dst=frames.GUEST_MAC)  # fmt: skip
    core.feed(reply, port=port_b)
    assert core.take_sent() == [reply]
    assert len(port_b.sent) == 1


def test_guestnet_answers_every_port(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    core.feed(frames.arp(sha=MAC_B, spa=IP_B), port=port_b)
    reply = port_b.sent[-1]
    assert reply[:6] == MAC_B and reply[6:12] == frames.OUR_MAC
    # A saw B's broadcast request, not guestnet's reply.
    assert core.take_sent() == [frames.arp(sha=MAC_B, spa=IP_B)]


def test_unknown_unicast_and_multicast_flooded_to_the_other_ports(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    port_c = core.add_port("guest2")
    unknown = frames.udp(eth_dst=bytes.fromhex("020000000099"))
    core.feed(unknown)
    assert port_b.sent == [unknown] and port_c.sent == [unknown]
    assert core.take_sent() == []
    mcast = frames.udp(dst=bytes([224, 0, 0, 251]), eth_dst=bytes.fromhex("01005e0000fb"))
    core.feed(mcast, port=port_b)
    assert core.take_sent() == [mcast] and port_c.sent[-1] == mcast
    assert port_b.sent == [unknown]  # never back out of the port it came in on
    assert core.pool.in_use == 0


def test_unknown_unicast_with_one_port_counts_not_ours(core: Any, frames: Any) -> None:
    core.feed(frames.udp(eth_dst=bytes.fromhex("020000000099")))
    assert core.counters["eth.dst.not_ours"] == 1
    assert core.take_sent() == []


def test_frame_for_a_mac_on_its_own_port_is_dropped(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    core.feed(frames.udp(eth_src=MAC_C))  # a second MAC behind port A
    core.feed(frames.udp(eth_dst=MAC_C))
    assert core.take_sent() == [] and port_b.sent == []
    assert core.counters["switch.same_port"] == 1


def test_several_macs_per_port(core: Any, frames: Any) -> None:
    """A guest that bridges: both MACs stay on its port, frames to either reach it."""
    port_b = two_guests(core, frames)
    core.feed(frames.udp(eth_src=MAC_C))
    core.feed(frames.udp())
    assert core.switch.port_for(MAC_C) is core.port
    assert core.switch.port_for(frames.GUEST_MAC) is core.port
    for dst in (MAC_C, frames.GUEST_MAC):
        core.feed(frames.udp(src=IP_B, eth_src=MAC_B, eth_dst=dst), port=port_b)
    assert [f[:6] for f in core.take_sent()] == [MAC_C, frames.GUEST_MAC]
    assert sorted(core.port.macs) == sorted([frames.GUEST_MAC, MAC_C])


def test_secondary_mac_ages_out_and_is_flooded(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    port_c = core.add_port("guest2")
    core.feed(frames.udp(eth_src=MAC_C))
    # MAC_C, the last MAC new to A, is its guest_mac: GUEST_MAC is secondary, and may age.
    assert core.port.guest_mac == MAC_C
    core.now += MAC_AGE_S + 1
    to_old = frames.udp(src=IP_B, eth_src=MAC_B, eth_dst=frames.GUEST_MAC)
    core.feed(to_old, port=port_b)
    assert core.counters["switch.mac.aged"] == 1
    assert core.switch.port_for(frames.GUEST_MAC) is None
    assert core.take_sent() == [to_old] and port_c.sent == [to_old]  # flooded
    # guest_mac never ages while its port lives.
    core.feed(frames.udp(src=IP_B, eth_src=MAC_B, eth_dst=MAC_C), port=port_b)
    assert [f[:6] for f in core.take_sent()] == [MAC_C]


def test_macs_per_port_bounded(core: Any, frames: Any) -> None:
    for i in range(MAX_MACS_PER_PORT + 6):
        core.now += 1
        core.feed(frames.udp(eth_src=bytes([2, 0, 0, 0, 1, i])))
    assert len(core.port.macs) == MAX_MACS_PER_PORT
    assert core.counters["switch.mac.evicted"] == 6
    assert core.switch.port_for(bytes([2, 0, 0, 0, 1, 0])) is None  # the oldest went first
    assert core.switch.port_for(bytes([2, 0, 0, 0, 1, MAX_MACS_PER_PORT + 5])) is core.port


def test_mac_moving_to_another_port_leaves_the_old(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    core.feed(frames.udp(eth_src=MAC_B))
    assert core.switch.port_for(MAC_B) is core.port
    assert MAC_B not in port_b.macs and port_b.guest_mac is None


def test_detach_forgets_every_mac_of_the_port(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    core.feed(frames.udp(eth_src=MAC_C), port=port_b)
    core.switch.detach(port_b)
    assert core.switch.port_for(MAC_B) is None and core.switch.port_for(MAC_C) is None


def test_isolate_drops_guest_to_guest_and_still_answers(make_core: Any, frames: Any) -> None:
    core = make_core(isolate=True)
    port_b = two_guests(core, frames)
    assert core.counters["switch.isolated"] == 2  # the two ARP broadcasts, not flooded
    core.feed(frames.udp(dst=IP_B, eth_dst=MAC_B))
    core.feed(frames.arp(tpa=IP_B))
    core.feed(frames.udp(eth_dst=bytes.fromhex("020000000099")))
    assert port_b.sent == []
    assert core.counters["switch.isolated"] == 5
    # guestnet's own addresses still answer each port.
    core.feed(frames.arp(sha=MAC_B, spa=IP_B), port=port_b)
    assert len(port_b.sent) == 1 and port_b.sent[0][6:12] == frames.OUR_MAC
    assert core.take_sent() == []
    assert core.pool.in_use == 0


# --- offloads carried across ---------------------------------------------------------------------


def _partial_tcp(frames: Any, payload: bytes) -> bytes:
    """A TCP frame A -> B whose checksum field holds only the pseudo-header sum (as a guest
    kernel with checksum offload hands it over)."""
    frame = bytearray(frames.tcp(40000, 5001, 0x18, payload=payload, dst=IP_B, eth_dst=MAC_B))
    l4 = len(frame) - 34
    struct.pack_into("!H", frame, 34 + 16, pseudo_header_sum(frames.GUEST_IP, IP_B, PROTO_TCP, l4))
    return bytes(frame)


def _vnet(flags: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int) -> Any:
    return memoryview(struct.pack("<BBHHHH", flags, gso_type, 0, gso_size, csum_start,
                                  csum_offset))  # fmt: skip


def test_partial_checksum_completed_for_a_port_without_offloads(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    frame = _partial_tcp(frames, b"x" * 101)
    core.port.rx_vnet = _vnet(1, 0, 0, 34, 16)
    core.feed(frame, csum_trusted=True)
    (out,) = port_b.sent
    l4 = out[34:]
    assert checksum(l4, pseudo_header_sum(frames.GUEST_IP, IP_B, PROTO_TCP, len(l4))) == 0
    assert out[:50] == frame[:50] and out[52:] == frame[52:]


def test_udp_partial_checksum_zero_sent_as_ones(core: Any, frames: Any) -> None:
    """A UDP checksum that computes to 0 goes out as 0xffff."""
    port_b = two_guests(core, frames)
    # Find a payload whose checksum computes to 0 (bounded search).
    for n in range(65536):
        payload = struct.pack("!H", n)
        frame = bytearray(frames.udp(1, 2, payload, dst=IP_B, eth_dst=MAC_B))
        struct.pack_into("!H", frame, 40, 0)
        if checksum(frame[34:], pseudo_header_sum(frames.GUEST_IP, IP_B, PROTO_UDP, 10)) == 0:
            break
    else:
        raise AssertionError("no payload with a zero checksum")
    struct.pack_into("!H", frame, 40, pseudo_header_sum(frames.GUEST_IP, IP_B, PROTO_UDP, 10))
    core.port.rx_vnet = _vnet(1, 0, 0, 34, 6)
    core.feed(bytes(frame), csum_trusted=True)
    assert port_b.sent[0][40:42] == b"\xff\xff"


def test_offloads_carried_to_a_port_that_takes_them(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    port_b.offload_max = 65535
    seen: list[tuple[int, int, int]] = []
    collect = port_b.send

    def send(frame: Any) -> None:
        seen.append((frame.csum_start, frame.csum_offset, frame.gso_size))
        collect(frame)

    port_b.send = send
    frame = _partial_tcp(frames, b"y" * 3000)
    core.port.rx_vnet = _vnet(1, 1, 1448, 34, 16)
    core.feed(frame, csum_trusted=True)
    assert seen == [(34, 16, 1448)]
    assert port_b.sent == [frame]


def test_super_frame_to_a_port_without_offloads_segmented(core: Any, frames: Any) -> None:
    """No longer dropped: cut into MSS-sized segments (tests/unit/test_switch_gso.py checks
    them byte by byte)."""
    port_b = two_guests(core, frames)
    core.port.rx_vnet = _vnet(1, 1, 1448, 34, 16)
    core.feed(_partial_tcp(frames, b"y" * 3000), csum_trusted=True)
    assert [len(f) for f in port_b.sent] == [54 + 1448, 54 + 1448, 54 + 104]
    assert core.counters["switch.gso.unsupported"] == 0
    assert core.counters["switch.gso.segments"] == 3


# --- guests by address (published ports choose their guest) --------------------------------------


def test_arp_teaches_each_guests_address(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    assert core.switch.port_for_ip(frames.GUEST_IP) is core.port
    assert core.switch.port_for_ip(IP_B) is port_b
    assert core.switch.mac_for_ip4(IP_B) == MAC_B
    assert core.switch.port_for_ip(bytes([10, 0, 2, 99])) is None
    assert core.switch.ip4_on(port_b) == ["10.0.2.16"]
    # A probe (sender 0.0.0.0) teaches nothing; an address that moves follows its new MAC.
    core.feed(frames.arp(sha=MAC_C, spa=bytes(4), tpa=bytes([10, 0, 2, 99])), port=port_b)
    assert core.switch.mac_for_ip4(bytes(4)) is None
    core.feed(frames.arp(sha=MAC_C, spa=IP_B), port=port_b)
    assert core.switch.mac_for_ip4(IP_B) == MAC_C and core.switch.port_for_ip(IP_B) is port_b


def test_forwarded_connection_opens_on_the_named_guests_port(make_core: Any, frames: Any) -> None:
    """The TCP NAT's SYN for a published port goes to the port of the guest it names."""
    from guestnet.io.tcp_nat import _guest_port

    core = make_core()
    port_b = two_guests(core, frames)
    assert _guest_port(core.switch, IP_B) is port_b
    assert _guest_port(core.switch, frames.GUEST_IP) is core.port
    # Not known (yet): the first port a guest spoke on, as with one guest.
    assert _guest_port(core.switch, bytes([10, 0, 2, 77])) is core.port


# --- a guest routing through the gateway to another guest -----------------------------------------


def test_packet_to_another_guest_via_the_gateway_is_routed(core: Any, frames: Any) -> None:
    nat = NatRecorder()
    core.classifier.udp_nat = nat
    port_b = two_guests(core, frames)
    sent = frames.udp(dst=IP_B, eth_dst=frames.OUR_MAC)
    core.feed(sent)
    (out,) = port_b.sent
    assert out[:6] == MAC_B and out[6:12] == frames.OUR_MAC
    assert out[22] == sent[22] - 1  # TTL
    assert checksum(out[14:34]) == 0  # header checksum redone
    assert out[23:24] == sent[23:24] and out[34:] == sent[34:]
    assert nat.calls == 0 and core.counters["switch.routed"] == 1
    assert core.take_sent() == []


def test_address_no_guest_claimed_goes_to_the_nat(core: Any, frames: Any) -> None:
    nat = NatRecorder()
    core.classifier.udp_nat = nat
    two_guests(core, frames)
    core.feed(frames.udp(dst=bytes([10, 0, 2, 77])))
    assert nat.calls == 1  # the NAT (and its policy) decides, as before


def test_routed_ttl_expired_dropped(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    frame = bytearray(frames.udp(dst=IP_B))
    frame[22] = 1
    frame[24:26] = b"\x00\x00"
    frame[24:26] = checksum(frame[14:34]).to_bytes(2, "big")
    core.feed(bytes(frame))
    assert port_b.sent == [] and core.counters["switch.route.ttl_expired"] == 1


def test_routed_bad_header_checksum_dropped(core: Any, frames: Any) -> None:
    port_b = two_guests(core, frames)
    frame = bytearray(frames.udp(dst=IP_B))
    frame[24] ^= 0xFF
    core.feed(bytes(frame))
    assert port_b.sent == [] and core.counters["ipv4.bad_checksum"] == 1


def test_isolate_drops_routed_guest_to_guest(make_core: Any, frames: Any) -> None:
    core = make_core(isolate=True)
    port_b = two_guests(core, frames)
    core.feed(frames.udp(dst=IP_B))
    assert port_b.sent == [] and core.counters["switch.isolated"] == 3


def test_addresses_learned_from_frames_switched_between_guests(core: Any, frames: Any) -> None:
    """A guest that only ever answers another one (a unicast ARP reply, IPv4 to it) is still
    found by its address."""
    port_b = core.add_port("guest1")
    core.feed(frames.udp(eth_src=MAC_B), port=port_b)  # B known by MAC only (to guestnet)
    core.feed(frames.udp(dst=IP_B, eth_dst=MAC_B))  # A -> B, switched
    assert core.switch.mac_for_ip4(frames.GUEST_IP) == frames.GUEST_MAC
    reply = frames.arp(ARP_REPLY, sha=MAC_B, spa=IP_B, tha=frames.GUEST_MAC,
                       tpa=frames.GUEST_IP, eth_dst=frames.GUEST_MAC)  # fmt: skip
    core.feed(reply, port=port_b)
    assert core.switch.mac_for_ip4(IP_B) == MAC_B
    core.take_sent()


def test_isolate_refuses_a_mac_taken_from_a_live_port(make_core: Any, frames: Any) -> None:
    core = make_core(isolate=True)
    port_b = two_guests(core, frames)
    core.feed(frames.udp(eth_src=MAC_B))  # guest A sends from B's MAC
    assert core.switch.port_for(MAC_B) is port_b
    assert core.counters["switch.mac.refused"] == 1
    core.switch.detach(port_b)  # once B is gone, its MAC may come back elsewhere
    core.feed(frames.udp(eth_src=MAC_B))
    assert core.switch.port_for(MAC_B) is core.port


def test_only_guest_addresses_are_learned(core: Any, frames: Any) -> None:
    """A guest claiming an outside address, guestnet's or the broadcast in ARP draws nothing."""
    for spa in (frames.REMOTE_IP, frames.GATEWAY_IP, bytes([10, 0, 2, 255])):
        core.feed(frames.arp(sha=MAC_B, spa=spa, tpa=bytes([10, 0, 2, 99])))
        assert core.switch.mac_for_ip4(spa) is None
    core.feed(frames.udp(dst=frames.REMOTE_IP))
    assert core.take_sent() == []
