"""Real DHCP clients against guestnet's server: busybox udhcpc and ISC dhclient.

guestnet runs in a loopback-only sandbox namespace (the ``attach_guest`` fixture) and serves a
TAP in the guest namespace, left down (no ``--configure``) for the client to configure. Each
client runs with an event script of ours that records what the client was told (its environment)
and configures the interface the way a distribution's script would. Every client process is
bounded in time and killed at teardown with the guest namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, addresses, link_info, poke_cmd, wait_for

pytestmark = pytest.mark.root

BUSYBOX = shutil.which("busybox")
DHCLIENT = shutil.which("dhclient")

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event script for tests: configure on bind; then record the event and what the server
# said, in one append after configuring, so a test that sees an event sees all of it and its
# effect on the interface.
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "$router" dev "$interface"
    ;;
  deconfig)
    ip addr flush dev "$interface"
    ;;
esac
{{
  echo "event=$1"
  for v in ip subnet mask router dns domain search mtu lease serverid; do
    eval "echo $v=\\$$v"
  done
}} > {log}.$$
cat {log}.$$ >> {log}
rm -f {log}.$$
exit 0
"""

DHCLIENT_SCRIPT = """#!/bin/sh
# dhclient-script for tests: configure on bind; then record the reason and the new_* options, in
# one append after configuring (a test that sees an event sees all of it and its effect).
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT)
    ip link set dev "$interface" up
    [ -n "$new_interface_mtu" ] && ip link set dev "$interface" mtu "$new_interface_mtu"
    ip addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    [ -n "$new_routers" ] && ip route replace default via "$new_routers" dev "$interface"
    ;;
  PREINIT)
    ip link set dev "$interface" up
    ;;
  EXPIRE|FAIL|RELEASE|STOP)
    ip addr flush dev "$interface"
    ;;
esac
{{
  echo "reason=$reason"
  env | grep -E '^new_' | sort
}} > {log}.$$
cat {log}.$$ >> {log}
rm -f {log}.$$
exit 0
"""

DHCLIENT_CONF = """
send host-name "gn-dhclient";
request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers,
        domain-search, interface-mtu;
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


def _script(tmp_path: Path, name: str, template: str) -> tuple[Path, Path]:
    log = tmp_path / f"{name}.log"
    log.touch()
    script = tmp_path / f"{name}.sh"
    script.write_text(template.format(log=log))
    script.chmod(0o755)
    return script, log


def _guest(gn: Guestnet, mac: str = "52:54:00:12:34:56") -> Netns:
    """The guest namespace, once guestnet has given the TAP its MAC.

    guestnet creates the TAP first and sets its MAC and MTU after: a client started in between
    would send from the kernel's random MAC and then from the right one.
    """
    guest = gn.guest
    assert guest is not None

    def has_mac() -> bool:
        info = link_info(guest, gn.ifname)
        return info is not None and info.get("address") == mac

    wait_for(has_mac, 10, f"the guest interface to get MAC {mac}")
    return guest


# ----------------------------------------------------------------------------------- udhcpc


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_udhcpc_gets_lease_and_options(
    attach_guest: Callable[..., Guestnet], tmp_path: Path
) -> None:
    gn = attach_guest(
        "--dns-search", "corp.example.com", "--dns-search", "example.org", "--mtu", "9000",
        configure=False,
    )  # fmt: skip
    guest = _guest(gn)
    script, log = _script(tmp_path, "udhcpc", UDHCPC_SCRIPT)
    guest.run(["ip", "link", "set", "eth0", "up"])
    proc = guest.run(
        [str(BUSYBOX), "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
         "-s", str(script), "-x", "hostname:bbguest", "-O", "search", "-O", "mtu"],
        check=False, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = parse_events(log.read_text(), "event")
    bound = [e for e in events if e["event"] == "bound"]
    assert len(bound) == 1, events
    lease = bound[0]
    assert lease["ip"] == "10.0.2.15"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == "10.0.2.2"
    assert lease["dns"] == "10.0.2.3"
    assert lease["serverid"] == "10.0.2.2"
    assert lease["lease"] == "3600"
    assert lease["domain"] == "corp.example.com"
    assert lease["search"].split() == ["corp.example.com", "example.org"]
    assert lease["mtu"] == "9000"
    assert addresses(guest) == ["10.0.2.15/24"]
    # The configured guest reaches the gateway: the kernel ARPs for it and guestnet answers.
    guest.run(poke_cmd("10.0.2.2"))
    assert gn.alive(), gn.stderr_text()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_udhcpc_second_mac_gets_another_address(
    attach_guest: Callable[..., Guestnet], tmp_path: Path
) -> None:
    """A guest that comes back with a new MAC (a VM rebooted with another NIC) gets the next free
    address, while the first MAC's lease stays its own."""
    gn = attach_guest(configure=False)
    guest = _guest(gn)
    script, log = _script(tmp_path, "udhcpc", UDHCPC_SCRIPT)
    udhcpc = [str(BUSYBOX), "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1",
              "-s", str(script)]  # fmt: skip
    guest.run(["ip", "link", "set", "eth0", "up"])
    first = guest.run(udhcpc, check=False, timeout=30)
    assert first.returncode == 0, first.stderr
    guest.run(["ip", "link", "set", "eth0", "down"])
    guest.run(["ip", "link", "set", "eth0", "address", "52:54:00:00:0a:0b"])
    guest.run(["ip", "link", "set", "eth0", "up"])
    second = guest.run(udhcpc, check=False, timeout=30)
    assert second.returncode == 0, second.stderr
    bound = [e["ip"] for e in parse_events(log.read_text(), "event") if e["event"] == "bound"]
    assert bound == ["10.0.2.15", "10.0.2.16"]
    assert addresses(guest) == ["10.0.2.16/24"]
    # The new MAC reaches the gateway too: guestnet learned the new source MAC on its port.
    guest.run(poke_cmd("10.0.2.2"))
    assert gn.alive(), gn.stderr_text()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_udhcpc_broadcast_flag_and_static_lease(
    attach_guest: Callable[..., Guestnet], tmp_path: Path
) -> None:
    mac = "52:54:00:aa:bb:cc"
    gn = attach_guest("--guest-mac", mac, "--dhcp-static", f"{mac}=10.0.2.77", configure=False)
    guest = _guest(gn, mac)
    script, log = _script(tmp_path, "udhcpc", UDHCPC_SCRIPT)
    guest.run(["ip", "link", "set", "eth0", "up"])
    proc = guest.run(
        [str(BUSYBOX), "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-B", "-t", "5", "-T", "1",
         "-s", str(script)],
        check=False, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bound = [e for e in parse_events(log.read_text(), "event") if e["event"] == "bound"]
    assert [e["ip"] for e in bound] == ["10.0.2.77"]
    assert addresses(guest) == ["10.0.2.77/24"]


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_udhcpc_renews_and_releases(
    attach_guest: Callable[..., Guestnet],
    tmp_path: Path,
    client_procs: list[subprocess.Popen[bytes]],
) -> None:
    # A 16 s lease (udhcpc's smallest): it renews, unicast to the server, after 8 s.
    gn = attach_guest("--lease-time", "16", configure=False)
    guest = _guest(gn)
    script, log = _script(tmp_path, "udhcpc", UDHCPC_SCRIPT)
    guest.run(["ip", "link", "set", "eth0", "up"])
    proc = guest.popen(
        [str(BUSYBOX), "udhcpc", "-i", "eth0", "-f", "-R", "-t", "5", "-T", "1",
         "-s", str(script)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client_procs.append(proc)

    def renewed() -> bool:
        return any(e["event"] == "renew" for e in parse_events(log.read_text(), "event"))

    wait_for(renewed, 30, "udhcpc to renew")
    events = parse_events(log.read_text(), "event")
    assert all(e["ip"] == "10.0.2.15" for e in events if e["event"] in ("bound", "renew"))
    assert not any(e["event"] == "leasefail" for e in events)
    # SIGTERM with -R: udhcpc releases the lease and deconfigures.
    proc.terminate()
    proc.wait(timeout=10)
    assert addresses(guest) == []
    assert gn.alive(), gn.stderr_text()


# ---------------------------------------------------------------------------------- dhclient


def _dhclient_argv(tmp_path: Path, script: Path, *extra: str) -> list[str]:
    conf = tmp_path / "dhclient.conf"
    conf.write_text(DHCLIENT_CONF)
    return [
        str(DHCLIENT), "-4", "-v", "-cf", str(conf), "-sf", str(script),
        "-lf", str(tmp_path / "dhclient.leases"), "-pf", str(tmp_path / "dhclient.pid"),
        *extra, "eth0",
    ]  # fmt: skip


@pytest.mark.skipif(DHCLIENT is None, reason="dhclient not installed (isc-dhcp-client)")
def test_dhclient_bound_reboot_release(
    attach_guest: Callable[..., Guestnet],
    tmp_path: Path,
    client_procs: list[subprocess.Popen[bytes]],
) -> None:
    gn = attach_guest("--dns-search", "lab.example.net", configure=False)
    guest = _guest(gn)
    script, log = _script(tmp_path, "dhclient", DHCLIENT_SCRIPT)

    def reasons() -> list[dict[str, str]]:
        return parse_events(log.read_text(), "reason")

    def has(reason: str) -> Callable[[], bool]:
        return lambda: any(e["reason"] == reason for e in reasons())

    # First run: DISCOVER / OFFER / REQUEST / ACK.
    proc = guest.popen(
        _dhclient_argv(tmp_path, script, "-d", "-1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client_procs.append(proc)
    wait_for(has("BOUND"), 20, "dhclient to bind")
    (bound,) = [e for e in reasons() if e["reason"] == "BOUND"]
    assert bound["new_ip_address"] == "10.0.2.15"
    assert bound["new_subnet_mask"] == "255.255.255.0"
    assert bound["new_routers"] == "10.0.2.2"
    assert bound["new_domain_name_servers"] == "10.0.2.3"
    assert bound["new_domain_name"] == "lab.example.net"
    assert bound["new_domain_search"] == "lab.example.net."
    assert bound["new_interface_mtu"] == "65520"
    assert bound["new_dhcp_lease_time"] == "3600"
    assert bound["new_dhcp_server_identifier"] == "10.0.2.2"
    assert addresses(guest) == ["10.0.2.15/24"]

    # Stop without releasing (-x), then start again: INIT-REBOOT from the lease file.
    guest.run(_dhclient_argv(tmp_path, script, "-x"), timeout=20)
    proc.wait(timeout=10)
    proc = guest.popen(
        _dhclient_argv(tmp_path, script, "-d", "-1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client_procs.append(proc)
    wait_for(has("REBOOT"), 20, "dhclient to reboot into its lease")
    (reboot,) = [e for e in reasons() if e["reason"] == "REBOOT"]
    assert reboot["new_ip_address"] == "10.0.2.15"

    # Release (-r): the running client is stopped and a DHCPRELEASE sent.
    guest.run(_dhclient_argv(tmp_path, script, "-r"), timeout=20)
    proc.wait(timeout=10)
    assert any(e["reason"] == "RELEASE" for e in reasons())
    assert addresses(guest) == []
    assert gn.alive(), gn.stderr_text()
    assert os.path.exists(tmp_path / "dhclient.leases")
