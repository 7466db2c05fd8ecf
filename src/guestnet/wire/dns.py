"""DNS messages (RFC 1035, EDNS RFC 6891): what a forwarder and a tiny authority need.

Theory of operation
-------------------
guestnet's resolver answers a handful of names itself and forwards everything else as the guest
wrote it (a fresh id aside). It needs neither a general DNS library nor the records' contents:

- :func:`parse_query` checks that a message from the guest is well formed (header, every name,
  every record within bounds, no bytes left over) and returns what the service acts on: id,
  flags, opcode, the questions (name decompressed, type, class), whether it carries EDNS (OPT),
  and where the question section ends. Record data is skipped by its
  length, not parsed: a forwarder has no business with it, and the upstream checks it anyway.
- :func:`build_response` writes an answer to a parsed query: the query's id, opcode and RD, RA
  set, the questions echoed, at most one answer record (a built-in name's address, its name a
  compression pointer to the question), and an OPT record when the query had one.

The checks are the structural ones a full parser applies (dnspython's, which this replaced for
~13 MB of imports and ~35 µs per query): a compression pointer must point backward, before the
name (or pointer) it appears in, so there are no loops; label types 0x40 and 0x80 are refused;
names are at most 255 bytes; counts must match the records present; OPT appears at most once
and only among the additional records; TSIG only as the last additional record. Anything else is
a :class:`DnsError` whose reason names the fault.

Names are kept in wire form (length-prefixed labels, ending in the root's zero byte),
uncompressed. DNS compares names case-insensitively in ASCII only (RFC 4343), which is exactly
what ``bytes.lower()`` does, so a lowered wire name is the key to compare and look up.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError

#: DNS header length: id, flags and four counts.
DNS_HLEN = 12

# Header flags (RFC 1035 4.1.1).
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

# Opcodes and response codes used here.
OPCODE_QUERY = 0
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

# Record types and classes used here.
TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_TSIG = 250
CLASS_IN = 1

#: The UDP payload size our own answers advertise in their OPT record (RFC 6891 6.2.5; 1232 is
#: what the DNS Flag Day 2020 settled on: it fits any IPv6 path without fragments).
EDNS_PAYLOAD = 1232
#: Longest name in wire form (RFC 1035 2.3.4).
MAX_NAME_LEN = 255

_HDR = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_OPT_RR = b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)


class DnsError(WireError):
    """A malformed DNS message; ``reason`` says what is wrong (``dns.bad_pointer``...)."""


class Question(NamedTuple):
    """One question: the name in wire form, uncompressed, as the sender wrote it (case kept)."""

    name: bytes
    qtype: int
    qclass: int


class Query(NamedTuple):
    """What :func:`parse_query` found in a well-formed message."""

    ident: int
    flags: int
    questions: tuple[Question, ...]
    #: Offset just past the question section.
    question_end: int
    #: The message carries an OPT record (EDNS).
    edns: bool

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11


def read_name(data: bytes, off: int) -> tuple[bytes, int]:
    """The name at ``off``, decompressed, in wire form; and the offset after it in ``data``.

    A compression pointer must point before the start of the name or pointer that led to it, so
    following pointers always moves backward and ends: the rule dnspython and BIND apply.
    """
    end = len(data)
    parts: list[bytes] = []
    length = 0
    after = -1  # offset after the name where it sits: set at the first pointer
    floor = off  # pointers must point below this
    while True:
        if off >= end:
            raise DnsError("dns.name_truncated")
        n = data[off]
        if n == 0:
            off += 1
            break
        if n < 0x40:
            stop = off + 1 + n
            if stop > end:
                raise DnsError("dns.name_truncated")
            length += n + 1
            if length >= MAX_NAME_LEN:  # plus the root's byte: over 255
                raise DnsError("dns.name_too_long")
            parts.append(data[off:stop])
            off = stop
        elif n >= 0xC0:
            if off + 1 >= end:
                raise DnsError("dns.name_truncated")
            target = ((n & 0x3F) << 8) | data[off + 1]
            if target >= floor:
                raise DnsError("dns.bad_pointer")
            if after < 0:
                after = off + 2
            floor = target
            off = target
        else:
            raise DnsError("dns.bad_label_type")
    parts.append(b"\x00")
    return b"".join(parts), (after if after >= 0 else off)


def _skip_records(data: bytes, off: int, count: int, additional: bool) -> tuple[int, bool]:
    """Walk ``count`` records from ``off``: the offset after them, and whether OPT was among
    them. Checks names and lengths, and where OPT and TSIG may stand; record data is
    not looked at."""
    end = len(data)
    edns = False
    for i in range(count):
        _, off = read_name(data, off)
        if off + 10 > end:
            raise DnsError("dns.record_truncated")
        rtype, _, _, rdlen = _RR_FIXED.unpack_from(data, off)
        off += 10 + rdlen
        if off > end:
            raise DnsError("dns.record_truncated")
        if rtype == TYPE_OPT:
            if not additional or edns:
                raise DnsError("dns.bad_opt")
            edns = True
        elif rtype == TYPE_TSIG and (not additional or i != count - 1):
            raise DnsError("dns.bad_tsig")
    return off, edns


def parse_query(data: bytes) -> Query:
    """Check a whole DNS message and return its header and questions; DnsError if malformed.

    Any opcode parses (the caller decides what it implements); a message with the QR bit is
    parsed too, the caller having dropped responses before.
    """
    if len(data) < DNS_HLEN:
        raise DnsError("dns.short")
    ident, flags, qdcount, ancount, nscount, arcount = _HDR.unpack_from(data, 0)
    end = len(data)
    off = DNS_HLEN
    questions = []
    for _ in range(qdcount):
        name, off = read_name(data, off)
        if off + 4 > end:
            raise DnsError("dns.question_truncated")
        qtype, qclass = _TYPE_CLASS.unpack_from(data, off)
        off += 4
        questions.append(Question(name, qtype, qclass))
    question_end = off
    edns = False
    if ancount or nscount or arcount:
        off = _skip_records(data, off, ancount, False)[0]
        off = _skip_records(data, off, nscount, False)[0]
        off, edns = _skip_records(data, off, arcount, True)
    if off != end:
        raise DnsError("dns.trailing_junk")
    return Query(ident, flags, tuple(questions), question_end, edns)


def header_only(ident: int, query_flags: int, rcode: int) -> bytes:
    """A bare answer header: the query's id, opcode and RD, RA set, ``rcode``, no sections."""
    flags = QR | (query_flags & (OPCODE_MASK | RD)) | RA | (rcode & RCODE_MASK)
    return _HDR.pack(ident, flags, 0, 0, 0, 0)


def build_response(
    query: Query,
    rcode: int,
    *,
    aa: bool = False,
    answer: tuple[int, int, bytes] | None = None,
) -> bytes:
    """An answer to ``query``: its id, opcode and RD, RA set, its questions echoed (names as the
    guest wrote them, uncompressed), ``answer`` = (type, TTL, data) as one record for the first
    question's name, and an OPT record when the query had EDNS."""
    flags = QR | (query.flags & (OPCODE_MASK | RD)) | RA | (rcode & RCODE_MASK)
    if aa:
        flags |= AA
    parts: list[bytes] = [
        _HDR.pack(
            query.ident,
            flags,
            len(query.questions),
            0 if answer is None else 1,
            0,
            1 if query.edns else 0,
        )
    ]
    for q in query.questions:
        parts.append(q.name)
        parts.append(_TYPE_CLASS.pack(q.qtype, q.qclass))
    if answer is not None:
        rtype, ttl, rdata = answer
        # The owner is the first question's name, right after the header: a pointer to 12.
        parts.append(b"\xc0\x0c" + _RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata)
    if query.edns:
        parts.append(_OPT_RR)
    return b"".join(parts)


def encode_name(text: str) -> bytes:
    """A dotted name in wire form (ASCII labels, no escapes); ValueError if it cannot be one."""
    labels = [label for label in text.rstrip(".").split(".") if label] if text != "." else []
    out = b"".join(bytes([len(b)]) + b for b in (label.encode("ascii") for label in labels))
    if any(len(label) > 63 for label in labels) or len(out) + 1 > MAX_NAME_LEN:
        raise ValueError(f"not a DNS name: {text!r}")
    return out + b"\x00"


def is_subdomain(name: bytes, zone: bytes) -> bool:
    """True if wire name ``name`` is ``zone`` or below it (both lowered, uncompressed)."""
    cut = len(name) - len(zone)
    if cut < 0 or not name.endswith(zone):
        return False
    off = 0
    while off < cut:  # the suffix must start on a label boundary
        off += name[off] + 1
    return off == cut
