"""The C library through ctypes, for the few system calls Python 3.11's ``os`` lacks (setns,
unshare, mount, pivot_root, capset), shared by the namespace and the hardening code."""

from __future__ import annotations

import ctypes
import os

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The process's C library, loaded once, with errno kept for :func:`check`."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def check(ret: int, what: str) -> None:
    """Raise OSError with the call's errno when ``ret`` is not 0."""
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
