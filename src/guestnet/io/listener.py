"""Listener: a listening socket on the loop that survives running out of descriptors.

Every listening socket guestnet owns (the QEMU stream socket, published TCP ports, the control
API) is registered level-triggered for EPOLLIN. When ``accept`` fails with EMFILE or ENFILE (or
the kernel is out of socket memory), the connection stays in the kernel's backlog and the socket
stays readable: a level-triggered listener that just returned would be woken again at once, for
ever, at 100 % CPU. So a listener that hits the limit *pauses*: it leaves epoll, and waits for
a descriptor to be freed. The loop tells it (:meth:`guestnet.io.loop.Loop.when_fd_released`):
every fd the loop stops watching is about to be closed, and the paused listener resumes on the
next turn, after that close. Descriptors freed elsewhere (another process's, for ENFILE) are
caught by a slow retry (:data:`RETRY_S`). A resumed listener that still cannot accept pauses
again; one accept per freed descriptor is all it costs.

Accepts are bounded per wake-up (``budget``), so a connection storm cannot starve the other fds.
Each accept is the C-level ``_accept`` (``accept4`` with ``SOCK_CLOEXEC``) and the socket object
is made from the descriptor with the listener's family, type and protocol, read once: the
``socket.accept`` wrapper converts both to enums and asks for the default timeout on every call,
which was most of the Python cost of an accept. The handler gets the peer's address that
``accept4`` returned, so nobody needs a ``getpeername`` for it.

:class:`UnixServer` is the shape both control sockets share (guestnet's API and the
slirp4netns-compatible one): a unix socket bound mode 0600 from birth (:func:`bind_private`),
a Listener, at most ``max_conns`` connections (more are accepted and closed at once, counted),
and a close that takes every connection and the socket file with it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any, Protocol

from guestnet.core.timers import Timer
from guestnet.counters import Counters
from guestnet.io.loop import EPOLLIN, Loop

log = logging.getLogger(__name__)

#: errnos that mean "no descriptor (or socket memory) to spare now": pause, do not spin.
NO_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: A paused listener tries again after this long even if the loop freed no descriptor.
RETRY_S = 1.0
#: Accepts per wake-up.
ACCEPT_BUDGET = 64

#: Takes an accepted, non-blocking, close-on-exec connection and its peer address (as
#: ``accept`` returns it: ``(host, port)``, ``(host, port, flowinfo, scope_id)``, or a path).
AcceptHandler = Callable[[socket.socket, Any], None]


class Listener:
    """Accepts connections on ``sock`` and hands each to ``on_accept``; pauses on EMFILE.

    ``counter`` prefixes the counters: ``<counter>.accept.no_fds`` when paused for want of
    descriptors, ``<counter>.accept.error`` for any other accept failure.
    """

    __slots__ = (
        "_kind",
        "_retry",
        "budget",
        "closed",
        "counter",
        "counters",
        "fd",
        "loop",
        "on_accept",
        "paused",
        "sock",
    )

    def __init__(
        self,
        loop: Loop,
        counters: Counters,
        sock: socket.socket,
        on_accept: AcceptHandler,
        counter: str,
        budget: int = ACCEPT_BUDGET,
    ) -> None:
        sock.setblocking(False)
        self.loop = loop
        self.counters = counters
        self.sock = sock
        self.fd = sock.fileno()
        #: (family, type, protocol) of every accepted socket: the listener's own.
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self.on_accept = on_accept
        self.counter = counter
        self.budget = budget
        self.paused = False
        self.closed = False
        self._retry: Timer | None = None
        loop.add_fd(self.fd, EPOLLIN, self._on_readable)

    def _on_readable(self, _events: int) -> None:
        # The C method socket.accept wraps (typeshed leaves it out): (fd, address).
        accept = self.sock._accept  # type: ignore[attr-defined]
        family, kind, proto = self._kind
        for _ in range(self.budget):
            if self.closed or self.paused:
                return
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in NO_RESOURCES:
                    self.counters.inc(f"{self.counter}.accept.no_fds")
                    self._pause()
                else:
                    self.counters.inc(f"{self.counter}.accept.error")
                    log.info("%s: accept: %s", self.counter, exc)
                return
            try:
                conn = socket.socket(family, kind, proto, fd)
            except OSError:
                os.close(fd)
                self.counters.inc(f"{self.counter}.accept.error")
                continue
            # accept4 does not pass the listener's O_NONBLOCK on (Linux): one ioctl.
            conn.setblocking(False)
            self.on_accept(conn, addr)

    def _pause(self) -> None:
        """Leave epoll until the loop frees a descriptor (or :data:`RETRY_S` passes)."""
        if self.paused:
            return
        self.paused = True
        self.loop.remove_fd(self.fd, closing=False)  # pausing frees no descriptor
        self.loop.when_fd_released(self._resume)
        self._retry = self.loop.call_later(RETRY_S, self._resume)

    def _resume(self, _now: float) -> None:
        if not self.paused or self.closed:
            return
        self.paused = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.loop.add_fd(self.fd, EPOLLIN, self._on_readable)

    def close(self) -> None:
        """Stop listening and close the socket (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if not self.paused:
            self.loop.remove_fd(self.fd)
        with contextlib.suppress(OSError):
            self.sock.close()


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind a unix socket so that only its owner can use it (mode 0600 from birth).

    A stale socket file at ``path`` is replaced; any other kind of file is refused.
    """
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


class Connection(Protocol):
    """What a :class:`UnixServer` keeps of each connection: a way to close it."""

    def close(self) -> None:
        """Close the connection and forget it (``server.conns.pop(fd)``)."""


class UnixServer:
    """A private unix stream socket with capped connections, served from ``loop``.

    Subclasses implement :meth:`connection`, which takes each accepted socket and registers
    the connection object in :attr:`conns` by fd (and removes it when it closes).
    """

    def __init__(
        self,
        loop: Loop,
        counters: Counters,
        path: str,
        counter: str,
        max_conns: int,
        budget: int = ACCEPT_BUDGET,
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.path = path
        self.counter = counter
        self.max_conns = max_conns
        self.conns: dict[int, Connection] = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            bind_private(sock, path)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.closed = False
        self.listener = Listener(loop, counters, sock, self._on_accept, counter, budget)

    def _on_accept(self, conn: socket.socket, _addr: object) -> None:
        if len(self.conns) >= self.max_conns:
            self.counters.inc(f"{self.counter}.conn.too_many")
            conn.close()
            return
        self.connection(conn)

    def connection(self, sock: socket.socket) -> None:
        """Serve one accepted connection (non-blocking, close-on-exec)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every connection and the listening socket; remove the socket file."""
        if self.closed:
            return
        self.closed = True
        for conn in list(self.conns.values()):
            conn.close()
        self.listener.close()
        # OSError: gone, or out of reach after --sandbox/--runas (io/harden.py)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
