"""Fuzz the classifier with random and mutated guest frames (Hypothesis).

Starting points are valid frames of every kind the classifier routes (ARP, DHCP, DNS, UDP and
TCP to the NAT, ICMP, a fragment; over IPv6: neighbour and router solicitations, echo to the
gateway, DHCPv6, DNS, UDP and TCP to the NAT, extension headers, a fragment) and the NDP service
is in place, so mutated NDP messages reach its validation. Each example mutates a few of them
(flip, overwrite, truncate, extend, splice) and feeds them, with and without ``csum_trusted``
so corrupted L4 bytes also reach the services behind the checksum check. Whatever comes in,
nothing may raise out of ``handle_frame`` and no pooled frame may be left checked out.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.core.dhcp import DhcpServer
from guestnet.core.ndp import NdpService
from guestnet.wire.ethernet import BROADCAST
from guestnet.wire.ipv4 import FLAG_MF, PROTO_UDP
from guestnet.wire.tcp import ACK, PSH, SYN, build_syn_options

FUZZ_SETTINGS = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def dhcp_payload(msg_type: int, mac: bytes) -> bytes:
    """A minimal BOOTREQUEST with a DHCP message type option."""
    bootp = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,
        1,
        6,
        0,
        0x1234,
        0,
        0x8000,
        bytes(4),
        bytes(4),
        bytes(4),
        bytes(4),
        mac + bytes(10),
        b"",
        b"",
    )
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, msg_type]) + b"\x37\x03\x01\x03\x06" + b"\xff"
    return bootp + opts


def seed_frames(f: Any) -> list[bytes]:
    mac = f.GUEST_MAC
    return [
        f.arp(),
        f.arp(tpa=f.DNS_IP),
        f.arp(spa=bytes(4)),
        f.arp(tpa=bytes([10, 0, 2, 50])),
        f.udp(68, 67, dhcp_payload(1, mac), src=bytes(4), dst=b"\xff" * 4, eth_dst=BROADCAST),
        f.udp(68, 67, dhcp_payload(3, mac), src=bytes(4), dst=b"\xff" * 4, eth_dst=BROADCAST),
        f.udp(
            5353,
            53,
            b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x03foo\x00\x00\x01\x00\x01",
            dst=f.DNS_IP,
        ),
        f.udp(40000, 9999, b"payload"),
        f.tcp(40000, 80, SYN, options=build_syn_options(1460, 7)),
        f.tcp(40000, 53, ACK | PSH, payload=b"\x00\x05hello", dst=f.GATEWAY_IP),
        f.icmp(),
        f.ipv4(PROTO_UDP, bytes(24), frag=FLAG_MF),
        *seed_frames6(f),
    ]


def seed_frames6(f: Any) -> list[bytes]:
    """IPv6 seeds: NDP with options, echo, DHCPv6, DNS, NAT, extension headers, a fragment."""
    gw = f.GATEWAY_IP6
    sn_gw = bytes.fromhex("ff0200000000000000000001ff000002")
    sll = bytes([1, 1]) + f.GUEST_MAC
    all_routers = bytes.fromhex("ff020000000000000000000000000002")
    all_dhcp = bytes.fromhex("ff020000000000000000000000010002")
    udp = f.udp_segment(4000, 9999, b"six", f.GUEST_IP6, f.REMOTE_IP6)
    return [
        f.icmp6(135, 0, 0, 0, gw + sll, dst=sn_gw, hop_limit=255),
        f.icmp6(135, 0, 0, 0, f.GUEST_IP6, src=bytes(16), dst=sn_gw, hop_limit=255),
        f.icmp6(133, 0, 0, 0, sll, src=f.GUEST_LL6, dst=all_routers, hop_limit=255),
        f.icmp6(128, 0, 7, 1, b"ping6"),
        f.udp6(546, 547, b"\x01\x00\x00\x01", src=f.GUEST_LL6, dst=all_dhcp),
        f.udp6(5353, 53, b"\x12\x34\x01\x00\x00\x01" + bytes(6), dst=f.DNS_IP6),
        f.tcp6(40000, 80, SYN),
        f.ipv6(0, bytes([60, 0, 1, 4, 0, 0, 0, 0]) + bytes([17, 0]) + bytes(6) + udp),
        f.ipv6(44, bytes([PROTO_UDP, 0, 0, 1, 0, 0, 0, 9]) + bytes(16)),
    ]


def mutate(frame: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (op, position, value) mutations; positions wrap around the frame's length."""
    buf = bytearray(frame)
    for op, pos, value in ops:
        n = len(buf)
        i = pos % n if n else 0
        if op == 0 and n:  # flip bits
            buf[i] ^= value or 1
        elif op == 1 and n:  # overwrite a byte
            buf[i] = value
        elif op == 2:  # truncate
            del buf[i:]
        elif op == 3:  # extend with junk
            buf += bytes([value]) * (pos % 64)
        elif op == 4 and n >= 2:  # overwrite a 16-bit field (lengths, ports, ethertype)
            struct.pack_into("!H", buf, min(i, n - 2), value * 257)
    return bytes(buf)


mutation = st.tuples(st.integers(0, 4), st.integers(0, 2000), st.integers(0, 255))
mutated_frame = st.tuples(st.integers(0, 20), st.lists(mutation, min_size=1, max_size=6))
random_frame = st.binary(min_size=0, max_size=200).map(
    lambda b: bytes.fromhex("52550a000202525400123456") + b
)
#: Random bytes behind an Ethernet header and a plausible IPv6 version nibble.
random_frame6 = st.binary(min_size=0, max_size=200).map(
    lambda b: bytes.fromhex("52550a00020252540012345686dd60") + b
)


def new_core(make_core: Any) -> Any:
    core = make_core()
    core.classifier.dhcp = DhcpServer(core.config, core.pool, core.counters)
    core.classifier.ndp = NdpService(core.config, core.pool, core.counters, core.switch)
    return core


@FUZZ_SETTINGS
@given(
    batch=st.lists(st.tuples(mutated_frame, st.booleans()), min_size=1, max_size=5),
)
def test_fuzz_mutated_frames(make_core: Any, frames: Any, batch: list[Any]) -> None:
    core = new_core(make_core)
    seeds = seed_frames(frames)
    for (index, ops), trusted in batch:
        core.feed(mutate(seeds[index], ops), csum_trusted=trusted)
        core.now += 1.0
    assert core.pool.in_use == 0
    assert core.port.rx_frames == len(batch)


@settings(FUZZ_SETTINGS, max_examples=1000)
@given(
    batch=st.lists(
        st.tuples(st.one_of(random_frame, random_frame6), st.booleans()), min_size=1, max_size=5
    )
)
def test_fuzz_random_frames(make_core: Any, batch: list[Any]) -> None:
    core = new_core(make_core)
    for data, trusted in batch:
        core.feed(data, csum_trusted=trusted)
    assert core.pool.in_use == 0


def test_seed_frames_are_valid(make_core: Any, frames: Any) -> None:
    """Unmutated seeds are handled without any drop counted as malformed (guards the fuzzer)."""
    core = new_core(make_core)
    for frame in seed_frames(frames):
        core.feed(frame)
    counts = core.counters.snapshot()
    bad = {k: v for k, v in counts.items() if "bad" in k or "truncated" in k}
    assert bad == {}, counts
    assert counts["arp.reply.sent"] == 3
    assert counts.get("dhcp.discover") == 1
    assert counts["ndp.na.sent"] == 1 and counts["ndp.ns.dad_ignored"] == 1
    assert counts["ndp.ra.solicited"] == 1 and counts["icmp6.echo.answered"] == 1
    assert core.pool.in_use == 0
