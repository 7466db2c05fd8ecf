"""wire/dns.py: the query parser and the answer builder, checked against dnspython.

dnspython (a test dependency only) is the oracle: every message it reads, ``parse_query`` reads
too, with the same questions and EDNS; every answer ``build_response`` writes, dnspython reads
back as the answer its own ``make_response`` would give (id, flags, rcode, questions, records).
"""

from __future__ import annotations

import struct

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestnet.wire.dns import (
    NOTIMP,
    NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    DnsError,
    build_response,
    encode_name,
    header_only,
    is_subdomain,
    parse_query,
    read_name,
)
from guestnet.wire.native import dns_question


def dnspython_reads(wire: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(wire, keyring=False)
    except Exception:
        return None


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0xBEEF, flags, qd, an, ns, ar)


def test_plain_query() -> None:
    q = dns.message.make_query("WWW.Example.com", "AAAA")
    q.id = 4321
    got = parse_query(q.to_wire())
    assert got.ident == 4321 and got.opcode == 0 and not got.edns
    [question] = got.questions
    assert question.name == b"\x03WWW\x07Example\x03com\x00"
    assert (question.qtype, question.qclass) == (TYPE_AAAA, 1)
    assert got.question_end == len(q.to_wire())


def test_edns_query() -> None:
    q = dns.message.make_query("example.com", "A", use_edns=0, payload=4096)
    q.use_edns(0, 0, 4096, options=[dns.edns.GenericOption(10, b"12345678")])
    got = parse_query(q.to_wire())
    assert got.edns and len(got.questions) == 1


def test_compressed_second_question() -> None:
    wire = header(qd=2) + b"\x01a\x07example\x00\x00\x01\x00\x01" + b"\x01b\xc0\x0e\x00\x01\x00\x01"
    got = parse_query(wire)
    assert [q.name for q in got.questions] == [b"\x01a\x07example\x00", b"\x01b\x07example\x00"]


Q = b"\x00\x00\x01\x00\x01"  # a question for the root, type A
OPT = b"\x00\x00\x29\x10\x00\0\0\0\0\0\0"
TSIG = b"\x00\x00\xfa\x00\xff\0\0\0\0\0\0"


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (header() + b"\xc0\x0c\x00\x01\x00\x01", "dns.bad_pointer"),
        (header() + b"\x03www\xc0\x0c\x00\x01\x00\x01", "dns.bad_pointer"),
        (header() + b"\x03www\xc0\x40\x00\x01\x00\x01", "dns.bad_pointer"),  # forward
        (header(qd=5) + b"\x03www\x00\x00\x01\x00\x01", "dns.name_truncated"),
        (header(an=3) + b"\x03www\x00\x00\x01\x00\x01", "dns.name_truncated"),
        (header() + b"\x03www\x00\x00\x01\x00\x01junk", "dns.trailing_junk"),
        (header() + b"\x40abc\x00\x00\x01\x00\x01", "dns.bad_label_type"),
        (header() + b"\x80abc\x00\x00\x01\x00\x01", "dns.bad_label_type"),
        (header() + b"\x03www\x00\x00\x01", "dns.question_truncated"),
        (header() + b"\x3f" + b"a" * 63 + b"\x3f", "dns.name_truncated"),
        (header() + (b"\x3f" + b"a" * 63) * 4 + Q, "dns.name_too_long"),
        (header(an=1) + Q + b"\x00\x00\x01\x00\x01\0\0\0\0\0\x05ab", "dns.record_truncated"),
        (header(an=1) + Q + OPT, "dns.bad_opt"),
        (header(ar=2) + Q + OPT * 2, "dns.bad_opt"),
        (header(ar=2) + Q + TSIG + OPT, "dns.bad_tsig"),
        (b"\x12\x34\x01", "dns.short"),
    ],
)
def test_malformed(wire: bytes, reason: str) -> None:
    with pytest.raises(DnsError) as exc:
        parse_query(wire)
    assert exc.value.reason == reason
    assert dnspython_reads(wire) is None, "dnspython refuses it too"


def test_longest_name_is_accepted() -> None:
    name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + b"\x00"
    assert len(name) == 255
    assert parse_query(header() + name + b"\x00\x01\x00\x01").questions[0].name == name
    assert dnspython_reads(header() + name + b"\x00\x01\x00\x01") is not None


def test_read_name_returns_offset_after_first_pointer() -> None:
    data = b"\x07example\x00" + b"\x03www\xc0\x00" + b"rest"
    assert read_name(data, 9) == (b"\x03www\x07example\x00", 15)


def names() -> st.SearchStrategy[str]:
    label = st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20
    )
    return st.lists(label, min_size=1, max_size=5).map(".".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    name=names(),
    rdtype=st.sampled_from(["A", "AAAA", "MX", "TXT", "PTR", "SRV", "ANY"]),
    edns=st.booleans(),
    extra=st.lists(names(), max_size=3),
)
def test_agrees_with_dnspython_on_what_it_builds(
    name: str, rdtype: str, edns: bool, extra: list[str]
) -> None:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    for i, other in enumerate(extra):
        # records in the additional section, their names compressed against the question
        owner = other + "." + name + "."
        q.additional.append(dns.rrset.from_text(owner, 30 + i, "IN", "A", "192.0.2.1"))
    wire = q.to_wire()
    got = parse_query(wire)
    back = dns.message.from_wire(wire)
    assert got.ident == back.id and got.flags == back.flags and got.edns == (back.edns >= 0)
    [question] = got.questions
    assert question.name == back.question[0].name.to_wire()
    assert question.qtype == back.question[0].rdtype


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_never_stricter_than_dnspython(data: bytes) -> None:
    """What dnspython reads, parse_query reads, with the same questions; it raises only
    DnsError."""
    for wire in (data, header() + data, header(ar=1) + data):
        theirs = dnspython_reads(wire)
        try:
            ours = parse_query(wire)
        except DnsError:
            assert theirs is None, wire
            continue
        if theirs is not None:
            assert [q.name for q in ours.questions] == [q.name.to_wire() for q in theirs.question]
            assert ours.edns == (theirs.edns >= 0)


def their_response(wire: bytes, rcode: int, aa: bool = False) -> dns.message.Message:
    r = dns.message.make_response(dns.message.from_wire(wire), recursion_available=True)
    r.set_rcode(dns.rcode.Rcode(rcode))
    if aa:
        r.flags |= dns.flags.AA
    return r


@pytest.mark.parametrize("edns", [False, True])
def test_builtin_answer_as_dnspython_would(edns: bool) -> None:
    q = dns.message.make_query("Host.GuestNet.internal", "A", use_edns=0 if edns else None)
    q.id = 99
    wire = q.to_wire()
    mine = dns.message.from_wire(
        build_response(parse_query(wire), 0, aa=True, answer=(TYPE_A, 60, bytes([10, 0, 2, 2])))
    )
    theirs = their_response(wire, 0, aa=True)
    assert (mine.id, mine.flags, mine.rcode()) == (theirs.id, theirs.flags, theirs.rcode())
    assert mine.question == theirs.question
    assert str(mine.question[0].name) == "Host.GuestNet.internal."  # case kept
    [rrset] = mine.answer
    assert rrset.ttl == 60 and [str(r) for r in rrset] == ["10.0.2.2"]
    assert rrset.name == q.question[0].name
    assert (mine.edns >= 0) == edns


def test_error_answers_as_dnspython_would() -> None:
    q = dns.message.make_query("nope.guestnet.internal", "MX", use_edns=0)
    q.flags &= ~dns.flags.RD
    wire = q.to_wire()
    for rcode in (NXDOMAIN, NOTIMP, 2, 1):
        mine = dns.message.from_wire(build_response(parse_query(wire), rcode))
        theirs = their_response(wire, rcode)
        assert (mine.id, mine.flags, mine.rcode()) == (theirs.id, theirs.flags, theirs.rcode())
        assert mine.question == theirs.question and mine.answer == []


def test_other_opcode_echoed() -> None:
    q = dns.message.make_query("example.com", "A")
    q.set_opcode(dns.opcode.STATUS)
    r = dns.message.from_wire(build_response(parse_query(q.to_wire()), NOTIMP))
    assert r.opcode() == dns.opcode.STATUS and r.rcode() == dns.rcode.NOTIMP


def test_header_only() -> None:
    r = dns.message.from_wire(header_only(7, 0x0100, 1))
    assert r.id == 7 and r.rcode() == dns.rcode.FORMERR
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RD and r.flags & dns.flags.RA


def test_encode_name_and_subdomain() -> None:
    zone = encode_name("guestnet.internal")
    assert zone == b"\x08guestnet\x08internal\x00" == encode_name("guestnet.internal.")
    assert is_subdomain(zone, zone)
    assert is_subdomain(encode_name("a.b.guestnet.internal"), zone)
    assert not is_subdomain(encode_name("xguestnet.internal"), zone)
    assert not is_subdomain(encode_name("internal"), zone)
    # a label whose bytes end like the zone is not the zone
    assert not is_subdomain(b"\x0ba\x08guestnet" + b"\x08internal\x00", zone)
    with pytest.raises(ValueError):
        encode_name("a" * 64 + ".com")
    assert dns.name.from_wire(encode_name("host.docker.internal"), 0)[0] == dns.name.from_text(
        "host.docker.internal"
    )


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=63), max_size=5),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(0, 0xFFFF),
    st.sampled_from([None, b"", b"\x00\x0a\x00\x02ab"]),
    st.binary(max_size=3),
)
def test_dns_question_reads_what_parse_query_reads(
    labels: list[bytes], qtype: int, qclass: int, flags: int, opt: bytes | None, tail: bytes
) -> None:
    """Whenever the forwarder's dns_question (C or pure, whichever runs) takes a message,
    parse_query takes it too, as a query with one question: the same id, and the question
    the forwarder keys on is that question's name lowered with its type and class. And every
    plain query parse_query takes (opcode QUERY, one question without pointers, no records but
    an OPT owned by the root) dns_question takes."""
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    records = b""
    if opt is not None:
        records = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00" + struct.pack("!H", len(opt)) + opt
    head = struct.pack("!HHHHHH", 0xABCD, flags, 1, 0, 0, 0 if opt is None else 1)
    for wire in (
        head + name + struct.pack("!HH", qtype, qclass) + records,
        head + name + struct.pack("!HH", qtype, qclass) + records + tail,
        head + name + struct.pack("!HH", qtype, qclass) + records[: len(records) - len(tail)],
    ):
        plain = dns_question(wire)
        try:
            query = parse_query(wire)
        except DnsError:
            assert plain is None, wire
            continue
        if plain is None:
            assert query.flags & 0xF800 or len(name) > 255, wire
            continue
        ident, question, name_len = plain
        assert query.ident == ident and query.opcode == 0 and not query.flags & 0x8000
        [q] = query.questions
        assert question == q.name.lower() + struct.pack("!HH", q.qtype, q.qclass)
        assert name_len == len(q.name) and query.edns == (opt is not None)
