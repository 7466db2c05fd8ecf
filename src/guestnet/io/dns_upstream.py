"""DNS upstreams on the host: which resolvers, and the UDP sockets that reach them.

:func:`upstream_servers` says which resolvers guestnet uses: ``--dns-upstream`` when given,
else the ``nameserver`` lines of ``/etc/resolv.conf`` (IPv4 and IPv6; a loopback resolver such
as systemd-resolved's 127.0.0.53 works, since guestnet sends from the host), else 127.0.0.1:53
as the C library does. The TCP relay for DNS over TCP calls it too, so both transports agree.

:class:`DnsUpstreamIO` is the thin shell around :class:`~guestnet.core.dns.DnsService`: it is
the classifier's ``dns_udp`` handler, passes queries to the core, sends what the core puts in its
outbox, feeds answers and socket errors back, and keeps one loop timer armed at the core's next
deadline. Each upstream gets one connected, non-blocking UDP socket, opened on first use: being
connected, the socket reports an ICMP port unreachable as ECONNREFUSED, so a resolver that is not
running fails over at once instead of after the timeout. A send the kernel cannot take now
(EAGAIN) is dropped and counted; the timeout then moves the query on. No socket, no crash:
EMFILE and other errors are counted and the query fails over.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Sequence

from guestnet.config import Config
from guestnet.core.dns import UPSTREAM_TIMEOUT_S, DnsService
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.core.timers import Timer
from guestnet.counters import Counters
from guestnet.io.loop import EPOLLIN, Loop
from guestnet.pool import FramePool
from guestnet.wire.udp import DNS_PORT

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
#: What the C library uses when resolv.conf names no server.
DEFAULT_UPSTREAM = ("127.0.0.1", DNS_PORT)
#: Answers read from one upstream socket per wake-up before yielding to other fds.
RX_BUDGET = 64
#: Largest DNS message over UDP (an answer may be up to 64 KiB with EDNS).
RX_BUFSIZE = 65535


def read_resolv_conf(path: str = RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """The ``nameserver`` addresses in ``path`` as (address, 53); empty if unreadable.

    IPv6 addresses may carry a zone (``fe80::1%eth0``); it is kept for the socket to use.
    Lines that are not valid addresses are skipped with a warning.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(65536).splitlines()
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return ()
    servers: list[tuple[str, int]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        addr = fields[1]
        try:
            ipaddress.ip_address(addr.partition("%")[0])
        except ValueError:
            log.warning("%s: ignoring nameserver %r", path, addr)
            continue
        if (addr, DNS_PORT) not in servers:
            servers.append((addr, DNS_PORT))
    return tuple(servers)


def upstream_servers(config: Config, resolv_conf: str = RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """The resolvers guest DNS goes to, in order, as (address, port).

    ``config.dns_upstreams`` if set, else /etc/resolv.conf, else 127.0.0.1:53.
    """
    if config.dns_upstreams:
        return tuple(config.dns_upstreams)
    return read_resolv_conf(resolv_conf) or (DEFAULT_UPSTREAM,)


class DnsUpstreamIO:
    """The guest DNS service over UDP: the core plus one host socket per upstream."""

    def __init__(
        self,
        config: Config,
        loop: Loop,
        pool: FramePool,
        counters: Counters,
        upstreams: Sequence[tuple[str, int]],
        timeout_s: float = UPSTREAM_TIMEOUT_S,
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.core = DnsService(config, pool, counters, upstreams, timeout_s=timeout_s)
        self.upstreams = self.core.upstreams
        self._socks: list[socket.socket | None] = [None] * len(self.upstreams)
        self._timer: Timer | None = None
        self._buf = bytearray(RX_BUFSIZE)
        self._view = memoryview(self._buf)
        self.closed = False

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """A guest query: the core answers or forwards it; forwarded ones are sent here."""
        self.core.handle_udp(pkt, sport, dport, payload, now)
        if self.core.outbox:
            self._flush(now)

    def handle_fast(
        self,
        port: Port,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        payload: memoryview,
        now: float,
    ) -> bool:
        """A guest query over IPv4 from the classifier's fast path (a plain datagram from the
        port's guest at its MAC, to port 53 of the DNS or gateway address): what
        :meth:`handle_udp` does, without the packet object; declined (False) for the datagrams
        of a super-frame, which go one by one the ordinary way."""
        core = self.core
        if not core.handle_fast(port, src, dst, sport, dport, payload, now):
            return False
        if core.outbox:
            self._flush(now)
        return True

    def handle_fast6(
        self,
        port: Port,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        payload: memoryview,
        now: float,
    ) -> bool:
        """:meth:`handle_fast` for a query over IPv6 (the classifier's ``udp_fast6``)."""
        core = self.core
        if not core.handle_fast6(port, src, dst, sport, dport, payload, now):
            return False
        if core.outbox:
            self._flush(now)
        return True

    def tcp_upstream(self) -> tuple[str, int] | None:
        """Where the DNS-over-TCP relay should connect: the first upstream believed up.

        Upstreams that just timed out or refused over UDP are skipped for a while, so TCP
        follows the same failover as UDP.
        """
        return self.core.preferred_upstream(self.loop.now())

    def tcp_upstream_failed(self, upstream: tuple[str, int], now: float) -> None:
        """The DNS-over-TCP relay could not reach ``upstream``: the next query, UDP or TCP,
        starts elsewhere."""
        self.core.tcp_upstream_failed(upstream, now)

    # -- sending -----------------------------------------------------------------------------

    def _flush(self, now: float) -> None:
        """Send everything in the core's outbox, feeding send failures back to the core."""
        core = self.core
        socks = self._socks
        # Each failure moves queries to an upstream they have not tried, so this ends; the
        # bound only guards against a bug turning into a hang.
        for _ in range(4 * len(self.upstreams) + 4):
            batch = core.outbox
            if not batch:
                break
            core.outbox = []
            for upstream, data in batch:
                sock = socks[upstream]
                if sock is None:
                    sock = self._socket(upstream, now)
                    if sock is None:
                        continue
                self._send(sock, upstream, data, now)
        self._arm_timer()

    def _send(self, sock: socket.socket, upstream: int, data: bytes, now: float) -> None:
        try:
            sock.send(data)
        except BlockingIOError:
            self.counters.inc("dns.upstream.send_blocked")
        except ConnectionRefusedError:
            self._failed(upstream, now, "dns.upstream.refused")
        except OSError as exc:
            log.debug("DNS upstream %s: send: %s", self.upstreams[upstream], exc)
            self._failed(upstream, now, "dns.upstream.send_error")

    def _socket(self, upstream: int, now: float) -> socket.socket | None:
        sock = self._socks[upstream]
        if sock is not None:
            return sock
        host, port = self.upstreams[upstream]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(
                family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        except OSError as exc:  # EMFILE, ENFILE, no IPv6
            log.debug("DNS upstream %s: socket: %s", self.upstreams[upstream], exc)
            self.core.handle_upstream_failed(upstream, now, "dns.upstream.socket_failed")
            return None
        try:
            sock.connect((host, port))
        except OSError as exc:  # no route (an IPv6 resolver without IPv6), bad zone
            log.debug("DNS upstream %s: connect: %s", self.upstreams[upstream], exc)
            sock.close()
            self.core.handle_upstream_failed(upstream, now, "dns.upstream.unreachable")
            return None
        self._socks[upstream] = sock
        self.loop.add_fd(sock.fileno(), EPOLLIN, lambda events: self._on_readable(upstream))
        return sock

    def _failed(self, upstream: int, now: float, reason: str) -> None:
        self.core.handle_upstream_failed(upstream, now, reason)

    # -- receiving and timers ------------------------------------------------------------------

    def _on_readable(self, upstream: int) -> None:
        sock = self._socks[upstream]
        if sock is None:
            return
        now = self.loop.now()
        core = self.core
        view = self._view
        for _ in range(RX_BUDGET):
            try:
                n = sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                # ICMP port unreachable for an earlier send: nobody listens there.
                self._failed(upstream, now, "dns.upstream.refused")
                continue
            except OSError as exc:
                log.debug("DNS upstream %s: recv: %s", self.upstreams[upstream], exc)
                self._failed(upstream, now, "dns.upstream.recv_error")
                break
            core.handle_upstream_answer(upstream, view[:n], now)
            if not core.pending_count:
                # Nothing else is awaited: another recv would only say EAGAIN (one system call
                # per query saved). A late or stray datagram still queued wakes epoll again,
                # the fd being level-triggered.
                break
        if core.outbox:
            # Failovers (a refused answer or port): new sends, new deadlines. An answer alone
            # only ends deadlines, and a timer armed early fires once for nothing.
            self._flush(now)

    def _arm_timer(self) -> None:
        """Keep a loop timer armed no later than the core's next deadline.

        A timer is not cancelled when nothing waits any more: it fires once for nothing (at
        most one such wake-up per :data:`UPSTREAM_TIMEOUT_S`), while the next queries find it
        armed early enough. Cancelling and arming one per query cost a timer object and two
        heap operations on every forwarded query.
        """
        deadline = self.core.next_deadline()
        timer = self._timer
        if deadline is None:
            return
        if timer is not None and not timer.cancelled and timer.when <= deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self, now: float) -> None:
        self._timer = None
        self.core.handle_timeout(now)
        self._flush(now)

    def close(self) -> None:
        """Close every upstream socket and cancel the timer."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for i, sock in enumerate(self._socks):
            if sock is not None:
                self.loop.remove_fd(sock.fileno())
                with contextlib.suppress(OSError):
                    sock.close()
                self._socks[i] = None
