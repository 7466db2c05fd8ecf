"""Switch: which guest MAC sits behind which port, and delivery by destination MAC.

guestnet may serve several guest links at once (QEMU connections, a TAP, datagram peers). The
classifier teaches the switch which guest MAC sits behind which port (:meth:`Switch.learn`), and
the port list is where published ports find a guest to open a connection to.

Not every frame guestnet emits goes through :meth:`Switch.send`. An answer to a guest frame
(ARP, DHCP, DNS, TCP segments of a flow) goes straight back to the port the frame came in on
(``Port.send``). Only frames with no port at hand go through the switch: UDP NAT replies and
ICMP (echo replies and errors), which the host delivers later to a flow that remembers the
guest's MAC. Those go to the port of their destination MAC; broadcast and unknown destinations
are flooded to every port, with a copy per extra port, as a learning bridge does. Frames between
guests are not switched (yet): the classifier drops unicast that is not for guestnet.
"""

from __future__ import annotations

from guestnet.core.port import Port
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool


class Switch:
    """Guest MAC -> port table and the send path toward guests."""

    __slots__ = ("_by_mac", "counters", "pool", "ports")

    def __init__(self, pool: FramePool, counters: Counters) -> None:
        self.pool = pool
        self.counters = counters
        self.ports: list[Port] = []
        self._by_mac: dict[bytes, Port] = {}

    def attach(self, port: Port) -> None:
        """Add a port (a link came up)."""
        self.ports.append(port)

    def detach(self, port: Port) -> None:
        """Remove a port (a link went away) and forget the MAC learned on it."""
        if port in self.ports:
            self.ports.remove(port)
        if port.guest_mac is not None and self._by_mac.get(port.guest_mac) is port:
            del self._by_mac[port.guest_mac]

    def learn(self, port: Port, mac: bytes) -> None:
        """Record that ``mac`` speaks on ``port``; a new MAC on a port replaces the old one."""
        old = port.guest_mac
        if old == mac and self._by_mac.get(mac) is port:
            return
        if old is not None and old != mac:
            self.counters.inc("eth.guest_mac.changed")
            if self._by_mac.get(old) is port:
                del self._by_mac[old]
        prev = self._by_mac.get(mac)
        if prev is not None and prev is not port and prev.guest_mac == mac:
            # The MAC moved here: forget it on its old port, so that the classifier (which
            # calls learn only when a port's MAC differs) re-learns it if it moves back.
            prev.guest_mac = None
        port.guest_mac = mac
        self._by_mac[mac] = port

    def port_for(self, mac: bytes) -> Port | None:
        """The port a guest MAC was last seen on."""
        return self._by_mac.get(mac)

    def port_for_ip6(self, addr: bytes) -> Port | None:
        """The port whose guest last sent from IPv6 ``addr`` (see ``Port.learn_ip6``)."""
        for port in self.ports:
            if addr in port.guest_ip6:
                return port
        return None

    def send(self, frame: Frame) -> None:
        """Deliver ``frame`` toward its destination MAC; takes ownership of the frame."""
        data = frame.view
        start = frame.start
        dst = bytes(data[start : start + 6])
        port = self._by_mac.get(dst)
        if port is not None:
            port.send(frame)
            return
        ports = self.ports
        if not ports:
            self.counters.inc("switch.no_port")
            self.pool.release(frame)
            return
        for extra in ports[1:]:
            copy = self.pool.acquire()
            copy.length = frame.length
            copy.view[copy.start : copy.start + frame.length] = frame.data
            extra.send(copy)
        ports[0].send(frame)
