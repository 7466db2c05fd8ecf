"""What guestnet asks the host about itself at start-up (over netlink).

:func:`host_addrs`: the host's own addresses (IPv4 and IPv6), which ``--no-host-loopback``
refuses to the guest along with the loopback ranges; :func:`interface_ipv4`: an interface's
address, for an ``--outbound-addr`` given as an interface name.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct

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


#: ioctl: an interface's (first) IPv4 address.
SIOCGIFADDR = 0x8915


def interface_ipv4(ifname: str) -> str | None:
    """The IPv4 address of interface ``ifname`` in our network namespace, or None."""
    raw = ifname.encode()
    if not raw or len(raw) > 15:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            ifr = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("16s16x", raw))
        except OSError:
            return None
    return socket.inet_ntoa(ifr[20:24])
