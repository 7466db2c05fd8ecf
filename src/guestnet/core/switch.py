"""Switch: a learning bridge between the guest ports, and delivery toward guests by MAC.

guestnet serves several guest links at once (QEMU connections, TAPs in namespaces, datagram
peers), all on one L2 segment with guestnet's own addresses (gateway, DNS) on it. The switch
does what a learning bridge does:

- **learning**: the classifier calls :meth:`Switch.learn` with the source MAC of a guest frame
  that is not the port's known MAC. A port may hold several MACs (a guest that bridges
  containers or VMs behind it): the table maps each MAC to its port, with the time it was last
  seen. The port's ``guest_mac`` is the MAC learned last that was new to it (the guest's own, in
  the common case of one MAC a port); frames from it take the classifier's fast path and never
  call ``learn``, so that entry never ages while its port lives. Other MACs age out after
  :data:`MAC_AGE_S` without a frame, checked when a frame is looked up (no timer); a port holds at
  most :data:`MAX_MACS_PER_PORT` (the one seen longest ago is forgotten), so a guest sending
  from random MACs cannot grow the table beyond that bound per port.
- **switching** (:meth:`Switch.forward`): a guest frame whose destination MAC is another guest's
  is copied (from the frame pool toward guests) to that guest's port, never NATed; a unicast to
  an unknown MAC is flooded to every other port; a broadcast or multicast frame is flooded to
  every other port (:meth:`Switch.flood`) and also handed to guestnet's own services, which
  answer for guestnet's addresses only (ARP for another guest's address is left to that guest).
  A frame is never sent back out of the port it came in on.
- **isolation** (``isolate``, ``--isolate``): nothing goes from one guest port to another;
  such frames are dropped and counted (``switch.isolated``), guestnet's own services still
  answer every port. A MAC known on a live port is not learned on another one
  (``switch.mac.refused``): an untrusted guest cannot take another's replies or flows.

Frames guestnet itself emits toward a guest with no port at hand (UDP NAT replies, ICMP) go
through :meth:`Switch.send`: to the port of their destination MAC, or flooded with a copy per
extra port. Answers to a guest frame (ARP, DHCP, DNS, TCP) go straight back to its port.

Guests that come back: a guest is known by its MAC, not by the port it first used. When a MAC
shows up on a port after being on another one, or after its port went away (a QEMU that
reconnects to the socket, a namespace's TAP re-attached), ``on_return`` is told, and the TCP NAT
moves that guest's flows to the new port; flows of a guest that does not come back within the
TCP driver's grace period are reset (``on_depart``) (UDP and ICMP replies go by MAC through
:meth:`Switch.send` and follow by themselves; DHCP leases are keyed by MAC). MACs of departed
ports are remembered (bounded), so a guest sending from ever new MACs costs no flow scan.

Offloads: a TAP (or vhost-user) guest with offloads hands over TCP and UDP super-frames with a
partial checksum; its link points ``Port.rx_vnet`` at the virtio-net header of the frame being
classified. Switched to a port that takes the same offload (``offload_max``, and
``udp_offload`` for a UDP super-frame), the frame keeps its metadata
(``Frame.csum_start``/``gso_size``) and the receiving kernel takes it whole. To one that does
not, a partial checksum is completed here, and a super-frame is segmented in software as a Linux
bridge does for a device without the offload (:mod:`guestnet.core.gso`: TCP segments, UDP
datagrams, each in its own pooled frame; counted ``switch.gso.segmented`` and
``switch.gso.segments``); a super-frame that cannot be cut (bad ``gso_size``, headers that are
not what a kernel builds) or of a type never asked for (UFO) is dropped and counted
(``switch.gso.*``).

Routing between guests: a guest that sends to guestnet's MAC (its gateway) for another guest's
address, IPv4 (:meth:`Switch.route4`) or IPv6 (:meth:`Switch.route6`), has the frame delivered to
that guest as a router would: readdressed, TTL or hop limit decremented.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from guestnet.core.gso import GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4
from guestnet.core.port import Port
from guestnet.core.tso import segment_tcp
from guestnet.core.uso import segment_udp
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum

#: Seconds a MAC that is not its port's ``guest_mac`` stays known without a frame from it
#: (Linux bridges and IEEE 802.1D default to 300 s).
MAC_AGE_S = 300.0
#: MACs one port may hold; beyond this the one seen longest ago is forgotten.
MAX_MACS_PER_PORT = 64
#: MACs of departed ports remembered, for guests that come back.
MAX_DEPARTED = 1024
#: Guest IPv4 addresses remembered (ARP senders).
MAX_IP4 = 4096
#: virtio-net header: the checksum is partial (flags bit).
_VNET_NEEDS_CSUM = 1
_ETH_HLEN = 14
_ANY4 = bytes(4)
_ANY6 = bytes(16)


class Switch:
    """The MAC table, the switching of guest frames between ports, and the send path."""

    __slots__ = (
        "_by_mac",
        "_departed",
        "counters",
        "guest_net4",
        "ip4_macs",
        "isolate",
        "not_guest4",
        "on_depart",
        "on_return",
        "pool",
        "ports",
    )

    def __init__(self, pool: FramePool, counters: Counters, isolate: bool = False) -> None:
        self.pool = pool
        self.counters = counters
        #: Guests may not reach each other (``--isolate``).
        self.isolate = isolate
        self.ports: list[Port] = []
        self._by_mac: dict[bytes, Port] = {}
        #: Guest IPv4 address -> the MAC that last claimed it as an ARP sender (at most
        #: MAX_IP4, the one claimed longest ago forgotten): where a published port finds its
        #: guest.
        self.ip4_macs: dict[bytes, bytes] = {}
        #: The guest subnet (network, mask as integers) and the addresses in it that are no
        #: guest's (guestnet's, the broadcast): set by the classifier from the config; until
        #: then (0, 0) admits every address.
        self.guest_net4 = (0, 0)
        self.not_guest4: frozenset[bytes] = frozenset()
        #: MACs of ports that went away (at most MAX_DEPARTED, the oldest forgotten first): a
        #: guest that comes back with one of them (a QEMU reconnecting) gets its flows back.
        self._departed: dict[bytes, None] = {}
        #: Told (mac, port) when a guest MAC shows up on a port after it was on another one,
        #: or on one that went away: the TCP NAT moves that guest's flows to the new port.
        self.on_return: Callable[[bytes, Port], object] | None = None
        #: Told a port that went away with MACs on it: the TCP NAT resets the flows still on
        #: it if their guest has not come back after a while.
        self.on_depart: Callable[[Port], object] | None = None

    def attach(self, port: Port) -> None:
        """Add a port (a link came up)."""
        self.ports.append(port)

    def detach(self, port: Port) -> None:
        """Remove a port (a link went away) and forget every MAC learned on it."""
        if port in self.ports:
            self.ports.remove(port)
        by_mac = self._by_mac
        departed = self._departed
        for mac in port.macs:
            if by_mac.get(mac) is port:
                del by_mac[mac]
                departed.pop(mac, None)
                if len(departed) >= MAX_DEPARTED:
                    del departed[next(iter(departed))]
                departed[mac] = None
        had_macs = bool(port.macs)
        port.macs.clear()
        if port.guest_mac is not None and by_mac.get(port.guest_mac) is port:
            del by_mac[port.guest_mac]
        if had_macs and self.on_depart is not None:
            self.on_depart(port)

    def learn(self, port: Port, mac: bytes, now: float = 0.0) -> None:
        """Record that ``mac`` speaks on ``port`` at ``now``.

        A MAC new to the port becomes its ``guest_mac``; a MAC the port already holds is only
        refreshed; a MAC that moved from another port is forgotten there.
        """
        macs = port.macs
        if mac in macs:
            macs[mac] = now
            if self._by_mac.get(mac) is not port:
                self._by_mac[mac] = port
            return
        prev = self._by_mac.get(mac)
        moved = False
        if prev is not None and prev is not port and self.isolate and prev in self.ports:
            # Isolated guests are untrusted: one may not take another's MAC (its replies and
            # its TCP flows) while that guest's port lives.
            self.counters.inc("switch.mac.refused")
            return
        if prev is not None and prev is not port:
            # The MAC moved here: forget it on its old port, so that the classifier (which
            # calls learn only when a port's MAC differs) re-learns it if it moves back.
            prev.macs.pop(mac, None)
            if prev.guest_mac == mac:
                prev.guest_mac = None
            moved = True
        elif self._departed and mac in self._departed:
            del self._departed[mac]
            moved = True
        if len(macs) >= MAX_MACS_PER_PORT:
            oldest = min(macs, key=macs.__getitem__)
            del macs[oldest]
            if self._by_mac.get(oldest) is port:
                del self._by_mac[oldest]
            self.counters.inc("switch.mac.evicted")
        if port.guest_mac is not None and port.guest_mac != mac:
            self.counters.inc("eth.guest_mac.changed")
        macs[mac] = now
        port.guest_mac = mac
        self._by_mac[mac] = port
        if moved:
            self.counters.inc("switch.mac.returned")
            if self.on_return is not None:
                self.on_return(mac, port)

    def port_for(self, mac: bytes) -> Port | None:
        """The port a guest MAC was last seen on."""
        return self._by_mac.get(mac)

    def learn_ip4(self, addr: bytes, mac: bytes) -> None:
        """Record that the guest at ``mac`` uses IPv4 ``addr`` (the sender of its ARP packet).

        Only a guest address is learned: inside ``guest_net4`` and not in ``not_guest4``
        (guestnet's own, the subnet broadcast), so a guest claiming an outside or a gateway
        address in ARP cannot draw other guests' traffic for it.
        """
        known = self.ip4_macs
        if known.get(addr) == mac:
            return
        net, mask = self.guest_net4
        if (int.from_bytes(addr, "big") & mask) != net or addr in self.not_guest4:
            return
        known.pop(addr, None)
        if len(known) >= MAX_IP4:
            del known[next(iter(known))]
        known[addr] = mac

    def mac_for_ip4(self, addr: bytes) -> bytes | None:
        """The MAC of the guest that last claimed IPv4 ``addr`` in ARP, if any."""
        return self.ip4_macs.get(addr)

    def ip4_on(self, port: Port) -> list[str]:
        """The IPv4 addresses claimed from ``port``'s MACs, for the stats API."""
        macs = port.macs
        return [str(ipaddress.IPv4Address(a)) for a, m in self.ip4_macs.items() if m in macs]

    def port_for_ip(self, addr: bytes) -> Port | None:
        """The port of the guest using ``addr`` (packed IPv4 or IPv6), if one is known."""
        if len(addr) == 16:
            return self.port_for_ip6(addr)
        mac = self.ip4_macs.get(addr)
        return None if mac is None else self._by_mac.get(mac)

    def port_for_ip6(self, addr: bytes) -> Port | None:
        """The port whose guest last sent from IPv6 ``addr`` (see ``Port.learn_ip6``)."""
        for port in self.ports:
            if addr in port.guest_ip6:
                return port
        return None

    def mac_table(self) -> list[dict[str, object]]:
        """The MAC table for the API: each MAC with its port's name."""
        return [{"mac": mac.hex(":"), "port": port.name} for mac, port in self._by_mac.items()]

    # -- switching guest frames -----------------------------------------------------------------

    def forward(self, data: memoryview, src: Port, now: float) -> bool:
        """Switch a unicast guest frame not for guestnet: to the port of its destination MAC,
        or flooded when that MAC is unknown. False when no other port exists to take it."""
        dst = bytes(data[0:6])
        self._learn_sender(data, src)
        port = self._by_mac.get(dst)
        if port is not None and port.guest_mac != dst:
            seen = port.macs.get(dst)
            if seen is None or now - seen > MAC_AGE_S:
                # Aged out: forget it, and flood as for any unknown MAC.
                port.macs.pop(dst, None)
                del self._by_mac[dst]
                self.counters.inc("switch.mac.aged")
                port = None
        if port is None:
            return self.flood(data, src)
        if port is src:
            self.counters.inc("switch.same_port")
            return True
        if self.isolate:
            self.counters.inc("switch.isolated")
            return True
        self._deliver(data, src, port, None)
        self.counters.inc("switch.unicast")
        return True

    def _learn_sender(self, data: memoryview, src: Port) -> None:
        """Learn the sender's IP address from a frame switched between guests (an ARP reply,
        an IPv4 or IPv6 packet): a guest that only ever answers another one is still found by
        its address (ARP requests and IPv6 packets guestnet sees itself are learned where they
        are handled), for a published port or a guest routing to it through the gateway."""
        n = len(data)
        if n >= 34 and data[12] == 8:
            if data[13] == 0:
                addr = bytes(data[26:30])
            elif data[13] == 6 and n >= 42:
                addr = bytes(data[28:32])
            else:
                return
            if addr != _ANY4:
                mac = bytes(data[6:12])
                if self.ip4_macs.get(addr) != mac:
                    self.learn_ip4(addr, mac)
        elif n >= 54 and data[12] == 0x86 and data[13] == 0xDD:
            addr = bytes(data[22:38])
            if addr != src.ip6_last and addr != _ANY6:
                src.learn_ip6(addr)

    def flood(self, data: memoryview, src: Port) -> bool:
        """Copy a guest frame to every port but ``src`` (broadcast, multicast, unknown unicast).
        False when there is no other port."""
        ports = self.ports
        if len(ports) < 2:
            return False
        if self.isolate:
            self.counters.inc("switch.isolated")
            return True
        for port in ports:
            if port is not src:
                self._deliver(data, src, port, None)
        self.counters.inc("switch.flood")
        return True

    def route4(self, data: memoryview, src: Port, dst_mac: bytes, our_mac: bytes) -> bool:
        """Deliver an IPv4 frame a guest sent to guestnet's MAC for another guest's address
        (a guest routing through the gateway): readdressed from guestnet's MAC to the guest
        at ``dst_mac``, its TTL decremented, as a router would. False when that MAC has no
        port (the caller lets the NAT refuse it)."""
        return self._route(data, src, dst_mac, our_mac, _ETH_HLEN + 8)

    def route6(self, data: memoryview, src: Port, dst_mac: bytes, our_mac: bytes) -> bool:
        """:meth:`route4` for IPv6: an IPv6 frame a guest sent to guestnet's MAC for another
        guest's address, readdressed to ``dst_mac`` with its hop limit decremented."""
        return self._route(data, src, dst_mac, our_mac, _ETH_HLEN + 7)

    def _route(
        self, data: memoryview, src: Port, dst_mac: bytes, our_mac: bytes, ttl_at: int
    ) -> bool:
        """Deliver a frame routed between guests; ``ttl_at`` is where its TTL (hop limit) is."""
        port = self._by_mac.get(dst_mac)
        if port is None:
            return False
        if self.isolate:
            self.counters.inc("switch.isolated")
            return True
        if data[ttl_at] <= 1:
            self.counters.inc("switch.route.ttl_expired")
            return True
        self._deliver(data, src, port, (dst_mac, our_mac))
        self.counters.inc("switch.routed")
        return True

    def _deliver(
        self, data: memoryview, src: Port, port: Port, route: tuple[bytes, bytes] | None
    ) -> None:
        """Send ``data`` (a frame from ``src``) to ``port`` in pooled frames: one copy, with
        offloads carried over when ``port`` takes them, else a partial checksum completed and a
        super-frame segmented (:mod:`guestnet.core.gso`); what cannot be sent is dropped and
        counted. ``route``: (guest MAC, guestnet's MAC) to readdress each frame to, its TTL
        decremented (:meth:`route4`)."""
        meta = src.rx_vnet
        if meta is not None and meta[1]:
            self._super(data, meta, port, route)
            return
        n = len(data)
        frame = self.pool.acquire()
        start = frame.start
        view = frame.view
        view[start : start + n] = data
        frame.length = n
        if meta is not None and meta[0] & _VNET_NEEDS_CSUM:
            cs = meta[6] | (meta[7] << 8)
            co = meta[8] | (meta[9] << 8)
            if cs + co + 2 > n:
                self._drop(frame, "switch.csum.bad_offset")
                return
            if port.offload_max and n - _ETH_HLEN <= port.offload_max:
                frame.csum_start = cs
                frame.csum_offset = co
            else:
                # The field holds the pseudo-header sum: the checksum over it and the rest.
                at = start + cs + co
                value = checksum(view[start + cs : start + n])
                if value == 0 and co == 6:
                    value = 0xFFFF  # UDP sends a computed 0 as all ones (RFC 768)
                view[at] = value >> 8
                view[at + 1] = value & 0xFF
        if route is not None:
            _readdress(frame, route)
        port.send(frame)

    def _super(
        self, data: memoryview, meta: memoryview, port: Port, route: tuple[bytes, bytes] | None
    ) -> None:
        """Send super-frame ``data`` (virtio-net header ``meta`` with a ``gso_type``) to
        ``port``: whole with its metadata when ``port`` takes that offload, else segmented."""
        gso_type = meta[1] & ~GSO_ECN
        if gso_type in (GSO_TCPV4, GSO_TCPV6):
            udp = False
        elif gso_type == GSO_UDP_L4:
            udp = True
        else:
            self.counters.inc("switch.gso.unsupported")  # UFO: never asked for
            return
        n = len(data)
        gso = meta[4] | (meta[5] << 8)
        cs = meta[6] | (meta[7] << 8)
        co = meta[8] | (meta[9] << 8)
        if (
            meta[0] & _VNET_NEEDS_CSUM
            and port.offload_max
            and n - _ETH_HLEN <= port.offload_max
            and (port.udp_offload or not udp)
            and gso
            and cs + co + 2 <= n
        ):
            frame = self.pool.acquire()
            frame.view[frame.start : frame.start + n] = data
            frame.length = n
            frame.csum_start = cs
            frame.csum_offset = co
            frame.gso_size = gso
            if route is not None:
                _readdress(frame, route)
            port.send(frame)
            return
        version = 6 if gso_type == GSO_TCPV6 else 4
        if udp:
            version = 6 if n > 13 and data[12] == 0x86 and data[13] == 0xDD else 4
        emit = port.send if route is None else _routed(port, route)
        segment = segment_udp if udp else segment_tcp
        try:
            count = segment(data, version, gso, self.pool.mtu, self.pool, emit)
        except WireError as exc:
            self.counters.inc(f"switch.{exc.reason}")
            return
        counters = self.counters
        counters.inc("switch.gso.segmented")
        counters.inc("switch.gso.segments", count)

    def _drop(self, frame: Frame, reason: str) -> None:
        self.counters.inc(reason)
        self.pool.release(frame)

    # -- frames from guestnet -------------------------------------------------------------------

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


def _readdress(frame: Frame, route: tuple[bytes, bytes]) -> None:
    """Make ``frame`` one a router forwards: from guestnet's MAC to the guest's (``route``),
    its IPv4 TTL (header checksum fixed) or IPv6 hop limit decremented."""
    view = frame.view
    start = frame.start
    dst_mac, our_mac = route
    view[start : start + 6] = dst_mac
    view[start + 6 : start + 12] = our_mac
    ip = start + _ETH_HLEN
    if view[ip] >> 4 == 6:
        view[ip + 7] -= 1
        return
    ihl = (view[ip] & 0x0F) * 4
    view[ip + 8] -= 1
    view[ip + 10] = 0
    view[ip + 11] = 0
    value = checksum(view[ip : ip + ihl])
    view[ip + 10] = value >> 8
    view[ip + 11] = value & 0xFF


def _routed(port: Port, route: tuple[bytes, bytes]) -> Callable[[Frame], None]:
    """``port.send``, each frame readdressed first (segments of a routed super-frame)."""

    def send(frame: Frame) -> None:
        _readdress(frame, route)
        port.send(frame)

    return send
