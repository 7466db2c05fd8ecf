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
import sys

from bench_loop_request import (
    SYN_OPTS,
    Rig,
    connection,
)

from guestnet.wire.tcp import ACK, FIN, PSH, SYN

#: The guest port the published port leads to (the bench is the guest: nothing listens).
GUEST_PORT = 5402


class ForwardRig(Rig):
    """The request rig plus a published port."""

    def __init__(self) -> None:
        super().__init__()
        self.fwd_port = self.inst.forwards.add("tcp", 0, GUEST_PORT, "127.0.0.1").host_port


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
        rig.send(GUEST_PORT, SYN | ACK, g_isn, iss + 1, options=SYN_OPTS, dport=sport)
        rig.until(ACK | PSH)  # our ACK and the client's byte (one frame or two)
        rig.send(GUEST_PORT, ACK | PSH, g_isn + 1, iss + 2, b"y", dport=sport)
        rig.turn()
        client.recv(16)
        client.close()
        rig.until(FIN)
        rig.send(GUEST_PORT, ACK | FIN, g_isn + 2, iss + 3, dport=sport)
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
