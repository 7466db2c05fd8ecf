"""What guestnet asks the host about itself at start-up (over netlink).

Only :func:`host_ipv4_addrs` for now: the host's own addresses, which ``--no-host-loopback``
refuses to the guest along with the loopback range.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def host_ipv4_addrs() -> frozenset[bytes]:
    """The host's own IPv4 addresses, packed; empty (with a warning) if netlink fails."""
    try:
        from pyroute2 import IPRoute  # imported only when --no-host-loopback asks for it

        with IPRoute() as ipr:
            return frozenset(
                ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS")).packed
                for msg in ipr.get_addr(family=socket.AF_INET)
                if msg.get_attr("IFA_ADDRESS")
            )
    except Exception as exc:  # any netlink trouble: fall back to loopback-only refusal
        log.warning("could not list the host's addresses: %s", exc)
        return frozenset()
