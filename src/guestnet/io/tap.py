"""TAP links: a guest that is a Linux network namespace, through a TAP fd with virtio-net headers.

Theory of operation
-------------------
The TAP is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and a 12-byte virtio-net header
(``TUNSETVNETHDRSZ``). Every ``read`` returns one header and one Ethernet frame; every ``write``
must carry one header in front of one frame. Both directions avoid copies:

- guest to us: the read lands in a pooled frame (one per link, held while it lives) at
  ``frame.start - VNET_HDR_LEN``, so the header fills the headroom and the Ethernet frame starts
  exactly at ``frame.start``. The header's flags say whether the kernel vouches for the
  checksum (``NEEDS_CSUM``: a partial checksum the sender left to offload; ``DATA_VALID``:
  already checked); either way the classifier is told ``csum_trusted`` and skips verifying it.
- us to guest: the frame's offload metadata becomes the header, written into the headroom in front
  of the frame (all zeros for a plain frame), and header plus frame leave in one ``os.write``.
  A TAP write is all or nothing; EAGAIN leaves the frame in the Link's bounded queue until
  EPOLLOUT.

Offloads. Python pays per frame, not per byte, so the lever is fewer, larger frames. With
``config.offloads`` (the default) the TAP gets ``TUNSETOFFLOAD`` with checksum, TSO4, TSO6,
TSO-ECN, USO4 and USO6: the guest's kernel then hands us TCP super-frames of up to 64 KiB at any
MTU, with a partial checksum (``NEEDS_CSUM``), ``gso_type`` TCPV4/TCPV6 and ``gso_size`` its MSS.
Its IPv4 header checksum is whole (the kernel writes it before segmentation, for the
super-frame's own total length), so the classifier still verifies that; the TCP translation
takes the super-frame as one in-order segment. A kernel before 6.2 refuses USO (EINVAL): the
link then asks again without it (``link.tap.offload.uso_unsupported``).

UDP segmentation (USO, Linux 6.2+). A guest application that sends with ``UDP_SEGMENT`` makes its
kernel hand over one super-frame of many datagrams of one flow: ``gso_type`` UDP_L4 (5),
``gso_size`` the payload of each datagram, a partial checksum. The link passes it to the
classifier whole, with ``Port.rx_gso_size`` set for the call; the UDP NAT sends it on with one
``sendmsg`` (see :mod:`guestnet.core.udp`). UFO (``gso_type`` UDP, 3: one datagram to be
fragmented) is never asked for; such a frame, or a UDP_L4 one on a link without USO, is dropped
and counted (``link.tap.read.gso_unsupported``). Toward the guest, a frame whose partial checksum
sits at UDP's offset (6) with a ``gso_size`` is a USO super-frame (``Port.udp_offload``): its
header says UDP_L4, and the guest's kernel cuts it into datagrams.

Toward the guest, the port announces ``offload_max`` (a 64 KiB IP packet), and the TCP core
fills :class:`~guestnet.pool.Frame`'s ``csum_start``/``csum_offset``/``gso_size``: the header
then says ``NEEDS_CSUM`` (the kernel never computes a checksum it would only verify for local
delivery) and, for a super-frame, ``gso_type`` TCPV4 with ``gso_size`` = MSS; the guest's kernel
takes it whole for local delivery and segments it only if it forwards it. Writing such a header
needs no ``TUNSETOFFLOAD`` (that only governs what the kernel sends us), but we tie both
directions to the one switch. When the ioctl fails (a kernel or fd without it) the link runs
without offloads and counts ``link.tap.offload.unsupported``.

Reads per wake-up. The TAP is registered level-triggered, and a read returns one frame, never
saying whether another waits. A link that reads until EAGAIN pays one read that can only fail
per wake-up: one system call (and a Python exception) in every 1-byte round trip, whose
request is one frame. So a link whose last such read showed sparse traffic (the wake-up found
at most one frame) reads one frame and stops: if another was queued, epoll reports the TAP
again at once (level-triggered), and a link reported in the turn right after it stopped early
reads until EAGAIN again, counting what it finds with the frame it stopped after; two or more
end the sparse mode (a burst: the EAGAIN read is then one per burst, not per frame; two frames
per wake-up do not keep it alternating). Nothing is ever left unread for longer than one loop
turn.

A TAP is created in the network namespace of the process that calls ``TUNSETIFF``, and may then
be moved to another one (the fd keeps serving it). :func:`open_tap` is therefore called by a
child process, in a private namespace of its own from which it moves the finished interface into
the target (see :mod:`guestnet.io.netns`), and passes the fd back; guestnet itself never leaves
its own namespaces.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import struct
from typing import NamedTuple

from guestnet.io.links import RX_BUDGET, Link, LinkHub
from guestnet.io.loop import EPOLLIN
from guestnet.pool import HEADROOM, Frame
from guestnet.wire.ethernet import ETHERTYPE_IPV6

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
#: Offload bits for TUNSETOFFLOAD.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
#: UDP segmentation offload (Linux 6.2+), both families: only together with TUN_F_CSUM.
USO_OFFLOADS = TUN_F_USO4 | TUN_F_USO6
#: What ``config.offloads`` asks for: checksums, TCP segmentation and UDP segmentation (USO; a
#: kernel that refuses it gets the rest, see :class:`TapLink`). Never UFO (fragmentation).
DEFAULT_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | USO_OFFLOADS
#: Largest IP packet in one super-frame (the kernel's legacy GSO limit; tun never raises it).
TSO_MAX_PACKET = 65535

#: virtio-net header with ``num_buffers``: what we ask TUNSETVNETHDRSZ for.
VNET_HDR_LEN = 12
#: Header flags: the checksum is partial and left to us (offload) / already verified.
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
#: Header gso_type values (the ECN bit may be or-ed onto the TCP ones).
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP = 3
VNET_GSO_TCPV6 = 4
VNET_GSO_UDP_L4 = 5
VNET_GSO_ECN = 0x80
#: TCP's checksum field, from the start of the TCP header.
TCP_CSUM_OFFSET = 16
#: UDP's checksum field, from the start of the UDP header: a frame with a partial checksum at
#: this offset is UDP (the TCP core's frames carry 16).
UDP_CSUM_OFFSET = 6
UDP_HLEN = 8
#: Longest interface name the kernel takes (IFNAMSIZ - 1).
IFNAME_MAX = 15

assert VNET_HDR_LEN <= HEADROOM, "the virtio-net header must fit in a frame's headroom"

_ZERO_HDR = bytes(VNET_HDR_LEN)
#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers (little-endian).
_VNET = struct.Struct("<BBHHHHH")
#: gso_type values a frame from the guest may carry (after masking the ECN bit).
_GSO_ACCEPTED = frozenset({VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6})


class VnetHdr(NamedTuple):
    """A virtio-net header, as :func:`parse_vnet_hdr` reads it."""

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


def parse_vnet_hdr(data: bytes | bytearray | memoryview) -> VnetHdr:
    """The virtio-net header at the start of ``data`` (``num_buffers`` ignored)."""
    return VnetHdr(*_VNET.unpack_from(data, 0)[:6])


def build_vnet_hdr(buf: bytearray | memoryview, off: int, frame: Frame) -> None:
    """Write the header for ``frame`` at ``off``: its offload metadata, or zeros for none.

    ``hdr_len`` (Ethernet, IP and TCP headers) is read from the TCP header's data offset (a
    UDP header is 8 bytes); the kernel uses it only as a hint for how much to put in the linear
    part of the packet. A super-frame is UDP (``gso_type`` UDP_L4, ``gso_size`` the datagram
    payload) when its checksum field sits at UDP's offset, else TCP of the frame's IP version.
    """
    cs = frame.csum_start
    if cs < 0:
        buf[off : off + VNET_HDR_LEN] = _ZERO_HDR
        return
    gso = frame.gso_size
    if gso:
        if frame.csum_offset == UDP_CSUM_OFFSET:
            _VNET.pack_into(
                buf, off, VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4, cs + UDP_HLEN, gso, cs,
                UDP_CSUM_OFFSET, 0,
            )  # fmt: skip
            return
        view = frame.view
        start = frame.start
        hdr_len = cs + ((view[start + cs + 12] >> 4) << 2)
        ipv6 = ((view[start + 12] << 8) | view[start + 13]) == ETHERTYPE_IPV6
        gso_type = VNET_GSO_TCPV6 if ipv6 else VNET_GSO_TCPV4  # by the frame's IP version
        _VNET.pack_into(
            buf, off, VNET_F_NEEDS_CSUM, gso_type, hdr_len, gso, cs, frame.csum_offset, 0
        )
    else:
        _VNET.pack_into(buf, off, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, cs, frame.csum_offset, 0)


def check_ifname(ifname: str) -> str:
    """Return ``ifname`` if the kernel would accept it as an interface name, else ValueError."""
    raw = ifname.encode()
    if not raw or len(raw) > IFNAME_MAX or "/" in ifname or any(c.isspace() for c in ifname):
        raise ValueError(f"not a valid interface name: {ifname!r} (1..{IFNAME_MAX} characters)")
    if ifname in (".", ".."):
        raise ValueError(f"not a valid interface name: {ifname!r}")
    return ifname


def open_tap(ifname: str, offloads: int = 0) -> int:
    """Create (or attach to) TAP ``ifname`` in the caller's network namespace; return its fd.

    The fd is close-on-exec and blocking; :class:`TapLink` makes it non-blocking. The interface
    is not persistent: it disappears when the last fd on it is closed.
    """
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        set_offloads(fd, offloads)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_offloads(fd: int, flags: int) -> None:
    """Tell the kernel which offloads we handle (``TUN_F_*``); 0 switches them all off."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


class TapLink(Link):
    """One TAP fd with virtio-net headers: one frame per read, one per write."""

    kind = "tap"

    def __init__(
        self,
        hub: LinkHub,
        fd: int,
        name: str,
        ifname: str | None = None,
        offloads: int = DEFAULT_OFFLOADS,
    ) -> None:
        """``offloads``: the ``TUN_F_*`` bits to ask for (0: plain frames)."""
        os.set_blocking(fd, False)
        self.ifname = ifname
        self.offloads = 0
        #: The last wake-up that read until EAGAIN found at most one frame, and the loop turn in
        #: which a wake-up last stopped after one frame (see "Reads per wake-up" above).
        self._sparse = False
        self._sparse_turn = -2
        #: The pooled frame every read lands in (taken at the first read), the read's buffer
        #: and the view of its virtio-net header.
        self._rx_frame: Frame | None = None
        self._rx_buf = memoryview(b"")
        self._rx_vnet: memoryview | None = None
        #: Reads go through a FileIO on the fd (never closing it): its ``readinto`` returns None
        #: for EAGAIN where ``os.readv`` raises BlockingIOError, whose message (strerror,
        #: gettext, a str) cost about a microsecond at the end of every burst, once per DNS
        #: query and per guest packet of a request/response exchange.
        self._readinto = io.FileIO(fd, "rb", closefd=False).readinto
        super().__init__(hub, fd, name)
        if offloads:
            self._ask_offloads(offloads)

    def _ask_offloads(self, offloads: int) -> None:
        """Ask for ``offloads``; a kernel before 6.2 refuses USO (EINVAL): ask for the rest."""
        counters = self.hub.counters
        try:
            self.set_offloads(offloads)
            return
        except OSError as exc:
            error = exc
        if offloads & USO_OFFLOADS and error.errno == errno.EINVAL:
            counters.inc("link.tap.offload.uso_unsupported")
            try:
                self.set_offloads(offloads & ~USO_OFFLOADS)
                return
            except OSError as exc:
                error = exc
        counters.inc("link.tap.offload.unsupported")
        log.info("%s: no TAP offloads (%s); plain frames", self.name, error)

    def set_offloads(self, flags: int) -> None:
        """Switch offloads on or off for this TAP, both ways (see the module docstring)."""
        set_offloads(self.fd, flags)
        self.offloads = flags
        port = self.port
        port.offload_max = TSO_MAX_PACKET if flags & TUN_F_CSUM else 0
        port.udp_offload = bool(flags & TUN_F_CSUM) and flags & USO_OFFLOADS == USO_OFFLOADS

    def _write(self, frame: Frame, offset: int) -> int | None:
        start = frame.start - VNET_HDR_LEN
        view = frame.view
        cs = frame.csum_start
        if cs < 0:
            view[start : frame.start] = _ZERO_HDR
        elif not frame.gso_size:
            # build_vnet_hdr's commonest case inline (every segment that is no super-frame).
            _VNET.pack_into(
                view, start, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, cs, frame.csum_offset, 0
            )
        else:
            build_vnet_hdr(view, start, frame)
        try:
            os.write(self.fd, view[start : frame.start + frame.length])
        except BlockingIOError:
            return 0
        except OSError as exc:
            # EIO while the interface is down, EINVAL for a frame it refuses: drop this one.
            self.hub.counters.inc(f"link.tap.write.{_errname(exc)}")
            return -1
        self.hub.pool_to_guest.release(frame)
        return None

    def _on_events(self, events: int) -> None:
        # Link._on_events with the common case (readable, nothing queued) first.
        if events == EPOLLIN and not self.closed:
            self._on_readable()
        else:
            Link._on_events(self, events)

    def _on_readable(self) -> None:
        hub = self.hub
        classify = hub.deliver
        port = self.port
        loop = hub.loop
        now = loop.clock()  # loop.now(), without its Python frame
        turn = loop.turn
        # Sparse traffic: stop after one frame, unless the last wake-up did (see the docstring):
        # then this read-until-EAGAIN continues its burst, and the frame it took counts.
        follow = turn == self._sparse_turn + 1
        one = self._sparse and not follow
        got = 0
        frame = self._rx_frame
        if frame is None:
            # One pooled frame serves every read of the link (held until it closes): no
            # acquire, release or views per wake-up.
            frame = self._rx_frame = hub.pool_from_guest.acquire()
            self._rx_buf = frame.view[frame.start - VNET_HDR_LEN :]
            self._rx_vnet = frame.view[frame.start - VNET_HDR_LEN : frame.start]
        view = frame.view
        start = frame.start
        hdr_at = start - VNET_HDR_LEN
        buf = self._rx_buf
        readinto = self._readinto
        # Each read's header, for the switch (core/switch.py): the view stays valid.
        port.rx_vnet = self._rx_vnet
        port.backlog = True  # unless a read finds the queue empty
        try:
            for _ in range(RX_BUDGET):
                if got and one:
                    # Taken as empty (the last wake-up that looked found one frame).
                    self._sparse_turn = turn
                    port.backlog = False
                    return
                try:
                    n = readinto(buf)  # EINTR is retried inside
                except OSError as exc:
                    # EBADFD/EIO: the device is gone (its namespace was torn down).
                    hub.counters.inc(f"link.tap.read.{_errname(exc)}")
                    log.warning("%s: read: %s; closing the link", self.name, exc)
                    self.close()
                    return
                if n is None:  # EAGAIN: the queue is empty
                    port.backlog = False
                    if not one:
                        self._sparse = got + follow <= 1
                    return
                if n <= VNET_HDR_LEN:
                    hub.counters.inc("link.tap.read.short")
                    continue
                got += 1
                gso_type = view[hdr_at + 1]
                if gso_type and (gso_type & ~VNET_GSO_ECN) not in _GSO_ACCEPTED:
                    if gso_type == VNET_GSO_UDP_L4 and port.udp_offload:
                        # Many datagrams of one UDP flow: the NAT sends them with one
                        # UDP_SEGMENT sendmsg; ``rx_gso_size`` tells it the segment size.
                        port.rx_gso_size = view[hdr_at + 4] | (view[hdr_at + 5] << 8)
                        try:
                            classify(view[start : hdr_at + n], port, now, True)
                        finally:
                            port.rx_gso_size = 0
                        continue
                    hub.counters.inc("link.tap.read.gso_unsupported")
                    continue
                trusted = bool(view[hdr_at] & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID))
                classify(view[start : hdr_at + n], port, now, trusted)
            self._sparse = False  # the budget ran out: a burst
        finally:
            for hook in hub.burst_end:  # hub.end_burst(), inline
                hook()

    def close(self) -> None:
        """Close the link and give its receive frame back to the pool."""
        super().close()
        frame, self._rx_frame = self._rx_frame, None
        if frame is not None:
            self.hub.pool_from_guest.release(frame)


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error").lower()
