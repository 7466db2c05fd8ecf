"""Ethernet II headers (IEEE 802.3 with an EtherType)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from guestnet.wire import WireError

ETH_HLEN = 14
ETH_ALEN = 6
#: Frames shorter than this (without FCS) are runts on a real wire; TAP and QEMU deliver them.
ETH_ZLEN = 60

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD

BROADCAST = b"\xff" * 6

_HDR = struct.Struct("!6s6sH")


class EthernetHeader(NamedTuple):
    dst: bytes
    src: bytes
    ethertype: int


def parse_ethernet(frame: memoryview | bytes) -> EthernetHeader:
    """Parse the Ethernet header at the start of ``frame``."""
    if len(frame) < ETH_HLEN:
        raise WireError("eth.truncated")
    dst, src, ethertype = _HDR.unpack_from(frame, 0)
    return EthernetHeader(dst, src, ethertype)


def build_ethernet(
    buf: memoryview | bytearray, off: int, dst: bytes, src: bytes, ethertype: int
) -> int:
    """Write an Ethernet header at ``off``; return the offset just after it."""
    _HDR.pack_into(buf, off, dst, src, ethertype)
    return off + ETH_HLEN


def is_multicast(mac: bytes) -> bool:
    """True for group addresses, broadcast included (the I/G bit)."""
    return bool(mac[0] & 1)
