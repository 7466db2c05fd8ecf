"""FrameClassifier: the single entry point for every frame a guest sends.

It checks the Ethernet header, learns the guest's MAC for its link (the switch's MAC table),
hands unicast for another MAC to the switch (guest to guest: switched, never NATed; see
:mod:`guestnet.core.switch`), floods broadcast and multicast to the other ports, and routes what
is for guestnet (its MAC, broadcast, multicast):

- ARP to the :class:`~guestnet.core.arp.ArpResponder`;
- IPv4 fragments to reassembly (whole datagrams come back through :meth:`route_ipv4`);
- UDP to port 67 to DHCP; UDP and TCP to port 53 on the DNS or gateway address to DNS;
- ICMP to the ICMP service, other TCP and UDP to the NAT;
- IPv6 (when ``config.ipv6``; else ``ipv6.unsupported``): the extension headers walked, fragments
  to IPv6 reassembly, then Neighbor Discovery and echo to guestnet's addresses to NDP, other
  ICMPv6 to the ICMPv6 service, UDP to port 547 to DHCPv6, UDP and TCP to port 53 on the IPv6
  DNS or gateway address to DNS, other unicast UDP and TCP to the IPv6 NAT; other multicast is
  dropped. The source of every IPv6 packet is learned onto the guest's Port (``learn_ip6``), and
  the first IPv6 packet on a port has NDP advertise the router there at once (``port_up``); a
  packet to guestnet's MAC for an address another guest sends from is routed to that guest
  (``Switch.route6``), as IPv4 to another guest's ARP-claimed address is (``Switch.route4``);
- everything else is dropped and counted under a dotted reason (``eth.vlan.unsupported``...).

Services not present yet (``None``) get a counted drop. Any :class:`WireError` raised while
parsing becomes a drop counted by its reason; no bad frame ever raises out of
:meth:`handle_frame`.
"""

from __future__ import annotations

from collections.abc import Callable

from guestnet.config import Config
from guestnet.core.arp import ArpResponder
from guestnet.core.packet import (
    FragmentHandler,
    Icmp6Handler,
    IcmpHandler,
    IpPacket,
    NdpHandler,
    TcpHandler,
    UdpHandler,
)
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum
from guestnet.wire.dhcp import DHCP_SERVER_PORT
from guestnet.wire.ethernet import (
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ETHERTYPE_VLAN,
)
from guestnet.wire.icmp import parse_icmp
from guestnet.wire.icmpv6 import ICMPV6_ECHO_REQUEST, MLD_TYPES, NDP_TYPES, parse_icmpv6
from guestnet.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, parse_ipv4
from guestnet.wire.ipv6 import PROTO_ICMPV6, parse_ipv6
from guestnet.wire.l3 import IPV4, IPV6
from guestnet.wire.native import FAST_TCP4, FAST_UDP4, FAST_UDP6, fast_parse
from guestnet.wire.tcp import parse_tcp, verify_tcp
from guestnet.wire.udp import DNS_PORT, parse_udp, verify_udp

#: Builds an IpPacket from all its fields (see guestnet.core.packet.ipv4_packet).
_new = tuple.__new__
#: The largest frame any link may deliver: a 64 KiB IP packet (TSO) plus Ethernet and a VLAN tag.
MAX_FRAME = ETH_HLEN + 4 + 65535

#: DHCPv6 servers and relay agents listen on UDP 547 (RFC 8415 7.2).
DHCP6_SERVER_PORT = 547
#: All_DHCP_Relay_Agents_and_Servers: where DHCPv6 clients send (ff02::1:2).
ALL_DHCP6_SERVERS = bytes.fromhex("ff020000000000000000000000010002")
#: TCP segment handler for the fast path; see :attr:`FrameClassifier.tcp_fast`.
TcpFast = Callable[[memoryview, bytes, bytes, int, int, int, int, int, int, int, float], bool]
#: UDP datagram handler for the fast path (port, src, dst, sport, dport, payload, now); see
#: :attr:`FrameClassifier.udp_fast`.
UdpFast = Callable[[Port, bytes, bytes, int, int, memoryview, float], bool]


class FrameClassifier:
    """Routes guest frames to the services that own them."""

    def __init__(self, config: Config, pool: FramePool, counters: Counters, switch: Switch) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        self.switch = switch
        self.arp = ArpResponder(config, pool, counters)
        self.arp.learn_ip4 = switch.learn_ip4
        self.dhcp: UdpHandler | None = None
        self.dns_udp: UdpHandler | None = None
        self.dns_tcp: TcpHandler | None = None
        self.icmp: IcmpHandler | None = None
        self.udp_nat: UdpHandler | None = None
        self.tcp_nat: TcpHandler | None = None
        self.reassembly: FragmentHandler | None = None
        # IPv6 (see the module docstring); None: counted drops under the reason in brackets.
        #: NDP and echo to guestnet's IPv6 addresses (guestnet.core.ndp) [ndp.unavailable].
        self.ndp: NdpHandler | None = None
        #: Other ICMPv6 from the guest: echo elsewhere, errors [icmp6.unavailable].
        self.icmp6: Icmp6Handler | None = None
        #: DHCPv6: UDP to port 547 on ff02::1:2 or an owned address [dhcp6.unavailable].
        self.dhcp6: UdpHandler | None = None
        #: DNS over IPv6 (port 53 on the IPv6 DNS or gateway address) [dns6.unavailable,
        #: dns6.tcp.unavailable]: set only to services that answer an IPv6 packet.
        self.dns6_udp: UdpHandler | None = None
        self.dns6_tcp: TcpHandler | None = None
        #: The NAT for other unicast IPv6 [nat6.udp.unavailable, nat6.tcp.unavailable].
        self.udp_nat6: UdpHandler | None = None
        self.tcp_nat6: TcpHandler | None = None
        #: IPv6 reassembly; whole packets come back through route_ipv6
        #: [ipv6.fragment.unsupported].
        self.reassembly6: FragmentHandler | None = None
        #: Capture tap (pcap): sees every guest frame first, with the link's checksum verdict.
        self.capture: Callable[[memoryview, bool], None] | None = None
        #: The TCP NAT's entry for a segment of an established flow
        #: (:meth:`guestnet.core.tcp.TcpNat.handle_fast`): False means not handled and nothing
        #: changed, and the frame takes the ordinary path.
        self.tcp_fast: TcpFast | None = None
        #: The UDP NAT's entry for a plain unicast IPv4 or IPv6 datagram from the port's guest
        #: (:meth:`guestnet.core.udp.UdpNat.handle_fast`): False means not handled and nothing
        #: changed, and the frame takes the ordinary path. DHCP and DNS never go to it.
        self.udp_fast: UdpFast | None = None
        #: The DNS service's entry for such a datagram to port 53 of the DNS or gateway
        #: address (:meth:`guestnet.io.dns_upstream.DnsUpstreamIO.handle_fast`), tried only
        #: where ``udp_fast`` is set; False: the ordinary path takes it.
        self.dns_fast: UdpFast | None = None
        #: The same for IPv6 (port 53 of the IPv6 DNS or gateway address).
        self.dns_fast6: UdpFast | None = None
        self._mac = config.mac
        self._dns_dsts = frozenset((config.dns_ip_b, config.gateway_b))
        self._broadcast = config.broadcast_b
        #: The guest subnet as an integer network and mask, and guestnet's IPv4 addresses:
        #: another address in the subnet sent to guestnet's MAC is another guest's.
        switch.guest_net4 = (int(config.subnet.network_address), int(config.subnet.netmask))
        switch.not_guest4 = config.owned_b | {config.broadcast_b}
        #: Guest IPv4 address -> MAC (the switch's table, only guest addresses in it).
        self._guest_ip4 = switch.ip4_macs
        self._ipv6 = config.ipv6
        self._owned6 = config.owned6_b
        self._dns6_dsts = frozenset((config.dns_ip6_b, config.gateway6_b))
        self._dhcp6_dsts = frozenset((ALL_DHCP6_SERVERS, *config.owned6_b))

    def handle_frame(
        self, frame: memoryview, port: Port, now: float, csum_trusted: bool = False
    ) -> None:
        """Classify and dispatch one guest frame. Never raises on bad input."""
        port.rx_frames += 1
        port.rx_bytes += len(frame)
        if self.capture is not None:
            self.capture(frame, csum_trusted)
        try:
            tcp = self.tcp_fast
            udp = self.udp_fast
            if tcp is not None or udp is not None:
                # Fast paths: a unicast IPv4 or IPv6 TCP or UDP frame from the port's known
                # guest, to guestnet's MAC, bare IP header (TCP or UDP right after it), valid
                # checksums (the transport one verified here unless the link vouches for it),
                # not a fragment, not for multicast or broadcast: exactly the frames the
                # ordinary path would hand unchanged to the TCP NAT, the UDP NAT or the DNS
                # service, which take it (True) or leave it, unchanged, to the long way. The
                # test and the fields are one call (guestnet.wire.native: C, or its Python
                # twin) that reads the ethertype and protocol once and says which kind it is.
                got = fast_parse(
                    frame,
                    self._mac,
                    port.guest_mac,
                    self._broadcast,
                    self._dns_dsts,
                    self._dns6_dsts,
                    not csum_trusted,
                )
                if got is not None:
                    kind = got[0]
                    if kind == FAST_UDP4:
                        # To the DNS service (port 53 of the DNS or gateway address) or the
                        # NAT; DHCP the ordinary way.
                        if udp is not None:
                            _, src, dst, sport, dport, payload = got
                            if dport == DNS_PORT and dst in self._dns_dsts:
                                dns = self.dns_fast
                                if dns is not None and dns(port, src, dst, sport, dport, payload,
                                                           now):  # fmt: skip
                                    return
                            elif dport != DHCP_SERVER_PORT and udp(port, src, dst, sport, dport,
                                                                   payload, now):  # fmt: skip
                                return
                    elif kind == FAST_TCP4:
                        # TCP to port 53 of the DNS or gateway address is never a fast kind.
                        if tcp is not None:
                            _, seg, sip, dip, sport, dport, seq, ack, hlen, flags, win = got
                            if tcp(seg, sip, dip, sport, dport, seq, ack, hlen, flags, win, now):
                                return
                    elif kind == FAST_UDP6:
                        # Once the ordinary path has seen the port's first IPv6 packet (NDP's
                        # port_up), and only while no other guest could be the destination (the
                        # switch routes between guests; see _to_guest6).
                        if (
                            udp is not None
                            and self._ipv6
                            and port.ip6_seen
                            and len(self.switch.ports) == 1
                        ):
                            # The source learned as the ordinary path learns it; the NAT is
                            # family neutral (udp_nat6 is udp_nat); DHCPv6 the ordinary way.
                            _, src, dst, sport, dport, payload = got
                            if src != port.ip6_last and src != _UNSPECIFIED6:
                                port.learn_ip6(src)
                            if dport == DNS_PORT and dst in self._dns6_dsts:
                                dns = self.dns_fast6
                                if dns is not None and dns(port, src, dst, sport, dport, payload,
                                                           now):  # fmt: skip
                                    return
                            elif not (
                                dport == DHCP6_SERVER_PORT and dst in self._dhcp6_dsts
                            ) and udp(port, src, dst, sport, dport, payload, now):
                                return
                    elif tcp is not None and self._ipv6:  # FAST_TCP6
                        _, seg, sip, dip, sport, dport, seq, ack, hlen, flags, win = got
                        if sip != port.ip6_last:
                            port.learn_ip6(sip)
                        if tcp(seg, sip, dip, sport, dport, seq, ack, hlen, flags, win, now):
                            return
            self._dispatch(frame, port, now, csum_trusted)
        except WireError as exc:
            self.counters.inc(exc.reason)

    def _dispatch(self, frame: memoryview, port: Port, now: float, csum_trusted: bool) -> None:
        n = len(frame)
        if n < ETH_HLEN:
            raise WireError("eth.truncated")
        if n > MAX_FRAME:
            raise WireError("eth.giant")
        src = bytes(frame[6:12])
        if src[0] & 1:
            raise WireError("eth.src.multicast")
        if port.guest_mac != src:
            self.switch.learn(port, src, now)
        dst = frame[0:6]
        if dst != self._mac:
            if not (dst[0] & 1):
                # Unicast to another guest (or to nobody known): switched, never NATed.
                if not self.switch.forward(frame, port, now):
                    raise WireError("eth.dst.not_ours")
                return
            # Broadcast and multicast reach the other guests and guestnet's services alike.
            self.switch.flood(frame, port)
        ethertype = (frame[12] << 8) | frame[13]
        if ethertype == ETHERTYPE_IPV4:
            mac = self._guest_ip4.get(bytes(frame[30:34]))
            # For another guest's address, sent to guestnet's MAC: delivered to it.
            if (
                mac is not None
                and mac != src
                and dst == self._mac
                and self._to_guest(frame, port, mac)
            ):
                return
            self._ipv4(frame[ETH_HLEN:], port, src, now, csum_trusted)
        elif ethertype == ETHERTYPE_ARP:
            self.arp.handle_arp(frame[ETH_HLEN:], port)
        elif ethertype == ETHERTYPE_IPV6:
            if self._ipv6:
                if dst == self._mac and len(self.switch.ports) > 1 and self._to_guest6(frame, port):
                    return
                self._ipv6_frame(frame[ETH_HLEN:], port, src, now, csum_trusted)
            else:
                self.counters.inc("ipv6.unsupported")
        elif ethertype == ETHERTYPE_VLAN:
            self.counters.inc("eth.vlan.unsupported")
        else:
            self.counters.inc("eth.type.unsupported")

    def _to_guest(self, frame: memoryview, port: Port, mac: bytes) -> bool:
        """An IPv4 frame to guestnet's MAC for another guest's address (a guest that routes
        through the gateway): the switch delivers it to that guest, at ``mac``. Addresses no
        guest has claimed never come here, nor (False) one whose guest's port went away: the NAT
        and its policy refuse those."""
        ihl = (frame[ETH_HLEN] & 0x0F) * 4
        if len(frame) < 34 or frame[ETH_HLEN] >> 4 != 4 or ihl < 20 or len(frame) < 14 + ihl:
            raise WireError("ipv4.bad_header")
        if checksum(frame[ETH_HLEN : ETH_HLEN + ihl]) != 0:
            raise WireError("ipv4.bad_checksum")
        return self.switch.route4(frame, port, mac, self._mac)

    def _to_guest6(self, frame: memoryview, port: Port) -> bool:
        """An IPv6 frame to guestnet's MAC for an address another guest on another port sends
        from (a guest that routes through the gateway, without the prefix on-link): the switch
        delivers it to that guest. guestnet's own, multicast and link-local destinations are
        never routed; False lets the frame go on to guestnet's services and the NAT."""
        if len(frame) < ETH_HLEN + 40 or frame[ETH_HLEN] >> 4 != 6:
            return False
        sender = bytes(frame[22:38])
        if sender != port.ip6_last and sender != _UNSPECIFIED6:
            port.learn_ip6(sender)  # so that the other guest's answers through us find it
        to = bytes(frame[38:54])
        if to[0] == 0xFF or to[:2] == _LINK_LOCAL6 or to in self._owned6:
            return False
        other = self.switch.port_for_ip6(to)
        if other is None or other is port or other.guest_mac is None:
            return False
        return self.switch.route6(frame, port, other.guest_mac, self._mac)

    def _ipv4(
        self, data: memoryview, port: Port, src_mac: bytes, now: float, trusted: bool
    ) -> None:
        ip = parse_ipv4(data)
        l4 = data[ip.header_len : ip.total_len]
        # ipv4_packet() inlined: one call less per datagram.
        pkt = _new(
            IpPacket, (port, src_mac, ip, l4, trusted, IPV4, ip.src, ip.dst, ip.proto, ip.ttl)
        )
        if ip.is_fragment:
            if self.reassembly is None:
                self.counters.inc("ipv4.fragment.unsupported")
            else:
                self.reassembly.handle_fragment(pkt, now)
            return
        self.route_ipv4(pkt, now)

    def route_ipv4(self, pkt: IpPacket, now: float) -> None:
        """Dispatch a whole IPv4 datagram (also the entry for reassembled ones)."""
        try:
            proto = pkt.proto
            if proto == PROTO_UDP:
                self._udp(pkt, now)
            elif proto == PROTO_TCP:
                self._tcp(pkt, now)
            elif proto == PROTO_ICMP:
                self._icmp(pkt, now)
            else:
                self.counters.inc("ipv4.proto.unsupported")
        except WireError as exc:
            self.counters.inc(exc.reason)

    def _udp(self, pkt: IpPacket, now: float) -> None:
        l4 = pkt.l4
        udp = parse_udp(l4)
        dst = pkt.dst
        if not pkt.csum_trusted and not verify_udp(l4, pkt.src, dst, udp.length):
            raise WireError("udp.bad_checksum")
        payload = l4[8 : udp.length]
        dport = udp.dport
        if dport == DHCP_SERVER_PORT:
            handler = self.dhcp
            reason = "dhcp.unavailable"
        elif dport == DNS_PORT and dst in self._dns_dsts:
            handler = self.dns_udp
            reason = "dns.unavailable"
        else:
            if pkt.family.not_unicast(dst) or dst == self._broadcast:
                raise WireError("udp.dst.broadcast")
            handler = self.udp_nat
            reason = "nat.udp.unavailable"
        if handler is None:
            self.counters.inc(reason)
            return
        if pkt.port.rx_gso_size and handler is not self.udp_nat:
            _each_datagram(handler, pkt, udp.sport, dport, payload, now)
            return
        handler.handle_udp(pkt, udp.sport, dport, payload, now)

    def _tcp(self, pkt: IpPacket, now: float) -> None:
        l4 = pkt.l4
        tcp = parse_tcp(l4)
        dst = pkt.dst
        if not pkt.csum_trusted and not verify_tcp(l4, pkt.src, dst):
            raise WireError("tcp.bad_checksum")
        if tcp.dport == DNS_PORT and dst in self._dns_dsts:
            handler, reason = self.dns_tcp, "dns.tcp.unavailable"
        else:
            if pkt.family.not_unicast(dst) or dst == self._broadcast:
                raise WireError("tcp.dst.broadcast")
            handler, reason = self.tcp_nat, "nat.tcp.unavailable"
        if handler is None:
            self.counters.inc(reason)
            return
        handler.handle_tcp(pkt, now)

    def _icmp(self, pkt: IpPacket, now: float) -> None:
        parse_icmp(pkt.l4, verify=not pkt.csum_trusted)
        if self.icmp is None:
            self.counters.inc("icmp.unavailable")
            return
        self.icmp.handle_icmp(pkt, now)

    # -- IPv6 -------------------------------------------------------------------------------------

    def _ipv6_frame(
        self, data: memoryview, port: Port, src_mac: bytes, now: float, trusted: bool
    ) -> None:
        ip = parse_ipv6(data)
        if not port.ip6_seen:
            port.ip6_seen = True
            if self.ndp is not None:
                self.ndp.port_up(port)
        src = ip.src
        if src != port.ip6_last and src != _UNSPECIFIED6:
            port.learn_ip6(src)
        l4 = data[ip.header_len : ip.total_len]
        pkt = _new(
            IpPacket, (port, src_mac, ip, l4, trusted, IPV6, src, ip.dst, ip.proto, ip.hop_limit)
        )
        if ip.is_fragment:
            if self.reassembly6 is None:
                self.counters.inc("ipv6.fragment.unsupported")
            else:
                self.reassembly6.handle_fragment(pkt, now)
            return
        self.route_ipv6(pkt, now)

    def route_ipv6(self, pkt: IpPacket, now: float) -> None:
        """Dispatch a whole IPv6 packet (also the entry for reassembled ones)."""
        try:
            proto = pkt.proto
            if proto == PROTO_TCP:
                self._tcp6(pkt, now)
            elif proto == PROTO_UDP:
                self._udp6(pkt, now)
            elif proto == PROTO_ICMPV6:
                self._icmp6(pkt, now)
            else:
                self.counters.inc("ipv6.proto.unsupported")
        except WireError as exc:
            self.counters.inc(exc.reason)

    def _icmp6(self, pkt: IpPacket, now: float) -> None:
        l4 = pkt.l4
        dst = pkt.dst
        msg = parse_icmpv6(l4, pkt.src, dst, verify=not pkt.csum_trusted)
        type_ = msg.type
        handler: Icmp6Handler | None
        if type_ in NDP_TYPES or (type_ == ICMPV6_ECHO_REQUEST and dst in self._owned6):
            handler, reason = self.ndp, "ndp.unavailable"
        elif type_ in MLD_TYPES:
            self.counters.inc("icmp6.mld.ignored")
            return
        elif dst[0] == 0xFF:
            raise WireError("ipv6.dst.multicast")
        else:
            handler, reason = self.icmp6, "icmp6.unavailable"
        if handler is None:
            self.counters.inc(reason)
            return
        handler.handle_icmp6(pkt, now)

    def _udp6(self, pkt: IpPacket, now: float) -> None:
        l4 = pkt.l4
        udp = parse_udp(l4)
        dst = pkt.dst
        if not pkt.csum_trusted:
            # IPv6 makes the UDP checksum mandatory (RFC 8200 8.1): 0 is no exemption.
            if udp.checksum == 0:
                raise WireError("udp6.zero_checksum")
            if not verify_udp(l4, pkt.src, dst, udp.length):
                raise WireError("udp.bad_checksum")
        payload = l4[8 : udp.length]
        dport = udp.dport
        if dport == DHCP6_SERVER_PORT and dst in self._dhcp6_dsts:
            handler, reason = self.dhcp6, "dhcp6.unavailable"
        elif dport == DNS_PORT and dst in self._dns6_dsts:
            handler, reason = self.dns6_udp, "dns6.unavailable"
        elif IPV6.not_unicast(dst):
            raise WireError("ipv6.dst.multicast")
        else:
            handler, reason = self.udp_nat6, "nat6.udp.unavailable"
        if handler is None:
            self.counters.inc(reason)
            return
        if pkt.port.rx_gso_size and handler is not self.udp_nat6:
            _each_datagram(handler, pkt, udp.sport, dport, payload, now)
            return
        handler.handle_udp(pkt, udp.sport, dport, payload, now)

    def _tcp6(self, pkt: IpPacket, now: float) -> None:
        l4 = pkt.l4
        tcp = parse_tcp(l4)
        dst = pkt.dst
        if not pkt.csum_trusted and not verify_tcp(l4, pkt.src, dst):
            raise WireError("tcp.bad_checksum")
        if tcp.dport == DNS_PORT and dst in self._dns6_dsts:
            handler, reason = self.dns6_tcp, "dns6.tcp.unavailable"
        elif IPV6.not_unicast(dst):
            raise WireError("ipv6.dst.multicast")
        else:
            handler, reason = self.tcp_nat6, "nat6.tcp.unavailable"
        if handler is None:
            self.counters.inc(reason)
            return
        handler.handle_tcp(pkt, now)


_UNSPECIFIED6 = bytes(16)
#: The first two bytes of a link-local address (fe80::/10, as every stack uses it: fe80::/64).
_LINK_LOCAL6 = b"\xfe\x80"


def _each_datagram(
    handler: UdpHandler, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
) -> None:
    """A UDP super-frame (``Port.rx_gso_size``) to a service that takes one datagram at a time
    (DHCP, DNS): its datagrams one by one. Only the NAT sends a super-frame whole."""
    size = pkt.port.rx_gso_size
    for at in range(0, len(payload), size):
        handler.handle_udp(pkt, sport, dport, payload[at : at + size], now)
