"""NdpService: Neighbor Discovery (RFC 4861) for guestnet's IPv6 addresses, and echo to them.

Theory of operation
-------------------
guestnet is the only router on the guest link and owns a few IPv6 addresses there: the gateway
(fd00::2), the DNS address (fd00::3) and its link-local address (modified EUI-64 of its MAC, the
router's address), :attr:`Config.owned6_b`. This service plays the router's part of NDP:

*Neighbor Solicitations* for an owned address get a Neighbor Advertisement (flags R, S and O,
target link-layer option = guestnet's MAC), from that address, to the solicitor, on the port it
came from. A solicitation from ``::`` is a Duplicate Address Detection probe (RFC 4862): for the
guest's own tentative addresses it is never answered (the guest would think its address taken),
but for one of ours it gets an advertisement to all-nodes, without S (RFC 4861 7.2.4), so the
guest sees the conflict. Solicitations for anything else are counted and left alone: guestnet
does not proxy for other guests.

*Router Solicitations* are answered at once with a Router Advertisement on the soliciting port
(unicast to the solicitor, or to all-nodes when it has no address yet). *Unsolicited* RAs go to
all-nodes: one to a port as soon as its guest sends its first IPv6 packet (a host bringing up
IPv6 always sends some, DAD probes and MLD reports, before its router solicitation), then to
every such port at start and periodically: every MaxRtrAdvInterval (600 s) at most, a random
time between MinRtrAdvInterval (200 s) and that, with the first :data:`INITIAL_ADVERTS` at most
16 s apart (RFC 4861 6.2.4). Ports whose guests never spoke IPv6 (IPv4-only guests, or a
harness reading IPv4) get none. The service is sans-I/O: :meth:`next_deadline` says when it
next wants to run and :meth:`handle_timeout` is called then (the assembly arms a loop timer
with it).

Every advertisement is the same bytes (computed once from the configuration): hop limit 64,
flags M and O (so DHCPv6 clients ask for an address and DNS), router lifetime 1800 s; options
source link-layer address, MTU (the link's), prefix information for the guest prefix with L and A
(kernels do SLAAC from it), RDNSS (the IPv6 DNS address) and DNSSL (the search list, if any),
with lifetimes three times the longest interval, as RFC 8106 asks. It is sent from the link-local
address with hop limit 255.

*Validation.* Every NDP message is checked as RFC 4861 asks before anything is done with it: hop
limit 255 (a message that crossed a router is forged), code 0, at least its fixed length, options
of non-zero length inside the message, no source link-layer option with source ``::``. A bad one
is dropped and counted under a ``ndp.*`` reason. Advertisements and redirects a guest sends are
counted and ignored (guestnet keeps no neighbour cache: it answers to the MAC a frame came from);
an advertisement for one of guestnet's own addresses is counted as a conflict.

*Echo.* ICMPv6 echo requests to an owned address are answered here, from a pooled frame, like
ICMPv4 echo to the gateway; a reply larger than the link's MTU (to a request the guest sent in
fragments) goes out in fragments.
"""

from __future__ import annotations

import random

from guestnet.config import Config
from guestnet.core.fragments import send_ipv6_to_guest
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.ethernet import ETH_HLEN, ETHERTYPE_IPV6, build_ethernet
from guestnet.wire.icmpv6 import (
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    NA_OVERRIDE,
    NA_ROUTER,
    NA_SOLICITED,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_REDIRECT,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    NDP_FIXED_LEN,
    NDP_HOP_LIMIT,
    OPT_SOURCE_LL,
    OPT_TARGET_LL,
    PREFIX_AUTONOMOUS,
    PREFIX_ON_LINK,
    RA_MANAGED,
    RA_OTHER,
    NdpOption,
    encode_dns_name,
    link_layer_option,
    ndp_option_dnssl,
    ndp_option_link_layer,
    ndp_option_mtu,
    ndp_option_prefix,
    ndp_option_rdnss,
    parse_ndp_options,
    ra_header,
    set_icmpv6_checksum,
)
from guestnet.wire.ipv6 import PROTO_ICMPV6, is_unspecified, multicast_mac
from guestnet.wire.l3 import IPV6

#: MaxRtrAdvInterval and MinRtrAdvInterval (RFC 4861 6.2.1 defaults: 600 s and a third of it).
MAX_RTR_ADV_INTERVAL_S = 600.0
MIN_RTR_ADV_INTERVAL_S = 200.0
#: The first few unsolicited advertisements are at most this far apart (RFC 4861 10).
INITIAL_ADVERTS = 3
MAX_INITIAL_RTR_ADVERT_INTERVAL_S = 16.0
#: AdvDefaultLifetime: three times MaxRtrAdvInterval.
ROUTER_LIFETIME_S = 1800
#: Prefix lifetimes (radvd's defaults: a day valid, four hours preferred).
PREFIX_VALID_S = 86400
PREFIX_PREFERRED_S = 14400
#: RDNSS and DNSSL lifetime: at least three times MaxRtrAdvInterval (RFC 8106 5.1).
DNS_LIFETIME_S = 1800
#: AdvCurHopLimit: what hosts should put in their packets' hop limit.
CUR_HOP_LIMIT = 64

#: All-nodes multicast ff02::1 and its Ethernet address.
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = multicast_mac(ALL_NODES)
#: An NA is its 24-byte fixed part and a target link-layer option.
NA_LEN = 32
_NDP_L4_OFF = ETH_HLEN + IPV6.header_len


class NdpService:
    """Answers NDP and echo for guestnet's IPv6 addresses and sends router advertisements."""

    def __init__(
        self,
        config: Config,
        pool: FramePool,
        counters: Counters,
        switch: Switch,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        self.switch = switch
        self.rng = rng if rng is not None else random.Random()
        self._mac = config.mac
        self._owned = config.owned6_b
        self._link_local = config.link_local6.packed
        self._na_option = ndp_option_link_layer(OPT_TARGET_LL, config.mac)
        #: The Router Advertisement, checksum field 0 (see the module docstring).
        self.ra_message = build_ra_message(config)
        self._next_ra: float | None = None
        self._adverts_sent = 0
        #: Fragment identification for echo replies larger than the MTU (unpredictable start,
        #: RFC 7739).
        self._frag_ident = self.rng.getrandbits(32)

    # -- the timer --------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Send the first unsolicited advertisement and schedule the next ones."""
        self._unsolicited(now)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timeout` wants to run next (None before :meth:`start`)."""
        return self._next_ra

    def handle_timeout(self, now: float) -> None:
        """Send the periodic advertisement if it is due (early calls do nothing)."""
        if self._next_ra is not None and now >= self._next_ra:
            self._unsolicited(now)

    def _unsolicited(self, now: float) -> None:
        for port in self.switch.ports:
            if port.ip6_seen:
                self.counters.inc("ndp.ra.unsolicited")
                port.send(self._ra_frame(ALL_NODES_MAC, ALL_NODES))
        self._adverts_sent += 1
        interval = self.rng.uniform(MIN_RTR_ADV_INTERVAL_S, MAX_RTR_ADV_INTERVAL_S)
        if self._adverts_sent < INITIAL_ADVERTS:
            interval = min(interval, MAX_INITIAL_RTR_ADVERT_INTERVAL_S)
        self._next_ra = now + interval

    def port_up(self, port: Port) -> None:
        """``port``'s guest started speaking IPv6: tell it about the router without waiting."""
        self.counters.inc("ndp.ra.unsolicited")
        port.send(self._ra_frame(ALL_NODES_MAC, ALL_NODES))

    # -- from the guest ---------------------------------------------------------------------

    def handle_icmp6(self, pkt: IpPacket, now: float) -> None:
        """One ICMPv6 message for this service (NDP, or echo to an owned address)."""
        msg = pkt.l4
        type_ = msg[0]
        if type_ == ICMPV6_ECHO_REQUEST:
            self._echo(pkt)
            return
        fixed = NDP_FIXED_LEN.get(type_)
        if fixed is None:
            self.counters.inc("ndp.type.unexpected")
            return
        if pkt.hop_limit != NDP_HOP_LIMIT:
            raise WireError("ndp.bad_hop_limit")
        if msg[1] != 0:
            raise WireError("ndp.bad_code")
        if len(msg) < fixed:
            raise WireError("ndp.truncated")
        options = parse_ndp_options(msg[fixed:])
        unspecified = is_unspecified(pkt.src)
        if unspecified and link_layer_option(options, OPT_SOURCE_LL) is not None:
            raise WireError("ndp.unspecified_with_source_ll")
        if type_ == ND_NEIGHBOR_SOLICIT:
            self._neighbor_solicit(pkt, options, unspecified)
        elif type_ == ND_ROUTER_SOLICIT:
            self._router_solicit(pkt, options, unspecified)
        elif type_ == ND_NEIGHBOR_ADVERT:
            target = bytes(msg[8:24])
            conflict = target in self._owned
            self.counters.inc("ndp.na.conflict" if conflict else "ndp.na.ignored")
        elif type_ == ND_ROUTER_ADVERT:
            self.counters.inc("ndp.ra.ignored")
        else:
            assert type_ == ND_REDIRECT
            self.counters.inc("ndp.redirect.ignored")

    def _neighbor_solicit(self, pkt: IpPacket, options: list[NdpOption], dad: bool) -> None:
        target = bytes(pkt.l4[8:24])
        if target[0] == 0xFF:
            raise WireError("ndp.ns.bad_target")
        if dad and pkt.dst[:13] != b"\xff\x02" + bytes(9) + b"\x01\xff":
            raise WireError("ndp.ns.bad_dad_destination")
        if target not in self._owned:
            self.counters.inc("ndp.ns.dad_ignored" if dad else "ndp.ns.not_ours")
            return
        if dad:
            # Someone probes one of our addresses: defend it (RFC 4861 7.2.4).
            dst_mac, dst, flags = ALL_NODES_MAC, ALL_NODES, NA_ROUTER | NA_OVERRIDE
            self.counters.inc("ndp.ns.dad_conflict")
        else:
            dst_mac = link_layer_option(options, OPT_SOURCE_LL) or pkt.src_mac
            dst, flags = pkt.src, NA_ROUTER | NA_SOLICITED | NA_OVERRIDE
        frame = self.pool.acquire()
        buf = frame.view
        l4 = self._headers(frame, dst_mac, target, dst, NA_LEN, NDP_HOP_LIMIT)
        buf[l4 : l4 + 4] = bytes((ND_NEIGHBOR_ADVERT, 0, 0, 0))
        buf[l4 + 4 : l4 + 8] = bytes((flags, 0, 0, 0))
        buf[l4 + 8 : l4 + 24] = target
        buf[l4 + 24 : l4 + NA_LEN] = self._na_option
        set_icmpv6_checksum(buf, l4, l4 + NA_LEN, target, dst)
        frame.length = _NDP_L4_OFF + NA_LEN
        self.counters.inc("ndp.na.sent")
        pkt.port.send(frame)

    def _router_solicit(self, pkt: IpPacket, options: list[NdpOption], unspecified: bool) -> None:
        if unspecified:
            dst_mac, dst = ALL_NODES_MAC, ALL_NODES
        else:
            dst_mac = link_layer_option(options, OPT_SOURCE_LL) or pkt.src_mac
            dst = pkt.src
        self.counters.inc("ndp.ra.solicited")
        pkt.port.send(self._ra_frame(dst_mac, dst))

    def _echo(self, pkt: IpPacket) -> None:
        src = pkt.src
        if is_unspecified(src):
            raise WireError("icmp6.echo.bad_source")
        msg = pkt.l4
        n = len(msg)
        frame = self.pool.acquire()
        buf = frame.view
        l4 = self._headers(frame, pkt.src_mac, pkt.dst, src, n, 64)
        buf[l4 : l4 + n] = msg
        buf[l4] = ICMPV6_ECHO_REPLY
        buf[l4 + 1] = 0
        set_icmpv6_checksum(buf, l4, l4 + n, pkt.dst, src)
        frame.length = _NDP_L4_OFF + n
        self.counters.inc("icmp6.echo.answered")
        self._frag_ident = (self._frag_ident + 1) & 0xFFFFFFFF
        send_ipv6_to_guest(frame, self.config.mtu, self.pool, pkt.port.send, self._frag_ident)

    # -- frames -------------------------------------------------------------------------------

    def _headers(
        self, frame: Frame, dst_mac: bytes, src: bytes, dst: bytes, l4_len: int, hop_limit: int
    ) -> int:
        """Ethernet and IPv6 headers for an ICMPv6 message of ``l4_len``; the message offset."""
        off = build_ethernet(frame.view, frame.start, dst_mac, self._mac, ETHERTYPE_IPV6)
        return IPV6.build(frame.view, off, src, dst, PROTO_ICMPV6, l4_len, ttl=hop_limit)

    def _ra_frame(self, dst_mac: bytes, dst: bytes) -> Frame:
        """A pooled frame holding the Router Advertisement to ``dst``."""
        msg = self.ra_message
        n = len(msg)
        frame = self.pool.acquire()
        l4 = self._headers(frame, dst_mac, self._link_local, dst, n, NDP_HOP_LIMIT)
        frame.view[l4 : l4 + n] = msg
        set_icmpv6_checksum(frame.view, l4, l4 + n, self._link_local, dst)
        frame.length = _NDP_L4_OFF + n
        return frame


def build_ra_message(config: Config) -> bytes:
    """The Router Advertisement guestnet sends (checksum 0), from the configuration.

    A search domain DNS cannot carry is left out of the DNSSL option rather than failing.
    """
    prefix = config.ipv6_prefix
    options = [
        ndp_option_link_layer(OPT_SOURCE_LL, config.mac),
        ndp_option_mtu(config.mtu),
        ndp_option_prefix(
            prefix.network_address.packed,
            prefix.prefixlen,
            # SLAAC on Ethernet forms 64-bit interface identifiers: only a /64 is autonomous.
            PREFIX_ON_LINK | (PREFIX_AUTONOMOUS if prefix.prefixlen == 64 else 0),
            PREFIX_VALID_S,
            PREFIX_PREFERRED_S,
        ),
        ndp_option_rdnss(DNS_LIFETIME_S, [config.dns_ip6_b]),
    ]
    domains = [d for d in config.dns_search if _encodable(d)]
    if domains:
        options.append(ndp_option_dnssl(DNS_LIFETIME_S, domains))
    head = ra_header(CUR_HOP_LIMIT, RA_MANAGED | RA_OTHER, ROUTER_LIFETIME_S)
    return head + b"".join(options)


def _encodable(domain: str) -> bool:
    try:
        encode_dns_name(domain)
    except (ValueError, UnicodeError):
        return False
    return True


__all__ = ["ALL_NODES", "ALL_NODES_MAC", "NdpService", "build_ra_message"]
