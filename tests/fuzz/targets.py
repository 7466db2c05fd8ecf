"""Byte-level fuzz targets: one input (bytes) in, no exception out but the ones the code promises.

The same functions serve the coverage-guided fuzzer (``bench/fuzz.py``, atheris/libFuzzer, which
mutates inputs toward new branches) and the corpus replay in CI (``test_corpus.py``, which runs
every kept input and every past crash again). The hypothesis fuzz beside them draws structured
scripts; these targets take raw bytes so libFuzzer's mutations reach every field.

Targets:

- ``wire``: the first byte picks a parser (:data:`PARSERS`), the rest is its input. A parser may
  refuse bytes only with :class:`~guestnet.wire.WireError`; anything else is a finding.
- ``services``: every service behind the classifier, as ``Instance`` wires them, with recording
  fakes for the host side (the ``Rig`` of test_fuzz_services.py, so no socket is ever opened).
  The input is a script (:func:`run_services`): a flags byte, then steps — a guest frame
  (untrusted, trusted, or re-checksummed), a clock advance, or a host event (TCP connect result,
  host data / EOF / reset, writable room, a UDP reply or ICMP error, an echo reply, a DNS answer
  or upstream failure). After every step the Rig's invariants hold (counters only grow, every
  frame toward the guest is well formed, the fakes were asked only plausible things) and at the
  end every flow closes and no pooled frame is left checked out.

Corpus inputs for ``services`` made from captures (``bench/fuzz.py seed``) are scripts whose
steps are the guest's frames of one capture, in order, with flag :data:`AUTO_CONNECT` set so the
host accepts every TCP connect, as it did when the capture was taken.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Callable
from typing import Any

from conftest import CoreHarness, FrameBuilders

from guestnet.wire import WireError
from guestnet.wire.arp import parse_arp
from guestnet.wire.dhcp import parse_dhcp
from guestnet.wire.dhcpv6 import parse_dhcpv6
from guestnet.wire.ethernet import parse_ethernet
from guestnet.wire.icmp import ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, parse_icmp
from guestnet.wire.icmpv6 import parse_icmpv6, parse_ndp_options
from guestnet.wire.ipv4 import parse_ipv4
from guestnet.wire.ipv6 import parse_ipv6
from guestnet.wire.tcp import parse_tcp, parse_tcp_options
from guestnet.wire.udp import parse_udp

from .test_fuzz_services import OTHER_HOST, FakeTcpSock, Rig, fix_checksums

# -- wire ----------------------------------------------------------------------------------------

_SRC6 = bytes.fromhex("fe80000000000000505400fffe123456")
_DST6 = bytes.fromhex("ff020000000000000000000000000002")


def _tcp_with_options(data: memoryview) -> object:
    header = parse_tcp(data)
    return parse_tcp_options(data, header.header_len)


#: The wire parsers, each taking the bytes after the selector byte.
PARSERS: tuple[Callable[[memoryview], object], ...] = (
    parse_ethernet,
    parse_arp,
    parse_ipv4,
    lambda d: parse_ipv4(d, verify=False),
    parse_ipv6,
    parse_tcp,
    _tcp_with_options,
    parse_udp,
    parse_icmp,
    lambda d: parse_icmp(d, verify=False),
    lambda d: parse_icmpv6(d, _SRC6, _DST6),
    lambda d: parse_icmpv6(d, _SRC6, _DST6, verify=False),
    parse_ndp_options,
    parse_dhcp,
    parse_dhcpv6,
)


def wire(data: bytes) -> None:
    """One parser on one input; only WireError may come out."""
    if not data:
        return
    parser = PARSERS[data[0] % len(PARSERS)]
    with contextlib.suppress(WireError):
        parser(memoryview(data)[1:])


# -- services ------------------------------------------------------------------------------------

#: Flag bits of a script's first byte.
OFFLOAD = 0x01  # the guest port takes TCP super-frames with partial checksums (a TAP)
OPEN_FAILS = 0x02  # every host socket for UDP and echo fails to open (EMFILE)
CONNECT_FAILS = 0x04  # every host TCP connect fails at once (EMFILE)
AUTO_CONNECT = 0x08  # each new TCP connect succeeds right after the frame that caused it

#: Step kinds (a step's first byte modulo their number).
FRAME, FRAME_TRUSTED, FRAME_FIXED, ADVANCE = 0, 1, 2, 3
TCP_CONNECTED, TCP_READABLE, TCP_WRITABLE = 4, 5, 6
UDP_REPLY, UDP_ERROR, ECHO_REPLY, DNS_ANSWER, DNS_FAILED = 7, 8, 9, 10, 11
STEP_KINDS = 12

SECONDS = (0.0, 0.001, 0.25, 1.1, 2.5, 7.0, 31.0, 200.0, 7500.0)
MAX_STEPS = 64


class Reader:
    """Reads fields off the input; past its end every field reads as zero / empty."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return (self.u8() << 8) | self.u8()

    def blob(self) -> bytes:
        """A length-prefixed (u16) byte string."""
        n = self.u16()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def script(flags: int, steps: list[tuple[int, bytes]]) -> bytes:
    """A services input: the flags byte, then each step's kind and its (raw) fields."""
    return bytes([flags]) + b"".join(bytes([kind]) + body for kind, body in steps)


def frame_step(frame: bytes, kind: int = FRAME) -> tuple[int, bytes]:
    """A guest-frame step (its frame length-prefixed)."""
    return kind, struct.pack("!H", len(frame)) + frame


def _pick(items: list[Any], index: int) -> Any:
    return items[index % len(items)] if items else None


def _tcp_event(rig: Rig, kind: int, r: Reader) -> None:
    flow = _pick(list(rig.tcp.table), r.u8())
    if flow is None:
        return
    now = rig.now
    sock: FakeTcpSock | None = flow.io_data
    if kind == TCP_CONNECTED:
        err = (0, 0, errno.ECONNREFUSED, errno.ETIMEDOUT)[r.u8() % 4]
        rig.tcp.host_connected(flow, err, now)
    elif kind == TCP_READABLE and sock is not None:
        what, n = r.u8() % 3, r.u16() % 9000 + 1
        if what == 0:
            sock.readable += bytes([n & 0xFF]) * n
        elif what == 1:
            sock.eof = True
        else:
            sock.recv_error = OSError(errno.ECONNRESET, "fuzz")
        rig.tcp.host_readable(flow, now)
    elif kind == TCP_WRITABLE and sock is not None:
        how = r.u8()
        sock.accept = (None, 0, 3, 1000)[how % 4]
        sock.room = (0, 100, 1 << 16)[(how >> 2) % 3]
        sock.send_error = OSError(errno.EPIPE, "fuzz") if how & 0x80 else None
        rig.tcp.host_writable(flow, now)


def _udp_event(rig: Rig, kind: int, r: Reader) -> None:
    flows = list(rig.udp.flows.values())
    flow = _pick(flows, r.u8())
    if flow is None:
        return
    host = _pick([*flow.peers, OTHER_HOST], r.u8())
    if kind == UDP_ERROR:
        rig.udp.handle_host_error(flow, host, 9, ICMP_DEST_UNREACH, r.u8() % 16)
        return
    n = (0, 5, 1472, 1473, 3000)[r.u8() % 5]
    frame = rig.core.pool.acquire()
    off = frame.start + flow.family.udp_payload_off
    frame.view[off : off + n] = b"u" * n
    rig.udp.deliver_reply(flow, frame, n, host, r.u16(), rig.now)


def _echo_reply(rig: Rig, r: Reader) -> None:
    flow = _pick(list(rig.icmp.flows.values()), r.u8())
    if flow is None:
        return
    host = _pick([*flow.peers, OTHER_HOST], r.u8())
    n = (0, 4, 8, 64, 1480, 3000)[r.u8() % 6]
    frame = rig.core.pool.acquire()
    off = frame.start + flow.family.l4_off
    frame.view[off : off + n] = b"e" * n
    if n:
        frame.view[off] = (ICMP_ECHO_REPLY, 3, 8)[r.u8() % 3]
    rig.icmp.deliver_echo_reply(flow, frame, n, host)


def _dns_answer(rig: Rig, r: Reader) -> None:
    """An answer built on a query we forwarded (its ID and question), with fuzzed bytes after."""
    mode, tail = r.u8(), r.blob()
    sent = rig.upstream_log
    if sent and mode & 1:
        upstream, query = _pick(sent, mode >> 1)
        answer = bytearray(query[:12])
        answer[2] |= 0x80
        raw = bytes(answer) + tail
        if mode & 2:
            upstream = 1 - upstream
    else:
        raw, upstream = tail, mode % 2
    rig.dns.handle_upstream_answer(upstream, raw, rig.now)


def _auto_connect(rig: Rig, told: set[int]) -> None:
    for flow in list(rig.tcp.table):
        if id(flow) not in told and flow.io_data is not None:
            told.add(id(flow))
            rig.tcp.host_connected(flow, 0, rig.now)


def _step(rig: Rig, kind: int, r: Reader) -> None:
    if kind in (FRAME, FRAME_TRUSTED, FRAME_FIXED):
        frame = r.blob()
        if kind == FRAME_FIXED:
            frame = fix_checksums(frame)
        rig.feed(frame, trusted=kind == FRAME_TRUSTED)
    elif kind == ADVANCE:
        rig.advance(SECONDS[r.u8() % len(SECONDS)])
    elif kind in (TCP_CONNECTED, TCP_READABLE, TCP_WRITABLE):
        _tcp_event(rig, kind, r)
    elif kind in (UDP_REPLY, UDP_ERROR):
        _udp_event(rig, kind, r)
    elif kind == ECHO_REPLY:
        _echo_reply(rig, r)
    elif kind == DNS_ANSWER:
        _dns_answer(rig, r)
    else:
        rig.dns.handle_upstream_failed(r.u8() % 2, rig.now, "dns.upstream.refused")


def run_services(data: bytes) -> Rig:
    """Run one script through a fresh Rig; raises AssertionError when an invariant breaks."""
    r = Reader(data)
    flags = r.u8()
    rig = Rig(CoreHarness, open_fails=bool(flags & OPEN_FAILS), offload=bool(flags & OFFLOAD))
    rig.tcp_io.connect_error = errno.EMFILE if flags & CONNECT_FAILS else 0
    told: set[int] = set()
    steps = 0
    while r.more() and steps < MAX_STEPS:
        _step(rig, r.u8() % STEP_KINDS, r)
        if flags & AUTO_CONNECT:
            _auto_connect(rig, told)
        rig.after_event()
        rig.check()
        steps += 1
    rig.close()
    return rig


def services(data: bytes) -> None:
    """The ``services`` target (see the module docstring)."""
    run_services(data)


#: Every target by name, as bench/fuzz.py and test_corpus.py find them.
TARGETS: dict[str, Callable[[bytes], None]] = {"wire": wire, "services": services}

#: The guest's frame builders, for seeds written by hand.
FRAMES = FrameBuilders
