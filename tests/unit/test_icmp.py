"""ICMP service: built-in echo answers, echo NAT through a (fake) ping-socket backend, errors."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, defragment, fragment
from scapy.layers.l2 import Ether

from guestnet.core.fragments import Reassembler
from guestnet.core.icmp import EchoFlow, IcmpService
from guestnet.core.policy import Policy
from guestnet.wire.checksum import checksum

OUTSIDE = bytes([198, 18, 0, 9])


class FakePing:
    """A ping socket: the kernel picks identifier ``ident``; records what was sent."""

    def __init__(self, flow: EchoFlow, ident: int) -> None:
        self.flow = flow
        self.ident = ident
        self.sent: list[tuple[str, int, bytes]] = []
        self.closed = False

    def send_echo(self, host: str, seq: int, payload: memoryview) -> None:
        self.sent.append((host, seq, bytes(payload)))

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    def __init__(self) -> None:
        self.sockets: list[FakePing] = []

    def open(self, flow: EchoFlow) -> FakePing:
        sock = FakePing(flow, 50000 + len(self.sockets))
        self.sockets.append(sock)
        return sock


def make_rig(core: Any, backend: FakeBackend | None) -> IcmpService:
    icmp = IcmpService(
        core.config, core.pool, core.counters, core.switch, Policy(core.config), backend
    )
    core.classifier.icmp = icmp
    return icmp


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def icmp(core: Any, backend: FakeBackend) -> Iterator[IcmpService]:
    service = make_rig(core, backend)
    yield service
    service.close_all()


@pytest.mark.parametrize("dst", ["10.0.2.2", "10.0.2.3"])
def test_echo_to_our_addresses_is_answered(
    core: Any, icmp: IcmpService, backend: FakeBackend, frames: Any, dst: str
) -> None:
    body = b"abcdefghijklmnopqrstuvwxyz0123456789!"
    core.feed(frames.icmp(ident=0x4321, seq=17, body=body, dst=bytes(map(int, dst.split(".")))))
    (raw,) = core.take_sent()
    pkt = Ether(raw)
    assert (pkt.dst, pkt.src) == ("52:54:00:12:34:56", "52:55:0a:00:02:02")
    assert (pkt[IP].src, pkt[IP].dst) == (dst, "10.0.2.15")
    assert (pkt[ICMP].type, pkt[ICMP].code) == (0, 0)
    assert (pkt[ICMP].id, pkt[ICMP].seq) == (0x4321, 17)
    assert bytes(pkt[ICMP].payload) == body
    assert checksum(raw[34:]) == 0 and checksum(raw[14:34]) == 0
    assert backend.sockets == []
    assert core.counters["icmp.echo.answered"] == 1


def test_big_echo_to_gateway_is_reassembled_and_answered_in_fragments(
    make_core: Any, frames: Any
) -> None:
    core = make_core(mtu=1500)
    make_rig(core, None)
    core.classifier.reassembly = Reassembler(core.counters, core.classifier.route_ipv4)
    req = IP(src="10.0.2.15", dst="10.0.2.2", id=9) / ICMP(id=5, seq=6) / (b"p" * 4000)
    for frag in fragment(req, 1480):
        core.feed(bytes(Ether(dst="52:55:0a:00:02:02", src="52:54:00:12:34:56") / frag))
    sent = core.take_sent()
    assert len(sent) == 3
    assert all(len(raw) - 14 <= 1500 for raw in sent)
    (whole,) = defragment([Ether(raw)[IP] for raw in sent])
    whole = IP(bytes(whole))
    assert (whole[ICMP].type, whole[ICMP].id, whole[ICMP].seq) == (0, 5, 6)
    assert bytes(whole[ICMP].payload) == b"p" * 4000
    assert core.pool.in_use == 0


def test_echo_elsewhere_goes_out_and_the_identifier_is_mapped_back(
    core: Any, icmp: IcmpService, backend: FakeBackend, frames: Any
) -> None:
    core.feed(frames.icmp(ident=0x1111, seq=1, body=b"one", dst=OUTSIDE))
    core.feed(frames.icmp(ident=0x1111, seq=2, body=b"two", dst=OUTSIDE))
    core.feed(frames.icmp(ident=0x2222, seq=1, body=b"other", dst=OUTSIDE))
    assert len(backend.sockets) == 2  # one host endpoint per guest identifier
    first, second = backend.sockets
    assert first.sent == [("198.18.0.9", 1, b"one"), ("198.18.0.9", 2, b"two")]
    assert second.sent == [("198.18.0.9", 1, b"other")]
    # The kernel's reply carries the ping socket's own identifier; the guest gets its own back.
    for sock, seq, body in ((first, 2, b"two"), (second, 1, b"other")):
        frame = core.pool.acquire()
        msg = bytearray(struct.pack("!BBHHH", 0, 0, 0, sock.ident, seq) + body)
        struct.pack_into("!H", msg, 2, checksum(msg))
        off = frame.start + sock.flow.family.l4_off
        frame.view[off : off + len(msg)] = msg
        icmp.deliver_echo_reply(sock.flow, frame, len(msg), "198.18.0.9")
    got = [Ether(raw) for raw in core.take_sent()]
    fields = [
        (p[IP].src, p[ICMP].type, p[ICMP].id, p[ICMP].seq, bytes(p[ICMP].payload)) for p in got
    ]
    assert fields == [("198.18.0.9", 0, 0x1111, 2, b"two"), ("198.18.0.9", 0, 0x2222, 1, b"other")]
    for p in got:
        ours = p[ICMP].chksum
        del p[ICMP].chksum
        assert Ether(bytes(p))[ICMP].chksum == ours


def test_replies_from_addresses_not_pinged_are_filtered(
    core: Any, icmp: IcmpService, backend: FakeBackend, frames: Any
) -> None:
    core.feed(frames.icmp(ident=1, seq=1, dst=OUTSIDE))
    frame = core.pool.acquire()
    off = frame.start + backend.sockets[0].flow.family.l4_off
    frame.view[off : off + 8] = struct.pack("!BBHHH", 0, 0, 0, 50000, 1)
    icmp.deliver_echo_reply(backend.sockets[0].flow, frame, 8, "203.0.113.7")
    assert core.take_sent() == []
    assert core.counters["icmp.echo.reply.filtered"] == 1


def test_refused_echo_gets_admin_prohibited(make_core: Any, frames: Any) -> None:
    core = make_core(no_host_loopback=True)
    backend = FakeBackend()
    make_rig(core, backend)
    core.feed(frames.icmp(dst=bytes([127, 0, 0, 1])))
    core.feed(frames.icmp(dst=bytes([169, 254, 169, 254])))
    sent = [Ether(raw) for raw in core.take_sent()]
    assert [(p[ICMP].type, p[ICMP].code, p[IP].src) for p in sent] == [(3, 13, "10.0.2.2")] * 2
    assert backend.sockets == []
    assert core.counters["icmp.echo.policy.host_loopback"] == 1
    assert core.counters["icmp.echo.policy.link_local"] == 1


def test_no_backend_drops_and_counts(core: Any, frames: Any) -> None:
    make_rig(core, None)
    core.feed(frames.icmp(dst=OUTSIDE))
    core.feed(frames.icmp(dst=frames.GATEWAY_IP))  # still answered
    assert len(core.take_sent()) == 1
    assert core.counters["icmp.echo.no_socket"] == 1


def test_echo_flows_expire_and_are_bounded(core: Any, frames: Any) -> None:
    backend = FakeBackend()
    icmp = IcmpService(
        core.config, core.pool, core.counters, core.switch, Policy(core.config), backend,
        max_flows=2, timeout=60.0,
    )  # fmt: skip
    core.classifier.icmp = icmp
    for ident in (1, 2, 3):
        core.feed(frames.icmp(ident=ident, dst=OUTSIDE))
        core.now += 1
    assert [s.closed for s in backend.sockets] == [True, False, False]
    assert core.counters["icmp.echo.flow.evicted"] == 1
    assert icmp.expire(core.now + 57) == 0
    assert icmp.expire(core.now + 60) == 2
    assert all(s.closed for s in backend.sockets)


def test_other_icmp_types_are_ignored(core: Any, icmp: IcmpService, frames: Any) -> None:
    msg = bytearray(struct.pack("!BBHHH", 13, 0, 0, 0, 0) + bytes(12))  # timestamp request
    struct.pack_into("!H", msg, 2, checksum(msg))
    core.feed(frames.ipv4(1, bytes(msg), dst=frames.GATEWAY_IP))
    assert core.take_sent() == []
    assert core.counters["icmp.type.13.ignored"] == 1


def test_no_error_about_an_error(core: Any, icmp: IcmpService, frames: Any) -> None:
    msg = bytearray(struct.pack("!BBHHH", 3, 3, 0, 0, 0) + bytes(28))
    struct.pack_into("!H", msg, 2, checksum(msg))
    core.feed(frames.ipv4(1, bytes(msg), dst=bytes([10, 0, 2, 77])))
    assert core.take_sent() == []


def test_probe_without_any_echo_socket_warns_with_the_sysctl_and_capability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from guestnet.io import icmp_sock

    def refuse(*_args: Any, **_kw: Any) -> Any:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(icmp_sock.socket, "socket", refuse)
    assert icmp_sock.probe_echo_mode() is None
    text = icmp_sock.no_echo_warning()
    assert "net.ipv4.ping_group_range" in text and "CAP_NET_RAW" in text
