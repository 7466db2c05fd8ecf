"""pytest fixtures for VM tests. Import them into the test module (they are not in a conftest, so
that only modules that boot VMs see them):

    from vm.fixtures import vm_image, vm_sock_dir  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .initramfs import VmImage, base_initramfs, find_busybox, find_kernel
from .qemu import qemu_binary

__all__ = ["VmImage", "vm_image", "vm_sock_dir"]


@pytest.fixture(scope="session")
def vm_image() -> Iterator[VmImage]:
    """Skips (with the Debian package to install) when a part of the guest is missing."""
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (network namespaces)")
    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    kernel = find_kernel()
    if kernel is None:
        pytest.skip("no /boot/vmlinuz-* with /lib/modules (apt-get install linux-image-amd64)")
    busybox = find_busybox()
    if busybox is None:
        pytest.skip("no static /bin/busybox (apt-get install busybox-static)")
    yield VmImage(kernel, base_initramfs(kernel, busybox))


@pytest.fixture
def vm_sock_dir() -> Iterator[Path]:
    """A short directory for unix socket paths (sun_path holds 107 bytes; pytest's tmp_path can
    be longer than that under a deep --basetemp)."""
    path = Path(tempfile.mkdtemp(prefix="gnvm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
