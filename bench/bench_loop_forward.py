"""CPU time of the whole datapath per forwarded TCP connection (host -> guest), in one process.

Run: .venv/bin/python bench/bench_loop_forward.py [--quick] [--rounds N] [--count]
[--profile]

The rig of bench/bench_loop_request.py (loop, a :class:`~guestnet.io.tap.TapLink` over a unix
datagram socketpair whose other end plays the guest, classifier, TCP core, driver), with a real
published port on 127.0.0.1 (``Forwards.add``, so the listener, the accept and the driver's
``on_forward_accept`` all run). One connection is what ``bench_forward.py``'s ``connrate`` makes
of it: a host client connects and sends 1 byte; guestnet accepts and sends the guest its SYN;
the guest's SYN-ACK; our ACK and the byte; the guest's echo, relayed to the client, which reads
it and closes; our FIN; the guest's ACK and FIN; our last ACK. Only ``Loop.run_once`` is timed
(``time.thread_time``: guestnet's user and system CPU, so its own system calls count, not the
client's or the guest's).

Prints the min and median of batches in microseconds per connection. ``--count``: loop turns
and frames to the guest per connection. ``--profile``: the loop turns under cProfile, the top
functions. Compare two trees with ``PYTHONPATH=OTHER/src`` beside it, interleaved.

The rig's guest answers after the loop has reported the client's byte, so the SYN-ACK finds the
data known and our ACK goes before it (two frames); through a real TAP the guest's SYN-ACK is
queued during our SYN's ``write``, before the accepted socket is watched, and the data segment
carries the ACK (see BENCHMARKS.md, system calls per forwarded connection).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys

from bench_loop_request import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    SYN_OPTS,
    VNET,
    Rig,
    connection,
)

from guestnet.io.tap import VNET_HDR_LEN
from guestnet.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from guestnet.wire.ipv4 import PROTO_TCP, build_ipv4
from guestnet.wire.tcp import ACK, FIN, PSH, SYN, build_tcp

#: The guest port the published port leads to (the bench is the guest: nothing listens).
GUEST_PORT = 5402


class ForwardRig(Rig):
    """The request rig plus a published port; counts the frames sent to the guest."""

    def __init__(self) -> None:
        super().__init__()
        self.fwd_port = self.inst.forwards.add("tcp", 0, GUEST_PORT, "127.0.0.1").host_port
        self.nframes = 0
        #: The source port (ours, as the guest sees it) of the last frame to the guest.
        self.last_sport = 0

    def send_to(self, dport: int, flags: int, seq: int, ack: int, payload: bytes = b"",
                options: bytes = b"") -> None:  # fmt: skip
        """A segment from the guest's GUEST_PORT to the gateway's ``dport``."""
        hlen = 20 + len(options)
        l4 = bytearray(hlen + len(payload))
        l4[hlen:] = payload
        build_tcp(l4, 0, GUEST_PORT, dport, seq, ack, flags, 65535, len(payload), GUEST_IP,
                  GATEWAY_IP, options)  # fmt: skip
        buf = bytearray(34 + len(l4))
        off = build_ethernet(buf, 0, self.our_mac, GUEST_MAC, ETHERTYPE_IPV4)
        build_ipv4(buf, off, GUEST_IP, GATEWAY_IP, PROTO_TCP, len(l4))
        buf[34:] = l4
        self.guest.send(VNET + bytes(buf))

    def frames(self) -> list[tuple[int, int, int]]:
        """(flags, seq, payload length) of every frame guestnet sent the guest so far."""
        out = []
        while True:
            try:
                data = self.guest.recv(70000)
            except BlockingIOError:
                return out
            tcp = VNET_HDR_LEN + 34
            self.last_sport = struct.unpack_from("!H", data, tcp)[0]
            seq, _ack, off, flags = struct.unpack_from("!IIBB", data, tcp + 4)
            total = struct.unpack_from("!H", data, VNET_HDR_LEN + 16)[0]
            out.append((flags, seq, total - 20 - (off >> 4) * 4))
            self.nframes += 1


def forwarded_batch(rig: ForwardRig, n: int) -> None:
    """``n`` forwarded connections, one after the other."""
    g_isn = 9000
    for _ in range(n):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.connect(("127.0.0.1", rig.fwd_port))  # the kernel's handshake: at once
        client.send(b"x")
        got = rig.until(SYN)
        sport = rig.last_sport
        iss = next(s for f, s, _ in got if f & SYN)
        rig.send_to(sport, SYN | ACK, g_isn, iss + 1, options=SYN_OPTS)
        rig.until(ACK | PSH)  # our ACK and the client's byte (one frame or two)
        rig.send_to(sport, ACK | PSH, g_isn + 1, iss + 2, b"y")
        rig.turn()
        client.recv(16)
        client.close()
        rig.until(FIN)
        rig.send_to(sport, ACK | FIN, g_isn + 2, iss + 3)
        rig.turn()
        rig.frames()  # our last ACK


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--count", action="store_true", help="turns and frames per connection")
    p.add_argument("--profile", action="store_true", help="cProfile of the loop turns")
    args = p.parse_args()
    batches, per_batch = (5, 25) if args.quick else (20, 50)
    rig = ForwardRig()
    try:
        connection(rig, 40000)  # the guest speaks: guestnet learns its MAC
        forwarded_batch(rig, 20)  # warm-up
        if args.count:
            rig.turns = rig.nframes = 0
            forwarded_batch(rig, 100)
            print(f"{rig.turns / 100:5.2f} turns  {rig.nframes / 100:5.2f} frames per connection")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            orig = rig.inst.loop.run_once

            def run_once(max_wait: float | None = None) -> None:
                prof.enable()
                orig(max_wait)
                prof.disable()

            rig.inst.loop.run_once = run_once  # type: ignore[method-assign]
            forwarded_batch(rig, batches * per_batch)
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            return 0
        vals = []
        for _ in range(args.rounds * batches):
            rig.cpu = 0.0
            forwarded_batch(rig, per_batch)
            vals.append(rig.cpu * 1e6 / per_batch)
        print(
            f"conn host->guest (forwarded)  min {min(vals):7.1f} us  "
            f"median {statistics.median(vals):7.1f} us"
        )
    finally:
        rig.inst.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
