"""Egress rules (``--allow``/``--deny``): matching in the one Policy, their hit counters, the
cache, the command line, the API listing, and how each protocol answers a denial."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from guestnet.api import Api, ControlView
from guestnet.cli import build_parser, config_from_args
from guestnet.config import Config
from guestnet.core.icmp import IcmpService
from guestnet.core.policy import CACHE_MAX, Policy, Verdict

from .test_tcp import ISN, SYN, Tcp
from .test_udp import Rig

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def rules(*spec: str) -> tuple[tuple[bool, Net], ...]:
    """``rules("deny 0.0.0.0/0", "allow 198.18.0.0/24")`` as Config.egress holds them."""
    out: list[tuple[bool, Net]] = []
    for item in spec:
        action, cidr = item.split()
        out.append((action == "allow", ipaddress.ip_network(cidr)))
    return tuple(out)


def v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def test_no_rules_keep_every_verdict_as_before() -> None:
    plain, empty = Policy(Config()), Policy(Config(egress=()))
    for dst in (v4("10.0.2.2"), v4("198.18.0.2"), v4("169.254.169.254"), v6("2001:db8::1")):
        assert plain.destination(dst) == empty.destination(dst)
        assert empty.destination(dst).rule == -1
    assert empty.rules() == []


def test_first_match_wins_in_command_line_order() -> None:
    cfg = Config(egress=rules("allow 198.18.0.2/32", "deny 198.18.0.0/16", "allow 198.18.0.0/15"))
    policy = Policy(cfg)
    assert policy.destination(v4("198.18.0.2")) == Verdict("198.18.0.2", "policy.forward", 0)
    assert policy.destination(v4("198.18.0.3")) == Verdict(None, "policy.deny", 1)
    # The broader allow after the deny never sees 198.18/16, only the rest of 198.18/15.
    assert policy.destination(v4("198.19.0.1")) == Verdict("198.19.0.1", "policy.forward", 2)
    # No rule matches: allowed, as without rules.
    assert policy.destination(v4("93.184.216.34")) == Verdict("93.184.216.34", "policy.forward")
    # Reversed, the deny comes first and takes the address the allow named.
    reverse = Policy(Config(egress=rules("deny 198.18.0.0/16", "allow 198.18.0.2/32")))
    assert reverse.destination(v4("198.18.0.2")) == Verdict(None, "policy.deny", 0)


def test_deny_all_then_allow_opens_only_the_allowed() -> None:
    cfg = Config(egress=rules("deny 0.0.0.0/0", "deny ::/0", "allow 198.18.0.0/24"))
    policy = Policy(cfg)
    # The allow after a deny-all is never reached: order is the whole meaning.
    assert policy.destination(v4("198.18.0.2")).reason == "policy.deny"
    cfg = Config(egress=rules("allow 198.18.0.0/24", "allow 2001:db8:18::/64", "deny 0.0.0.0/0",
                              "deny ::/0"))  # fmt: skip
    policy = Policy(cfg)
    assert policy.destination(v4("198.18.0.2")).host == "198.18.0.2"
    assert policy.destination(v6("2001:db8:18::2")).host == "2001:db8:18::2"
    assert policy.destination(v4("198.18.1.2")) == Verdict(None, "policy.deny", 2)
    assert policy.destination(v6("2001:db8:19::2")) == Verdict(None, "policy.deny", 3)


def test_rules_of_one_family_never_match_the_other() -> None:
    policy = Policy(Config(egress=rules("deny ::/0")))
    assert policy.destination(v4("198.18.0.2")) == Verdict("198.18.0.2", "policy.forward")
    assert policy.destination(v6("2001:db8::1")) == Verdict(None, "policy.deny", 0)
    # ::ffff:198.18.0.2 is an IPv6 destination: an IPv4 rule does not hold it.
    policy = Policy(Config(egress=rules("deny 198.18.0.0/16")))
    assert policy.destination(v6("2001:db8::1")).reason == "policy.forward"
    assert policy.destination(v4("198.18.0.9")).reason == "policy.deny"


def test_rules_see_the_destination_as_sent_and_never_open_a_builtin_refusal() -> None:
    """The gateway is matched as 10.0.2.2 (fd00::2), not as the loopback it maps to; an allow
    does not open link-local or the guest subnet; a deny on loopback does not touch the
    gateway's mapping."""
    policy = Policy(Config(egress=rules("deny 10.0.2.2/32", "deny fd00::2/128")))
    assert policy.destination(v4("10.0.2.2")) == Verdict(None, "policy.deny", 0)
    assert policy.destination(v6("fd00::2")) == Verdict(None, "policy.deny", 1)
    assert policy.destination(v4("127.0.0.1")) == Verdict("127.0.0.1", "policy.host")
    policy = Policy(Config(egress=rules("deny 127.0.0.0/8")))
    assert policy.destination(v4("10.0.2.2")) == Verdict("127.0.0.1", "policy.gateway")
    assert policy.destination(v4("127.0.0.1")) == Verdict(None, "policy.deny", 0)
    policy = Policy(Config(egress=rules("allow 0.0.0.0/0", "allow ::/0")))
    assert policy.destination(v4("169.254.169.254")) == Verdict(None, "policy.link_local")
    assert policy.destination(v4("10.0.2.77")) == Verdict(None, "policy.guest_subnet")
    assert policy.destination(v6("fe80::1")) == Verdict(None, "policy.link_local")
    assert policy.rules()[0]["hits"] == 0 and policy.rules()[1]["hits"] == 0


def test_hits_count_every_verdict_a_rule_gives_cached_or_not() -> None:
    policy = Policy(Config(egress=rules("deny 198.18.0.0/24", "allow 2001:db8::/32")))
    denied = v4("198.18.0.2")
    first = policy.destination(denied)
    assert policy.destination(denied) is first  # the second answer came from the cache
    policy.destination(denied)
    for _ in range(4):
        policy.destination(v6("2001:db8::1"))
    policy.destination(v4("93.184.216.34"))  # no rule: nobody's hit
    assert policy.rules() == [
        {"action": "deny", "cidr": "198.18.0.0/24", "hits": 3},
        {"action": "allow", "cidr": "2001:db8::/32", "hits": 4},
    ]


def test_cache_stays_right_beyond_its_bound() -> None:
    """Once the cache is full, verdicts are decided each time: still the rule's, still counted."""
    policy = Policy(Config(egress=rules("deny 100.64.0.0/10")))
    for i in range(CACHE_MAX + 10):
        policy.destination(bytes([93, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]))
    assert len(policy._cache) == CACHE_MAX
    assert policy.destination(v4("100.64.0.1")) == Verdict(None, "policy.deny", 0)
    assert policy.destination(v4("100.64.0.1")) == Verdict(None, "policy.deny", 0)
    assert policy.destination(v4("100.128.0.1")).reason == "policy.forward"
    assert policy.rules()[0]["hits"] == 2


def test_command_line_keeps_allow_and_deny_in_their_order() -> None:
    args = build_parser().parse_args(
        ["qemu", "--socket", "/nonexistent", "--deny", "0.0.0.0/0", "--allow", "198.18.0.0/24",
         "--deny", "2001:db8:18::/48", "--allow", "192.0.2.7"]
    )  # fmt: skip
    assert config_from_args(args).egress == rules(
        "deny 0.0.0.0/0", "allow 198.18.0.0/24", "deny 2001:db8:18::/48", "allow 192.0.2.7/32"
    )
    assert config_from_args(build_parser().parse_args(["qemu", "--socket", "/x"])).egress == ()


@pytest.mark.parametrize("bad", ["198.18.0.1/16", "nonsense", "10.0.0.0/33"])
def test_command_line_refuses_what_is_not_a_cidr(bad: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["qemu", "--socket", "/x", "--deny", bad])
    assert exc.value.code == 2
    assert "not a CIDR" in capsys.readouterr().err


def _api(policy: Policy) -> Api:
    view = ControlView(
        links=list,
        drops=dict,
        pools=dict,
        flow_sources=tuple,
        leases=lambda now: [],
        forwards=_NoForwards(),  # type: ignore[arg-type]
        policy=policy.rules,
    )
    return Api(view)


class _NoForwards:
    def __len__(self) -> int:
        return 0


def test_api_lists_the_rules_with_their_hits() -> None:
    policy = Policy(Config(egress=rules("deny 198.18.0.0/24", "allow ::/0")))
    policy.destination(v4("198.18.0.2"))
    api = _api(policy)
    expected = [
        {"action": "deny", "cidr": "198.18.0.0/24", "hits": 1},
        {"action": "allow", "cidr": "::/0", "hits": 0},
    ]
    assert api.handle("GET", "/policy", b"", 0.0) == (200, expected)
    status, stats = api.handle("GET", "/stats", b"", 0.0)
    assert status == 200 and isinstance(stats, dict) and stats["policy"] == expected
    assert api.handle("POST", "/policy", b"", 0.0)[0] == 405
    # Without rules /policy is an empty list and /stats has no policy section.
    bare = _api(Policy(Config()))
    assert bare.handle("GET", "/policy", b"", 0.0) == (200, [])
    stats = bare.handle("GET", "/stats", b"", 0.0)[1]
    assert isinstance(stats, dict) and "policy" not in stats


@pytest.mark.parametrize("version", [4, 6])
def test_denied_syn_is_answered_with_icmp_admin_prohibited(
    make_core: Any, frames: Any, version: int
) -> None:
    """Not RST: the guest's connect fails at once (EHOSTUNREACH; EACCES over IPv6), through the
    same hook slirp4netns's host_loopback_unreachable uses, from the SYN's own gateway."""
    from scapy.layers.inet import ICMP, IP, IPerror, TCPerror
    from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
    from scapy.layers.l2 import Ether

    core = make_core(egress=rules("deny 198.18.0.0/16", "deny 2001:db8::/32"))
    t = Tcp(core, frames, version)
    policy = Policy(core.config)
    t.nat.policy = policy
    icmp = IcmpService(core.config, core.pool, core.counters, core.switch, policy, None)
    core.classifier.icmp = icmp
    t.nat.unreachable = icmp.send_unreachable
    t.send(SYN, ISN, dst=t.remote, dport=443)
    (raw,) = core.take_sent()
    pkt = Ether(raw)
    if version == 4:
        assert (pkt[ICMP].type, pkt[ICMP].code, pkt[IP].src) == (3, 13, "10.0.2.2")
        assert pkt[IPerror].dst == t.remote_host and pkt[TCPerror].dport == 443
        assert core.counters["icmp.error.sent.3.13"] == 1
    else:
        unreach = pkt[ICMPv6DestUnreach]
        assert (unreach.type, unreach.code, pkt[IPv6].src) == (1, 1, "fd00::2")
        assert pkt[IPerror6].dst == t.remote_host
    assert t.io.connects == []
    assert core.counters["tcp.policy.deny"] == 1
    assert policy.rules()[0 if version == 4 else 1]["hits"] == 1
    # An allowed destination still connects on the host.
    t.send(SYN, ISN, dst=t.gateway, dport=8080)
    assert len(t.io.connects) == 1
    assert core.pool.in_use == 0


def test_denied_udp_is_answered_with_icmp_admin_prohibited(make_core: Any, frames: Any) -> None:
    from scapy.layers.inet import ICMP, IP, IPerror
    from scapy.layers.l2 import Ether

    core = make_core(egress=rules("deny 198.18.0.0/16"))
    rig = Rig(core)
    core.feed(frames.udp(dst=v4("198.18.0.2"), dport=5000))
    assert rig.sockets == []
    pkt = Ether(core.take_sent()[0])
    assert (pkt[ICMP].type, pkt[ICMP].code, pkt[IP].src) == (3, 13, "10.0.2.2")
    assert pkt[IPerror].dst == "198.18.0.2"
    assert core.counters["nat.udp.policy.deny"] == 1
    core.feed(frames.udp(dst=v4("198.19.0.2"), dport=5000))
    assert len(rig.sockets) == 1
    assert rig.policy.rules()[0]["hits"] == 1
    rig.nat.close_all()
