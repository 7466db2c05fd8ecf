"""CPU time of the whole datapath per TCP request, in one process: loop, TAP link, classifier,
TCP core and driver, with real system calls on both sides.

Run: .venv/bin/python bench/bench_loop_request.py [--quick] [--rounds N] [--mtu N] [--only rr]

bench/bench_tcp_request.py times the TCP core alone with a scripted driver; on the real path
the loop, the link and the driver (epoll, reads until EAGAIN, closures, timers) run around it,
and their system calls cost what they cost. This bench runs that whole path: a
:class:`~guestnet.io.tap.TapLink` over a unix datagram socketpair (one read, one frame, exactly
as a TAP; the other end plays the guest, writing frames with a virtio-net header whose flags
vouch for the checksum, as a TAP with offloads does), the port set to take offloads as on a
TAP, and the host side a real loopback TCP server driven by the bench between loop turns. Only
``Loop.run_once`` is timed (``time.thread_time``: the thread's user and system time, so the
kernel work inside guestnet's own system calls counts, but not the guest's or the server's).

Rows (min and median of batches, microseconds per request):

- ``rr 1 byte``: one round trip on an established flow: the guest's 1-byte request (acking the
  previous answer) through one loop turn to the host socket, the server's 1-byte answer through
  the next turn to the guest.
- ``conn guest->host``: connect + 1 byte + echo + close as ``netbench connrate`` makes it:
  guest SYN, host connect, SYN-ACK, guest ACK, data, echo, guest FIN, server close, our FIN,
  the guest's last ACK, which frees the flow (the guest closed first: no linger).

Compare two trees by running this file with ``PYTHONPATH=OTHER/src`` beside it, interleaved.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.tap import TSO_MAX_PACKET, VNET_F_DATA_VALID, VNET_HDR_LEN, TapLink
from guestnet.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from guestnet.wire.ipv4 import PROTO_TCP, build_ipv4
from guestnet.wire.tcp import ACK, FIN, PSH, SYN, build_syn_options, build_tcp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY_IP = bytes([10, 0, 2, 2])
VNET = bytes([VNET_F_DATA_VALID]) + bytes(VNET_HDR_LEN - 1)
SYN_OPTS = build_syn_options(1460, 7)


class Rig:
    """guestnet's loop with one TAP-like link; the bench is the guest and the host server."""

    def __init__(self, mtu: int | None = None) -> None:
        self.inst = Instance(Config() if mtu is None else Config(mtu=mtu), echo_mode=None)
        ours, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.guest.setblocking(False)
        self.link = TapLink(self.inst.hub, ours.detach(), "tap0", "eth0", offloads=0)
        self.link.port.offload_max = TSO_MAX_PACKET  # as a TAP with offloads announces
        self.our_mac = self.inst.config.mac
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.cpu = 0.0
        self.turns = 0
        #: Frames sent to the guest, and the source port (ours, as the guest sees it) of the last.
        self.nframes = 0
        self.last_sport = 0

    def turn(self) -> None:
        """One loop turn, timed."""
        t0 = time.thread_time()
        self.inst.loop.run_once(max_wait=0)
        self.cpu += time.thread_time() - t0
        self.turns += 1

    def send(self, sport: int, flags: int, seq: int, ack: int, payload: bytes = b"",
             options: bytes = b"", dport: int | None = None) -> None:  # fmt: skip
        """A segment from the guest's ``sport`` to the gateway's ``dport`` (the server's port
        unless given)."""
        hlen = 20 + len(options)
        l4 = bytearray(hlen + len(payload))
        l4[hlen:] = payload
        to = self.port if dport is None else dport
        build_tcp(l4, 0, sport, to, seq, ack, flags, 65535, len(payload), GUEST_IP, GATEWAY_IP,
                  options)  # fmt: skip
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

    def until(self, want: int) -> list[tuple[int, int, int]]:
        """Loop turns until a frame with all of ``want``'s flags reaches the guest."""
        got: list[tuple[int, int, int]] = []
        for _ in range(50):
            self.turn()
            got += self.frames()
            if any(f & want == want for f, _, _ in got):
                return got
        raise RuntimeError(f"no frame with flags {want:#x}: {got}")


def connection(rig: Rig, sport: int) -> tuple[socket.socket, int, int]:
    """Open a flow from the guest: (server side socket, guest's next seq, our next seq)."""
    isn = 5000
    rig.send(sport, SYN, isn, 0, options=SYN_OPTS)
    got = rig.until(SYN | ACK)
    iss = next(s for f, s, _ in got if f & SYN)
    conn, _ = rig.server.accept()
    rig.send(sport, ACK, isn + 1, iss + 1)
    rig.turn()
    return conn, isn + 1, iss + 1


def rr_batch(rig: Rig, state: list[int], conn: socket.socket, n: int) -> None:
    sport, seq, ack = state
    for _ in range(n):
        rig.send(sport, ACK | PSH, seq, ack, b"x")
        rig.turn()
        seq += 1
        conn.recv(16)
        conn.send(b"y")
        for _f, s, plen in rig.until(ACK | PSH):
            if plen:
                ack = s + plen
    state[1], state[2] = seq, ack


def conn_batch(rig: Rig, ports: list[int], n: int) -> None:
    for _ in range(n):
        sport = ports[0] = ports[0] + 1
        conn, seq, ack = connection(rig, sport)
        rig.send(sport, ACK | PSH, seq, ack, b"x")
        rig.turn()
        conn.recv(16)
        conn.send(b"y")
        rig.until(ACK | PSH)
        rig.send(sport, ACK | FIN, seq + 1, ack + 1)
        rig.turn()
        conn.recv(16)  # EOF
        conn.close()
        rig.until(FIN)
        rig.send(sport, ACK, seq + 2, ack + 2)
        rig.turn()


def measure(batches: int, per_batch: int, rounds: int, mtu: int | None = None,
            only: str | None = None) -> None:  # fmt: skip
    rig = Rig(mtu)
    try:
        conn, seq, ack = connection(rig, 40000)
        state = [40000, seq, ack]
        ports = [41000]
        rr_batch(rig, state, conn, 50)  # warm-up
        conn_batch(rig, ports, 20)
        rows: dict[str, list[float]] = {"rr 1 byte": [], "conn guest->host": []}
        for _ in range(rounds * batches):
            for name, run, n in (
                ("rr 1 byte", lambda k: rr_batch(rig, state, conn, k), 1),
                ("conn guest->host", lambda k: conn_batch(rig, ports, k), 4),
            ):
                if only is not None and not name.startswith(only):
                    continue
                rig.cpu = 0.0
                count = per_batch // n
                run(count)
                rows[name].append(rig.cpu * 1e6 / count)
        for name, vals in rows.items():
            if not vals:
                continue
            print(f"{name:<18} min {min(vals):7.1f} us  median {statistics.median(vals):7.1f} us")
        counters = rig.inst.counters.snapshot() if hasattr(rig.inst.counters, "snapshot") else {}
        if counters:
            print({k: v for k, v in counters.items() if "rst" in k or "drop" in k})
    finally:
        rig.inst.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mtu", type=int, default=None, help="the link MTU (default: Config's)")
    p.add_argument("--only", choices=("rr", "conn"), help="one row only")
    args = p.parse_args()
    batches, per_batch = (5, 100) if args.quick else (20, 200)
    measure(batches, per_batch, args.rounds, args.mtu, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
