"""Guest links: small classes over one fd each, feeding the same loop.

A link reads guest frames, hands each to the classifier as a view that lives only for the call,
and writes the frames the core emits, each with the link's own prefix written into the frame's
headroom so header and frame leave in one system call.

Writes never block the loop: a frame the kernel cannot take now waits in a bounded per-link
queue (EPOLLOUT wakes us when there is room); beyond the bound, frames are dropped and counted
(``link.tx.queue_full``). A full guest is a slow guest; TCP above us recovers from the loss.

Links here:

- :class:`StreamServer` / :class:`StreamLink`: QEMU's ``-netdev stream`` (and legacy
  ``-netdev socket``): each frame is a 4-byte big-endian length and the frame, over a unix or TCP
  stream. Many frames are read per ``recv_into`` and cut in place. A length of 0 or above 69,632
  (QEMU's own limit) means the stream is corrupt: that connection is closed and counted.
- :class:`DgramLink`: QEMU ``-netdev dgram`` and vfkit: one frame per unix datagram, replies go
  to the last sender's address; vfkit's initial 4-byte ``VFKT`` datagram is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable

from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.io.listener import Listener, bind_private
from guestnet.io.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop
from guestnet.pool import HEADROOM, Frame, FramePool

log = logging.getLogger(__name__)

#: QEMU refuses stream frames above this length (NET_BUFSIZE); so do we.
QEMU_MAX_FRAME = 69632
#: Frames waiting for room in a link's kernel buffer before new ones are dropped.
TX_QUEUE_MAX = 1024
#: Reads per wake-up before yielding to other fds (level-triggered: we are woken again).
RX_BUDGET = 64
#: Bytes read per recv_into on a stream: many frames at a time.
STREAM_RX_CHUNK = 256 * 1024

_LEN = struct.Struct("!I")

#: Takes one guest frame (a view valid during the call), its port, the time and whether the link
#: vouches for its checksums: the classifier's ``handle_frame``.
Deliver = Callable[[memoryview, Port, float, bool], None]
#: pcap tap on frames to the guest: (frame, csum_start or -1, csum_offset).
CaptureToGuest = Callable[[memoryview, int, int], None]


class LinkHub:
    """What the guest links of one datapath share, handed to each link explicitly.

    The loop, the counters, both pools, the switch links attach their port to, and ``deliver``
    (where guest frames go). ``links`` lists the links alive; ``capture_to_guest`` is the pcap
    tap, set while a capture runs.
    """

    def __init__(
        self,
        loop: Loop,
        counters: Counters,
        pool_from_guest: FramePool,
        pool_to_guest: FramePool,
        switch: Switch,
        deliver: Deliver,
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.pool_from_guest = pool_from_guest
        self.pool_to_guest = pool_to_guest
        self.switch = switch
        self.deliver = deliver
        self.links: list[Link] = []
        self.capture_to_guest: CaptureToGuest | None = None
        #: Called after each burst of guest frames a link read (one wake-up's worth): where a
        #: service sends what it gathered over the burst (the UDP NAT's UDP_SEGMENT batches).
        self.burst_end: list[Callable[[], None]] = []

    def end_burst(self) -> None:
        """A link has handed over one burst of guest frames."""
        for hook in self.burst_end:
            hook()

    def close_all(self) -> None:
        """Close every link (shutdown)."""
        for link in list(self.links):
            link.close()


class Link:
    """What every guest link shares: its Port, the bounded transmit queue, loop registration."""

    kind = "link"

    def __init__(self, hub: LinkHub, fd: int, name: str, watch: bool = True) -> None:
        self.hub = hub
        self.fd = fd
        self.name = name
        self.port = Port(name, self.send)
        self.closed = False
        #: Frames not yet written, and how much of the first was written (streams only).
        self._txq: deque[Frame] = deque()
        self._tx_partial = 0
        hub.switch.attach(self.port)
        hub.links.append(self)
        #: ``watch=False``: another link owns and watches the fd (a datagram socket's further
        #: peers, :class:`DgramPeer`).
        self.watched = watch
        if watch:
            hub.loop.add_fd(fd, EPOLLIN, self._on_events)

    # -- transmit ---------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Write ``frame`` toward the guest, or queue it; takes ownership of the frame."""
        port = self.port
        hub = self.hub
        if self.closed:
            port.tx_dropped += 1
            hub.pool_to_guest.release(frame)
            return
        port.tx_frames += 1
        port.tx_bytes += frame.length
        capture = hub.capture_to_guest
        if capture is not None:
            capture(frame.data, frame.csum_start, frame.csum_offset)
        if self._txq:
            self._enqueue(frame)
            return
        done = self._write(frame, 0)
        if done is None:
            return
        if done < 0:
            hub.pool_to_guest.release(frame)
            return
        self._backlog(frame, done)

    def _backlog(self, frame: Frame, done: int) -> None:
        """The link could not take all of ``frame`` now (``done`` bytes went out): queue it and
        wait for the fd to be writable."""
        self._tx_partial = done
        self._enqueue(frame)
        self.hub.loop.modify_fd(self.fd, EPOLLIN | EPOLLOUT)

    def _enqueue(self, frame: Frame) -> None:
        if len(self._txq) >= TX_QUEUE_MAX:
            self.port.tx_dropped += 1
            self.hub.counters.inc("link.tx.queue_full")
            self.hub.pool_to_guest.release(frame)
            return
        self._txq.append(frame)

    def _write(self, frame: Frame, offset: int) -> int | None:
        """Write the frame from ``offset`` (of the link's wire form).

        Returns None when it all went out (the frame is then released), the new offset when only
        part went out or nothing could (EAGAIN: the caller queues it), or -1 on a hard error.
        """
        raise NotImplementedError

    def _flush(self) -> None:
        q = self._txq
        release = self.hub.pool_to_guest.release
        while q:
            done = self._write(q[0], self._tx_partial)
            if done is None:
                q.popleft()
                self._tx_partial = 0
                continue
            if done < 0:
                release(q.popleft())
                self._tx_partial = 0
                continue
            self._tx_partial = done
            return
        if not self.closed:
            self.hub.loop.modify_fd(self.fd, EPOLLIN)

    # -- receive ----------------------------------------------------------------------------

    def _on_events(self, events: int) -> None:
        if events & EPOLLOUT:
            self._flush()
        if self.closed:
            return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP):
            self._on_readable()

    def _on_readable(self) -> None:
        raise NotImplementedError

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Unregister and close the fd, drop queued frames, forget the port."""
        if self.closed:
            return
        self.closed = True
        hub = self.hub
        if self.watched:
            hub.loop.remove_fd(self.fd)
        hub.switch.detach(self.port)
        if self in hub.links:
            hub.links.remove(self)
        while self._txq:
            hub.pool_to_guest.release(self._txq.popleft())
        self._close_fd()

    def _close_fd(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def stats(self) -> dict[str, object]:
        """Per-link counters for the stats API."""
        out = self.port.stats()
        out["kind"] = self.kind
        out["tx_queue"] = len(self._txq)
        return out


class StreamLink(Link):
    """One QEMU stream connection: length-prefixed frames over a byte stream."""

    kind = "qemu-stream"

    def __init__(self, hub: LinkHub, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._rx = bytearray(STREAM_RX_CHUNK + QEMU_MAX_FRAME + 4)
        self._rxv = memoryview(self._rx)
        self._rx_len = 0
        super().__init__(hub, sock.fileno(), name)

    def _write(self, frame: Frame, offset: int) -> int | None:
        start = frame.start - 4
        _LEN.pack_into(frame.view, start, frame.length)
        end = frame.start + frame.length
        try:
            sent = self.sock.send(frame.view[start + offset : end])
        except BlockingIOError:
            return offset
        except OSError as exc:
            self._hard_error(exc)
            return -1
        if start + offset + sent == end:
            self.hub.pool_to_guest.release(frame)
            return None
        return offset + sent

    def _hard_error(self, exc: OSError) -> None:
        self.hub.counters.inc("link.stream.error")
        log.info("%s: %s; closing", self.name, exc)
        self.hub.loop.call_later(0, lambda _now: self.close())

    def _on_readable(self) -> None:
        try:
            self._read_burst()
        finally:
            self.hub.end_burst()

    def _read_burst(self) -> None:
        rxv = self._rxv
        hub = self.hub
        classify = hub.deliver
        port = self.port
        now = hub.loop.now()
        for _ in range(RX_BUDGET):
            try:
                n = self.sock.recv_into(rxv[self._rx_len :])
            except BlockingIOError:
                return
            except OSError as exc:
                hub.counters.inc("link.stream.error")
                log.info("%s: %s; closing", self.name, exc)
                self.close()
                return
            if n == 0:
                log.info("%s: guest closed the connection", self.name)
                self.close()
                return
            avail = self._rx_len + n
            pos = 0
            while avail - pos >= 4:
                flen = _LEN.unpack_from(rxv, pos)[0]
                if flen == 0 or flen > QEMU_MAX_FRAME:
                    hub.counters.inc("link.stream.corrupt")
                    log.warning("%s: bad frame length %d; closing the connection", self.name, flen)
                    self.close()
                    return
                if avail - pos - 4 < flen:
                    break
                classify(rxv[pos + 4 : pos + 4 + flen], port, now, False)
                pos += 4 + flen
            rest = avail - pos
            if rest and pos:
                rxv[:rest] = rxv[pos:avail]
            self._rx_len = rest
            if n < len(rxv) - (avail - n):
                # The socket had less than we asked for: it is drained.
                return

    def _close_fd(self) -> None:
        self.sock.close()


class StreamServer:
    """Listens for QEMU stream connections (unix path or TCP) and makes a StreamLink of each.

    Accepting goes through :class:`~guestnet.io.listener.Listener`: out of descriptors, it pauses
    instead of spinning, and resumes when one is freed.
    """

    def __init__(self, hub: LinkHub, sock: socket.socket, description: str) -> None:
        self.hub = hub
        self.sock = sock
        self.description = description
        self.unix_path: str | None = None
        self._count = 0
        self.listener = Listener(hub.loop, hub.counters, sock, self._on_accept, "link.stream")

    @classmethod
    def listen_unix(cls, hub: LinkHub, path: str) -> StreamServer:
        """Listen on a unix socket at ``path``, mode 0600 (umask set before bind)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            bind_private(sock, path)
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        server = cls(hub, sock, f"unix:{path}")
        server.unix_path = path
        return server

    @classmethod
    def listen_tcp(cls, hub: LinkHub, host: str, port: int) -> StreamServer:
        """Listen on TCP ``host:port`` (IPv6 when ``host`` contains a colon)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        return cls(hub, sock, f"tcp:{host}:{sock.getsockname()[1]}")

    def _on_accept(self, conn: socket.socket, _addr: object) -> None:
        self._count += 1
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        name = f"qemu{self._count}"
        log.info("%s: guest connected on %s", name, self.description)
        StreamLink(self.hub, conn, name)

    def close(self) -> None:
        """Stop listening; remove the socket file."""
        self.listener.close()
        if self.unix_path is not None:
            # OSError: gone, or out of reach after --sandbox/--runas (io/harden.py)
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)


#: Most senders one datagram socket serves at once, the first included (each is a switch
#: port); datagrams from further ones are dropped and counted until one goes away.
MAX_DGRAM_PEERS = 32


class DgramLink(Link):
    """One frame per unix datagram (QEMU ``-netdev dgram``, vfkit); every sender is a guest.

    The first sender is this link's own port; each further sender address gets a port of its
    own (:class:`DgramPeer`) on the same socket, so several VMs pointed at one socket are
    switched like several QEMU stream connections. A sender whose socket is gone (a send
    fails with ECONNREFUSED or ENOENT) loses its port; the first one keeps the link's port and
    the next new sender takes it over. A QEMU restarted with another local path is a new
    sender, and the switch moves its MAC (and flows) to the new port.
    """

    kind = "dgram"

    def __init__(self, hub: LinkHub, sock: socket.socket, name: str, path: str | None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.path = path
        self.peer: str | None = None
        #: Further senders' ports, by address.
        self.peers: dict[str, DgramPeer] = {}
        self._peer_count = 0
        super().__init__(hub, sock.fileno(), name)

    @classmethod
    def bind_unix(cls, hub: LinkHub, path: str) -> DgramLink:
        """Bind a unixgram socket at ``path`` (mode 0600)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            bind_private(sock, path)
        except OSError:
            sock.close()
            raise
        return cls(hub, sock, "dgram", path)

    def _write(self, frame: Frame, offset: int) -> int | None:
        peer = self.peer
        if peer is None:
            self.hub.counters.inc("link.dgram.no_peer")
            return -1
        return _send_dgram(self, frame, peer)

    def peer_gone(self, peer: str) -> None:
        """A send to ``peer`` found its socket gone: forget the sender."""
        if peer == self.peer:
            self.peer = None
            return
        other = self.peers.pop(peer, None)
        if other is not None:
            log.info("%s: peer %s is gone", other.name, peer)
            # Closed on the next turn: this runs inside a send, perhaps a flood over the
            # switch's ports, which must not change under it.
            self.hub.loop.call_at(0.0, lambda _now: other.close())

    def _port_for(self, addr: str) -> Port | None:
        """The port of the sender ``addr``: this link's for the first, a new one for others."""
        if addr == self.peer:
            return self.port
        other = self.peers.get(addr)
        if other is not None:
            return other.port
        if self.peer is None:
            self.peer = addr
            log.info("%s: peer is %s", self.name, addr)
            return self.port
        if len(self.peers) + 1 >= MAX_DGRAM_PEERS:
            self.hub.counters.inc("link.dgram.peers_full")
            return None
        self._peer_count += 1
        other = DgramPeer(self, addr, f"{self.name}.{self._peer_count}")
        self.peers[addr] = other
        log.info("%s: peer is %s", other.name, addr)
        return other.port

    def _on_readable(self) -> None:
        hub = self.hub
        pool = hub.pool_from_guest
        classify = hub.deliver
        now = hub.loop.now()
        frame = pool.acquire()
        room = frame.view[HEADROOM:]
        try:
            for _ in range(RX_BUDGET):
                try:
                    n, addr = self.sock.recvfrom_into(room)
                except BlockingIOError:
                    return
                except OSError as exc:
                    hub.counters.inc("link.dgram.error")
                    log.info("%s: %s", self.name, exc)
                    return
                if n == 4 and bytes(room[:4]) == b"VFKT":
                    continue
                # An unbound sender has no address to answer: it is the first sender's port.
                port = self._port_for(addr) if addr else self.port
                if port is not None:
                    classify(room[:n], port, now, False)
        finally:
            pool.release(frame)
            hub.end_burst()

    def close(self) -> None:
        """Close every further sender's port, then this link and its socket."""
        for other in list(self.peers.values()):
            other.close()
        self.peers.clear()
        super().close()

    def _close_fd(self) -> None:
        self.sock.close()
        if self.path is not None:
            # OSError: gone, or out of reach after --sandbox/--runas (io/harden.py)
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class DgramPeer(Link):
    """A further sender on a :class:`DgramLink`'s socket: a switch port of its own that sends
    on the owner's socket, which the owner reads and watches."""

    kind = "dgram"

    def __init__(self, owner: DgramLink, addr: str, name: str) -> None:
        self.owner = owner
        self.sock = owner.sock
        self.addr = addr
        super().__init__(owner.hub, owner.fd, name, watch=False)

    def _write(self, frame: Frame, offset: int) -> int | None:
        return _send_dgram(self.owner, frame, self.addr)

    def _backlog(self, frame: Frame, done: int) -> None:
        """The owner's socket is full: a datagram link drops, as a NIC's full ring does (the
        owner's writable event flushes only its own queue)."""
        self.port.tx_dropped += 1
        self.hub.counters.inc("link.dgram.tx_full")
        self.hub.pool_to_guest.release(frame)

    def _close_fd(self) -> None:
        """The socket is the owner's."""


def _send_dgram(owner: DgramLink, frame: Frame, peer: str) -> int | None:
    """One frame as one datagram to ``peer`` on ``owner``'s socket (see :meth:`Link._write`)."""
    try:
        owner.sock.sendto(frame.data, peer)
    except BlockingIOError:
        return 0
    except OSError as exc:
        # The peer went away (ECONNREFUSED, ENOENT): drop and forget it.
        owner.hub.counters.inc("link.dgram.send_error")
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            owner.peer_gone(peer)
        return -1
    owner.hub.pool_to_guest.release(frame)
    return None
