"""Per-frame CPU of the vhost-user link's ring work (issue 14), without QEMU.

Run: .venv/bin/python bench/bench_vhost_user.py [--quick]

A fake front-end (tests/unit/vhost_fake.py: memfd memory, eventfds, QEMU 7.2's handshake) sets
up a VhostUserLink on the instance's loop; a fake driver posts chains in the shared rings. Each
row times only the device side, in CPU time of the thread (``time.thread_time``), per frame,
over batches; min and median of the batches are printed.

Rows:

- ``tx 60B 1 desc``: one descriptor of header + 60-byte frame, handed to a classifier that does
  nothing (a view of guest memory: no copy), then returned: ring bookkeeping only.
- ``tx 64KiB 2 desc``: header, then one 65,549-byte frame: still a view, no copy.
- ``tx 64KiB 18 desc``: header, 66 bytes of headers, 16 buffers of up to 4 KiB (as Linux posts
  a TSO frame with scatter-gather): gathered into a pool frame (one copy).
- ``rx 1514B``: a 1,514-byte frame from the pool written into one 1,536-byte buffer with its
  virtio-net header, the used element published.
- ``rx 64KiB gso``: a 65,535-byte IP super-frame (gso_size 1460) over 17 mergeable 4 KiB buffers.

The call eventfd is signalled once per loop turn, not per frame, so it is not in these figures.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))

from vhost_fake import (
    VNET_HDR,
    FakeDriver,
    FakeFrontend,
    qemu_handshake,
)

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.core.port import Port
from guestnet.io import vhost_user as vu


def setup() -> tuple[Instance, vu.VhostUserLink, FakeFrontend, FakeDriver]:
    inst = Instance(Config())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = vu.VhostUserLink(inst.hub, ours, "vhost0")
    fe = FakeFrontend(theirs)

    def step() -> None:
        for _ in range(2):
            inst.loop.run_once(max_wait=0.0)

    qemu_handshake(fe, step)

    def null(_view: memoryview, _port: Port, _now: float, _trusted: bool) -> None:
        pass

    inst.hub.deliver = null
    return inst, link, fe, FakeDriver(fe)


def prepare_chains(
    drv: FakeDriver, q: int, chains: list[list[bytes | int]], writable: bool
) -> list[int]:
    """Write descriptors for ``chains`` once; return their heads (reposted each batch)."""
    heads = []
    for chain in chains:
        heads.append(drv.add_chain(q, chain, writable))
    return heads


def repost(drv: FakeDriver, q: int, heads: list[int]) -> None:
    for h in heads:
        drv.make_avail(q, h)


def timed(
    batches: int, per_batch: int, prep: Callable[[], None], work: Callable[[], None]
) -> tuple[float, float]:
    samples = []
    for _ in range(batches):
        prep()
        t0 = time.thread_time()
        work()
        samples.append((time.thread_time() - t0) / per_batch * 1e6)
    return min(samples), statistics.median(samples)


def bench_tx(
    drv: FakeDriver, link: vu.VhostUserLink, chain: list[bytes | int], batches: int
) -> tuple[float, float]:
    per = 64  # RX_BUDGET: one _serve_tx call takes this many
    heads = prepare_chains(drv, 1, [chain] * per, False)
    link._serve_tx()  # the first round (prepare_chains made them available)
    return timed(batches, per, lambda: repost(drv, 1, heads), link._serve_tx)


def bench_rx(inst: Instance, drv: FakeDriver, link: vu.VhostUserLink, data: bytes, gso: int,
             buf: int, per: int, batches: int) -> tuple[float, float]:  # fmt: skip
    need = -(-(12 + len(data)) // buf)
    heads = prepare_chains(drv, 0, [[buf]] * (need * per), True)
    # prepare_chains also made them available; the device has not taken them yet, so rewind
    # the driver's index: each batch's repost writes the same ring entries and index again.
    drv.avail_idx[0] = link.queues[0].last_avail
    pool = inst.pool_to_guest

    def work() -> None:
        for _ in range(per):
            f = pool.acquire()
            f.view[f.start : f.start + len(data)] = data
            f.length = len(data)
            if gso:
                f.csum_start, f.csum_offset, f.gso_size = 34, 16, gso
            link.send(f)

    # Time only the send; the frame fill is in it too (a memcpy of the frame, small).
    return timed(batches, per, lambda: repost(drv, 0, heads), work)


def main() -> None:
    quick = "--quick" in sys.argv
    batches = 10 if quick else 40
    inst, link, fe, drv = setup()
    hdr = bytes(12)
    tso_hdr = VNET_HDR.pack(1, 1, 66, 1448, 34, 16, 0)
    rows: list[tuple[str, tuple[float, float]]] = []
    rows.append(("tx 60B 1 desc", bench_tx(drv, link, [hdr + bytes(60)], batches)))
    # The largest TSO frame: a 65,535-byte IP packet behind 14 bytes of Ethernet.
    rows.append(("tx 64KiB 2 desc", bench_tx(drv, link, [tso_hdr, bytes(65549)], batches)))
    sg: list[bytes | int] = [tso_hdr, bytes(66), *[bytes(4096)] * 15, bytes(65549 - 66 - 61440)]
    rows.append(("tx 64KiB 18 desc", bench_tx(drv, link, sg, batches)))
    frame1514 = bytes(1514)
    rows.append(("rx 1514B", bench_rx(inst, drv, link, frame1514, 0, 1536, 64, batches)))
    big = bytes(14 + 65535)
    rows.append(("rx 64KiB gso", bench_rx(inst, drv, link, big, 1460, 4096, 8, batches)))
    drops = dict(link.drops)
    print(f"{'row':<20} {'min us/frame':>14} {'median us/frame':>16} {'frames/s (median)':>18}")
    for name, (lo, med) in rows:
        print(f"{name:<20} {lo:>14.2f} {med:>16.2f} {1e6 / med:>18,.0f}")
    print(f"link: frames_from_guest={link.frames_from_guest} frames_to_guest={link.frames_to_guest}"
          f" ring_full={link.ring_full} drops={drops}")  # fmt: skip
    assert not drops, drops
    inst.close()
    fe.close()


if __name__ == "__main__":
    main()
