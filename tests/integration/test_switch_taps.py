"""Several ``--tap`` on one guestnet (issue 15): each TAP a port of the switch.

guestnet makes two TAPs in its own (sandbox) namespace, ``--tap A --tap B``; the test moves each
into a namespace of its own, where the guest brings it up and asks DHCP for an address (its
own lease by its random MAC) and the kernel configures IPv6 by SLAAC from guestnet's router
advertisement. The guests then reach each other through guestnet over IPv4 and IPv6, and move
64 MiB of TCP both ways and a UDP_SEGMENT send of nine datagrams, content-checked: once with
offloads on both TAPs (super-frames switched whole) and once with ``B:no-offloads``, so that A's
TCP and UDP super-frames must be cut into segments and datagrams by the switch for B
(``switch.gso.segments``) and B's MSS-sized frames reach A as they are.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import Guestnet, Netns, addresses, link_info, make_netns, unique_name, wait_for
from test_switch import NBYTES, _api_get, _ping, _tcp_exact

from guestnet.client import request

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed"),
]

BUSYBOX = shutil.which("busybox") or "busybox"
#: UDP_SEGMENT (linux/udp.h): one send, many datagrams (the kernel hands the TAP one USO frame).
UDP_SEGMENT = 103

#: Sends 8192 bytes to argv[1]:argv[2] with one UDP_SEGMENT send of argv[3]-byte datagrams.
USO_SOURCE = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, {UDP_SEGMENT}, int(sys.argv[3]))
s.sendto(bytes(range(256)) * 32, (sys.argv[1], int(sys.argv[2])))
"""

#: Receives 8192 bytes of datagrams on port argv[1]; prints how many, their sizes, whether
#: they join into what was sent.
USO_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(10)
print("ready", flush=True)
got = []
while sum(map(len, got)) < 8192:
    got.append(s.recv(65536))
print(len(got), sorted({len(d) for d in got}), b"".join(got) == bytes(range(256)) * 32)
"""


@pytest.fixture
def tap_guests() -> Iterator[tuple[Netns, Netns]]:
    """Two guest namespaces; deleted at teardown (their TAPs go with guestnet)."""
    one = make_netns("gnta")
    try:
        two = make_netns("gntb")
        try:
            yield one, two
        finally:
            two.delete()
    finally:
        one.delete()


def _udhcpc_script(tmp_path: Path) -> Path:
    script = tmp_path / "udhcpc.sh"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in bound|renew)\n'
        '  ip -4 addr flush dev "$interface"\n'
        '  ip addr add "$ip/$mask" dev "$interface"\n'
        '  ip route replace default via "$router" dev "$interface";;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return script


def _global6(ns: Netns, ifname: str) -> list[str]:
    """Global IPv6 addresses on ``ifname``, done with duplicate address detection."""
    out = ns.run(["ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "global"]).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if "tentative" not in line]


def _start(
    start_gn: Callable[..., Guestnet],
    sandbox: Netns,
    guests: tuple[Netns, Netns],
    tmp_path: Path,
    second_flags: str = "",
) -> tuple[Guestnet, list[str], list[str]]:
    """guestnet with ``--tap A --tap B{second_flags}``; each TAP moved into its guest,
    brought up and given a DHCP lease. Returns guestnet, the TAP names and the addresses."""
    names = [unique_name("gta"), unique_name("gtb")]
    api = tmp_path / "api.sock"
    args = ["netns", "--tap", names[0], "--tap", names[1] + second_flags, "--mtu", "1500",
            "--api-socket", str(api)]  # fmt: skip

    def ready() -> bool:
        return all(link_info(sandbox, name) is not None for name in names)

    gn = start_gn(args, ready=ready, timeout=20)
    script = _udhcpc_script(tmp_path)
    got = []
    for name, ns in zip(names, guests, strict=True):
        sandbox.run(["ip", "link", "set", name, "netns", ns.name])
        ns.run(["ip", "link", "set", name, "up"])
        ns.run(
            [BUSYBOX, "udhcpc", "-i", name, "-f", "-q", "-n", "-t", "5", "-T", "1",
             "-s", str(script)],
            timeout=30,
        )  # fmt: skip
        (addr,) = addresses(ns, name)
        got.append(addr.split("/")[0])
    return gn, names, got


def _uso(sender: Netns, receiver: Netns, addr: str, port: int) -> str:
    """One UDP_SEGMENT send of 8192 bytes in 1000-byte datagrams; what the receiver got."""
    sink = receiver.popen([sys.executable, "-c", USO_SINK, str(port)], stdout=-1, text=True)
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        sender.run([sys.executable, "-c", USO_SOURCE, addr, str(port), "1000"])
        out, _ = sink.communicate(timeout=15)
        return out.strip()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def _stats(tmp_path: Path) -> dict[str, Any]:
    status, stats = request(str(tmp_path / "api.sock"), "GET", "/stats")
    assert status == 200
    assert isinstance(stats, dict)
    return stats


def test_two_taps_each_a_guest_on_the_switch(
    start_gn: Callable[..., Guestnet],
    sandbox: Netns,
    tap_guests: tuple[Netns, Netns],
    tmp_path: Path,
) -> None:
    one, two = tap_guests
    gn, names, (ip1, ip2) = _start(start_gn, sandbox, tap_guests, tmp_path)
    assert ip1 != ip2
    assert _ping(one, ip2)
    assert _ping(two, ip1)
    # Each TAP is a port named after it, with its guest's lease.
    leases = _api_get(tmp_path / "api.sock", "/leases")
    assert sorted((lease["ip"], lease["port"]) for lease in leases) == sorted(
        zip((ip1, ip2), names, strict=True)
    )
    # IPv6 by SLAAC from guestnet's advertisement, switched between the guests.
    for ns, name in zip(tap_guests, names, strict=True):
        wait_for(lambda ns=ns, name=name: bool(_global6(ns, name)), 15, "a SLAAC address")
    ip6_1 = _global6(one, names[0])[0]
    ip6_2 = _global6(two, names[1])[0]
    assert _ping(one, ip6_2)
    assert _ping(two, ip6_1)
    _tcp_exact(one, two, ip2, 5011)
    _tcp_exact(two, one, ip6_1, 5012)
    assert _uso(one, two, ip2, 5015) == "9 [192, 1000] True"
    drops = _stats(tmp_path)["drops"]
    assert drops.get("switch.unicast", 0) > 0
    assert drops.get("switch.gso.segments", 0) == 0  # both take super-frames whole
    assert gn.alive


def test_tcp_between_a_tap_with_offloads_and_one_without(
    start_gn: Callable[..., Guestnet],
    sandbox: Netns,
    tap_guests: tuple[Netns, Netns],
    tmp_path: Path,
) -> None:
    """A's kernel sends TCP super-frames; B's TAP takes none: the switch segments them."""
    one, two = tap_guests
    gn, names, (ip1, ip2) = _start(start_gn, sandbox, tap_guests, tmp_path, ":no-offloads")
    # A UDP_SEGMENT send: A's kernel hands over one USO super-frame, cut into datagrams here.
    assert _uso(one, two, ip2, 5016) == "9 [192, 1000] True"
    assert _stats(tmp_path)["drops"].get("switch.gso.segments", 0) >= 9
    _tcp_exact(one, two, ip2, 5013)
    _tcp_exact(two, one, ip1, 5014)
    drops = _stats(tmp_path)["drops"]
    # At least one segment per MSS of what A sent B went through the software segmentation.
    assert drops.get("switch.gso.segments", 0) > NBYTES // 1448 // 4
    counted = {key for key in drops if key.startswith("switch.gso.")}
    assert counted == {"switch.gso.segments", "switch.gso.segmented"}  # no drop among them
    links = {link["name"]: link for link in _stats(tmp_path)["links"]}
    assert set(names) <= set(links)
    assert gn.alive
