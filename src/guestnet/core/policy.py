"""Policy: where a guest's connection may go, and what address it goes to on the host.

One place decides, for TCP, UDP and ICMP alike, so later features (CIDR allow/deny lists) add
rules here and every protocol obeys them:

- the gateway address stands for the host: it maps to the host's loopback (127.0.0.1; the
  IPv6 gateway to ::1), unless ``--no-host-loopback``;
- the DNS address serves only DNS (port 53 is taken before the NAT sees it); anything else to it
  is refused, as is any other address inside the guest subnet. Guests reach each other without
  the NAT: the switch delivers their frames (at L2, or routed when a guest sends another
  guest's address to guestnet's MAC; guestnet.core.switch), so what reaches the policy in the
  guest subnet is an address no guest has claimed, and no host socket could reach a guest;
- with ``--no-host-loopback``, loopback (127.0.0.0/8), "this network" (0.0.0.0/8) and the host's
  own addresses are refused;
- link-local destinations (169.254.0.0/16, where cloud metadata services live) are refused
  unless ``--allow-link-local``; IPv6 link-local ones (fe80::/10) always: they name no
  host beyond the guest link;
- multicast, broadcast and reserved (240.0.0.0/4) destinations are never translated.

Then the egress rules (``--allow CIDR``, ``--deny CIDR``, ``config.egress``), in command-line
order, the first whose network holds the destination deciding, none: allowed. They are asked
only about destinations the built-in rules let through, and they match the destination as the
guest sent it, before any mapping: ``--deny 10.0.2.2/32`` (or ``--deny 0.0.0.0/0``) closes the
gateway's way to the host's loopback, and ``--allow`` never opens what a built-in rule refuses.
A denial's reason is ``policy.deny``; the NAT answers it with an ICMP (ICMPv6) destination
unreachable, administratively prohibited, for TCP as for UDP and ICMP, so the guest's connect or
send fails at once (EHOSTUNREACH over IPv4, EACCES over IPv6) instead of timing out. Each rule
counts its hits (:meth:`Policy.rules`): every verdict it gives, cached or not, so a rule's hits
are the datagrams and connection attempts it decided.

The rules are written with :mod:`ipaddress` (``is_multicast``, ``is_reserved``,
``is_loopback``, ``is_link_local``, network membership), so they read the same for IPv6
addresses (16 packed bytes) as for IPv4 ones. That costs a few microseconds per decision, which
is why verdicts are cached per destination: the datapath pays one dict lookup per datagram.
The guest-source check of the UDP NAT is cached the same way.

A refusal carries a dotted reason for the counters; the NAT answers it (TCP RST, ICMP
unreachable) and counts it.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from guestnet.config import Config

#: Verdicts (and source checks) remembered; beyond this they are computed each time.
CACHE_MAX = 4096
#: "This network" (RFC 1122 3.2.1.3): Linux delivers 0.0.0.0/8 to the host itself.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Verdict(NamedTuple):
    """Where to send, as a host address string, or None with the reason for refusing."""

    host: str | None
    reason: str
    #: Index of the egress rule that decided (its hit counter), or -1: the built-in rules did.
    rule: int = -1


class Policy:
    """Maps guest destinations to host destinations, or refuses them."""

    __slots__ = (
        "_cache",
        "_gateways",
        "_sources",
        "config",
        "egress",
        "hits",
        "host_addrs",
        "subnets",
    )

    def __init__(self, config: Config, host_addrs: frozenset[bytes] = frozenset()) -> None:
        self.config = config
        #: The host's own addresses, packed (refused under --no-host-loopback).
        self.host_addrs = host_addrs
        #: The guest networks: refused as destinations, the only valid guest sources.
        self.subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (config.subnet,)
        #: guestnet's gateway addresses, packed, and the host loopback each stands for.
        self._gateways = {config.gateway_b: "127.0.0.1"}
        if config.ipv6:
            self.subnets += (config.ipv6_prefix,)
            self._gateways[config.gateway6_b] = "::1"
        self._cache: dict[bytes, Verdict] = {}
        self._sources: dict[bytes, bool] = {}
        #: The egress rules, fixed at start (so cached verdicts stay true), and their hits.
        self.egress = config.egress
        self.hits = [0] * len(self.egress)

    def destination(self, dst: bytes) -> Verdict:
        """The verdict for a guest destination address (packed, 4 or 16 bytes)."""
        verdict = self._cache.get(dst)
        if verdict is None:
            verdict = self._decide(dst)
            if len(self._cache) < CACHE_MAX:
                self._cache[dst] = verdict
        if verdict.rule >= 0:
            self.hits[verdict.rule] += 1
        return verdict

    def rules(self) -> list[dict[str, object]]:
        """The egress rules in order, each with its hits (what ``GET /policy`` lists)."""
        return [
            {"action": "allow" if allow else "deny", "cidr": str(net), "hits": hits}
            for (allow, net), hits in zip(self.egress, self.hits, strict=True)
        ]

    def guest_source(self, src: bytes) -> bool:
        """True when ``src`` (packed) may be a guest's own address: inside a guest network and
        not that network's (IPv4) broadcast address."""
        ok = self._sources.get(src)
        if ok is None:
            ok = self._is_guest_source(ipaddress.ip_address(src))
            if len(self._sources) < CACHE_MAX:
                self._sources[src] = ok
        return ok

    def _is_guest_source(self, addr: IPAddress) -> bool:
        for net in self.subnets:
            if addr in net:
                return not (
                    isinstance(net, ipaddress.IPv4Network) and addr == net.broadcast_address
                )
        return False

    def _decide(self, dst: bytes) -> Verdict:
        verdict = self._builtin(dst)
        if verdict.host is None or not self.egress:
            return verdict
        addr = ipaddress.ip_address(dst)
        for index, (allow, net) in enumerate(self.egress):
            # ``in`` is False across families, so IPv4 rules never match IPv6 and back.
            if addr in net:
                if allow:
                    return verdict._replace(rule=index)
                return Verdict(None, "policy.deny", index)
        return verdict

    def _builtin(self, dst: bytes) -> Verdict:
        """The built-in rules (module docstring), before any egress rule."""
        cfg = self.config
        loopback = self._gateways.get(dst)
        if loopback is not None:
            if cfg.no_host_loopback:
                return Verdict(None, "policy.host_loopback")
            return Verdict(loopback, "policy.gateway")
        addr = ipaddress.ip_address(dst)
        if any(addr in net for net in self.subnets):
            return Verdict(None, "policy.guest_subnet")
        # Loopback before reserved: IPv6's reserved ::/8 holds ::1 and ::.
        if (
            addr.is_loopback
            or addr.is_unspecified
            or addr in _THIS_NETWORK
            or dst in self.host_addrs
        ):
            if cfg.no_host_loopback:
                return Verdict(None, "policy.host_loopback")
            return Verdict(str(addr), "policy.host")
        if addr.is_multicast or addr.is_reserved:
            return Verdict(None, "policy.multicast")
        if addr.is_link_local and (addr.version == 6 or not cfg.allow_link_local):
            return Verdict(None, "policy.link_local")
        return Verdict(str(addr), "policy.forward")
