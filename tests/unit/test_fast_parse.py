"""``fast_parse`` (one call per guest frame) against the four fast parses it replaces.

The classifier used to try ``tcp_fast4``, ``tcp_fast6``, ``udp_fast4`` and ``udp_fast6`` in turn
on every frame; it now makes one ``fast_parse`` call, which reads the ethertype and protocol
once and returns ``(kind, *fields)``. Properties checked here, for both implementations (C and
pure) and between them, on valid frames mutated and on random bytes:

- ``fast_parse`` equals the first of the four, applied in that order, that is not None, tagged
  with its kind; and at most one of the four ever takes a frame (they exclude one another);
- the classifier's decisions are those of the old sequence of four: which fast handler gets
  which fields, which IPv6 sources are learned, and which frames go the ordinary way
  (``_dispatch``), over every gate (IPv6 on or off, the port's first IPv6 packet seen or not,
  one port or two, each fast handler present or not, the handler taking the frame or not, the
  link vouching for checksums or not).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.config import Config
from guestnet.core.classifier import (
    _UNSPECIFIED6,
    ALL_DHCP6_SERVERS,
    DHCP6_SERVER_PORT,
    FrameClassifier,
)
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire import native, pure
from guestnet.wire.dhcp import DHCP_SERVER_PORT
from guestnet.wire.udp import DNS_PORT
from unit.test_native import (
    BROADCAST,
    DNS4,
    DNS6,
    GUEST_MAC,
    OUR_MAC,
    _native,
    mutate,
    mutation,
    tcp_frames,
    udp6_frames,
    udp_frames,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMPLS: list[ModuleType] = [pure] + ([_native] if _native is not None else [])
KINDS = (pure.FAST_TCP4, pure.FAST_TCP6, pure.FAST_UDP4, pure.FAST_UDP6)


def plain(res: Any) -> Any:
    """A result with its views as (type name, bytes): views compare by identity of layout."""
    if res is None:
        return None
    return tuple((type(x).__name__, bytes(x)) if isinstance(x, memoryview) else x for x in res)


def old_four(impl: ModuleType, args: tuple[Any, ...]) -> list[Any]:
    """The four parses of ``impl`` on ``args`` = fast_parse's arguments, in the old order."""
    frame, our, guest, bc, dns4, dns6, verify = args
    return [
        impl.tcp_fast4(frame, our, guest, bc, dns4, verify),
        impl.tcp_fast6(frame, our, guest, dns6, verify),
        impl.udp_fast4(frame, our, guest, bc, verify),
        impl.udp_fast6(frame, our, guest, verify),
    ]


def check(frame: bytes | bytearray, guest: bytes | None, verify: bool) -> None:
    """The properties of the module docstring's first point, for one frame."""
    args = (memoryview(frame), OUR_MAC, guest, BROADCAST, DNS4, DNS6, verify)
    got = []
    for impl in IMPLS:
        olds = old_four(impl, args)
        hits = [(kind, res) for kind, res in zip(KINDS, olds, strict=True) if res is not None]
        assert len(hits) <= 1, "two fast parses took one frame"
        want = (hits[0][0], *hits[0][1]) if hits else None
        res = impl.fast_parse(*args)
        assert plain(res) == plain(want)
        got.append(plain(res))
    assert got.count(got[0]) == len(got), "C and pure disagree"


any_frame = st.one_of(tcp_frames(False), tcp_frames(True), udp_frames(), udp6_frames())
guest_st = st.sampled_from([GUEST_MAC, None, OUR_MAC])


@PROPS
@given(any_frame, st.lists(mutation, max_size=3), guest_st, st.booleans())
def test_fast_parse_is_the_old_four_in_order_on_mutated_frames(
    frame: bytes, muts: list[tuple[str, int, int]], guest: bytes | None, verify: bool
) -> None:
    check(mutate(frame, muts), guest, verify)


@PROPS
@given(
    st.binary(max_size=120),
    st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06"]),
    st.sampled_from([6, 17, 1, 58]),
    st.sampled_from([GUEST_MAC, None]),
)
def test_fast_parse_is_the_old_four_in_order_on_random_bytes(
    raw: bytes, etype: bytes, proto: int, guest: bytes | None
) -> None:
    # Random bytes behind a valid Ethernet header, with the protocol byte of either family set
    # (IPv4's at 23, IPv6's next header at 20) so that the checks after the dispatch run.
    frame = bytearray(OUR_MAC + GUEST_MAC + etype + raw)
    for at in (20, 23):
        if len(frame) > at:
            frame[at] = proto
    for verify in (False, True):
        check(frame, guest, verify)


def test_fast_parse_takes_one_valid_frame_of_each_kind() -> None:
    """Not only None agrees: each kind is taken, with its tag and its fields."""
    src4, dst4 = bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34])
    src6 = bytes.fromhex("fd000000000000000000000000000015")
    dst6 = bytes.fromhex("20010db8000000000000000000000001")
    cases = []
    for version, proto, src, dst in (
        (4, 6, src4, dst4), (6, 6, src6, dst6), (4, 17, src4, dst4), (6, 17, src6, dst6),
    ):  # fmt: skip
        buf = bytearray(200)
        hdrs = 14 + (20 if version == 4 else 40) + (20 if proto == 6 else 8)
        buf[hdrs : hdrs + 3] = b"abc"
        if proto == 6:
            n = pure.build_tcp_frame(
                buf, 0, version, OUR_MAC, GUEST_MAC, src, dst, 40000, 80, 5, 7, 0x18, 1000, 1,
                3, b"", False,
            )  # fmt: skip
        else:
            n = pure.build_udp_frame(
                buf, 0, version, OUR_MAC, GUEST_MAC, src, dst, 40000, 9999, 3, 7, False
            )
        cases.append(bytes(buf[:n]))
    for impl in IMPLS:
        kinds = []
        for frame in cases:
            view = memoryview(frame)
            res = impl.fast_parse(view, OUR_MAC, GUEST_MAC, BROADCAST, DNS4, DNS6, True)
            assert res is not None
            kinds.append(res[0])
            # The TCP segment (header and data) first, the UDP payload last.
            data = res[1] if res[0] in (pure.FAST_TCP4, pure.FAST_TCP6) else res[-1]
            assert bytes(data).endswith(b"abc")
        assert kinds == [pure.FAST_TCP4, pure.FAST_TCP6, pure.FAST_UDP4, pure.FAST_UDP6]


# -- the classifier's decisions ------------------------------------------------------------------


def old_handle_frame(c: FrameClassifier, frame: memoryview, port: Port, now: float,
                     csum_trusted: bool) -> None:  # fmt: skip
    """The fast dispatch of ``handle_frame`` before ``fast_parse`` (main 3a1ec52), as it was
    but for the names (rx counters, capture and the WireError catch left out: unchanged)."""
    fast = c.tcp_fast
    if fast is not None:
        verify = not csum_trusted
        seg = native.tcp_fast4(frame, c._mac, port.guest_mac, c._broadcast, c._dns_dsts, verify)
        if seg is not None:
            if fast(*seg, now):
                return
        elif c._ipv6:
            seg = native.tcp_fast6(frame, c._mac, port.guest_mac, c._dns6_dsts, verify)
            if seg is not None:
                sip = seg[1]
                if sip != port.ip6_last:
                    port.learn_ip6(sip)
                if fast(*seg, now):
                    return
    udp = c.udp_fast
    if udp is not None:
        dgram = native.udp_fast4(frame, c._mac, port.guest_mac, c._broadcast, not csum_trusted)
        if dgram is not None:
            src, dst, sport, dport, payload = dgram
            if dport == DNS_PORT and dst in c._dns_dsts:
                dns = c.dns_fast
                if dns is not None and dns(port, src, dst, sport, dport, payload, now):
                    return
            elif dport != DHCP_SERVER_PORT and udp(port, src, dst, sport, dport, payload, now):
                return
        elif c._ipv6 and port.ip6_seen and len(c.switch.ports) == 1:
            dgram = native.udp_fast6(frame, c._mac, port.guest_mac, not csum_trusted)
            if dgram is not None:
                src, dst, sport, dport, payload = dgram
                if src != port.ip6_last and src != _UNSPECIFIED6:
                    port.learn_ip6(src)
                if dport == DNS_PORT and dst in c._dns6_dsts:
                    dns = c.dns_fast6
                    if dns is not None and dns(port, src, dst, sport, dport, payload, now):
                        return
                elif not (dport == DHCP6_SERVER_PORT and dst in c._dhcp6_dsts) and udp(
                    port, src, dst, sport, dport, payload, now
                ):
                    return
    c._dispatch(frame, port, now, csum_trusted)


ADDR4 = [bytes([10, 0, 2, n]) for n in (15, 2, 3, 255)] + [
    bytes([93, 184, 216, 34]), bytes([224, 0, 0, 251]), b"\xff\xff\xff\xff",
]  # fmt: skip
ADDR6 = [
    bytes.fromhex(h)
    for h in (
        "fd000000000000000000000000000015", "fd000000000000000000000000000002",
        "fd000000000000000000000000000003", "20010db8000000000000000000000001",
        "fe800000000000000000000000000001", "00" * 16,
    )
] + [ALL_DHCP6_SERVERS]  # fmt: skip
PORTS = st.sampled_from([DNS_PORT, DHCP_SERVER_PORT, 68, DHCP6_SERVER_PORT, 546, 80, 40000])


@st.composite
def guest_frames(draw: st.DrawFn) -> bytearray:
    """A TCP or UDP frame of either family to and from the addresses and ports the classifier
    tells apart (DNS, DHCP, DHCPv6, broadcast, multicast, unspecified), maybe mutated."""
    v6 = draw(st.booleans())
    pool = ADDR6 if v6 else ADDR4
    addrs = st.sampled_from(pool)
    src = draw(st.just(pool[0]) | addrs)  # mostly the guest's own address
    version = 6 if v6 else 4
    src_mac = draw(st.sampled_from([GUEST_MAC, GUEST_MAC, GUEST_MAC, OUR_MAC]))
    plen = draw(st.integers(0, 24))
    buf = bytearray(100 + plen)
    if draw(st.booleans()):
        n = pure.build_tcp_frame(
            buf, 0, version, OUR_MAC, src_mac, src, draw(addrs), draw(PORTS), draw(PORTS), 1,
            2, 0x18, 1000, 1, plen, b"", draw(st.booleans()),
        )  # fmt: skip
    else:
        n = pure.build_udp_frame(
            buf, 0, version, OUR_MAC, src_mac, src, draw(addrs), draw(PORTS), draw(PORTS),
            plen, 7, draw(st.booleans()),
        )  # fmt: skip
    muts = draw(st.lists(mutation, max_size=1)) if draw(st.integers(0, 3)) == 0 else []
    return mutate(bytes(buf[:n]), muts)


class Log:
    """What the classifier did with a frame: fast handlers called (and with what), dispatches."""

    def __init__(self, answer: bool) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer

    def handler(self, name: str) -> Any:
        def handle(*args: Any) -> bool:
            args = tuple(a.name if isinstance(a, Port) else a for a in args)
            self.calls.append((name, *plain(args)))
            return self.answer

        return handle

    def dispatch(self, frame: memoryview, port: Port, now: float, trusted: bool) -> None:
        self.calls.append(("dispatch", bytes(frame), port.name, now, trusted))


def classifier(gates: dict[str, Any], log: Log) -> tuple[FrameClassifier, Port]:
    """A classifier with the fast handlers ``gates`` asks for, all recording into ``log``."""
    config = Config(ipv6=gates["ipv6"])
    pool = FramePool(config.mtu, 4)
    counters = Counters()
    switch = Switch(pool, counters, config.isolate)
    c = FrameClassifier(config, pool, counters, switch)
    port = Port("guest0", lambda frame: None)
    switch.attach(port)
    if gates["two_ports"]:
        switch.attach(Port("guest1", lambda frame: None))
    port.guest_mac = GUEST_MAC
    port.ip6_seen = gates["ip6_seen"]
    if gates["learned"]:
        port.learn_ip6(ADDR6[0])
    for name in ("tcp_fast", "udp_fast", "dns_fast", "dns_fast6"):
        if gates[name]:
            setattr(c, name, log.handler(name))
    c._dispatch = log.dispatch  # type: ignore[method-assign]
    return c, port


#: Each gate mostly open (the fast paths reached), sometimes shut.
mostly = st.sampled_from([True, True, True, False])
gates_st = st.fixed_dictionaries(
    {
        "ipv6": mostly, "ip6_seen": mostly, "two_ports": mostly.map(lambda b: not b),
        "learned": st.booleans(), "tcp_fast": mostly, "udp_fast": mostly, "dns_fast": mostly,
        "dns_fast6": mostly, "answer": st.booleans(), "trusted": st.booleans(),
    }
)  # fmt: skip


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(guest_frames(), gates_st)
def test_the_classifier_decides_as_the_old_four_did(
    frame: bytearray, gates: dict[str, Any]
) -> None:
    outcomes = []
    for run in (old_handle_frame, FrameClassifier.handle_frame):
        log = Log(gates["answer"])
        c, port = classifier(gates, log)
        run(c, memoryview(frame), port, 5.0, gates["trusted"])
        outcomes.append((log.calls, port.ip6_last, list(port.guest_ip6)))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][0]) >= 1, "every frame is handled somewhere"
