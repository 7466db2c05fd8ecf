"""Policy verdicts: the ipaddress rules give exactly the verdicts of the integer rules before.

The reference below is the previous implementation (integer subnet mask, first-octet tests),
kept here as the oracle: for every flag combination, for the edges of each range and for random
addresses, :meth:`Policy.destination` and :meth:`Policy.guest_source` must agree with it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestnet.config import Config
from guestnet.core.policy import CACHE_MAX, Policy, Verdict

HOST_ADDRS = frozenset({bytes([192, 168, 1, 20]), bytes([169, 254, 7, 7])})


def reference_verdict(cfg: Config, host_addrs: frozenset[bytes], dst: bytes) -> Verdict:
    """The policy as it was written before the address-family seam."""
    if dst == cfg.gateway_b:
        if cfg.no_host_loopback:
            return Verdict(None, "policy.host_loopback")
        return Verdict("127.0.0.1", "policy.gateway")
    value = int.from_bytes(dst, "big")
    if value & int(cfg.subnet.netmask) == int(cfg.subnet.network_address):
        return Verdict(None, "policy.guest_subnet")
    first = dst[0]
    if first >= 224:
        return Verdict(None, "policy.multicast")
    if first in (0, 127) or dst in host_addrs:
        if cfg.no_host_loopback:
            return Verdict(None, "policy.host_loopback")
        return Verdict(str(ipaddress.IPv4Address(dst)), "policy.host")
    if first == 169 and dst[1] == 254 and not cfg.allow_link_local:
        return Verdict(None, "policy.link_local")
    return Verdict(str(ipaddress.IPv4Address(dst)), "policy.forward")


def reference_source(cfg: Config, src: bytes) -> bool:
    """The UDP NAT's source check before the seam (integer mask, broadcast compared)."""
    in_subnet = int.from_bytes(src, "big") & int(cfg.subnet.netmask) == int(
        cfg.subnet.network_address
    )
    return in_subnet and src != cfg.broadcast_b


CONFIGS: list[dict[str, Any]] = [
    {},
    {"no_host_loopback": True},
    {"allow_link_local": True},
    {"no_host_loopback": True, "allow_link_local": True},
    {
        "subnet": ipaddress.IPv4Network("192.168.100.0/22"),
        "gateway": ipaddress.IPv4Address("192.168.100.1"),
        "dns_ip": ipaddress.IPv4Address("192.168.100.3"),
        "guest_ip": ipaddress.IPv4Address("192.168.101.15"),
    },
]

EDGES = [
    bytes(b)
    for b in (
        (10, 0, 2, 2), (10, 0, 2, 3), (10, 0, 2, 0), (10, 0, 2, 255), (10, 0, 2, 77),
        (10, 0, 3, 1), (10, 0, 1, 255), (0, 0, 0, 0), (0, 255, 255, 255), (1, 0, 0, 0),
        (126, 255, 255, 255), (127, 0, 0, 1), (127, 255, 255, 255), (128, 0, 0, 0),
        (169, 253, 255, 255), (169, 254, 0, 0), (169, 254, 169, 254), (169, 254, 255, 255),
        (169, 255, 0, 0), (192, 168, 1, 20), (169, 254, 7, 7), (192, 168, 100, 1),
        (192, 168, 103, 255), (192, 168, 104, 0), (223, 255, 255, 255), (224, 0, 0, 0),
        (239, 255, 255, 250), (240, 0, 0, 1), (255, 255, 255, 254), (255, 255, 255, 255),
        (93, 184, 216, 34), (8, 8, 8, 8),
    )
]  # fmt: skip


@pytest.mark.parametrize("flags", CONFIGS)
def test_verdicts_at_every_range_edge_match_the_reference(flags: dict[str, Any]) -> None:
    cfg = Config(**flags)
    policy = Policy(cfg, HOST_ADDRS)
    for dst in EDGES:
        assert policy.destination(dst) == reference_verdict(cfg, HOST_ADDRS, dst), dst
        assert policy.guest_source(dst) == reference_source(cfg, dst), dst


@pytest.mark.parametrize("flags", CONFIGS)
@given(addr=st.binary(min_size=4, max_size=4))
def test_random_verdicts_match_the_reference(flags: dict[str, Any], addr: bytes) -> None:
    cfg = Config(**flags)
    policy = Policy(cfg, HOST_ADDRS)
    assert policy.destination(addr) == reference_verdict(cfg, HOST_ADDRS, addr)
    assert policy.guest_source(addr) == reference_source(cfg, addr)


def test_named_verdicts() -> None:
    """The reasons the NATs count, one address each (the table the module docstring gives)."""
    policy = Policy(Config(), HOST_ADDRS)
    cases = {
        bytes([10, 0, 2, 2]): Verdict("127.0.0.1", "policy.gateway"),
        bytes([10, 0, 2, 3]): Verdict(None, "policy.guest_subnet"),
        bytes([224, 0, 0, 251]): Verdict(None, "policy.multicast"),
        bytes([255, 255, 255, 255]): Verdict(None, "policy.multicast"),
        bytes([240, 1, 2, 3]): Verdict(None, "policy.multicast"),
        bytes([127, 0, 0, 53]): Verdict("127.0.0.53", "policy.host"),
        bytes([0, 0, 0, 0]): Verdict("0.0.0.0", "policy.host"),
        bytes([192, 168, 1, 20]): Verdict("192.168.1.20", "policy.host"),
        bytes([169, 254, 169, 254]): Verdict(None, "policy.link_local"),
        bytes([169, 254, 7, 7]): Verdict("169.254.7.7", "policy.host"),
        bytes([93, 184, 216, 34]): Verdict("93.184.216.34", "policy.forward"),
    }
    for dst, verdict in cases.items():
        assert policy.destination(dst) == verdict, dst
    refused = Policy(Config(no_host_loopback=True), HOST_ADDRS)
    for dst in (bytes([10, 0, 2, 2]), bytes([127, 0, 0, 1]), bytes([192, 168, 1, 20])):
        assert refused.destination(dst) == Verdict(None, "policy.host_loopback")


def test_verdicts_are_cached_per_destination_and_bounded() -> None:
    policy = Policy(Config())
    dst = bytes([93, 184, 216, 34])
    first = policy.destination(dst)
    assert policy.destination(dst) is first  # the cached object, not a new decision
    for i in range(CACHE_MAX + 10):
        policy.destination(bytes([100, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]))
    assert len(policy._cache) == CACHE_MAX
    # Beyond the bound verdicts are still right, only not remembered.
    assert policy.destination(bytes([100, 200, 0, 1])) == Verdict("100.200.0.1", "policy.forward")


def test_guest_source_accepts_the_network_address_but_not_broadcast() -> None:
    """As before the seam: only the directed broadcast and foreign sources are refused."""
    policy = Policy(Config())
    assert policy.guest_source(bytes([10, 0, 2, 15]))
    assert policy.guest_source(bytes([10, 0, 2, 0]))
    assert not policy.guest_source(bytes([10, 0, 2, 255]))
    assert not policy.guest_source(bytes([10, 0, 3, 15]))
    assert not policy.guest_source(bytes([0, 0, 0, 0]))
