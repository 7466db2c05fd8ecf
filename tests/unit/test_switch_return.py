"""A guest that comes back (issue 15): its TCP flows follow its MAC to the new port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.switch import MAX_DEPARTED
from guestnet.core.tcp.flow import RETURN_PROBE_S
from guestnet.wire.tcp import ACK, RST

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


# -- a guest that comes back with the same MAC but a new stack (a VM restarted) -----------------

RETURN_TIMEOUT_S = 5.0


@pytest.fixture
def moved(make_core: Any, frames: Any) -> Iterator[tuple[Fwd, Any, Any]]:
    """An established forwarded flow whose guest's link went away and whose MAC came back on a
    new port (the move happens on the new port's first frame, an ARP request). Yields the
    harness, the flow and its host socket; the keep-alive probe sent at the move is left in
    the new port's ``sent``, the ARP reply taken out."""
    core = make_core(guest_return_timeout=RETURN_TIMEOUT_S)
    tcp = Tcp(core, frames)
    core.switch.on_return = tcp.nat.move_guest
    fwd = Fwd(tcp)
    flow, sock = fwd.establish()
    core.feed(frames.arp())
    core.switch.detach(core.port)
    core.port = core.add_port("qemu2")
    tcp.advance(2.0)  # the old guest's last segment is in the past
    core.feed(frames.arp())
    core.port.sent = [f for f in core.port.sent if f[12:14] == b"\x08\x00"]  # IPv4 only
    yield fwd, flow, sock
    tcp.nat.close_all()
    assert core.pool.in_use == 0


def _is_probe(seg: Any, flow: Any) -> bool:
    return (
        seg.flags == ACK
        and seg.payload == b""
        and seg.seq == (flow.snd_una - 1) & 0xFFFFFFFF
        and seg.ack == flow.rcv_nxt
    )


def test_a_moved_flow_is_probed_and_a_new_stack_resets_it(
    moved: tuple[Fwd, Any, Any],
) -> None:
    """A restarted VM (same MAC, new kernel) answers the keep-alive with an RST at rcv_nxt:
    the old connection ends at once, its host peer sees a reset."""
    fwd, flow, sock = moved
    (probe,) = fwd.tcp.out()
    assert _is_probe(probe, flow)
    fwd.guest(flow, RST, flow.rcv_nxt)
    assert flow.state_name == "CLOSED"
    assert sock.closed and sock.reset
    counters = fwd.tcp.core.counters
    assert counters["tcp.guest.rst"] == 1
    assert counters["tcp.flow.return_probe"] == 1


def test_a_moved_flow_its_guest_answers_is_kept(moved: tuple[Fwd, Any, Any]) -> None:
    """A guest that kept its stack (a QEMU that reconnected) answers the keep-alive with an
    ACK: the flow stays, probed no more."""
    fwd, flow, sock = moved
    (probe,) = fwd.tcp.out()
    assert _is_probe(probe, flow)
    tcp = fwd.tcp
    tcp.advance(0.1)  # the first tick starts the timeout
    fwd.guest(flow, ACK, flow.rcv_nxt, flow.snd_nxt)
    assert tcp.out() == []
    tcp.advance(1.0)
    assert tcp.core.counters["tcp.flow.return_confirmed"] == 1
    tcp.advance(RETURN_TIMEOUT_S * 3)
    assert tcp.out() == []
    assert flow.state_name == "ESTABLISHED" and not sock.closed
    assert flow.return_deadline is None
    sock.readable += b"still here"
    fwd.nat.host_readable(flow, tcp.now)
    (seg,) = tcp.out()
    assert seg.payload == b"still here"


def test_a_moved_flow_nobody_answers_is_reset_after_the_timeout(
    moved: tuple[Fwd, Any, Any],
) -> None:
    """A guest that is not answering yet (a VM still booting, its address not configured) is
    probed every RETURN_PROBE_S; with no answer within the return timeout, RST both ways."""
    fwd, flow, sock = moved
    tcp = fwd.tcp
    segs = list(tcp.out())
    start = tcp.now
    while flow.state_name != "CLOSED" and tcp.now - start < RETURN_TIMEOUT_S + 3:
        tcp.advance(0.25)
        segs += tcp.out()
    assert flow.state_name == "CLOSED"
    assert RETURN_TIMEOUT_S <= tcp.now - start <= RETURN_TIMEOUT_S + RETURN_PROBE_S
    *probes, rst = segs
    assert all(_is_probe(p, flow) for p in probes)
    assert RETURN_TIMEOUT_S - 1 <= len(probes) <= RETURN_TIMEOUT_S + 1
    assert rst.flags & RST
    assert sock.closed and sock.reset
    assert tcp.core.counters["tcp.flow.return_timeout"] == 1


def test_the_return_timeout_is_configurable() -> None:
    """``--guest-return-timeout``: into the config (default 30 s), and the driver arms its
    departure timer with it."""
    from guestnet.cli import build_parser, config_from_args
    from guestnet.core.port import Port

    def parse(*args: str) -> Config:
        return config_from_args(build_parser().parse_args(["qemu", "--socket", "s", *args]))

    assert parse().guest_return_timeout == 30.0
    assert parse("--guest-return-timeout", "7").guest_return_timeout == 7.0
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exc:
            parse("--guest-return-timeout", bad)
        assert exc.value.code == 2
    with pytest.raises(ValueError):
        Config(guest_return_timeout=0)
    inst = Instance(Config(guest_return_timeout=7.0), echo_mode=None)
    try:
        driver = inst.tcp_nat
        port = Port("gone", lambda frame: None)
        driver.nat.has_port = lambda p: p is port  # type: ignore[method-assign]
        now = inst.loop.now()
        driver.guest_departed(port)
        assert now + 7.0 <= driver._departures[port].when < now + 8.0
    finally:
        inst.close()
