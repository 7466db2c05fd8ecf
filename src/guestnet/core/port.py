"""Port: the core's view of one guest link.

A link (QEMU stream connection, datagram socket, TAP) owns one Port. The classifier records the
guest's MAC on it as frames arrive, and the switch uses it to send frames toward that guest.
Counters here are what the stats API reports per link.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from guestnet.pool import Frame

#: IPv6 addresses remembered per port (link-local, SLAAC, privacy addresses, a DHCPv6 lease);
#: beyond this the one seen longest ago is forgotten.
MAX_GUEST_IP6 = 16


class Port:
    """One guest link as the core sees it."""

    __slots__ = (
        "backlog",
        "guest_ip6",
        "guest_mac",
        "ip6_last",
        "ip6_seen",
        "macs",
        "name",
        "offload_max",
        "rx_bytes",
        "rx_frames",
        "rx_gso_size",
        "rx_vnet",
        "send",
        "tx_bytes",
        "tx_dropped",
        "tx_frames",
        "udp_offload",
    )

    def __init__(self, name: str, send: Callable[[Frame], None]) -> None:
        self.name = name
        #: Writes one frame toward the guest and takes ownership of it (releases it to its pool).
        self.send = send
        #: The guest's MAC, learned from the source of its frames; None until the first frame.
        self.guest_mac: bytes | None = None
        #: Every MAC the switch learned on this port (a guest that bridges has several), with
        #: the time a frame from it was last learned (see guestnet.core.switch).
        self.macs: dict[bytes, float] = {}
        #: A link with virtio-net headers (TAP) points this at the header of the frame being
        #: classified, so that the switch can carry its offloads over to another port.
        self.rx_vnet: memoryview | None = None
        #: The guest's IPv6 addresses (packed), learned from the source of its IPv6 packets, in
        #: the order they were last used (most recent last); at most MAX_GUEST_IP6.
        self.guest_ip6: dict[bytes, None] = {}
        #: The source of the last IPv6 packet learned (most packets repeat it).
        self.ip6_last = b""
        #: An IPv6 packet came from this port (the guest speaks IPv6: NDP greets it once).
        self.ip6_seen = False
        #: Offloads the link takes toward the guest: 0, none (full checksums, one MSS per
        #: frame); above 0, frames may carry a partial checksum (``Frame.csum_start``) and TCP
        #: super-frames (``Frame.gso_size``) of up to this many bytes of IP packet.
        self.offload_max = 0
        #: The link's last read burst ended on its budget, not on an empty queue: the guest
        #: sends faster than we take in (the TCP NAT answers SYNs with cookies then).
        self.backlog = False
        #: The link takes UDP offloads toward the guest (TAP with USO): partial UDP checksums
        #: and super-frames (``Frame.gso_size`` = the datagram payload size), which the
        #: guest's kernel cuts into datagrams of that size (the last may be shorter).
        self.udp_offload = False
        #: Set by the link only while it hands over a UDP super-frame from the guest (USO):
        #: the payload size of each datagram in it; 0 for every other frame.
        self.rx_gso_size = 0
        self.rx_frames = 0
        self.rx_bytes = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.tx_dropped = 0

    def learn_ip6(self, addr: bytes) -> None:
        """Record that the guest uses IPv6 ``addr`` (a unicast source it sent from).

        Called for every IPv6 packet: the address of the previous packet costs one comparison;
        another moves to the end, so the bound evicts the address unused longest.
        """
        if addr == self.ip6_last:
            return
        self.ip6_last = addr
        known = self.guest_ip6
        if addr in known:
            del known[addr]
        elif len(known) >= MAX_GUEST_IP6:
            del known[next(iter(known))]
        known[addr] = None

    def stats(self) -> dict[str, object]:
        """Counters for the stats API."""
        return {
            "name": self.name,
            "guest_mac": None if self.guest_mac is None else self.guest_mac.hex(":"),
            "macs": [mac.hex(":") for mac in self.macs],
            "guest_ip6": [str(ipaddress.IPv6Address(a)) for a in self.guest_ip6],
            "frames_in": self.rx_frames,
            "bytes_in": self.rx_bytes,
            "frames_out": self.tx_frames,
            "bytes_out": self.tx_bytes,
            "frames_out_dropped": self.tx_dropped,
        }
