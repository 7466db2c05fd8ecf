"""TAP offloads end to end: the guest kernel's TCP super-frames through guestnet, both ways.

The transfers and servers are test_tcp_nat.py's (64 MiB, sha256 on both ends, optional 2% random
loss both ways with nftables in the guest). What this file adds is proof that offloads were in
use and that nothing was dropped for it: the guest interface's own counters show frames far
larger than the MTU both ways (super-frames: TSO from the guest, GSO frames from guestnet), and
guestnet's counters show no checksum drops (the guest's IPv4 header checksum is whole in a
super-frame; its TCP checksum is partial and never verified). ``--no-offloads`` is checked to
give plain MTU-sized frames and the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import test_tcp_nat
from nsutil import Guestnet, Netns, wait_for
from test_tcp_nat import MIB, _add_loss, _guest, _transfer_both_ways

from guestnet.client import request

pytestmark = pytest.mark.root

#: The host-side server fixture of test_tcp_nat.py, used here under the same name.
server = test_tcp_nat.server

_STATS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")


def _eth0(ns: Netns) -> dict[str, int]:
    paths = [f"/sys/class/net/eth0/statistics/{name}" for name in _STATS]
    out = ns.run(["cat", *paths]).stdout.split()
    return dict(zip(_STATS, map(int, out), strict=True))


def _drops(api: str) -> dict[str, int]:
    status, body = request(api, "GET", "/stats")
    assert status == 200, body
    drops: dict[str, int] = body["drops"]
    return drops


def _run(attach_guest: Any, server: Any, tmp_path: Path, mtu: int, loss: int, *extra: str) -> Any:
    """64 MiB each way; returns the mean frame size (bytes) the guest sent and received."""
    api = str(tmp_path / "api.sock")
    gn: Guestnet = attach_guest("--mtu", str(mtu), "--api-socket", api, *extra)
    wait_for(lambda: os.path.exists(api), 10, "the API socket")
    guest = _guest(gn)
    if loss:
        _add_loss(guest, loss)
    before = _eth0(guest)
    _transfer_both_ways(gn, server, 64 * MIB, timeout=180)
    after = _eth0(guest)
    d = {k: after[k] - before[k] for k in _STATS}
    drops = _drops(api)
    bad = {k: v for k, v in drops.items() if "checksum" in k or k.startswith(("eth.", "ipv4."))}
    assert not bad, f"{bad}\n{gn.stderr_text()}"
    return d["tx_bytes"] / d["tx_packets"], d["rx_bytes"] / d["rx_packets"], drops


@pytest.mark.parametrize("loss", [0, 2])
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_exact_transfers_with_offloads(
    attach_guest: Any, server: Any, tmp_path: Path, mtu: int, loss: int
) -> None:
    tx_mean, rx_mean, drops = _run(attach_guest, server, tmp_path, mtu, loss)
    if mtu == 1500:
        # Most bytes moved in super-frames: the mean frame is several MTUs, each way (ACKs in
        # the other direction pull the mean down, so the bar is low; without offloads it is
        # below 1514).
        assert tx_mean > 4 * 1514, drops
        assert rx_mean > 4 * 1514, drops
    if not loss:
        assert not drops.get("tcp.host.send_blocked"), drops


@pytest.mark.parametrize("loss", [0, 2])
def test_no_offloads_gives_plain_frames(
    attach_guest: Any, server: Any, tmp_path: Path, loss: int
) -> None:
    tx_mean, rx_mean, drops = _run(attach_guest, server, tmp_path, 1500, loss, "--no-offloads")
    assert tx_mean <= 1514 and rx_mean <= 1514, drops
