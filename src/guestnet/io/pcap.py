"""pcap capture: every frame in both directions, in classic pcap (nanosecond) format.

Theory of operation
-------------------
:class:`PcapWriter` owns one file. The header says nanosecond timestamps (magic ``0xa1b23c4d``),
version 2.4, link type 1 (Ethernet) and a snap length of 262,144 bytes, so a 64 KiB TSO
super-frame is kept whole. Each record carries the wall-clock time (``time.time_ns``: pcap
readers show absolute time) and the frame's bytes.

Hooks: the classifier calls :meth:`PcapWriter.from_guest` first thing for every guest frame, and
the links call :meth:`PcapWriter.to_guest` for every frame they are handed (the assembly connects
both). Both copy the frame into the file's buffer; neither keeps the view.

Checksums an offload left partial (a TAP ``NEEDS_CSUM`` frame: the L4 checksum field holds only
the pseudo-header sum, the kernel or device is to finish it) are completed *in the copy*, so the
capture shows what the wire would carry and tshark flags only real errors. Two ways in:

- an explicit hint, ``csum_start``/``csum_offset`` as the virtio-net header gives them:
  the ones'-complement sum from ``csum_start`` to the end is stored at
  ``csum_start + csum_offset`` (:func:`complete_partial_checksum`);
- ``csum_trusted=True`` from the classifier (the link vouched for the checksums, which covers
  ``NEEDS_CSUM`` and ``DATA_VALID``): the IPv4 header, TCP and UDP checksums are recomputed in
  the copy (:func:`recompute_checksums`); for a frame whose checksums were right this changes
  nothing.

Bounds: writing stops once the file would exceed ``max_bytes`` (0 means no bound); a log line
says so and further frames are counted (``frames_not_written``), never written. It does not
rotate. Records are gathered in a buffer of our own and written whole (when it passes
:data:`BUFFER_BYTES`, every second from a loop timer, and at close): a frame costs a memcpy, the
disk write is batched, and the file always ends on a record boundary, so ``tshark -r`` can read
it while guestnet runs.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from guestnet.core.timers import Timer
from guestnet.io.loop import Loop
from guestnet.wire.checksum import checksum, pseudo_header_sum

log = logging.getLogger(__name__)

#: Nanosecond-resolution pcap magic (0xa1b2c3d4 is the microsecond one).
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_MAGIC_US = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
#: Largest record kept: above any frame a link can deliver (64 KiB IP packet + headers).
SNAPLEN = 262144
#: Default --pcap-max-bytes: 1 GiB.
DEFAULT_MAX_BYTES = 1 << 30
#: Seconds between flushes of the record buffer.
FLUSH_INTERVAL_S = 1.0
#: Records are written to the file once this many bytes are buffered.
BUFFER_BYTES = 256 * 1024

_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_BE16 = struct.Struct("!H")

ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
PROTO_TCP = 6
PROTO_UDP = 17


def complete_partial_checksum(buf: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum in ``buf`` as a NIC would for ``NEEDS_CSUM``.

    The field at ``csum_start + csum_offset`` holds the pseudo-header sum (not complemented);
    the checksum of everything from ``csum_start`` to the end, field included, goes there.
    Out-of-range hints are ignored (the copy is left as it came).
    """
    field = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or field + 2 > len(buf):
        return
    value = checksum(memoryview(buf)[csum_start:])
    if value == 0 and csum_offset == 6:  # UDP: a computed 0 is sent as 0xffff
        value = 0xFFFF
    _BE16.pack_into(buf, field, value)


def recompute_checksums(buf: bytearray) -> None:
    """Recompute the IPv4 header and TCP/UDP checksums of an Ethernet frame in ``buf``.

    Anything that is not a whole, unfragmented IPv4 TCP/UDP packet is left alone (a capture
    must show malformed frames as they were).
    """
    if len(buf) < ETH_HLEN + 20 or _BE16.unpack_from(buf, 12)[0] != ETHERTYPE_IPV4:
        return
    l3 = ETH_HLEN
    ihl = (buf[l3] & 0x0F) * 4
    if buf[l3] >> 4 != 4 or ihl < 20 or len(buf) < l3 + ihl:
        return
    total = _BE16.unpack_from(buf, l3 + 2)[0]
    if total < ihl or l3 + total > len(buf):
        return
    buf[l3 + 10 : l3 + 12] = b"\0\0"
    _BE16.pack_into(buf, l3 + 10, checksum(memoryview(buf)[l3 : l3 + ihl]))
    frag = _BE16.unpack_from(buf, l3 + 6)[0]
    if frag & 0x3FFF:  # a fragment: the L4 checksum covers the whole datagram, not this piece
        return
    proto = buf[l3 + 9]
    l4 = l3 + ihl
    l4_len = total - ihl
    if proto == PROTO_TCP and l4_len >= 20:
        field = l4 + 16
    elif proto == PROTO_UDP and l4_len >= 8:
        field = l4 + 6
        if _BE16.unpack_from(buf, field)[0] == 0:  # UDP checksum 0: "none", keep it
            return
    else:
        return
    src = bytes(buf[l3 + 12 : l3 + 16])
    dst = bytes(buf[l3 + 16 : l3 + 20])
    buf[field : field + 2] = b"\0\0"
    value = checksum(memoryview(buf)[l4 : l4 + l4_len], pseudo_header_sum(src, dst, proto, l4_len))
    if value == 0 and proto == PROTO_UDP:
        value = 0xFFFF
    _BE16.pack_into(buf, field, value)


class PcapWriter:
    """Writes frames to one pcap file until ``max_bytes`` (0: unbounded), then stops."""

    def __init__(
        self,
        path: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock_ns: Callable[[], int] = time.time_ns,
        file: BinaryIO | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._clock_ns = clock_ns
        self._file: BinaryIO = (
            file if file is not None else open(path, "wb", buffering=0)  # noqa: SIM115
        )
        self._buf = bytearray()
        header = _GLOBAL_HEADER.pack(PCAP_MAGIC_NS, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
        self._buf += header
        self.bytes_written = len(header)
        self.frames_written = 0
        self.frames_not_written = 0
        self.stopped = False
        self.closed = False
        #: The periodic flush (:func:`open_capture`), cancelled at close.
        self.timer: Timer | None = None
        self.flush()

    def write(
        self,
        frame: bytes | bytearray | memoryview,
        csum_start: int = -1,
        csum_offset: int = 0,
        csum_trusted: bool = False,
    ) -> bool:
        """Append one frame (completing partial checksums in the copy); False if not written."""
        if self.stopped or self.closed:
            self.frames_not_written += 1
            return False
        n = len(frame)
        caplen = min(n, SNAPLEN)
        if self.max_bytes and self.bytes_written + _RECORD.size + caplen > self.max_bytes:
            self.stopped = True
            self.frames_not_written += 1
            log.warning(
                "pcap %s reached --pcap-max-bytes (%d bytes, %d frames): capture stopped",
                self.path,
                self.bytes_written,
                self.frames_written,
            )
            self.flush()
            return False
        data: bytes | bytearray | memoryview = frame
        if csum_start >= 0 or csum_trusted:
            copy = bytearray(frame[:caplen])
            if csum_start >= 0:
                complete_partial_checksum(copy, csum_start, csum_offset)
            else:
                recompute_checksums(copy)
            data = copy
        elif caplen < n:
            data = frame[:caplen]
        ts = self._clock_ns()
        sec, nsec = divmod(ts, 1_000_000_000)
        buf = self._buf
        buf += _RECORD.pack(sec & 0xFFFFFFFF, nsec, caplen, n)
        buf += data
        self.bytes_written += _RECORD.size + caplen
        self.frames_written += 1
        if len(buf) >= BUFFER_BYTES:
            self.flush()
        return True

    def from_guest(self, frame: memoryview, csum_trusted: bool = False) -> None:
        """Classifier tap: a frame the guest sent (view valid only during the call)."""
        self.write(frame, csum_trusted=csum_trusted)

    def to_guest(self, frame: memoryview, csum_start: int = -1, csum_offset: int = 0) -> None:
        """Link tap: a frame guestnet sends to the guest; a partial checksum hint if offloaded."""
        self.write(frame, csum_start, csum_offset)

    def flush(self, _now: float = 0.0) -> None:
        """Write the buffered records to the file, whole (readers see them)."""
        if self.closed or not self._buf:
            return
        view = memoryview(self._buf)
        try:
            while view:
                n = self._file.write(view)
                view = view[n if n is not None else len(view) :]
            self._file.flush()
        except OSError as exc:
            # A full disk must not stop the datapath: stop capturing, say so once.
            log.warning("pcap %s: write failed (%s): capture stopped", self.path, exc)
            self.stopped = True
        finally:
            view.release()
        self._buf.clear()

    def close(self) -> None:
        """Flush and close the file."""
        if self.closed:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.flush()
        self.closed = True
        self._file.close()

    def stats(self) -> dict[str, object]:
        """For the stats API."""
        return {
            "path": self.path,
            "bytes_written": self.bytes_written,
            "frames_written": self.frames_written,
            "frames_not_written": self.frames_not_written,
            "stopped": self.stopped,
            "max_bytes": self.max_bytes,
        }


def open_capture(loop: Loop, path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> PcapWriter:
    """Open ``path`` for capture, flushed every :data:`FLUSH_INTERVAL_S` on ``loop``.

    The caller connects the writer's hooks (``from_guest``, ``to_guest``) and closes it.
    """
    writer = PcapWriter(path, max_bytes)

    def tick(now: float) -> None:
        writer.flush()
        if not writer.closed:
            writer.timer = loop.call_at(now + FLUSH_INTERVAL_S, tick)

    writer.timer = loop.call_later(FLUSH_INTERVAL_S, tick)
    return writer
