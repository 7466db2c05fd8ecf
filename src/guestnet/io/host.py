"""What guestnet asks the host about itself at start-up (over netlink).

:func:`host_addrs`: the host's own addresses (IPv4 and IPv6), which ``--no-host-loopback``
refuses to the guest along with the loopback ranges.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def host_addrs() -> frozenset[bytes]:
    """The host's own IPv4 and IPv6 addresses, packed; empty (with a warning) if netlink fails."""
    try:
        from pyroute2 import IPRoute  # imported only when --no-host-loopback asks for it

        with IPRoute() as ipr:
            return frozenset(
                ipaddress.ip_address(str(msg.get_attr("IFA_ADDRESS")).partition("%")[0]).packed
                for msg in ipr.get_addr()
                if msg.get_attr("IFA_ADDRESS")
                and msg["family"] in (socket.AF_INET, socket.AF_INET6)
            )
    except Exception as exc:  # any netlink trouble: fall back to loopback-only refusal
        log.warning("could not list the host's addresses: %s", exc)
        return frozenset()
