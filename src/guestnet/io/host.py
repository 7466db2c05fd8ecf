"""What guestnet asks the host about itself at start-up (over netlink and ioctl).

:func:`host_addrs`: the host's own addresses (IPv4 and IPv6), which ``--no-host-loopback``
refuses to the guest along with the loopback ranges; :func:`interface_ipv4`: an interface's
address, for an ``--outbound-addr`` given as an interface name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)


#: rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h).
NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
#: Receive buffer for the dump (the kernel fills it up to this much per read).
_NL_BUFSIZE = 65536
#: Most reads of one dump: a bound against a kernel that never says DONE.
_NL_MAX_READS = 4096


def host_addrs() -> frozenset[bytes]:
    """The host's own IPv4 and IPv6 addresses, packed; empty (with a warning) if netlink fails.

    One ``RTM_GETADDR`` dump on a netlink socket, parsed here: pyroute2 did the same for ~16 MB
    of imports in the serving process (``--no-host-loopback``, which podman passes to
    slirp4netns). Each address message gives ``IFA_LOCAL`` (the interface's own address; on a
    point-to-point link ``IFA_ADDRESS`` is the peer's) or else ``IFA_ADDRESS``.
    """
    try:
        return frozenset(_dump_addrs())
    except (OSError, ValueError, struct.error) as exc:
        log.warning("could not list the host's addresses: %s", exc)
        return frozenset()


def _dump_addrs() -> list[bytes]:
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    ) as s:
        s.settimeout(5.0)
        s.bind((0, 0))
        request = _NLMSGHDR.pack(
            _NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        ) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        s.sendto(request, (0, 0))
        found: list[bytes] = []
        for _ in range(_NL_MAX_READS):
            data = s.recv(_NL_BUFSIZE)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size or off + length > len(data):
                    raise ValueError("netlink: bad message length")
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    raise OSError(-err, os.strerror(-err))
                if kind == RTM_NEWADDR and seq == 1:
                    addr = _address_of(data, off + _NLMSGHDR.size, off + length)
                    if addr is not None:
                        found.append(addr)
                off += (length + 3) & ~3
        raise ValueError("netlink: no end to the address dump")


def _address_of(data: bytes, off: int, end: int) -> bytes | None:
    """The packed local address of one ``ifaddrmsg`` and its attributes, if IPv4 or IPv6."""
    family = _IFADDRMSG.unpack_from(data, off)[0]
    size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
    if size is None:
        return None
    off += _IFADDRMSG.size
    attrs: dict[int, bytes] = {}
    while off + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(data, off)
        if alen < _RTATTR.size or off + alen > end:
            break
        if atype in (IFA_ADDRESS, IFA_LOCAL) and alen - _RTATTR.size == size:
            attrs[atype] = data[off + _RTATTR.size : off + alen]
        off += (alen + 3) & ~3
    return attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))


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
