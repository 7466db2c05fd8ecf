"""IPv6 reassembly (guest -> guestnet), the same Reassembler with ``family=IPV6``, and IPv6
fragmentation toward the guest (``fragment_frame6``).

Guest fragments are made by scapy's ``fragment6`` and fed through the classifier; a recording
UDP handler in the ``udp_nat6`` slot shows what the reassembler re-injected. Fragments toward
the guest are put back together by scapy's ``defragment6``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    defragment6,
    fragment6,
)
from scapy.layers.l2 import Ether

from guestnet.core.fragments import REASSEMBLY_TIMEOUT_S, Reassembler, send_ipv6_to_guest
from guestnet.core.ndp import NdpService
from guestnet.core.packet import IpPacket
from guestnet.pool import FramePool
from guestnet.wire.l3 import IPV6

GUEST_MAC = "52:54:00:12:34:56"
OUR_MAC = "52:55:0a:00:02:02"
PAYLOAD = bytes(range(256)) * 16  # 4096 bytes: three fragments at MTU 1500


class Recorder:
    """A UDP handler keeping (sport, dport, payload, family) of every whole datagram."""

    def __init__(self) -> None:
        self.got: list[tuple[int, int, bytes, object]] = []

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        self.got.append((sport, dport, bytes(payload), pkt.family))


@pytest.fixture
def rig(core: Any) -> tuple[Any, Reassembler, Recorder]:
    rec = Recorder()
    core.classifier.udp_nat6 = rec
    reasm = Reassembler(core.counters, core.classifier.route_ipv6, family=IPV6)
    core.classifier.reassembly6 = reasm
    core.port.ip6_seen = True
    return core, reasm, rec


def guest_fragments6(payload: bytes, ident: int = 77, ext: bool = False) -> list[bytes]:
    """The guest's fragments of one UDP datagram to 2001:db8::9, at MTU 1500."""
    ip = IPv6(src="fd00::15", dst="2001:db8::9")
    if ext:  # a destination-options header in the fragmentable part
        ip = ip / IPv6ExtHdrDestOpt()
    pkt = ip / IPv6ExtHdrFragment(id=ident) / UDP(sport=40000, dport=9999) / payload
    return [bytes(Ether(dst=OUR_MAC, src=GUEST_MAC) / f) for f in fragment6(pkt, 1500)]


@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_reassembled_in_any_order(rig: Any, order: str) -> None:
    core, reasm, rec = rig
    parts = guest_fragments6(PAYLOAD)
    assert len(parts) == 3
    if order == "reversed":
        parts.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(parts)
    for p in parts:
        core.feed(p)
    assert rec.got == [(40000, 9999, PAYLOAD, IPV6)]
    snap = core.counters.snapshot()
    assert snap == {"ipv6.fragment.accepted": 3, "ipv6.fragment.reassembled": 1}
    assert len(reasm) == 0


def test_extension_header_in_fragmentable_part_walked(rig: Any) -> None:
    core, _, rec = rig
    for p in guest_fragments6(PAYLOAD, ext=True):
        core.feed(p)
    assert rec.got == [(40000, 9999, PAYLOAD, IPV6)]


def test_two_datagrams_interleaved_and_bad_checksum_counted(rig: Any) -> None:
    core, _, rec = rig
    a = guest_fragments6(PAYLOAD, ident=1)
    b = guest_fragments6(PAYLOAD[::-1], ident=2)
    for x, y in zip(a, b, strict=True):
        core.feed(x)
        core.feed(y)
    assert [g[2] for g in rec.got] == [PAYLOAD, PAYLOAD[::-1]]
    bad = guest_fragments6(PAYLOAD, ident=3)
    last = bytearray(bad[-1])
    last[-1] ^= 0xFF  # the UDP checksum covers the whole datagram: checked after reassembly
    for p in [*bad[:-1], bytes(last)]:
        core.feed(p)
    assert len(rec.got) == 2 and core.counters["udp.bad_checksum"] == 1


def test_overlap_and_timeout(rig: Any) -> None:
    core, reasm, rec = rig
    parts = guest_fragments6(PAYLOAD, ident=9)
    core.feed(parts[0])
    core.feed(parts[0])  # an exact duplicate is ignored
    assert core.counters["ipv6.fragment.duplicate"] == 1
    core.now += REASSEMBLY_TIMEOUT_S + 1
    core.feed(guest_fragments6(PAYLOAD, ident=10)[1])
    assert core.counters["ipv6.fragment.timeout"] == 1 and len(reasm) == 1
    assert rec.got == []


def test_reassembled_header_error_counted(rig: Any) -> None:
    """A fragmentable part whose extension header runs past the end: counted, not raised."""
    core, _, rec = rig
    base = Ether(dst=OUR_MAC, src=GUEST_MAC) / IPv6(src="fd00::15", dst="2001:db8::9")
    # Two pieces, the first starting a destination-options header longer than both.
    first = base / IPv6ExtHdrFragment(id=4, nh=60, offset=0, m=1) / (bytes([17, 200]) + bytes(6))
    second = base / IPv6ExtHdrFragment(id=4, nh=60, offset=1, m=0) / bytes(8)
    core.feed(bytes(first))
    core.feed(bytes(second))
    assert core.counters["ipv6.fragment.reassembled"] == 0
    assert core.counters["ipv6.ext.truncated"] == 1 and rec.got == []


@pytest.mark.parametrize(("mtu", "size"), [(1280, 1233), (1500, 4000), (1500, 1453), (9000, 30000)])
def test_fragments_toward_guest_defragment_with_scapy(mtu: int, size: int) -> None:
    pool = FramePool(mtu, 8)
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    whole = bytes(
        Ether(dst=GUEST_MAC, src=OUR_MAC)
        / IPv6(src="2001:db8::9", dst="fd00::15", hlim=64)
        / UDP(sport=9999, dport=40000)
        / payload
    )
    frame = pool.acquire()
    frame.view[frame.start : frame.start + len(whole)] = whole
    frame.length = len(whole)
    sent: list[bytes] = []

    def send(f: Any) -> None:
        sent.append(bytes(f.data))
        pool.release(f)

    n = send_ipv6_to_guest(frame, mtu, pool, send, ident=0xABCDEF01)
    assert pool.in_use == 0 and n == len(sent)
    if 40 + 8 + size <= mtu:
        assert sent == [whole]
        return
    assert n > 1
    for raw in sent:
        assert len(raw) - 14 <= mtu
        frag = Ether(raw)[IPv6ExtHdrFragment]
        assert frag.id == 0xABCDEF01 and frag.nh == 17
    assert [Ether(r)[IPv6ExtHdrFragment].m for r in sent] == [1] * (n - 1) + [0]
    back = IPv6(bytes(defragment6([Ether(r)[IPv6] for r in sent])))
    assert bytes(back[UDP].payload) == payload
    assert back[UDP].chksum == Ether(whole)[UDP].chksum


def test_large_echo_to_gateway_reassembled_and_answered_in_fragments(make_core: Any) -> None:
    core = make_core(mtu=1500)
    core.classifier.ndp = NdpService(core.config, core.pool, core.counters, core.switch)
    core.classifier.reassembly6 = Reassembler(
        core.counters, core.classifier.route_ipv6, family=IPV6
    )
    core.port.ip6_seen = True
    data = bytes(range(256)) * 12
    req = IPv6(src="fd00::15", dst="fd00::2") / ICMPv6EchoRequest(id=5, seq=6, data=data)
    for f in fragment6(_with_frag(req), 1500):
        core.feed(bytes(Ether(dst=OUR_MAC, src=GUEST_MAC) / f))
    sent = core.take_sent()
    assert len(sent) == 3 and all(len(r) - 14 <= 1500 for r in sent)
    reply = defragment6([Ether(r)[IPv6] for r in sent])
    echo = IPv6(bytes(reply))[ICMPv6EchoReply]
    assert (echo.id, echo.seq, bytes(echo.data)) == (5, 6, data)
    ref = IPv6(bytes(IPv6(src="fd00::2", dst="fd00::15") / ICMPv6EchoReply(id=5, seq=6, data=data)))
    assert echo.cksum == ref[ICMPv6EchoReply].cksum
    assert core.counters["ipv6.fragment.reassembled"] == 1
    assert core.counters["icmp6.echo.answered"] == 1
    assert core.pool.in_use == 0


def _with_frag(pkt: Any) -> Any:
    """``pkt`` with a Fragment header after the IPv6 header, as fragment6 wants."""
    ip = pkt[IPv6]
    return IPv6(src=ip.src, dst=ip.dst) / IPv6ExtHdrFragment(id=31) / ip.payload
