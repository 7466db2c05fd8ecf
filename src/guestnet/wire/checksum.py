"""The Internet checksum (RFC 1071): the names the rest of guestnet uses.

The sum runs in the C extension (``guestnet.wire._native``: 16-bit words summed 32 bits at a time
into 64, about 0.1 us at 64 bytes and 4 us at 64 KiB here) or, where it is not built or
``GUESTNET_PURE=1``, in :mod:`guestnet.wire.pure` (the buffer read as one big integer modulo
0xffff, computed in CPython's C: 0.5 us at 64 bytes, 110 us at 64 KiB);
:mod:`guestnet.wire.native` chooses. Both give the same value for every input.
``bench/bench_checksum.py`` measures both by size.

numpy once summed large buffers (13-19 us at 64 KiB) at the price of ~17 MB of resident memory;
the C sum is faster at every size, so numpy is no longer a dependency (issue 12). Without the
extension, a link at MTU 65520 without offloads pays the integer path's cost on large frames.
"""

from __future__ import annotations

from guestnet.wire.native import checksum, ones_sum
from guestnet.wire.native import pseudo_sum as pseudo_header_sum

__all__ = ["checksum", "ones_sum", "pseudo_header_sum"]
