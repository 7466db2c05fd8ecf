"""vhost-user-net links: a QEMU guest whose virtio-net rings live in memory shared with us.

Theory of operation
-------------------
guestnet listens on a unix socket; QEMU (``-chardev socket`` + ``-netdev vhost-user``) connects
as the front-end and drives the device with vhost-user messages: a 12-byte header (``u32
request, flags, size``), a payload, and file descriptors as ``SCM_RIGHTS`` on the header. Every
message with NEED_REPLY set is answered (REPLY_ACK: ``u64 0`` for success); the GET_* messages
answer anyway. One connection is one :class:`VhostUserLink`; a new connection (QEMU's
``reconnect=``, a backend restart) is a new link, and the guest's rings resume at the indices
QEMU sends (SET_VRING_BASE).

SET_MEM_TABLE passes one fd per guest memory region; each is mapped shared and wrapped in a
:class:`~guestnet.wire.virtio.Region`. A second table (reconnect, hotplug) first releases every
view of the old mapping (the ring views, the region views) and then closes it: an mmap with a
live view cannot be closed, and no view of guest memory outlives the message loop's turn (a TX
frame is consumed by the classifier before its descriptor is returned).

Queue 0 is RX (toward the guest), queue 1 TX. Each has a kick eventfd (the guest made buffers
available) in the loop's epoll and a call eventfd we signal. TX kick: chains are walked (see
:mod:`guestnet.wire.virtio`), the frame after the 12-byte virtio-net header goes to the
classifier (as a view of guest memory when it is one descriptor, else gathered into a pool
frame), then the chain is returned. Frames toward the guest are written into its RX buffers with
a header built like the TAP link's (:func:`guestnet.io.tap.build_vnet_hdr`), spread over as many
mergeable buffers as they need (``num_buffers``); with no buffer free they wait in the link's
bounded queue until the RX kick (``ring_full`` counted). The call eventfd is signalled once per
loop turn in which a used ring moved, never per frame; there is no EVENT_IDX, so no store-load
fence is needed, and x86-64's store order publishes ``used.idx`` after the elements.
Elsewhere (ARM64) that order does not hold: the link refuses to start.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import select
import socket
import stat
import struct

from guestnet.core.port import Port
from guestnet.io.links import RX_BUDGET, Deliver, Link, LinkHub
from guestnet.io.listener import Listener, bind_private
from guestnet.io.loop import EPOLLIN, Handler
from guestnet.io.tap import TSO_MAX_PACKET, build_vnet_hdr
from guestnet.pool import HEADROOM, Frame
from guestnet.wire.virtio import (
    TAKE_SHORT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VNET_HDR_LEN,
    WALK_ERRORS,
    WALK_OK,
    GuestMemory,
    Region,
    VirtQueue,
)

log = logging.getLogger(__name__)

# Message ids (vhost-user.rst, front-end to back-end).
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
NET_SET_MTU = 20

#: Header flags.
FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
#: Protocol feature bits.
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_NET_MTU = 4
#: Payload bit of SET_VRING_KICK/CALL/ERR: no fd (polling); bits 0-7 are the queue.
VRING_NOFD_MASK = 0x100
#: At most this many memory regions (the protocol's limit without CONFIGURE_MEM_SLOTS).
MAX_REGIONS = 8
#: Longest payload we accept; anything longer is a broken front-end.
MAX_PAYLOAD = 4096
#: Seconds to wait for the rest of a message once its header arrived.
MESSAGE_TIMEOUT = 1.0

RXQ = 0
TXQ = 1

#: virtio-net header flags and gso types (as the TAP link reads them).
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
_GSO_ECN = 0x80
_GSO_ACCEPTED = frozenset({0, 1, 4})

#: Features offered always, and with offloads.
BASE_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    | (1 << VIRTIO_NET_F_MTU)
)
OFFLOAD_FEATURES = (
    (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
)
PROTOCOL_FEATURES = (1 << PROTOCOL_F_REPLY_ACK) | (1 << PROTOCOL_F_NET_MTU)
_GUEST_TSO = (
    (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6)
)

_HDR = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")


def check_platform() -> None:
    """Raise RuntimeError unless the CPU keeps store order (x86-64): see the module docstring."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise RuntimeError(
            f"vhost-user needs x86-64 (this is {machine}): without a memory fence the used ring "
            "could be published before its elements"
        )


class _Mapping:
    """One mmap of a region's fd, kept so it can be closed once its views are released."""

    def __init__(self, fd: int, size: int, mmap_offset: int) -> None:
        # A mapping past the end of the file would fault (SIGBUS) on first touch: refuse it.
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and mmap_offset + size > st.st_size:
            raise ValueError(f"region of {size} bytes at {mmap_offset} past the file's end")
        gran = mmap.ALLOCATIONGRANULARITY
        aligned = mmap_offset - mmap_offset % gran
        extra = mmap_offset - aligned
        self.mm = mmap.mmap(
            fd,
            extra + size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        base = memoryview(self.mm)
        self.view = base[extra : extra + size]
        base.release()

    def close(self) -> bool:
        """Unmap; False when a view is still alive (the mapping then goes with the last view)."""
        try:
            self.mm.close()
        except BufferError:
            return False
        return True


class VhostUserLink(Link):
    """One vhost-user front-end connection: the control messages and the two rings."""

    kind = "vhost-user"

    def __init__(self, hub: LinkHub, sock: socket.socket, name: str, offloads: bool = True) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.offered = BASE_FEATURES | (OFFLOAD_FEATURES if offloads else 0)
        self.features = 0
        self.protocol_features = 0
        self.mtu = 0
        self.mem = GuestMemory([])
        self._mappings: list[_Mapping] = []
        self.queues = (VirtQueue(RXQ), VirtQueue(TXQ))
        self.kick_fds = [-1, -1]
        self.call_fds = [-1, -1]
        self.err_fds = [-1, -1]
        self._call_due = [False, False]
        self._call_scheduled = False
        self._rx_spans: list[tuple[memoryview, int, int]] = []
        self._rx_used: list[tuple[int, int]] = []
        #: Counters shown in /stats (per link).
        self.kicks = 0
        self.calls = 0
        self.frames_from_guest = 0
        self.descs_from_guest = 0
        self.frames_to_guest = 0
        self.buffers_to_guest = 0
        self.gso_from_guest = 0
        self.gso_to_guest = 0
        self.ring_full = 0
        self.drops: dict[str, int] = {}
        super().__init__(hub, sock.fileno(), name)

    # -- control messages ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(RX_BUDGET):
            try:
                msg = self._recv_message()
            except BlockingIOError:
                return
            except (OSError, ValueError) as exc:
                self.hub.counters.inc("link.vhost.control_error")
                log.info("%s: %s; closing", self.name, exc)
                self.close()
                return
            if msg is None:
                log.info("%s: front-end closed the connection", self.name)
                self.close()
                return
            request, flags, payload, fds = msg
            try:
                self.handle(request, flags, payload, fds)
            except OSError as exc:
                self.hub.counters.inc("link.vhost.control_error")
                log.info("%s: request %d: %s; closing", self.name, request, exc)
                self.close()
                return
            if self.closed:
                return

    def _recv_message(self) -> tuple[int, int, bytes, list[int]] | None:
        """One whole message, or None at EOF; BlockingIOError when none is waiting."""
        head, fds, _flags, _addr = socket.recv_fds(self.sock, _HDR.size, 8)
        if not head:
            _close_all(fds)
            return None
        try:
            head += self._recv_exact(_HDR.size - len(head))
            request, flags, size = _HDR.unpack(head)
            if size > MAX_PAYLOAD:
                raise ValueError(f"message {request} payload of {size} bytes")
            payload = self._recv_exact(size)
        except BaseException:
            _close_all(fds)
            raise
        return request, flags, payload, fds

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except BlockingIOError:
                if not select.select([self.sock], [], [], MESSAGE_TIMEOUT)[0]:
                    raise ValueError("truncated message") from None
                continue
            if not chunk:
                raise ValueError("connection closed inside a message")
            out += chunk
        return out

    def _reply(self, request: int, payload: bytes) -> None:
        # Bounded: a front-end that stops reading fails the send (OSError: closed), never hangs us.
        self.sock.settimeout(MESSAGE_TIMEOUT)
        try:
            self.sock.sendall(_HDR.pack(request, FLAG_VERSION | FLAG_REPLY, len(payload)) + payload)
        finally:
            self.sock.setblocking(False)

    def handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        """Act on one message; reply when it asks for one (NEED_REPLY) or is a GET."""
        ok = True
        reply: bytes | None = None
        try:
            if request == GET_FEATURES:
                reply = _U64.pack(self.offered)
            elif request == SET_FEATURES:
                self._set_features(_U64.unpack_from(payload)[0])
            elif request == GET_PROTOCOL_FEATURES:
                reply = _U64.pack(PROTOCOL_FEATURES)
            elif request == SET_PROTOCOL_FEATURES:
                self.protocol_features = _U64.unpack_from(payload)[0] & PROTOCOL_FEATURES
            elif request in (SET_OWNER, RESET_OWNER):
                pass
            elif request == SET_MEM_TABLE:
                ok = self._set_mem_table(payload, fds)
                fds = []
            elif request == SET_VRING_NUM:
                ok = self._set_vring_num(*_STATE.unpack_from(payload))
            elif request == SET_VRING_ADDR:
                ok = self._set_vring_addr(payload)
            elif request == SET_VRING_BASE:
                index, num = _STATE.unpack_from(payload)
                if ok := index < 2 and num <= 0xFFFF:
                    self.queues[index].last_avail = num
                    self.queues[index].used_idx = num
            elif request == GET_VRING_BASE:
                index, _num = _STATE.unpack_from(payload)
                base = self._stop_queue(index) if index < 2 else 0
                reply = _STATE.pack(index, base)
            elif request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
                ok = self._set_vring_fd(request, _U64.unpack_from(payload)[0], fds)
                fds = []
            elif request == GET_QUEUE_NUM:
                reply = _U64.pack(1)
            elif request == SET_VRING_ENABLE:
                index, num = _STATE.unpack_from(payload)
                if ok := index < 2:
                    self.queues[index].enabled = bool(num)
                    self._queue_changed(index)
            elif request == NET_SET_MTU:
                self.mtu = _U64.unpack_from(payload)[0]
            else:
                self.hub.counters.inc("link.vhost.unknown_request")
                log.info("%s: unhandled request %d", self.name, request)
                ok = False
        except struct.error:
            self.hub.counters.inc("link.vhost.short_payload")
            ok = False
        finally:
            _close_all(fds)
        if reply is not None:
            self._reply(request, reply)
        elif flags & FLAG_NEED_REPLY:
            self._reply(request, _U64.pack(0 if ok else 1))

    def _set_features(self, features: int) -> None:
        self.features = features & self.offered
        guest_tso = self.features & _GUEST_TSO == _GUEST_TSO
        self.port.offload_max = TSO_MAX_PACKET if guest_tso else 0

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> bool:
        n = _STATE.unpack_from(payload)[0]
        if not 0 < n <= MAX_REGIONS or len(fds) != n or len(payload) < 8 + _REGION.size * n:
            _close_all(fds)
            self.hub.counters.inc("link.vhost.bad_mem_table")
            return False
        mappings: list[_Mapping] = []
        regions: list[Region] = []
        try:
            for i in range(n):
                gpa, size, uaddr, offset = _REGION.unpack_from(payload, 8 + _REGION.size * i)
                m = _Mapping(fds[i], size, offset)
                mappings.append(m)
                regions.append(Region(gpa, size, uaddr, m.view))
        except (OSError, ValueError, OverflowError) as exc:
            log.warning("%s: cannot map guest memory: %s", self.name, exc)
            self.hub.counters.inc("link.vhost.bad_mem_table")
            for r in regions:
                r.view.release()
            for m in mappings:
                m.close()
            return False
        finally:
            _close_all(fds)
        self._unmap_memory()
        self.mem = GuestMemory(regions)
        self._mappings = mappings
        for q in self.queues:
            if q.addrs is not None:
                self._map_queue(q)
        return True

    def _unmap_memory(self) -> None:
        for q in self.queues:
            q.unmap()
        self._release_rx_views()
        self.mem.release()
        for m in self._mappings:
            if not m.close():
                self.hub.counters.inc("link.vhost.unmap_deferred")
        self._mappings = []

    def _set_vring_num(self, index: int, num: int) -> bool:
        if index >= 2 or not 0 < num <= 32768 or num & (num - 1):
            return False
        q = self.queues[index]
        q.num = num
        if q.desc is not None:
            # Resized under live rings: their views no longer fit; map them anew.
            return self._map_queue(q)
        return True

    def _set_vring_addr(self, payload: bytes) -> bool:
        index, _flags, desc, used, avail, _log = _ADDR.unpack_from(payload)
        if index >= 2:
            return False
        q = self.queues[index]
        q.addrs = (desc, avail, used)
        if self.mem.regions:
            return self._map_queue(q)
        return True

    def _map_queue(self, q: VirtQueue) -> bool:
        if not q.map(self.mem):
            self.hub.counters.inc("link.vhost.ring_outside_memory")
            return False
        # Resume from what the guest last saw returned (in-flight chains of a dead back-end
        # are lost either way, as libvhost-user does).
        assert q.used is not None
        used_idx = struct.unpack_from("<H", q.used, 2)[0]
        if used_idx != q.last_avail:
            q.last_avail = used_idx
        q.used_idx = used_idx
        self._queue_changed(q.index)
        return True

    def _set_vring_fd(self, request: int, value: int, fds: list[int]) -> bool:
        index = value & 0xFF
        fd = fds.pop(0) if fds and not value & VRING_NOFD_MASK else -1
        _close_all(fds)
        if index >= 2:
            _close_fd(fd)
            return False
        if request == SET_VRING_KICK:
            old = self.kick_fds[index]
            if old >= 0:
                self.hub.loop.remove_fd(old)
                _close_fd(old)
            self.kick_fds[index] = fd
            if fd >= 0:
                os.set_blocking(fd, False)
                self.hub.loop.add_fd(fd, EPOLLIN, self._kick_handler(index))
            q = self.queues[index]
            q.started = fd >= 0
            if not self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                q.enabled = True  # without protocol features a ring runs once kicked
            self._queue_changed(index)
        else:
            table = self.call_fds if request == SET_VRING_CALL else self.err_fds
            _close_fd(table[index])
            table[index] = fd
        return True

    def _stop_queue(self, index: int) -> int:
        q = self.queues[index]
        fd = self.kick_fds[index]
        if fd >= 0:
            self.hub.loop.remove_fd(fd)
            _close_fd(fd)
            self.kick_fds[index] = -1
        base = q.last_avail
        q.reset()
        return base

    def _queue_changed(self, index: int) -> None:
        """A queue may have become usable: serve what waits (frames queued, buffers posted)."""
        if not self.queues[index].ready:
            return
        if index == TXQ:
            self._serve_tx()
        else:
            self._flush_rx()

    def _kick_handler(self, index: int) -> Handler:
        def on_kick(_events: int) -> None:
            try:
                os.eventfd_read(self.kick_fds[index])
            except (BlockingIOError, OSError):
                return
            self.kicks += 1
            if index == TXQ:
                self._serve_tx()
            else:
                self._flush_rx()

        return on_kick

    # -- notifications ------------------------------------------------------------------------

    def _want_call(self, index: int) -> None:
        self._call_due[index] = True
        if not self._call_scheduled:
            self._call_scheduled = True
            self.hub.loop.call_at(0.0, self._signal_calls)

    def _signal_calls(self, _now: float) -> None:
        self._call_scheduled = False
        for index in (RXQ, TXQ):
            if self._call_due[index]:
                self._call_due[index] = False
                fd = self.call_fds[index]
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.eventfd_write(fd, 1)
                    self.calls += 1

    # -- guest to us (TX ring) ----------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.hub.counters.inc(f"link.vhost.{reason}")

    def _serve_tx(self) -> None:
        q = self.queues[TXQ]
        if not q.ready:
            return
        hub = self.hub
        mem = self.mem
        classify = hub.deliver
        port = self.port
        now = hub.loop.now()
        # No frame longer than a pool slot holds (what every other link can deliver at most).
        max_frame = hub.pool_from_guest.slot_size - HEADROOM
        moved = False
        for _ in range(RX_BUDGET):
            if not q.pending():
                break
            head = q.pop()
            err, total = q.walk_spans(head, mem, False)
            if err != WALK_OK:
                self._drop(f"tx.{WALK_ERRORS[err]}")
            elif total <= VNET_HDR_LEN:
                self._drop("tx.short")
            elif total - VNET_HDR_LEN > max_frame:
                self._drop("tx.too_big")
            else:
                self._deliver_chain(q.spans, total, classify, port, now)
            q.spans.clear()
            q.push(head, 0)
            moved = True
            if self.closed:
                return
        if moved:
            hub.end_burst()  # what the NAT gathered from this burst leaves now (UDP batches)
        if q.broken:
            self._drop("tx.ring_broken")
            log.warning("%s: TX ring corrupt (avail index); queue stopped", self.name)
        if moved:
            q.publish()
            self._want_call(TXQ)
            if q.pending():
                # Budget spent: come back on the next turn (the kick will not repeat).
                hub.loop.call_at(0.0, lambda _now: self._serve_tx())

    def _deliver_chain(
        self,
        spans: list[tuple[memoryview, int, int]],
        total: int,
        classify: Deliver,
        port: Port,
        now: float,
    ) -> None:
        """Hand one TX chain's frame to the classifier: a view of guest memory when the frame is
        contiguous (one slice of the region), else gathered into a pool frame."""
        region, off, n0 = spans[0]
        self.descs_from_guest += len(spans)
        self.frames_from_guest += 1
        hdr: memoryview | None = None
        pooled: Frame | None = None
        if n0 >= VNET_HDR_LEN:
            hflags, gso_type = region[off], region[off + 1]
            hdr = region[off : off + VNET_HDR_LEN]
        else:
            hflags, gso_type = 0, 0
        if len(spans) == 1:
            frame_view = region[off + VNET_HDR_LEN : off + n0]
        elif len(spans) == 2 and n0 == VNET_HDR_LEN:
            r1, o1, n1 = spans[1]
            frame_view = r1[o1 : o1 + n1]
        else:
            pool = self.hub.pool_from_guest
            pooled = pool.acquire()
            view = pooled.view
            at = pooled.start - VNET_HDR_LEN
            if at + total > len(view):
                pool.release(pooled)
                if hdr is not None:
                    hdr.release()
                self._drop("tx.too_big")
                return
            for r, o, n in spans:
                view[at : at + n] = r[o : o + n]
                at += n
            hflags, gso_type = view[pooled.start - VNET_HDR_LEN], view[pooled.start - 11]
            frame_view = view[pooled.start : pooled.start - VNET_HDR_LEN + total]
            if hdr is not None:
                hdr.release()
            # The header, gathered: it may have spanned descriptors.
            hdr = view[pooled.start - VNET_HDR_LEN : pooled.start]
        try:
            if gso_type and (gso_type & ~_GSO_ECN) not in _GSO_ACCEPTED:
                self._drop("tx.gso_unsupported")
                return
            if gso_type:
                self.gso_from_guest += 1
            trusted = bool(hflags & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID))
            # The header, for the switch: a partial checksum is completed (or the offload
            # carried over) when the frame goes on to another guest (core/switch.py).
            port.rx_vnet = hdr
            classify(frame_view, port, now, trusted)
        finally:
            port.rx_vnet = None
            frame_view.release()
            if hdr is not None:
                hdr.release()
            if pooled is not None:
                self.hub.pool_from_guest.release(pooled)

    # -- us to guest (RX ring) ----------------------------------------------------------------

    def _backlog(self, frame: Frame, done: int) -> None:
        """No RX buffer for ``frame`` now: it waits in the link's queue until the guest posts
        more (the RX kick), not for the fd (:meth:`Link.send` does the rest)."""
        self.ring_full += 1
        self._enqueue(frame)

    def _flush_rx(self) -> None:
        q = self._txq
        release = self.hub.pool_to_guest.release
        while q:
            done = self._write(q[0], 0)
            if done is None:
                q.popleft()
            elif done < 0:
                release(q.popleft())
            else:
                return

    def _write(self, frame: Frame, offset: int) -> int | None:
        """Copy header and frame into RX buffers: None done, 0 no room now, -1 dropped.

        Chains are taken (:meth:`VirtQueue.take_writable`: spans of guest memory, no view per
        buffer) until they hold the whole frame; then ``num_buffers`` goes into the header, the
        frame is copied with one slice assignment per buffer, and the chains are returned in one
        publish.
        """
        q = self.queues[RXQ]
        if not q.ready:
            self._drop("rx.not_ready")
            return -1
        view = frame.view
        hdr_at = frame.start - VNET_HDR_LEN
        build_vnet_hdr(view, hdr_at, frame)
        need = VNET_HDR_LEN + frame.length
        mergeable = bool(self.features & (1 << VIRTIO_NET_F_MRG_RXBUF))
        spans = self._rx_spans
        used = self._rx_used
        err = q.take_writable(self.mem, need, spans, used, mergeable)
        if err == TAKE_SHORT:
            too_small = not mergeable and bool(used)  # one chain, and it cannot hold the frame
            self._rx_rollback(q)
            if too_small:
                self._drop("rx.buffer_too_small")
                return -1
            return -1 if q.broken else 0
        if err != WALK_OK:
            # A bad RX chain cannot be skipped inside a mergeable frame: stop the queue.
            self._drop(f"rx.{WALK_ERRORS[err]}")
            q.broken = True
            self._rx_rollback(q)
            return -1
        struct.pack_into("<H", view, hdr_at + 10, len(used))
        pos = hdr_at
        end = hdr_at + need
        for region, off, n in spans:
            if n >= end - pos:
                n = end - pos
                region[off : off + n] = view[pos:end]
                break
            region[off : off + n] = view[pos : pos + n]
            pos += n
        q.push_many(used)
        q.publish()
        self.frames_to_guest += 1
        self.buffers_to_guest += len(used)
        if frame.gso_size:
            self.gso_to_guest += 1
        spans.clear()
        used.clear()
        self._want_call(RXQ)
        self.hub.pool_to_guest.release(frame)
        return None

    def _rx_rollback(self, q: VirtQueue) -> None:
        """Give back chains popped for a frame that did not fit (not yet pushed)."""
        n = len(self._rx_used)
        q.last_avail = (q.last_avail - n) & 0xFFFF
        q.in_flight = max(0, q.in_flight - n)
        self._release_rx_views()

    def _release_rx_views(self) -> None:
        """Forget the spans of guest memory taken for a frame (before the memory is unmapped)."""
        self._rx_spans.clear()
        self._rx_used.clear()

    # -- teardown and stats -------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection: stop both rings, unmap guest memory, close every eventfd."""
        if self.closed:
            return
        for index in (RXQ, TXQ):
            self._stop_queue(index)
            for table in (self.call_fds, self.err_fds):
                _close_fd(table[index])
                table[index] = -1
        self._unmap_memory()
        # Keep the totals of a finished connection in the shared counters (shown in /stats).
        counters = self.hub.counters
        for key in _TOTALS:
            value = getattr(self, key)
            if value:
                counters.inc(f"link.vhost.{key}", value)
        super().close()

    def _close_fd(self) -> None:
        self.sock.close()

    def stats(self) -> dict[str, object]:
        """Per-link counters: kicks, calls, frames, descriptors per frame, GSO, ring full."""
        out = super().stats()
        frames = self.frames_from_guest
        out.update(
            features=self.features,
            kicks=self.kicks,
            calls=self.calls,
            frames_from_guest=frames,
            descs_per_frame_from_guest=(self.descs_from_guest / frames) if frames else 0.0,
            frames_to_guest=self.frames_to_guest,
            buffers_per_frame_to_guest=(
                self.buffers_to_guest / self.frames_to_guest if self.frames_to_guest else 0.0
            ),
            gso_from_guest=self.gso_from_guest,
            gso_to_guest=self.gso_to_guest,
            ring_full=self.ring_full,
            drops=dict(self.drops),
        )
        return out


#: Per-link counters folded into the shared counters when a connection ends.
_TOTALS = (
    "kicks",
    "calls",
    "frames_from_guest",
    "descs_from_guest",
    "frames_to_guest",
    "buffers_to_guest",
    "gso_from_guest",
    "gso_to_guest",
    "ring_full",
)


class VhostUserServer:
    """Listens on a unix socket for the vhost-user front-end; one connection served at a time."""

    def __init__(self, hub: LinkHub, path: str, offloads: bool = True) -> None:
        check_platform()
        self.hub = hub
        self.path = path
        self.offloads = offloads
        self.link: VhostUserLink | None = None
        self._count = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            bind_private(sock, path)
            sock.listen(1)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.listener = Listener(hub.loop, hub.counters, sock, self._on_accept, "link.vhost")

    def _on_accept(self, conn: socket.socket, _addr: object) -> None:
        if self.link is not None and not self.link.closed:
            self.hub.counters.inc("link.vhost.busy")
            log.warning("vhost-user: a front-end is already connected; refusing another")
            conn.close()
            return
        self._count += 1
        name = f"vhost{self._count}"
        log.info("%s: front-end connected on %s", name, self.path)
        self.link = VhostUserLink(self.hub, conn, name, self.offloads)

    def close(self) -> None:
        """Stop listening; remove the socket file."""
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def qemu_args(path: str, mac: str, memory: str = "1G", host_mtu: int = 0) -> str:
    """The QEMU 7.2 arguments for a guest of ``memory`` served on ``path``.

    Memory must be shared (memfd, ``share=on``, size equal to ``-m``); ``vectors=0`` avoids
    QEMU 7.2's crash with MSI-X under TCG (drop it under KVM); ``reconnect=1`` lets QEMU start
    before guestnet and find it again after a restart.
    """
    mtu = f",host_mtu={host_mtu}" if host_mtu else ""
    return (
        f"-object memory-backend-memfd,id=mem0,size={memory},share=on -numa node,memdev=mem0 "
        f"-chardev socket,id=chr0,path={path},reconnect=1 "
        f"-netdev vhost-user,id=net0,chardev=chr0 "
        f"-device virtio-net-pci,netdev=net0,mac={mac}{mtu},vectors=0"
    )


def _close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close_fd(fd)
    fds.clear()
