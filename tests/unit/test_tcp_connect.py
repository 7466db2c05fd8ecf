"""Connection churn (issue 12): a connect to a local destination answered in the SYN's own loop
turn, and the host socket's EPOLLOUT registered only when it is needed. Behaviour only; the
timings are in bench/bench_loop_request.py."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from guestnet.core.tcp import CONNECTED, ESTABLISHED, RTO_INITIAL_S, TcpFlow
from guestnet.io.loop import EPOLLOUT, Loop
from guestnet.io.tcp_nat import TcpNatDriver
from guestnet.wire.tcp import ACK, SYN, build_syn_options

from .test_tcp import ISN, OUR_ISS, FakeIo, Tcp, c


class AtOnceIo(FakeIo):
    """A FakeIo whose connects complete (or fail) inside ``connect``, as local ones do."""

    def connect(self, flow: TcpFlow) -> int:
        err = super().connect(flow)
        return err if err else CONNECTED


@pytest.fixture
def tcp(core: Any, frames: Any) -> Iterator[Tcp]:
    harness = Tcp(core, frames)
    harness.io = harness.nat.io = AtOnceIo()  # type: ignore[assignment]
    yield harness
    harness.nat.close_all()


def test_connected_at_once_answers_the_syn_at_once(tcp: Tcp) -> None:
    tcp.send(SYN, ISN, options=build_syn_options(1460, 7))
    (synack,) = tcp.out()
    assert synack.flags == SYN | ACK and synack.seq == OUR_ISS and synack.ack == ISN + 1
    assert synack.options.mss == tcp.core.config.mtu - tcp.overhead
    flow = tcp.flow
    assert flow.state_name == "SYN_RCVD" and flow.connect_deadline is None
    assert tcp.io.timers[flow] == pytest.approx(tcp.now + RTO_INITIAL_S), "the SYN-ACK's RTO"
    assert c(tcp, "tcp.syn.accepted") == 1 and c(tcp, "tcp.connect.ok") == 1
    tcp.send(ACK, ISN + 1, OUR_ISS + 1)
    assert flow.state_name == "ESTABLISHED" and tcp.out() == []
    # A later host_connected (an EPOLLOUT edge of the same socket) changes nothing.
    tcp.nat.host_connected(flow, 0, tcp.now)
    assert tcp.out() == [] and flow.state_name == "ESTABLISHED"


def test_dns_failover_to_an_upstream_connected_at_once(tcp: Tcp) -> None:
    """DNS over TCP: the first upstream's connect fails later, the next one connects at once:
    the SYN-ACK goes out then."""
    ups = iter([("127.0.0.53", 53), ("127.0.0.54", 53)])
    failed: list[tuple[str, int]] = []
    tcp.nat.dns_upstream = lambda: next(ups, None)
    tcp.nat.dns_failed = lambda up, _now: failed.append(up)
    plain = FakeIo.connect
    results = iter([0, CONNECTED])

    def connect(flow: TcpFlow) -> int:
        plain(tcp.io, flow)
        return next(results)

    tcp.io.connect = connect  # type: ignore[method-assign]
    tcp.send(SYN, ISN, dst=tcp.dns_ip, dport=53)
    assert tcp.out() == []
    flow = tcp.flow
    tcp.nat.host_connected(flow, errno.ECONNREFUSED, tcp.now)
    (synack,) = tcp.out()
    assert synack.flags == SYN | ACK and synack.sport == 53
    assert failed == [("127.0.0.53", 53)] and (flow.host, flow.host_port) == ("127.0.0.54", 53)
    assert flow.state_name == "SYN_RCVD"


# -- the driver, on real loopback sockets --------------------------------------------------------


class Recorder:
    """What the driver reports to the core, recorded (the driver's side is what is tested)."""

    io: Any = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def host_connected(self, flow: TcpFlow, err: int, now: float) -> None:
        self.calls.append(("connected", err))

    def host_readable(self, flow: TcpFlow, now: float) -> None:
        self.calls.append(("readable", 0))

    def host_writable(self, flow: TcpFlow, now: float) -> None:
        self.calls.append(("writable", 0))


@pytest.fixture
def driver() -> Iterator[tuple[TcpNatDriver, Recorder, Loop]]:
    loop = Loop()
    nat = Recorder()
    drv = TcpNatDriver(loop, None, None, nat)  # type: ignore[arg-type]
    yield drv, nat, loop
    loop.close()


def _flow(port: int) -> TcpFlow:
    key = (b"\x0a\x00\x02\x0f", 40000, b"\x0a\x00\x02\x02", port)
    return TcpFlow(key, None, b"", "127.0.0.1", port, ISN, OUR_ISS, 0.0)  # type: ignore[arg-type]


def _turns(loop: Loop, n: int = 3) -> None:
    for _ in range(n):
        loop.run_once(0)


def test_driver_loopback_connect_completes_in_the_call(
    driver: tuple[TcpNatDriver, Recorder, Loop],
) -> None:
    drv, nat, loop = driver
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        flow = _flow(srv.getsockname()[1])
        assert drv.connect(flow) == CONNECTED
        flow.state = ESTABLISHED  # as the core makes it, once the guest's ACK came
        hs = flow.io_data
        assert not loop._events[hs.fd] & EPOLLOUT and not hs.out
        _turns(loop)
        assert nat.calls == [], "no event for a connected socket with nothing to read"
        conn, _ = srv.accept()
        with conn:
            # One send: no EPOLLOUT (a request, then the answer and close).
            assert drv.send(flow, memoryview(b"q")) == 1
            assert not loop._events[hs.fd] & EPOLLOUT
            conn.send(b"a")
            _turns(loop)
            assert nat.calls == [("readable", 0)]
            # The second send: the flow is more than one request; EPOLLOUT from here on.
            assert drv.send(flow, memoryview(b"r")) == 1
            assert loop._events[hs.fd] & EPOLLOUT and hs.out and not hs.nagle
            assert conn.recv(10) == b"qr"
            drv.close(flow, False)
            drv.set_timer(flow, None)
    finally:
        srv.close()


def test_driver_short_send_watches_for_room(
    driver: tuple[TcpNatDriver, Recorder, Loop],
) -> None:
    """A first send the socket takes only part of: EPOLLOUT is added, and room reported."""
    drv, nat, loop = driver
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        flow = _flow(srv.getsockname()[1])
        assert drv.connect(flow) == CONNECTED
        flow.state = ESTABLISHED  # as the core makes it, once the guest's ACK came
        hs = flow.io_data
        hs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            data = memoryview(bytes(8 << 20))
            n = drv.send(flow, data)
            assert 0 < n < len(data)
            assert loop._events[hs.fd] & EPOLLOUT and hs.out
            conn.setblocking(False)
            for _ in range(100):  # drain the peer until the sender has room again
                try:
                    while conn.recv(1 << 16):
                        pass
                except BlockingIOError:
                    pass
                loop.run_once(0.01)
                if ("writable", 0) in nat.calls:
                    break
            assert ("writable", 0) in nat.calls
            drv.close(flow, True)
            drv.set_timer(flow, None)
    finally:
        srv.close()


def test_driver_refused_at_once_is_reported_in_the_same_turn(
    driver: tuple[TcpNatDriver, Recorder, Loop],
) -> None:
    """A connect to a closed loopback port has failed when ``connect`` returns: reported to
    the core as its EPOLLOUT edge would (``host_connected`` with the errno) at the end of the
    turn; the core's close then takes it out of the loop."""
    drv, nat, loop = driver
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there
    flow = _flow(port)
    assert drv.connect(flow) == 0
    assert nat.calls == []
    loop.run_once(0)
    assert nat.calls == [("connected", errno.ECONNREFUSED)]
    drv.close(flow, False)
    assert flow.io_data.sock is None and loop._handlers == {}


def test_driver_connect_still_running_waits_for_epollout(
    driver: tuple[TcpNatDriver, Recorder, Loop],
) -> None:
    """A listener whose accept queue is full drops the SYN: the connect is still running when
    ``connect`` returns (as a remote one is); its EPOLLOUT edge reports the end."""
    drv, nat, loop = driver
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname())
    try:
        flow = _flow(srv.getsockname()[1])
        assert drv.connect(flow) == 0
        hs = flow.io_data
        assert loop._events[hs.fd] & EPOLLOUT and hs.out
        _turns(loop)
        assert nat.calls == []
        srv.accept()[0].close()  # room in the queue: the SYN retransmission gets in (~1 s)
        for _ in range(300):
            loop.run_once(0.01)
            if nat.calls:
                break
        assert nat.calls[0] == ("connected", 0)
        drv.close(flow, True)
        drv.set_timer(flow, None)
    finally:
        filler.close()
        srv.close()
