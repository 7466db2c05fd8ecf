"""Host data kept in the host socket instead of copied (issue 12, one copy fewer host->guest).

A bulk flow asks its driver to keep what it reads in the host socket (``MSG_PEEK`` at the
kernel's ``SO_PEEK_OFF``): the core then copies nothing into ``flow.unacked``, drops what the
guest acknowledges from the socket (``discard``) and reads a retransmission again from the
oldest unacknowledged byte (``reread``). :class:`PeekIo` models that socket exactly (a queue and
a peek offset); the last tests run the real driver's calls on a real loopback connection.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from guestnet.core.tcp import KEEP_MIN_FRAMES, RTO_INITIAL_S, TcpFlow
from guestnet.io.tcp_nat import TcpNatDriver, _HostSock
from guestnet.wire.tcp import ACK, FIN

from .test_tcp import ISN, OUR_ISS, FakeIo, FakeSock, Tcp


class PeekSock(FakeSock):
    """A FakeSock whose ``readable`` is the kernel's receive queue, with a peek offset."""

    def __init__(self) -> None:
        super().__init__()
        #: None: reads consume; else where the next (peeking) read starts.
        self.peek_off: int | None = None
        self.discarded = 0


class PeekIo(FakeIo):
    """A FakeIo whose sockets can keep data, recording every keep, discard and reread."""

    def __init__(self, can_keep: bool = True) -> None:
        super().__init__()
        self.can_keep = can_keep
        self.calls: list[tuple[str, int]] = []

    def connect(self, flow: TcpFlow) -> int:
        super().connect(flow)
        flow.io_data = PeekSock()
        return 0

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        s: PeekSock = flow.io_data
        if s.peek_off is None:
            return super().recv_into(flow, bufs)
        avail = s.readable[s.peek_off :]
        if not avail:
            return 0 if s.eof else -1
        total = 0
        for buf in bufs:
            n = min(len(buf), len(avail) - total)
            buf[:n] = avail[total : total + n]
            total += n
        s.peek_off += total
        return total

    def keep(self, flow: TcpFlow) -> bool:
        self.calls.append(("keep", 0))
        if not self.can_keep:
            return False
        flow.io_data.peek_off = 0
        return True

    def discard(self, flow: TcpFlow, nbytes: int) -> None:
        s: PeekSock = flow.io_data
        assert s.peek_off is not None and nbytes <= s.peek_off, "only what was read is dropped"
        self.calls.append(("discard", nbytes))
        del s.readable[:nbytes]
        s.peek_off -= nbytes
        s.discarded += nbytes

    def reread(self, flow: TcpFlow, bufs: list[memoryview], kept: int) -> int:
        s: PeekSock = flow.io_data
        assert s.peek_off == kept, "the core knows where the next read starts"
        self.calls.append(("reread", sum(map(len, bufs))))
        total = 0
        for buf in bufs:
            n = min(len(buf), len(s.readable) - total)
            buf[:n] = s.readable[total : total + n]
            total += n
        return total


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def tcp(core: Any, frames: Any, request: pytest.FixtureRequest) -> Iterator[Tcp]:
    harness = Tcp(core, frames, request.param)
    harness.io = harness.nat.io = PeekIo()  # type: ignore[assignment]
    yield harness
    harness.nat.close_all()


def _bulk(tcp: Tcp, segments: int) -> tuple[int, bytes, bytes]:
    """Open a flow (8 MiB window), the host sends ``segments`` MSS; (MSS, data, what the
    guest got)."""
    tcp.open(window=0xFFFF)
    mss = tcp.flow.mss
    data = bytes((i * 7 + i // 251) & 0xFF for i in range(segments * mss))
    tcp.host_data(data)
    got = b"".join(s.payload for s in tcp.out())
    return mss, data, got


def test_a_bulk_flow_keeps_its_data_in_the_host_socket(tcp: Tcp) -> None:
    mss, data, got = _bulk(tcp, 200)
    io: PeekIo = tcp.io  # type: ignore[assignment]
    flow, sock = tcp.flow, tcp.sock
    assert got == data
    assert io.calls[0] == ("keep", 0)
    # Copied until reads kept filling KEEP_MIN_FRAMES buffers (2 + 4 frames), kept after.
    copied = (2 + 4) * mss
    assert KEEP_MIN_FRAMES == 8
    assert len(flow.unacked) == copied
    assert flow.kept == len(data) - copied
    assert bytes(sock.readable) == data[copied:], "the socket holds what was not copied"
    assert tcp.core.counters["tcp.host.keep"] == 1
    # An ACK inside the copied part touches only the copy.
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + mss, window=0xFFFF)
    assert len(flow.unacked) == copied - mss and sock.discarded == 0
    # Past it: the rest of the copy, then exactly the acknowledged kept bytes are dropped.
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + copied + 3 * mss, window=0xFFFF)
    assert len(flow.unacked) == 0 and sock.discarded == 3 * mss
    assert flow.kept == len(data) - copied - 3 * mss
    assert bytes(sock.readable) == data[copied + 3 * mss :]
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + len(data), window=0xFFFF)
    assert flow.kept == 0 and sock.readable == b"" and sock.discarded == len(data) - copied
    assert tcp.flow.info(tcp.now)["unacked"] == 0


def test_acks_in_one_turn_make_one_discard(tcp: Tcp) -> None:
    mss, data, _ = _bulk(tcp, 100)
    io: PeekIo = tcp.io  # type: ignore[assignment]
    copied = len(tcp.flow.unacked)
    io.calls.clear()
    flush = tcp.flush
    tcp.flush = lambda: None  # type: ignore[method-assign]  # three ACKs in one loop turn
    for k in (1, 2, 3):
        tcp.send(ACK, ISN + 1, OUR_ISS + 1 + copied + k * mss, window=0xFFFF)
    assert io.calls == []
    tcp.flush = flush  # type: ignore[method-assign]
    tcp.flush()
    assert io.calls == [("discard", 3 * mss)]
    assert bytes(tcp.sock.readable) == data[copied + 3 * mss :]


def test_retransmission_after_a_partial_ack_resends_exactly_the_right_bytes(tcp: Tcp) -> None:
    """RTO, then partial ACKs in recovery: each retransmission starts at the new hole and
    carries the right bytes, taken from the copy, from the copy and the socket, then from the
    socket alone; the next new read continues where it left off."""
    mss, data, _ = _bulk(tcp, 60)
    io: PeekIo = tcp.io  # type: ignore[assignment]
    flow = tcp.flow
    copied = len(flow.unacked)
    assert copied == 6 * mss and flow.kept == len(data) - copied
    # The guest lost everything after its first 4 segments and acknowledged those.
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 4 * mss, window=0xFFFF)
    tcp.advance(RTO_INITIAL_S + 0.01)
    (re,) = tcp.out()
    assert re.seq == OUR_ISS + 1 + 4 * mss
    assert re.payload == data[4 * mss : 5 * mss], "from the copy"
    # Partial ACK: the next hole straddles the copy (1 MSS left) and the socket.
    io.calls.clear()
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 5 * mss + 100, window=0xFFFF)
    (re,) = tcp.out()
    assert re.seq == OUR_ISS + 1 + 5 * mss + 100
    assert re.payload == data[5 * mss + 100 : 6 * mss + 100]
    assert io.calls == [("reread", 100)]
    # Partial ACK inside the kept part: acknowledged bytes are dropped first, then reread.
    io.calls.clear()
    hole = 9 * mss + 7
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + hole, window=0xFFFF)
    (re,) = tcp.out()
    assert re.seq == OUR_ISS + 1 + hole and re.payload == data[hole : hole + mss]
    assert io.calls == [("discard", hole - copied), ("reread", mss)]
    assert flow.unacked == b"" and flow.kept == len(data) - hole
    assert bytes(tcp.sock.readable) == data[hole:]
    assert tcp.core.counters["tcp.retransmit.reread"] == 2
    # New data after the retransmissions: read where the last read stopped, not again.
    more = bytes(range(256)) * 4
    tcp.host_data(more)
    (new,) = tcp.out()
    assert new.seq == OUR_ISS + 1 + len(data) and new.payload == more
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + len(data) + len(more), window=0xFFFF)
    assert tcp.sock.readable == b"" and flow.kept == 0


def test_fast_retransmit_rereads_from_the_socket(tcp: Tcp) -> None:
    mss, data, _ = _bulk(tcp, 40)
    copied = len(tcp.flow.unacked)
    una = copied + 2 * mss
    for _ in range(4):
        tcp.send(ACK, ISN + 1, OUR_ISS + 1 + una, window=0xFFFF)
    (re,) = tcp.out()
    assert re.seq == OUR_ISS + 1 + una and re.payload == data[una : una + mss]


def test_everything_acknowledged_is_dropped_before_the_socket_closes(tcp: Tcp) -> None:
    """Unread data makes a close an RST: the last ACK's bytes leave the socket first."""
    mss, data, _ = _bulk(tcp, 30)
    tcp.sock.eof = True
    tcp.nat.host_readable(tcp.flow, tcp.now)
    (fin,) = tcp.out()
    assert fin.flags & FIN
    sock = tcp.sock
    tcp.send(ACK | FIN, ISN + 1, OUR_ISS + 2 + len(data), window=0xFFFF)
    assert sock.closed and not sock.reset
    assert sock.readable == b"" and sock.discarded == len(data) - 6 * mss


def test_a_driver_that_cannot_keep_copies_as_before(tcp: Tcp) -> None:
    tcp.io = tcp.nat.io = PeekIo(can_keep=False)  # type: ignore[assignment]
    _mss, data, got = _bulk(tcp, 50)
    assert got == data and bytes(tcp.flow.unacked) == data and tcp.flow.kept == 0
    assert tcp.io.calls == [("keep", 0)]  # type: ignore[attr-defined]


def test_request_response_flows_never_keep(tcp: Tcp) -> None:
    tcp.open(window=0xFFFF)
    for i in range(20):
        tcp.send(ACK, ISN + 1 + i, OUR_ISS + 1 + i * 300, b"q", window=0xFFFF)
        tcp.host_data(bytes(300))
        assert len(tcp.out()[-1].payload) == 300
    assert tcp.flow.keep == 0 and tcp.io.calls == []  # type: ignore[attr-defined]


# -- the real driver on a real loopback connection ----------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection: (ours, non-blocking; the host peer)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    peer = socket.create_connection(lsock.getsockname())
    ours, _ = lsock.accept()
    lsock.close()
    ours.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def _wait_readable(sock: socket.socket, nbytes: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if len(sock.recv(nbytes + 1, socket.MSG_PEEK)) >= nbytes:
                return
        except BlockingIOError:
            pass
        time.sleep(0.005)
    raise AssertionError("data did not arrive")


def test_driver_keeps_discards_and_rereads_on_a_real_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    drv = TcpNatDriver(None, None, None, SimpleNamespace(io=None))  # type: ignore[arg-type]
    flow: Any = SimpleNamespace(io_data=_HostSock(ours), host_readable=True)
    data = bytes(i * 31 & 0xFF for i in range(100_000))
    peer.sendall(data)
    _wait_readable(ours, 100_000 - 1)
    buf = bytearray(100_000)
    view = memoryview(buf)
    assert drv.recv_into(flow, [view[:1000]]) == 1000  # copied: consumed
    assert drv.keep(flow)
    assert drv.recv_into(flow, [view[:3000], view[3000:5000]]) == 5000
    assert bytes(buf[:5000]) == data[1000:6000]
    assert drv.recv_into(flow, [view[:4000]]) == 4000
    assert bytes(buf[:4000]) == data[6000:10000]
    kept = 9000
    # The guest acknowledged 2500 of the kept bytes: dropped; the next read is unaffected.
    drv.discard(flow, 2500)
    kept -= 2500
    # A retransmission: the oldest kept bytes again...
    assert drv.reread(flow, [view[:1500], view[1500:3000]], kept) == 3000
    assert bytes(buf[:3000]) == data[3500:6500]
    # ...and the next read continues after the last one.
    assert drv.recv_into(flow, [view[:2000]]) == 2000
    assert bytes(buf[:2000]) == data[10000:12000]
    kept += 2000
    drv.discard(flow, kept)
    assert drv.recv_into(flow, [view[: len(data)]]) == len(data) - 12000
    assert bytes(buf[: len(data) - 12000]) == data[12000:]
    drv.discard(flow, len(data) - 12000)
    # Everything acknowledged: nothing unread, so the close is a FIN, not an RST.
    peer.shutdown(socket.SHUT_WR)
    flow.io_data.drained, flow.io_data.hup = False, True  # what the EPOLLRDHUP event does
    time.sleep(0.05)
    assert drv.recv_into(flow, [view[:100]]) == 0, "EOF once every byte was peeked"
    ours.close()
    peer.settimeout(5)
    assert peer.recv(10) == b""
