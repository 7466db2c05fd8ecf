"""CPU time of the TCP core per request: a whole connection, and a 1-byte round trip.

Run: .venv/bin/python bench/bench_tcp_request.py [--quick] [--profile]

The per-request half of issue 12, in the core alone (no sockets, no kernel): frames go through
the classifier as a TAP with offloads hands them over (checksums vouched for, fast path on) and
the host side is a scripted fake driver, so what is measured is the Python work guestnet does per
request, robust to a busy machine (thread CPU time; min and median over batches). Compare two
trees by running this file with ``PYTHONPATH=OTHER/src`` beside it, interleaved.

Rows:

- ``conn guest->host``: one connection as ``netbench connrate`` makes it: guest SYN, host
  connect completes, guest ACK, guest sends 1 byte, the host answers 1 byte, guest FIN, host
  EOF, guest ACK of our FIN, the reap timer.
- ``conn forwarded``: the same through a published port: the host client is accepted, our SYN,
  the guest's SYN-ACK, the host client's byte, the guest's answer, host EOF, guest FIN.
- ``rr 1 byte``: one round trip on an established flow: the guest's 1-byte request (acking the
  previous answer), the host's 1-byte answer.

``--profile`` prints the top functions of each row under cProfile.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable

from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.policy import Policy
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.core.tcp import FORWARD_PORT_MAX, FORWARD_PORT_MIN, REAP_DELAY_S, TcpFlow, TcpNat
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from guestnet.wire.ipv4 import PROTO_TCP, build_ipv4
from guestnet.wire.tcp import ACK, FIN, PSH, SYN, build_syn_options, build_tcp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])


class ScriptedIo:
    """A TcpIo whose host sockets read what the bench queues; timers in a dict."""

    def __init__(self) -> None:
        self.readable: dict[TcpFlow, list[bytes]] = {}
        self.timers: dict[TcpFlow, float] = {}
        self.drained: dict[TcpFlow, bool] = {}
        self.flush = False

    def connect(self, flow: TcpFlow) -> int:
        flow.io_data = self
        return 0

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        return len(data)

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        # As the real driver (io/tcp_nat.py): after a short read the queue is known empty;
        # it says so by clearing ``host_readable`` (trees that read on get -1 at once).
        if self.drained.pop(flow, False):
            return -1
        queue = self.readable.get(flow)
        if not queue:
            return -1
        data = queue.pop(0)
        if not data:
            return 0
        bufs[0][: len(data)] = data
        if not queue:
            self.drained[flow] = True
            flow.host_readable = False
        return len(data)

    def send_room(self, flow: TcpFlow) -> int:
        return 1 << 20

    def shutdown_write(self, flow: TcpFlow) -> None:
        pass

    def close(self, flow: TcpFlow, reset: bool) -> None:
        self.readable.pop(flow, None)
        self.drained.pop(flow, None)

    def set_timer(self, flow: TcpFlow, when: float | None) -> None:
        if when is None:
            self.timers.pop(flow, None)
        else:
            self.timers[flow] = when

    def request_flush(self) -> None:
        self.flush = True


class Rig:
    """A classifier with the TCP NAT on its fast path, on a port with offloads."""

    def __init__(self) -> None:
        config = Config()
        self.pool = pool = FramePool(config.mtu, config.pool_slots)
        counters = Counters()
        switch = Switch(pool, counters)
        self.cl = cl = FrameClassifier(config, pool, counters, switch)
        self.port = port = Port("bench0", pool.release)
        port.guest_mac = GUEST_MAC
        port.offload_max = 65535
        switch.attach(port)
        self.mac = config.mac_b if hasattr(config, "mac_b") else bytes(6)
        self.io = ScriptedIo()
        self.nat = nat = TcpNat(config, pool, counters, Policy(config), self.io, isn=lambda: 1000)
        cl.tcp_nat = cl.tcp_nat6 = nat
        cl.tcp_fast = nat.handle_fast
        self.our_mac = cl._mac
        self.now = 0.0

    def frame(
        self, sport: int, dport: int, flags: int, seq: int, ack: int, payload: bytes = b"",
        options: bytes = b"", dst: bytes = GATEWAY_IP,
    ) -> memoryview:  # fmt: skip
        hlen = 20 + len(options)
        l4 = bytearray(hlen + len(payload))
        l4[hlen:] = payload
        build_tcp(l4, 0, sport, dport, seq, ack, flags, 65535, len(payload), GUEST_IP, dst,
                  options)  # fmt: skip
        buf = bytearray(34 + len(l4))
        off = build_ethernet(buf, 0, self.our_mac, GUEST_MAC, ETHERTYPE_IPV4)
        build_ipv4(buf, off, GUEST_IP, dst, PROTO_TCP, len(l4))
        buf[34:] = l4
        return memoryview(buf)

    def feed(self, frame: memoryview) -> None:
        self.now += 1e-5
        self.cl.handle_frame(frame, self.port, self.now, True)
        self.end_turn()

    def end_turn(self) -> None:
        if self.io.flush:
            self.io.flush = False
            self.nat.flush(self.now)

    def host(self, flow: TcpFlow, data: bytes) -> None:
        self.now += 1e-5
        self.io.readable.setdefault(flow, []).append(data)
        self.io.drained.pop(flow, None)  # the event clears it
        self.nat.host_readable(flow, self.now)
        self.end_turn()


def conn_call(rig: Rig) -> Callable[[], object]:
    """One guest-opened connection, connect + 1 byte + echo + close, per call."""
    ports = iter(range(10**9))
    syn_opts = build_syn_options(1460, 7)
    nat = rig.nat
    iss = 1000

    isn = 5000
    # Frames built beforehand (4096 source ports, reused once reaped): only guestnet is timed.
    frames = [
        (sport,
         rig.frame(sport, 8080, SYN, isn, 0, options=syn_opts),
         rig.frame(sport, 8080, ACK, isn + 1, iss + 1),
         rig.frame(sport, 8080, ACK | PSH, isn + 1, iss + 1, b"x"),
         rig.frame(sport, 8080, ACK | FIN, isn + 2, iss + 2),
         rig.frame(sport, 8080, ACK, isn + 3, iss + 3))
        for sport in range(20000, 24096)
    ]  # fmt: skip

    def one() -> None:
        sport, syn, ack, data, fin, last = frames[next(ports) % len(frames)]
        rig.feed(syn)
        flow = nat.table.get((GUEST_IP, sport, GATEWAY_IP, 8080))
        assert flow is not None
        rig.now += 1e-5
        nat.host_connected(flow, 0, rig.now)
        rig.end_turn()
        rig.feed(ack)
        rig.feed(data)
        rig.host(flow, b"x")
        rig.feed(fin)
        rig.host(flow, b"")
        rig.feed(last)
        assert flow.state_name == "CLOSED", flow.state_name
        rig.now += REAP_DELAY_S + 0.01
        nat.on_timer(flow, rig.now)
        rig.io.timers.pop(flow, None)

    return one


def forwarded_call(rig: Rig) -> Callable[[], object]:
    """One connection accepted on a published port, 1 byte each way, closed by the client."""
    nat = rig.nat
    port = rig.port
    cache: dict[tuple[int, int], tuple[memoryview, ...]] = {}

    def frames(gport: int, iss: int) -> tuple[memoryview, ...]:
        got = cache.get((gport, iss))
        if got is None:
            isn = 7000
            got = cache[gport, iss] = (
                rig.frame(5301, gport, SYN | ACK, isn, iss + 1, options=build_syn_options(1460, 7)),
                rig.frame(5301, gport, ACK | PSH, isn + 1, iss + 2, b"x"),
                rig.frame(5301, gport, ACK | FIN, isn + 2, iss + 3),
            )
        return got

    def one() -> None:
        rig.now += 1e-5
        flow = nat.open_to_guest(port, GUEST_MAC, GUEST_IP, 5301, rig.io, ("127.0.0.1", 40000),
                                 "1", rig.now)  # fmt: skip
        assert flow is not None
        gport = flow.key[3]
        synack, data, fin = frames(gport, flow.iss)
        rig.end_turn()
        rig.feed(synack)
        rig.host(flow, b"x")
        rig.feed(data)
        rig.host(flow, b"")
        rig.feed(fin)
        assert flow.state_name == "CLOSED", flow.state_name
        rig.now += REAP_DELAY_S + 0.01
        nat.on_timer(flow, rig.now)
        rig.io.timers.pop(flow, None)

    # Build every frame once (the source ports go round their range), outside the timing.
    for _ in range(FORWARD_PORT_MAX - FORWARD_PORT_MIN + 1):
        one()
    return one


def rr_call(rig: Rig) -> Callable[[], object]:
    """One 1-byte round trip on an established flow."""
    nat = rig.nat
    sport, isn, iss = 30000, 5000, 1000
    rig.feed(rig.frame(sport, 8080, SYN, isn, 0, options=build_syn_options(1460, 7)))
    flow = nat.table.get((GUEST_IP, sport, GATEWAY_IP, 8080))
    assert flow is not None
    nat.host_connected(flow, 0, rig.now)
    rig.feed(rig.frame(sport, 8080, ACK, isn + 1, iss + 1))
    state = [0]

    def one() -> None:
        i = state[0]
        state[0] = i + 1
        rig.feed(rig.frame_cache(i))
        rig.host(flow, b"a")

    cache: dict[int, memoryview] = {}

    def frame_cache(i: int) -> memoryview:
        f = cache.get(i)
        if f is None:
            f = rig.frame(sport, 8080, ACK | PSH, isn + 1 + i, iss + 1 + i, b"q")
            cache[i] = f
        return f

    rig.frame_cache = frame_cache  # type: ignore[attr-defined]
    for i in range(40000):
        frame_cache(i)
    return one


def cpu_per_call(fn: Callable[[], object], n: int, batches: int) -> tuple[float, float]:
    """(min, median) thread CPU µs per call over ``batches`` batches of ``n`` calls."""
    clock = time.thread_time
    per: list[float] = []
    for _ in range(batches):
        t0 = clock()
        for _ in range(n):
            fn()
        per.append((clock() - t0) / n * 1e6)
    return min(per), statistics.median(per)


def main() -> None:
    quick = "--quick" in sys.argv
    batches = 6 if quick else 20
    rows = (("conn guest->host", conn_call, 500), ("conn forwarded", forwarded_call, 500),
            ("rr 1 byte", rr_call, 1000))  # fmt: skip
    print(f"thread CPU µs per request ({batches} batches): min, median")
    for name, make, n in rows:
        rig = Rig()
        fn = make(rig)
        if "--profile" in sys.argv:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n * 4):
                fn()
            prof.disable()
            print(f"--- {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            continue
        lo, med = cpu_per_call(fn, n, batches)
        print(f"{name:<20} {lo:8.2f} {med:8.2f}")


if __name__ == "__main__":
    main()
