"""The UDP fast path (classifier ``udp_fast`` -> ``UdpNat.handle_fast``) against the ordinary path.

The same script of guest frames goes through two cores, one with the fast path wired as the
assembly wires it and one without: what leaves for the host (every socket call, in order), what
reaches the guest, the counters, the egress rules' hits and the flows' state must be the same,
and the fast path must really have taken the stream's datagrams. The script mixes what the fast
path takes with everything it must decline or leave alone: a new destination or port, another
source port, the gateway while a published port has inbound flows, DHCP, DNS, broadcast, a bad
checksum, a guest whose MAC changed, a super-frame, an egress rule, a refused destination.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.core.icmp import IcmpService
from guestnet.core.policy import Policy
from guestnet.core.udp import UdpFlow, UdpNat

OTHER_IP = bytes([198, 18, 0, 9])
DENIED_IP = bytes([198, 19, 0, 1])
OTHER_MAC = bytes.fromhex("525400abcdef")


class Sock:
    """Records every call the core makes, in order (sendto and UDP_SEGMENT sends)."""

    def __init__(self, log: list[tuple[object, ...]], index: int) -> None:
        self.log = log
        self.index = index

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        self.log.append((self.index, "sendto", bytes(data), addr))
        return len(data)

    def sendto_segments(self, data: memoryview, addr: tuple[str, int], size: int) -> int:
        self.log.append((self.index, "segments", bytes(data), addr, size))
        return -(-len(data) // size)

    def close(self) -> None:
        self.log.append((self.index, "close"))


def egress() -> tuple[tuple[bool, ipaddress.IPv4Network], ...]:
    return (
        (False, ipaddress.IPv4Network("198.19.0.0/16")),
        (True, ipaddress.IPv4Network("198.18.0.0/16")),
    )


class Side:
    """One core with the UDP NAT, gathering as the assembly sets it up, fast path or not."""

    def __init__(self, make_core: Any, fast: bool) -> None:
        self.core = core = make_core(egress=egress())
        self.log: list[tuple[object, ...]] = []
        self.policy = Policy(core.config)
        icmp = IcmpService(core.config, core.pool, core.counters, core.switch, self.policy)
        self.nat = UdpNat(core.config, core.pool, core.counters, core.switch, self.policy, icmp,
                          self.open_socket)  # fmt: skip
        self.nat.gather_sends = True
        core.classifier.udp_nat = self.nat
        core.classifier.icmp = icmp
        self.taken = 0
        self.to_client: list[bytes] = []
        if fast:
            handle = self.nat.handle_fast

            def counted(*args: Any) -> bool:
                took = handle(*args)
                self.taken += took
                return took

            core.classifier.udp_fast = counted

    def open_socket(self, flow: UdpFlow) -> Sock:
        self.log.append(("open", flow.guest_ip, flow.guest_port))
        return Sock(self.log, len([e for e in self.log if e[0] == "open"]))

    def feed(self, frame: bytes, **kw: Any) -> None:
        self.core.feed(frame, **kw)

    def burst_end(self) -> None:
        self.nat.flush_sends()

    def state(self) -> tuple[object, ...]:
        flows = [
            (key, f.guest_mac, f.last_used, dict(f.peers)) for key, f in self.nat.flows.items()
        ]
        return (self.log, self.core.take_sent(), self.core.counters.snapshot(),
                list(self.policy.hits), flows, self.nat.guest_macs, self.to_client)  # fmt: skip


def script(side: Side, frames: Any) -> None:
    """Frames in bursts, time moving on between them."""
    core = side.core
    udp = frames.udp

    def stream(n: int, **kw: Any) -> None:
        for i in range(n):
            side.feed(udp(payload=bytes([i]) * 100, **kw), csum_trusted=bool(i & 1))

    stream(6)  # one flow, one destination: the first opens it, the rest go fast
    stream(3, dport=7777)  # a new port: the first goes the ordinary way, again
    stream(3, dst=OTHER_IP, dport=7777)  # an egress rule allows it: counted per datagram
    side.burst_end()
    core.now += 1.0
    stream(2, sport=40001)  # another source: another flow
    stream(2)  # back to the first flow's first destination
    side.feed(udp(payload=b"short"))  # a shorter datagram ends the batch
    stream(2)
    side.feed(udp(dport=67, payload=b"dhcp"))
    side.feed(udp(dport=53, dst=frames.DNS_IP, payload=b"dns"))
    side.feed(udp(dport=53, payload=b"dns elsewhere"))  # port 53 of a remote host: the NAT's
    side.feed(udp(dst=bytes([10, 0, 2, 255]), payload=b"bcast"))
    side.feed(udp(dst=DENIED_IP, payload=b"denied"))
    bad = bytearray(udp(payload=b"bad checksum"))
    bad[-1] ^= 0xFF
    side.feed(bytes(bad))  # verified and dropped
    side.feed(bytes(bad), csum_trusted=True)  # a link that vouches for it: sent
    side.burst_end()
    core.now += 1.0
    # The guest's MAC changes: its flows follow it.
    side.feed(udp(payload=b"new mac", eth_src=OTHER_MAC))
    stream(2)
    side.feed(udp(payload=b"new mac again", eth_src=OTHER_MAC))
    side.feed(udp(payload=b"and again", eth_src=OTHER_MAC))
    side.burst_end()
    # A published port's client: the guest answers it through the gateway.
    side.nat.deliver_inbound(("f", ("127.0.0.1", 6000)), side.to_client.append,
                             frames.GUEST_IP, 5000, 6000, memoryview(b"hi"), core.now)  # fmt: skip
    gateway = frames.GATEWAY_IP
    for _ in range(2):
        side.feed(udp(sport=5000, dport=6000, dst=gateway, payload=b"to client", eth_src=OTHER_MAC))
    for _ in range(2):
        side.feed(udp(sport=5000, dport=6001, dst=gateway, payload=b"gw", eth_src=OTHER_MAC))
    # A client appears at the very port the flow's last datagrams went to: the next one is its.
    side.nat.deliver_inbound(("f", ("127.0.0.1", 6001)), side.to_client.append,
                             frames.GUEST_IP, 5000, 6001, memoryview(b"hi"), core.now)  # fmt: skip
    side.feed(udp(sport=5000, dport=6001, dst=gateway, payload=b"client 2", eth_src=OTHER_MAC))
    side.burst_end()
    # A super-frame from a TAP with USO.
    core.port.rx_gso_size = 100
    side.feed(udp(payload=bytes(250), eth_src=OTHER_MAC), csum_trusted=True)
    core.port.rx_gso_size = 0
    side.feed(udp(payload=bytes(100), eth_src=OTHER_MAC), csum_trusted=True)
    side.burst_end()


def test_the_fast_path_changes_nothing_but_the_cost(make_core: Any, frames: Any) -> None:
    fast, plain = Side(make_core, True), Side(make_core, False)
    script(fast, frames)
    script(plain, frames)
    assert fast.state() == plain.state()
    assert plain.taken == 0
    # The stream's datagrams after each first one: 5 + 2 + 2 (+1 rule hit each) + 1 + 2 + 2 ...
    assert fast.taken >= 15
    fast.nat.close_all()
    plain.nat.close_all()


def test_datagrams_for_the_services_never_reach_the_nat_fast(make_core: Any, frames: Any) -> None:
    side = Side(make_core, True)
    calls: list[tuple[int, bytes]] = []

    def spy(port: Any, src: bytes, dst: bytes, sport: int, dport: int, *rest: Any) -> bool:
        calls.append((dport, dst))
        return False

    side.core.classifier.udp_fast = spy
    side.feed(frames.udp(dport=67, payload=b"dhcp"))
    side.feed(frames.udp(dport=53, dst=frames.DNS_IP, payload=b"dns"))
    side.feed(frames.udp(dport=53, dst=frames.GATEWAY_IP, payload=b"dns"))
    assert calls == []
    side.feed(frames.udp(dport=53, payload=b"remote dns"))
    assert calls == [(53, frames.REMOTE_IP)]
    side.nat.close_all()


@pytest.mark.parametrize("trusted", [False, True])
def test_a_stream_is_taken_fast_after_its_first_datagram(
    make_core: Any, frames: Any, trusted: bool
) -> None:
    side = Side(make_core, True)
    for i in range(10):
        side.feed(frames.udp(payload=bytes([i]) * 50), csum_trusted=trusted)
    side.burst_end()
    assert side.taken == 9
    addr = (str(ipaddress.ip_address(frames.REMOTE_IP)), 9999)
    assert side.log[1:] == [(1, "segments", b"".join(bytes([i]) * 50 for i in range(10)), addr, 50)]
    assert side.core.counters["nat.udp.to_host"] == 10
    side.nat.close_all()


# -- random scripts: the same equivalence for any sequence of these events ----------------------

EVENT = st.one_of(
    st.tuples(
        st.just("dgram"),
        st.sampled_from([40000, 40001, 5000]),  # source port
        st.sampled_from([9999, 7777, 6000, 53, 67, 0]),  # destination port
        st.sampled_from(["remote", "other", "denied", "gateway", "dns", "bcast", "subnet"]),
        st.integers(0, 120),  # payload length
        st.booleans(),  # the link vouches for the checksum
        st.sampled_from(["ok", "ok", "bad csum", "other mac"]),
        st.integers(1, 4),  # sent this many times in a row (a stream)
    ),
    st.tuples(st.just("burst end")),
    st.tuples(st.just("later"), st.sampled_from([0.5, 5.0, 200.0])),
    st.tuples(st.just("inbound"), st.sampled_from([6000, 6001])),
    st.tuples(st.just("super"), st.integers(1, 4)),
)
DSTS = {
    "other": OTHER_IP,
    "denied": DENIED_IP,
    "bcast": bytes([10, 0, 2, 255]),
    "subnet": bytes([10, 0, 2, 77]),
}


def play(side: Side, frames: Any, events: list[tuple[Any, ...]]) -> None:
    core = side.core
    for event in events:
        kind = event[0]
        if kind == "dgram":
            _k, sport, dport, where, size, trusted, damage, times = event
            dst = (
                DSTS.get(where)
                or {
                    "remote": frames.REMOTE_IP,
                    "gateway": frames.GATEWAY_IP,
                    "dns": frames.DNS_IP,
                }[where]
            )
            mac = OTHER_MAC if damage == "other mac" else frames.GUEST_MAC
            frame = bytearray(frames.udp(sport, dport, bytes([size & 0xFF]) * size, dst=dst,
                                         eth_src=mac))  # fmt: skip
            if damage == "bad csum":
                frame[40] ^= 0x5A
            for _ in range(times):
                side.feed(bytes(frame), csum_trusted=trusted)
        elif kind == "burst end":
            side.burst_end()
        elif kind == "later":
            core.now += event[1]
            side.nat.expire(core.now)
        elif kind == "inbound":
            side.nat.deliver_inbound(("f", ("127.0.0.1", event[1])), side.to_client.append,
                                     frames.GUEST_IP, 5000, event[1], memoryview(b"hi"),
                                     core.now)  # fmt: skip
        else:  # a super-frame of ``n`` datagrams of 50 bytes from a TAP with USO
            core.port.rx_gso_size = 50
            side.feed(frames.udp(payload=bytes(50 * event[1])), csum_trusted=True)
            core.port.rx_gso_size = 0
    side.burst_end()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENT, max_size=40))
def test_random_scripts_give_the_same_result_both_ways(
    make_core: Any, frames: Any, events: list[tuple[Any, ...]]
) -> None:
    # make_core and frames are session fixtures: one fresh pair of cores per example.
    fast, plain = Side(make_core, True), Side(make_core, False)
    try:
        play(fast, frames, events)
        play(plain, frames, events)
        assert fast.state() == plain.state()
        assert fast.core.pool.in_use == 0
    finally:
        fast.nat.close_all()
        plain.nat.close_all()


# -- IPv6: udp_fast6 against the ordinary path ------------------------------------------------

OTHER_IP6 = bytes.fromhex("20010db8000000000000000000000099")
MULTICAST6 = bytes.fromhex("ff02000000000000000000000000fb00")


class Side6(Side):
    """:class:`Side` with the NAT in the IPv6 slot too (the assembly's family-neutral NAT)."""

    def __init__(self, make_core: Any, fast: bool) -> None:
        super().__init__(make_core, fast)
        self.core.classifier.udp_nat6 = self.nat
        self.core.classifier.icmp6 = self.core.classifier.icmp

        #: The port's learned IPv6 addresses after every frame (learning is per packet).
        self.learned: list[tuple[bytes, list[bytes]]] = []

    def feed(self, frame: bytes, **kw: Any) -> None:
        super().feed(frame, **kw)
        port = self.core.port
        self.learned.append((port.ip6_last, list(port.guest_ip6)))

    def state(self) -> tuple[object, ...]:
        return (*super().state(), self.learned, self.core.port.ip6_seen)


EVENT6 = st.one_of(
    st.tuples(
        st.just("dgram"),
        # Weighted toward the stream play6 starts (40000 -> remote:9999), so that the fast
        # path has flows to take and events to interleave with them.
        st.sampled_from([40000, 40000, 40001, 5000]),  # source port
        st.sampled_from([9999, 9999, 7777, 6000, 53, 547, 0]),  # destination port
        st.sampled_from(
            ["remote", "remote", "other", "gateway", "dns", "multicast", "unspecified"]
        ),
        st.sampled_from(["global", "global", "link-local"]),  # the guest's source address
        st.integers(0, 120),  # payload length
        st.booleans(),  # the link vouches for the checksum
        st.sampled_from(["ok", "ok", "ok", "bad csum", "no csum", "other mac", "hop-by-hop"]),
        st.integers(1, 4),  # sent this many times in a row (a stream)
    ),
    st.tuples(st.just("burst end")),
    st.tuples(st.just("later"), st.sampled_from([0.5, 5.0, 200.0])),
    st.tuples(st.just("inbound"), st.sampled_from([6000, 6001])),
    st.tuples(st.just("super"), st.integers(1, 4)),
)


def frame6(frames: Any, event: tuple[Any, ...]) -> bytes:
    _k, sport, dport, where, source, size, _trusted, damage, _times = event
    dst = {
        "remote": frames.REMOTE_IP6,
        "other": OTHER_IP6,
        "gateway": frames.GATEWAY_IP6,
        "dns": frames.DNS_IP6,
        "multicast": MULTICAST6,
        "unspecified": bytes(16),
    }[where]
    src = frames.GUEST_IP6 if source == "global" else frames.GUEST_LL6
    mac = OTHER_MAC if damage == "other mac" else frames.GUEST_MAC
    frame = bytearray(frames.udp6(sport, dport, bytes([size & 0xFF]) * size, src=src, dst=dst,
                                  eth_src=mac))  # fmt: skip
    if damage == "bad csum":
        frame[60] ^= 0x5A
    elif damage == "no csum":
        frame[60:62] = b"\x00\x00"
    elif damage == "hop-by-hop":
        # An empty hop-by-hop header in front of the UDP header: not for the fast path.
        frame[20] = 0
        frame[54:54] = bytes([17, 0, 1, 4, 0, 0, 0, 0])
        frame[18:20] = (len(frame) - 54).to_bytes(2, "big")
    return bytes(frame)


def play6(side: Side6, frames: Any, events: list[tuple[Any, ...]]) -> None:
    core = side.core
    # The port's first IPv6 packet goes the ordinary way (its NDP port_up) in both.
    side.feed(frames.udp6(payload=b"first"))
    for event in events:
        kind = event[0]
        if kind == "dgram":
            frame = frame6(frames, event)
            for _ in range(event[-1]):
                side.feed(frame, csum_trusted=event[6])
        elif kind == "burst end":
            side.burst_end()
        elif kind == "later":
            core.now += event[1]
            side.nat.expire(core.now)
        elif kind == "inbound":
            side.nat.deliver_inbound(("f", ("::1", event[1])), side.to_client.append,
                                     frames.GUEST_IP6, 5000, event[1], memoryview(b"hi"),
                                     core.now)  # fmt: skip
        else:
            core.port.rx_gso_size = 50
            side.feed(frames.udp6(payload=bytes(50 * event[1])), csum_trusted=True)
            core.port.rx_gso_size = 0
    side.burst_end()


def script6(side: Side6, frames: Any) -> None:
    """The IPv6 counterpart of :func:`script`."""
    udp6 = frames.udp6
    ll = frames.GUEST_LL6

    def stream(n: int, **kw: Any) -> None:
        for i in range(n):
            side.feed(udp6(payload=bytes([i]) * 100, **kw), csum_trusted=bool(i & 1))

    stream(4)
    stream(3, dport=7777)  # a new port: its first the ordinary way
    side.feed(udp6(payload=b"from link-local", src=ll))  # learned; the NAT refuses the source
    stream(2, dport=7777)  # fast again: the global source learned back
    side.feed(udp6(dport=53, dst=frames.DNS_IP6, payload=b"dns"))
    side.feed(udp6(dport=547, dst=frames.GATEWAY_IP6, payload=b"dhcp6"))
    side.feed(udp6(dst=MULTICAST6, payload=b"mcast"))
    bad = bytearray(udp6(dport=7777, payload=b"bad checksum"))
    bad[-1] ^= 0xFF
    side.feed(bytes(bad))  # verified and dropped
    side.feed(bytes(bad), csum_trusted=True)  # a link that vouches for it: sent
    zero = bytearray(udp6(dport=7777, payload=b"no checksum"))
    zero[60:62] = b"\x00\x00"
    side.feed(bytes(zero))  # refused: IPv6 makes it mandatory
    side.feed(bytes(zero), csum_trusted=True)
    side.burst_end()
    side.core.now += 1.0
    side.feed(udp6(dport=7777, payload=b"new mac", eth_src=OTHER_MAC))
    stream(2, dport=7777)
    # To the gateway (the host's loopback), then a published port's client appears at that
    # very port: the guest's next datagram there answers the client.
    for _ in range(2):
        side.feed(udp6(sport=5000, dport=6001, dst=frames.GATEWAY_IP6, payload=b"gw"))
    side.nat.deliver_inbound(("f", ("::1", 6001)), side.to_client.append, frames.GUEST_IP6,
                             5000, 6001, memoryview(b"hi"), side.core.now)  # fmt: skip
    side.feed(udp6(sport=5000, dport=6001, dst=frames.GATEWAY_IP6, payload=b"client 1"))
    side.nat.deliver_inbound(("f", ("::1", 6000)), side.to_client.append, frames.GUEST_IP6,
                             5000, 6000, memoryview(b"hi"), side.core.now)  # fmt: skip
    for _ in range(2):
        side.feed(udp6(sport=5000, dport=6000, dst=frames.GATEWAY_IP6, payload=b"client 2"))
    side.core.port.rx_gso_size = 100
    side.feed(udp6(dport=7777, payload=bytes(250)), csum_trusted=True)
    side.core.port.rx_gso_size = 0
    side.burst_end()


def test_the_ipv6_fast_path_changes_nothing_but_the_cost(make_core: Any, frames: Any) -> None:
    fast, plain = Side6(make_core, True), Side6(make_core, False)
    try:
        script6(fast, frames)
        script6(plain, frames)
        assert fast.state() == plain.state()
        assert plain.taken == 0 and fast.taken >= 8
        assert fast.core.port.ip6_last == frames.GUEST_IP6
    finally:
        fast.nat.close_all()
        plain.nat.close_all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENT6, max_size=40))
def test_random_ipv6_scripts_give_the_same_result_both_ways(
    make_core: Any, frames: Any, events: list[tuple[Any, ...]]
) -> None:
    """The IPv6 fast path (udp_fast6) on random scripts: new and repeated destinations, the
    gateway with and without a published port's client, DNS and DHCPv6 (never the NAT's),
    multicast and unspecified destinations, a source address that changes (learned the same
    way), a missing or bad checksum, another MAC, an extension header, super-frames."""
    fast, plain = Side6(make_core, True), Side6(make_core, False)
    try:
        play6(fast, frames, events)
        play6(plain, frames, events)
        assert fast.state() == plain.state()
        assert fast.core.pool.in_use == 0
    finally:
        fast.nat.close_all()
        plain.nat.close_all()


def test_an_ipv6_stream_is_taken_fast_after_its_first_datagram(make_core: Any, frames: Any) -> None:
    side = Side6(make_core, True)
    for i in range(10):
        side.feed(frames.udp6(payload=bytes([i]) * 50), csum_trusted=bool(i & 1))
    side.burst_end()
    assert side.taken == 9
    addr = (str(ipaddress.ip_address(frames.REMOTE_IP6)), 9999)
    assert side.log[1:] == [(1, "segments", b"".join(bytes([i]) * 50 for i in range(10)), addr, 50)]
    # A second guest on the switch: IPv6 goes the ordinary way (the switch may route it).
    side.core.add_port("guest1")
    side.feed(frames.udp6(payload=b"x" * 50))
    assert side.taken == 9
    side.nat.close_all()


def test_ipv6_to_the_gateway_while_a_client_waits_goes_the_ordinary_way(
    make_core: Any, frames: Any
) -> None:
    """A stream to the IPv6 gateway goes fast until a published port's client appears at
    its port: the guest's next datagram there is that client's answer, not the host's."""
    sides = []
    for fast in (True, False):
        side = Side6(make_core, fast)
        side.feed(frames.udp6(payload=b"first"))
        gw = frames.GATEWAY_IP6
        for _ in range(2):
            side.feed(frames.udp6(sport=5000, dport=6001, dst=gw, payload=b"gw"))
        side.nat.deliver_inbound(("f", ("::1", 6001)), side.to_client.append, frames.GUEST_IP6,
                                 5000, 6001, memoryview(b"hi"), side.core.now)  # fmt: skip
        side.feed(frames.udp6(sport=5000, dport=6001, dst=gw, payload=b"client"))
        side.burst_end()
        sides.append(side)
    fast, plain = sides
    assert fast.taken == 1 and [bytes(m) for m in fast.to_client] == [b"client"]
    assert fast.state() == plain.state()
    for side in sides:
        side.nat.close_all()


def test_an_address_a_guest_claims_later_is_that_guests_not_the_nats(
    make_core: Any, frames: Any
) -> None:
    # A stream to a subnet address no guest has claimed is refused by the policy, so it opens
    # no flow the fast path could take later; once another guest claims the address (its ARP),
    # the next datagram is routed to that guest, as the ordinary path decides.
    side = Side(make_core, True)
    core = side.core
    port_b = core.add_port("guest1")
    core.feed(frames.arp())
    port_b.sent.clear()
    ip_b, mac_b = bytes([10, 0, 2, 16]), bytes.fromhex("5254000000bb")
    for _ in range(3):
        side.feed(frames.udp(dst=ip_b))
    side.burst_end()
    assert port_b.sent == []
    assert side.taken == 0 and core.counters["nat.udp.policy.guest_subnet"] == 3
    core.feed(frames.arp(sha=mac_b, spa=ip_b), port=port_b)
    port_b.sent.clear()
    side.feed(frames.udp(dst=ip_b, payload=b"now B's"))
    (out,) = port_b.sent
    assert out[:6] == mac_b and out.endswith(b"now B's")
    assert core.counters["switch.routed"] == 1
    side.nat.close_all()
