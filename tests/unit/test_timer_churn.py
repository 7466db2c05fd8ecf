"""Issue 9 (e): closed TCP flows must not stay in memory behind cancelled timers.

A whole :class:`Instance` on loopback sockets (no root), as in test_tcp_forward.py: the real TCP
NAT, its driver and the loop's real timer heap. A hand-played guest opens short connections to
the gateway (the host's 127.0.0.1), in batches, each as a real client would: handshake, a
request, the delayed ACK for it (which re-arms the flow's timer at the 2 h idle deadline), the
server's answer-less close, FIN both ways. Every close cancels the flow's armed timer; before
the fix the cancelled entry stayed in the heap until its deadline, holding its callback and,
through it, the whole flow.

The loop runs on a scripted clock (the sockets are real): each turn moves it 2 ms, so delayed
ACKs go out on the next turn, and after each batch it jumps past the reap delay, so the closed
flows of the batch are reaped before the next one and the numbers compared below are taken in
the same state. The idle deadlines (two hours) are never reached.

What is asserted: the heap never holds more than a small multiple of the live timers; no
:class:`TcpFlow` outlives its reap; and the process's RSS (``VmRSS`` in /proc/self/status) after
20,000 connections stays within a few MB of its level after the first 1,000. Every wait is
bounded in loop turns.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.port import Port
from guestnet.core.tcp import REAP_DELAY_S, TcpFlow
from guestnet.io.loop import Loop
from guestnet.wire.tcp import ACK, FIN, PSH, SYN

from .test_tcp_forward import Guest

CONNECTIONS = 20_000
BATCH = 200
WARMUP = 1_000
#: Scripted time per loop turn (more than DELACK_S).
TURN_S = 0.002
#: Most loop turns one phase of a batch may take before the test gives up.
MAX_TURNS = 400
#: Heap entries allowed per live timer, plus a floor for small heaps.
HEAP_FACTOR = 2
HEAP_FLOOR = 64
#: RSS growth allowed between the first 1,000 connections and the end.
RSS_SLACK_KB = 4 * 1024
GISN = 1_000


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _flows_alive(port: Port) -> int:
    """TcpFlow objects of ``port`` still in memory (other tests may have left their own)."""
    return sum(1 for o in gc.get_objects() if type(o) is TcpFlow and o.port is port)


class Clock:
    """The loop's scripted clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Churn:
    """Drives batches of short guest connections to a loopback server through ``inst``."""

    def __init__(self, inst: Instance, clock: Clock, frames: Any) -> None:
        self.inst = inst
        self.clock = clock
        self.guest = Guest(inst, frames)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1024)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.next_sport = 10_000
        self.max_ratio = 0.0
        self.max_heap = 0

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.accepted.append(conn)

    def _turn(self) -> None:
        self.clock.now += TURN_S
        self.inst.loop.run_once(0.002)
        self._accept()
        timers = self.inst.loop.timers
        live = len(timers)
        entries = timers.entries()
        self.max_heap = max(self.max_heap, entries)
        if entries > HEAP_FLOOR:
            self.max_ratio = max(self.max_ratio, entries / max(live, 1))

    def _collect(self, want: int, sports: set[int], what: str) -> dict[int, Any]:
        """Turn the loop until a segment with ``want`` flags came for each of ``sports``."""
        got: dict[int, Any] = {}
        for _ in range(MAX_TURNS):
            for seg, _payload in self.guest.segs():
                if seg.dport in sports and seg.flags & want == want and seg.dport not in got:
                    got[seg.dport] = seg
            if len(got) == len(sports):
                return got
            self._turn()
        raise AssertionError(f"{what}: {len(got)} of {len(sports)} after {MAX_TURNS} turns")

    def batch(self, n: int) -> None:
        """``n`` connections from open to closed (the flows linger for their reap after)."""
        guest = self.guest
        sports = set(range(self.next_sport, self.next_sport + n))
        self.next_sport += n
        if self.next_sport > 60_000:
            self.next_sport = 10_000
        for sp in sports:
            guest.send(sp, self.port, GISN, 0, SYN)
        synacks = self._collect(SYN | ACK, sports, "SYN-ACKs")
        for sp in sports:
            guest.send(sp, self.port, GISN + 1, synacks[sp].seq + 1, ACK | PSH, b"x")
        # The ACK of the request is held for an answer (DELACK_S), then sent bare: the flow's
        # timer is re-armed at its idle deadline, two hours away.
        self._collect(ACK, sports, "delayed ACKs")
        for _ in range(MAX_TURNS):
            if len(self.accepted) >= n:
                break
            self._turn()
        assert len(self.accepted) >= n, "the server did not see every connection"
        for conn in self.accepted:
            conn.recv(16)
            conn.close()
        self.accepted.clear()
        fins = self._collect(FIN | ACK, sports, "FINs from the host")
        for sp in sports:
            fin = fins[sp]
            guest.send(sp, self.port, GISN + 2, fin.seq + 1, FIN | ACK)
        self._turn()
        guest.segs()
        # Past the reap delay: the batch's flows leave the table.
        self.clock.now += REAP_DELAY_S + 0.1
        self._turn()
        assert len(self.inst.tcp_nat.nat.table) == 0, "flows left after their reap"


@pytest.fixture
def churn(frames: Any) -> Iterator[Churn]:
    clock = Clock()
    inst = Instance(Config(), loop=Loop(clock=clock))
    ch = Churn(inst, clock, frames)
    try:
        yield ch
    finally:
        ch.close()
        inst.close()


def test_connection_churn_keeps_timer_heap_and_memory_bounded(churn: Churn) -> None:
    inst = churn.inst
    done = 0
    rss_after_warmup = 0
    while done < CONNECTIONS:
        churn.batch(BATCH)
        done += BATCH
        if done == WARMUP:
            gc.collect()
            rss_after_warmup = _rss_kb()
    closed = inst.counters["tcp.flow.closed"]
    assert closed == CONNECTIONS, inst.counters.snapshot()
    timers = inst.loop.timers
    # Cancelled entries never outnumbered the live timers by more than the factor allows.
    assert churn.max_ratio <= HEAP_FACTOR, (churn.max_ratio, churn.max_heap)
    assert timers.entries() <= HEAP_FACTOR * len(timers) + HEAP_FLOOR
    # Every flow was reaped, and nothing keeps one alive (a cancelled timer's callback did).
    gc.collect()
    assert _flows_alive(churn.guest.port) == 0
    rss_end = _rss_kb()
    assert rss_end - rss_after_warmup <= RSS_SLACK_KB, (rss_after_warmup, rss_end)
