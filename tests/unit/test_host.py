"""io/host.py: the host's addresses from our own netlink dump, as pyroute2 lists them."""

from __future__ import annotations

import ipaddress
import socket
import struct

from guestnet.io import host


def test_host_addrs_match_pyroute2() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        theirs = frozenset(
            ipaddress.ip_address(str(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"))).packed
            for m in ipr.get_addr()
            if m["family"] in (socket.AF_INET, socket.AF_INET6)
        )
    mine = host.host_addrs()
    assert mine == theirs
    assert ipaddress.ip_address("127.0.0.1").packed in mine


def _ifaddrmsg(family: int, *attrs: tuple[int, bytes]) -> bytes:
    body = struct.pack("=BBBBI", family, 32, 0, 0, 3)
    for kind, value in attrs:
        rta = struct.pack("=HH", 4 + len(value), kind) + value
        body += rta + bytes(-len(rta) % 4)
    return body


def test_point_to_point_gives_the_local_address_not_the_peer() -> None:
    local, peer = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    msg = _ifaddrmsg(socket.AF_INET, (host.IFA_ADDRESS, peer), (host.IFA_LOCAL, local))
    assert host._address_of(msg, 0, len(msg)) == local
    only = _ifaddrmsg(socket.AF_INET6, (host.IFA_ADDRESS, bytes(15) + b"\x01"))
    assert host._address_of(only, 0, len(only)) == bytes(15) + b"\x01"
    other = _ifaddrmsg(socket.AF_PACKET, (host.IFA_ADDRESS, b"\x01" * 6))
    assert host._address_of(other, 0, len(other)) is None
    cut = _ifaddrmsg(socket.AF_INET, (host.IFA_LOCAL, local))[:-2]  # attribute runs past the end
    assert host._address_of(cut, 0, len(cut)) is None
