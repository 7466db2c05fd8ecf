"""A guest that comes back (issue 15): its TCP flows follow its MAC to the new port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.switch import MAX_DEPARTED

from .test_tcp import OUR_ISS, Tcp
from .test_tcp_forward import Fwd

OTHER_MAC = bytes.fromhex("5254000000bb")


@pytest.fixture
def fwd(core: Any, frames: Any) -> Iterator[Fwd]:
    tcp = Tcp(core, frames)
    core.switch.on_return = tcp.nat.move_guest
    yield Fwd(tcp)
    tcp.nat.close_all()


def test_flows_follow_a_guest_that_reconnects(fwd: Fwd, core: Any, frames: Any) -> None:
    flow, sock = fwd.establish()
    old = core.port
    core.feed(frames.arp())  # the guest's MAC is known on its first port
    old.sent.clear()
    # The QEMU goes away (its link closes) and connects again: a new port, the same MAC.
    core.switch.detach(old)
    new = core.add_port("qemu2")
    core.port = new  # the harness plays the guest on the new port from now on
    core.feed(frames.arp())
    new.sent.clear()
    assert flow.port is new
    assert core.counters["nat.tcp.flow.moved"] == 1
    assert core.counters["switch.mac.returned"] == 1
    # Host data for the flow reaches the guest on its new port, none the old one.
    sock.readable += b"after the move"
    fwd.nat.host_readable(flow, fwd.tcp.now)
    (seg,) = fwd.tcp.out()
    assert seg.payload == b"after the move" and seg.seq == OUR_ISS + 1
    assert old.sent == []


def test_a_new_mac_moves_nothing(fwd: Fwd, core: Any, frames: Any) -> None:
    flow, _ = fwd.establish()
    port_b = core.add_port("guest1")
    core.feed(frames.arp(sha=OTHER_MAC), port=port_b)
    assert flow.port is core.port
    assert "switch.mac.returned" not in core.counters.snapshot()
    assert core.take_sent() == [frames.arp(sha=OTHER_MAC)]  # B's broadcast, flooded


def test_departed_macs_are_bounded(core: Any, frames: Any) -> None:
    for i in range(MAX_DEPARTED + 5):
        port = core.add_port(f"p{i}")
        core.switch.learn(port, bytes([2, 0, 0, 0, i >> 8, i & 0xFF]))
        core.switch.detach(port)
    assert len(core.switch._departed) == MAX_DEPARTED
    # The oldest were forgotten: coming back with one of them is a new MAC, not a return.
    port = core.add_port("again")
    core.switch.learn(port, bytes([2, 0, 0, 0, 0, 0]))
    assert "switch.mac.returned" not in core.counters.snapshot()
    core.switch.learn(port, bytes([2, 0, 0, 0, 0, 200]))
    assert core.counters["switch.mac.returned"] == 1


def test_instance_wires_the_switch() -> None:
    inst = Instance(Config(isolate=True), echo_mode=None)
    try:
        assert inst.switch.isolate is True
        assert inst.switch.on_return == inst.tcp_nat.nat.move_guest
    finally:
        inst.close()


def test_flows_of_a_guest_that_does_not_come_back_are_reset(
    fwd: Fwd, core: Any, frames: Any
) -> None:
    flow, sock = fwd.establish()
    old = core.port
    core.feed(frames.arp())
    departed: list[Any] = []
    core.switch.on_depart = departed.append
    core.switch.detach(old)
    assert departed == [old]
    assert fwd.nat.has_port(old)
    assert fwd.nat.reset_port(old) == 1
    assert flow.state_name == "CLOSED" and sock.closed and sock.reset
    assert core.counters["nat.tcp.flow.guest_gone"] == 1
    assert not fwd.nat.has_port(old)


def test_driver_resets_departed_flows_after_the_grace(monkeypatch: Any) -> None:
    """The driver arms one timer per departed port with flows; when it fires the NAT resets
    what is still on that port; shutdown cancels it."""
    from guestnet.core.port import Port
    from guestnet.io.tcp_nat import GUEST_RETURN_S

    inst = Instance(Config(), echo_mode=None)
    driver = inst.tcp_nat
    try:
        assert inst.switch.on_depart == driver.guest_departed
        port = Port("gone", lambda frame: None)
        driver.guest_departed(port)  # no flows on it: nothing armed
        assert driver._departures == {}
        reset: list[Port] = []
        monkeypatch.setattr(driver.nat, "has_port", lambda p: p is port)
        monkeypatch.setattr(driver.nat, "reset_port", reset.append)
        now = inst.loop.now()
        driver.guest_departed(port)
        timer = driver._departures[port]
        assert timer.when >= now + GUEST_RETURN_S
        inst.loop.timers.run_due(timer.when)
        assert reset == [port] and driver._departures == {}
        driver.guest_departed(port)
        again = driver._departures[port]
        driver.close_all()
        assert again.cancelled and driver._departures == {}
    finally:
        inst.close()
