"""DNS service: built-in names, forwarding through a fake upstream, failover, bad input.

The core is driven frame by frame through the classifier with a scripted clock; the test plays
the upstream resolvers by reading the core's outbox and feeding answers back. The last tests run
the I/O driver in process against real UDP sockets on 127.0.0.1 (no root needed).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestnet.assembly import Instance
from guestnet.cli import build_parser, config_from_args
from guestnet.config import Config
from guestnet.core.dns import BUILTIN_NAMES, DOWN_HOLD_S, MAX_PENDING_PER_GUEST, DnsService
from guestnet.io.dns_upstream import read_resolv_conf, upstream_servers
from guestnet.wire.dns import SERVFAIL, build_response, parse_query
from guestnet.wire.ethernet import ETH_HLEN, ETHERTYPE_IPV4, parse_ethernet
from guestnet.wire.ipv4 import PROTO_UDP, parse_ipv4
from guestnet.wire.udp import parse_udp, verify_udp

SPORT = 40053
UP0 = ("192.0.2.1", 53)
UP1 = ("192.0.2.2", 5353)


class Dns:
    """A DnsService wired to a core harness, with helpers to play guest and upstreams."""

    def __init__(self, core: Any, frames: Any, upstreams: Any = (UP0, UP1), **kw: Any) -> None:
        self.core = core
        self.frames = frames
        self.svc = DnsService(
            core.config, core.pool, core.counters, upstreams, rng=random.Random(7), **kw
        )
        core.classifier.dns_udp = self.svc

    def ask(
        self,
        name: str = "www.example.com",
        rdtype: str = "A",
        qid: int = 0x1234,
        dst: bytes | None = None,
        sport: int = SPORT,
        wire: bytes | None = None,
    ) -> bytes:
        """Send a query from the guest; returns its wire form."""
        if wire is None:
            q = dns.message.make_query(name, rdtype)
            q.id = qid
            wire = q.to_wire()
        dst = dst or self.frames.DNS_IP
        self.core.feed(self.frames.udp(sport=sport, dport=53, payload=wire, dst=dst))
        return wire

    def replies(self) -> list[tuple[dns.message.Message, bytes, bytes]]:
        """Answers the guest got: (message, raw DNS payload, IP source), headers checked."""
        out = []
        for frame in self.core.take_sent():
            eth = parse_ethernet(frame)
            assert eth.dst == self.frames.GUEST_MAC and eth.src == self.frames.OUR_MAC
            assert eth.ethertype == ETHERTYPE_IPV4
            l3 = memoryview(frame)[ETH_HLEN:]
            ip = parse_ipv4(l3)
            assert ip.proto == PROTO_UDP and ip.dst == self.frames.GUEST_IP
            l4 = l3[ip.header_len : ip.total_len]
            udp = parse_udp(l4)
            assert (udp.sport, udp.dport) == (53, SPORT)
            assert verify_udp(l4, ip.src, ip.dst, udp.length)
            payload = bytes(l4[8 : udp.length])
            out.append((dns.message.from_wire(payload), payload, ip.src))
        return out

    def one_reply(self) -> dns.message.Message:
        got = self.replies()
        assert len(got) == 1, got
        return got[0][0]

    def take_outbox(self) -> list[tuple[int, bytes]]:
        out = [(q.upstream, q.data) for q in self.svc.outbox]
        self.svc.outbox.clear()
        return out


@pytest.fixture(params=["ordinary", "fast"])
def d(core: Any, frames: Any, request: Any) -> Dns:
    """The service behind the classifier's ordinary path, or its fast path as the assembly
    wires it (every test below runs both ways). The fast path needs the guest's MAC known: an
    ARP request teaches it first (its answer is taken away)."""
    svc = Dns(core, frames)
    if request.param == "fast":
        core.classifier.udp_fast = lambda *args: False
        core.classifier.dns_fast = svc.svc.handle_fast
        core.feed(frames.arp())
        core.take_sent()
    return svc


def test_the_fast_path_takes_queries_once_the_mac_is_known(core: Any, frames: Any) -> None:
    svc = Dns(core, frames)
    taken: list[int] = []

    def counted(*args: Any) -> bool:
        took = svc.svc.handle_fast(*args)
        taken.append(took)
        return took

    core.classifier.udp_fast = lambda *args: False
    core.classifier.dns_fast = counted
    svc.ask("host.guestnet.internal")  # the guest's MAC is learned by this one
    svc.ask("host.guestnet.internal", dst=frames.GATEWAY_IP)
    svc.ask("www.example.com")
    assert taken == [True, True]
    assert len(svc.replies()) == 2 and len(svc.take_outbox()) == 1
    core.port.rx_gso_size = 100  # a super-frame's datagrams go the ordinary way, one by one
    svc.ask("host.guestnet.internal")
    core.port.rx_gso_size = 0
    assert taken == [True, True, False] and len(svc.replies()) == 1


def answer_for(sent: bytes, *records: str, flags: int = 0, rcode: Any = None) -> bytes:
    """The upstream's answer to the query bytes it was sent."""
    q = dns.message.from_wire(sent)
    r = dns.message.make_response(q)
    for text in records:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", text))
    r.flags |= flags
    if rcode is not None:
        r.set_rcode(rcode)
    return r.to_wire()


# -- built-in names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [*BUILTIN_NAMES, "HOST.GuestNet.Internal.", "Host.Docker.Internal"]
)
def test_builtin_a(d: Dns, name: str) -> None:
    d.ask(name, "A", qid=77)
    r = d.one_reply()
    assert r.id == 77 and r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.QR and r.flags & dns.flags.AA
    assert [str(rd) for rd in r.answer[0]] == ["10.0.2.2"]
    assert r.answer[0].ttl == 60
    assert str(r.question[0].name).lower() == name.lower().rstrip(".") + "."
    assert d.svc.outbox == [] and d.core.counters["dns.builtin.answer"] == 1


def test_builtin_answer_comes_from_the_address_asked(d: Dns) -> None:
    d.ask("host.guestnet.internal", dst=d.frames.GATEWAY_IP)
    d.ask("host.guestnet.internal", dst=d.frames.DNS_IP)
    assert [src for _, _, src in d.replies()] == [d.frames.GATEWAY_IP, d.frames.DNS_IP]


def test_builtin_aaaa_is_the_ipv6_gateway(d: Dns) -> None:
    d.ask("host.containers.internal", "AAAA")
    r = d.one_reply()
    assert r.rcode() == dns.rcode.NOERROR and [str(rd) for rd in r.answer[0]] == ["fd00::2"]


def test_builtin_aaaa_nodata_without_ipv6(make_core: Any, frames: Any) -> None:
    d = Dns(make_core(ipv6=False), frames)
    d.ask("host.containers.internal", "AAAA")
    r = d.one_reply()
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []


@pytest.mark.parametrize("rdtype", ["MX", "TXT", "ANY"])
def test_builtin_other_types_nodata(d: Dns, rdtype: str) -> None:
    d.ask("gateway.guestnet.internal", rdtype)
    r = d.one_reply()
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    assert d.core.counters["dns.builtin.nodata"] == 1


def test_other_names_in_our_zone_do_not_exist(d: Dns) -> None:
    d.ask("nope.guestnet.internal")
    assert d.one_reply().rcode() == dns.rcode.NXDOMAIN
    assert d.svc.outbox == []


# -- forwarding -------------------------------------------------------------------------------


def test_forward_and_answer(d: Dns) -> None:
    wire = d.ask("www.example.com", qid=0x1234)
    [(up, sent)] = d.take_outbox()
    assert up == 0
    assert sent[2:] == wire[2:] and sent[:2] != wire[:2]
    answer = answer_for(sent, "198.51.100.7")
    d.svc.handle_upstream_answer(0, answer, d.core.now + 0.01)
    [(r, raw, src)] = d.replies()
    assert src == d.frames.DNS_IP
    assert r.id == 0x1234 and [str(x) for x in r.answer[0]] == ["198.51.100.7"]
    assert raw[2:] == answer[2:], "the answer passes unchanged but for its id"
    assert d.svc.pending_count == 0 and d.svc.next_deadline() is None
    assert d.core.counters["dns.answer.forwarded"] == 1


def test_upstream_ids_are_distinct_while_outstanding(d: Dns) -> None:
    for i in range(200):
        d.ask(f"n{i}.example.com", qid=1, sport=SPORT)
    ids = [struct.unpack("!H", sent[:2])[0] for _, sent in d.take_outbox()]
    assert len(ids) == 200 and len(set(ids)) == 200


def test_truncated_answer_keeps_tc(d: Dns) -> None:
    d.ask("big.example.com")
    [(_, sent)] = d.take_outbox()
    d.svc.handle_upstream_answer(0, answer_for(sent, flags=dns.flags.TC), d.core.now)
    assert d.one_reply().flags & dns.flags.TC


def test_answer_cut_to_fit_the_mtu(make_core: Any, frames: Any) -> None:
    core = make_core(mtu=576)
    d = Dns(core, frames)
    d.ask("many.example.com")
    [(_, sent)] = d.take_outbox()
    answer = answer_for(sent, *[f"198.51.100.{i}" for i in range(1, 60)])
    assert len(answer) > 576
    d.svc.handle_upstream_answer(0, answer, core.now)
    r = d.one_reply()
    assert r.flags & dns.flags.TC and r.answer == [] and len(r.question) == 1
    assert core.counters["dns.answer.truncated_for_mtu"] == 1
    assert core.pool.in_use == 0


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda a: b"\xff\xff" + a[2:], id="wrong-id"),
        pytest.param(lambda a: a[:2] + bytes([a[2] & 0x7F]) + a[3:], id="not-a-response"),
        pytest.param(lambda a: a.replace(b"\x07example", b"\x07exampl3"), id="other-question"),
        pytest.param(lambda a: a.replace(b"\x03www", b"\x03wwx"), id="other-name"),
        pytest.param(lambda a: a[:11], id="short"),
    ],
)
def test_stray_answers_are_counted(d: Dns, mangle: Any) -> None:
    d.ask("www.example.com")
    [(_, sent)] = d.take_outbox()
    d.svc.handle_upstream_answer(0, mangle(answer_for(sent, "198.51.100.1")), d.core.now)
    assert d.core.take_sent() == []
    assert d.core.counters["dns.upstream.unmatched"] == 1
    assert d.svc.pending_count == 1


def test_answer_from_an_upstream_not_asked_is_stray(d: Dns) -> None:
    d.ask()
    [(_, sent)] = d.take_outbox()
    d.svc.handle_upstream_answer(1, answer_for(sent, "198.51.100.1"), d.core.now)
    assert d.core.counters["dns.upstream.unmatched"] == 1 and d.core.take_sent() == []


def test_question_compared_case_insensitively(d: Dns) -> None:
    d.ask("WwW.ExAmPlE.cOm")
    [(_, sent)] = d.take_outbox()
    answer = bytearray(answer_for(sent, "198.51.100.1"))
    answer[13:16] = b"www"  # an upstream that does not preserve case
    d.svc.handle_upstream_answer(0, bytes(answer), d.core.now)
    assert d.one_reply().id == 0x1234


def test_error_answer_without_question_is_accepted(d: Dns) -> None:
    d.ask()
    [(_, sent)] = d.take_outbox()
    flags = 0x8000 | dns.rcode.FORMERR
    d.svc.handle_upstream_answer(0, sent[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0), 0)
    assert d.one_reply().rcode() == dns.rcode.FORMERR


def test_guest_retransmission_is_not_forwarded_twice(d: Dns) -> None:
    d.ask(qid=5)
    d.ask(qid=5)
    assert len(d.take_outbox()) == 1
    assert d.core.counters["dns.query.duplicate"] == 1


# -- failover and timeouts ----------------------------------------------------------------------


def test_timeout_fails_over_then_servfail(d: Dns) -> None:
    t0 = d.core.now
    d.ask(qid=9)
    [(up, first)] = d.take_outbox()
    assert up == 0 and d.svc.next_deadline() == pytest.approx(t0 + 2.0)
    d.svc.handle_timeout(t0 + 1.99)
    assert d.take_outbox() == []
    d.svc.handle_timeout(t0 + 2.0)
    [(up, second)] = d.take_outbox()
    assert up == 1 and second == first
    assert d.core.take_sent() == []
    d.svc.handle_timeout(t0 + 3.99)
    assert d.core.take_sent() == []
    d.svc.handle_timeout(t0 + 4.0)
    r = d.one_reply()
    assert r.id == 9 and r.rcode() == dns.rcode.SERVFAIL
    assert len(r.question) == 1
    assert d.svc.pending_count == 0 and d.svc.next_deadline() is None
    assert d.core.counters["dns.upstream.timeout"] == 2
    assert d.core.counters["dns.answer.servfail"] == 1


def test_edns_query_leaves_as_written_and_its_servfail_echoes_it(d: Dns) -> None:
    """A plain query with EDNS and a mixed-case name (the forwarder's quick read of it): it
    leaves as the guest wrote it but for the id; when every upstream has timed out, the
    SERVFAIL carries the guest's id, its question as written and an OPT record, as the answer
    built from the parsed query would."""
    q = dns.message.make_query("WwW.Example.COM", "AAAA", use_edns=0, payload=1232)
    q.id = 4242
    wire = d.ask(wire=q.to_wire())
    [(_, sent)] = d.take_outbox()
    assert sent[2:] == wire[2:]
    t0 = d.core.now
    d.svc.handle_timeout(t0 + 2.0)
    d.take_outbox()
    d.svc.handle_timeout(t0 + 4.0)
    [(r, raw, _)] = d.replies()
    assert raw == build_response(parse_query(wire), SERVFAIL)
    assert r.id == 4242 and r.rcode() == dns.rcode.SERVFAIL and r.edns == 0
    assert r.question[0].name.to_text() == "WwW.Example.COM."


def test_late_answer_from_first_upstream_still_counts(d: Dns) -> None:
    d.ask()
    [(_, sent)] = d.take_outbox()
    d.svc.handle_timeout(d.core.now + 2.0)
    d.take_outbox()
    d.svc.handle_upstream_answer(0, answer_for(sent, "198.51.100.3"), d.core.now + 2.1)
    assert d.one_reply().rcode() == dns.rcode.NOERROR
    d.svc.handle_timeout(d.core.now + 10)
    assert d.core.take_sent() == []


def test_failed_upstream_is_skipped_by_new_queries(d: Dns) -> None:
    t0 = d.core.now
    d.ask(qid=1)
    d.take_outbox()
    d.svc.handle_timeout(t0 + 2.0)
    d.take_outbox()
    d.ask(qid=2)
    assert [up for up, _ in d.take_outbox()] == [1]
    d.core.now = t0 + 2.0 + DOWN_HOLD_S
    d.ask(qid=3)
    assert [up for up, _ in d.take_outbox()] == [0]


def test_preferred_upstream_for_tcp_follows_failover(d: Dns) -> None:
    assert d.svc.preferred_upstream(d.core.now) == UP0
    d.svc.handle_upstream_failed(0, d.core.now, "dns.upstream.refused")
    assert d.svc.preferred_upstream(d.core.now) == UP1
    assert d.svc.preferred_upstream(d.core.now + DOWN_HOLD_S) == UP0


def test_refused_upstream_fails_over_at_once(d: Dns) -> None:
    d.ask()
    d.take_outbox()
    d.svc.handle_upstream_failed(0, d.core.now, "dns.upstream.refused")
    assert [up for up, _ in d.take_outbox()] == [1]
    d.svc.handle_upstream_failed(1, d.core.now, "dns.upstream.refused")
    assert d.one_reply().rcode() == dns.rcode.SERVFAIL
    assert d.core.counters["dns.upstream.refused"] == 2


def test_refused_answer_tries_the_next_upstream(d: Dns) -> None:
    d.ask()
    [(_, sent)] = d.take_outbox()
    d.svc.handle_upstream_answer(0, answer_for(sent, rcode=dns.rcode.REFUSED), d.core.now)
    [(up, again)] = d.take_outbox()
    assert up == 1 and d.core.take_sent() == []
    d.svc.handle_upstream_answer(1, answer_for(again, rcode=dns.rcode.REFUSED), d.core.now)
    assert d.one_reply().rcode() == dns.rcode.REFUSED


def test_no_upstreams_servfail(core: Any, frames: Any) -> None:
    d = Dns(core, frames, upstreams=())
    d.ask()
    assert d.one_reply().rcode() == dns.rcode.SERVFAIL
    assert core.counters["dns.upstream.none"] == 1


def test_pending_table_is_bounded(core: Any, frames: Any) -> None:
    d = Dns(core, frames, max_pending=3)
    for i in range(5):
        d.ask(qid=i)
    assert len(d.take_outbox()) == 3
    assert [r.rcode() for r, _, _ in d.replies()] == [dns.rcode.SERVFAIL] * 2
    assert core.counters["dns.pending.full"] == 2
    d.svc.handle_timeout(core.now + 100)
    d.svc.handle_timeout(core.now + 200)
    assert len(d.replies()) == 3 and d.svc.pending_count == 0


def test_one_guest_cannot_take_every_pending_slot(core: Any, frames: Any) -> None:
    """MAX_PENDING_PER_GUEST bounds one guest address's outstanding queries; another guest
    address still gets its queries forwarded; a slot comes back when an answer or timeout ends
    a query."""
    d = Dns(core, frames, max_pending=MAX_PENDING_PER_GUEST * 2)
    for i in range(MAX_PENDING_PER_GUEST + 5):
        d.ask(qid=i)
    assert len(d.take_outbox()) == MAX_PENDING_PER_GUEST
    assert core.counters["dns.pending.guest_full"] == 5
    assert [r.rcode() for r, _, _ in d.replies()] == [dns.rcode.SERVFAIL] * 5
    other = bytes([10, 0, 2, 16])
    q = dns.message.make_query("www.example.com", "A")
    core.feed(frames.udp(sport=SPORT, dport=53, payload=q.to_wire(), src=other, dst=frames.DNS_IP))
    assert len(d.take_outbox()) == 1
    d.svc.handle_timeout(core.now + 100)
    d.svc.handle_timeout(core.now + 200)
    core.take_sent()  # the SERVFAILs of the timed-out queries, to both guests
    d.take_outbox()  # (their failover to the second upstream between the two timeouts)
    assert d.svc.pending_count == 0 and d.svc._per_guest == {}
    d.ask(qid=9999)
    assert len(d.take_outbox()) == 1


# -- bad queries --------------------------------------------------------------------------------


def header(qid: int = 0xBEEF, flags: int = 0x0100, qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, 0, 0)


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(header() + b"\xc0\x0c\x00\x01\x00\x01", id="compression-loop"),
        pytest.param(header() + b"\x03www\xc0\x0c\x00\x01\x00\x01", id="loop-via-label"),
        pytest.param(header(qd=5) + b"\x03www\x00\x00\x01\x00\x01", id="lying-qdcount"),
        pytest.param(header(an=3) + b"\x03www\x00\x00\x01\x00\x01", id="lying-ancount"),
        pytest.param(header() + b"\x03www\x00\x00\x01\x00\x01junk", id="trailing-junk"),
        pytest.param(header() + b"\x40abc\x00\x00\x01\x00\x01", id="bad-label-type"),
        pytest.param(header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f", id="cut"),
    ],
)
def test_malformed_query_gets_formerr(d: Dns, wire: bytes) -> None:
    d.ask(wire=wire)
    [raw] = [bytes(frame[42:]) for frame in d.core.take_sent()]
    qid, flags = struct.unpack_from("!HH", raw)
    assert qid == 0xBEEF and flags & 0x8000 and flags & 0x000F == dns.rcode.FORMERR
    assert d.core.counters["dns.query.malformed"] == 1
    assert d.svc.outbox == []


def test_two_questions_get_formerr(d: Dns) -> None:
    q = dns.message.make_query("a.example.com", "A")
    q.question.append(dns.message.make_query("b.example.com", "A").question[0])
    d.ask(wire=q.to_wire())
    assert d.one_reply().rcode() == dns.rcode.FORMERR


def test_short_query_dropped(d: Dns) -> None:
    d.ask(wire=b"\x12\x34\x01\x00")
    assert d.core.take_sent() == [] and d.core.counters["dns.query.short"] == 1


def test_response_sent_to_us_dropped(d: Dns) -> None:
    d.ask(wire=header(flags=0x8180) + b"\x00\x00\x01\x00\x01")
    assert d.core.take_sent() == [] and d.core.counters["dns.query.is_response"] == 1


def test_other_opcode_notimp(d: Dns) -> None:
    q = dns.message.make_query("www.example.com", "A")
    q.set_opcode(dns.opcode.STATUS)
    d.ask(wire=q.to_wire())
    assert d.one_reply().rcode() == dns.rcode.NOTIMP


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_fuzz_queries_never_raise(make_core: Any, frames: Any, data: bytes) -> None:
    core = make_core()
    d = Dns(core, frames)
    d.ask(wire=data)
    d.ask(wire=header() + data)
    core.take_sent()
    assert core.pool.in_use == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_fuzz_upstream_answers_never_raise(make_core: Any, frames: Any, data: bytes) -> None:
    core = make_core()
    d = Dns(core, frames)
    d.ask()
    [(_, sent)] = d.take_outbox()
    d.svc.handle_upstream_answer(0, sent[:2] + data, core.now)
    d.svc.handle_upstream_answer(0, data, core.now)
    core.take_sent()
    assert core.pool.in_use == 0


# -- upstream list and CLI ---------------------------------------------------------------------


def test_read_resolv_conf(tmp_path: Any) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver ::1\n"
        "nameserver fe80::1%eth0\nnameserver not-an-address\nnameserver 127.0.0.53\noptions x\n"
    )
    assert read_resolv_conf(str(path)) == (("127.0.0.53", 53), ("::1", 53), ("fe80::1%eth0", 53))
    assert read_resolv_conf(str(tmp_path / "missing")) == ()
    assert upstream_servers(Config(), str(tmp_path / "missing")) == (("127.0.0.1", 53),)
    cfg = Config(dns_upstreams=(("127.0.0.1", 5300),))
    assert upstream_servers(cfg, str(path)) == (("127.0.0.1", 5300),)


def test_cli_dns_upstream() -> None:
    args = build_parser().parse_args(
        [
            "qemu",
            "--socket",
            "x",
            "--dns-upstream",
            "127.0.0.1:5353",
            "--dns-upstream",
            "[::1]:53",
            "--dns-upstream",
            "192.0.2.1",
            "--dns-upstream",
            "::1",
        ]
    )
    assert config_from_args(args).dns_upstreams == (
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("192.0.2.1", 53),
        ("::1", 53),
    )


@pytest.mark.parametrize("bad", ["example.com", "1.2.3.4:x", "[::1", "1.2.3.4:0", "[::1]x"])
def test_cli_dns_upstream_rejects(bad: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["qemu", "--socket", "x", "--dns-upstream", bad])
    assert exc.value.code == 2
    assert "--dns-upstream" in capsys.readouterr().err


# -- the I/O driver, in process, on loopback ------------------------------------------------------


class InstanceHarness:
    """An Instance with a collecting port; the loop runs in short bounded steps."""

    def __init__(self, upstreams: tuple[tuple[str, int], ...], frames: Any) -> None:
        from guestnet.core.port import Port

        self.inst = Instance(Config(dns_upstreams=upstreams))
        self.frames = frames
        self.sent: list[bytes] = []

        def collect(frame: Any) -> None:
            self.sent.append(bytes(frame.data))
            self.inst.pool_to_guest.release(frame)

        self.port = Port("t", collect)
        self.inst.switch.attach(self.port)

    def ask(self, name: str, qid: int = 0x4242) -> None:
        q = dns.message.make_query(name, "A")
        q.id = qid
        frame = self.frames.udp(sport=SPORT, dport=53, payload=q.to_wire(), dst=self.frames.DNS_IP)
        self.inst.classifier.handle_frame(memoryview(frame), self.port, self.inst.loop.now())

    def run_until_answer(self, limit_s: float = 5.0) -> dns.message.Message:
        deadline = time.monotonic() + limit_s
        while not self.sent and time.monotonic() < deadline:
            self.inst.loop.run_once(max_wait=0.05)
        assert len(self.sent) == 1
        l3 = memoryview(self.sent.pop())[ETH_HLEN:]
        ip = parse_ipv4(l3)
        return dns.message.from_wire(bytes(l3[ip.header_len + 8 : ip.total_len]))


def test_driver_forwards_over_loopback(frames: Any) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    h = InstanceHarness((("127.0.0.1", server.getsockname()[1]),), frames)
    try:
        h.ask("www.example.com")
        h.inst.loop.run_once(max_wait=0)
        data, addr = server.recvfrom(4096)
        server.sendto(answer_for(data, "198.51.100.9"), addr)
        r = h.run_until_answer()
        assert r.id == 0x4242 and [str(x) for x in r.answer[0]] == ["198.51.100.9"]
        assert h.inst.pool_to_guest.in_use == 0
    finally:
        h.inst.close()
        server.close()


def test_driver_refused_upstream_servfail_at_once(frames: Any) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nobody listens there now: the kernel answers ICMP port unreachable
    h = InstanceHarness((("127.0.0.1", dead_port),), frames)
    try:
        t0 = time.monotonic()
        h.ask("www.example.com")
        r = h.run_until_answer(limit_s=1.5)
        assert r.rcode() == dns.rcode.SERVFAIL and time.monotonic() - t0 < 1.5
        assert h.inst.counters["dns.upstream.refused"] == 1
    finally:
        h.inst.close()


def test_default_ids_come_from_urandom_in_batches(monkeypatch: Any) -> None:
    import os

    from guestnet.core import dns as core_dns

    calls = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(core_dns.os, "urandom", counting)
    ids = core_dns.UrandomIds()
    got = [ids.getrandbits(16) for _ in range(core_dns.ID_BATCH + 1)]
    assert len(calls) == 2 and all(0 <= i < 65536 for i in got)
    assert len(set(got)) > core_dns.ID_BATCH * 0.9
    assert all(0 <= ids.getrandbits(4) < 16 for _ in range(100))


def _dns6_round(core: Any, frames: Any, fast: bool) -> tuple[object, ...]:
    """Queries over IPv6 (forwarded, answered, built-in, malformed, a retransmission) through
    the ordinary path or the IPv6 fast path; what the upstreams and the guest got."""
    svc = DnsService(core.config, core.pool, core.counters, (UP0, UP1), rng=random.Random(7))
    core.classifier.dns6_udp = svc
    taken: list[bool] = []
    if fast:
        core.classifier.udp_fast = lambda *args: False

        def counted(*args: Any) -> bool:
            took = svc.handle_fast6(*args)
            taken.append(took)
            return took

        core.classifier.dns_fast6 = counted
    sent_up: list[bytes] = []

    def ask(wire: bytes, dst: bytes = frames.DNS_IP6) -> None:
        core.feed(frames.udp6(sport=SPORT, dport=53, payload=wire, dst=dst))
        sent_up.extend(q.data for q in svc.outbox)
        svc.outbox.clear()

    q = dns.message.make_query("www.example.com", "AAAA", use_edns=0)
    q.id = 77
    ask(q.to_wire())  # the ordinary path sees the port's first IPv6 packet
    ask(q.to_wire())  # a retransmission: not forwarded twice
    q.id = 78
    ask(q.to_wire(), dst=frames.GATEWAY_IP6)
    svc.handle_upstream_answer(0, answer_for(sent_up[0], flags=dns.flags.QR), core.now)
    builtin = dns.message.make_query("host.guestnet.internal", "AAAA")
    builtin.id = 79
    ask(builtin.to_wire())
    ask(b"\x00\x01\x00\x00\x00\x01")  # short of a header: dropped
    ask(bytes(12) + b"\xc0")  # malformed: FORMERR
    return (sent_up, core.take_sent(), core.counters.snapshot(), taken)


def test_queries_over_ipv6_take_the_fast_path_with_the_same_result(
    make_core: Any, frames: Any
) -> None:
    fast = _dns6_round(make_core(), frames, True)
    plain = _dns6_round(make_core(), frames, False)
    assert fast[:3] == plain[:3]
    assert fast[3] == [True] * 5, "every query after the first goes through handle_fast6"
    assert len(fast[0]) == 2 and len(fast[1]) == 3  # two forwarded; answer, built-in, FORMERR
