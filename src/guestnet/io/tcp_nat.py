"""The TCP NAT's I/O driver: host sockets, loop registration and timers for core/tcp/.

Everything protocol-shaped lives in :class:`guestnet.core.tcp.TcpNat`; this module only does what
it is asked (:class:`guestnet.core.tcp.TcpIo`) and reports what the kernel says.

Host sockets are non-blocking and close-on-exec, with TCP_NODELAY (the guest's own stack already
decided when to push; Nagle here would only add latency). TCP_NODELAY is set just before a
flow's second ``send``: Nagle holds a small segment only while data is unacknowledged, which
the first ``send`` never finds, so a connection that sends once (connect, request, close) needs
no ``setsockopt``; sockets accepted on published ports inherit it from their listener.

Connect. A connect to a local destination (loopback, the host's own addresses: the gateway
address, the common case) has finished the whole handshake inside ``connect()``, which says
EINPROGRESS all the same; a second ``connect`` then says 0 (connected), EALREADY (a remote
destination, still running) or why it failed (refused). So the core learns the outcome in the
turn of the guest's SYN and answers it then, instead of the turn after, when the EPOLLOUT
edge would have said so: one system call for a loop turn, and the guest's connect is shorter
by it. Connected, ``connect`` returns :data:`~guestnet.core.tcp.CONNECTED`; refused, the
failure is reported to the core (``host_connected``) at the end of the same turn, exactly as
the edge would have reported it (same counters, same RST, DNS failover alike).

Registration: edge-triggered (``EPOLLET``), ``EPOLLIN | EPOLLRDHUP`` and, where needed,
``EPOLLOUT``: a socket holding data the guest has no window for does not wake the loop again
and again, and no ``epoll_ctl`` is needed when the window opens or closes. The core remembers
an edge it could not act on (``host_readable``). A socket still connecting is registered with
EPOLLOUT: its first EPOLLOUT edge means the connect finished (with EPOLLERR or EPOLLHUP it
failed, and only then is SO_ERROR asked why); later ones mean the send buffer has room after
an EAGAIN. A connected one (connected at once, or accepted on a published port) is registered
without it, because an EPOLLOUT in the mask is reported at once (the socket is writable): a
loop turn for nothing per connection. It gets EPOLLOUT (one ``EPOLL_CTL_MOD``, after which the
kernel reports room that came meanwhile) when a ``send`` comes back short and the core waits for
room, and before its second ``send`` (a flow of more than one request then has EPOLLOUT
reported with every event, as a connect still running gave it from the start). Linux reports
every arrival (data, FIN, reset) on an edge-triggered socket as a new event, so a read
that came back short with no hang-up in the event has emptied the queue: the driver says so
(clearing ``flow.host_readable``) and the read after it, which could only say EAGAIN, is never
made. Closing a host socket takes it out of epoll by itself (it is the only descriptor), so no
``EPOLL_CTL_DEL`` is made.

The room the core advertises to the guest is the send buffer's free memory as the kernel counts
it (``SO_MEMINFO``: ``SO_SNDBUF`` minus ``wmem_queued``), less an eighth for per-buffer overhead.
A ``send`` takes data while ``wmem_queued`` is below ``SO_SNDBUF``, so it takes all of that.
Before its first ``send`` a socket's buffer is empty and at least ``tcp_wmem``'s initial size,
so the SYN-ACK's window needs no ``getsockopt``; except when that estimate is below our MSS (a
64 KiB MTU): the socket's buffer grew at its handshake (connected or accepted), and the kernel
is asked, so that its window is not taken for a small one.
(Payload bytes queued, ``SIOCOUTQ``, are not enough: the overhead on a nearly full 4 MiB buffer
was ~2% here, tens of KiB, more than the room left; the guest then sent into a window the socket
could not take, and every short ``send`` cost it a whole window of loss recovery, seconds with
64 KiB super-frames.)

Data kept in the host socket (``keep``, ``discard``, ``reread``; the core decides when, see
``core/tcp/established.py``): ``SO_PEEK_OFF`` 0 once, after which every read is ``MSG_PEEK`` and
the kernel advances the offset; ``discard`` is ``recv(MSG_TRUNC)``, which TCP serves by dropping
the bytes without copying them (into an anonymous mapping it never writes) and which moves the
offset back by as many; ``reread`` peeks from offset 0 and sets the offset back to what the core
says is kept. A kernel without ``SO_PEEK_OFF`` for TCP (before 6.9) refuses the first
``setsockopt`` and every flow keeps copying.

Timers: one loop timer per flow, armed lazily. A flow's deadline moves later on nearly every
segment (RTO restart, idle timeout); the loop timer is re-armed only when the new deadline is
earlier than the armed one, and otherwise fires early, asks the core, and is re-armed; but a
closed flow's timer is re-armed exactly (its one deadline left is the reap: the delayed ACK or
RTO armed before it would only wake the loop for nothing, once per connection). A flow whose
socket is closed and whose last deadline has passed (reaped) or was cancelled (dropped) lets go
of its timer callback: the callback refers to the flow, the flow (through ``io_data``) to the
callback, and without that a closed connection's objects waited for the cyclic GC. ACKs
coalesced during a loop turn are sent by one zero-delay timer (timers run after the fds).

Descriptor exhaustion (EMFILE/ENFILE) and every other socket() or connect() failure are errnos
handed back to the core, which counts them and answers the guest with RST.

Published ports: :class:`guestnet.io.forwards.Forwards` hands each accepted connection to
:meth:`TcpNatDriver.on_forward_accept`, which asks the core to open a flow toward the guest
(:meth:`guestnet.core.tcp.TcpNat.open_to_guest`) and registers the accepted socket exactly as a
connected one. The SYN goes to the first guest link whose guest MAC the switch has learned; with
none (no guest has spoken yet) the client is reset and ``forward.tcp.no_guest`` counted.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import ipaddress
import logging
import mmap
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

from guestnet.config import GUEST_RETURN_TIMEOUT_S
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.core.tcp import CLOSED, CONNECTED, CONNECTING, TcpFlow, TcpNat
from guestnet.core.timers import Timer
from guestnet.counters import Counters
from guestnet.io.forwards import Forward, Forwards
from guestnet.io.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop

log = logging.getLogger(__name__)

#: getsockopt: the socket's memory counters (linux/sock_diag.h SK_MEMINFO_*); we read the first
#: six, of which SNDBUF (index 3) and WMEM_QUEUED (index 5).
#: How long the TCP flows of a guest whose link went away wait for it to come back (a QEMU
#: reconnecting to the socket) before they are reset (issue 15): the default of
#: ``Config.guest_return_timeout`` (``--guest-return-timeout``).
GUEST_RETURN_S = GUEST_RETURN_TIMEOUT_S
SO_MEMINFO = 55
_MEMINFO = struct.Struct("12xI4xI")
#: setsockopt: where the next MSG_PEEK reads, kept by the kernel (TCP since Linux 6.9).
SO_PEEK_OFF = 42
#: Most bytes one ``discard`` call drops (a flow has at most MAX_UNACKED in flight).
_SCRATCH_SIZE = 1 << 22
_scratch_view: memoryview | None = None
_EVENTS = EPOLLIN | EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
#: A connected socket that has not needed EPOLLOUT yet (see the module docstring).
_EVENTS_IN = EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
#: Events that mean EOF or an error, and those that call for a read.
_HUP = EPOLLERR | EPOLLHUP | select.EPOLLRDHUP
_READ = EPOLLIN | _HUP
_FAILED = EPOLLERR | EPOLLHUP
_CONNECT_DONE = EPOLLOUT | _FAILED
_LINGER_RESET = struct.pack("ii", 1, 0)
_HOST_SOCK_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


class _HostSock:
    """A flow's host socket and loop timer (the flow's ``io_data``)."""

    __slots__ = (
        "drained",
        "fd",
        "fire",
        "fresh",
        "hup",
        "nagle",
        "out",
        "peek",
        "sock",
        "timer",
    )

    def __init__(self, sock: _socket.socket, nagle: bool = True) -> None:
        self.sock: _socket.socket | None = sock
        self.fd = sock.fileno()
        self.timer: Timer | None = None
        #: The loop timer's callback, made once per flow (see ``set_timer``). It closes over
        #: the flow, which holds this record: a reference cycle, so it is dropped once the
        #: flow has neither socket nor deadline left, or every closed connection would wait
        #: for the cyclic collector's rare full passes (thousands of dead flows under churn).
        self.fire: Callable[[float], None] | None = None
        #: The last read came back short with no hang-up in the last event: the receive
        #: queue was empty, so the next read would only say EAGAIN (see ``recv_into``).
        self.drained = False
        #: The last event reported EOF or an error (EPOLLRDHUP, EPOLLHUP, EPOLLERR).
        self.hup = False
        #: TCP_NODELAY is not set yet: it is set before the second ``send`` (see the module
        #: docstring); an accepted socket inherits it from its listener.
        self.nagle = nagle
        #: Nothing was sent yet: the send buffer is empty (see ``send_room``).
        self.fresh = True
        #: Reads peek (``MSG_PEEK`` at ``SO_PEEK_OFF``): the data stays until ``discard``.
        self.peek = 0
        #: EPOLLOUT is in the socket's registration (see the module docstring).
        self.out = False


class TcpNatDriver:
    """Implements :class:`~guestnet.core.tcp.TcpIo` on real sockets and a loop.

    ``switch`` is where forwarded connections find the guest link to open their flow on.
    """

    def __init__(
        self,
        loop: Loop,
        counters: Counters,
        switch: Switch,
        nat: TcpNat,
        outbound_addr: str | None = None,
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.switch = switch
        self.nat = nat
        #: IPv4 source every host connection binds to before connecting (``--outbound-addr``).
        self.outbound_addr = outbound_addr
        #: What ``send_room`` says of a socket that has sent nothing yet: its empty send buffer
        #: is at least the initial ``tcp_wmem`` size, less the same eighth.
        self.fresh_room = _initial_sndbuf() * 7 // 8
        #: Host sockets can keep data for retransmission (``keep``); off after one refusal.
        self.peek_ok = True
        #: Ports gone with flows on them, and the timer that resets those flows unless their
        #: guest comes back first (``guest_departed``).
        self._departures: dict[Port, Timer] = {}
        #: Guest addresses of forwards, text to packed (parsed once, not per connection).
        self._packed: dict[str, bytes] = {}
        nat.io = self

    # -- TcpIo -----------------------------------------------------------------------------------

    def connect(self, flow: TcpFlow) -> int:
        family = socket.AF_INET6 if ":" in flow.host else socket.AF_INET
        try:
            # The C socket type itself: socket.socket's Python layer (its __init__ and close
            # wrappers, made for file objects we never make) cost ~1.5 us per connection.
            sock = _socket.socket(family, _HOST_SOCK_TYPE)
        except OSError as exc:
            return exc.errno or errno.EIO
        addr = (flow.host, flow.host_port)
        try:
            if self.outbound_addr is not None and family == socket.AF_INET:
                sock.bind((self.outbound_addr, 0))
            err = sock.connect_ex(addr)
            if err == errno.EINPROGRESS:
                # A local destination has finished the handshake inside connect(): asking
                # again says 0 (connected), EALREADY (still running) or why it failed.
                err = sock.connect_ex(addr)
                if err not in (0, errno.EALREADY):
                    self._failed_at_once(flow, sock, err)
                    return 0
        except OSError as exc:
            sock.close()
            return exc.errno or errno.EIO
        if err not in (0, errno.EALREADY):
            sock.close()
            return err
        hs = _HostSock(sock)
        flow.io_data = hs
        if err == errno.EALREADY:
            # The first EPOLLOUT edge reports the end of the connect.
            hs.out = True
            self._watch(flow, hs, _EVENTS)
            return 0
        self._watch(flow, hs, _EVENTS_IN)
        return CONNECTED

    def _failed_at_once(self, flow: TcpFlow, sock: _socket.socket, err: int) -> None:
        """A connect that started and has already failed (refused): reported as its EPOLLOUT
        edge would have reported it, but at the end of this turn (a zero-delay timer: the
        core registers the flow first), and the core closes the socket. Its events mean
        nothing (SO_ERROR was taken by the second ``connect``) and are ignored; it is in the
        loop all the same, as every host socket is, so that its close frees a descriptor in
        the loop's eyes (``Loop.when_fd_released``)."""
        hs = flow.io_data = _HostSock(sock)
        self.loop.add_fd(hs.fd, _EVENTS_IN, _ignore)
        nat = self.nat
        self.loop.call_at(0.0, lambda now: nat.host_connected(flow, err, now))

    def _watch(self, flow: TcpFlow, hs: _HostSock, events: int) -> None:
        """Register the flow's host socket in the loop for ``events`` and feed the events to
        the core."""
        nat = self.nat
        clock = self.loop.clock

        def on_events(events: int) -> None:
            now = clock()
            hs.drained = False
            hs.hup = events & _HUP != 0
            if flow.state == CONNECTING:
                if not events & _CONNECT_DONE:
                    return
                # EPOLLOUT alone means connected; only a failure needs SO_ERROR to say why.
                code = 0
                if events & _FAILED:
                    s = hs.sock
                    code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if s else errno.EBADF
                nat.host_connected(flow, code, now)
                if code:
                    return
                events &= ~EPOLLOUT
            if events & _READ:
                nat.host_readable(flow, now)
            if events & EPOLLOUT and hs.sock is not None:
                nat.host_writable(flow, now)

        self.loop.add_fd(hs.fd, events, on_events)

    def _watch_out(self, hs: _HostSock) -> None:
        """Add EPOLLOUT to a socket registered without it (see the module docstring). With
        EPOLLET the kernel checks the socket at once: room that came meanwhile is reported."""
        hs.out = True
        self.loop.modify_fd(hs.fd, _EVENTS)

    def send(self, flow: TcpFlow, data: memoryview) -> int:
        hs: _HostSock = flow.io_data
        sock = hs.sock
        if sock is None:
            raise BrokenPipeError(errno.EPIPE, "host socket closed")
        if hs.fresh:
            hs.fresh = False
        elif hs.nagle or not hs.out:
            # The second send: from here data may be in flight when a small segment is sent,
            # and Nagle would hold it (up to the peer's delayed ACK); and the flow is more than
            # one request, so its socket reports room (EPOLLOUT) from now on, as one still
            # connecting at first did.
            if hs.nagle:
                hs.nagle = False
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not hs.out:
                self._watch_out(hs)
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data) and not hs.out:
            self._watch_out(hs)  # the core waits for room (host_writable)
        return n

    def recv_into(self, flow: TcpFlow, bufs: list[memoryview]) -> int:
        hs: _HostSock = flow.io_data
        sock = hs.sock
        if sock is None:
            return 0
        if hs.drained:
            # A short read emptied the queue and no hang-up was reported (the core stops after
            # it; this is for a caller that reads on).
            hs.drained = False
            return -1
        flags = hs.peek
        try:
            if len(bufs) == 1:
                n = sock.recv_into(bufs[0], 0, flags)
                asked = len(bufs[0])
            else:
                n = int(sock.recvmsg_into(bufs, 0, flags)[0])
                asked = sum(map(len, bufs))
        except BlockingIOError:
            return -1
        if 0 < n < asked and not hs.hup:
            # A short read emptied the queue and no hang-up was reported: the next read could
            # only say EAGAIN, so the core stops here. Edge-triggered epoll reports every
            # arrival after this read (data, FIN, reset) as a new event, which sets it again.
            hs.drained = True
            flow.host_readable = False
        return n

    def keep(self, flow: TcpFlow) -> bool:
        hs = flow.io_data
        sock = hs.sock
        if sock is None or not self.peek_ok:
            return False
        try:
            # The kernel keeps the offset of the next peek (and moves it back as we discard).
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            # A kernel without SO_PEEK_OFF for TCP (before 6.9): keep copying, for every flow.
            self.peek_ok = False
            return False
        hs.peek = socket.MSG_PEEK
        return True

    def discard(self, flow: TcpFlow, nbytes: int) -> None:
        sock = flow.io_data.sock
        if sock is None:
            return
        scratch = _scratch()
        while nbytes > 0:
            # MSG_TRUNC: TCP drops the bytes without copying them (the scratch is never
            # written); the peek offset moves back by as many.
            try:
                n = int(sock.recv_into(scratch, min(nbytes, len(scratch)), socket.MSG_TRUNC))
            except BlockingIOError:
                return
            if n <= 0:
                return
            nbytes -= n

    def reread(self, flow: TcpFlow, bufs: list[memoryview], kept: int) -> int:
        sock = flow.io_data.sock
        if sock is None:
            raise BrokenPipeError(errno.EPIPE, "host socket closed")
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        try:
            if len(bufs) == 1:
                return int(sock.recv_into(bufs[0], 0, socket.MSG_PEEK))
            return int(sock.recvmsg_into(bufs, 0, socket.MSG_PEEK)[0])
        except BlockingIOError:
            return 0
        finally:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, kept)

    def send_room(self, flow: TcpFlow) -> int:
        hs = flow.io_data
        sock = hs.sock if hs is not None else None
        if sock is None:
            return 0
        if hs.fresh and self.fresh_room >= self.nat.our_mss:
            # Nothing sent yet: the buffer is empty and at least its initial size (the
            # SYN-ACK's window; the first bare ACK after data asks the kernel). Not at a large
            # MTU, where that estimate is below one MSS: a window that small would hold a
            # guest's larger request back for a window check; the connected socket's buffer
            # has grown at its handshake (to MiBs on loopback), so the kernel is asked.
            return self.fresh_room
        try:
            sndbuf, queued = _MEMINFO.unpack(
                sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
            )
        except OSError:
            return 0
        free = sndbuf - queued
        return free - (free >> 3) if free > 0 else 0

    def shutdown_write(self, flow: TcpFlow) -> None:
        sock = flow.io_data.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_WR)

    def close(self, flow: TcpFlow, reset: bool) -> None:
        hs = flow.io_data
        if hs is None or hs.sock is None:
            return
        sock, hs.sock = hs.sock, None
        # Closing the only descriptor of the socket takes it out of epoll: no EPOLL_CTL_DEL.
        self.loop.remove_fd(hs.fd, unregister=False)
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()

    def set_timer(self, flow: TcpFlow, when: float | None) -> None:
        hs = flow.io_data
        if hs is None:
            return
        timer = hs.timer
        if when is None:
            if timer is not None:
                timer.cancel()
                hs.timer = None
            if hs.sock is None:
                hs.fire = None  # the flow is dropped: no cycle left for the GC (see ``fire``)
            return
        if timer is not None and not timer.cancelled:
            armed = timer.when
            # Armed earlier: it fires early and the core asks again (lazy), except for a
            # closed flow, whose only deadline left is the reap: no wake-up before it.
            if armed == when or (armed < when and flow.state != CLOSED):
                return
            timer.cancel()
        fire = hs.fire
        if fire is None:
            nat = self.nat

            def fire(now: float) -> None:
                # Only the armed timer can fire: re-arming cancels the one before.
                hs.timer = None
                nat.on_timer(flow, now)
                if hs.timer is None and hs.sock is None:
                    # Socket closed and no deadline left (reaped): nothing wakes the flow any
                    # more. Drop the cycle flow -> hs -> fire -> flow, so that reference
                    # counting frees the flow now instead of the cyclic GC, later and at a
                    # cost per live object (a set_timer after this makes a new ``fire``).
                    hs.fire = None

            hs.fire = fire
        hs.timer = self.loop.call_at(when, fire)

    def request_flush(self) -> None:
        self.loop.call_at(0.0, self.nat.flush)

    # -- forwards (host -> guest) -----------------------------------------------------------------

    def attach_forwards(self, forwards: Forwards) -> None:
        """Take the connections accepted on published TCP ports.

        Removing a forward needs nothing here: its flows keep running (only the listening
        socket closes), so ``on_remove`` is left to the others.
        """
        self.forwards = forwards
        forwards.on_accept = self.on_forward_accept

    def on_forward_accept(self, fwd: Forward, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        """A host client connected to ``fwd``: open a flow toward the guest, or close it.

        ``peer`` is the client's address as ``accept`` returned it (no ``getpeername``)."""
        counters = self.counters
        text = self.forwards.guest_ip_for(fwd)
        guest_ip = self._packed.get(text)
        if guest_ip is None:
            try:
                guest_ip = ipaddress.ip_address(text).packed
            except ValueError:
                counters.inc("forward.tcp.guest_address_invalid")
                _close_now(conn)
                return
            if len(self._packed) >= 64:  # a few guest addresses; bounded all the same
                self._packed.clear()
            self._packed[text] = guest_ip
        port = _guest_port(self.switch, guest_ip)
        if port is None or port.guest_mac is None:
            # No guest has spoken yet: we know no MAC to send the SYN to.
            counters.inc("forward.tcp.no_guest")
            _close_now(conn)
            return
        # The listener has TCP_NODELAY (io/forwards.py), which accepted sockets inherit.
        # At a large MTU the SYN's window is the kernel's figure (see send_room).
        hs = _HostSock(conn, nagle=False)
        # A port may hold several MACs (a guest that bridges): the one that claimed the address.
        mac = self.switch.mac_for_ip4(guest_ip)
        if mac is None or self.switch.port_for(mac) is not port:
            mac = port.guest_mac
        flow = self.nat.open_to_guest(
            port,
            mac,
            guest_ip,
            fwd.guest_port,
            hs,
            (str(peer[0]), int(peer[1])),
            fwd.id,
            self.loop.now(),
        )
        if flow is None:
            _close_now(conn)
            return
        self._watch(flow, hs, _EVENTS_IN)

    # -- shutdown and the API --------------------------------------------------------------------

    def flows(self, now: float | None = None) -> list[dict[str, object]]:
        """Every TCP flow, for the API's ``/flows`` (``now``: the loop's clock by default)."""
        return self.nat.flows_info(self.loop.now() if now is None else now)

    def guest_departed(self, port: Port) -> None:
        """A guest link went away (``Switch.on_depart``): its flows wait
        ``config.guest_return_timeout`` for the guest to come back on another port (they move
        then), and are reset after that."""
        if not self.nat.has_port(port):
            return
        old = self._departures.pop(port, None)
        if old is not None:
            old.cancel()
        self._departures[port] = self.loop.call_later(
            self.nat.config.guest_return_timeout, lambda _now: self._reset_departed(port)
        )

    def _reset_departed(self, port: Port) -> None:
        self._departures.pop(port, None)
        self.nat.reset_port(port)

    def close_all(self) -> None:
        """Shutdown: close every host socket, cancel the departures' timers."""
        for timer in self._departures.values():
            timer.cancel()
        self._departures.clear()
        self.nat.close_all()


def _ignore(_events: int) -> None:
    """The handler of a host socket whose failure is already reported (see ``connect``)."""


def _scratch() -> memoryview:
    """Where ``discard`` points its reads: anonymous memory the kernel never writes (MSG_TRUNC),
    so it stays untouched and costs no resident memory."""
    global _scratch_view
    if _scratch_view is None:
        _scratch_view = memoryview(mmap.mmap(-1, _SCRATCH_SIZE))
    return _scratch_view


def _initial_sndbuf() -> int:
    """A new TCP socket's send buffer size (``tcp_wmem``'s default, the middle value); the
    kernel's compiled-in 16 KiB when the sysctl cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 16384


def _close_now(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the host client sees a reset at once, not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _guest_port(switch: Switch, guest_ip: bytes) -> Port | None:
    """The guest link to open a forwarded connection to ``guest_ip`` on: the port of the guest
    known to use that address (its ARP, its IPv6 packets), else the first port a guest has
    spoken on (one guest, or one that has not shown its address yet)."""
    port = switch.port_for_ip(guest_ip)
    if port is not None:
        return port
    for port in switch.ports:
        if port.guest_mac is not None:
            return port
    return None
