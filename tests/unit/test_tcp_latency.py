"""The TCP core's per-request costs: what a 1-byte request/response exchange asks of the pool
and the host socket (issue 6, latency). Behaviour only; the timings are in bench/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.core.tcp import READ_BATCH, TcpFlow
from guestnet.wire.tcp import ACK, PSH

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
