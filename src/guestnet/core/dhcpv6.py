"""Dhcpv6Server: hands the guests their IPv6 addresses and DNS settings (RFC 8415), sans-I/O.

Theory of operation
-------------------
guestnet's Router Advertisements set the M and O flags, so a guest's DHCPv6 client asks for an
address (IA_NA) and for DNS servers and search domains. guestnet is the only server on the link
and answers every client as an authoritative server would.

*Identity.* The server's DUID is a DUID-LL built from ``config.mac`` (stable across restarts,
no clock in it). Messages that carry another server's DUID were meant for someone else: they
are ignored and counted (``dhcp6.other_server``). Messages that break RFC 8415 §16's rules
(a Solicit with a Server ID, a Request without one, no Client ID) are dropped and counted as
``dhcp6.<message>.invalid``.

*Leases* are keyed by (client DUID, IAID): one per IA_NA, so a client with two interfaces or two
IAs gets two addresses. The first client gets ``config.guest_ip6``; others get the next free
address after the last handed out, in ``config.ipv6_prefix``, skipping the prefix's
subnet-router anycast address, the gateway, the DNS address, and declined addresses. A client
that comes back gets its previous address while it is free, and an address a client asks for
(in its IA) is granted when it is free and on-link, so guests keep their addresses when guestnet
restarts. Lifetimes come from ``config.lease_time`` (preferred = valid), T1 is half of it and T2
four fifths (RFC 8415 §21.4's recommendation).

*Messages.* Solicit gets an Advertise holding the address for :data:`OFFER_HOLD_S`, with
Preference 255 so the client requests at once instead of waiting for other servers; with Rapid
Commit (when the client asks) it gets a Reply and the lease is bound. Request, Renew and Rebind
bind or extend and get a Reply; an address the client listed in an IA that it may not have
comes back with lifetimes 0 so the client drops it. Release ends the lease (kept, expired, so the
client gets the same address back later); Decline ends it and keeps the address out of the pool
for :data:`DECLINE_HOLD_S`; for an IA with no binding both say NoBinding in that IA. Confirm is an
on-link check: Success when every address in it is in ``config.ipv6_prefix``, NotOnLink
otherwise, and no reply when it lists no address (RFC 8415 §18.3.3); a confirmed address nobody
else holds is recorded as the client's, since the client goes on using it. Information-Request
gets the DNS servers and the domain list, no address. IA_PD is answered with NoPrefixAvail;
IA_TA is not supported and counted.

*Replies* are built in a pooled frame of the guest packet's address family, from guestnet's
link-local address (``config.link_local6``) port 547 to the client's source address port 546,
at the client's MAC. The DNS servers (23) and domain list (24) options go in every reply that
configures the client, whether asked for or not (RFC 8415 §21.7 allows it; some clients ask
only implicitly). A reply larger than the link MTU leaves out the domain list first.

The lease table is bounded (:data:`MAX_LEASES`: expired leases are purged, then unbound offers
evicted, before a client is refused), as are the declined addresses (:data:`MAX_DECLINED`) and
the IAs served per message (:data:`MAX_IAS`); finding a free address looks at no more candidates
than there are taken addresses, plus one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv6Address

from guestnet.config import Config, format_mac
from guestnet.core.packet import IpPacket
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.dhcpv6 import (
    ADVERTISE,
    ALL_DHCP_SERVERS,
    CONFIRM,
    DECLINE,
    DHCPV6_CLIENT_PORT,
    DHCPV6_HLEN,
    DHCPV6_SERVER_PORT,
    IA_NA_LEN,
    INFORMATION_REQUEST,
    OPT_CLIENTID,
    OPT_DNS_SERVERS,
    OPT_DOMAIN_LIST,
    OPT_IA_NA,
    OPT_IA_PD,
    OPT_IA_TA,
    OPT_PREFERENCE,
    OPT_RAPID_COMMIT,
    OPT_SERVERID,
    REBIND,
    RECONFIGURE,
    RELAY_FORW,
    RELAY_REPL,
    RELEASE,
    RENEW,
    REPLY,
    REQUEST,
    SOLICIT,
    STATUS_NO_ADDRS_AVAIL,
    STATUS_NO_BINDING,
    STATUS_NO_PREFIX_AVAIL,
    STATUS_NOT_ON_LINK,
    STATUS_SUCCESS,
    Dhcpv6Message,
    IaNa,
    build_dhcpv6,
    duid_ll,
    duid_mac,
    encode_domain_list,
    encode_ia_address,
    encode_ia_na,
    encode_option,
    encode_status,
    parse_dhcpv6,
    parse_ia_na,
)
from guestnet.wire.l3 import build_udp_frame
from guestnet.wire.udp import UDP_HLEN

#: How long an Advertise reserves its address for the client it was made to.
OFFER_HOLD_S = 60.0
#: How long an address a client declined (found in use) is kept out of the pool.
DECLINE_HOLD_S = 600.0
#: Most leases (advertised, bound or expired but remembered) kept at once.
MAX_LEASES = 4096
#: Most declined addresses remembered at once.
MAX_DECLINED = 256
#: Most IA_NA options served in one message; a client has one per interface it configures.
MAX_IAS = 8

#: The Preference option's maximum: "use this server now" (RFC 8415 §18.2.1).
MAX_PREFERENCE = b"\xff"

#: Most addresses a client listed in one IA that a reply returns at lifetime 0.
MAX_ADDRS_PER_IA = 4

#: A lease's key: the client's DUID and the IA's IAID.
LeaseKey = tuple[bytes, int]

#: What each client message must carry (RFC 8415 §16): a Server ID "must" be there and be ours,
#: "must_not" be there, or "may" be there (and then be ours).
_SERVER_ID_RULE = {
    SOLICIT: "must_not",
    REQUEST: "must",
    CONFIRM: "must_not",
    RENEW: "must",
    REBIND: "must_not",
    RELEASE: "must",
    DECLINE: "must",
    INFORMATION_REQUEST: "may",
}
_NAMES = {
    SOLICIT: "solicit",
    ADVERTISE: "advertise",
    REQUEST: "request",
    CONFIRM: "confirm",
    RENEW: "renew",
    REBIND: "rebind",
    REPLY: "reply",
    RELEASE: "release",
    DECLINE: "decline",
    INFORMATION_REQUEST: "information_request",
}


@dataclass(slots=True)
class Lease6:
    """One IA's address, advertised or bound."""

    duid: bytes
    iaid: int
    #: The client's MAC: from its DUID when that holds one, else the frame's source.
    mac: bytes
    addr: IPv6Address
    #: When the lease (or the hold of an Advertise) runs out, on the ``now`` clock.
    expires: float
    #: True once granted in a Reply; an advertised address not yet requested is False.
    bound: bool = False
    #: When the lease was last granted, to find the most recent one.
    acked_at: float = -1.0

    @property
    def key(self) -> LeaseKey:
        """The table key."""
        return (self.duid, self.iaid)


def check_config(config: Config) -> None:
    """Raise ValueError, naming the option, for settings the DHCPv6 server cannot serve."""
    try:
        encode_domain_list(config.dns_search)
    except ValueError as exc:
        raise ValueError(f"--dns-search: {exc}") from exc
    if not 1 <= config.lease_time <= 0xFFFFFFFE:
        raise ValueError("--lease-time must be between 1 and 4294967294 seconds")


class Dhcpv6Server:
    """The DHCPv6 server for the guest link (the classifier's ``dhcp6`` slot)."""

    def __init__(self, config: Config, pool: FramePool, counters: Counters) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        check_config(config)
        prefix = config.ipv6_prefix
        self._reserved = frozenset((prefix.network_address, config.gateway6, config.dns_ip6))
        self._by_key: dict[LeaseKey, Lease6] = {}
        self._by_addr: dict[IPv6Address, Lease6] = {}
        self._declined: dict[IPv6Address, float] = {}
        self._last_bound: Lease6 | None = None
        #: Offset in the prefix where the search for a free address goes on.
        self._cursor = int(config.guest_ip6) - int(prefix.network_address) + 1
        self.duid = duid_ll(config.mac)
        self._src = config.link_local6.packed
        self._dst_ok = frozenset((ALL_DHCP_SERVERS, *config.owned6_b))
        lease = config.lease_time
        self._lifetimes = (lease // 2, lease * 4 // 5, lease, lease)
        self._server_id_opt = encode_option(OPT_SERVERID, self.duid)
        self._dns_opt = encode_option(OPT_DNS_SERVERS, config.dns_ip6.packed)
        domains = encode_domain_list(config.dns_search)
        self._domain_opt = encode_option(OPT_DOMAIN_LIST, domains) if domains else b""

    # ----------------------------------------------------------------------------------- input

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """Handle one datagram to port 547; WireError (counted by the caller) on bad bytes."""
        counters = self.counters
        if pkt.family.version != 6:
            counters.inc("dhcp6.not_ipv6")
            return
        if pkt.dst not in self._dst_ok:
            counters.inc("dhcp6.dst.not_ours")
            return
        if pkt.src == bytes(16) or pkt.src[0] == 0xFF:
            counters.inc("dhcp6.src.unusable")
            return
        if len(payload) < DHCPV6_HLEN:
            counters.inc("dhcp6.truncated")
            return
        kind = payload[0]
        rule = _SERVER_ID_RULE.get(kind)
        if rule is None:
            if kind in (ADVERTISE, REPLY, RECONFIGURE):
                counters.inc("dhcp6.message_type.server_only")
            elif kind in (RELAY_FORW, RELAY_REPL):
                counters.inc("dhcp6.relay.unsupported")
            else:
                counters.inc("dhcp6.message_type.unknown")
            return
        msg = parse_dhcpv6(payload)
        name = _NAMES[kind]
        counters.inc(f"dhcp6.{name}")
        if not self._acceptable(msg, rule, name):
            return
        if kind == SOLICIT:
            self._solicit(pkt, msg, now)
        elif kind in (REQUEST, RENEW, REBIND):
            self._grant(pkt, msg, now)
        elif kind == RELEASE:
            self._release(pkt, msg, now)
        elif kind == DECLINE:
            self._decline(pkt, msg, now)
        elif kind == CONFIRM:
            self._confirm(pkt, msg, now)
        else:
            self._information(pkt, msg)

    def _acceptable(self, msg: Dhcpv6Message, rule: str, name: str) -> bool:
        """RFC 8415 §16: the Server ID and Client ID rules of the message type."""
        server_id = msg.get(OPT_SERVERID)
        if server_id is not None and rule != "must_not" and server_id != self.duid:
            self.counters.inc("dhcp6.other_server")
            return False
        if (rule == "must") != (server_id is not None) and rule != "may":
            self.counters.inc(f"dhcp6.{name}.invalid")
            return False
        if rule == "may":
            # Information-Request: no IAs (RFC 8415 §16.12); the Client ID is optional.
            if any(code in (OPT_IA_NA, OPT_IA_TA, OPT_IA_PD) for code, _ in msg.options):
                self.counters.inc(f"dhcp6.{name}.invalid")
                return False
        elif msg.get(OPT_CLIENTID) is None:
            self.counters.inc(f"dhcp6.{name}.invalid")
            return False
        return True

    def _ias(self, msg: Dhcpv6Message) -> list[IaNa]:
        """The message's IA_NAs, parsed (WireError on a malformed one), at most :data:`MAX_IAS`."""
        values = msg.all(OPT_IA_NA)
        if len(values) > MAX_IAS:
            self.counters.inc("dhcp6.ia_na.too_many")
            values = values[:MAX_IAS]
        ias = [parse_ia_na(value) for value in values]
        for ia in ias:
            ia.addresses()  # Every nested option checked before any state changes.
        return ias

    def _unsupported_ias(self, msg: Dhcpv6Message) -> bytes:
        """IA_PDs answered NoPrefixAvail (a guest may ask for a prefix too); IA_TAs counted."""
        out = b""
        for code, value in msg.options[: MAX_IAS * 4]:
            if code == OPT_IA_PD and len(value) >= IA_NA_LEN:
                body = value[:4] + bytes(8) + encode_status(STATUS_NO_PREFIX_AVAIL)
                out += encode_option(OPT_IA_PD, body)
                self.counters.inc("dhcp6.ia_pd.unsupported")
            elif code == OPT_IA_TA:
                self.counters.inc("dhcp6.ia_ta.unsupported")
        return out

    def _solicit(self, pkt: IpPacket, msg: Dhcpv6Message, now: float) -> None:
        rapid = msg.get(OPT_RAPID_COMMIT) is not None
        duid = msg.get(OPT_CLIENTID) or b""
        ias = self._ias(msg)
        body = b""
        granted = 0
        for ia in ias:
            addr = self._assign(pkt, duid, ia, now, bound=rapid)
            if addr is None:
                body += encode_ia_na(ia.iaid, 0, 0, encode_status(STATUS_NO_ADDRS_AVAIL))
            else:
                granted += 1
                body += self._ia_reply(ia, addr)
        body += self._unsupported_ias(msg)
        if not granted:
            # RFC 8415 §18.3.9: the Advertise says only that there is nothing to give.
            self.counters.inc("dhcp6.no_addrs_avail")
            body = encode_status(STATUS_NO_ADDRS_AVAIL, "no addresses") + body
        if rapid:
            self.counters.inc("dhcp6.rapid_commit")
            body = encode_option(OPT_RAPID_COMMIT, b"") + body
            self._send(pkt, msg, REPLY, body, configure=True)
        else:
            body = encode_option(OPT_PREFERENCE, MAX_PREFERENCE) + body
            self._send(pkt, msg, ADVERTISE, body, configure=True)

    def _grant(self, pkt: IpPacket, msg: Dhcpv6Message, now: float) -> None:
        """Request, Renew, Rebind: bind (or extend) each IA and say so in a Reply."""
        duid = msg.get(OPT_CLIENTID) or b""
        body = b""
        for ia in self._ias(msg):
            addr = self._assign(pkt, duid, ia, now, bound=True)
            if addr is None:
                self.counters.inc("dhcp6.no_addrs_avail")
                body += encode_ia_na(ia.iaid, 0, 0, encode_status(STATUS_NO_ADDRS_AVAIL))
            else:
                body += self._ia_reply(ia, addr)
        body += self._unsupported_ias(msg)
        self._send(pkt, msg, REPLY, body, configure=True)

    def _release(self, pkt: IpPacket, msg: Dhcpv6Message, now: float) -> None:
        duid = msg.get(OPT_CLIENTID) or b""
        body = encode_status(STATUS_SUCCESS, "released")
        for ia in self._ias(msg):
            lease = self._binding(duid, ia)
            if lease is None:
                self.counters.inc("dhcp6.release.no_binding")
                body += encode_ia_na(ia.iaid, 0, 0, encode_status(STATUS_NO_BINDING))
                continue
            self.counters.inc("dhcp6.release.done")
            # Kept, expired: the client gets the same address back if it is still free then.
            lease.expires = min(lease.expires, now)
            lease.bound = False
            if self._last_bound is lease:
                self._last_bound = None
        self._send(pkt, msg, REPLY, body, configure=False)

    def _decline(self, pkt: IpPacket, msg: Dhcpv6Message, now: float) -> None:
        duid = msg.get(OPT_CLIENTID) or b""
        body = encode_status(STATUS_SUCCESS, "declined")
        for ia in self._ias(msg):
            lease = self._binding(duid, ia)
            if lease is None:
                self.counters.inc("dhcp6.decline.no_binding")
                body += encode_ia_na(ia.iaid, 0, 0, encode_status(STATUS_NO_BINDING))
                continue
            self.counters.inc("dhcp6.decline.done")
            self._forget(lease)
            if len(self._declined) >= MAX_DECLINED:
                del self._declined[min(self._declined, key=self._declined.__getitem__)]
            self._declined[lease.addr] = now + DECLINE_HOLD_S
        self._send(pkt, msg, REPLY, body, configure=False)

    def _confirm(self, pkt: IpPacket, msg: Dhcpv6Message, now: float) -> None:
        ias = self._ias(msg)
        addrs = [a.address for ia in ias for a in ia.addresses()]
        if not addrs:
            self.counters.inc("dhcp6.confirm.no_addresses")
            return
        prefix = self.config.ipv6_prefix
        if all(IPv6Address(a) in prefix for a in addrs):
            body = encode_status(STATUS_SUCCESS, "on link")
            self._record_confirmed(pkt, msg, ias, now)
        else:
            self.counters.inc("dhcp6.confirm.not_on_link")
            body = encode_status(STATUS_NOT_ON_LINK, "not on link")
        self._send(pkt, msg, REPLY, body, configure=False)

    def _record_confirmed(
        self, pkt: IpPacket, msg: Dhcpv6Message, ias: list[IaNa], now: float
    ) -> None:
        """Take a confirmed address into the table when nobody else holds it.

        The client goes on using the address it confirmed, whether or not this server remembers
        it (after a restart, or a Release before the client restarted): recording it keeps the
        address from being handed to another client. An address another client holds is left
        alone; the guests' DAD finds the clash and one of them declines.
        """
        duid = msg.get(OPT_CLIENTID) or b""
        mac = duid_mac(duid) or pkt.src_mac
        for ia in ias:
            key = (duid, ia.iaid)
            for found in ia.addresses()[:1]:
                addr = IPv6Address(found.address)
                if self._is_free(key, addr, now) and self._hold(
                    key, mac, addr, now, float(self.config.lease_time), bound=True
                ):
                    self.counters.inc("dhcp6.confirm.recorded")

    def _information(self, pkt: IpPacket, msg: Dhcpv6Message) -> None:
        self._send(pkt, msg, REPLY, b"", configure=True)

    # ------------------------------------------------------------------------------ the table

    def _binding(self, duid: bytes, ia: IaNa) -> Lease6 | None:
        """The client's bound, unexpired-or-not lease for ``ia`` if the IA names its address."""
        lease = self._by_key.get((duid, ia.iaid))
        if lease is None or not lease.bound:
            return None
        if lease.addr.packed not in [a.address for a in ia.addresses()]:
            return None
        return lease

    def _assign(
        self, pkt: IpPacket, duid: bytes, ia: IaNa, now: float, bound: bool
    ) -> IPv6Address | None:
        """Choose and hold (or bind) an address for the IA; None when there is none to give."""
        key = (duid, ia.iaid)
        hint = None
        for a in ia.addresses():
            hint = IPv6Address(a.address)
            break
        addr = self._choose(key, hint, now)
        if addr is None:
            return None
        mac = duid_mac(duid) or pkt.src_mac
        hold = float(self.config.lease_time) if bound else OFFER_HOLD_S
        lease = self._by_key.get(key)
        current = lease is not None and lease.bound and lease.expires > now and lease.addr == addr
        if current and not bound:
            return addr  # A bound client soliciting again keeps its lease as it is.
        if not self._hold(key, mac, addr, now, hold, bound):
            return None
        if bound:
            lease = self._by_key[key]
            lease.acked_at = now
            self._last_bound = lease
        return addr

    def _choose(self, key: LeaseKey, hint: IPv6Address | None, now: float) -> IPv6Address | None:
        """The address for ``key``: current or previous, asked for, first guest's, else next."""
        lease = self._by_key.get(key)
        if lease is not None and self._is_free(key, lease.addr, now):
            return lease.addr
        if hint is not None and self._is_free(key, hint, now):
            return hint
        guest = self.config.guest_ip6
        if self._is_free(key, guest, now):
            return guest
        # As the DHCPv4 server does: go on from where the last search stopped, and look at one
        # more candidate than the tables hold, so a free address is found if there is one.
        prefix = self.config.ipv6_prefix
        first = int(prefix.network_address)
        size = prefix.num_addresses
        taken = len(self._reserved) + len(self._by_addr) + len(self._declined)
        start = self._cursor
        for i in range(min(size, taken + 1)):
            offset = (start + i) % size
            addr = IPv6Address(first + offset)
            if self._is_free(key, addr, now):
                self._cursor = offset + 1
                return addr
        return None

    def _is_free(self, key: LeaseKey, addr: IPv6Address, now: float) -> bool:
        """True if ``key`` may take ``addr`` without taking it from anyone."""
        if addr in self._reserved or addr not in self.config.ipv6_prefix:
            return False
        until = self._declined.get(addr)
        if until is not None:
            if until > now:
                return False
            del self._declined[addr]
        holder = self._by_addr.get(addr)
        return holder is None or holder.key == key or holder.expires <= now

    def _hold(
        self, key: LeaseKey, mac: bytes, addr: IPv6Address, now: float, hold_s: float, bound: bool
    ) -> bool:
        """Record that ``key`` holds ``addr`` for ``hold_s`` from ``now``; False if table full."""
        lease = self._by_key.get(key)
        holder = self._by_addr.get(addr)
        if holder is not None and holder is not lease:
            self._forget(holder)
        if lease is None:
            if len(self._by_key) >= MAX_LEASES and not self._make_room(now):
                self.counters.inc("dhcp6.lease_table.full")
                return False
            lease = Lease6(key[0], key[1], mac, addr, now + hold_s, bound)
            self._by_key[key] = lease
        else:
            if lease.addr != addr:
                if self._by_addr.get(lease.addr) is lease:
                    del self._by_addr[lease.addr]
                lease.addr = addr
            lease.expires = now + hold_s
            lease.bound = bound
            lease.mac = mac
        self._by_addr[addr] = lease
        return True

    def _make_room(self, now: float) -> bool:
        """Forget expired leases, else the oldest unbound offer; True if room was made."""
        dead = [lease for lease in self._by_key.values() if lease.expires <= now]
        if not dead:
            offers = [lease for lease in self._by_key.values() if not lease.bound]
            if offers:
                dead = [min(offers, key=lambda lease: lease.expires)]
                self.counters.inc("dhcp6.lease_table.evicted")
        for lease in dead:
            self._forget(lease)
        return bool(dead)

    def _forget(self, lease: Lease6) -> None:
        if self._by_key.get(lease.key) is lease:
            del self._by_key[lease.key]
        if self._by_addr.get(lease.addr) is lease:
            del self._by_addr[lease.addr]
        if self._last_bound is lease:
            self._last_bound = None

    # ---------------------------------------------------------------------------------- output

    def _ia_reply(self, ia: IaNa, addr: IPv6Address) -> bytes:
        """The IA_NA granting ``addr``, with any other address the client listed at lifetime 0."""
        t1, t2, preferred, valid = self._lifetimes
        inner = encode_ia_address(addr.packed, preferred, valid)
        for other in ia.addresses()[:MAX_ADDRS_PER_IA]:
            if other.address != addr.packed:
                inner += encode_ia_address(other.address, 0, 0)
        return encode_ia_na(ia.iaid, t1, t2, inner)

    def _send(
        self, pkt: IpPacket, msg: Dhcpv6Message, kind: int, body: bytes, configure: bool
    ) -> None:
        """Build the reply (IDs, ``body``, DNS options) in a pooled frame and send it."""
        client_id = msg.get(OPT_CLIENTID)
        head = self._server_id_opt
        if client_id is not None:
            head += encode_option(OPT_CLIENTID, client_id)
        options = head + body
        family = pkt.family
        limit = self.config.mtu - family.header_len - UDP_HLEN - DHCPV6_HLEN
        if configure:
            options += self._dns_opt
            if len(options) + len(self._domain_opt) <= limit:
                options += self._domain_opt
            elif self._domain_opt:
                self.counters.inc("dhcp6.reply.option_dropped")
        if len(options) > limit:
            self.counters.inc("dhcp6.reply.too_large")
            return
        frame = self.pool.acquire()
        buf = frame.view
        l7 = frame.start + family.udp_payload_off
        end = build_dhcpv6(buf, l7, kind, msg.xid, options)
        frame.length = build_udp_frame(
            family, buf, frame.start, pkt.src_mac, self.config.mac, self._src, pkt.src,
            DHCPV6_SERVER_PORT, DHCPV6_CLIENT_PORT, end - l7,
        )  # fmt: skip
        self.counters.inc(f"dhcp6.{_NAMES[kind]}.sent")
        pkt.port.send(frame)

    # ------------------------------------------------------------------------- for the API

    def leases(self, now: float) -> list[dict[str, object]]:
        """The bound, unexpired leases, for the control API (keys as the DHCPv4 server's)."""
        out: list[dict[str, object]] = []
        for lease in self._by_key.values():
            if not lease.bound or lease.expires <= now:
                continue
            out.append(
                {
                    "mac": format_mac(lease.mac),
                    "ip": str(lease.addr),
                    "hostname": None,
                    "expires_in_s": round(lease.expires - now, 3),
                    "static": False,
                    "duid": lease.duid.hex(":"),
                    "iaid": lease.iaid,
                }
            )
        out.sort(key=lambda d: ipaddress.IPv6Address(str(d["ip"])))
        return out

    def has_bound(self) -> bool:
        """Whether any client has been given an address yet."""
        return self._last_bound is not None

    def guest_address(self) -> IPv6Address:
        """The address most recently bound, or ``config.guest_ip6`` before any."""
        if self._last_bound is not None:
            return self._last_bound.addr
        return self.config.guest_ip6
