"""Build the initramfs for the test VM: busybox, the virtio-net modules and a scripted /init.

Theory of operation: the guest is the Debian kernel (`linux-image-amd64`) booted directly by QEMU
with an initramfs we write ourselves in cpio "newc" format. It holds the static busybox
(`busybox-static`), the virtio-net driver stack copied from /lib/modules/VERSION/ (Debian builds it
as modules), and /init from guest_init.sh. That base archive is the same for every test, so it is
built once per kernel version and cached in the temp directory (keyed by a hash of its inputs).

Each test adds its own steps: `write_initrd()` appends a second, uncompressed cpio archive holding
/guest/script.sh to a copy of the cached base. The kernel unpacks concatenated archives in order, so
the guest sees one root filesystem; /init sources the script. A test's script is therefore plain
busybox shell, and can call `section NAME CMD...` to print CMD's output between markers that
`qemu.parse_sections()` picks out of the console. `udhcpc -i eth0` applies a lease through
/etc/udhcpc/default.script (udhcpc.script), which also prints it as a `@@GUESTNET-DHCP ...@@` line.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The virtio-net driver stack in load order (each needs the ones before it). FACTS.md.
VIRTIO_NET_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)

BUSYBOX_PATH = Path("/bin/busybox")
BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")
INIT_TEMPLATE = Path(__file__).with_name("guest_init.sh")
UDHCPC_SCRIPT = Path(__file__).with_name("udhcpc.script")
SCRIPT_PATH_IN_GUEST = "guest/script.sh"
CACHE_DIR = Path(tempfile.gettempdir()) / "guestnet-vm-cache"

_MODE_DIR = 0o040755
_MODE_FILE = 0o100644
_MODE_EXEC = 0o100755
_MODE_LINK = 0o120777
_MODE_CHR = 0o020600


@dataclass(frozen=True)
class GuestKernel:
    """A bootable kernel and the module tree that belongs to it."""

    version: str
    vmlinuz: Path
    modules_dir: Path


@dataclass(frozen=True)
class VmImage:
    """What every VM test boots: the kernel and the cached base initramfs."""

    kernel: GuestKernel
    base_initrd: Path

    def initrd_with_script(self, script: str, out: Path) -> Path:
        """A per-test initrd at `out`: the base plus `script` as /guest/script.sh."""
        return write_initrd(self.base_initrd, script, out)


def find_kernel() -> GuestKernel | None:
    """The newest /boot/vmlinuz-* that has a matching /lib/modules/VERSION/, or None."""
    found: list[GuestKernel] = []
    for vmlinuz in BOOT_DIR.glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        modules_dir = MODULES_ROOT / version
        if modules_dir.is_dir() and os.access(vmlinuz, os.R_OK):
            found.append(GuestKernel(version, vmlinuz, modules_dir))
    if not found:
        return None
    return max(found, key=lambda k: k.vmlinuz.stat().st_mtime)


def find_busybox() -> Path | None:
    """Debian's static busybox (a dynamic one would need its libraries in the initramfs)."""
    if not BUSYBOX_PATH.is_file():
        return None
    with BUSYBOX_PATH.open("rb") as f:
        head = f.read(4096)
    # A static ELF has no PT_INTERP; the interpreter path string is the cheap tell.
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        return None
    return BUSYBOX_PATH


def _builtin_modules(kernel: GuestKernel) -> set[str]:
    path = kernel.modules_dir / "modules.builtin"
    if not path.is_file():
        return set()
    names = set()
    for line in path.read_text().splitlines():
        base = line.rsplit("/", 1)[-1]
        names.add(base.split(".ko", 1)[0].replace("-", "_"))
    return names


def load_module(kernel: GuestKernel, name: str) -> bytes | None:
    """The module's ELF bytes (decompressed), or None when it is built into the kernel.

    busybox insmod cannot read compressed modules, so .ko.xz is unpacked here.
    """
    for candidate in kernel.modules_dir.rglob(f"{name}.ko*"):
        if candidate.name == f"{name}.ko":
            return candidate.read_bytes()
        if candidate.name == f"{name}.ko.xz":
            return lzma.decompress(candidate.read_bytes())
    if name in _builtin_modules(kernel):
        return None
    raise FileNotFoundError(f"module {name} is neither in {kernel.modules_dir} nor built in")


class CpioWriter:
    """Writes a cpio archive in the "newc" format the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1000

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_bytes = name.encode() + b"\0"
        self._ino += 1
        fields = (
            self._ino,  # inode
            mode,
            0,  # uid
            0,  # gid
            2 if mode & 0o170000 == _MODE_DIR else 1,  # nlink
            0,  # mtime: fixed, so the archive is reproducible
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(name_bytes),
            0,  # check
        )
        self._out += b"070701" + b"".join(b"%08x" % f for f in fields) + name_bytes
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, _MODE_DIR)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, _MODE_EXEC if executable else _MODE_FILE, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, _MODE_LINK, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, _MODE_CHR, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer, padded to a multiple of 512 bytes like cpio(1) does."""
        self._entry("TRAILER!!!", 0)
        self._out += b"\0" * (-len(self._out) % 512)
        return bytes(self._out)


def render_init(modules: list[str]) -> bytes:
    return INIT_TEMPLATE.read_text().replace("@MODULES@", " ".join(modules)).encode()


def build_base_archive(kernel: GuestKernel, busybox: Path) -> bytes:
    """The gzip-compressed base initramfs: busybox, modules, /init."""
    cpio = CpioWriter()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "etc/udhcpc", "guest", "lib"):
        cpio.directory(d)
    cpio.directory("lib/modules")
    # The kernel opens /dev/console for PID 1 before /init runs; without the node /init has no
    # stdout at all (devtmpfs is mounted later, by /init).
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), executable=True)
    cpio.symlink("bin/sh", "busybox")
    loaded: list[str] = []
    for name in VIRTIO_NET_MODULES:
        data = load_module(kernel, name)
        if data is not None:
            cpio.file(f"lib/modules/{name}.ko", data)
            loaded.append(name)
    cpio.file("init", render_init(loaded), executable=True)
    # Where Debian's busybox udhcpc looks for its event script (`udhcpc -i eth0` then just works).
    cpio.file("etc/udhcpc/default.script", UDHCPC_SCRIPT.read_bytes(), executable=True)
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n")
    archive = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
    # The kernel looks for the next archive's header at a 4-byte aligned offset, skipping zeros.
    return archive + b"\0" * (-len(archive) % 4)


def _cache_key(kernel: GuestKernel, busybox: Path) -> str:
    h = hashlib.sha256()
    for part in (kernel.version, *VIRTIO_NET_MODULES):
        h.update(part.encode() + b"\0")
    st = busybox.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(INIT_TEMPLATE.read_bytes())
    h.update(UDHCPC_SCRIPT.read_bytes())
    h.update(Path(__file__).read_bytes())
    return f"{kernel.version}-{h.hexdigest()[:16]}"


def base_initramfs(kernel: GuestKernel, busybox: Path, cache_dir: Path = CACHE_DIR) -> Path:
    """The cached base initramfs for this kernel, built on first use (atomically, so parallel
    test processes may race safely)."""
    path = cache_dir / f"initramfs-{_cache_key(kernel, busybox)}.cpio.gz"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".build-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(build_base_archive(kernel, busybox))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def script_archive(script: str) -> bytes:
    """An uncompressed cpio archive holding only /guest/script.sh."""
    cpio = CpioWriter()
    cpio.file(SCRIPT_PATH_IN_GUEST, script.encode(), executable=True)
    return cpio.finish()


def write_initrd(base: Path, script: str, out: Path) -> Path:
    """Write base + the per-test script archive to `out` (the file to pass to QEMU's -initrd)."""
    with out.open("wb") as f, base.open("rb") as b:
        shutil.copyfileobj(b, f)
        f.write(script_archive(script))
    return out
