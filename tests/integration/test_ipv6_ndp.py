"""IPv6 on the guest link against a real kernel: SLAAC from guestnet's router advertisements,
neighbour discovery and echo for guestnet's addresses, ``--configure`` and ``run``, the capture.

The guest is a namespace of the test's own (``attach_guest``) or the one ``guestnet run`` makes;
its kernel sends router and neighbour solicitations, forms its address from our prefix and sends
echo requests, so each test exercises the whole path through the TAP both ways.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, guestnet_argv, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

#: The kernel's SLAAC address from fd00::/64 and the guest MAC 52:54:00:12:34:56 (EUI-64).
SLAAC_ADDR = "fd00::5054:ff:fe12:3456"
#: guestnet's link-local address (EUI-64 of 52:55:0a:00:02:02), the router's.
ROUTER_LL = "fe80::5055:aff:fe00:202"


def _ip6(guest: Netns, *args: str) -> str:
    return guest.run(["ip", "-6", *args], check=False).stdout


def _ping6(guest: Netns, addr: str, tries: int = 10) -> subprocess.CompletedProcess[str]:
    """``ping -6 -c1`` until one is answered (bounded: neighbour discovery may take a moment)."""
    proc = guest.run(["ping", "-6", "-c1", "-W1", addr], check=False)
    for _ in range(tries - 1):
        if proc.returncode == 0:
            break
        proc = guest.run(["ping", "-6", "-c1", "-W1", addr], check=False)
    return proc


def _wait_slaac(guest: Netns, ifname: str = "eth0") -> None:
    """Until the kernel has a usable SLAAC address and a default route from our RA (bounded)."""

    def ready() -> bool:
        addrs = _ip6(guest, "addr", "show", "dev", ifname, "scope", "global")
        route = _ip6(guest, "route", "show", "default")
        return (
            f"inet6 {SLAAC_ADDR}/64" in addrs
            and "tentative" not in addrs
            and f"via {ROUTER_LL}" in route
        )

    wait_for(ready, 15.0, "SLAAC address and default route from guestnet's RA", step=0.2)


def test_slaac_from_our_router_advertisement(
    attach_guest: Callable[..., Guestnet], tmp_path: Path
) -> None:
    api = str(tmp_path / "api.sock")
    gn = attach_guest("--api-socket", api, configure=False)
    guest = gn.guest
    assert guest is not None
    guest.run(["ip", "link", "set", "eth0", "up"])
    _wait_slaac(guest)
    addrs = _ip6(guest, "addr", "show", "dev", "eth0")
    assert re.search(rf"inet6 {re.escape(SLAAC_ADDR)}/64 scope global dynamic", addrs), addrs
    route = _ip6(guest, "route", "show", "default")
    assert f"default via {ROUTER_LL} dev eth0 proto ra" in route, route
    # MTU option: the guest's route MTU follows guestnet's (the default 65520).
    assert "mtu 65520" in guest.run(["ip", "link", "show", "eth0"], check=False).stdout
    proc = _ping6(guest, "fd00::2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 received" in proc.stdout
    # The router's link-local address answers too, and the DNS address.
    assert _ping6(guest, f"{ROUTER_LL}%eth0").returncode == 0
    assert _ping6(guest, "fd00::3").returncode == 0
    # The guest learned guestnet's MAC for the gateway through neighbour discovery.
    neigh = _ip6(guest, "neigh", "show", "fd00::2")
    assert "lladdr 52:55:0a:00:02:02" in neigh and "router" in neigh, neigh
    # /stats: the guest's addresses learned on its link, and the IPv6 counters.
    status, stats = request(api, "GET", "/stats")
    assert status == 200, stats
    (link,) = stats["links"]
    # (Its link-local address may still be tentative, and unused, at this point.)
    assert SLAAC_ADDR in link["guest_ip6"], (link, _ip6(guest, "addr"))
    drops = stats["drops"]
    # The guest's RS may not have gone out yet: the RA greeting its first IPv6 packet came first.
    adverts = drops.get("ndp.ra.solicited", 0) + drops.get("ndp.ra.unsolicited", 0)
    assert adverts >= 1 and drops.get("ndp.na.sent", 0) >= 1, drops
    assert drops.get("icmp6.echo.answered", 0) >= 3, drops


def test_configure_sets_address_and_route(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest()
    guest = gn.guest
    assert guest is not None
    addrs = _ip6(guest, "addr", "show", "dev", "eth0")
    assert "inet6 fd00::15/64 scope global" in addrs, addrs
    assert "via fd00::2" in _ip6(guest, "route", "show", "default")
    proc = _ping6(guest, "fd00::2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # DNS over IPv6 reaches the DNS service (a built-in name, no upstream needed).
    dig = guest.run(
        ["dig", "+short", "+time=2", "+tries=2", "@fd00::3", "host.guestnet.internal", "A"],
        check=False,
    )
    assert dig.stdout.strip() == "10.0.2.2", dig.stdout + dig.stderr


def test_run_configures_ipv6_and_resolv_conf(sandbox: Netns) -> None:
    script = (
        "ip -6 addr show dev eth0; cat /etc/resolv.conf; "
        "for i in 1 2 3 4 5; do ping -6 -c1 -W1 fd00::2 && exit 0; done; exit 1"
    )
    proc = sandbox.run(guestnet_argv(["run", "--", "sh", "-c", script]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inet6 fd00::15/64" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("nameserver")]
    assert lines == ["nameserver 10.0.2.3", "nameserver fd00::3"], proc.stdout


def test_run_without_ipv6(sandbox: Netns) -> None:
    script = "ip -6 addr show dev eth0 scope global; cat /etc/resolv.conf"
    proc = sandbox.run(guestnet_argv(["run", "--no-ipv6", "--", "sh", "-c", script]), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "fd00::15" not in proc.stdout and "nameserver fd00::3" not in proc.stdout


def test_capture_shows_well_formed_ndp(
    attach_guest: Callable[..., Guestnet], tmp_path: Path
) -> None:
    pcap = tmp_path / "ndp.pcap"
    gn = attach_guest("--pcap", str(pcap), configure=False)
    guest = gn.guest
    assert guest is not None
    guest.run(["ip", "link", "set", "eth0", "up"])
    _wait_slaac(guest)
    assert _ping6(guest, "fd00::2").returncode == 0
    gn.stop()
    fields = ["frame.number", "ipv6.src", "ipv6.dst", "ipv6.hlim", "icmpv6.type"]
    out = subprocess.run(
        [
            "tshark", "-r", str(pcap),
            "-Y", "icmpv6", "-T", "json", "-e", "_ws.malformed", "-e", "_ws.expert.message",
            "-e", "icmpv6.checksum.status", *(x for f in fields for x in ("-e", f)),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    packets = [p["_source"]["layers"] for p in json.loads(out.stdout or "[]")]
    ours = [p for p in packets if p.get("ipv6.src", [""])[0] in (ROUTER_LL, "fd00::2")]
    types = {int(p["icmpv6.type"][0]) for p in ours}
    assert {134, 136, 129} <= types, (types, out.stderr)
    for p in ours:
        assert "_ws.malformed" not in p, p
        assert p.get("icmpv6.checksum.status") == ["1"], p  # 1: good
        assert not p.get("_ws.expert.message"), p
        if int(p["icmpv6.type"][0]) in (134, 136):
            assert p["ipv6.hlim"] == ["255"], p
    ra = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "icmpv6.type == 134", "-V"],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    for text in (
        "Prefix: fd00::",
        "Recursive DNS Servers: fd00::3",
        "MTU: 65520",
        "Managed address configuration: Set",
        "Other configuration: Set",
    ):
        assert text in ra, (text, ra[:3000])


def test_large_echo_fragmented_both_ways(attach_guest: Callable[..., Guestnet]) -> None:
    """At MTU 1500 a 4000-byte echo goes out in fragments, is reassembled, and the reply comes
    back in fragments the guest kernel reassembles."""
    gn = attach_guest("--mtu", "1500")
    guest = gn.guest
    assert guest is not None
    assert _ping6(guest, "fd00::2").returncode == 0
    proc = guest.run(["ping", "-6", "-c2", "-W2", "-s", "4000", "fd00::2"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4008 bytes from fd00::2" in proc.stdout, proc.stdout
