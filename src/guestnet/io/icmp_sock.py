"""Host endpoints for ICMP echo (the I/O half of :mod:`guestnet.core.icmp`).

At start-up :func:`probe_echo_mode` tries, once, what this process may open:

- ``ping``: an unprivileged ICMP socket (``SOCK_DGRAM``, ``IPPROTO_ICMP``), allowed when the
  process's group is inside ``net.ipv4.ping_group_range``. One socket per echo flow; the kernel
  picks its identifier (the socket's "port"), fills in checksum and identifier on send, and
  delivers only replies carrying that identifier, as ICMP header + data;
- ``raw``: a raw ICMP socket (CAP_NET_RAW). One socket for all flows; guestnet picks a distinct
  identifier per flow, writes whole echo messages, and matches replies by identifier (a raw
  socket sees every ICMP message the host receives, IP header included);
- neither: echo to outside addresses is dropped (``icmp.echo.no_socket``) and one warning at
  start-up names the sysctl and the capability that would enable it.

Either way replies are received straight into a pooled to-guest frame, at the place the ICMP
message goes, and handed to :meth:`IcmpService.deliver_echo_reply`, which restores the guest's
identifier.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct

from guestnet.config import Config
from guestnet.core.icmp import DIALECTS, EchoFlow, IcmpService
from guestnet.core.policy import Policy
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.io.loop import EPOLLIN, Loop
from guestnet.io.udp_nat import RECV_BUDGET, SWEEP_INTERVAL_S, FlowSocket
from guestnet.pool import FramePool
from guestnet.wire.checksum import checksum, ones_sum
from guestnet.wire.ethernet import ETH_HLEN
from guestnet.wire.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HLEN
from guestnet.wire.icmpv6 import ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST
from guestnet.wire.l3 import IPV6

log = logging.getLogger(__name__)

_ECHO = struct.Struct("!BBHHH")
IPPROTO_ICMPV6 = getattr(socket, "IPPROTO_ICMPV6", 58)
_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def probe_echo_mode() -> str | None:
    """``"ping"``, ``"raw"`` or None: the best ICMP echo socket this process may open."""
    for kind, mode in ((socket.SOCK_DGRAM, "ping"), (socket.SOCK_RAW, "raw")):
        try:
            sock = socket.socket(socket.AF_INET, kind | _FLAGS, socket.IPPROTO_ICMP)
        except OSError:
            continue
        sock.close()
        return mode
    return None


def no_echo_warning() -> str:
    """The one start-up warning when no echo socket can be opened."""
    return (
        "ICMP echo to outside addresses is disabled: this process may open neither ping "
        f"sockets (group {os.getgid()} is outside sysctl net.ipv4.ping_group_range; e.g. "
        'sysctl -w net.ipv4.ping_group_range="0 2147483647") nor raw sockets (needs '
        "CAP_NET_RAW); echo to the gateway and DNS addresses is still answered"
    )


class PingSocket(FlowSocket):
    """One echo flow's unprivileged ICMP socket."""

    __slots__ = ("driver", "flow")

    def __init__(self, driver: IcmpDriver, flow: EchoFlow) -> None:
        self.driver = driver
        self.flow = flow
        if flow.family.version == 6:
            super().__init__(driver.loop, socket.SOCK_DGRAM, IPPROTO_ICMPV6, socket.AF_INET6)
        else:
            super().__init__(driver.loop, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)

    def send_echo(self, host: str, seq: int, payload: memoryview) -> None:
        """Send an echo request; the kernel sets identifier and checksum."""
        kind = DIALECTS[self.flow.family.version].echo_request
        self.sock.sendmsg([_ECHO.pack(kind, 0, 0, 0, seq), payload], [], 0, (host, 0))

    def on_events(self, _events: int) -> None:
        """Receive replies (ICMP header + data) into pooled frames."""
        pool = self.driver.pool
        for _ in range(RECV_BUDGET):
            if self.fd < 0:
                return
            frame = pool.acquire()
            off = frame.start + self.flow.family.l4_off
            room = min(len(frame.view) - off, self.flow.family.max_l4_len)
            try:
                n, _anc, _flags, addr = self.sock.recvmsg_into([frame.view[off : off + room]])
            except BlockingIOError:
                pool.release(frame)
                return
            except OSError as exc:
                pool.release(frame)
                self.driver.counters.inc(f"icmp.echo.recv.{exc.errno}")
                return
            self.driver.icmp.deliver_echo_reply(self.flow, frame, n, addr[0])


class RawEcho:
    """One echo flow's share of the raw socket: an identifier chosen by guestnet."""

    __slots__ = ("driver", "flow", "ident")

    def __init__(self, driver: IcmpDriver, flow: EchoFlow, ident: int) -> None:
        self.driver = driver
        self.flow = flow
        self.ident = ident

    def send_echo(self, host: str, seq: int, payload: memoryview) -> None:
        """Send a whole echo request with this flow's identifier.

        ICMPv6 raw sockets compute the checksum themselves (it covers the pseudo-header,
        whose source address only the kernel knows); for ICMP it is ours to write.
        """
        if self.flow.family.version == 6:
            hdr = bytearray(_ECHO.pack(ICMPV6_ECHO_REQUEST, 0, 0, self.ident, seq))
            raw = self.driver.raw6
        else:
            hdr = bytearray(_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, self.ident, seq))
            struct.pack_into("!H", hdr, 2, checksum(hdr, ones_sum(payload)))
            raw = self.driver.raw
        if raw is None:
            raise OSError(errno.EAFNOSUPPORT, "no raw socket for this family")
        raw.sendmsg([hdr, payload], [], 0, (host, 0))

    def close(self) -> None:
        """Give the identifier back."""
        self.driver.raw_flows.pop(self.ident, None)


class IcmpDriver:
    """Owns the ICMP service, its echo sockets and its sweep timer.

    ``mode``: ``"ping"``, ``"raw"`` or None, as :func:`probe_echo_mode` says.
    """

    def __init__(
        self,
        config: Config,
        loop: Loop,
        pool: FramePool,
        counters: Counters,
        switch: Switch,
        policy: Policy,
        mode: str | None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.counters = counters
        self.raw: socket.socket | None = None
        self.raw6: socket.socket | None = None
        self.raw_flows: dict[int, RawEcho] = {}
        self._next_ident = os.getpid() & 0xFFFF
        if mode == "raw":
            self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW | _FLAGS, socket.IPPROTO_ICMP)
            self.loop.add_fd(self.raw.fileno(), EPOLLIN, self._on_raw)
            if config.ipv6:
                try:
                    self.raw6 = socket.socket(
                        socket.AF_INET6, socket.SOCK_RAW | _FLAGS, IPPROTO_ICMPV6
                    )
                except OSError as exc:  # a kernel without IPv6
                    log.info("no raw ICMPv6 socket (%s): no IPv6 echo to outside addresses", exc)
                else:
                    self.loop.add_fd(self.raw6.fileno(), EPOLLIN, self._on_raw6)
        self.icmp = IcmpService(
            config,
            pool,
            counters,
            switch,
            policy,
            backend=self if mode is not None else None,
        )
        self._timer = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def open(self, flow: EchoFlow) -> PingSocket | RawEcho:
        """The EchoBackend interface: a host endpoint for a new echo flow."""
        if self.raw is None:
            return PingSocket(self, flow)
        for _ in range(65536):
            self._next_ident = (self._next_ident + 1) & 0xFFFF
            if self._next_ident not in self.raw_flows:
                break
        else:  # pragma: no cover - the flow table is far smaller than 65536
            raise OSError(24, "no free ICMP identifier")
        echo = RawEcho(self, flow, self._next_ident)
        self.raw_flows[echo.ident] = echo
        return echo

    def _on_raw(self, _events: int) -> None:
        """Receive from the raw socket; keep only echo replies carrying one of our identifiers."""
        raw = self.raw
        assert raw is not None
        pool = self.pool
        for _ in range(RECV_BUDGET):
            frame = pool.acquire()
            l3 = frame.start + ETH_HLEN
            try:
                n, _anc, _flags, addr = raw.recvmsg_into([frame.view[l3 : l3 + 65535]])
            except BlockingIOError:
                pool.release(frame)
                return
            except OSError as exc:
                pool.release(frame)
                self.counters.inc(f"icmp.echo.recv.{exc.errno}")
                return
            buf = frame.view
            ihl = (buf[l3] & 0x0F) * 4
            icmp_len = n - ihl
            if icmp_len < ICMP_HLEN or buf[l3 + ihl] != ICMP_ECHO_REPLY:
                pool.release(frame)  # the raw socket sees all ICMP: not ours to count
                continue
            ident = (buf[l3 + ihl + 4] << 8) | buf[l3 + ihl + 5]
            echo = self.raw_flows.get(ident)
            if echo is None or echo.flow.family.version != 4:
                pool.release(frame)
                continue
            dst = frame.start + echo.flow.family.l4_off
            if l3 + ihl != dst:  # move the message to where the header we write leaves it
                buf[dst : dst + icmp_len] = bytes(buf[l3 + ihl : l3 + ihl + icmp_len])
            self.icmp.deliver_echo_reply(echo.flow, frame, icmp_len, addr[0])

    def _on_raw6(self, _events: int) -> None:
        """Receive from the raw ICMPv6 socket (messages without the IPv6 header); keep only
        echo replies carrying one of our identifiers."""
        raw = self.raw6
        assert raw is not None
        pool = self.pool
        for _ in range(RECV_BUDGET):
            frame = pool.acquire()
            off = frame.start + IPV6.l4_off
            try:
                n, _anc, _flags, addr = raw.recvmsg_into([frame.view[off : off + 65535]])
            except BlockingIOError:
                pool.release(frame)
                return
            except OSError as exc:
                pool.release(frame)
                self.counters.inc(f"icmp.echo.recv.{exc.errno}")
                return
            buf = frame.view
            echo = None
            if n >= ICMP_HLEN and buf[off] == ICMPV6_ECHO_REPLY:
                echo = self.raw_flows.get((buf[off + 4] << 8) | buf[off + 5])
            if echo is None or echo.flow.family.version != 6:
                pool.release(frame)  # the raw socket sees all ICMPv6: not ours to count
                continue
            self.icmp.deliver_echo_reply(echo.flow, frame, n, addr[0].partition("%")[0])

    def _sweep(self, now: float) -> None:
        self.icmp.expire(now)
        self._timer = self.loop.call_at(now + SWEEP_INTERVAL_S, self._sweep)

    def flows(self, now: float) -> list[dict[str, object]]:
        """Every echo flow, for the API's ``/flows``."""
        return self.icmp.flows_info(now)

    def close(self) -> None:
        """Cancel the sweep, close every echo flow and the raw socket."""
        self._timer.cancel()
        with contextlib.suppress(OSError):
            self.icmp.close_all()
        for raw in (self.raw, self.raw6):
            if raw is not None:
                self.loop.remove_fd(raw.fileno())
                raw.close()
        self.raw = self.raw6 = None
