"""UDP NAT core: endpoint-independent mapping, filtering, timeouts, bounds, refusals.

Guest frames go in through the classifier; the host side is a fake socket factory that records
what the core asked to send; replies are handed to ``deliver_reply`` in pooled frames as the I/O
side would. Frames toward the guest are checked with scapy, which recomputes every checksum.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.l2 import Ether

from guestnet.core.icmp import IcmpService
from guestnet.core.policy import Policy
from guestnet.core.udp import ACTIVE_S, UdpFlow, UdpNat

OTHER_IP = bytes([198, 18, 0, 9])


class FakeSocket:
    """Records datagrams sent; ``closed`` once the core closes it."""

    def __init__(self, flow: UdpFlow) -> None:
        self.flow = flow
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        assert not self.closed
        self.sent.append((bytes(data), addr))
        return len(data)

    def close(self) -> None:
        self.closed = True


class Rig:
    """A core harness with the ICMP service and the UDP NAT attached, on fake sockets."""

    def __init__(self, core: Any, **nat_kw: Any) -> None:
        self.core = core
        self.sockets: list[FakeSocket] = []
        self.fail_open: OSError | None = None
        self.policy = Policy(core.config)
        self.icmp = IcmpService(core.config, core.pool, core.counters, core.switch, self.policy)
        self.nat = UdpNat(
            core.config,
            core.pool,
            core.counters,
            core.switch,
            self.policy,
            self.icmp,
            self.open_socket,
            **nat_kw,
        )
        core.classifier.udp_nat = self.nat
        core.classifier.icmp = self.icmp

    def open_socket(self, flow: UdpFlow) -> FakeSocket:
        if self.fail_open is not None:
            raise self.fail_open
        sock = FakeSocket(flow)
        self.sockets.append(sock)
        return sock

    def reply(self, flow: UdpFlow, payload: bytes, host: str, hport: int) -> None:
        """A host reply received into a pooled frame, as io/udp_nat.py does."""
        frame = self.core.pool.acquire()
        off = frame.start + flow.family.udp_payload_off
        frame.view[off : off + len(payload)] = payload
        self.nat.deliver_reply(flow, frame, len(payload), host, hport, self.core.now)


@pytest.fixture
def rig(core: Any) -> Iterator[Rig]:
    r = Rig(core)
    yield r
    r.nat.close_all()


def test_one_socket_per_guest_source_for_every_destination(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(sport=40000, dport=9999, payload=b"a"))
    core.feed(frames.udp(sport=40000, dport=7777, payload=b"b", dst=OTHER_IP))
    assert len(rig.sockets) == 1
    assert rig.sockets[0].sent == [
        (b"a", ("93.184.216.34", 9999)),
        (b"b", ("198.18.0.9", 7777)),
    ]
    core.feed(frames.udp(sport=40001, dport=9999, payload=b"c"))
    assert len(rig.sockets) == 2
    assert core.counters["nat.udp.flow.new"] == 2
    assert core.counters["nat.udp.to_host"] == 3
    assert core.take_sent() == []


def test_replies_from_both_destinations_reach_the_guest(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(sport=40000, dport=9999, payload=b"a"))
    core.feed(frames.udp(sport=40000, dport=7777, payload=b"b", dst=OTHER_IP))
    flow = rig.sockets[0].flow
    rig.reply(flow, b"from-remote", "93.184.216.34", 9999)
    rig.reply(flow, b"from-other", "198.18.0.9", 7777)
    rig.reply(flow, b"second-port", "198.18.0.9", 7778)  # EIM: any port of a known address
    got = [Ether(f) for f in core.take_sent()]
    assert [(p[IP].src, p[UDP].sport, p[UDP].dport, bytes(p[UDP].payload)) for p in got] == [
        ("93.184.216.34", 9999, 40000, b"from-remote"),
        ("198.18.0.9", 7777, 40000, b"from-other"),
        ("198.18.0.9", 7778, 40000, b"second-port"),
    ]
    for p in got:
        assert p.dst == "52:54:00:12:34:56" and p.src == "52:55:0a:00:02:02"
        assert p[IP].dst == "10.0.2.15"


def test_checksums_match_scapy(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(sport=40000, dport=9999, payload=b"a"))
    rig.reply(rig.sockets[0].flow, b"odd-length-payload!", "93.184.216.34", 9999)
    (raw,) = core.take_sent()
    ours = Ether(raw)
    ip_sum, udp_sum = ours[IP].chksum, ours[UDP].chksum
    del ours[IP].chksum, ours[UDP].chksum
    theirs = Ether(bytes(ours))
    assert (theirs[IP].chksum, theirs[UDP].chksum) == (ip_sum, udp_sum)


def test_gateway_maps_to_host_loopback_and_back(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(sport=40000, dport=7, payload=b"echo", dst=frames.GATEWAY_IP))
    assert rig.sockets[0].sent == [(b"echo", ("127.0.0.1", 7))]
    rig.reply(rig.sockets[0].flow, b"echo", "127.0.0.1", 7)
    (raw,) = core.take_sent()
    assert Ether(raw)[IP].src == "10.0.2.2"


def test_replies_from_unknown_addresses_are_filtered(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(sport=40000, dport=9999))
    rig.reply(rig.sockets[0].flow, b"intruder", "203.0.113.5", 9999)
    assert core.take_sent() == []
    assert core.counters["nat.udp.reply.filtered"] == 1


def test_idle_flow_expires_with_a_scripted_clock(core: Any, frames: Any) -> None:
    rig = Rig(core, timeout=120.0)
    core.feed(frames.udp(sport=40000))
    sock = rig.sockets[0]
    core.now += 100
    rig.reply(sock.flow, b"keepalive", "93.184.216.34", 9999)  # a reply keeps the flow alive
    core.take_sent()
    assert rig.nat.expire(core.now + 119.9) == 0
    assert not sock.closed
    assert rig.nat.expire(core.now + 120) == 1
    assert sock.closed and not rig.nat.flows
    assert core.counters["nat.udp.flow.expired"] == 1
    # The next datagram from that source opens a new socket.
    core.now += 200
    core.feed(frames.udp(sport=40000))
    assert len(rig.sockets) == 2
    rig.nat.close_all()
    assert rig.sockets[1].closed


def test_table_bound_evicts_the_least_recently_used(core: Any, frames: Any) -> None:
    rig = Rig(core, max_flows=2)
    core.feed(frames.udp(sport=1001))
    core.now += 1
    core.feed(frames.udp(sport=1002))
    core.now += 1
    core.feed(frames.udp(sport=1001))  # 1001 is now the most recently used
    core.now += ACTIVE_S  # 1002 has been idle long enough to give way
    core.feed(frames.udp(sport=1003))
    assert [s.closed for s in rig.sockets] == [False, True, False]
    assert sorted(port for _, port in rig.nat.flows) == [1001, 1003]
    assert core.counters["nat.udp.flow.evicted"] == 1
    rig.nat.close_all()


def test_a_sweep_never_evicts_a_flow_in_active_use(core: Any, frames: Any) -> None:
    """A full table of flows used within ACTIVE_S refuses newcomers (counted) and keeps every
    live flow and its socket; once the oldest has been idle ACTIVE_S, a newcomer takes its place."""
    rig = Rig(core, max_flows=3)
    for port in (1001, 1002, 1003):
        core.feed(frames.udp(sport=port))
    for port in range(2000, 2050):  # the sweep, while 1001-1003 are live
        core.now += 0.1
        core.feed(frames.udp(sport=port))
        core.feed(frames.udp(sport=1001 + port % 3))  # the guest's own flows keep talking
    assert sorted(port for _, port in rig.nat.flows) == [1001, 1002, 1003]
    assert len(rig.sockets) == 3 and not any(s.closed for s in rig.sockets)
    assert core.counters["nat.udp.flow.refused_full"] == 50
    assert core.counters["nat.udp.flow.evicted"] == 0
    core.now += ACTIVE_S
    core.feed(frames.udp(sport=3000))
    assert core.counters["nat.udp.flow.evicted"] == 1
    assert (frames.GUEST_IP, 3000) in rig.nat.flows
    rig.nat.close_all()


def _unreachable(raw: bytes) -> Any:
    pkt = Ether(raw)
    assert pkt[ICMP].type == 3
    return pkt


@pytest.mark.parametrize(
    ("config", "dst", "reason"),
    [
        ({"no_host_loopback": True}, bytes([10, 0, 2, 2]), "nat.udp.policy.host_loopback"),
        ({"no_host_loopback": True}, bytes([127, 0, 0, 1]), "nat.udp.policy.host_loopback"),
        ({}, bytes([169, 254, 169, 254]), "nat.udp.policy.link_local"),
        ({}, bytes([10, 0, 2, 77]), "nat.udp.policy.guest_subnet"),
    ],
)
def test_refused_destinations_get_icmp_admin_prohibited(
    make_core: Any, frames: Any, config: dict[str, Any], dst: bytes, reason: str
) -> None:
    core = make_core(**config)
    rig = Rig(core)
    core.feed(frames.udp(sport=40000, dport=5000, payload=b"x" * 10, dst=dst))
    assert rig.sockets == []
    (raw,) = core.take_sent()
    pkt = _unreachable(raw)
    assert pkt[ICMP].code == 13
    assert pkt[IP].src == "10.0.2.2" and pkt[IP].dst == "10.0.2.15"
    assert pkt[IPerror].dst == str(ipaddress.IPv4Address(dst))
    assert (pkt[UDPerror].sport, pkt[UDPerror].dport) == (40000, 5000)
    assert core.counters[reason] == 1
    assert core.counters["icmp.error.sent.3.13"] == 1
    ours = pkt[ICMP].chksum
    del pkt[ICMP].chksum
    assert Ether(bytes(pkt))[ICMP].chksum == ours
    assert core.pool.in_use == 0


def test_link_local_allowed_when_configured(make_core: Any, frames: Any) -> None:
    core = make_core(allow_link_local=True)
    rig = Rig(core)
    core.feed(frames.udp(dst=bytes([169, 254, 169, 254]), dport=80))
    assert rig.sockets[0].sent[0][1] == ("169.254.169.254", 80)
    rig.nat.close_all()


def test_broadcast_and_multicast_are_dropped_and_counted(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(dst=b"\xff\xff\xff\xff"))
    core.feed(frames.udp(dst=bytes([224, 0, 0, 251]), dport=5353))
    core.feed(frames.udp(dst=bytes([10, 0, 2, 255])))
    assert rig.sockets == []
    assert core.counters["udp.dst.broadcast"] == 3


def test_socket_exhaustion_is_a_counted_refusal(rig: Rig, frames: Any) -> None:
    rig.fail_open = OSError(errno.EMFILE, "Too many open files")
    rig.core.feed(frames.udp())
    assert rig.core.counters["nat.udp.socket.emfile"] == 1
    assert not rig.nat.flows
    rig.fail_open = None
    rig.core.feed(frames.udp())
    assert len(rig.sockets) == 1


def test_host_port_unreachable_becomes_icmp_to_the_guest(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(sport=40000, dport=7, dst=frames.GATEWAY_IP))
    rig.nat.handle_host_error(rig.sockets[0].flow, "127.0.0.1", 7, 3, 3)
    (raw,) = core.take_sent()
    pkt = _unreachable(raw)
    assert pkt[ICMP].code == 3
    assert pkt[IP].src == "10.0.2.2"
    assert (pkt[IPerror].src, pkt[IPerror].dst) == ("10.0.2.15", "10.0.2.2")
    assert (pkt[UDPerror].sport, pkt[UDPerror].dport) == (40000, 7)
    rig.nat.handle_host_error(rig.sockets[0].flow, "203.0.113.1", 7, 3, 3)
    assert core.counters["nat.udp.host_error.unknown_peer"] == 1
    assert core.take_sent() == []


def test_foreign_source_and_port_zero_are_dropped(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp(src=bytes([192, 168, 1, 1])))
    core.feed(frames.udp(dport=0))
    assert rig.sockets == []
    assert core.counters["nat.udp.src.foreign"] == 1
    assert core.counters["nat.udp.port_zero"] == 1


def test_send_errors_are_counted(rig: Rig, frames: Any) -> None:
    core = rig.core
    core.feed(frames.udp())

    def fail(data: memoryview, addr: tuple[str, int]) -> int:
        raise BlockingIOError(errno.EAGAIN, "full")

    rig.sockets[0].sendto = fail  # type: ignore[method-assign]
    core.feed(frames.udp())
    assert core.counters["nat.udp.send.eagain"] == 1


# -- port forwards (host -> guest) --------------------------------------------------------------


def test_forwarded_datagram_reaches_the_guest_and_its_reply_the_client(
    rig: Rig, frames: Any
) -> None:
    core = rig.core
    to_client: list[tuple[str, bytes]] = []
    guest_ip = frames.GUEST_IP

    def client(name: str) -> Any:
        return lambda data: to_client.append((name, bytes(data)))

    rig.nat.deliver_inbound(("1", ("127.0.0.1", 5000)), client("a"), guest_ip, 7000, 5000,
                            memoryview(b"ping-a"), core.now)  # fmt: skip
    rig.nat.deliver_inbound(("1", ("127.0.0.2", 5000)), client("b"), guest_ip, 7000, 5000,
                            memoryview(b"ping-b"), core.now)  # fmt: skip
    got = [Ether(raw) for raw in core.take_sent()]
    seen = [(p[IP].src, p[UDP].sport, p[IP].dst, p[UDP].dport, bytes(p[UDP].payload)) for p in got]
    assert seen[0] == ("10.0.2.2", 5000, "10.0.2.15", 7000, b"ping-a")
    assert seen[1][0] == "10.0.2.2" and seen[1][1] != 5000  # the same client port, remapped
    assert seen[1][2:] == ("10.0.2.15", 7000, b"ping-b")
    # The guest answers each from its port 7000 to the address and port it saw.
    core.feed(frames.udp(sport=7000, dport=seen[1][1], payload=b"pong-b", dst=frames.GATEWAY_IP))
    core.feed(frames.udp(sport=7000, dport=5000, payload=b"pong-a", dst=frames.GATEWAY_IP))
    assert to_client == [("b", b"pong-b"), ("a", b"pong-a")]
    assert rig.sockets == []  # no outbound flow was opened for them
    assert core.counters["nat.udp.forward.to_host"] == 2
    # The same client again reuses its flow; removing the forward forgets both.
    rig.nat.deliver_inbound(("1", ("127.0.0.1", 5000)), client("a"), guest_ip, 7000, 5000,
                            memoryview(b"again"), core.now)  # fmt: skip
    assert Ether(core.take_sent()[0])[UDP].sport == 5000
    assert core.counters["nat.udp.forward.flow.new"] == 2
    assert rig.nat.drop_inbound_where(lambda source: source[0] == "1") == 2
    core.feed(frames.udp(sport=7000, dport=5000, payload=b"late", dst=frames.GATEWAY_IP))
    assert len(to_client) == 2
    assert rig.sockets[0].sent == [(b"late", ("127.0.0.1", 5000))]  # now an ordinary flow


def test_forward_flows_expire(core: Any, frames: Any) -> None:
    rig = Rig(core, timeout=120.0)
    sent: list[bytes] = []
    rig.nat.deliver_inbound(("1", ("127.0.0.1", 5000)), lambda d: sent.append(bytes(d)),
                            frames.GUEST_IP, 7000, 5000, memoryview(b"x"), core.now)  # fmt: skip
    core.take_sent()
    assert rig.nat.expire(core.now + 119) == 0
    assert rig.nat.expire(core.now + 120) == 1
    assert not rig.nat.inbound
    assert core.counters["nat.udp.forward.flow.expired"] == 1
