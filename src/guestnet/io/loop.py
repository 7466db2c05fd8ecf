"""The datapath loop: one thread, epoll, a timer heap.

Each turn the loop sizes its epoll timeout from the core's next deadline, waits, dispatches every
ready fd to the handler registered for it, then fires the timers that are due. Handlers drain
their fd in batches (until EAGAIN or a per-wake budget) so one busy fd cannot starve the others.

Kernel subtleties worth remembering:

- epoll reports by fd number. A handler may close an fd that a later event in the same batch
  refers to, and a new socket may reuse that number at once; handlers are looked up afresh for
  each event, and a handler on a reused number sees at worst a spurious wake-up (EAGAIN).
- Registration is level-triggered unless the caller asks otherwise: a handler that stops before
  EAGAIN (budget spent) is woken again on the next turn. The loop passes the events through as
  given, so a handler may register with ``EPOLLET``; the TCP NAT's host sockets do (see
  :mod:`guestnet.io.tcp_nat`), and their handlers must then remember an edge they could not act
  on, since the kernel will not report it again.
- Signals (SIGINT/SIGTERM) are delivered through ``signal.set_wakeup_fd`` so that a blocking
  epoll wait returns at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable

from guestnet.core.timers import Timer, TimerHeap

log = logging.getLogger(__name__)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

Handler = Callable[[int], None]


class Loop:
    """The single-threaded event loop that owns every fd and timer of a guestnet instance."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.timers = TimerHeap()
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._events: dict[int, int] = {}
        self._running = False
        #: Turns run so far: a handler can tell whether it was woken in the turn right after
        #: an earlier one (a TAP link that stopped reading before EAGAIN, io/tap.py).
        self.turn = 0
        self._wakeup_r = -1
        self._wakeup_w = -1
        self.stop_signal: int | None = None
        #: Paused listeners waiting for a descriptor to be freed (see :meth:`when_fd_released`).
        self._fd_waiters: list[Callable[[float], None]] = []
        #: Callbacks handed over by other threads (:meth:`call_soon_threadsafe`), and the
        #: eventfd that wakes a blocking wait for them (made on first use).
        self._handed: deque[Callable[[float], None]] = deque()
        self._handed_fd = -1

    def now(self) -> float:
        """Seconds on the loop's monotonic clock."""
        return self.clock()

    def add_fd(self, fd: int, events: int, handler: Handler) -> None:
        """Watch ``fd`` for ``events``; ``handler(events)`` runs when it is ready."""
        self._epoll.register(fd, events)
        self._handlers[fd] = handler
        self._events[fd] = events

    def modify_fd(self, fd: int, events: int) -> None:
        """Change the events watched on ``fd`` (no system call when unchanged)."""
        if self._events.get(fd) != events:
            self._epoll.modify(fd, events)
            self._events[fd] = events

    def remove_fd(self, fd: int, closing: bool = True, unregister: bool = True) -> None:
        """Stop watching ``fd``; call before closing it.

        ``closing=False``: the fd stays open (a paused listener); it frees no descriptor, so
        :meth:`when_fd_released` callbacks are not woken by it. ``unregister=False``: the
        caller closes the fd at once and holds its only descriptor, and closing takes it out
        of epoll, so the ``EPOLL_CTL_DEL`` system call is skipped (a TCP flow's host socket).
        """
        if self._handlers.pop(fd, None) is not None:
            self._events.pop(fd, None)
            if unregister:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
            if closing and self._fd_waiters:
                self._wake_fd_waiters()

    def when_fd_released(self, callback: Callable[[float], None]) -> None:
        """Run ``callback(now)`` once, on the turn after the loop next stops watching an fd.

        Every fd leaves the loop just before it is closed, so by then the process has one
        descriptor more to spare: a listener paused on EMFILE resumes (``io/listener.py``).
        """
        self._fd_waiters.append(callback)

    def _wake_fd_waiters(self) -> None:
        waiters, self._fd_waiters = self._fd_waiters, []

        def wake(now: float) -> None:
            for waiter in waiters:
                waiter(now)

        # A zero deadline runs after this turn's handlers, once the fd is really closed.
        self.timers.call_at(0.0, wake)

    def call_soon_threadsafe(self, callback: Callable[[float], None]) -> None:
        """From any thread: run ``callback(now)`` on the loop's thread on its next turn.

        The only entry into the loop from another thread (the library's ``Network`` uses it
        when the loop runs in a thread of its own); everything else is the loop thread's.
        """
        if self._handed_fd < 0:
            raise RuntimeError("call_soon_threadsafe: enable_threadsafe() was not called")
        # deque.append and popleft are atomic: the deque needs no lock of ours.
        self._handed.append(callback)
        os.eventfd_write(self._handed_fd, 1)

    def enable_threadsafe(self) -> None:
        """Make :meth:`call_soon_threadsafe` usable (on the loop's thread, before it runs)."""
        if self._handed_fd < 0:
            self._handed_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.add_fd(self._handed_fd, EPOLLIN, self._run_handed)

    def _run_handed(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._handed_fd)
        now = self.clock()
        handed = self._handed
        while handed:
            handed.popleft()(now)

    def call_at(self, when: float, callback: Callable[[float], None]) -> Timer:
        """Run ``callback(now)`` at ``when`` on the loop's clock."""
        return self.timers.call_at(when, callback)

    def call_later(self, delay: float, callback: Callable[[float], None]) -> Timer:
        """Run ``callback(now)`` after ``delay`` seconds."""
        return self.timers.call_at(self.clock() + delay, callback)

    def install_signal_handlers(self) -> None:
        """End the loop cleanly on SIGINT and SIGTERM."""
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)

        def on_signal(signum: int, _frame: object) -> None:
            self.stop_signal = signum
            self._running = False

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.add_fd(self._wakeup_r, EPOLLIN, self._drain_wakeup)

    def _drain_wakeup(self, _events: int) -> None:
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def stop(self) -> None:
        """Make :meth:`run` return after the current turn."""
        self._running = False

    def run_once(self, max_wait: float | None = None) -> None:
        """One turn: wait for fds or the next deadline (at most ``max_wait``), then dispatch.

        Written for the turn that runs one handler and no timer (a request/response flow's
        every packet): the timer heap's top is looked at here, and ``next_deadline`` and
        ``run_due`` are called only when it holds a cancelled entry or a due one.
        """
        self.turn += 1
        timers = self.timers
        heap = timers.heap
        if heap and heap[0][2].cancelled:
            timers.next_deadline()  # drops the cancelled entries from the top
        if heap:
            timeout = heap[0][0] - self.clock()
            if timeout < 0.0:
                timeout = 0.0
            if max_wait is not None and timeout > max_wait:
                timeout = max_wait
        else:
            timeout = -1.0 if max_wait is None else max_wait
        try:
            ready = self._epoll.poll(timeout, 256)
        except InterruptedError:
            ready = []
        handlers = self._handlers
        for fd, events in ready:
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)
        if heap:
            now = self.clock()
            if heap[0][0] <= now:
                timers.run_due(now)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run until :meth:`stop`, a signal, or ``until()`` turns true.

        A stop signal is sticky: one that arrived before ``run`` (say, while start-up had the
        signals blocked and the handler ran at unblocking) still ends it at once.
        """
        self._running = self.stop_signal is None
        while self._running:
            self.run_once()
            if until is not None and until():
                break

    def close(self) -> None:
        """Release the epoll fd and the signal wake-up pipe."""
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(-1)
            for fd in (self._wakeup_r, self._wakeup_w):
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
            self._wakeup_r = self._wakeup_w = -1
        if self._handed_fd >= 0:
            self.remove_fd(self._handed_fd)
            os.close(self._handed_fd)
            self._handed_fd = -1
        self._epoll.close()
