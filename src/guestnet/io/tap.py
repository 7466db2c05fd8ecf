"""TAP links: a guest that is a Linux network namespace, through a TAP fd with virtio-net headers.

Theory of operation
-------------------
The TAP is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and a 12-byte virtio-net header
(``TUNSETVNETHDRSZ``). Every ``read`` returns one header and one Ethernet frame; every ``write``
must carry one header in front of one frame. Both directions avoid copies:

- guest to us: the read lands in a pooled frame at ``frame.start - VNET_HDR_LEN``, so the header
  fills the headroom and the Ethernet frame starts exactly at ``frame.start``. The header's flags
  say whether the kernel vouches for the checksum (``NEEDS_CSUM``: a partial checksum the sender
  left to offload; ``DATA_VALID``: already checked); either way the classifier is told
  ``csum_trusted`` and skips verifying it.
- us to guest: a zeroed header is written into the headroom in front of the frame and header plus
  frame leave in one ``os.write``. A TAP write is all or nothing; EAGAIN leaves the frame in the
  Link's bounded queue until EPOLLOUT.

Offloads (``TUNSETOFFLOAD``) are off, so the kernel hands us MTU-sized frames with full checksums
and never a GSO super-frame. Turning them on is :meth:`TapLink.set_offloads` (plus handling
``gso_type`` on read), kept in one place for the performance work.

Which network namespace a TAP belongs to is fixed when ``/dev/net/tun`` is *opened*: the opener's
namespace. :func:`open_tap` is therefore called by a child process that has joined the target
namespace (see :mod:`guestnet.io.netns`), which passes the fd back; guestnet itself never leaves
its own namespaces.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from typing import TYPE_CHECKING

from guestnet.io.links import RX_BUDGET, Link
from guestnet.pool import HEADROOM, Frame

if TYPE_CHECKING:
    from guestnet.instance import Instance

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

#: virtio-net header with ``num_buffers``: what we ask TUNSETVNETHDRSZ for.
VNET_HDR_LEN = 12
#: Header flags: the checksum is partial and left to us (offload) / already verified.
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
#: Longest interface name the kernel takes (IFNAMSIZ - 1).
IFNAME_MAX = 15

assert VNET_HDR_LEN <= HEADROOM, "the virtio-net header must fit in a frame's headroom"

_ZERO_HDR = bytes(VNET_HDR_LEN)


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

    def __init__(self, inst: Instance, fd: int, name: str, ifname: str | None = None) -> None:
        os.set_blocking(fd, False)
        self.ifname = ifname
        self.offloads = 0
        super().__init__(inst, fd, name)

    def set_offloads(self, flags: int) -> None:
        """Switch offloads on or off for this TAP (the kernel then sends GSO super-frames)."""
        set_offloads(self.fd, flags)
        self.offloads = flags

    def _write(self, frame: Frame, offset: int) -> int | None:
        start = frame.start - VNET_HDR_LEN
        view = frame.view
        view[start : frame.start] = _ZERO_HDR
        try:
            os.write(self.fd, view[start : frame.start + frame.length])
        except BlockingIOError:
            return 0
        except OSError as exc:
            # EIO while the interface is down, EINVAL for a frame it refuses: drop this one.
            self.inst.counters.inc(f"link.tap.write.{_errname(exc)}")
            return -1
        self.inst.pool_to_guest.release(frame)
        return None

    def _on_readable(self) -> None:
        inst = self.inst
        pool = inst.pool_from_guest
        classify = inst.classifier.handle_frame
        port = self.port
        fd = self.fd
        now = inst.loop.now()
        frame = pool.acquire()
        view = frame.view
        start = frame.start
        hdr_at = start - VNET_HDR_LEN
        bufs = [view[hdr_at:]]
        try:
            for _ in range(RX_BUDGET):
                try:
                    n = os.readv(fd, bufs)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    # EBADFD/EIO: the device is gone (its namespace was torn down).
                    inst.counters.inc(f"link.tap.read.{_errname(exc)}")
                    log.warning("%s: read: %s; closing the link", self.name, exc)
                    self.close()
                    return
                if n <= VNET_HDR_LEN:
                    inst.counters.inc("link.tap.read.short")
                    continue
                trusted = bool(view[hdr_at] & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID))
                classify(view[start : hdr_at + n], port, now, trusted)
        finally:
            pool.release(frame)


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error").lower()
