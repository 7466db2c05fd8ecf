"""The datapath loop: timers, fd dispatch, and signals that arrive before run()."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest

from guestnet.io.loop import EPOLLIN, Loop


@pytest.fixture
def loop() -> Iterator[Loop]:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    lp = Loop()
    try:
        yield lp
    finally:
        lp.close()
        for s, h in old.items():
            signal.signal(s, h)


def test_signal_before_run_still_stops_it(loop: Loop) -> None:
    """A SIGTERM handled between start-up and run() must not be forgotten by run()."""
    loop.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    fired: list[float] = []
    loop.call_later(5.0, fired.append)  # would keep run() alive if the stop were lost
    loop.run()
    assert loop.stop_signal == signal.SIGTERM
    assert fired == []


def test_signal_during_run_stops_it(loop: Loop) -> None:
    loop.install_signal_handlers()
    loop.call_later(0.01, lambda _now: os.kill(os.getpid(), signal.SIGINT))
    loop.call_later(5.0, lambda _now: pytest.fail("loop kept running after SIGINT"))
    loop.run()
    assert loop.stop_signal == signal.SIGINT


def test_timers_fire_in_order_and_cancel(loop: Loop) -> None:
    order: list[str] = []
    loop.call_later(0.02, lambda _n: order.append("b"))
    loop.call_later(0.01, lambda _n: order.append("a"))
    loop.call_later(0.015, lambda _n: order.append("x")).cancel()
    loop.call_later(0.03, lambda _n: loop.stop())
    loop.run()
    assert order == ["a", "b"]


def test_fd_handler_runs_and_removed_fd_is_quiet(loop: Loop) -> None:
    a, b = socket.socketpair()
    got: list[bytes] = []

    def on_read(_events: int) -> None:
        got.append(a.recv(100))
        loop.remove_fd(a.fileno())
        loop.stop()

    try:
        loop.add_fd(a.fileno(), EPOLLIN, on_read)
        b.send(b"ping")
        loop.call_later(5.0, lambda _n: pytest.fail("fd handler never ran"))
        loop.run()
        assert got == [b"ping"]
        b.send(b"again")  # no handler any more: a turn passes without dispatch
        loop.run_once(max_wait=0.01)
        assert got == [b"ping"]
    finally:
        a.close()
        b.close()
