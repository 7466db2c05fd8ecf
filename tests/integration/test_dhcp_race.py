"""Issue 9 (a): a guest that brings its interface up the moment it appears gets its first offer.

A guest's DHCP client may start as soon as the TAP shows up in its namespace (udev, a hotplug
script, a container runtime). If the interface were ever visible there with a MAC other than its
final one, the kernel's first frames (IPv6 MLD and router solicitations) and the client's first
DISCOVER would carry that MAC, and the change to the guest MAC would then cost the client its
offer: a DHCPNAK, and the next address (10.0.2.16) instead of 10.0.2.15.

Each round starts a watcher in the guest namespace *before* guestnet, which sets ``eth0`` up as
soon as it exists and runs busybox udhcpc on it at once; then guestnet attaches the namespace
(no ``--configure``). Every round must end with 10.0.2.15 and no NAK. Every process is bounded
in time and stopped at the end of its round; the namespaces go with the fixtures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import pytest
from nsutil import Guestnet, Netns, link_info, wait_for

pytestmark = pytest.mark.root

BUSYBOX = shutil.which("busybox")
ROUNDS = 30
GUEST_MAC = "52:54:00:12:34:56"

#: Poll until eth0 can be set up (at most ~MAX_POLLS tries), then ask for a lease at once.
#: udhcpc: -n exit if no lease, -q exit once bound, -t/-T three discovers one second apart.
_WATCHER = """
i=0
until ip link set eth0 up 2>/dev/null; do
  i=$((i+1))
  if [ "$i" -gt 3000 ]; then echo "eth0 never appeared"; exit 9; fi
done
ip -o link show dev eth0
exec {busybox} udhcpc -i eth0 -f -q -n -t 3 -T 1 -s /bin/true 2>&1
"""


def _one_round(sandbox: Netns, guest: Netns, start_gn: Callable[..., Guestnet]) -> str:
    """One race; udhcpc's output (the lease and any NAK are in it)."""
    watcher = guest.popen(
        ["sh", "-c", _WATCHER.format(busybox=BUSYBOX)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    gn = None
    try:
        gn = start_gn(["netns", guest.path])
        out, _ = watcher.communicate(timeout=30)
        return out
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(timeout=5)
        if gn is not None:
            assert gn.stop() == 0, gn.stderr_text()
            # The TAP goes with guestnet's fd: the next round starts from no eth0 at all.
            wait_for(lambda: link_info(guest) is None, 5.0, "the TAP to disappear")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_dhcp_client_racing_the_tap_gets_first_address(
    sandbox: Netns, guest_ns: Netns, start_gn: Callable[..., Guestnet]
) -> None:
    outcomes: list[str] = []
    for _ in range(ROUNDS):
        out = _one_round(sandbox, guest_ns, start_gn)
        # The interface was first seen (by `ip -o link show`) with its final MAC and MTU already.
        mac = re.search(r"link/ether (\S+)", out)
        mtu = re.search(r" mtu (\d+) ", out)
        lease = re.search(r"lease of (\S+) obtained", out)
        outcomes.append(
            f"mac={mac.group(1) if mac else None} mtu={mtu.group(1) if mtu else None}"
            f" lease={lease.group(1) if lease else None}{' NAK' if 'NAK' in out else ''}"
        )
    bad = [o for o in outcomes if o != f"mac={GUEST_MAC} mtu=65520 lease=10.0.2.15"]
    assert not bad, f"{len(bad)} of {ROUNDS} rounds went wrong: {outcomes}"
