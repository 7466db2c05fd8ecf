"""Fuzz every service behind the classifier, with fake host I/O that records what it is asked.

test_fuzz_classifier.py throws hostile frames at the classifier with only DHCP attached. Here
every service is attached, as ``Instance`` wires them, but each transport is a recording fake
(no socket is ever opened): DHCP, DNS (UDP, sans-I/O, its ``outbox`` drained into a log; upstream
answers are mutated copies of the real forwarded queries or random bytes), ICMP (echo answered
here, other echo through a fake backend), the UDP NAT (fake sockets), the TCP NAT and DNS over
TCP (a fake ``TcpIo``), and reassembly.

An example is a script drawn step by step: valid seed frames for each service (DHCP DISCOVER /
REQUEST / RELEASE / INFORM, DNS queries with compression pointers and lying counts, ICMP echo,
UDP to outside and to the gateway, one TCP flow's SYN / ACK / data / FIN / RST, IPv4 fragments
in any order), each maybe mutated (flip, overwrite, truncate, extend, swap, splice) and maybe
re-checksummed so the mutation reaches the parsers behind the checksum checks; interleaved
with host-side events (connect results, host data / EOF / errors, writable edges, UDP and echo
replies from expected and unexpected hosts, DNS answers, upstream failures) and a scripted clock
that fires the timers.

After every step: nothing raised, counters only grew, every frame sent toward the guest is
well-formed Ethernet + IPv4 (header checksum, lengths, L4 checksum when whole) or ARP. At the
end, once the services' ``close_all`` ran, no pooled frame is checked out, and the fakes were
asked only for plausible things (targets the policy allows, nothing after a close).
"""

from __future__ import annotations

import errno
import random
import struct
from ipaddress import ip_address
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestnet.core.dhcp import DhcpServer
from guestnet.core.dns import DnsService
from guestnet.core.fragments import Reassembler
from guestnet.core.icmp import EchoFlow, IcmpService
from guestnet.core.policy import Policy
from guestnet.core.tcp import TcpFlow, TcpNat
from guestnet.core.udp import UdpFlow, UdpNat
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.ethernet import BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6
from guestnet.wire.icmp import ICMP_DEST_UNREACH, ICMP_ECHO_REPLY
from guestnet.wire.ipv4 import FLAG_MF, PROTO_ICMP, PROTO_TCP, PROTO_UDP, parse_ipv4
from guestnet.wire.ipv6 import PROTO_ICMPV6, parse_ipv6
from guestnet.wire.tcp import ACK, FIN, PSH, RST, SYN, build_syn_options, parse_tcp, verify_tcp
from guestnet.wire.udp import parse_udp, verify_udp

FUZZ_SETTINGS = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

MTU = 1500
ISN = 1000
OUR_ISS = 900000
DNS_TCP_UPSTREAM = ("127.0.0.53", 53)
LINK_LOCAL = bytes([169, 254, 169, 254])
OTHER_HOST = "203.0.113.9"

# -- the fakes ----------------------------------------------------------------------------------


class FakeTcpSock:
    """What the script controls about one host TCP socket."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.readable = bytearray()
        self.eof = False
        self.recv_error: OSError | None = None
        self.send_error: OSError | None = None
        self.accept: int | None = None
        self.room = 1 << 16
        self.shut_wr = False
        self.closed = False


class FakeTcpIo:
    """A TcpIo that records every request and flags the implausible ones."""

    def __init__(self, policy: Policy, violations: list[str]) -> None:
        self.policy = policy
        self.violations = violations
        self.connect_error = 0
        self.connects: list[tuple[str, int]] = []
        self.timers: dict[TcpFlow, float] = {}
        self.flush_requests = 0
        self.socks: list[FakeTcpSock] = []

    def _sock(self, flow: TcpFlow, what: str) -> FakeTcpSock | None:
        s: FakeTcpSock | None = flow.io_data
        if s is None:
            self.violations.append(f"tcp {what} on a flow never connected")
        elif s.closed:
            self.violations.append(f"tcp {what} after close")
        return s

    def connect(self, flow: TcpFlow) -> int:
        target = (flow.host, flow.host_port)
        self.connects.append(target)
        if flow.dns:
            if target != DNS_TCP_UPSTREAM:
                self.violations.append(f"tcp dns connect to {target}")
        else:
            verdict = self.policy.destination(flow.dst_ip)
            if verdict.host != flow.host or flow.host_port != flow.dst_port:
                self.violations.append(f"tcp connect to {target} for {flow.dst_ip.hex()}")
        if flow.io_data is not None:
            self.violations.append("tcp connect twice")
        if self.connect_error:
            return self.connect_error
        flow.io_data = FakeTcpSock()
        self.socks.append(flow.io_data)
        return 0

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        s = self._sock(flow, "send")
        if s is None:
            return 0
        if s.shut_wr:
            self.violations.append("tcp send after shutdown")
        if s.send_error is not None:
            raise s.send_error
        n = len(data) if s.accept is None else min(len(data), s.accept)
        if s.accept is not None:
            s.accept -= n
        s.written += data[:n]
        return n

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        s = self._sock(flow, "recv")
        if s is None:
            return -1
        if s.recv_error is not None:
            err, s.recv_error = s.recv_error, None
            raise err
        if not s.readable:
            return 0 if s.eof else -1
        total = 0
        for buf in bufs:
            n = min(len(buf), len(s.readable))
            buf[:n] = s.readable[:n]
            del s.readable[:n]
            total += n
        return total

    def send_room(self, flow: TcpFlow) -> int:
        s: FakeTcpSock | None = flow.io_data
        return 0 if s is None else s.room

    def shutdown_write(self, flow: TcpFlow) -> None:
        s = self._sock(flow, "shutdown")
        if s is not None:
            s.shut_wr = True

    def close(self, flow: TcpFlow, reset: bool) -> None:
        s: FakeTcpSock | None = flow.io_data
        if s is not None:
            s.closed = True

    def set_timer(self, flow: TcpFlow, when: float | None) -> None:
        if when is None:
            self.timers.pop(flow, None)
        else:
            self.timers[flow] = when

    def request_flush(self) -> None:
        self.flush_requests += 1


def plausible_host(policy: Policy, host: str) -> bool:
    """A host address string the policy hands out for some guest destination."""
    packed = ip_address(host).packed
    if host == "127.0.0.1" and policy.destination(policy.config.gateway_b).host == host:
        return True
    return policy.destination(packed).host == host


class FakeUdpSock:
    def __init__(self, rig: Rig, flow: UdpFlow) -> None:
        self.rig = rig
        self.flow = flow
        self.closed = False
        self.fail: OSError | None = None

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        rig = self.rig
        if self.closed:
            rig.violations.append("udp sendto after close")
        if addr[1] == 0 or not plausible_host(rig.policy, addr[0]):
            rig.violations.append(f"udp sendto {addr}")
        rig.udp_sent.append((bytes(data), addr))
        if self.fail is not None:
            raise self.fail
        return len(data)

    def close(self) -> None:
        self.closed = True


class FakeEcho:
    def __init__(self, rig: Rig, flow: EchoFlow) -> None:
        self.rig = rig
        self.flow = flow
        self.closed = False

    def send_echo(self, host: str, seq: int, payload: memoryview) -> None:
        rig = self.rig
        if self.closed:
            rig.violations.append("echo send after close")
        if not plausible_host(rig.policy, host):
            rig.violations.append(f"echo to {host}")
        rig.echo_sent.append((host, seq, bytes(payload)))

    def close(self) -> None:
        self.closed = True


class Rig:
    """Every service on one core harness, each with a recording fake for its host side."""

    def __init__(self, make_core: Any, open_fails: bool = False, offload: bool = False) -> None:
        self.core = core = make_core(mtu=MTU)
        #: A TAP with offloads: TCP toward it leaves in super-frames with partial checksums.
        self.offload = offload
        core.port.offload_max = 65535 if offload else 0
        config, pool, counters = core.config, core.pool, core.counters
        self.violations: list[str] = []
        self.policy = Policy(config)
        self.udp_sent: list[tuple[bytes, tuple[str, int]]] = []
        self.echo_sent: list[tuple[str, int, bytes]] = []
        self.udp_socks: list[FakeUdpSock] = []
        self.echo_socks: list[FakeEcho] = []
        self.open_fails = open_fails
        self.upstream_log: list[tuple[int, bytes]] = []
        cls = core.classifier
        cls.dhcp = self.dhcp = DhcpServer(config, pool, counters)
        self.dns = DnsService(
            config,
            pool,
            counters,
            [("192.0.2.53", 53), ("192.0.2.54", 53)],
            rng=random.Random(7),
            max_pending=8,
        )
        cls.dns_udp = self.dns
        self.icmp = IcmpService(config, pool, counters, core.switch, self.policy, backend=self)
        cls.icmp = self.icmp
        self.udp = UdpNat(
            config,
            pool,
            counters,
            core.switch,
            self.policy,
            self.icmp,
            self._open_udp,
            max_flows=4,
        )
        cls.udp_nat = self.udp
        self.tcp_io = FakeTcpIo(self.policy, self.violations)
        self.tcp = TcpNat(
            config,
            pool,
            counters,
            self.policy,
            self.tcp_io,
            dns_upstream=lambda: DNS_TCP_UPSTREAM,
            isn=lambda: OUR_ISS,
        )
        cls.tcp_nat = self.tcp
        cls.dns_tcp = self.tcp.dns_handler
        self.reassembly = Reassembler(counters, cls.route_ipv4, max_datagrams=4)
        cls.reassembly = self.reassembly
        # The same services take IPv6, as the assembly plugs them.
        cls.udp_nat6 = self.udp
        cls.tcp_nat6 = self.tcp
        cls.icmp6 = self.icmp
        cls.dns6_udp = self.dns
        cls.dns6_tcp = self.tcp.dns_handler
        self.counts: dict[str, int] = {}
        self.to_guest = 0

    # EchoBackend
    def open(self, flow: EchoFlow) -> FakeEcho:
        if self.open_fails:
            raise OSError(errno.EMFILE, "fake")
        sock = FakeEcho(self, flow)
        self.echo_socks.append(sock)
        return sock

    def _open_udp(self, flow: UdpFlow) -> FakeUdpSock:
        if self.open_fails:
            raise OSError(errno.EMFILE, "fake")
        sock = FakeUdpSock(self, flow)
        self.udp_socks.append(sock)
        return sock

    @property
    def now(self) -> float:
        return float(self.core.now)

    # -- driving -----------------------------------------------------------------------------

    def feed(self, frame: bytes, trusted: bool = False) -> None:
        self.core.feed(frame, csum_trusted=trusted)
        self.after_event()

    def after_event(self) -> None:
        """What the loop does at the end of a turn: flush TCP, drain the DNS outbox."""
        if self.tcp_io.flush_requests:
            self.tcp_io.flush_requests = 0
            self.tcp.flush(self.now)
        for action in self.dns.outbox:
            if not 0 <= action.upstream < len(self.dns.upstreams) or len(action.data) < 12:
                self.violations.append(f"dns outbox {action!r}")
            self.upstream_log.append((action.upstream, action.data))
        self.dns.outbox.clear()

    def advance(self, seconds: float) -> None:
        """Move the scripted clock and run every timer that is due, as the loop would."""
        self.core.now += seconds
        now = self.now
        for flow, when in list(self.tcp_io.timers.items()):
            if when <= now and self.tcp_io.timers.get(flow) == when:
                del self.tcp_io.timers[flow]
                self.tcp.on_timer(flow, now)
        deadline = self.dns.next_deadline()
        if deadline is not None and deadline <= now:
            self.dns.handle_timeout(now)
        self.udp.expire(now)
        self.icmp.expire(now)
        self.reassembly.expire(now)
        self.after_event()

    def check(self) -> None:
        """Invariants after every step: counters only grew; frames out are well-formed."""
        counts = self.core.counters.snapshot()
        for name, value in self.counts.items():
            assert counts.get(name, 0) >= value, f"counter {name} went down"
        self.counts = dict(counts)
        for frame in self.core.take_sent():
            check_to_guest(frame, self.offload)
            self.to_guest += 1
        assert not self.violations, self.violations

    def close(self) -> None:
        """Shutdown as the drivers do it; then nothing may hold a pooled frame."""
        self.tcp.close_all()
        self.udp.close_all()
        self.icmp.close_all()
        self.after_event()
        self.check()
        assert self.core.pool.in_use == 0
        assert all(s.closed for s in self.tcp_io.socks)
        assert all(s.closed for s in self.udp_socks)
        assert all(s.closed for s in self.echo_socks)
        assert not self.violations, self.violations


def check_to_guest(frame: bytes, offload: bool = False) -> None:
    """A frame guestnet sent toward the guest: well-formed Ethernet + IPv4 or IPv6 (or ARP).

    With ``offload`` a TCP segment may exceed the MTU (a super-frame) and carries a partial
    checksum (the pseudo-header sum), which is completed here as the guest's kernel would.
    """
    assert len(frame) >= 14, frame.hex()
    assert frame[6:12] == bytes.fromhex("52550a000202"), "source MAC is not ours"
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == ETHERTYPE_ARP:
        assert len(frame) >= 42
        return
    assert ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6), hex(ethertype)
    l3 = memoryview(frame)[14:]
    v6 = ethertype == ETHERTYPE_IPV6
    try:
        # Verifies the (IPv4) header checksum and the lengths.
        ip: Any = parse_ipv6(l3) if v6 else parse_ipv4(l3)
    except WireError as exc:  # pragma: no cover - the assertion is the point
        raise AssertionError(f"bad IP toward the guest: {exc.reason}: {frame.hex()}") from exc
    assert ip.total_len <= MTU or (offload and ip.proto == PROTO_TCP), ip.total_len
    assert ip.total_len == len(l3) or len(frame) == 60, "length disagrees with the frame"
    if ip.is_fragment:
        return
    l4 = l3[ip.header_len : ip.total_len]
    if ip.proto == PROTO_UDP:
        udp = parse_udp(l4)
        assert udp.length == len(l4)
        assert verify_udp(l4, ip.src, ip.dst, udp.length), "bad UDP checksum toward the guest"
    elif ip.proto == PROTO_TCP:
        parse_tcp(l4)
        if offload:
            seg = bytearray(l4)
            struct.pack_into("!H", seg, 16, checksum(seg))
            l4 = memoryview(seg)
        assert verify_tcp(l4, ip.src, ip.dst), "bad TCP checksum toward the guest"
    elif ip.proto == PROTO_ICMP and not v6:
        assert len(l4) >= 8 and checksum(l4) == 0, "bad ICMP checksum toward the guest"
    elif ip.proto == PROTO_ICMPV6 and v6:
        psum = pseudo_header_sum(ip.src, ip.dst, PROTO_ICMPV6, len(l4))
        assert len(l4) >= 8 and checksum(l4, psum) == 0, "bad ICMPv6 checksum toward the guest"
    else:  # pragma: no cover
        raise AssertionError(f"protocol {ip.proto} toward the guest")


# -- seed frames --------------------------------------------------------------------------------


def dhcp_payload(msg_type: int, mac: bytes, extra: bytes = b"", ciaddr: bytes = bytes(4)) -> bytes:
    """A BOOTREQUEST with a message type option, a parameter request list and ``extra``."""
    bootp = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,
        1,
        6,
        0,
        0x1234,
        0,
        0x8000,
        ciaddr,
        bytes(4),
        bytes(4),
        bytes(4),
        mac + bytes(10),
        b"",
        b"",
    )
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, msg_type]) + b"\x37\x03\x01\x03\x06" + extra
    return bootp + opts + b"\xff"


def dns_query(
    name: bytes,
    qtype: int = 1,
    counts: tuple[int, int, int, int] = (1, 0, 0, 0),
    tail: bytes = b"",
    ident: int = 0x1234,
) -> bytes:
    """A DNS query: header with the given counts, one question, then ``tail`` as is."""
    return struct.pack("!HH4H", ident, 0x0100, *counts) + name + struct.pack("!HH", qtype, 1) + tail


FOO = b"\x03foo\x07example\x03com\x00"
EDNS = b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00"


def dns_queries() -> list[bytes]:
    return [
        dns_query(FOO),
        dns_query(b"\x04host\x08guestnet\x08internal\x00"),
        dns_query(b"\x07nothere\x08guestnet\x08internal\x00", qtype=28),
        dns_query(FOO, counts=(1, 0, 0, 1), tail=EDNS),
        # an answer record whose name is a compression pointer to the question
        dns_query(
            FOO,
            counts=(1, 1, 0, 0),
            tail=b"\xc0\x0c\x00\x01\x00\x01" + bytes(4) + b"\x00\x04\x01\x02\x03\x04",
        ),
        dns_query(b"\x03www\xc0\x0c"),  # a pointer to itself: a compression loop
        dns_query(b"\x03www\xc0\x10"),  # a pointer forward into the question
        dns_query(FOO, counts=(3, 0, 0, 0)),  # counts that lie
        dns_query(FOO, counts=(1, 2, 0, 5)),
        dns_query(FOO, counts=(0, 0, 0, 0)),
    ]


def seed_frames(f: Any) -> list[bytes]:
    """Valid frames for every service (the fuzzer's starting points)."""
    mac = f.GUEST_MAC
    dhcp = dict(src=bytes(4), dst=b"\xff" * 4, eth_dst=BROADCAST)
    req_opts = bytes([50, 4, 10, 0, 2, 15, 54, 4, 10, 0, 2, 2])
    seeds = [
        f.arp(),
        f.udp(68, 67, dhcp_payload(1, mac), **dhcp),
        f.udp(68, 67, dhcp_payload(3, mac, req_opts), **dhcp),
        f.udp(68, 67, dhcp_payload(7, mac, bytes([54, 4, 10, 0, 2, 2]), f.GUEST_IP)),
        f.udp(68, 67, dhcp_payload(8, mac, ciaddr=f.GUEST_IP)),
        f.icmp(),
        f.icmp(dst=f.DNS_IP, body=bytes(range(64))),
        f.icmp(dst=f.REMOTE_IP, ident=9),
        f.icmp(dst=LINK_LOCAL),
        f.udp(40000, 9999, b"to outside"),
        f.udp(40001, 7777, b"to the host", dst=f.GATEWAY_IP),
        f.udp(40002, 8888, b"refused", dst=LINK_LOCAL),
        f.udp(40003, 9, b"nobody", dst=f.DNS_IP),
        f.udp(40000, 9998, b"x" * 1400, dst=bytes([198, 51, 100, 7])),
    ]
    for i, q in enumerate(dns_queries()):
        seeds.append(f.udp(5353 + i % 2, 53, q, dst=f.GATEWAY_IP if i % 3 == 0 else f.DNS_IP))
    return seeds + tcp_seeds(f) + fragment_seeds(f) + ipv6_seeds(f)


def ipv6_seeds(f: Any) -> list[bytes]:
    """The NAT, ICMPv6 echo and DNS over IPv6: to the outside, the gateway, refused places."""
    prefix_nobody = bytes.fromhex("fd000000000000000000000000000099")
    link_local = bytes.fromhex("fe800000000000000000000000000001")
    query = dns_query(FOO)
    return [
        f.udp6(40000, 9999, b"to outside"),
        f.udp6(40001, 7777, b"to the host", dst=f.GATEWAY_IP6),
        f.udp6(40002, 8888, b"refused", dst=prefix_nobody),
        f.udp6(40003, 8888, b"link-local", dst=link_local),
        f.udp6(40004, 9998, b"x" * 1400),
        f.udp6(5353, 53, query, dst=f.DNS_IP6),
        f.tcp6(40010, 8080, SYN, dst=f.GATEWAY_IP6),
        f.tcp6(40011, 443, SYN),
        f.tcp6(40012, 53, SYN, dst=f.DNS_IP6),
        f.tcp6(40013, 80, SYN, dst=prefix_nobody),
        f.icmp6(dst=f.REMOTE_IP6),
        f.icmp6(dst=prefix_nobody),
    ]


def tcp_seeds(f: Any) -> list[bytes]:
    """One TCP flow's segments, in order, plus SYNs to other places."""

    def seg(flags: int, seq: int, ack: int = 0, payload: bytes = b"", **kw: Any) -> bytes:
        return f.ipv4(PROTO_TCP, f.tcp_segment(40000, 80, flags, payload, seq=seq, ack=ack, **kw))

    a = OUR_ISS + 1
    query = dns_query(FOO)
    return [
        seg(SYN, ISN, options=build_syn_options(1460, 7)),
        seg(ACK, ISN + 1, a),
        seg(ACK | PSH, ISN + 1, a, b"hello"),
        seg(ACK | PSH, ISN + 6, a, b"world"),
        seg(ACK | FIN, ISN + 11, a),
        seg(RST, ISN + 1),
        seg(ACK, ISN + 12, a + 1),
        f.tcp(40010, 8080, SYN, dst=f.GATEWAY_IP),
        f.tcp(40011, 53, SYN, dst=f.DNS_IP),
        f.ipv4(
            PROTO_TCP,
            f.tcp_segment(
                40011,
                53,
                ACK | PSH,
                struct.pack("!H", len(query)) + query,
                dst=f.DNS_IP,
                seq=ISN + 1,
                ack=a,
            ),
            dst=f.DNS_IP,
        ),
        f.tcp(40012, 443, SYN, dst=LINK_LOCAL),
        f.tcp(40013, 80, SYN, dst=f.DNS_IP),
    ]


def fragment_seeds(f: Any) -> list[bytes]:
    """A UDP datagram in two pieces and a 3000-byte echo to the gateway in three."""
    out = []
    udp = f.udp_segment(40020, 5000, bytes(range(40)))
    out.append(f.ipv4(PROTO_UDP, udp[:24], frag=FLAG_MF, ident=0x77))
    out.append(f.ipv4(PROTO_UDP, udp[24:], frag=3, ident=0x77))
    body = bytes(i & 0xFF for i in range(3000))
    echo = bytearray(f.icmp(body=body)[34:])
    for off in range(0, len(echo), 1480):
        piece = bytes(echo[off : off + 1480])
        more = FLAG_MF if off + 1480 < len(echo) else 0
        out.append(f.ipv4(PROTO_ICMP, piece, dst=f.GATEWAY_IP, frag=more | (off >> 3), ident=0x78))
    return out


# -- mutations ----------------------------------------------------------------------------------


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
            del buf[max(i, 14) :]
        elif op == 3:  # extend with junk
            buf += bytes([value]) * (pos % 300)
        elif op == 4 and n >= 2:  # a 16-bit field (lengths, ports, counts, offsets)
            struct.pack_into("!H", buf, min(i, n - 2), value * 257 if value & 1 else value)
        elif op == 5 and n:  # swap two stretches (reorder)
            j = (pos * 7 + value) % n
            a, b = sorted((i, j))
            k = min(value % 16 + 1, b - a, n - b)
            buf[a : a + k], buf[b : b + k] = buf[b : b + k], buf[a : a + k]
        elif op == 6 and n:  # insert bytes
            buf[i:i] = bytes([value]) * (value % 9 + 1)
    return bytes(buf)


def fix_checksums(frame: bytes) -> bytes:
    """Recompute the IPv4 header and L4 checksums where the headers still allow it."""
    buf = bytearray(frame)
    if len(buf) < 34 or buf[12:14] != b"\x08\x00":
        return frame
    ihl = (buf[14] & 0x0F) * 4
    if ihl < 20 or 14 + ihl > len(buf):
        return frame
    struct.pack_into("!H", buf, 24, 0)
    struct.pack_into("!H", buf, 24, checksum(buf[14 : 14 + ihl]))
    total = min(struct.unpack_from("!H", buf, 16)[0], len(buf) - 14)
    frag = struct.unpack_from("!H", buf, 20)[0]
    l4 = 14 + ihl
    n = total - ihl
    if frag & 0x3FFF or n < 8:
        return bytes(buf)
    proto = buf[23]
    src, dst = bytes(buf[26:30]), bytes(buf[30:34])
    if proto == PROTO_UDP:
        length = struct.unpack_from("!H", buf, l4 + 4)[0]
        if 8 <= length <= n:
            struct.pack_into("!H", buf, l4 + 6, 0)
            c = checksum(buf[l4 : l4 + length], pseudo_header_sum(src, dst, PROTO_UDP, length))
            struct.pack_into("!H", buf, l4 + 6, c or 0xFFFF)
    elif proto == PROTO_TCP and n >= 20:
        struct.pack_into("!H", buf, l4 + 16, 0)
        c = checksum(buf[l4 : l4 + n], pseudo_header_sum(src, dst, PROTO_TCP, n))
        struct.pack_into("!H", buf, l4 + 16, c)
    elif proto == PROTO_ICMP:
        struct.pack_into("!H", buf, l4 + 2, 0)
        struct.pack_into("!H", buf, l4 + 2, checksum(buf[l4 : l4 + n]))
    return bytes(buf)


mutation = st.tuples(st.integers(0, 6), st.integers(0, 4000), st.integers(0, 255))
mutations = st.lists(mutation, min_size=0, max_size=4)
seconds = st.sampled_from([0.0, 0.001, 0.25, 1.1, 2.5, 7.0, 31.0, 200.0, 7500.0])


# -- host-side events ---------------------------------------------------------------------------


def pick(items: list[Any], index: int) -> Any:
    return items[index % len(items)] if items else None


def host_event(rig: Rig, data: st.DataObject) -> None:
    """One thing the host side does: a TCP socket event, a reply, a DNS answer or failure."""
    kind = data.draw(st.integers(0, 8), label="host_event")
    now = rig.now
    idx = data.draw(st.integers(0, 7), label="which")
    if kind <= 2:
        flow = pick(list(rig.tcp.table), idx)
        if flow is None:
            return
        s: FakeTcpSock | None = flow.io_data
        if kind == 0:
            err = data.draw(st.sampled_from([0, 0, errno.ECONNREFUSED, errno.ETIMEDOUT]))
            rig.tcp.host_connected(flow, err, now)
        elif kind == 1 and s is not None:
            what = data.draw(st.integers(0, 3))
            if what == 0:
                s.readable += bytes([idx]) * data.draw(st.integers(1, 5000))
            elif what == 1:
                s.eof = True
            elif what == 2:
                s.recv_error = OSError(errno.ECONNRESET, "fake")
            rig.tcp.host_readable(flow, now)
        elif kind == 2 and s is not None:
            s.accept = data.draw(st.sampled_from([None, 0, 3, 1000]))
            s.room = data.draw(st.sampled_from([0, 100, 1 << 16]))
            if data.draw(st.booleans()):
                s.send_error = OSError(errno.EPIPE, "fake")
            rig.tcp.host_writable(flow, now)
    elif kind == 3:
        flow = pick(list(rig.udp.flows.values()), idx)
        if flow is None:
            return
        host = pick([*flow.peers, OTHER_HOST], data.draw(st.integers(0, 7)))
        n = data.draw(st.sampled_from([0, 5, 1472, 1473, 3000]))
        frame = rig.core.pool.acquire()
        off = frame.start + flow.family.udp_payload_off
        frame.view[off : off + n] = bytes([idx]) * n
        rig.udp.deliver_reply(flow, frame, n, host, data.draw(st.integers(0, 65535)), now)
    elif kind == 4:
        flow = pick(list(rig.udp.flows.values()), idx)
        if flow is not None:
            host = pick([*flow.peers, OTHER_HOST], data.draw(st.integers(0, 7)))
            rig.udp.handle_host_error(
                flow, host, 9, ICMP_DEST_UNREACH, data.draw(st.integers(0, 15))
            )
    elif kind == 5:
        flow = pick(list(rig.icmp.flows.values()), idx)
        if flow is None:
            return
        host = pick([*flow.peers, OTHER_HOST], data.draw(st.integers(0, 7)))
        n = data.draw(st.sampled_from([0, 4, 8, 64, 1480, 3000]))
        frame = rig.core.pool.acquire()
        off = frame.start + flow.family.l4_off
        frame.view[off : off + n] = bytes([idx]) * n
        if n:
            frame.view[off] = data.draw(st.sampled_from([ICMP_ECHO_REPLY, 3, 8]))
        rig.icmp.deliver_echo_reply(flow, frame, n, host)
    elif kind == 6:
        dns_answer(rig, data, idx, now)
    elif kind == 7:
        rig.dns.handle_upstream_failed(idx % 2, now, "dns.upstream.refused")
    else:
        sock = pick(rig.udp_socks, idx)
        if sock is not None:
            sock.fail = OSError(errno.EAGAIN, "fake") if data.draw(st.booleans()) else None


def dns_answer(rig: Rig, data: st.DataObject, idx: int, now: float) -> None:
    """An upstream datagram: a (mutated) answer to a query we forwarded, or random bytes."""
    sent = rig.upstream_log
    if sent and data.draw(st.booleans()):
        upstream, query = pick(sent, idx)
        answer = bytearray(query)
        answer[2] |= 0x80  # QR
        answer[3] = (answer[3] & 0xF0) | data.draw(st.sampled_from([0, 0, 2, 3, 5]))
        if data.draw(st.booleans()):
            answer += bytes(data.draw(st.sampled_from([4, 1500, 2000])))
        raw = mutate(bytes(answer), data.draw(mutations))
        upstream = data.draw(st.sampled_from([upstream, upstream, 1 - upstream]))
    else:
        raw = data.draw(st.binary(max_size=64))
        upstream = idx % 2
    rig.dns.handle_upstream_answer(upstream, raw, now)


# -- the tests ----------------------------------------------------------------------------------


def guest_frame(rig: Rig, seeds: list[bytes], data: st.DataObject) -> None:
    """One guest frame: a seed, maybe mutated, maybe re-checksummed, maybe trusted."""
    frame = seeds[data.draw(st.integers(0, len(seeds) - 1), label="seed")]
    ops = data.draw(mutations, label="ops")
    if ops:
        frame = mutate(frame, ops)
        if data.draw(st.booleans(), label="fix"):
            frame = fix_checksums(frame)
    rig.feed(frame, trusted=data.draw(st.booleans(), label="trusted"))


def ack_everything(rig: Rig, f: Any, data: st.DataObject) -> None:
    """The guest acknowledges all a flow sent (so flows get to close), maybe with data/FIN."""
    flow = pick(list(rig.tcp.table), data.draw(st.integers(0, 7)))
    if flow is None:
        return
    flags = ACK | data.draw(st.sampled_from([0, 0, FIN, PSH, RST]))
    payload = b"more" if flags & PSH else b""
    seg = f.tcp_segment(
        flow.guest_port,
        flow.dst_port,
        flags,
        payload,
        dst=flow.dst_ip,
        seq=flow.rcv_nxt,
        ack=flow.snd_nxt,
    )
    rig.feed(f.ipv4(PROTO_TCP, seg, dst=flow.dst_ip))


def maybe_mutated(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    """``frames`` with at most one of them mutated (and maybe re-checksummed)."""
    out = list(frames)
    ops = data.draw(mutations, label="ops")
    if ops:
        i = data.draw(st.integers(0, len(out) - 1))
        out[i] = mutate(out[i], ops)
        if data.draw(st.booleans(), label="fix"):
            out[i] = fix_checksums(out[i])
    return out


def fragment_group(rig: Rig, f: Any, data: st.DataObject) -> None:
    """Every piece of one fragmented datagram, in any order, some maybe repeated or mutated."""
    pieces = fragment_seeds(f)
    group = pieces[:2] if data.draw(st.booleans()) else pieces[2:]
    group = data.draw(st.permutations(group), label="order")
    if data.draw(st.booleans()):
        group.append(group[0])
    for frame in maybe_mutated(group, data):
        rig.feed(frame)


def tcp_sequence(rig: Rig, f: Any, data: st.DataObject) -> None:
    """The flow's segments in order up to a point (host connect after the SYN), one mutated."""
    segs = maybe_mutated(tcp_seeds(f)[:7], data)
    n = data.draw(st.integers(1, len(segs)), label="upto")
    for i, frame in enumerate(segs[:n]):
        rig.feed(frame)
        if i == 0:
            for flow in list(rig.tcp.table):
                rig.tcp.host_connected(flow, 0, rig.now)
            rig.after_event()


def run_script(rig: Rig, f: Any, data: st.DataObject, steps: int) -> None:
    seeds = seed_frames(f)
    for _ in range(steps):
        kind = data.draw(st.integers(0, 11), label="step")
        if kind <= 3:
            guest_frame(rig, seeds, data)
        elif kind <= 6:
            host_event(rig, data)
            rig.after_event()
        elif kind == 7:
            ack_everything(rig, f, data)
        elif kind == 8:
            fragment_group(rig, f, data)
        elif kind == 9:
            tcp_sequence(rig, f, data)
        else:
            rig.advance(data.draw(seconds, label="dt"))
        rig.check()
    rig.close()


@FUZZ_SETTINGS
@given(data=st.data(), open_fails=st.booleans(), offload=st.booleans())
def test_fuzz_every_service(
    make_core: Any, frames: Any, data: st.DataObject, open_fails: bool, offload: bool
) -> None:
    rig = Rig(
        make_core, open_fails=open_fails and data.draw(st.integers(0, 9)) == 0, offload=offload
    )
    rig.tcp_io.connect_error = data.draw(st.sampled_from([0] * 9 + [errno.EMFILE]))
    run_script(rig, frames, data, data.draw(st.integers(1, 25), label="steps"))


@settings(FUZZ_SETTINGS, max_examples=300)
@given(data=st.data(), offload=st.booleans())
def test_fuzz_established_tcp_flow(
    make_core: Any, frames: Any, data: st.DataObject, offload: bool
) -> None:
    """Start from an established flow with host data in flight, a forwarded DNS query, an echo
    flow and a UDP flow; then run the script."""
    rig = Rig(make_core, offload=offload)
    seeds = tcp_seeds(frames)
    rig.feed(seeds[0])
    rig.tcp.host_connected(next(iter(rig.tcp.table)), 0, rig.now)
    rig.feed(seeds[1])
    seeds = seed_frames(frames)
    rig.feed(seeds[14])  # a DNS query that is forwarded upstream
    rig.feed(seeds[7])  # echo to an outside host: an echo flow
    rig.feed(seeds[9])  # UDP to an outside host: a UDP flow
    flow = next(iter(rig.tcp.table))
    rig.tcp_io.socks[0].readable += b"h" * data.draw(st.sampled_from([0, 100, 5000]))
    rig.tcp.host_readable(flow, rig.now)  # host data in flight toward the guest
    rig.after_event()
    rig.check()
    assert len(rig.icmp.flows) == len(rig.udp.flows) == 1
    assert [f.state_name for f in rig.tcp.table] == ["ESTABLISHED"]
    assert len(rig.upstream_log) == 1
    run_script(rig, frames, data, data.draw(st.integers(1, 30), label="steps"))


def test_seeds_reach_every_service(make_core: Any, frames: Any) -> None:
    """The unmutated seeds are accepted by the service each was written for (guards the fuzzer)."""
    rig = Rig(make_core)
    for frame in seed_frames(frames):
        rig.feed(frame)
        rig.check()
    rig.tcp.host_connected(next(iter(rig.tcp.table)), 0, rig.now)
    counts = rig.core.counters.snapshot()
    bad = {k: v for k, v in counts.items() if "bad" in k or "truncated" in k or "short" in k}
    assert bad == {}, counts
    for name in (
        "dhcp.discover",
        "icmp.echo.answered",
        "icmp.echo.sent",
        "nat.udp.to_host",
        "dns.query.forwarded",
        "dns.builtin.answer",
        "dns.query.malformed",
        "tcp.syn.accepted",
        "tcp.syn.dns",
        "ipv4.fragment.reassembled",
    ):
        assert counts.get(name, 0) >= 1, (name, counts)
    assert counts["ipv4.fragment.reassembled"] == 2
    assert ("127.0.0.1", 8080) in rig.tcp_io.connects
    assert DNS_TCP_UPSTREAM in rig.tcp_io.connects
    assert rig.to_guest > 0
    rig.close()
