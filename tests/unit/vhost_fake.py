"""A fake vhost-user front-end (what QEMU 7.2 sends) and a fake virtio-net guest driver.

The front-end speaks the real protocol over a unix socketpair: memfd guest memory passed with
SCM_RIGHTS, real eventfds for kicks and calls, in the order QEMU 7.2 was seen to send them
(/work/shared/VHOST-USER.md section 1). The driver fills the split rings in that memory as a
guest's virtio-net driver would: TX chains (header + frame, optionally scattered), RX buffers
posted one writable descriptor each, and reads back used elements.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import struct
from collections.abc import Callable

from guestnet.io import vhost_user as vu

#: Where the fake guest's memory sits: guest-physical and QEMU-virtual bases (deliberately
#: different, so a translation from the wrong space fails).
GPA_BASE = 0x100000
UADDR_BASE = 0x7F0000000000
MEM_SIZE = 8 << 20
QUEUE_SIZE = 256
#: Ring areas per queue (offsets into guest memory): descriptors, avail, used.
RING_AREA = 0x10000
#: Buffers start here.
BUF_BASE = 0x40000

_HDR = struct.Struct("=III")
_DESC = struct.Struct("<QIHH")
VNET_HDR = struct.Struct("<BBHHHHH")


class FakeFrontend:
    """The QEMU side: a socket, guest memory, and the eventfds it hands to the back-end."""

    def __init__(self, sock: socket.socket, mem_size: int = MEM_SIZE) -> None:
        self.sock = sock
        sock.settimeout(2.0)
        self.memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self.mem = mmap.mmap(self.memfd, mem_size, flags=mmap.MAP_SHARED)
        self.mem_size = mem_size
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]

    def close(self) -> None:
        self.mem.close()
        for fd in (self.memfd, *self.kick, *self.call):
            os.close(fd)
        self.sock.close()

    # -- messages -------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:  # fmt: skip
        flags = vu.FLAG_VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        socket.send_fds(self.sock, [_HDR.pack(request, flags, len(payload)) + payload], fds or [])

    def recv_reply(self, request: int) -> bytes:
        head = self._recv(12)
        req, flags, size = _HDR.unpack(head)
        assert req == request and flags == vu.FLAG_VERSION | vu.FLAG_REPLY
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "back-end closed the connection"
            out += chunk
        return out

    def mem_table_payload(self, regions: list[tuple[int, int, int, int]]) -> bytes:
        out = struct.pack("=II", len(regions), 0)
        for gpa, size, uaddr, offset in regions:
            out += struct.pack("=QQQQ", gpa, size, uaddr, offset)
        return out

    @staticmethod
    def ring_offsets(index: int) -> tuple[int, int, int]:
        base = RING_AREA * (index + 1)
        return base, base + 0x1000, base + 0x2000


def qemu_handshake(fe: FakeFrontend, step: Callable[[], None], features: int | None = None) -> int:
    """QEMU 7.2's sequence up to running rings; ``run()`` turns the back-end's loop once.

    Returns the features acked (all offered unless ``features`` says otherwise).
    """

    def ask(request: int, payload: bytes = b"") -> bytes:
        fe.send(request, payload)
        step()
        return fe.recv_reply(request)

    def tell(request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:  # fmt: skip
        fe.send(request, payload, fds, need_reply)
        step()
        if need_reply:
            assert struct.unpack("=Q", fe.recv_reply(request))[0] == 0

    offered = struct.unpack("=Q", ask(vu.GET_FEATURES))[0]
    proto = struct.unpack("=Q", ask(vu.GET_PROTOCOL_FEATURES))[0]
    tell(vu.SET_PROTOCOL_FEATURES, struct.pack("=Q", proto))
    tell(vu.SET_OWNER)
    ask(vu.GET_FEATURES)
    for q in (0, 1):
        tell(vu.SET_VRING_CALL, struct.pack("=Q", q), [fe.call[q]], need_reply=True)
        tell(vu.SET_VRING_ERR, struct.pack("=Q", q | vu.VRING_NOFD_MASK), need_reply=True)
    for q in (0, 1):
        tell(vu.SET_VRING_ENABLE, struct.pack("=II", q, 1), need_reply=True)
    acked = offered if features is None else features
    tell(vu.SET_FEATURES, struct.pack("=Q", acked), need_reply=True)
    set_mem_table(fe, tell)
    for q in (0, 1):
        d, a, u = fe.ring_offsets(q)
        tell(vu.SET_VRING_NUM, struct.pack("=II", q, QUEUE_SIZE), need_reply=True)
        tell(vu.SET_VRING_BASE, struct.pack("=II", q, 0), need_reply=True)
        addr = struct.pack("=IIQQQQ", q, 0, UADDR_BASE + d, UADDR_BASE + u, UADDR_BASE + a, 0)
        tell(vu.SET_VRING_ADDR, addr, need_reply=True)
        tell(vu.SET_VRING_KICK, struct.pack("=Q", q), [fe.kick[q]], need_reply=True)
        tell(vu.SET_VRING_CALL, struct.pack("=Q", q), [fe.call[q]], need_reply=True)
    return int(acked)


def set_mem_table(fe: FakeFrontend, tell: Callable[..., None]) -> None:
    """One region covering all of the fake guest's memory (what 256 MiB guests get)."""
    payload = fe.mem_table_payload([(GPA_BASE, fe.mem_size, UADDR_BASE, 0)])
    tell(vu.SET_MEM_TABLE, payload, [fe.memfd], need_reply=True)


class FakeDriver:
    """The guest's virtio-net driver on one queue pair, writing rings in the shared memory."""

    def __init__(self, fe: FakeFrontend) -> None:
        self.fe = fe
        self.mem = fe.mem
        self.avail_idx = [0, 0]
        self.used_seen = [0, 0]
        self.next_desc = [0, 0]
        self.next_buf = BUF_BASE

    def alloc(self, size: int) -> int:
        """A guest-physical buffer of ``size`` bytes (a bump allocator that wraps)."""
        if self.next_buf + size > self.fe.mem_size:
            self.next_buf = BUF_BASE
        off = self.next_buf
        self.next_buf += (size + 63) & ~63
        return off

    def write_desc(self, q: int, i: int, gpa: int, length: int, flags: int, nxt: int) -> None:
        d, _a, _u = self.fe.ring_offsets(q)
        _DESC.pack_into(self.mem, d + 16 * i, gpa, length, flags, nxt)

    def make_avail(self, q: int, head: int) -> None:
        _d, a, _u = self.fe.ring_offsets(q)
        struct.pack_into("<H", self.mem, a + 4 + 2 * (self.avail_idx[q] % QUEUE_SIZE), head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, a + 2, self.avail_idx[q])

    def kick(self, q: int) -> None:
        os.eventfd_write(self.fe.kick[q], 1)

    def add_chain(self, q: int, pieces: list[bytes | int], writable: bool = False) -> int:
        """Post a chain: bytes are read-only buffers with that content, ints writable sizes."""
        head = self.next_desc[q]
        n = len(pieces)
        for k, piece in enumerate(pieces):
            i = (head + k) % QUEUE_SIZE
            size = piece if isinstance(piece, int) else len(piece)
            off = self.alloc(size)
            if not isinstance(piece, int):
                self.mem[off : off + size] = piece
            flags = (2 if writable else 0) | (1 if k < n - 1 else 0)
            self.write_desc(q, i, GPA_BASE + off, size, flags, (i + 1) % QUEUE_SIZE)
        self.next_desc[q] = (head + n) % QUEUE_SIZE
        self.make_avail(q, head)
        return head

    def send_frame(self, frame: bytes, hdr: bytes = bytes(12), split: list[int] | None = None,
                   kick: bool = True) -> int:  # fmt: skip
        """Post ``hdr + frame`` on the TX queue, cut at ``split`` offsets into descriptors."""
        data = hdr + frame
        cuts = [0, *(split or []), len(data)]
        pieces: list[bytes | int] = [data[a:b] for a, b in itertools.pairwise(cuts)]
        head = self.add_chain(1, pieces)
        if kick:
            self.kick(1)
        return head

    def post_rx(self, count: int, size: int, kick: bool = True) -> None:
        for _ in range(count):
            self.add_chain(0, [size], writable=True)
        if kick:
            self.kick(0)

    def used(self, q: int) -> list[tuple[int, int]]:
        """New used elements since the last call: (head, len)."""
        _d, _a, u = self.fe.ring_offsets(q)
        idx = struct.unpack_from("<H", self.mem, u + 2)[0]
        out = []
        while self.used_seen[q] != idx:
            k = self.used_seen[q] % QUEUE_SIZE
            out.append(struct.unpack_from("<II", self.mem, u + 4 + 8 * k))
            self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        return out

    def desc_addr(self, q: int, head: int) -> int:
        d, _a, _u = self.fe.ring_offsets(q)
        return int(_DESC.unpack_from(self.mem, d + 16 * head)[0]) - GPA_BASE

    def received(self) -> list[tuple[bytes, bytes, int]]:
        """Frames the back-end wrote into RX buffers: (vnet header, frame, buffers used)."""
        out = []
        used = self.used(0)
        k = 0
        while k < len(used):
            head, length = used[k]
            off = self.desc_addr(0, head)
            first = bytes(self.mem[off : off + length])
            hdr = first[:12]
            nbuf = struct.unpack_from("<H", hdr, 10)[0]
            data = first[12:]
            for head2, len2 in used[k + 1 : k + nbuf]:
                off2 = self.desc_addr(0, head2)
                data += bytes(self.mem[off2 : off2 + len2])
            out.append((hdr, data, nbuf))
            k += max(nbuf, 1)
        return out

    def calls(self, q: int) -> int:
        try:
            return os.eventfd_read(self.fe.call[q])
        except BlockingIOError:
            return 0
