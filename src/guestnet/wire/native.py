"""Which implementation of the per-frame leaf operations runs: C when built, else Python.

Theory of operation
-------------------
The leaf operations of the per-packet paths (the Internet checksum, the parse of an
established-flow TCP segment from the guest, the test and fields of a unicast UDP datagram from
the guest, both in one call as ``fast_parse``, the IPv4 header parse, a SYN's TCP options, the
headers of every TCP segment and UDP datagram toward the guest) exist twice with identical
behaviour: in the C extension ``guestnet.wire._native`` (``_native.c`` beside this file), built
by ``pip install`` when a compiler and the Python headers are there, and in
:mod:`guestnet.wire.pure`. This module binds the names below to one of them, once, at import:
the C one unless it is missing (no compiler at install time: the build skips it, see setup.py)
or ``GUESTNET_PURE=1`` is in the environment, which forces the fallback (CI runs the unit tests
both ways).

Callers import the names from here (or from the wire modules that re-export them, such as
:mod:`guestnet.wire.checksum`), never from either implementation, so the choice is made in one
place. :data:`NATIVE` says which one was taken; ``guestnet status``-style diagnostics and the
test that the extension really loads (``tests/unit/test_native.py``) read it.
"""

from __future__ import annotations

import os

from guestnet.wire import pure
from guestnet.wire.pure import FAST_TCP4, FAST_TCP6, FAST_UDP4, FAST_UDP6

#: Why the pure implementation runs, or "" when the native one does.
WHY_PURE = ""

if os.environ.get("GUESTNET_PURE", "") == "1":
    WHY_PURE = "GUESTNET_PURE=1"
else:
    try:
        from guestnet.wire import _native
    except ImportError as exc:  # built without a compiler: the pure fallback
        WHY_PURE = f"guestnet.wire._native not importable: {exc}"

#: True when the C extension is in use.
NATIVE = not WHY_PURE

if NATIVE:
    ones_sum = _native.ones_sum
    checksum = _native.checksum
    pseudo_sum = _native.pseudo_sum
    tcp_fast4 = _native.tcp_fast4
    tcp_fast6 = _native.tcp_fast6
    udp_fast4 = _native.udp_fast4
    udp_fast6 = _native.udp_fast6
    fast_parse = _native.fast_parse
    dns_question = _native.dns_question
    parse_ipv4 = _native.parse_ipv4
    tcp_options = _native.tcp_options
    build_tcp_frame = _native.build_tcp_frame
    build_udp_frame = _native.build_udp_frame
else:
    ones_sum = pure.ones_sum
    checksum = pure.checksum
    pseudo_sum = pure.pseudo_sum
    tcp_fast4 = pure.tcp_fast4
    tcp_fast6 = pure.tcp_fast6
    udp_fast4 = pure.udp_fast4
    udp_fast6 = pure.udp_fast6
    fast_parse = pure.fast_parse
    dns_question = pure.dns_question
    parse_ipv4 = pure.parse_ipv4
    tcp_options = pure.tcp_options
    build_tcp_frame = pure.build_tcp_frame
    build_udp_frame = pure.build_udp_frame

__all__ = [
    "FAST_TCP4",
    "FAST_TCP6",
    "FAST_UDP4",
    "FAST_UDP6",
    "NATIVE",
    "WHY_PURE",
    "build_tcp_frame",
    "build_udp_frame",
    "checksum",
    "dns_question",
    "fast_parse",
    "ones_sum",
    "parse_ipv4",
    "pseudo_sum",
    "tcp_fast4",
    "tcp_fast6",
    "tcp_options",
    "udp_fast4",
    "udp_fast6",
]
