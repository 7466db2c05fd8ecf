"""DhcpServer: hands the guests their addresses (DHCPv4, RFC 2131), sans-I/O.

Theory of operation
-------------------
guestnet is the only server on the guest link, so it acts as an authoritative one: it answers
every client on the link, and says no (DHCPNAK) to a request for an address the client cannot
have rather than staying silent, so a guest with a stale lease starts over at once.

Leases are keyed by the client's hardware address (``chaddr``); option 61 is not used. The first
client gets ``config.guest_ip`` when it is free; other clients get the next free address after
the last one handed out, wrapping around the subnet, skipping the network and broadcast
addresses, the gateway, the DNS address, addresses declined by a client, and static leases
(``config.dhcp_static``) of other clients. A client with a static lease always gets that
address. A client that comes back gets its previous address if it is still free; an expired
lease of another client may be taken over.

An OFFER holds its address for :data:`OFFER_HOLD_S` so two clients discovering at once get
different addresses. A REQUEST is told apart by its fields (RFC 2131 §4.3.2):

- SELECTING: server id (54) present. Another server's id means the client chose someone else:
  ignored and counted (``dhcp.request.other_server``). Ours: the requested address (50) must be
  the one offered.
- INIT-REBOOT: no server id, a requested address, ``ciaddr`` 0.
- RENEWING / REBINDING: no server id, no requested address, ``ciaddr`` set.

In every state the address is granted (DHCPACK) when it is the client's current lease or, for a
client with no current lease or static address, when it is free; otherwise the answer is DHCPNAK.

A client whose MAC changes in the middle of a transaction (a TAP whose MAC was set after the
guest's DHCP client had started; busybox udhcpc reads the MAC again before every message) sends
its SELECTING REQUEST with a new ``chaddr`` for the address offered to the old one. That REQUEST
repeats the offer's ``xid`` (RFC 2131 §4.4.1), names this server, asks for the offered address
and comes in on the link the offer went out on: only the client that received that OFFER can
send it. So the unbound offer moves to the new ``chaddr`` and is ACKed (counted
``dhcp.request.mac_changed``) instead of NAKed, which would have sent the client on to the next
address while the old MAC's offer held its first one. Bound leases never move this way. The
offers in flight are remembered by ``xid`` in a small bounded table
(:data:`MAX_PENDING_OFFERS`); an ``xid`` in which two MACs were made offers is ambiguous and
followed no more. A DISCOVER is not matched by ``xid`` (independent clients may repeat one): it
gets an offer of its own as before.
So after guestnet restarts, guests keep their addresses. DECLINE marks the address unusable for
:data:`DECLINE_HOLD_S`; RELEASE ends the lease (the address stays the client's preference);
INFORM gets the configuration without a lease.

Replies are addressed as RFC 2131 §4.1 says: DHCPNAK is broadcast; with ``ciaddr`` set the reply
is unicast to it; with the broadcast flag it goes to 255.255.255.255 and ff:ff:ff:ff:ff:ff;
otherwise it is unicast to ``yiaddr`` at ``chaddr`` (the client cannot answer ARP yet, which is
why the MAC comes from ``chaddr``). Relayed requests (``giaddr`` set) cannot happen on a guest
link and are dropped. Replies never exceed the client's maximum message size (option 57, at
least 576) nor the link MTU: the optional options (search list, domain) are left out first.

The lease table is bounded (:data:`MAX_LEASES`), and finding a free address looks at no more
candidates than there are taken addresses, plus one; when none is free, none is looked for again
until a hold ends or an address is given back (a DISCOVER storm from new MACs against a full
pool then costs a dictionary lookup per message).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from guestnet.config import Config, IPv4Address, format_mac
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.dhcp import (
    BOOTP_MIN_LEN,
    BOOTREPLY,
    BOOTREQUEST,
    DHCP_CLIENT_PORT,
    DHCP_MIN_MAX_MESSAGE,
    DHCP_SERVER_PORT,
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    FLAG_BROADCAST,
    HTYPE_ETHERNET,
    OPT_DNS,
    OPT_DOMAIN_NAME,
    OPT_DOMAIN_SEARCH,
    OPT_HOST_NAME,
    OPT_INTERFACE_MTU,
    OPT_LEASE_TIME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE_TYPE,
    OPT_REBINDING_TIME,
    OPT_RENEWAL_TIME,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    DhcpMessage,
    build_dhcp,
    encode_options,
    encode_search_list,
    message_length,
    parse_dhcp,
)
from guestnet.wire.ethernet import BROADCAST
from guestnet.wire.l3 import IPV4, build_udp_frame
from guestnet.wire.udp import UDP_HLEN

#: How long an OFFER reserves its address for the client it was made to.
OFFER_HOLD_S = 60.0
#: How long an address a client declined (found in use) is kept out of the pool.
DECLINE_HOLD_S = 600.0
#: Most leases (offered, bound or expired but remembered) kept at once.
MAX_LEASES = 4096
#: Most declined addresses remembered at once.
MAX_DECLINED = 256
#: Most offers in flight remembered by xid (to follow a client whose MAC changes; oldest go).
MAX_PENDING_OFFERS = 256
#: IP and UDP headers: option 57 and the MTU bound the IP datagram, not just the DHCP message.
_IP_UDP_HLEN = IPV4.header_len + UDP_HLEN
_ALL_ONES = b"\xff\xff\xff\xff"
_ZERO_IP = bytes(4)
_MAX_HOSTNAME = 255


@dataclass(slots=True)
class Lease:
    """One client's address, offered or bound."""

    mac: bytes
    ip: IPv4Address
    #: When the lease (or the hold of an offer) runs out, on the ``now`` clock.
    expires: float
    #: True once ACKed; an offer not yet requested is False.
    bound: bool = False
    hostname: str | None = None
    #: When the lease was last ACKed, to find the most recent one.
    acked_at: float = -1.0


def check_config(config: Config) -> None:
    """Raise ValueError, naming the option, for DHCP settings the server cannot serve.

    The CLI calls this so a bad ``--dhcp-static`` or ``--dns-search`` is a usage error; the server
    checks again when it starts.
    """
    subnet = config.subnet
    reserved = {subnet.network_address, subnet.broadcast_address, config.gateway, config.dns_ip}
    owners: dict[IPv4Address, bytes] = {}
    for mac, ip in config.dhcp_static:
        if ip not in subnet or ip in reserved:
            raise ValueError(
                f"--dhcp-static {format_mac(mac)}={ip}: not a guest address in {subnet}"
            )
        if owners.setdefault(ip, mac) != mac:
            raise ValueError(f"--dhcp-static: {ip} is given to two MACs")
    if len({mac for mac, _ in config.dhcp_static}) != len(config.dhcp_static):
        raise ValueError("--dhcp-static: a MAC is given two addresses")
    try:
        encode_search_list(config.dns_search)
    except ValueError as exc:
        raise ValueError(f"--dns-search: {exc}") from exc
    if not 1 <= config.lease_time <= 0xFFFFFFFE:
        raise ValueError("--lease-time must be between 1 and 4294967294 seconds")


class DhcpServer:
    """The DHCPv4 server for the guest link."""

    def __init__(self, config: Config, pool: FramePool, counters: Counters) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        check_config(config)
        subnet = config.subnet
        self._reserved = frozenset(
            (subnet.network_address, subnet.broadcast_address, config.gateway, config.dns_ip)
        )
        self._static_by_mac = {mac: ip for mac, ip in config.dhcp_static}
        self._static_by_ip = {ip: mac for mac, ip in config.dhcp_static}
        self._by_mac: dict[bytes, Lease] = {}
        self._by_ip: dict[IPv4Address, Lease] = {}
        self._declined: dict[IPv4Address, float] = {}
        #: Unbound offers by the xid they were made in, with the link they went out on; None
        #: for an xid that offers to two MACs have used (two clients: follow neither).
        self._pending: dict[int, tuple[Port, Lease] | None] = {}
        self._last_acked: Lease | None = None
        #: Offset in the subnet where the search for a free address goes on.
        self._cursor = int(config.guest_ip) - int(subnet.network_address) + 1
        #: After a search found no free address: the earliest time one can free up by itself
        #: (a hold or a decline ending). Until then, and unless an address is given back
        #: (:meth:`_freed`), a DISCOVER is refused without searching again: a storm of new MACs
        #: against a full pool costs a lookup each, not a walk of the subnet each.
        self._exhausted_until = 0.0
        self._server_id = config.gateway_b
        lease_time = config.lease_time
        self._lease_opts = encode_options(
            (
                (OPT_LEASE_TIME, struct.pack("!I", lease_time)),
                (OPT_RENEWAL_TIME, struct.pack("!I", lease_time // 2)),
                (OPT_REBINDING_TIME, struct.pack("!I", lease_time * 7 // 8)),
            )
        )
        self._base_opts = encode_options(
            (
                (OPT_SERVER_ID, self._server_id),
                (OPT_SUBNET_MASK, config.netmask_b),
                (OPT_ROUTER, config.gateway_b),
                (OPT_DNS, config.dns_ip_b),
                (OPT_INTERFACE_MTU, struct.pack("!H", min(config.mtu, 0xFFFF))),
            )
        )
        # Optional options, in the order they are given up when a reply would be too large.
        self._optional_opts: list[bytes] = []
        if config.dns_search:
            domain = config.dns_search[0].strip().rstrip(".").encode("ascii")
            self._optional_opts.append(
                encode_options(((OPT_DOMAIN_SEARCH, encode_search_list(config.dns_search)),))
            )
            self._optional_opts.append(encode_options(((OPT_DOMAIN_NAME, domain),)))

    # ----------------------------------------------------------------------------------- input

    def handle_udp(
        self, pkt: IpPacket, sport: int, dport: int, payload: memoryview, now: float
    ) -> None:
        """Handle one datagram to port 67. Raises WireError (counted by the caller) on bad bytes."""
        msg = parse_dhcp(payload)
        counters = self.counters
        if msg.op != BOOTREQUEST:
            counters.inc("dhcp.bad_op")
            return
        if msg.htype != HTYPE_ETHERNET or msg.hlen != 6:
            counters.inc("dhcp.bad_htype")
            return
        if msg.giaddr != _ZERO_IP:
            counters.inc("dhcp.relayed.unsupported")
            return
        dst = pkt.dst
        if dst != _ALL_ONES and dst != self.config.broadcast_b and dst not in self.config.owned_b:
            counters.inc("dhcp.dst.not_ours")
            return
        kind = msg.message_type
        if kind == DHCPDISCOVER:
            counters.inc("dhcp.discover")
            self._discover(pkt, msg, now)
        elif kind == DHCPREQUEST:
            counters.inc("dhcp.request")
            self._request(pkt, msg, now)
        elif kind == DHCPDECLINE:
            self._decline(msg, now)
        elif kind == DHCPRELEASE:
            self._release(msg, now)
        elif kind == DHCPINFORM:
            counters.inc("dhcp.inform")
            self._inform(pkt, msg)
        elif kind is None:
            counters.inc("dhcp.bootp.unsupported")
        elif kind in (DHCPOFFER, DHCPACK, DHCPNAK):
            counters.inc("dhcp.message_type.server_only")
        else:
            counters.inc("dhcp.message_type.unknown")

    def _discover(self, pkt: IpPacket, msg: DhcpMessage, now: float) -> None:
        mac = msg.chaddr
        ip = self._choose(mac, now)
        if ip is None:
            self.counters.inc("dhcp.pool.exhausted")
            return
        lease = self._by_mac.get(mac)
        if lease is not None and lease.ip == ip and lease.bound and lease.expires > now:
            pass  # A bound client rediscovering keeps its lease as it is.
        elif not self._hold(mac, ip, now, OFFER_HOLD_S, bound=False):
            return
        else:
            self._note_offer(msg.xid, pkt.port, self._by_mac[mac])
        self._hostname(mac, msg)
        self._reply(pkt, msg, DHCPOFFER, ip.packed, with_lease=True)

    def _request(self, pkt: IpPacket, msg: DhcpMessage, now: float) -> None:
        opts = msg.options
        server_id = opts.get(OPT_SERVER_ID)
        requested = opts.get(OPT_REQUESTED_IP)
        mac = msg.chaddr
        if server_id is not None:
            if server_id != self._server_id:
                # The client took another server's offer: let ours go.
                self.counters.inc("dhcp.request.other_server")
                lease = self._by_mac.get(mac)
                if lease is not None and not lease.bound:
                    self._forget(lease)
                return
            state = "selecting"
            wanted = requested
        elif requested is not None:
            state = "init_reboot"
            wanted = requested
        elif msg.ciaddr != _ZERO_IP:
            state = "renewing" if pkt.ip.dst in self.config.owned_b else "rebinding"
            wanted = msg.ciaddr
        else:
            self.counters.inc("dhcp.request.malformed")
            return
        self.counters.inc(f"dhcp.request.{state}")
        if wanted is None or len(wanted) != 4:
            self._nak(pkt, msg, "dhcp.nak.no_address")
            return
        ip = ipaddress.IPv4Address(wanted)
        if state == "selecting":
            lease = self._by_mac.get(mac)
            if (lease is None or lease.ip != ip) and self._pending:
                lease = self._follow_new_mac(pkt, msg, ip, now) or lease
            # The offer may have run out while the client dawdled: still fine if nobody took it.
            grant = (
                lease is not None
                and lease.ip == ip
                and (lease.expires > now or self._is_free(mac, ip, now))
            )
        else:
            grant = self._may_have(mac, ip, now)
        if not grant:
            self._nak(pkt, msg, "dhcp.nak.not_yours")
            return
        if not self._hold(mac, ip, now, self.config.lease_time, bound=True):
            return
        lease = self._by_mac[mac]
        lease.acked_at = now
        self._last_acked = lease
        self._pending.pop(msg.xid, None)
        self._hostname(mac, msg)
        self._reply(pkt, msg, DHCPACK, ip.packed, with_lease=True)

    def _note_offer(self, xid: int, port: Port, lease: Lease) -> None:
        """Remember the offer made in transaction ``xid`` on ``port`` (bounded, oldest go).

        An xid already used for an offer to another MAC is ambiguous (a second client that
        happened to draw it, or one that rediscovered after its MAC changed and has an offer
        of its own now): it is marked so that no REQUEST in it moves an offer.
        """
        pending = self._pending
        seen = xid in pending
        before = pending.pop(xid, None)
        if len(pending) >= MAX_PENDING_OFFERS:
            del pending[next(iter(pending))]
        ambiguous = seen and (before is None or before[1].mac != lease.mac)
        pending[xid] = None if ambiguous else (port, lease)

    def _follow_new_mac(
        self, pkt: IpPacket, msg: DhcpMessage, ip: IPv4Address, now: float
    ) -> Lease | None:
        """Move the offer of ``ip`` made in this transaction to the REQUEST's new ``chaddr``.

        Only an unbound, unexpired offer of the requested address, made in the same ``xid`` on
        the same link to another MAC, moves; and only to a MAC without a current bound lease of
        its own that may have the address. Returns the moved lease, or None.
        """
        entry = self._pending.get(msg.xid)
        if entry is None:  # no offer in this xid, or an ambiguous one
            return None
        port, old = entry
        mac = msg.chaddr
        if (
            port is not pkt.port
            or old.mac == mac
            or old.bound
            or old.ip != ip
            or old.expires <= now
            or self._by_mac.get(old.mac) is not old
        ):
            return None
        mine = self._by_mac.get(mac)
        if mine is not None and mine.bound and mine.expires > now:
            return None
        if self._static_by_mac.get(mac, ip) != ip or self._static_by_ip.get(ip, mac) != mac:
            return None
        del self._pending[msg.xid]
        self._forget(old)
        if not self._hold(mac, ip, now, OFFER_HOLD_S, bound=False):
            return None
        self.counters.inc("dhcp.request.mac_changed")
        return self._by_mac[mac]

    def _decline(self, msg: DhcpMessage, now: float) -> None:
        server_id = msg.options.get(OPT_SERVER_ID)
        if server_id is not None and server_id != self._server_id:
            self.counters.inc("dhcp.decline.other_server")
            return
        requested = msg.options.get(OPT_REQUESTED_IP)
        lease = self._by_mac.get(msg.chaddr)
        if requested is None or lease is None or lease.ip.packed != requested:
            self.counters.inc("dhcp.decline.unknown")
            return
        self.counters.inc("dhcp.decline")
        self._forget(lease)
        if len(self._declined) >= MAX_DECLINED:
            del self._declined[min(self._declined, key=self._declined.__getitem__)]
        self._declined[lease.ip] = now + DECLINE_HOLD_S

    def _release(self, msg: DhcpMessage, now: float) -> None:
        server_id = msg.options.get(OPT_SERVER_ID)
        if server_id is not None and server_id != self._server_id:
            self.counters.inc("dhcp.release.other_server")
            return
        lease = self._by_mac.get(msg.chaddr)
        if lease is None or not lease.bound or lease.ip.packed != msg.ciaddr:
            self.counters.inc("dhcp.release.unknown")
            return
        self.counters.inc("dhcp.release")
        # Kept, expired: the client gets the same address back if it is still free then.
        lease.expires = min(lease.expires, now)
        self._freed()

    def _inform(self, pkt: IpPacket, msg: DhcpMessage) -> None:
        if msg.ciaddr == _ZERO_IP:
            self.counters.inc("dhcp.inform.no_ciaddr")
            return
        self._reply(pkt, msg, DHCPACK, _ZERO_IP, with_lease=False)

    # ------------------------------------------------------------------------------ the table

    def _choose(self, mac: bytes, now: float) -> IPv4Address | None:
        """The address to offer ``mac``: static, current or previous, else the next free one."""
        static = self._static_by_mac.get(mac)
        if static is not None:
            return static
        lease = self._by_mac.get(mac)
        if lease is not None and self._is_free(mac, lease.ip, now):
            return lease.ip
        if self._is_free(mac, self.config.guest_ip, now):
            return self.config.guest_ip
        # Go on from where the last search stopped, so handing out n addresses costs O(n), not
        # O(n**2). Every address not free is in one of the tables below, so looking at one more
        # candidate than they hold finds a free address if there is one.
        subnet = self.config.subnet
        first = int(subnet.network_address)
        size = subnet.num_addresses
        taken = len(self._reserved) + len(self._static_by_ip) + len(self._by_ip)
        taken += len(self._declined)
        if now < self._exhausted_until:
            return None
        start = self._cursor
        soonest = float("inf")
        for i in range(min(size, taken + 1)):
            offset = (start + i) % size
            ip = ipaddress.IPv4Address(first + offset)
            if self._is_free(mac, ip, now):
                self._cursor = offset + 1
                return ip
            holder = self._by_ip.get(ip)
            soonest = min(soonest, self._declined.get(ip, soonest))
            if holder is not None:
                soonest = min(soonest, holder.expires)
        self._exhausted_until = soonest
        return None

    def _freed(self) -> None:
        """An address was given back: the next DISCOVER searches again."""
        self._exhausted_until = 0.0

    def _is_free(self, mac: bytes, ip: IPv4Address, now: float) -> bool:
        """True if ``mac`` may take ``ip`` without taking it from anyone."""
        if ip in self._reserved or ip not in self.config.subnet:
            return False
        owner = self._static_by_ip.get(ip)
        if owner is not None and owner != mac:
            return False
        until = self._declined.get(ip)
        if until is not None:
            if until > now:
                return False
            del self._declined[ip]
        holder = self._by_ip.get(ip)
        return holder is None or holder.mac == mac or holder.expires <= now

    def _may_have(self, mac: bytes, ip: IPv4Address, now: float) -> bool:
        """True if a REQUEST from ``mac`` for ``ip`` (not selecting) is to be granted."""
        static = self._static_by_mac.get(mac)
        if static is not None:
            return ip == static
        lease = self._by_mac.get(mac)
        if lease is not None and lease.expires > now:
            return lease.ip == ip
        return self._is_free(mac, ip, now)

    def _hold(self, mac: bytes, ip: IPv4Address, now: float, hold_s: float, bound: bool) -> bool:
        """Record that ``mac`` holds ``ip`` for ``hold_s`` from ``now``; False if table full."""
        expires = now + hold_s
        lease = self._by_mac.get(mac)
        holder = self._by_ip.get(ip)
        if holder is not None and holder is not lease:
            self._forget(holder)
        if lease is None:
            if len(self._by_mac) >= MAX_LEASES and not self._purge(now):
                self.counters.inc("dhcp.lease_table.full")
                return False
            lease = Lease(mac, ip, expires, bound)
            self._by_mac[mac] = lease
        else:
            if lease.ip != ip:
                self._by_ip.pop(lease.ip, None)
                lease.ip = ip
                self._freed()
            lease.expires = expires
            lease.bound = bound
        self._by_ip[ip] = lease
        return True

    def _purge(self, now: float) -> bool:
        """Forget expired leases (one pass over the bounded table); True if room was made."""
        dead = [lease for lease in self._by_mac.values() if lease.expires <= now]
        for lease in dead:
            self._forget(lease)
        return bool(dead)

    def _forget(self, lease: Lease) -> None:
        self._freed()
        if self._by_mac.get(lease.mac) is lease:
            del self._by_mac[lease.mac]
        if self._by_ip.get(lease.ip) is lease:
            del self._by_ip[lease.ip]
        if self._last_acked is lease:
            self._last_acked = None

    def _hostname(self, mac: bytes, msg: DhcpMessage) -> None:
        raw = msg.options.get(OPT_HOST_NAME)
        lease = self._by_mac.get(mac)
        if raw is None or lease is None:
            return
        name = raw[:_MAX_HOSTNAME].rstrip(b"\0").decode("ascii", "replace")
        lease.hostname = "".join(c if c.isprintable() else "?" for c in name) or None

    # ---------------------------------------------------------------------------------- output

    def _nak(self, pkt: IpPacket, msg: DhcpMessage, reason: str) -> None:
        self.counters.inc(reason)
        options = encode_options(
            ((OPT_MESSAGE_TYPE, bytes((DHCPNAK,))), (OPT_SERVER_ID, self._server_id))
        )
        self._send(pkt, msg, DHCPNAK, _ZERO_IP, options, broadcast=True)

    def _reply(
        self, pkt: IpPacket, msg: DhcpMessage, kind: int, yiaddr: bytes, with_lease: bool
    ) -> None:
        """Build OFFER or ACK options within the client's size limit and send the reply."""
        limit = self._max_message(msg)
        head = encode_options(((OPT_MESSAGE_TYPE, bytes((kind,))),)) + self._base_opts
        if with_lease:
            head += self._lease_opts
        options = head + b"".join(self._optional_opts)
        dropped = 0
        while message_length(len(options)) > limit and dropped < len(self._optional_opts):
            dropped += 1
            options = head + b"".join(self._optional_opts[dropped:])
            self.counters.inc("dhcp.reply.option_dropped")
        if message_length(len(options)) > limit:
            self.counters.inc("dhcp.reply.too_large")
            return
        self._send(pkt, msg, kind, yiaddr, options, broadcast=False)

    def _max_message(self, msg: DhcpMessage) -> int:
        """Largest DHCP message the client accepts: option 57 (an IP size) and the MTU bound it."""
        value = msg.options.get(OPT_MAX_MESSAGE_SIZE)
        ip_limit = DHCP_MIN_MAX_MESSAGE
        if value is not None and len(value) == 2:
            ip_limit = max(ip_limit, int.from_bytes(value, "big"))
        return min(ip_limit, self.config.mtu) - _IP_UDP_HLEN

    def _send(
        self,
        pkt: IpPacket,
        msg: DhcpMessage,
        kind: int,
        yiaddr: bytes,
        options: bytes,
        broadcast: bool,
    ) -> None:
        """Address the reply as RFC 2131 §4.1 says, build it in a pooled frame and send it."""
        if broadcast or (msg.ciaddr == _ZERO_IP and msg.flags & FLAG_BROADCAST):
            dst_mac, dst_ip = BROADCAST, _ALL_ONES
        elif msg.ciaddr != _ZERO_IP:
            dst_mac, dst_ip = msg.chaddr, msg.ciaddr
        else:
            dst_mac, dst_ip = msg.chaddr, yiaddr
        config = self.config
        frame = self.pool.acquire()
        buf = frame.view
        l7 = frame.start + IPV4.udp_payload_off
        ciaddr = msg.ciaddr if kind == DHCPACK else _ZERO_IP
        end = build_dhcp(
            buf, l7, BOOTREPLY, msg.xid, msg.flags, ciaddr, yiaddr, _ZERO_IP, msg.giaddr,
            msg.chaddr, options, BOOTP_MIN_LEN,
        )  # fmt: skip
        payload_len = end - l7
        src_ip = config.gateway_b
        frame.length = build_udp_frame(
            IPV4, buf, frame.start, dst_mac, config.mac, src_ip, dst_ip, DHCP_SERVER_PORT,
            DHCP_CLIENT_PORT, payload_len,
        )  # fmt: skip
        self.counters.inc(f"dhcp.{_NAMES[kind]}.sent")
        pkt.port.send(frame)

    def reserve(self, mac: bytes, ip: IPv4Address) -> bool:
        """Hold ``ip`` for ``mac`` as ``--dhcp-static`` does: for a guest guestnet configured
        itself (``guestnet netns ... --configure``), so that no DHCP client of another guest on
        the switch is offered its address. ``--dhcp-static`` entries win: False when either
        the MAC or the address has one already."""
        if mac in self._static_by_mac or ip in self._static_by_ip:
            return False
        self._static_by_mac[mac] = ip
        self._static_by_ip[ip] = mac
        return True

    # ------------------------------------------------------------------------- for the API

    def leases(self, now: float) -> list[dict[str, object]]:
        """The bound, unexpired leases, for the control API."""
        out: list[dict[str, object]] = []
        for lease in self._by_mac.values():
            if not lease.bound or lease.expires <= now:
                continue
            out.append(
                {
                    "mac": format_mac(lease.mac),
                    "ip": str(lease.ip),
                    "hostname": lease.hostname,
                    "expires_in_s": round(lease.expires - now, 3),
                    "static": self._static_by_mac.get(lease.mac) == lease.ip,
                }
            )
        out.sort(key=lambda d: ipaddress.IPv4Address(str(d["ip"])))
        return out

    def lease_for_mac(self, mac: bytes, now: float | None = None) -> IPv4Address | None:
        """The address bound to ``mac`` (unexpired at ``now``, when given), or None."""
        lease = self._by_mac.get(mac)
        if lease is None or not lease.bound:
            return None
        if now is not None and lease.expires <= now:
            return None
        return lease.ip

    def guest_address(self) -> IPv4Address:
        """The address most recently ACKed, or ``config.guest_ip`` before any: where forwards go."""
        if self._last_acked is not None:
            return self._last_acked.ip
        return self.config.guest_ip


_NAMES = {DHCPOFFER: "offer", DHCPACK: "ack", DHCPNAK: "nak"}
