"""Host sockets for the UDP NAT (the I/O half of :mod:`guestnet.core.udp`).

Each flow's socket is a non-blocking, close-on-exec UDP socket bound to an ephemeral port on
0.0.0.0, with IP_RECVERR so the host's ICMP errors for it (port unreachable...) are queued where
we can read them, with the destination they were about. The loop watches it for EPOLLIN; the
handler drains up to :data:`RECV_BUDGET` datagrams per wake-up, each received straight into the
payload area of a pooled to-guest frame (``recvmsg_into``, which also reports MSG_TRUNC), and
hands them to the core. EPOLLERR (or a pending error raised by a receive) means the error queue
has something: it is drained with MSG_ERRQUEUE and each ICMP error passed to the core.

UDP segmentation offloads. A guest super-frame (many datagrams of one flow, see
:mod:`guestnet.core.udp`) leaves as one ``sendmsg`` with a ``UDP_SEGMENT`` control message (at
most :data:`~guestnet.core.udp.MAX_SEGMENTS` datagrams per call); where the host refuses that
(``EINVAL``: a segment larger than the route's MTU allows, for one) it leaves one datagram at a
time, as before. Toward the guest, every flow socket has ``UDP_GRO`` when a pooled frame can
hold the largest batch the kernel may return (the family's largest UDP payload: IPv4 fits the 64
KiB slots of an offloading datapath; IPv6's 20 bytes more do not, so IPv6 flows only gather): a
read then returns several datagrams of one source with their size in a ``UDP_GRO`` control
message. When the flow's guest link takes USO super-frames, the handler also gathers what it
reads back to back from one source with one datagram size into one frame (each read lands in a
scratch buffer and is copied behind the previous one) and hands the core one batch; a datagram
that does not fit the batch starts the next one. Nothing waits for more: the batch leaves when
the socket runs dry (EAGAIN).

Buffers. Each flow socket asks for :data:`RCVBUF` bytes of receive buffer (the kernel caps it at
``net.core.rmem_max``): a burst of datagrams from the host then waits in the kernel while the
loop is busy elsewhere instead of being dropped (issue 12 measured 7-17 % host-to-guest loss at
500 Mbit/s with the default 208 KiB).

A periodic sweep (every :data:`SWEEP_INTERVAL_S` at most) expires idle flows; every socket is
closed on flow end and at instance shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct

from guestnet.config import Config
from guestnet.core.icmp import IcmpService, errname
from guestnet.core.policy import Policy
from guestnet.core.switch import Switch
from guestnet.core.udp import MAX_SEGMENTS, UdpFlow, UdpNat
from guestnet.counters import Counters
from guestnet.io.forwards import Forward, Forwards
from guestnet.io.loop import EPOLLERR, EPOLLIN, Loop
from guestnet.pool import HEADROOM, FramePool
from guestnet.wire.icmp import ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, UNREACH_FRAG_NEEDED
from guestnet.wire.icmpv6 import ICMPV6_DEST_UNREACH, ICMPV6_TIME_EXCEEDED

log = logging.getLogger(__name__)

#: Datagrams read from one socket per wake-up, so one busy flow cannot starve the others.
RECV_BUDGET = 64
#: Reads per wake-up when replies are gathered into super-frames (each costs one receive and
#: one copy, not a frame).
GATHER_BUDGET = 256
#: Datagrams gathered into one super-frame toward the guest at most (a kernel UDP_GRO batch
#: may bring up to MAX_SEGMENTS).
GATHER_SEGMENTS = 64
#: Receive buffer each flow socket asks for (capped by net.core.rmem_max).
RCVBUF = 4 * 1024 * 1024
#: Largest UDP payload a host socket returns in one read: a datagram or a UDP_GRO batch.
MAX_READ = 65535
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: Room for the UDP_GRO control message (an int).
_GRO_ANC = socket.CMSG_SPACE(4)
_SEG = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
#: recvmsg's truncation flag as a plain int: ``socket.MSG_TRUNC`` is an IntFlag, and ``flags &
#: socket.MSG_TRUNC`` ran enum.Flag.__and__ in Python (about a microsecond) for every reply read.
MSG_TRUNC = int(socket.MSG_TRUNC)
#: Longest pause between idle-flow sweeps.
SWEEP_INTERVAL_S = 10.0

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
#: (level, type) of the error-queue control messages of either family.
_RECVERR = frozenset({(socket.SOL_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)})
#: struct sock_extended_err: errno, origin, type, code, pad, info, data.
_EXT_ERR = struct.Struct("=IBBBBII")


class FlowSocket:
    """A NAT flow's own non-blocking socket (IPv4 or IPv6), watched for EPOLLIN until
    :meth:`close`.

    Shared by the UDP flows here and the ICMP ping sockets (``io/icmp_sock.py``). ``fd`` is -1
    once closed: a receive loop checks it after each hand-off, since the core may close the flow
    meanwhile.
    """

    __slots__ = ("fd", "loop", "sock")

    def __init__(self, loop: Loop, kind: int, proto: int = 0, family: int = socket.AF_INET) -> None:
        flags = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        sock = socket.socket(family, kind | flags, proto)
        try:
            self.prepare(sock)
            loop.add_fd(sock.fileno(), EPOLLIN, self.on_events)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop

    def prepare(self, sock: socket.socket) -> None:
        """Options and binding before the socket is watched (none by default)."""

    def on_events(self, events: int) -> None:
        """The loop's callback for this socket."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop watching and close (the core calls this on flow end)."""
        if self.fd >= 0:
            self.loop.remove_fd(self.fd)
            self.sock.close()
            self.fd = -1


def _gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The datagram size a UDP_GRO control message gives, 0 if there is none."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            return int(_GRO_SIZE.unpack_from(data)[0])
    return 0


class HostUdpSocket(FlowSocket):
    """One UDP flow's host socket: bound to an ephemeral port, with IP_RECVERR (IPV6_RECVERR
    for an IPv6 flow, on an IPv6-only socket)."""

    __slots__ = ("anc", "driver", "flow", "room")

    def __init__(self, driver: UdpNatDriver, flow: UdpFlow) -> None:
        self.driver = driver
        self.flow = flow
        family = flow.family
        #: Payload bytes a pooled frame holds for this flow's family.
        self.room = min(
            driver.pool.slot_size - HEADROOM - family.udp_payload_off, family.max_l4_len - 8
        )
        #: Control-message room each read asks for: the UDP_GRO size, when GRO is on.
        self.anc = 0
        v6 = family.version == 6
        super().__init__(
            driver.loop, socket.SOCK_DGRAM, 0, socket.AF_INET6 if v6 else socket.AF_INET
        )

    def prepare(self, sock: socket.socket) -> None:
        """Queue the host's ICMP errors for this socket; take an ephemeral port; a large
        receive buffer; UDP_GRO when a frame holds any batch (see the module docstring)."""
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            sock.bind(("::", 0))
        else:
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.bind((self.driver.outbound_addr, 0))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        if self.room >= self.flow.family.max_l4_len - 8:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.anc = _GRO_ANC
            except OSError:
                self.driver.counters.inc("nat.udp.gro.unsupported")

    def sendto(self, data: memoryview, addr: tuple[str, int]) -> int:
        """Send one datagram (non-blocking; OSError on EAGAIN and friends)."""
        try:
            return self.sock.sendto(data, addr)
        except ConnectionError:
            # A queued ICMP error surfaced on send: read it, then try once more.
            self.drain_errors()
            return self.sock.sendto(data, addr)

    def sendto_segments(self, data: memoryview, addr: tuple[str, int], size: int) -> int:
        """Send ``data`` as datagrams of ``size`` bytes: one sendmsg with UDP_SEGMENT per
        :data:`MAX_SEGMENTS` of them; one datagram per send where the kernel refuses it."""
        sendmsg = self.sock.sendmsg
        cmsg = [(SOL_UDP, UDP_SEGMENT, _SEG.pack(size))]
        step = size * MAX_SEGMENTS
        total = len(data)
        sent = 0
        for at in range(0, total, step):
            chunk = data[at : at + step]
            try:
                sendmsg([chunk], cmsg, 0, addr)
            except ConnectionError:
                self.drain_errors()
                sendmsg([chunk], cmsg, 0, addr)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EMSGSIZE, errno.EIO):
                    raise
                # No GSO on this route (a segment above its MTU, xfrm...): one at a time.
                self.driver.counters.inc(f"nat.udp.gso.{errname(exc)}")
                for one in range(0, len(chunk), size):
                    self.sendto(chunk[one : one + size], addr)
                    sent += 1
                continue
            sent += -(-len(chunk) // size)
        return sent

    def on_events(self, events: int) -> None:
        """Drain replies into pooled frames and hand them to the core."""
        driver = self.driver
        if events & EPOLLERR:
            self.drain_errors()
        limit, max_seg = driver.nat.coalesce_limits(self.flow)
        if limit:
            self._gather(min(limit, self.room), max_seg)
            return
        nat = driver.nat
        pool = driver.pool
        counters = driver.counters
        recv = self.sock.recvmsg_into
        anc = self.anc
        room = self.room
        family = self.flow.family
        for _ in range(RECV_BUDGET):
            if self.fd < 0:
                return
            frame = pool.acquire()
            off = frame.start + family.udp_payload_off
            try:
                n, ancdata, flags, addr = recv([frame.view[off : off + room]], anc)
            except BlockingIOError:
                pool.release(frame)
                return
            except ConnectionError:
                pool.release(frame)
                self.drain_errors()
                continue
            except OSError as exc:
                pool.release(frame)
                counters.inc(f"nat.udp.recv.{exc.errno}")
                return
            if flags & MSG_TRUNC:
                pool.release(frame)
                counters.inc("nat.udp.reply.truncated")
                continue
            seg = _gro_size(ancdata) if ancdata else 0
            nat.deliver_reply(self.flow, frame, n, addr[0], addr[1], driver.loop.now(), seg)

    def _gather(self, limit: int, max_seg: int) -> None:
        """Read replies and hand them to the core in batches of one source and one datagram
        size, at most ``limit`` payload bytes and GATHER_SEGMENTS datagrams each; a datagram above
        ``max_seg`` (it needs fragments) goes on its own."""
        driver = self.driver
        nat = driver.nat
        pool = driver.pool
        counters = driver.counters
        flow = self.flow
        recv = self.sock.recvmsg_into
        anc = self.anc
        scratch = driver.scratch
        base = flow.family.udp_payload_off
        room = self.room
        frame = None
        total = seg = count = 0
        src: tuple[str, int] = ("", 0)
        try:
            for _ in range(GATHER_BUDGET):
                if self.fd < 0:
                    return
                try:
                    n, ancdata, flags, addr = recv([scratch], anc)
                except BlockingIOError:
                    return
                except ConnectionError:
                    self.drain_errors()
                    continue
                except OSError as exc:
                    counters.inc(f"nat.udp.recv.{exc.errno}")
                    return
                if flags & MSG_TRUNC or n > room:
                    counters.inc("nat.udp.reply.truncated")
                    continue
                gro = _gro_size(ancdata) if ancdata else 0
                k = -(-n // gro) if gro else 1
                if (
                    frame is not None
                    and addr == src
                    and n
                    and (gro == seg if gro else n <= seg)
                    and total + n <= limit
                    and count + k <= GATHER_SEGMENTS
                ):
                    at = frame.start + base + total
                    frame.view[at : at + n] = scratch[:n]
                    total += n
                    count += k
                else:
                    if frame is not None:
                        nat.deliver_reply(flow, frame, total, src[0], src[1], driver.loop.now(),
                                          seg)  # fmt: skip
                    frame = pool.acquire()
                    at = frame.start + base
                    frame.view[at : at + n] = scratch[:n]
                    total, seg, count, src = n, gro or n, k, addr
                # A short (last) datagram, an empty one, one that needs fragments or a full
                # frame ends the batch.
                if (
                    not seg
                    or total % seg
                    or seg > max_seg
                    or total + seg > limit
                    or count >= GATHER_SEGMENTS
                ):
                    nat.deliver_reply(flow, frame, total, src[0], src[1], driver.loop.now(), seg)
                    frame = None
        finally:
            if frame is not None:
                nat.deliver_reply(flow, frame, total, src[0], src[1], driver.loop.now(), seg)

    def drain_errors(self) -> None:
        """Read the socket's error queue; forward ICMP errors to the core."""
        for _ in range(RECV_BUDGET):
            if self.fd < 0:
                return
            try:
                _data, anc, _flags, addr = self.sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for level, kind, cdata in anc:
                if len(cdata) < _EXT_ERR.size or (level, kind) not in _RECVERR:
                    continue
                _errno, origin, type_, code, _pad, _info, _d = _EXT_ERR.unpack_from(cdata)
                if origin == SO_EE_ORIGIN_ICMP:
                    forward = type_ == ICMP_TIME_EXCEEDED or (
                        type_ == ICMP_DEST_UNREACH and code != UNREACH_FRAG_NEEDED
                    )
                elif origin == SO_EE_ORIGIN_ICMP6:
                    # Packet too big (2) is the host's to handle, as fragmentation needed is.
                    forward = type_ in (ICMPV6_DEST_UNREACH, ICMPV6_TIME_EXCEEDED)
                else:
                    continue
                if forward:
                    self.driver.nat.handle_host_error(
                        self.flow, addr[0], addr[1], type_, code, self.driver.loop.now()
                    )
                else:
                    self.driver.counters.inc(f"nat.udp.host_error.{type_}.{code}.ignored")


class UdpNatDriver:
    """Owns the UDP NAT core, its sockets and its sweep timer."""

    def __init__(
        self,
        config: Config,
        loop: Loop,
        pool: FramePool,
        counters: Counters,
        switch: Switch,
        policy: Policy,
        icmp: IcmpService,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.counters = counters
        #: Source address the flows' host sockets bind to (``--outbound-addr``, else any).
        self.outbound_addr = config.outbound_addr or "0.0.0.0"
        self.nat = UdpNat(config, pool, counters, switch, policy, icmp, self._open)
        #: Where replies after the first of a batch are read (see the module docstring).
        self.scratch = memoryview(bytearray(MAX_READ + 1))
        self.interval = max(1.0, min(SWEEP_INTERVAL_S, self.nat.timeout / 4))
        self._timer = self.loop.call_later(self.interval, self._sweep)

    def attach_forwards(self, forwards: Forwards) -> None:
        """Take the datagrams of published UDP ports (host -> guest) into the NAT."""
        self.forwards = forwards
        forwards.on_datagram = self.on_forward_datagram
        previous = forwards.on_remove

        def on_remove(fwd: Forward) -> None:
            if fwd.proto == "udp":
                fid = fwd.id
                self.nat.drop_inbound_where(lambda source: source[0] == fid)  # type: ignore[index]
            if previous is not None:
                previous(fwd)

        forwards.on_remove = on_remove

    def on_forward_datagram(
        self, fwd: Forward, payload: memoryview, sender: tuple[object, ...]
    ) -> None:
        """One datagram from a host client of a published port: into the guest."""
        try:
            guest_ip = ipaddress.ip_address(self.forwards.guest_ip_for(fwd)).packed
        except ValueError:
            self.counters.inc("nat.udp.forward.guest_address_invalid")
            return
        sock = fwd.sock

        def reply(data: memoryview) -> int:
            return sock.sendto(data, sender)

        port = sender[1]
        assert isinstance(port, int)
        self.nat.deliver_inbound(
            (fwd.id, sender), reply, guest_ip, fwd.guest_port, port, payload, self.loop.now()
        )

    def _open(self, flow: UdpFlow) -> HostUdpSocket:
        return HostUdpSocket(self, flow)

    def _sweep(self, now: float) -> None:
        self.nat.expire(now)
        self._timer = self.loop.call_at(now + self.interval, self._sweep)

    def flows(self, now: float) -> list[dict[str, object]]:
        """Every UDP flow, for the API's ``/flows``."""
        return self.nat.flows_info(now)

    def close(self) -> None:
        """Cancel the sweep and close every flow's socket."""
        self._timer.cancel()
        with contextlib.suppress(OSError):
            self.nat.close_all()
