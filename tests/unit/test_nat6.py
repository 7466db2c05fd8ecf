"""The UDP NAT and ICMP echo over IPv6 (the TCP translation's tests run over both families in
test_tcp.py): guest frames in through the classifier's IPv6 slots, fake host sockets, frames out
checked with scapy (which recomputes every checksum, the ICMPv6 pseudo-header included)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    IPerror6,
    IPv6,
    IPv6ExtHdrFragment,
    UDPerror,
    defragment6,
)
from scapy.layers.l2 import Ether

from guestnet.core.icmp import EchoFlow, IcmpService
from guestnet.core.policy import Policy
from guestnet.core.udp import UdpFlow, UdpNat

REMOTE = "2001:db8::1"


class FakeSocket:
    def __init__(self, flow: UdpFlow) -> None:
        self.flow = flow
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        self.sent.append((bytes(data), addr))
        return len(data)

    def close(self) -> None:
        pass


class FakePing:
    def __init__(self, flow: EchoFlow) -> None:
        self.flow = flow
        self.sent: list[tuple[str, int, bytes]] = []

    def send_echo(self, host: str, seq: int, payload: memoryview) -> None:
        self.sent.append((host, seq, bytes(payload)))

    def close(self) -> None:
        pass


class Rig6:
    """UDP NAT and ICMP service on the IPv6 slots of a core harness, on fake host sockets."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.sockets: list[FakeSocket] = []
        self.pings: list[FakePing] = []
        policy = Policy(core.config)
        self.icmp = IcmpService(core.config, core.pool, core.counters, core.switch, policy, self)
        self.nat = UdpNat(
            core.config, core.pool, core.counters, core.switch, policy, self.icmp, self.udp_socket
        )
        core.classifier.udp_nat6 = self.nat
        core.classifier.icmp6 = self.icmp

    def udp_socket(self, flow: UdpFlow) -> FakeSocket:
        sock = FakeSocket(flow)
        self.sockets.append(sock)
        return sock

    def open(self, flow: EchoFlow) -> FakePing:  # the EchoBackend
        ping = FakePing(flow)
        self.pings.append(ping)
        return ping

    def udp_reply(self, payload: bytes, host: str, hport: int) -> None:
        flow = self.sockets[0].flow
        frame = self.core.pool.acquire()
        off = frame.start + flow.family.udp_payload_off
        frame.view[off : off + len(payload)] = payload
        self.nat.deliver_reply(flow, frame, len(payload), host, hport, self.core.now)

    def sent(self) -> list[Any]:
        return [Ether(raw) for raw in self.core.take_sent()]


@pytest.fixture
def rig(core: Any) -> Iterator[Rig6]:
    r = Rig6(core)
    yield r
    r.nat.close_all()
    r.icmp.close_all()


def _valid(pkt: Any, layer_cls: Any = UDP, field: str = "chksum") -> None:
    """scapy's checksum equals ours (it recomputes the field when it is deleted)."""
    layer = pkt[layer_cls]
    ours = getattr(layer, field)
    delattr(layer, field)
    assert getattr(Ether(bytes(pkt))[layer_cls], field) == ours


def test_udp_out_and_back(rig: Rig6, frames: Any) -> None:
    rig.core.feed(frames.udp6(sport=40000, dport=9999, payload=b"q"))
    assert rig.sockets[0].sent == [(b"q", (REMOTE, 9999))]
    rig.udp_reply(b"answer", REMOTE, 9999)
    (pkt,) = rig.sent()
    assert pkt[IPv6].src == REMOTE and pkt[IPv6].dst == "fd00::15"
    assert (pkt[UDP].sport, pkt[UDP].dport, bytes(pkt[UDP].payload)) == (9999, 40000, b"answer")
    assert pkt.dst == "52:54:00:12:34:56" and pkt.type == 0x86DD
    _valid(pkt)


def test_gateway6_is_the_host_loopback(rig: Rig6, frames: Any) -> None:
    rig.core.feed(frames.udp6(dport=53000, dst=frames.GATEWAY_IP6))
    assert rig.sockets[0].sent == [(b"hello", ("::1", 53000))]
    rig.udp_reply(b"hi", "::1", 53000)
    (pkt,) = rig.sent()
    assert pkt[IPv6].src == "fd00::2"


def test_refused_destination_gets_icmpv6_admin_prohibited(rig: Rig6, frames: Any) -> None:
    nobody = bytes.fromhex("fd000000000000000000000000000099")  # inside the prefix
    rig.core.feed(frames.udp6(dport=9, dst=nobody))
    assert rig.sockets == []
    (pkt,) = rig.sent()
    err = pkt[ICMPv6DestUnreach]
    assert err.code == 1 and pkt[IPv6].src == "fd00::2" and pkt[IPv6].dst == "fd00::15"
    assert err[IPerror6].dst == "fd00::99" and err[UDPerror].dport == 9
    assert rig.core.counters["nat.udp.policy.guest_subnet"] == 1
    _valid(pkt, ICMPv6DestUnreach, "cksum")


def test_link_local_destination_never_forwarded(make_core: Any, frames: Any) -> None:
    rig = Rig6(make_core(allow_link_local=True))
    rig.core.feed(frames.udp6(dst=bytes.fromhex("fe800000000000000000000000000001")))
    assert rig.sockets == [] and rig.core.counters["nat.udp.policy.link_local"] == 1


def test_large_reply_fragmented_with_fragment_headers(make_core: Any, frames: Any) -> None:
    rig = Rig6(make_core(mtu=1500))
    rig.core.feed(frames.udp6(sport=40000, dport=9999))
    payload = bytes(range(256)) * 16  # 4096 bytes
    rig.udp_reply(payload, REMOTE, 9999)
    parts = rig.sent()
    assert len(parts) == 3
    assert all(len(bytes(p[IPv6])) <= 1500 and IPv6ExtHdrFragment in p for p in parts)
    offsets = [p[IPv6ExtHdrFragment].offset * 8 for p in parts]
    assert offsets == sorted(offsets) and [p[IPv6ExtHdrFragment].m for p in parts] == [1, 1, 0]
    assert len({p[IPv6ExtHdrFragment].id for p in parts}) == 1
    whole = IPv6(bytes(defragment6([p[IPv6] for p in parts])))
    assert bytes(whole[UDP].payload) == payload and whole[UDP].dport == 40000
    assert rig.core.counters["nat.udp.to_guest.fragmented"] == 1


def test_host_port_unreachable_relayed_as_icmpv6(rig: Rig6, frames: Any) -> None:
    rig.core.feed(frames.udp6(sport=40000, dport=9999))
    rig.nat.handle_host_error(rig.sockets[0].flow, REMOTE, 9999, 1, 4)  # ICMPv6 port unreach
    (pkt,) = rig.sent()
    err = pkt[ICMPv6DestUnreach]
    assert err.code == 4 and pkt[IPv6].src == REMOTE
    assert err[UDPerror].sport == 40000 and err[UDPerror].dport == 9999
    _valid(pkt, ICMPv6DestUnreach, "cksum")


def test_echo_to_outside_through_a_ping_socket(rig: Rig6, frames: Any) -> None:
    rig.core.feed(frames.icmp6(word1=0x1234, word2=5, body=b"payload", dst=frames.REMOTE_IP6))
    (ping,) = rig.pings
    assert ping.sent == [(REMOTE, 5, b"payload")]
    # The host's reply, ICMPv6 header + data as a ping socket hands it over (its own ident).
    frame = rig.core.pool.acquire()
    off = frame.start + ping.flow.family.l4_off
    msg = bytes([129, 0, 0, 0, 0xAB, 0xCD, 0, 5]) + b"payload"
    frame.view[off : off + len(msg)] = msg
    rig.icmp.deliver_echo_reply(ping.flow, frame, len(msg), REMOTE)
    (pkt,) = rig.sent()
    reply = pkt[ICMPv6EchoReply]
    assert (reply.id, reply.seq, bytes(reply.data)) == (0x1234, 5, b"payload")
    assert pkt[IPv6].src == REMOTE and pkt[IPv6].dst == "fd00::15"
    ours = reply.cksum
    del reply.cksum
    assert Ether(bytes(pkt))[ICMPv6EchoReply].cksum == ours


def test_echo_to_a_refused_address_is_answered_with_an_error(rig: Rig6, frames: Any) -> None:
    rig.core.feed(frames.icmp6(dst=bytes.fromhex("fd000000000000000000000000000099")))
    assert rig.pings == []
    (pkt,) = rig.sent()
    assert pkt[ICMPv6DestUnreach].code == 1


def test_icmp_errors_are_rate_limited(rig: Rig6, frames: Any) -> None:
    """A burst of 50, then 1000 per second, as Linux limits its own ICMP errors."""
    nobody = bytes.fromhex("fd000000000000000000000000000099")
    for i in range(200):
        rig.core.feed(frames.udp6(sport=40000 + i, dport=9, dst=nobody))
    assert len(rig.sent()) == 50
    assert rig.core.counters["icmp.error.rate_limited"] == 150
    rig.core.now += 0.0105  # ten more tokens (and a half)
    for i in range(20):
        rig.core.feed(frames.udp6(sport=41000 + i, dport=9, dst=nobody))
    assert len(rig.sent()) == 10
