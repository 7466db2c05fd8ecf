"""Least privilege once guestnet is set up: ``--runas``, ``--sandbox`` and ``--seccomp``.

Theory of operation
-------------------
guestnet needs privileges only to set up: to make the TAP in a namespace (a helper child does
that), to bind published ports, the API socket and the capture file, to open a raw ICMP socket.
Once every one of those descriptors is open, the loop only reads and writes them, opens
ordinary host sockets for NAT flows, and binds more listeners when the API asks. So after
set-up and before the loop, :func:`apply` takes away what a compromised guestnet could abuse,
in the order each step still has the privilege the next one needs:

1. :func:`preload` imports every module the datapath can reach (all of guestnet, its native
   extension when built, the codecs DNS names use, libseccomp's binding), because after the
   sandbox no file of the Python installation is visible and a lazy import would fail.
2. ``--sandbox`` (slirp4netns's ``--enable-sandbox``): :func:`enter_sandbox` moves guestnet to a
   mount namespace of its own whose root is a small tmpfs holding only ``/etc`` and ``/run``,
   both bound read-only from the caller's (recursively, so what is mounted under ``/run`` stays
   visible), and pivots into it: ``/proc/PID/root`` then shows ``etc`` and ``run`` and nothing
   else (no ``/home``, ``/root``, ``/var``, no Python installation). Every mount is made a slave
   first, so nothing done in guestnet's namespace (unmounting the old root above all) propagates
   back to the caller's mounts, while mounts the caller adds under ``/run`` later still appear.
   Not root, guestnet first joins the user namespace it was given (the target's, as slirp4netns
   does) or makes one mapping its user to root, to be allowed to make mount namespaces.
3. The bounding set loses every capability but those kept, so nothing exec'd could regain one.
4. ``--runas USER[:GROUP]``: supplementary groups cleared, then the gid, then the uid set (real,
   effective and saved): the process can no longer act as root. Files opened before (the
   capture) and sockets bound before (published ports, the API) keep working: permissions are
   checked at open and bind, not at read and write.
5. Capabilities: with ``--sandbox`` all but ``CAP_NET_BIND_SERVICE`` are dropped from the
   effective, permitted and inheritable sets (slirp4netns's semantics: forwards added later
   through the API may still bind a port below 1024; it survives ``--runas`` through
   ``PR_SET_KEEPCAPS``); with ``--runas`` alone none is kept (passt's behaviour: an ordinary
   user). Ambient capabilities are cleared and ``no_new_privs`` is set.
6. ``--seccomp``: :func:`install_seccomp` loads, through libseccomp (Debian's ``libseccomp2``,
   reached by the ``pyseccomp`` binding), an allow-list of the system calls the loop makes after
   start (:data:`ALLOWED_SYSCALLS`, taken from ``strace -f -c`` of the datapath's scenarios: see
   BENCHMARKS.md). Anything else fails with ``EPERM`` rather than killing the process, which
   is what Docker's and libseccomp's default profiles do: a call missing from the list costs
   one operation (logged through guestnet's normal error paths) instead of every guest's
   network, while a compromised guestnet still can exec nothing, open no file, mount nothing,
   ptrace nothing and create no namespace. The filter applies to every thread (TSYNC) and to
   children forked later, and foreign system-call ABIs (i386, x32) kill the process
   (libseccomp's default for another architecture).

Nothing here is undone: the process stays reduced until it exits. What no longer works, by
design: unlinking socket files outside ``/run`` at exit under ``--sandbox`` (they are
invisible; the next start replaces a stale one), or in a directory the ``--runas`` user may not
write; ping sockets opened per flow need the new group inside ``net.ipv4.ping_group_range``
(a raw ICMP socket, opened at start as root, keeps working).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import importlib
import logging
import os
import pwd
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from guestnet.io.libc import check, libc
from guestnet.io.netns import (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MS_BIND,
    MS_REC,
    mount,
    setns_path,
    unshare,
    write_id_maps,
)

log = logging.getLogger(__name__)

# linux/mount.h, linux/prctl.h, linux/capability.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_SLAVE = 0x80000
MNT_DETACH = 0x2
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_NET_BIND_SERVICE = 10
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: pivot_root(2) has no glibc wrapper; its number by machine.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

#: Where the sandbox's root tmpfs is mounted before the pivot (in guestnet's own namespace).
SANDBOX_STAGE = "/tmp"
#: What the sandbox keeps of the caller's filesystem: resolv.conf and friends, and /run (API
#: sockets of tools live there, and /etc/resolv.conf often points into it).
SANDBOX_KEEP = ("/etc", "/run")

#: The system calls guestnet makes once it serves. Traced (``strace -f -c -p`` of a hardened
#: guestnet through DHCP, DNS, ping, TCP and UDP NAT in both families, published TCP and UDP
#: ports, the control API adding a forward, the capture, SIGTERM and exit; BENCHMARKS.md):
#: epoll_wait epoll_ctl read readv write sendto recvfrom sendmsg recvmsg socket connect bind
#: listen accept4 shutdown getsockname getpeername getsockopt setsockopt ioctl close unlink
#: getrandom brk munmap futex rt_sigaction rt_sigreturn. Added, for paths of the same work the
#: scenarios did not reach: the allocator's other calls, signal masks, the clock when the vDSO
#: cannot answer, the ``run`` command's child (kill, wait4), batched UDP and vectored TAP writes,
#: a restarted call after a signal, and leaving. Not in it, so refused: exec, fork and clone
#: (no new process or thread), open/openat, stat, mount, unshare, setns, ptrace, setuid, and
#: everything else.
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # the loop and its descriptors
    "epoll_wait", "epoll_pwait", "epoll_ctl", "read", "readv", "write", "writev", "close",
    "fcntl", "ioctl",
    # sockets: NAT flows, listeners (forwards added through the API), the API's clients
    "socket", "connect", "bind", "listen", "accept4", "shutdown",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    "getsockname", "getpeername", "getsockopt", "setsockopt",
    # socket files removed at close (they may be out of reach: then EROFS/ENOENT, harmless)
    "unlink",
    # memory
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    # clock (when the vDSO cannot answer), randomness, the pid a log record carries
    "clock_gettime", "getrandom", "getpid",
    # signals, the ``run`` command's child
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "restart_syscall", "kill", "wait4",
    "futex", "exit", "exit_group",
)  # fmt: skip


@dataclass(frozen=True)
class Hardening:
    """What :func:`apply` does after set-up: ``runas`` (uid, gid), ``sandbox``, ``seccomp``.

    ``userns``: with ``sandbox`` and not root, the user namespace to join first (slirp4netns
    joins the target's); None makes a new one.
    """

    runas: tuple[int, int] | None = None
    sandbox: bool = False
    seccomp: bool = False
    userns: str | None = None

    def __bool__(self) -> bool:
        return self.runas is not None or self.sandbox or self.seccomp


def parse_runas(text: str) -> tuple[int, int]:
    """``USER[:GROUP]``, each a name or a number, as passt's ``--runas``: (uid, gid).

    Without a group, the user's own primary group (a number without a passwd entry: the same
    number as the uid). ValueError names what is unknown.
    """
    user, sep, group = text.partition(":")
    if not user or (sep and not group):
        raise ValueError(f"expected USER[:GROUP], got {text!r}")
    try:
        uid = int(user, 10)
        entry: pwd.struct_passwd | None = None
        with contextlib.suppress(KeyError):
            entry = pwd.getpwuid(uid)
    except ValueError:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"no such user: {user}") from None
        uid = entry.pw_uid
    if not 0 <= uid < 1 << 32:
        raise ValueError(f"uid {uid} is out of range")
    if not sep:
        return uid, entry.pw_gid if entry is not None else uid
    try:
        gid = int(group, 10)
    except ValueError:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group: {group}") from None
    if not 0 <= gid < 1 << 32:
        raise ValueError(f"gid {gid} is out of range")
    return uid, gid


# -- 1. imports ----------------------------------------------------------------------------------

#: Standard modules some path of the datapath imports on first use (codecs of DNS names,
#: tracebacks of a logged exception).
_LAZY_STDLIB = ("encodings.idna", "stringprep", "unicodedata", "traceback", "linecache")
#: Imports found inside functions that the loop never makes after start: pyroute2 runs in
#: set-up and in helper children; rich and http.client serve the client commands; pyseccomp is
#: imported when ``--seccomp`` asks for it (it looks libseccomp up with ldconfig); numpy and
#: dnspython are no longer used at all (only by tests and benchmarks).
_NOT_AFTER_START = ("numpy", "dns", "pyroute2", "rich", "http", "pyseccomp")


def preload(seccomp: bool = False) -> list[str]:
    """Import every guestnet module, and every module they import inside a function (found in
    their source), but :data:`_NOT_AFTER_START`; the names imported.

    Called before the sandbox closes the filesystem, so lazy imports elsewhere (start-up time
    and memory) cost nothing later and cannot fail in the sandbox.
    """
    import pkgutil  # here, not at the top: only a hardened start pays for it

    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = [
        info.name
        for info in pkgutil.walk_packages([package_dir], "guestnet.")
        if not info.name.startswith(("guestnet.client", "guestnet.__main__"))
    ]
    for name in list(names):
        importlib.import_module(name)
    lazy = sorted({n for name in names for n in _function_imports(sys.modules[name])})
    for name in [*lazy, *_LAZY_STDLIB]:
        if name.partition(".")[0] in _NOT_AFTER_START or name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional module this installation lacks
            log.debug("preload: %s", exc)
            continue
        names.append(name)
    if seccomp:
        _pyseccomp()
        names.append("pyseccomp")
    return names


_INDENTED_IMPORT = re.compile(r"^[ \t]+(?:import|from)[ \t]", re.MULTILINE)


def _function_imports(module: ModuleType) -> set[str]:
    """Absolute names of the modules ``module`` imports inside its functions."""
    import ast

    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return set()
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if _INDENTED_IMPORT.search(source) is None:  # parsing all of guestnet costs ~0.3 s
        return set()
    tree = ast.parse(source, path)
    found: set[str] = set()
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


# -- libc ----------------------------------------------------------------------------------------


def _prctl(option: int, arg2: int = 0) -> int:
    """prctl(2); the errno on failure (0 on success)."""
    ret = libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), 0)
    return 0 if ret == 0 else ctypes.get_errno()


# -- 2. the sandbox ------------------------------------------------------------------------------


def enter_sandbox(userns: str | None = None) -> None:
    """A private mount namespace whose root holds only :data:`SANDBOX_KEEP`, read-only."""
    if os.geteuid() != 0:
        _own_user_namespace(userns)
    unshare(CLONE_NEWNS)
    # Slaves receive the caller's later mounts and send nothing back: the detach of the old
    # root below must not unmount anything in the caller's namespace.
    mount(None, "/", None, MS_REC | MS_SLAVE)
    stage = SANDBOX_STAGE
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16k,mode=0755")
    for keep in SANDBOX_KEEP:
        if not os.path.isdir(keep):  # a minimal container may lack /run
            continue
        inside = stage + keep
        os.mkdir(inside, 0o755)
        mount(keep, inside, None, MS_BIND | MS_REC)
        mount(None, inside, None, MS_REC | MS_SLAVE)
        ro = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount(None, inside, None, ro)
    os.chdir(stage)
    machine = os.uname().machine
    number = _SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown system call number on {machine}")
    # pivot_root(".", "."): the old root ends stacked under the new one; detaching "." then
    # leaves only the new root (passt's way: no directory for the old root is needed).
    check(libc().syscall(number, b".", b"."), "pivot_root")
    check(libc().umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    with contextlib.suppress(OSError):  # cosmetic, as slirp4netns treats it (its #163)
        mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _own_user_namespace(userns: str | None) -> None:
    """Not root: join ``userns`` (where we may act as root) or make one mapping us to root."""
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:  # the kernel refuses both with EINVAL: say why
        raise OSError(
            errno.EINVAL,
            f"a user namespace needs a single-threaded process; this one has {threads} threads",
        )
    if userns is not None and os.stat(userns).st_ino != os.stat("/proc/self/ns/user").st_ino:
        setns_path(userns, CLONE_NEWUSER)
        return
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    write_id_maps(uid, gid)


# -- 3 to 5. capabilities and identity -----------------------------------------------------------


def clamp_bounding_set(keep: int) -> None:
    """Drop every capability but ``keep`` (a mask) from the bounding set; needs CAP_SETPCAP
    (without it, EPERM: the set stays as it is, and only what we hold matters then)."""
    for cap in range(64):
        if keep & (1 << cap):
            continue
        err = _prctl(PR_CAPBSET_DROP, cap)
        if err == errno.EINVAL:  # past the last capability this kernel knows
            break
        if err not in (0, errno.EPERM):
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def drop_user(uid: int, gid: int, keep_caps: bool) -> None:
    """setgroups([]), setresgid, setresuid; ``keep_caps`` keeps the permitted set across it."""
    if keep_caps:
        _prctl(PR_SET_KEEPCAPS, 1)
    with contextlib.suppress(PermissionError):  # unprivileged: setresgid fails unless a no-op
        os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_caps:
        _prctl(PR_SET_KEEPCAPS, 0)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def set_capabilities(keep: int) -> None:
    """Effective and permitted = ``keep`` (what we hold of it), inheritable and ambient empty."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc().capget(ctypes.byref(header), data), "capget")
    for i in range(2):
        mask = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted & mask
        data[i].permitted &= mask
        data[i].inheritable = 0
    check(libc().capset(ctypes.byref(header), data), "capset")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


# -- 6. seccomp ----------------------------------------------------------------------------------


def _pyseccomp() -> Any:
    """The binding, or OSError saying what to install (pyseccomp raises RuntimeError when it
    finds no libseccomp)."""
    try:
        return importlib.import_module("pyseccomp")
    except (ImportError, RuntimeError, OSError) as exc:
        raise OSError(
            errno.ENOSYS,
            f"--seccomp needs libseccomp (Debian: libseccomp2) and pyseccomp (PyPI): {exc}",
        ) from exc


def build_seccomp_filter(syscalls: Iterable[str] = ALLOWED_SYSCALLS) -> Any:
    """libseccomp's filter allowing ``syscalls`` (names this machine lacks are skipped),
    failing every other call with EPERM, on every thread."""
    pyseccomp = _pyseccomp()

    filt = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.EPERM))
    filt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    native = pyseccomp.Arch.NATIVE
    for name in syscalls:
        if pyseccomp.resolve_syscall(native, name) < 0:
            continue
        filt.add_rule(pyseccomp.ALLOW, name)
    return filt


def install_seccomp(syscalls: Iterable[str] = ALLOWED_SYSCALLS) -> None:
    """Load the allow-list (libseccomp sets ``no_new_privs`` itself)."""
    build_seccomp_filter(syscalls).load()


# -- all of it -----------------------------------------------------------------------------------


def apply(h: Hardening) -> None:
    """Steps 1 to 6 of the module docstring, those ``h`` asks for. OSError when one fails:
    the caller reports it and exits, as serving half-hardened was not what was asked."""
    if not h:
        return
    preload(seccomp=h.seccomp)
    seccomp_filter = build_seccomp_filter() if h.seccomp else None
    keep = 1 << CAP_NET_BIND_SERVICE if h.sandbox else 0
    if h.sandbox:
        enter_sandbox(h.userns)
    if h.sandbox or h.runas is not None:
        clamp_bounding_set(keep)
    if h.runas is not None:
        drop_user(*h.runas, keep_caps=bool(keep))
    if h.sandbox or h.runas is not None:
        set_capabilities(keep)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if seccomp_filter is not None:
        seccomp_filter.load()
    log.info(
        "hardened: uid %d gid %d, sandbox %s, seccomp %s",
        os.getuid(),
        os.getgid(),
        "on" if h.sandbox else "off",
        "on" if h.seccomp else "off",
    )
