"""The TCP core's per-request costs: what a 1-byte request/response exchange asks of the pool
and the host socket (issue 6, latency). Behaviour only; the timings are in bench/."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from guestnet.core.tcp import DELACK_S, READ_BATCH, TcpFlow
from guestnet.io.loop import Loop
from guestnet.io.tcp_nat import TcpNatDriver, _HostSock
from guestnet.wire.tcp import ACK, FIN, PSH

from .test_tcp import ISN, OUR_ISS, FakeIo, Tcp


class CountingIo(FakeIo):
    """A FakeIo that records how many buffers each host read was offered."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: list[int] = []

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        self.offered.append(len(bufs))
        return super().recv_into(flow, bufs)


@pytest.fixture
def tcp(core: Any, frames: Any) -> Iterator[Tcp]:
    harness = Tcp(core, frames)
    harness.io = harness.nat.io = CountingIo()  # type: ignore[assignment]
    yield harness
    harness.nat.close_all()


def test_small_answers_take_few_pool_frames(tcp: Tcp) -> None:
    """A 1-byte answer under a large guest window is read into a couple of frames, not
    READ_BATCH of them (each an acquire and a release per answer)."""
    tcp.open(window=0xFFFF)  # scaled by 7: an 8 MiB window
    io: CountingIo = tcp.io  # type: ignore[assignment]
    for i in range(5):
        tcp.send(ACK | PSH, ISN + 1 + i, OUR_ISS + 1 + i, b"q", window=0xFFFF)
        io.offered.clear()
        tcp.host_data(b"a")
        seg = tcp.out()[-1]
        assert seg.payload == b"a" and seg.ack == ISN + 2 + i
        assert max(io.offered) <= 2, io.offered
    assert tcp.core.pool.in_use == 0


def test_bulk_reads_grow_to_the_batch_limit(tcp: Tcp) -> None:
    """Reads that fill every buffer double the next one's, up to READ_BATCH frames."""
    tcp.open(window=0xFFFF)
    io: CountingIo = tcp.io  # type: ignore[assignment]
    mss = tcp.flow.mss
    tcp.host_data(bytes(mss * 300))
    assert io.offered[:6] == [2, 4, 8, 16, 32, READ_BATCH], io.offered
    assert sum(len(s.payload) for s in tcp.out()) == mss * 300


def test_answer_within_the_delay_carries_the_ack(tcp: Tcp) -> None:
    """A 1-byte request answered at once costs one frame to the guest, not a bare ACK too."""
    tcp.open()
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"q")
    assert tcp.out() == [], "the ACK for a lone small segment is held"
    tcp.host_data(b"a")
    (seg,) = tcp.out()
    assert seg.payload == b"a" and seg.ack == ISN + 2
    tcp.advance(DELACK_S * 2)
    assert tcp.out() == [], "nothing left to acknowledge"
    assert "tcp.ack.delayed" not in tcp.core.counters.counts


def test_no_answer_bare_ack_after_the_delay(tcp: Tcp) -> None:
    tcp.open()
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"q")
    assert tcp.out() == []
    assert tcp.io.timers[tcp.flow] <= tcp.now + DELACK_S
    tcp.advance(DELACK_S)
    (ack,) = tcp.out()
    assert ack.flags == ACK and ack.ack == ISN + 2 and ack.payload == b""
    assert tcp.core.counters["tcp.ack.delayed"] == 1


def test_full_segments_acked_the_same_turn(tcp: Tcp) -> None:
    """Bulk data (a full MSS or a super-frame) is acknowledged at the end of its turn."""
    tcp.open()
    mss = tcp.flow.mss
    tcp.send(ACK, ISN + 1, OUR_ISS + 1, bytes(mss))
    (ack,) = tcp.out()
    assert ack.ack == ISN + 1 + mss


def test_guest_fin_acked_by_our_fin_when_the_host_closes_at_once(tcp: Tcp) -> None:
    """connect, 1 byte, close: the guest's FIN and the host's EOF make one FIN|ACK frame."""
    tcp.open()
    tcp.send(ACK | FIN, ISN + 1, OUR_ISS + 1)
    assert tcp.sock.shut_wr and tcp.out() == []
    tcp.sock.eof = True
    tcp.nat.host_readable(tcp.flow, tcp.now)
    (fin,) = tcp.out()
    assert fin.flags == FIN | ACK and fin.ack == ISN + 2 and fin.seq == OUR_ISS + 1
    sock = tcp.sock  # the flow is freed with the last ACK (the guest closed first)
    tcp.send(ACK, ISN + 2, OUR_ISS + 2)
    assert sock.closed and tcp.out() == []
    tcp.advance(DELACK_S * 2)
    assert tcp.out() == []


def _driver_with(sock: socket.socket) -> tuple[TcpNatDriver, Any]:
    drv = TcpNatDriver(None, None, None, SimpleNamespace(io=None))  # type: ignore[arg-type]
    return drv, SimpleNamespace(io_data=_HostSock(sock))


def test_driver_skips_the_eagain_read_after_a_short_one() -> None:
    """After a short read with no hang-up reported the next read returns -1 without a system
    call; a hang-up in the event makes it read on (an EOF may sit behind the data)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        drv, flow = _driver_with(a)
        buf = memoryview(bytearray(100))
        b.send(b"xy")
        assert drv.recv_into(flow, [buf]) == 2
        b.send(b"z")  # arrived after the read: epoll would report it as a new event
        assert drv.recv_into(flow, [buf]) == -1
        flow.io_data.drained = False  # what that event does
        assert drv.recv_into(flow, [buf]) == 1
        b.send(b"w")
        b.shutdown(socket.SHUT_WR)
        flow.io_data.drained, flow.io_data.hup = False, True  # an event with EPOLLRDHUP
        assert drv.recv_into(flow, [buf[:50], buf[50:]]) == 1
        assert drv.recv_into(flow, [buf]) == 0, "the EOF behind the data is read"
    finally:
        a.close()
        b.close()


def test_a_closed_flow_lingers_without_its_send_ring(tcp: Tcp) -> None:
    """Connection churn: a closed flow the host closed first lingers a while, so it must not
    keep the ring its answers went through (2 KiB each, thousands of flows under a
    connection-rate load). (One the guest closed first is freed at once.)"""
    tcp.open()
    tcp.send(ACK | PSH, ISN + 1, OUR_ISS + 1, b"q")
    tcp.host_data(b"a")
    assert len(tcp.flow.unacked._buf) > 0
    tcp.sock.eof = True
    tcp.nat.host_readable(tcp.flow, tcp.now)
    fin = tcp.out()[-1]
    assert fin.flags & FIN
    tcp.send(ACK | FIN, ISN + 2, fin.seq + 1)
    assert tcp.flow.state_name == "CLOSED" and tcp.sock.closed
    assert len(tcp.flow.unacked._buf) == 0


def _flow_is_alive(flow_id: int) -> bool:
    return any(id(o) == flow_id and type(o) is TcpFlow for o in gc.get_objects())


@pytest.mark.parametrize("ending", ["reaped", "dropped"])
def test_driver_lets_go_of_a_finished_flow(ending: str) -> None:
    """The timer callback the driver keeps per flow closes over the flow, which holds the
    driver's record: once the flow has neither socket nor deadline that cycle is broken, so a
    finished flow is freed at once, not by the cyclic collector's rare full passes (under
    connection churn thousands of dead flows piled up: 20 MB of peak RSS)."""
    a, b = socket.socketpair()
    loop = Loop()
    fired: list[float] = []

    class Nat:
        io: Any = None

        def on_timer(self, flow: TcpFlow, now: float) -> None:
            fired.append(now)  # the reap: nothing is armed again

    gc.disable()
    try:
        drv = TcpNatDriver(loop, None, None, Nat())  # type: ignore[arg-type]
        flow = TcpFlow(
            (b"\x0a\x00\x02\x0f", 1, b"\x7f\x00\x00\x01", 2), None, b"", "", 0, 0, 0, 0.0
        )  # type: ignore[arg-type]
        hs = flow.io_data = _HostSock(a)
        drv.set_timer(flow, loop.now() + 0.001)
        assert hs.fire is not None
        drv.close(flow, False)
        if ending == "reaped":
            deadline = time.monotonic() + 2.0
            while not fired and time.monotonic() < deadline:
                loop.run_once(0.01)
            assert fired
        else:
            drv.set_timer(flow, None)
        assert hs.fire is None
        flow_id = id(flow)
        del flow, hs
        assert not _flow_is_alive(flow_id), "the flow waits for the cyclic collector"
    finally:
        gc.enable()
        loop.close()
        b.close()


def test_a_read_into_one_frame_stays_within_the_window_and_is_kept_for_retransmission(
    tcp: Tcp,
) -> None:
    """When the guest's window is less than a frame, each read offers one buffer of exactly
    the room left (the one-frame path of ``_pump``), the bytes read are queued for
    retransmission, and the rest waits in the socket until the guest opens the window."""
    tcp.open(window=0xFFFF)
    io: CountingIo = tcp.io  # type: ignore[assignment]
    data = bytes(range(256)) * 12  # 3072 bytes
    tcp.send(ACK, ISN + 1, OUR_ISS + 1, window=8)  # 8 << 7: 1024 bytes of room
    io.offered.clear()
    tcp.host_data(data)
    (seg,) = tcp.out()
    assert seg.payload == data[:1024] and seg.seq == OUR_ISS + 1
    assert io.offered == [1]
    assert bytes(tcp.flow.unacked) == data[:1024]
    tcp.send(ACK, ISN + 1, OUR_ISS + 1 + 1024, window=8)
    (seg,) = tcp.out()
    assert seg.payload == data[1024:2048] and seg.seq == OUR_ISS + 1 + 1024
    assert bytes(tcp.flow.unacked) == data[1024:2048]
    assert io.offered == [1, 1]
    assert tcp.core.pool.in_use == 0
