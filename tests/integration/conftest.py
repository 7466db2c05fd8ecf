"""Fixtures for integration tests: namespaces, guestnet processes, attached guests.

- ``sandbox``: a loopback-only :class:`nsutil.Netns`. guestnet runs here, and so do any host-side
  servers a test starts (on its 127.0.0.1): nothing leaves the sandbox.
- ``guest_ns``: an empty namespace (``lo`` up) standing for the guest.
- ``outside``: a namespace standing for the internet, joined to ``sandbox`` by a veth
  (sandbox 198.18.0.1, outside 198.18.0.2; nothing else routed). The sandbox then has one
  interface besides ``lo``, toward a namespace the test made itself.
- ``start_gn``: factory ``start_gn(args, ready=None, timeout=10) -> Guestnet`` running guestnet in
  ``sandbox``; every process it started is stopped at teardown.
- ``attach_guest``: factory ``attach_guest(*extra_args, configure=True) -> Guestnet`` running
  ``guestnet netns /run/netns/GUEST [--configure] [extra]`` in the sandbox and waiting until the
  guest's interface exists (and, with ``configure``, is up with its address).

Tests marked ``@pytest.mark.root`` are skipped when not running as root. Helpers live in
``nsutil`` (import it directly: ``from nsutil import ...``; this folder is on sys.path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nsutil import (
    Guestnet,
    Netns,
    addresses,
    is_up,
    link_info,
    make_netns,
    make_outside,
    start_guestnet,
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP)")


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP)")


@pytest.fixture
def sandbox() -> Iterator[Netns]:
    """A loopback-only namespace for guestnet and host-side test servers; deleted at teardown."""
    _need_root()
    ns = make_netns("gnsb")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def guest_ns() -> Iterator[Netns]:
    """An empty namespace standing for the guest (only ``lo``, up); deleted at teardown."""
    _need_root()
    ns = make_netns("gngu")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def outside(sandbox: Netns) -> Iterator[Netns]:
    """The stand-in for the internet beside ``sandbox`` (the veth goes with the namespaces)."""
    ns = make_outside(sandbox)
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def start_gn(sandbox: Netns) -> Iterator[Callable[..., Guestnet]]:
    """Factory: ``start_gn(args, ready=None, timeout=10)`` starts guestnet in ``sandbox``."""
    started: list[Guestnet] = []

    def start(args: list[str], ready: Callable[[], bool] | None = None, **kw: Any) -> Guestnet:
        gn = start_guestnet(sandbox, args, ready=ready, **kw)
        started.append(gn)
        return gn

    try:
        yield start
    finally:
        for gn in reversed(started):
            gn.cleanup()


def _option(args: tuple[str, ...], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


@pytest.fixture
def attach_guest(start_gn: Callable[..., Guestnet], guest_ns: Netns) -> Callable[..., Guestnet]:
    """Factory: ``attach_guest(*extra_args, configure=True, timeout=10) -> Guestnet``.

    Runs ``guestnet netns /run/netns/GUEST [--configure] EXTRA`` in the sandbox and waits until
    the guest's interface exists and, with ``configure``, is up with an IPv4 address. The
    returned Guestnet has ``.guest`` (the guest Netns) and ``.ifname``.
    """

    def attach(*extra: str, configure: bool = True, timeout: float = 10.0) -> Guestnet:
        ifname = _option(extra, "--ifname", "eth0")
        mac = _option(extra, "--guest-mac", "52:54:00:12:34:56").lower()
        args = ["netns", guest_ns.path, *(["--configure"] if configure else []), *extra]

        def ready() -> bool:
            # The helper sets the MAC after creating the TAP, and the default route last.
            info = link_info(guest_ns, ifname)
            if info is None or info.get("address") != mac:
                return False
            if not configure:
                return True
            route = guest_ns.run(["ip", "-4", "route", "show", "default"], check=False)
            return (
                is_up(guest_ns, ifname)
                and bool(addresses(guest_ns, ifname))
                and ("default" in route.stdout)
            )

        gn = start_gn(args, ready=ready, timeout=timeout)
        gn.guest = guest_ns
        gn.ifname = ifname
        return gn

    return attach
