"""DnsService: the guest's resolver at the DNS address (and the gateway), sans-I/O.

Theory of operation
-------------------
Queries to UDP port 53 on ``config.dns_ip`` or ``config.gateway`` arrive in :meth:`handle_udp`.
Each is checked by :func:`guestnet.wire.dns.parse_query` (a query that does not parse gets
FORMERR when its 12-byte header is there to answer, else a counted drop), then either answered
here or forwarded:

- **Built-in names** (:data:`BUILTIN_NAMES`, any case): an A query gets the gateway address,
  an AAAA query the IPv6 gateway address (with IPv6 on), any other type gets NOERROR with no
  records (NODATA). Other names inside our own zone
  (:data:`LOCAL_ZONE`) get NXDOMAIN here, so no query for them leaves the host.
- **Everything else** goes to the upstream resolvers (``/etc/resolv.conf`` or
  ``--dns-upstream``; the I/O driver chooses the list). The core does not send: it appends
  :class:`UpstreamQuery` actions ("send these bytes to upstream *i*") to :attr:`outbox`, which the
  driver drains after every call. The query leaves as the guest wrote it except for its id: a
  fresh random id, unique among the outstanding queries. The guest's own ids are not unique
  across guests and ports, and a guessable id would let anyone who can reach the host socket
  forge answers.

An answer from upstream *i* is matched on its id, on *i* being an upstream this query was sent
to, and on its question (name compared case-insensitively, type and class exactly); anything
else is counted (``dns.upstream.unmatched``) and dropped. A matched answer goes to the guest
unchanged except that its id is restored, so a truncated answer keeps TC and the guest retries
over TCP. An answer too large for the guest link is cut to header and question with TC set.

Failover: every forwarded query has a deadline (:data:`UPSTREAM_TIMEOUT_S` per upstream). When
it passes, or the driver reports the upstream refused (ICMP port unreachable shows up as
ECONNREFUSED on a connected UDP socket) or could not be reached, the query moves to the next
upstream it has not tried; when none is left the guest gets SERVFAIL. So a query is answered
within ``len(upstreams) * UPSTREAM_TIMEOUT_S``. An upstream that failed is skipped by new queries
for :data:`DOWN_HOLD_S` while another is believed up. An upstream REFUSED answer also moves on
to the next upstream when there is one; other answers (SERVFAIL, NXDOMAIN) are the guest's.

Limits: at most :data:`MAX_PENDING` forwarded queries wait at once, and at most
:data:`MAX_PENDING_PER_GUEST` of one guest address (so one guest's storm cannot take the others'
share); beyond either the guest gets SERVFAIL (``dns.pending.full``,
``dns.pending.guest_full``). Each query goes to one upstream at a time, so the upstreams never
see more queries than the guests sent, times the number of upstreams at worst (no
amplification). A guest retransmitting a query still outstanding (same address,
port, id and question) is not forwarded twice (``dns.query.duplicate``).

Cost. A plain query (one question, no records but an OPT: what resolvers send) is read by
:func:`guestnet.wire.native.dns_question` (C) in one call: its id and its question lowered, the
key answers are matched on; no :class:`~guestnet.wire.dns.Query` is built (a SERVFAIL parses
the query again when it needs one). Other queries go through :func:`~guestnet.wire.dns.parse_query`
(header and question parsed, names, counts and record bounds checked, record data skipped by
length). Either way the guest's bytes leave for the upstream with two bytes of id changed, and
the upstream's answer is copied into the guest's frame as it came, its id restored: nothing is
decoded or re-encoded. A plain IPv4 (IPv6) query from a known guest reaches
:meth:`DnsService.handle_fast` (``handle_fast6``) from the classifier's fast path with its
fields already parsed (no :class:`~guestnet.core.packet.IpPacket` built). Bad input raises
:class:`~guestnet.wire.dns.DnsError`, which never leaves this module.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from guestnet.config import Config
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.dns import (
    CLASS_IN,
    DNS_HLEN,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPCODE_QUERY,
    QR,
    REFUSED,
    SERVFAIL,
    TC,
    TYPE_A,
    TYPE_AAAA,
    DnsError,
    Query,
    build_response,
    encode_name,
    header_only,
    is_subdomain,
    parse_query,
)
from guestnet.wire.l3 import IPV4, IPV6, L3Family
from guestnet.wire.native import build_udp_frame as _build_udp_frame
from guestnet.wire.native import dns_question
from guestnet.wire.udp import DNS_PORT, UDP_HLEN

#: How long one upstream has to answer before the query moves to the next one.
UPSTREAM_TIMEOUT_S = 2.0
#: How long an upstream that timed out or refused is skipped by new queries.
DOWN_HOLD_S = 30.0
#: Most forwarded queries outstanding at once.
MAX_PENDING = 1024
#: Forwarded queries of one guest address waiting at once.
MAX_PENDING_PER_GUEST = 256
#: Upstream query ids drawn from the kernel per ``getrandom`` call.
ID_BATCH = 512
#: TTL of built-in answers.
BUILTIN_TTL = 60
#: Names that stand for the host (the gateway address), as other backends name it.
BUILTIN_NAMES = (
    "host.guestnet.internal",
    "gateway.guestnet.internal",
    "host.containers.internal",
    "host.docker.internal",
)
#: Our own zone: names in it that are not built in do not exist.
LOCAL_ZONE = "guestnet.internal"

#: Who asked a query: the guest's port, the IP version, the guest's MAC and address, and the
#: address it asked (the DNS or gateway address, the answer's source).
Asker = tuple[Port, L3Family, bytes, bytes, bytes]

_HDR = struct.Struct("!HHH")
_ID = struct.Struct("!H")
#: Builds a NamedTuple from all its fields without its keyword-capable ``__new__``.
_new = tuple.__new__


class _Bits(Protocol):
    def getrandbits(self, k: int, /) -> int: ...


class UrandomIds:
    """Upstream query ids from the kernel's CSPRNG, drawn :data:`ID_BATCH` at a time.

    ``random.SystemRandom`` makes one ``getrandom`` system call per id, which was one of the
    nine system calls of a forwarded query; these ids are as unpredictable, for one call per
    :data:`ID_BATCH` queries.
    """

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        #: The batch's ids not yet taken (16-bit words of the kernel's bytes; the byte order
        #: does not matter for random bits).
        self._ids: list[int] = []

    def getrandbits(self, k: int, /) -> int:
        """``k`` (at most 16) random bits."""
        assert 0 < k <= 16
        ids = self._ids
        if not ids:
            ids = self._ids = memoryview(os.urandom(2 * ID_BATCH)).cast("H").tolist()
        return ids.pop() >> (16 - k)


class UpstreamQuery(NamedTuple):
    """An action for the driver: send ``data`` to ``upstreams[upstream]``."""

    upstream: int
    data: bytes


@dataclass(slots=True)
class _Pending:
    """One forwarded query waiting for its answer."""

    port: Port
    #: The IP version the query came over; the answer goes back over the same.
    family: L3Family
    guest_mac: bytes
    guest_ip: bytes
    #: The address the guest asked (DNS address or gateway): the answer's source.
    asked_ip: bytes
    sport: int
    client_id: int
    upstream_id: int
    #: The query as it leaves: the guest's bytes with our id (parsed again for the SERVFAIL
    #: answer when every upstream failed).
    wire: bytes
    #: Question as it must come back: name (uncompressed, lower case), type, class.
    question: bytes
    name_len: int
    #: Upstream the query was last sent to, and a bit per upstream it was ever sent to.
    upstream: int
    tried: int
    #: Bumped at every send; a timeout entry in the heap counts only if its seq matches.
    seq: int
    deadline: float


class DnsService:
    """Answers and forwards the guests' DNS queries over UDP."""

    def __init__(
        self,
        config: Config,
        pool: FramePool,
        counters: Counters,
        upstreams: Sequence[tuple[str, int]],
        *,
        timeout_s: float = UPSTREAM_TIMEOUT_S,
        max_pending: int = MAX_PENDING,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        #: Upstream resolvers as (address, port); actions name them by index.
        self.upstreams = tuple(upstreams)
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._rng: _Bits = rng if rng is not None else UrandomIds()
        #: Queries for the driver to send, in order; the driver empties it.
        self.outbox: list[UpstreamQuery] = []
        self._by_id: dict[int, _Pending] = {}
        self._by_client: dict[tuple[bytes, int, int, bytes], int] = {}
        #: Outstanding queries per guest address (entries removed at zero).
        self._per_guest: dict[bytes, int] = {}
        self._timeouts: list[tuple[float, int, int]] = []
        self._seq = itertools.count()
        self._down_until = [0.0] * len(self.upstreams)
        #: Built-in names (wire form, lower case) -> record type -> address bytes.
        gateway = {TYPE_A: config.gateway.packed}
        if config.ipv6:
            gateway[TYPE_AAAA] = config.gateway6.packed
        self._builtin = {encode_name(n): gateway for n in BUILTIN_NAMES}
        self._zone = encode_name(LOCAL_ZONE)
        self._mtu = config.mtu
        self._our_mac = config.mac

    # -- queries from the guest -------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """Forwarded queries waiting for an answer."""
        return len(self._by_id)

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """Handle one query from a guest (UDP to port 53 on the DNS or gateway address)."""
        self.handle_query((pkt.port, pkt.family, pkt.src_mac, pkt.src, pkt.dst), sport, payload,
                          now)  # fmt: skip

    def handle_fast(
        self,
        port: Port,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        payload: memoryview,
        now: float,
    ) -> bool:
        """A query over IPv4 from the classifier's fast path (a plain datagram from the port's
        guest at its MAC, to port 53 of the DNS or gateway address): what :meth:`handle_udp`
        does, without the packet object. Declined (False) for the datagrams of a super-frame,
        which go one by one the ordinary way."""
        mac = port.guest_mac
        if mac is None or port.rx_gso_size:
            return False
        self._fast((port, IPV4, mac, src, dst), sport, payload, now)
        return True

    def handle_fast6(
        self,
        port: Port,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        payload: memoryview,
        now: float,
    ) -> bool:
        """:meth:`handle_fast` for a query over IPv6 (port 53 of the IPv6 DNS or gateway
        address; the classifier's ``udp_fast6``)."""
        mac = port.guest_mac
        if mac is None or port.rx_gso_size:
            return False
        self._fast((port, IPV6, mac, src, dst), sport, payload, now)
        return True

    def _fast(self, pkt: Asker, sport: int, payload: memoryview, now: float) -> None:
        """:meth:`handle_query`, its first step here for the common case (a call less)."""
        plain = dns_question(payload)
        if plain is None:
            self._parse_and_handle(pkt, sport, payload, now)
            return
        ident, question, name_len = plain
        name = question[:name_len]
        if name in self._builtin or is_subdomain(name, self._zone):
            self._parse_and_handle(pkt, sport, payload, now)
        else:
            self._forward(pkt, sport, ident, question, name_len, payload, now)

    def handle_query(self, pkt: Asker, sport: int, payload: memoryview, now: float) -> None:
        """Handle one query from ``pkt``'s guest, port ``sport``: what :meth:`handle_udp` does,
        for the classifier's fast path too, which has the fields but no :class:`IpPacket`."""
        plain = dns_question(payload)
        if plain is not None:
            # A plain query (one question, at most an OPT record: what resolvers send) is
            # well formed for parse_query too; unless it is ours, it is forwarded as it is.
            ident, question, name_len = plain
            name = question[:name_len]
            if name not in self._builtin and not is_subdomain(name, self._zone):
                self._forward(pkt, sport, ident, question, name_len, payload, now)
                return
        self._parse_and_handle(pkt, sport, payload, now)

    def _parse_and_handle(self, pkt: Asker, sport: int, payload: memoryview, now: float) -> None:
        """A query that is not plain, or that is ours to answer: parsed whole, then refused,
        answered or forwarded."""
        counters = self.counters
        if len(payload) < DNS_HLEN:
            counters.inc("dns.query.short")
            return
        client_id, flags = _HDR.unpack_from(payload, 0)[:2]
        if flags & QR:
            counters.inc("dns.query.is_response")
            return
        wire = bytes(payload)
        try:
            query = parse_query(wire)
        except DnsError:
            counters.inc("dns.query.malformed")
            self._reply(pkt, sport, header_only(client_id, flags, FORMERR))
            return
        if query.opcode != OPCODE_QUERY:
            counters.inc("dns.query.not_implemented")
            self._reply(pkt, sport, self._response(query, NOTIMP))
            return
        if len(query.questions) != 1:
            counters.inc("dns.query.question_count")
            self._reply(pkt, sport, self._response(query, FORMERR))
            return
        name = query.questions[0].name.lower()
        if name in self._builtin or is_subdomain(name, self._zone):
            self._answer_builtin(pkt, sport, query, name)
            return
        # The question as it must come back: the name lowered, then type and class as sent.
        question = name + wire[query.question_end - 4 : query.question_end]
        self._forward(pkt, sport, query.ident, question, len(name), wire, now)

    def _answer_builtin(self, pkt: Asker, sport: int, query: Query, name: bytes) -> None:
        q = query.questions[0]
        by_type = self._builtin.get(name)
        if by_type is None:
            self.counters.inc("dns.builtin.nxdomain")
            self._reply(pkt, sport, self._response(query, NXDOMAIN, aa=True))
            return
        answer = None
        rdata = by_type.get(q.qtype) if q.qclass == CLASS_IN else None
        if rdata is not None:
            self.counters.inc("dns.builtin.answer")
            answer = (q.qtype, BUILTIN_TTL, rdata)
        else:
            self.counters.inc("dns.builtin.nodata")
        self._reply(pkt, sport, self._response(query, NOERROR, aa=True, answer=answer))

    def _forward(
        self,
        pkt: Asker,
        sport: int,
        ident: int,
        question: bytes,
        name_len: int,
        payload: memoryview | bytes,
        now: float,
    ) -> None:
        """Send a well-formed query with one question upstream under a fresh id (or answer
        SERVFAIL, or drop a duplicate). ``question``: the name lowered, type and class."""
        counters = self.counters
        port, family, src_mac, src, dst = pkt
        key = (src, sport, ident, question)
        if key in self._by_client:
            counters.inc("dns.query.duplicate")
            return
        if not self.upstreams:
            counters.inc("dns.upstream.none")
            self._servfail(pkt, sport, payload)
            return
        if len(self._by_id) >= self.max_pending:
            counters.inc("dns.pending.full")
            self._servfail(pkt, sport, payload)
            return
        per_guest = self._per_guest
        mine = per_guest.get(src, 0)
        if mine >= MAX_PENDING_PER_GUEST:
            counters.inc("dns.pending.guest_full")
            self._servfail(pkt, sport, payload)
            return
        per_guest[src] = mine + 1
        by_id = self._by_id
        uid = self._rng.getrandbits(16)
        if uid in by_id:
            uid = self._fresh_id()
        first = 0 if self._down_until[0] <= now else self._first_upstream(now)
        wire = _ID.pack(uid) + payload[2:]
        # Positional: the dataclass's __init__ binds them faster than keywords (per query).
        # Fields: port, family, guest_mac, guest_ip, asked_ip, sport, client_id, upstream_id,
        # wire, question, name_len, upstream, tried, seq, deadline.
        pending = _Pending(
            port, family, src_mac, src, dst, sport, ident, uid, wire, question, name_len,
            first, 0, 0, 0.0,
        )  # fmt: skip
        by_id[uid] = pending
        self._by_client[key] = uid
        counters.inc("dns.query.forwarded")
        self._send(pending, first, now)

    def _servfail(self, pkt: Asker, sport: int, payload: memoryview | bytes) -> None:
        """Answer a well-formed query SERVFAIL (no upstream, or no room to wait for one)."""
        self._reply(pkt, sport, self._response(parse_query(bytes(payload)), SERVFAIL))

    def _fresh_id(self) -> int:
        """A random 16-bit id no outstanding query uses (the table is at most 1/64 full)."""
        by_id = self._by_id
        for _ in range(64):
            uid = self._rng.getrandbits(16)
            if uid not in by_id:
                return uid
        return next(i for i in range(65536) if i not in by_id)  # pragma: no cover

    def preferred_upstream(self, now: float) -> tuple[str, int] | None:
        """The upstream a new query would go to first (for the DNS-over-TCP relay), or None."""
        if not self.upstreams:
            return None
        return self.upstreams[self._first_upstream(now)]

    def tcp_upstream_failed(self, upstream: tuple[str, int], now: float) -> None:
        """The DNS-over-TCP relay could not reach ``upstream``: hold it down as a UDP failure
        would, so :meth:`preferred_upstream` (UDP's first choice too) moves past it."""
        if upstream in self.upstreams:
            self.counters.inc("dns.tcp.upstream_failed")
            self._hold_down(self.upstreams.index(upstream), now)

    def _first_upstream(self, now: float) -> int:
        """The first upstream not held down; if all are, the one whose hold ends first."""
        down = self._down_until
        for i, until in enumerate(down):
            if until <= now:
                return i
        return min(range(len(down)), key=down.__getitem__)

    def _send(self, pending: _Pending, upstream: int, now: float) -> None:
        pending.upstream = upstream
        pending.tried |= 1 << upstream
        pending.seq = seq = next(self._seq)
        pending.deadline = deadline = now + self.timeout_s
        heapq.heappush(self._timeouts, (deadline, seq, pending.upstream_id))
        self.outbox.append(_new(UpstreamQuery, (upstream, pending.wire)))

    # -- answers and failures from upstream ---------------------------------------------------

    def handle_upstream_answer(self, upstream: int, data: memoryview | bytes, now: float) -> None:
        """Handle one datagram the driver received from ``upstreams[upstream]``."""
        counters = self.counters
        if len(data) < DNS_HLEN:
            counters.inc("dns.upstream.unmatched")
            return
        uid, flags, qdcount = _HDR.unpack_from(data, 0)
        pending = self._by_id.get(uid)
        if pending is None or not flags & QR or not (pending.tried >> upstream) & 1:
            counters.inc("dns.upstream.unmatched")
            return
        rcode = flags & 0x000F
        if qdcount == 1:
            n = pending.name_len
            end = DNS_HLEN + len(pending.question)
            if (
                bytes(data[DNS_HLEN : DNS_HLEN + n]).lower() != pending.question[:n]
                or data[DNS_HLEN + n : end] != pending.question[n:]
            ):
                counters.inc("dns.upstream.unmatched")
                return
        elif qdcount != 0 or rcode == NOERROR:
            # Only an error answer may leave the question out (some servers do for FORMERR).
            counters.inc("dns.upstream.unmatched")
            return
        if rcode == REFUSED and self._next_untried(pending) is not None:
            self._fail_over(pending, now, "dns.upstream.refused_answer")
            return
        # The answer leaves first (the guest is waiting for it), the bookkeeping after.
        self._send_to_guest(pending, data, pending.client_id, len(pending.question))
        self._finish(pending)
        counters.inc("dns.answer.forwarded")

    def handle_upstream_failed(self, upstream: int, now: float, reason: str) -> None:
        """The driver could not reach ``upstreams[upstream]`` (refused, unreachable, no socket).

        Every query now waiting on it moves to its next upstream at once.
        """
        self.counters.inc(reason)
        waiting = [p for p in self._by_id.values() if p.upstream == upstream]
        self._hold_down(upstream, now)
        for pending in waiting:
            self._fail_over(pending, now, "dns.failover.error")

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` must next run, or None when nothing waits."""
        heap = self._timeouts
        while heap:
            _, seq, uid = heap[0]
            pending = self._by_id.get(uid)
            if pending is not None and pending.seq == seq:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def handle_timeout(self, now: float) -> None:
        """Move every query whose upstream has been silent too long to its next upstream."""
        heap = self._timeouts
        while heap and heap[0][0] <= now:
            _, seq, uid = heapq.heappop(heap)
            pending = self._by_id.get(uid)
            if pending is None or pending.seq != seq:
                continue
            self.counters.inc("dns.upstream.timeout")
            self._hold_down(pending.upstream, now)
            self._fail_over(pending, now, "dns.failover.timeout")

    def _hold_down(self, upstream: int, now: float) -> None:
        self._down_until[upstream] = now + DOWN_HOLD_S

    def _next_untried(self, pending: _Pending) -> int | None:
        n = len(self.upstreams)
        for step in range(1, n):
            i = (pending.upstream + step) % n
            if not (pending.tried >> i) & 1:
                return i
        return None

    def _fail_over(self, pending: _Pending, now: float, reason: str) -> None:
        nxt = self._next_untried(pending)
        if nxt is not None:
            self.counters.inc(reason)
            self._send(pending, nxt, now)
            return
        self._finish(pending)
        self.counters.inc("dns.answer.servfail")
        query = parse_query(pending.wire)._replace(ident=pending.client_id)
        self._send_to_guest(pending, self._response(query, SERVFAIL), None, 0)

    def _finish(self, pending: _Pending) -> None:
        del self._by_id[pending.upstream_id]
        left = self._per_guest.get(pending.guest_ip, 1) - 1
        if left > 0:
            self._per_guest[pending.guest_ip] = left
        else:
            self._per_guest.pop(pending.guest_ip, None)
        key = (pending.guest_ip, pending.sport, pending.client_id, pending.question)
        self._by_client.pop(key, None)

    # -- answers to the guest ------------------------------------------------------------------

    def _response(
        self,
        query: Query,
        rcode: int,
        aa: bool = False,
        answer: tuple[int, int, bytes] | None = None,
    ) -> bytes:
        """An answer to ``query``, questions and EDNS echoed (unsigned: a TSIG in the query is
        checked for its place, not its key, as the forwarded queries' upstream does the rest)."""
        return build_response(query, rcode, aa=aa, answer=answer)

    def _reply(self, pkt: Asker, sport: int, wire: bytes) -> None:
        port, family, src_mac, src, dst = pkt
        self._emit(port, family, src_mac, src, dst, sport, wire, None, 0)

    def _send_to_guest(
        self, pending: _Pending, data: memoryview | bytes, client_id: int | None, qlen: int
    ) -> None:
        self._emit(
            pending.port,
            pending.family,
            pending.guest_mac,
            pending.guest_ip,
            pending.asked_ip,
            pending.sport,
            data,
            client_id,
            qlen,
        )

    def _emit(
        self,
        port: Port,
        family: L3Family,
        guest_mac: bytes,
        guest_ip: bytes,
        our_ip: bytes,
        sport: int,
        data: memoryview | bytes,
        client_id: int | None,
        qlen: int,
    ) -> None:
        """Write ``data`` as a UDP datagram to the guest, its id set to ``client_id`` if given.

        A message too large for the link is cut to its header and first ``qlen`` bytes of
        question, counts fixed and TC set, so the guest asks again over TCP.
        """
        n = len(data)
        frame = self.pool.acquire()
        buf = frame.view
        start = frame.start
        off = start + family.udp_payload_off
        if family.header_len + UDP_HLEN + n > self._mtu:
            self.counters.inc("dns.answer.truncated_for_mtu")
            n = DNS_HLEN + qlen
            buf[off : off + n] = data[:n]
            flags = ((buf[off + 2] << 8) | buf[off + 3]) | TC
            struct.pack_into("!HHHHH", buf, off + 2, flags, 1 if qlen else 0, 0, 0, 0)
        else:
            buf[off : off + n] = data
        if client_id is not None:
            _ID.pack_into(buf, off, client_id)
        frame.length = _build_udp_frame(
            buf, start, family.version, guest_mac, self._our_mac, our_ip, guest_ip, DNS_PORT,
            sport, n, 0, True,
        )  # fmt: skip
        port.send(frame)
