"""A real Linux guest (Debian kernel, busybox) under QEMU TCG, attached to guestnet.

Each test starts guestnet in a loopback-only sandbox namespace, boots the guest over one QEMU
netdev (stream or dgram), lets the guest's script run, and asserts on what the guest printed on its
console.
The first test is ARP: the guest's neighbour table must hold guestnet's gateway MAC.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vm.fixtures import VmImage, vm_image, vm_sock_dir  # noqa: F401
from vm.qemu import guestnet_vm

pytestmark = [pytest.mark.root, pytest.mark.vm]

GATEWAY_MAC = "52:55:0a:00:02:02"
VM_TIMEOUT_S = 60.0

# Static address, one ping to make the guest ARP for the gateway (the echo itself may go
# unanswered), then the neighbour table.
ARP_SCRIPT = """
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
ping -c 1 -W 1 10.0.2.2
section neigh ip neigh show
"""


@pytest.mark.parametrize("mode", ["qemu", "dgram"], ids=["stream", "dgram"])
def test_guest_learns_gateway_mac(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    with guestnet_vm(vm_image, mode, tmp_path, vm_sock_dir) as gv:
        result = gv.boot(ARP_SCRIPT, timeout_s=VM_TIMEOUT_S)
    neigh = result.section("neigh")
    assert re.search(rf"^10\.0\.2\.2 dev eth0 lladdr {GATEWAY_MAC}\b", neigh, re.MULTILINE), (
        result.describe()
    )
