"""Real DHCPv6 clients against guestnet's server: busybox ``udhcpc6``, ISC ``dhclient -6`` and
``dhcpcd`` (which, as distributions run it, follows our RA's M flag into DHCPv6 by itself).

guestnet runs in the loopback-only sandbox and serves a TAP in the guest namespace, attached
without ``--configure``: the guest brings the link up, waits for its link-local address to leave
DAD (a client cannot bind port 546 on a tentative address), and runs the client with an event
script of ours that records what the client was told and adds the address as a distribution's
script would. Client processes are bounded in time and killed at teardown.

``udhcpc6`` is not in Debian's busybox builds (bookworm's 1.35 has only udhcpc); the tests use
``udhcpc6`` from PATH or a busybox that has the applet, and are skipped without one; dhcpcd
(Debian's dhcpcd-base) stands in as the second real client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, link_info, wait_for

pytestmark = pytest.mark.root

BUSYBOX = shutil.which("busybox")
DHCLIENT = shutil.which("dhclient")
DHCPCD = shutil.which("dhcpcd")
#: Where dhcpcd keeps its DUID and leases (on the host file system: removed after the test).
DHCPCD_DB = Path("/var/lib/dhcpcd")
MAC1 = "52:54:00:12:34:56"
MAC2 = "52:54:00:00:0a:0b"


def _udhcpc6() -> list[str] | None:
    """How to run udhcpc6 here: a binary on PATH, or a busybox with the applet, or None."""
    path = shutil.which("udhcpc6")
    if path is not None:
        return [path]
    if BUSYBOX is not None:
        listing = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=False)
        if "udhcpc6" in listing.stdout.split():
            return [BUSYBOX, "udhcpc6"]
    return None


UDHCPC6 = _udhcpc6()

UDHCPC6_SCRIPT = """#!/bin/sh
# udhcpc6 event script for tests: add the address on bind, then record the event and what the
# server said, in one append after configuring.
case "$1" in
  bound|renew)
    ip -6 addr replace "$ipv6/128" dev "$interface"
    ;;
esac
{{
  echo "event=$1"
  for v in ipv6 lease dns search; do
    eval "echo $v=\\$$v"
  done
}} > {log}.$$
cat {log}.$$ >> {log}
rm -f {log}.$$
exit 0
"""

DHCLIENT6_SCRIPT = """#!/bin/sh
# dhclient-script for tests (-6): add the address on bind, remove it on release; then record the
# reason and the new_*/old_* values, in one append after configuring.
case "$reason" in
  BOUND6|RENEW6|REBIND6|REBOOT6)
    ip -6 addr replace "$new_ip6_address/$new_ip6_prefixlen" dev "$interface"
    ;;
  RELEASE6|EXPIRE6|STOP6)
    [ -n "$old_ip6_address" ] &&
      ip -6 addr del "$old_ip6_address/$old_ip6_prefixlen" dev "$interface"
    ;;
esac
{{
  echo "reason=$reason"
  env | grep -E '^(new|old)_' | sort
}} > {log}.$$
cat {log}.$$ >> {log}
rm -f {log}.$$
exit 0
"""

DHCLIENT6_CONF = """
request dhcp6.name-servers, dhcp6.domain-search;
"""


def parse_events(text: str, key: str) -> list[dict[str, str]]:
    """Split a script log into one dict per event; an event starts at a ``key=`` line."""
    events: list[dict[str, str]] = []
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        if name == key:
            events.append({})
        if events:
            events[-1][name] = value.strip("'")
    return events


def addresses6(ns: Netns, ifname: str = "eth0") -> list[str]:
    """Global IPv6 addresses on ``ifname`` as ``ADDR/PREFIX`` (SLAAC's among them)."""
    proc = ns.run(["ip", "-j", "-6", "addr", "show", "dev", ifname, "scope", "global"])
    out: list[str] = []
    for link in json.loads(proc.stdout or "[]"):
        # ip's JSON has entries without an address (other families' lifetimes): skipped.
        out.extend(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if "local" in a)
    return out


def _link_local_ready(ns: Netns, ifname: str = "eth0") -> bool:
    proc = ns.run(["ip", "-j", "-6", "addr", "show", "dev", ifname, "scope", "link"])
    infos = [
        a for link in json.loads(proc.stdout or "[]") for a in link["addr_info"] if "local" in a
    ]
    return bool(infos) and not any(a.get("tentative") for a in infos)


def _up(gn: Guestnet, mac: str = MAC1) -> Netns:
    """The guest namespace with its interface up (MAC set by guestnet) and link-local usable."""
    guest = gn.guest
    assert guest is not None

    def has_mac() -> bool:
        info = link_info(guest, gn.ifname)
        return info is not None and info.get("address") == mac

    wait_for(has_mac, 10, f"the guest interface to get MAC {mac}")
    guest.run(["ip", "link", "set", gn.ifname, "up"])
    wait_for(lambda: _link_local_ready(guest, gn.ifname), 10, "the link-local address")
    return guest


def _new_mac(guest: Netns, mac: str) -> None:
    """Another NIC, as a rebooted VM might have: new MAC, hence new link-local and DUID."""
    guest.run(["ip", "link", "set", "eth0", "down"])
    guest.run(["ip", "link", "set", "eth0", "address", mac])
    guest.run(["ip", "link", "set", "eth0", "up"])
    wait_for(lambda: _link_local_ready(guest), 10, "the new link-local address")


def _script(tmp_path: Path, name: str, template: str) -> tuple[Path, Path]:
    log = tmp_path / f"{name}.log"
    log.touch()
    script = tmp_path / f"{name}.sh"
    script.write_text(template.format(log=log))
    script.chmod(0o755)
    return script, log


@pytest.fixture
def client_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Client processes a test starts; killed at teardown whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _same(a: str, b: str) -> bool:
    return ipaddress.IPv6Address(a) == ipaddress.IPv6Address(b)


# ---------------------------------------------------------------------------------- udhcpc6


@pytest.mark.skipif(UDHCPC6 is None, reason="no udhcpc6 (Debian's busybox is built without it)")
def test_udhcpc6_lease_and_next_address(
    attach_guest: Callable[..., Guestnet], tmp_path: Path
) -> None:
    assert UDHCPC6 is not None
    gn = attach_guest("--dns-search", "corp.example", configure=False)
    guest = _up(gn)
    script, log = _script(tmp_path, "udhcpc6", UDHCPC6_SCRIPT)
    argv = [*UDHCPC6, "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script),
            "-O", "dns", "-O", "search"]  # fmt: skip
    first = guest.run(argv, check=False, timeout=30)
    assert first.returncode == 0, first.stderr
    (bound,) = [e for e in parse_events(log.read_text(), "event") if e["event"] == "bound"]
    assert _same(bound["ipv6"], "fd00::15")
    assert _same(bound["dns"], "fd00::3")
    assert bound["search"] == "corp.example"
    assert bound["lease"] == "3600"
    assert "fd00::15/128" in addresses6(guest)
    # A second client (another MAC, so another DUID-LL) gets the next address, while the first
    # lease (not released: -q without -R) stays its owner's.
    _new_mac(guest, MAC2)
    second = guest.run(argv, check=False, timeout=30)
    assert second.returncode == 0, second.stderr
    bound_ips = [e["ipv6"] for e in parse_events(log.read_text(), "event") if e["event"] == "bound"]
    assert [str(ipaddress.IPv6Address(ip)) for ip in bound_ips] == ["fd00::15", "fd00::16"]
    assert gn.alive(), gn.stderr_text()


# --------------------------------------------------------------------------------- dhclient


def _dhclient6_argv(tmp_path: Path, script: Path, leases: str, *extra: str) -> list[str]:
    conf = tmp_path / "dhclient6.conf"
    conf.write_text(DHCLIENT6_CONF)
    return [
        str(DHCLIENT), "-6", "-v", "-D", "LL", "-cf", str(conf), "-sf", str(script),
        "-lf", str(tmp_path / leases), "-pf", str(tmp_path / "dhclient6.pid"), *extra, "eth0",
    ]  # fmt: skip


@pytest.mark.skipif(DHCLIENT is None, reason="dhclient not installed (isc-dhcp-client)")
def test_dhclient6_bound_confirm_release_next(
    attach_guest: Callable[..., Guestnet],
    tmp_path: Path,
    client_procs: list[subprocess.Popen[bytes]],
) -> None:
    gn = attach_guest("--dns-search", "lab.example.net", configure=False)
    guest = _up(gn)
    script, log = _script(tmp_path, "dhclient6", DHCLIENT6_SCRIPT)

    def reasons() -> list[dict[str, str]]:
        return parse_events(log.read_text(), "reason")

    def count(reason: str) -> int:
        return sum(e["reason"] == reason for e in reasons())

    def start(leases: str) -> None:
        proc = guest.popen(
            _dhclient6_argv(tmp_path, script, leases, "-d", "-1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client_procs.append(proc)

    # Solicit / Advertise / Request / Reply.
    start("first.leases")
    wait_for(lambda: count("BOUND6") == 1, 20, "dhclient -6 to bind")
    (bound,) = [e for e in reasons() if e["reason"] == "BOUND6"]
    assert bound["new_ip6_address"] == "fd00::15"
    assert bound["new_dhcp6_name_servers"] == "fd00::3"
    assert bound["new_dhcp6_domain_search"] == "lab.example.net."
    assert bound["new_dhcp6_server_id"] == "0:3:0:1:52:55:a:0:2:2"
    assert bound["new_max_life"] == "3600"
    assert bound["new_renew"] == "1800"
    assert bound["new_rebind"] == "2880"
    assert "fd00::15/128" in addresses6(guest)

    # Stop without releasing (-x), start again from the lease file: Confirm, then bound again.
    guest.run(_dhclient6_argv(tmp_path, script, "first.leases", "-x"), timeout=20)
    start("first.leases")
    wait_for(lambda: count("BOUND6") + count("REBOOT6") == 2, 20, "dhclient -6 to confirm")
    assert [e["new_ip6_address"] for e in reasons() if e["reason"] in ("BOUND6", "REBOOT6")] == [
        "fd00::15", "fd00::15",
    ]  # fmt: skip

    # Release (-r): the running client is stopped and a Release sent; the address goes.
    guest.run(_dhclient6_argv(tmp_path, script, "first.leases", "-r"), timeout=20)
    wait_for(lambda: count("RELEASE6") == 1, 10, "dhclient -6 to release")
    assert "fd00::15/128" not in addresses6(guest)

    # Bound again, then a second client (another MAC: another DUID-LL) gets the next address.
    start("first.leases")
    wait_for(lambda: count("BOUND6") + count("REBOOT6") == 3, 20, "dhclient -6 to bind again")
    guest.run(_dhclient6_argv(tmp_path, script, "first.leases", "-x"), timeout=20)
    _new_mac(guest, MAC2)
    start("second.leases")
    wait_for(lambda: count("BOUND6") + count("REBOOT6") == 4, 20, "a second client to bind")
    last = [e for e in reasons() if e["reason"] in ("BOUND6", "REBOOT6")][-1]
    assert last["new_ip6_address"] == "fd00::16"
    assert gn.alive(), gn.stderr_text()


@pytest.mark.skipif(DHCPCD is None, reason="dhcpcd not installed (dhcpcd-base)")
def test_dhcpcd_follows_the_ra_into_dhcpv6(
    attach_guest: Callable[..., Guestnet], client_procs: list[subprocess.Popen[bytes]]
) -> None:
    """dhcpcd sees the RA's M flag, solicits, and adds fd00::15/128 with our lifetimes."""
    assert DHCPCD is not None
    before = set(DHCPCD_DB.iterdir()) if DHCPCD_DB.exists() else set()
    gn = attach_guest(configure=False)
    guest = _up(gn)
    proc = guest.popen(
        [DHCPCD, "-6", "-B", "-d", "-f", "/dev/null", "--nohook", "resolv.conf", "eth0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client_procs.append(proc)
    try:
        wait_for(lambda: "fd00::15/128" in addresses6(guest), 20, "dhcpcd to add fd00::15")
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for path in set(DHCPCD_DB.iterdir()) - before if DHCPCD_DB.exists() else ():
            path.unlink(missing_ok=True)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    assert "fd00::15/128 from fe80::5055:aff:fe00:202" in out, out
    assert "renew in 1800, rebind in 2880, expire in 3600 seconds" in out, out
    assert gn.alive(), gn.stderr_text()
