"""Port forwards (host -> guest): the registry, the host listening sockets, and the hooks.

Theory of operation
-------------------
A :class:`Forward` is one published port: a host socket bound to ``host_ip:host_port`` (TCP
listening, or UDP bound) whose traffic goes to ``guest_port`` on the guest. :class:`Forwards`
keeps them by id (a decimal string, never reused while the process lives), validates requests,
and binds the host socket at once, so "port in use" is the kernel's own answer (409 in the API).
Forwards from ``-p`` on the command line are created at start through the same :meth:`add`.

The datapath is not here: the TCP and UDP NAT plug into two hooks.

- ``on_accept(forward, conn, peer)``: called for every accepted TCP connection, with the
  connected, non-blocking socket and the host client's address as ``accept`` returned it (so
  the hook needs no ``getpeername``); the hook takes ownership (opens a flow toward the guest
  or closes it).
- ``on_datagram(forward, payload, sender)``: called for every UDP datagram received on the
  forward's socket; ``payload`` is a view valid only during the call, ``sender`` the host
  client's address. Replies go back with ``forward.sock.sendto(data, sender)``.
- ``on_remove(forward)``: called when a forward is removed (API or shutdown), before its socket
  closes, so the NAT can decide what happens to flows it started (they may keep running: only
  the listening socket goes away).

Until a hook is set, an accepted connection is closed at once (``forward.tcp.no_datapath``) and a
datagram dropped (``forward.udp.no_datapath``). The guest address of a forward is its own
``guest_ip`` when given, else what the ``guest_address`` callable the registry was built with
says (the assembly hands it the DHCP server's latest lease), in the family of the forward's host
address: a client of an IPv4 published port reaches the guest's IPv4 address, one of an IPv6
port its IPv6 address (``guest_address6``): see :meth:`Forwards.guest_ip_for`.

Host sockets are non-blocking and CLOEXEC; reads and accepts are bounded per wake-up; TCP
listeners accept through :class:`~guestnet.io.listener.Listener`, which pauses (counted) while
the process is out of descriptors instead of spinning.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from guestnet.counters import Counters
from guestnet.io.listener import Listener
from guestnet.io.loop import EPOLLIN, Loop

log = logging.getLogger(__name__)

#: Host address a forward binds when none is given: loopback, unlike docker's 0.0.0.0.
DEFAULT_HOST_IP = "127.0.0.1"
#: How long a published port's client may leave what the guest sent unread (TCP_USER_TIMEOUT,
#: inherited by accepted sockets from the listener).
FORWARD_USER_TIMEOUT_MS = 300_000
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
#: Upper bound on forwards (each holds a host socket).
MAX_FORWARDS = 4096
#: Datagrams handled per wake-up of one forward's UDP socket.
RX_BUDGET = 64
#: Connections accepted per wake-up of a TCP forward's listener. One: the listener is
#: level-triggered, so a second pending connection is reported by the loop's next
#: ``epoll_wait``, which runs anyway; accepting on until EAGAIN cost every connection that came
#: alone (the usual case) an ``accept4`` that could only fail, and its exception.
ACCEPTS_PER_WAKE = 1
#: Largest UDP datagram read from a forward's socket.
UDP_MAX = 65535
PROTOS = ("tcp", "udp")

#: A forward as the command line gives it: (proto, host_ip, host_port, guest_port), and the
#: guest's address when the spec names one (``HOST_PORT:GUEST_IP:GUEST_PORT``; issue 15: with
#: several guests on the switch, a forward chooses its guest).
PublishSpec = tuple[str, str, int, int] | tuple[str, str, int, int, str]


class ForwardError(Exception):
    """A refused forward request: ``status`` is the HTTP status the API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class Forward:
    """One published port and its host socket."""

    id: str
    proto: str
    host_ip: str
    host_port: int
    guest_port: int
    #: Fixed guest address, or None for "the guest's current address".
    guest_ip: str | None
    sock: socket.socket = field(repr=False)
    created: float
    #: TCP connections accepted / UDP datagrams received on the host socket.
    accepted: int = 0
    datagrams: int = 0
    closed: bool = False
    #: The TCP forward's accepting side (None for UDP).
    listener: Listener | None = field(default=None, repr=False)

    def to_json(self, guest_ip: str, now: float) -> dict[str, object]:
        """The API's view; ``guest_ip`` is where traffic goes now."""
        return {
            "id": self.id,
            "proto": self.proto,
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "guest_ip": guest_ip,
            "guest_ip_fixed": self.guest_ip is not None,
            "guest_port": self.guest_port,
            "accepted": self.accepted,
            "datagrams": self.datagrams,
            "age_s": round(now - self.created, 3),
        }


class Forwards:
    """The forward registry of one datapath, and the host sockets it binds."""

    def __init__(
        self,
        loop: Loop,
        counters: Counters,
        subnet: ipaddress.IPv4Network,
        guest_address: Callable[[], str],
        subnet6: ipaddress.IPv6Network | None = None,
        guest_address6: Callable[[], str] | None = None,
    ) -> None:
        self.loop = loop
        self.counters = counters
        #: Fixed guest addresses must lie in one of them (no IPv6 one: IPv6 is off).
        self.subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (subnet,)
        if subnet6 is not None:
            self.subnets += (subnet6,)
        #: Where a forward without a fixed guest address sends its traffic now, per family.
        self.guest_address = guest_address
        self.guest_address6 = guest_address6
        self._by_id: dict[str, Forward] = {}
        self._ids = itertools.count(1)
        self._rx = bytearray(UDP_MAX)
        self._rxv = memoryview(self._rx)
        #: TCP datapath hook: takes ownership of the accepted, non-blocking socket; gets the
        #: client's address from ``accept`` with it.
        self.on_accept: Callable[[Forward, socket.socket, tuple[Any, ...]], None] | None = None
        #: UDP datapath hook: (forward, payload view valid during the call, sender address).
        self.on_datagram: Callable[[Forward, memoryview, tuple[object, ...]], None] | None = None
        #: Called before a forward's socket is closed (removal or shutdown).
        self.on_remove: Callable[[Forward], None] | None = None

    # -- registry -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Forward]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, fid: str) -> Forward | None:
        """The forward with id ``fid``, or None."""
        return self._by_id.get(fid)

    def guest_ip_for(self, forward: Forward) -> str:
        """Where the forward's traffic goes now (fixed address, DHCP lease, or configured), in
        the family of its host address."""
        if forward.guest_ip is not None:
            return forward.guest_ip
        if ":" in forward.host_ip and self.guest_address6 is not None:
            return self.guest_address6()
        return self.guest_address()

    def to_json(self, now: float) -> list[dict[str, object]]:
        """Every forward, for the API (ordered by id)."""
        return [f.to_json(self.guest_ip_for(f), now) for f in self._by_id.values()]

    def add(
        self,
        proto: str,
        host_port: int,
        guest_port: int,
        host_ip: str = DEFAULT_HOST_IP,
        guest_ip: str | None = None,
    ) -> Forward:
        """Validate, bind the host socket, register; raises :class:`ForwardError`."""
        if proto not in PROTOS:
            raise ForwardError(400, f"proto must be 'tcp' or 'udp', not {proto!r}")
        _check_port("host_port", host_port, allow_zero=True)
        _check_port("guest_port", guest_port)
        try:
            host_addr = ipaddress.ip_address(host_ip)
        except ValueError:
            raise ForwardError(400, f"host_ip is not an IP address: {host_ip!r}") from None
        if guest_ip is not None:
            try:
                guest_addr = ipaddress.ip_address(guest_ip)
            except ValueError:
                raise ForwardError(400, f"guest_ip is not an IP address: {guest_ip!r}") from None
            if not any(guest_addr in net for net in self.subnets):
                raise ForwardError(400, f"guest_ip {guest_ip} is outside the guest subnet")
            guest_ip = str(guest_addr)
        host_ip = str(host_addr)
        if len(self._by_id) >= MAX_FORWARDS:
            raise ForwardError(409, f"too many forwards (at most {MAX_FORWARDS})")
        if host_port != 0:
            for other in self._by_id.values():
                if (other.proto, other.host_ip, other.host_port) == (proto, host_ip, host_port):
                    raise ForwardError(409, f"{proto} {_hp(host_ip, host_port)} is in use")
        sock = self._bind(proto, host_addr, host_port)
        bound_port = int(sock.getsockname()[1])
        fwd = Forward(
            id=str(next(self._ids)),
            proto=proto,
            host_ip=host_ip,
            host_port=bound_port,
            guest_port=guest_port,
            guest_ip=guest_ip,
            sock=sock,
            created=self.loop.now(),
        )
        self._by_id[fwd.id] = fwd
        self._watch(fwd)
        self.counters.inc(f"forward.{proto}.added")
        log.info(
            "forward %s: %s %s -> guest port %d",
            fwd.id,
            proto,
            _hp(host_ip, bound_port),
            guest_port,
        )
        return fwd

    def remove(self, fid: str) -> Forward:
        """Stop the forward ``fid`` at once; raises ForwardError(404) when there is none."""
        fwd = self._by_id.pop(fid, None)
        if fwd is None:
            raise ForwardError(404, f"no forward with id {fid!r}")
        self._close(fwd)
        self.counters.inc(f"forward.{fwd.proto}.removed")
        log.info("forward %s removed", fid)
        return fwd

    def close(self) -> None:
        """Close every forward (instance shutdown)."""
        while self._by_id:
            _, fwd = self._by_id.popitem()
            self._close(fwd)

    # -- host sockets -------------------------------------------------------------------------

    def _bind(self, proto: str, addr: ipaddress._BaseAddress, port: int) -> socket.socket:
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        try:
            sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise ForwardError(503, f"cannot create a socket: {exc.strerror}") from None
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if proto == "tcp":
                # Lets a restarted guestnet rebind past TIME_WAIT; on Linux it never lets two
                # listeners share a port, so "in use" stays the kernel's answer. (Not for UDP,
                # where it would let two sockets share the port.)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # Accepted connections inherit TCP_NODELAY: none needs a setsockopt of its own.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # And TCP_USER_TIMEOUT: a client that stops reading (a slowloris, or gone
                # without a word) holds what the guest sent only this long before the kernel
                # aborts the connection (zero-window probes count too), and the flow is reset.
                sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, FORWARD_USER_TIMEOUT_MS)
            sock.bind((str(addr), port))
            if proto == "tcp":
                sock.listen(128)
        except OSError as exc:
            sock.close()
            where = f"{proto} {_hp(str(addr), port)}"
            if exc.errno == errno.EADDRINUSE:
                raise ForwardError(409, f"{where} is in use") from None
            if exc.errno == errno.EACCES:
                raise ForwardError(403, f"{where}: permission denied") from None
            raise ForwardError(400, f"cannot bind {where}: {exc.strerror}") from None
        return sock

    def _watch(self, fwd: Forward) -> None:
        if fwd.proto == "tcp":
            fwd.listener = Listener(
                self.loop,
                self.counters,
                fwd.sock,
                self._tcp_handler(fwd),
                "forward.tcp",
                ACCEPTS_PER_WAKE,
            )
        else:
            self.loop.add_fd(fwd.sock.fileno(), EPOLLIN, self._udp_handler(fwd))

    def _close(self, fwd: Forward) -> None:
        if fwd.closed:
            return
        if self.on_remove is not None:
            try:
                self.on_remove(fwd)
            except Exception:
                log.exception("forward %s: on_remove hook failed", fwd.id)
        fwd.closed = True
        if fwd.listener is not None:
            fwd.listener.close()
        else:
            self.loop.remove_fd(fwd.sock.fileno())
            fwd.sock.close()

    def _tcp_handler(self, fwd: Forward) -> Callable[[socket.socket, Any], None]:
        counters = self.counters

        def on_accept(conn: socket.socket, addr: tuple[Any, ...]) -> None:
            fwd.accepted += 1
            hook = self.on_accept
            if hook is None:
                counters.inc("forward.tcp.no_datapath")
                conn.close()
                return
            hook(fwd, conn, addr)

        return on_accept

    def _udp_handler(self, fwd: Forward) -> Callable[[int], None]:
        counters = self.counters
        rxv = self._rxv

        def on_readable(_events: int) -> None:
            for _ in range(RX_BUDGET):
                if fwd.closed:
                    return
                try:
                    n, sender = fwd.sock.recvfrom_into(rxv)
                except BlockingIOError:
                    return
                except OSError:
                    # ICMP errors from earlier replies surface here (ECONNREFUSED): count, go on.
                    counters.inc("forward.udp.recv_error")
                    continue
                fwd.datagrams += 1
                hook = self.on_datagram
                if hook is None:
                    counters.inc("forward.udp.no_datapath")
                    continue
                hook(fwd, rxv[:n], sender)

        return on_readable


def _check_port(name: str, value: object, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 65535:
        raise ForwardError(400, f"{name} must be an integer in {lo}..65535, not {value!r}")


def _hp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- -p/--publish ---------------------------------------------------------------------------------

_PUBLISH = re.compile(
    r"""^(?:(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z]+)\]|(?P<v4>[0-9.]+)):)?
        (?P<host>\d+(?:-\d+)?):
        (?:(?:\[(?P<gv6>[0-9A-Fa-f:.]+)\]|(?P<gv4>[0-9.]+)):)?
        (?P<guest>\d+(?:-\d+)?)
        (?:/(?P<proto>tcp|udp))?$""",
    re.VERBOSE,
)


def _port_range(text: str, what: str) -> range:
    lo_s, _, hi_s = text.partition("-")
    lo = int(lo_s)
    hi = int(hi_s) if hi_s else lo
    if not 1 <= lo <= 65535 or not 1 <= hi <= 65535:
        raise ValueError(f"{what} port {text} is outside 1..65535")
    if hi < lo:
        raise ValueError(f"{what} port range {text} is backwards")
    return range(lo, hi + 1)


def parse_publish(text: str) -> list[PublishSpec]:
    """Parse ``[HOST_IP:]HOST_PORT:[GUEST_IP:]GUEST_PORT[/tcp|/udp]`` (ranges ``A-B:C-D``,
    ``[::1]:80:80``, ``8080:10.0.2.16:80``, ``8080:[fd00::16]:80``).

    Returns one (proto, host_ip, host_port, guest_port) per port, with the guest address as a
    fifth item when the spec names one; raises ValueError.
    """
    m = _PUBLISH.match(text.strip())
    if m is None:
        raise ValueError(
            f"expected [HOST_IP:]HOST_PORT:[GUEST_IP:]GUEST_PORT[/tcp|/udp], got {text!r}"
        )
    host_ip = m.group("v6") or m.group("v4") or DEFAULT_HOST_IP
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        raise ValueError(f"not an IP address: {host_ip!r} in {text!r}") from None
    if (m.group("v4") and addr.version != 4) or (m.group("v6") and addr.version != 6):
        raise ValueError(f"not an IP address: {host_ip!r} in {text!r}")
    hosts = _port_range(m.group("host"), "host")
    guests = _port_range(m.group("guest"), "guest")
    if len(hosts) != len(guests):
        raise ValueError(f"host and guest port ranges differ in length in {text!r}")
    proto = m.group("proto") or "tcp"
    guest_text = m.group("gv6") or m.group("gv4")
    if guest_text is None:
        return [(proto, str(addr), h, g) for h, g in zip(hosts, guests, strict=True)]
    try:
        guest = ipaddress.ip_address(guest_text)
    except ValueError:
        raise ValueError(f"not an IP address: {guest_text!r} in {text!r}") from None
    if (m.group("gv4") and guest.version != 4) or (m.group("gv6") and guest.version != 6):
        raise ValueError(f"not an IP address: {guest_text!r} in {text!r}")
    return [(proto, str(addr), h, g, str(guest)) for h, g in zip(hosts, guests, strict=True)]


def add_published(forwards: Forwards, specs: tuple[PublishSpec, ...]) -> None:
    """Create the forwards from ``-p`` (raises ForwardError on the first that fails)."""
    for proto, host_ip, host_port, guest_port, *guest in specs:
        forwards.add(proto, host_port, guest_port, host_ip, guest[0] if guest else None)
