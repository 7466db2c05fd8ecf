"""The Internet checksum (RFC 1071), with a numpy fast path for large buffers.

The ones'-complement sum of 16-bit big-endian words equals the buffer read as one big integer
modulo 0xffff (since 2**16 == 1 mod 0xffff), which CPython computes in C. That is fastest for
small buffers (0.6 us at 256 bytes here, against numpy's fixed ~1.7 us); from about 768 bytes
numpy's vectorised sum of ``>u2`` words wins, by 10x at 64 KiB (14 us against 138 us).
``bench/bench_checksum.py`` measures the crossover.

numpy costs about 17 MB of resident memory, a third of guestnet's at start (issue 12), so it is
loaded only where it pays: :func:`load_vector_path` imports it, and the datapath's assembly calls
it before the loop starts when the MTU lets frames checksummed in full be larger than
:data:`VECTOR_MIN_MTU` (a link without offloads at MTU 65520, QEMU's default; UDP and ICMP at that
MTU). At MTU 1500 every frame summed in full is at most 1514 bytes, where the integer path is as
fast (bench/bench_checksum.py); TCP super-frames on a TAP with offloads carry partial checksums
that the kernel completes. Until it is loaded every size takes the integer path, so nothing is
imported while frames flow.
"""

from __future__ import annotations

import os
from typing import Any

#: Above this many bytes the numpy path is used, once loaded (see bench/bench_checksum.py).
NUMPY_THRESHOLD = 768
#: At or below this MTU the numpy path is not worth its memory (see the module docstring).
VECTOR_MIN_MTU = 1500

#: numpy and its big-endian 16-bit dtype, once :func:`load_vector_path` ran.
_np: Any = None
_BE16: Any = None


def vector_path_pays(mtu: int) -> bool:
    """Whether a datapath at ``mtu`` sums frames large enough for numpy to win."""
    return mtu > VECTOR_MIN_MTU


def load_vector_path() -> None:
    """Import numpy for sums from :data:`NUMPY_THRESHOLD` bytes up. Call before the loop runs."""
    global _np, _BE16
    if _np is None:
        # numpy's BLAS would start a worker thread per core at import; sums never use it, and
        # a threaded process can no longer join or make a user namespace (rootless --sandbox).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        import numpy

        _BE16 = numpy.dtype(">u2")
        _np = numpy


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit ones'-complement sum of ``data`` plus ``initial`` (not complemented).

    An odd length is padded with a zero byte, as RFC 1071 says.
    """
    n = len(data)
    if n >= NUMPY_THRESHOLD and _np is not None:
        even = n & ~1
        total = int(_np.frombuffer(data, dtype=_BE16, count=even >> 1).sum(dtype=_np.uint64))
        if n & 1:
            total += data[n - 1] << 8
        return _fold(total + initial)
    if n & 1:
        value = int.from_bytes(data, "big") << 8
    else:
        value = int.from_bytes(data, "big")
    if value == 0:
        return _fold(initial)
    rem = value % 0xFFFF
    return _fold((rem if rem else 0xFFFF) + initial)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data``: the complement of its ones'-complement sum."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Ones'-complement sum of the TCP/UDP pseudo-header (not complemented), for either family.

    The IPv4 pseudo-header (RFC 768) and the IPv6 one (RFC 8200 8.1) hold the same words: source
    and destination (4 or 16 bytes each), the protocol (next header) and the L4 length; only
    their order and padding differ, which a ones'-complement sum does not see. The addresses are
    summed as one big integer modulo 0xffff (see the module docstring), which also beats four
    16-bit slices for IPv4.
    """
    total = int.from_bytes(src + dst, "big") % 0xFFFF + proto + length
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total
