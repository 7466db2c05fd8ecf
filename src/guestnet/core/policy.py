"""Policy: where a guest's connection may go, and what address it goes to on the host.

One place decides, for TCP, UDP and ICMP alike, so later features (CIDR allow/deny lists) add
rules here and every protocol obeys them:

- the gateway address stands for the host: it maps to 127.0.0.1, unless ``--no-host-loopback``;
- the DNS address serves only DNS (port 53 is taken before the NAT sees it); anything else to it
  is refused, as is any other address inside the guest subnet (nobody is there);
- with ``--no-host-loopback``, 127.0.0.0/8, 0.0.0.0/8 and the host's own addresses are refused;
- 169.254.0.0/16 (link-local, where cloud metadata services live) is refused unless
  ``--allow-link-local``;
- multicast, broadcast and 240.0.0.0/4 are never translated.

A refusal carries a dotted reason for the counters; the NAT answers it (TCP RST, ICMP
unreachable) and counts it.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from guestnet.config import Config

LOOPBACK = b"\x7f\x00\x00\x01"


class Verdict(NamedTuple):
    """Where to send, as a host address string, or None with the reason for refusing."""

    host: str | None
    reason: str


class Policy:
    """Maps guest destinations to host destinations, or refuses them."""

    __slots__ = ("_cache", "config", "host_addrs", "subnet_mask", "subnet_net")

    def __init__(self, config: Config, host_addrs: frozenset[bytes] = frozenset()) -> None:
        self.config = config
        #: The host's own IPv4 addresses (refused under --no-host-loopback).
        self.host_addrs = host_addrs
        self.subnet_net = int(config.subnet.network_address)
        self.subnet_mask = int(config.subnet.netmask)
        self._cache: dict[bytes, Verdict] = {}

    def destination(self, dst: bytes) -> Verdict:
        """The verdict for a guest destination address (4 packed bytes)."""
        verdict = self._cache.get(dst)
        if verdict is None:
            verdict = self._decide(dst)
            if len(self._cache) < 4096:
                self._cache[dst] = verdict
        return verdict

    def _decide(self, dst: bytes) -> Verdict:
        cfg = self.config
        if dst == cfg.gateway_b:
            if cfg.no_host_loopback:
                return Verdict(None, "policy.host_loopback")
            return Verdict("127.0.0.1", "policy.gateway")
        value = int.from_bytes(dst, "big")
        if value & self.subnet_mask == self.subnet_net:
            return Verdict(None, "policy.guest_subnet")
        first = dst[0]
        if first >= 224:
            return Verdict(None, "policy.multicast")
        if first in (0, 127) or dst in self.host_addrs:
            if cfg.no_host_loopback:
                return Verdict(None, "policy.host_loopback")
            return Verdict(str(ipaddress.IPv4Address(dst)), "policy.host")
        if first == 169 and dst[1] == 254 and not cfg.allow_link_local:
            return Verdict(None, "policy.link_local")
        return Verdict(str(ipaddress.IPv4Address(dst)), "policy.forward")
