"""Segments out: every frame the TCP translation sends the guest is written here.

A segment's addressing comes from its flow (:class:`SegmentEnds`: the guest's port, MAC, address
and port, and the address and port the guest connected to), so a caller names the flow and the
TCP fields that change (sequence, acknowledgement, flags, window). A segment for no flow (an RST
answering a stray segment) is addressed back where that segment came from (:class:`_Reply`).
Data is read from the host straight into a pooled frame's payload area, :func:`hdrs_len` bytes
after its start (54 for IPv4, 74 for IPv6), and the headers are written in front of it here.

The IP version comes from the flow's address family (``flow.family``, a
:class:`~guestnet.wire.l3.L3Family`): the IP header written in front of TCP, the checksum's
pseudo-header, where the checksum starts for a link that completes it, and the MSS we announce
(MTU - 40 for IPv4, MTU - 60 for IPv6: IP and TCP headers without options). Nothing else in
the package knows the version.

Offloads. A link that takes them (a TAP with a virtio-net header) says so on its Port
(``offload_max``, the largest IP packet it accepts). Toward such a port every segment leaves
with a partial checksum (the pseudo-header sum, ``Frame.csum_start``/``csum_offset``) that the
guest's kernel never needs to finish for local delivery, and data goes out in super-frames of
as many whole MSS as fit in ``offload_max`` and a pool slot (``Frame.gso_size`` = MSS): about
44 segments' worth per frame at MTU 1500, so the per-frame cost is paid once per 64 KiB. Ports
without offloads get one MSS per frame with full checksums, whatever else is attached. From
the guest, offloads need nothing here: a super-frame is one large in-order segment whose payload
goes to the host socket in one ``send`` (the link has already told the classifier not to
verify its partial checksum).
"""

from __future__ import annotations

from typing import Protocol

from guestnet.core.flows import FlowKey
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.core.tcp.base import TcpNatBase
from guestnet.core.tcp.flow import CONNECTING, SEQ_MASK, TcpFlow
from guestnet.pool import HEADROOM, Frame
from guestnet.wire.ethernet import ETH_HLEN
from guestnet.wire.l3 import IPV4, L3Family
from guestnet.wire.native import build_tcp_frame
from guestnet.wire.tcp import ACK, RST, TCP_HLEN

#: Ethernet + IPv4 + TCP header bytes in front of an IPv4 data segment's payload.
HDRS_LEN = IPV4.l4_off + TCP_HLEN


def hdrs_len(family: L3Family) -> int:
    """Header bytes in front of a data segment's payload for ``family``."""
    return family.l4_off + TCP_HLEN


def mss_for_mtu(mtu: int, family: L3Family = IPV4) -> int:
    """The MSS we announce on a link of ``mtu``: what one frame carries after IP and TCP."""
    return family.tcp_mss(mtu)


class SegmentEnds(Protocol):
    """Where a segment to the guest goes, and from where: a :class:`TcpFlow` is one."""

    #: The guest link, the guest's MAC, address and port.
    port: Port
    guest_mac: bytes
    guest_ip: bytes
    guest_port: int
    #: The address and port the guest connected to: the segment's source.
    dst_ip: bytes
    dst_port: int
    #: The IP version of both addresses.
    family: L3Family


class _Reply:
    """The ends of an answer to a guest segment that has no flow: back where it came from."""

    __slots__ = ("dst_ip", "dst_port", "family", "guest_ip", "guest_mac", "guest_port", "port")

    def __init__(self, pkt: IpPacket, key: FlowKey) -> None:
        self.port = pkt.port
        self.guest_mac = pkt.src_mac
        self.family = pkt.family
        self.guest_ip, self.guest_port, self.dst_ip, self.dst_port = key


class _SegmentWriter(TcpNatBase):
    """Headers, checksums and super-frames toward the guest."""

    def _segment(self, flow: TcpFlow, frame: Frame, seq: int, flags: int, plen: int) -> None:
        """A data (or FIN) segment whose payload already sits at ``frame.start + HDRS_LEN``.

        More than one MSS of payload makes it a super-frame (only :meth:`_seg_max` allows that,
        for a port that takes them): ``gso_size`` tells the link where the guest's kernel would
        cut it.
        """
        flow.ack_pending = False
        if plen > flow.mss:
            frame.gso_size = flow.mss
        self._write(flow, frame, seq, flow.rcv_nxt, flags, flow.wnd_field, plen)

    def _send_ack(self, flow: TcpFlow, update: bool = True) -> None:
        """A bare ACK with a fresh window."""
        flow.ack_pending = False
        if update:
            self._update_window(flow)
        self._write(flow, self.pool.acquire(), flow.snd_nxt, flow.rcv_nxt, ACK, flow.wnd_field, 0)

    def _seg_max(self, flow: TcpFlow) -> int:
        """Most payload bytes one frame to ``flow``'s guest may carry: one MSS, or for a port
        that takes TCP super-frames as many whole MSS as its limit and a pool slot allow."""
        mss = flow.mss
        cap = flow.port.offload_max
        if cap <= 0:
            return mss
        slot = self.pool.slot_size - HEADROOM - ETH_HLEN
        room = (cap if cap < slot else slot) - flow.family.header_len - TCP_HLEN
        room -= room % mss
        return room if room > mss else mss

    def _our_mss(self, flow: TcpFlow) -> int:
        """The MSS we announce on ``flow``: the link MTU less its family's headers."""
        return self._mss_for(flow.family)

    def _mss_for(self, family: L3Family) -> int:
        """The MSS we announce in ``family``: the link MTU less its headers."""
        return self.our_mss if family is IPV4 else family.tcp_mss(self.config.mtu)

    def _send_rst_to_guest(self, flow: TcpFlow) -> None:
        # The guest has seen our ISN unless we are still connecting for its SYN (a flow a SYN
        # cookie opened is connecting too, but the guest took our cookie as the ISN).
        seq = 0 if flow.state == CONNECTING and not flow.cookie else flow.snd_nxt
        self._control(flow, seq, flow.rcv_nxt, RST | ACK)
        self.counters.inc("tcp.rst.sent")

    def _answer(self, pkt: IpPacket, key: FlowKey, seq: int, ack: int, flags: int) -> None:
        """A segment without payload, window or options back to the sender of ``pkt`` (whose
        flow key is ``key``), for which there is no flow: an RST."""
        self._control(_Reply(pkt, key), seq, ack, flags)

    def _control(
        self,
        ends: SegmentEnds,
        seq: int,
        ack: int,
        flags: int,
        window: int = 0,
        options: bytes = b"",
    ) -> None:
        """A segment without payload (SYN, RST, a window probe) in a frame of its own."""
        self._write(ends, self.pool.acquire(), seq, ack, flags, window, 0, options)

    def _write(
        self,
        ends: SegmentEnds,
        frame: Frame,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        plen: int,
        options: bytes = b"",
    ) -> None:
        """Write Ethernet, IP and TCP headers in front of the ``plen`` payload bytes at
        ``frame.start + hdrs_len(ends.family)`` and send the frame (options: a SYN's, without
        payload)."""
        port = ends.port
        family = ends.family
        ident = self._ident = (self._ident + 1) & 0xFFFF
        offload = port.offload_max
        if offload:
            # The link completes checksums: leave the pseudo-header sum for it (NEEDS_CSUM).
            frame.csum_start = family.l4_off
            frame.csum_offset = 16
        # One call (guestnet.wire.native: C, or its Python twin) writes Ethernet, IP and TCP,
        # the checksum and the padding of a short frame.
        frame.length = build_tcp_frame(
            frame.view, frame.start, family.version, ends.guest_mac, self._mac, ends.dst_ip,
            ends.guest_ip, ends.dst_port, ends.guest_port, seq, ack & SEQ_MASK, flags, window,
            ident, plen, options, bool(offload),
        )  # fmt: skip
        port.send(frame)
