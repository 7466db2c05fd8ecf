"""Network namespaces as guests: the namespace and TAP mechanics behind ``netns`` and ``run``.

Theory of operation
-------------------
A TAP belongs to the network namespace of whoever opened ``/dev/net/tun``. guestnet itself must
stay in its own namespaces (its host sockets are the host's) and single-threaded (setns into a
user namespace refuses threaded callers), so a forked *helper child* does the namespace work:

``netns TARGET``
    The child joins the target's user namespace (``--userns``, or the target process's own when
    TARGET is a PID and it differs from ours) and network namespace with ``setns``, makes the
    TAP out of the target's sight (below), with ``--configure`` brings ``lo`` and the interface
    up with address and default route, sends the fd back over a unix socketpair
    (``SCM_RIGHTS``) and exits. guestnet serves the TAP (``guestnet.network.Network.attach_netns``)
    until it closes; the TAP is not persistent, so it disappears when guestnet closes the fd.

``run -- CMD``
    The child unshares a new network namespace and a private mount namespace (plus a user
    namespace when not root: the caller's uid/gid map to 0 inside, ``setgroups`` denied), binds
    a generated ``resolv.conf`` naming guestnet's DNS over ``/etc/resolv.conf``, creates and
    configures the TAP, sends the fd, waits for the parent's go-ahead byte (so no packet of CMD
    is sent before guestnet serves the link), then execs CMD. The parent
    (``guestnet.network.Network.spawn``) watches the child with a pidfd in its loop; the CLI exits
    with CMD's status (128 + signal when it was killed), forwards SIGTERM to CMD and leaves
    SIGINT to CMD (a terminal sends it to both).

Making the TAP out of sight. A TAP opened in the target would appear there with a random MAC
and the default MTU until guestnet changed them; a guest that sets the interface up the moment
it appears would send its first frames, and start DHCP, with that MAC, and lose its offer when
the MAC changed (issue 9). So the child creates the TAP in a private network namespace of its
own, owned by the user namespace it is in (the target's, or the initial one as root), sets MAC
and MTU there, and moves it into the target already named in one netlink request
(:func:`make_tap_hidden`): the target only ever sees the finished interface, and the fd serves
the device wherever it lives. ``run`` makes its TAP the same way.

The TAP's transmit queue. A namespace guest's frames toward guestnet wait in the TAP's ring of
``txqueuelen`` entries (the kernel's default 1000) until guestnet reads them; the TAP takes them
off the sending socket's account at once (``skb_orphan``), so a full ring is never back-pressure,
only drops (the guest's ``TX dropped``, issue 12). A single-threaded reader on a loaded machine
is off the CPU for milliseconds at a time: 1000 frames of 1400-byte UDP at 1.4 Gbit/s are 8 ms,
and a sender faster than that while guestnet waits for the CPU loses datagrams guestnet would
have carried (measured: every datagram lost at guestnet's limit at MTU 1500 was one of these).
So the child sets a longer queue, by bytes (:func:`tap_txqueuelen`): up to ``TAP_QUEUE_BYTES``
of full-size frames, never below the default, so the kernel memory a stalled guestnet lets the
guest queue stays bounded at a large MTU (where a frame may be a 64 KiB super-frame).

Every wait on the child is bounded (``HELPER_TIMEOUT_S``). The child reports a failure as a
one-line message on the socketpair instead of an fd, and the parent prints it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from guestnet.config import Config, format_mac
from guestnet.io.libc import check, libc
from guestnet.io.tap import open_tap

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1

#: ``ifa_flags``: the address skips duplicate address detection (linux/if_addr.h).
IFA_F_NODAD = 0x02

#: The TAP's transmit queue (see "The TAP's transmit queue"): this many bytes of full-size
#: frames, between the kernel's default length and the longest we set.
TAP_QUEUE_BYTES = 8 << 20
TAP_TXQLEN_DEFAULT = 1000
TAP_TXQLEN_MAX = 8192

NETNS_RUN_DIR = "/run/netns"
#: Longest we wait for a helper child to hand over the TAP (pyroute2's import is most of it).
HELPER_TIMEOUT_S = 30.0
EXIT_FAILURE = 1


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace ``fd`` refers to (``setns(2)``; Python 3.11 has no os.setns)."""
    check(libc().setns(fd, nstype), "setns")


def setns_path(path: str, nstype: int = 0) -> None:
    """Join the namespace at ``path`` (/proc/PID/ns/..., a bind mount under /run/netns)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, nstype)
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    """Move the caller into new namespaces (``unshare(2)``; Python 3.11 has no os.unshare)."""
    check(libc().unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """``mount(2)``; ``data`` the filesystem's options (none when empty)."""
    enc = os.fsencode
    ret = libc().mount(
        None if source is None else enc(source),
        enc(target),
        None if fstype is None else enc(fstype),
        ctypes.c_ulong(flags),
        enc(data) if data else None,
    )
    check(ret, f"mount {target}")


def write_id_maps(uid: int, gid: int) -> None:
    """Map ``uid``/``gid`` outside to 0 inside the caller's new user namespace.

    ``setgroups`` must be denied before an unprivileged process may write its gid_map.
    """
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def resolve_target(target: str) -> tuple[str, str | None]:
    """TARGET (PID, path, or NAME under /run/netns) as (netns path, that PID's userns path).

    The user namespace is given only for a PID whose user namespace differs from ours.
    Raises ValueError when the namespace does not exist.
    """
    userns: str | None = None
    if target.isdigit():
        path = f"/proc/{int(target)}/ns/net"
        candidate = f"/proc/{int(target)}/ns/user"
        with contextlib.suppress(OSError):
            if os.stat(candidate).st_ino != os.stat("/proc/self/ns/user").st_ino:
                userns = candidate
    elif "/" in target:
        path = target
    else:
        path = os.path.join(NETNS_RUN_DIR, target)
    if not os.path.exists(path):
        raise ValueError(f"no such network namespace: {target!r} ({path})")
    return path, userns


@dataclass(frozen=True)
class TapSetup:
    """How the helper child sets up the TAP inside the namespace."""

    ifname: str
    mac: str
    mtu: int
    #: Also bring lo and the interface up with address, default route (else the interface stays
    #: down, for the guest's own DHCP client).
    configure: bool
    address: str
    prefixlen: int
    gateway: str
    #: The IPv6 address, its prefix length and the IPv6 default gateway; None: IPv4 only
    #: (``--no-ipv6``). The kernel still does SLAAC from guestnet's advertisements besides.
    address6: str | None = None
    prefixlen6: int = 64
    gateway6: str | None = None

    @classmethod
    def from_config(cls, config: Config, ifname: str, configure: bool, index: int = 0) -> TapSetup:
        """The setup for guest ``index`` of this guestnet (0: the first, or the only one):
        guest N gets ``--guest-mac``, ``--guest-ip`` and ``--guest-ip6`` plus N, so several
        namespaces on one switch have distinct MACs and (with ``configure``) addresses."""
        mac = (int.from_bytes(config.guest_mac, "big") + index) & ((1 << 48) - 1)
        return cls(
            ifname=ifname,
            mac=format_mac(mac.to_bytes(6, "big")),
            mtu=config.mtu,
            configure=configure,
            address=str(config.guest_ip + index),
            prefixlen=config.subnet.prefixlen,
            gateway=str(config.gateway),
            address6=str(config.guest_ip6 + index) if config.ipv6 else None,
            prefixlen6=config.ipv6_prefix.prefixlen,
            gateway6=str(config.gateway6) if config.ipv6 else None,
        )


def tap_txqueuelen(mtu: int) -> int:
    """The TAP's ``txqueuelen`` at ``mtu``: ``TAP_QUEUE_BYTES`` of full frames, clamped between
    the kernel's default and ``TAP_TXQLEN_MAX`` (MTU 1500: 5,592; 9000 and above: 1000)."""
    return max(TAP_TXQLEN_DEFAULT, min(TAP_TXQLEN_MAX, TAP_QUEUE_BYTES // max(mtu, 1)))


def _quiet_pyroute2() -> None:
    # pyroute2 logs every netlink message at debug level: not what --log-level debug is for.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def make_tap_hidden(setup: TapSetup, target_netns_fd: int) -> int:
    """Create the TAP out of sight and hand it to the namespace ``target_netns_fd``; its fd.

    Runs in a helper child that is already in the target's user namespace (or is root). The
    child moves into a private network namespace of its own (owned by that same user namespace,
    so its capabilities there are the ones it has over the target), creates the TAP there, gives
    it its MAC and MTU, and then moves it into the target under ``setup.ifname`` in one netlink
    request (``IFLA_NET_NS_FD`` with ``IFLA_IFNAME``). The interface therefore never exists in
    the target with the kernel's random MAC or the default MTU: a guest that sets it up the
    moment it appears sends its first frame (and its DHCP client reads its MAC) with the final
    one. The fd keeps serving the device after the move. The child ends in the target
    namespace, where :func:`configure_interface` may finish the job; the private namespace
    lives on only as long as the fd (the TAP's socket holds it) and holds nothing.
    """
    unshare(CLONE_NEWNET)
    fd = open_tap(setup.ifname)
    try:
        move_link(setup, target_netns_fd)
        setns(target_netns_fd, CLONE_NEWNET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def move_link(setup: TapSetup, target_netns_fd: int) -> None:
    """In the current namespace: MAC, MTU and transmit queue length on ``setup.ifname``, then
    move it to the target."""
    from pyroute2 import IPRoute, NetlinkError

    _quiet_pyroute2()
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=setup.ifname)
        ipr.link(
            "set", index=idx, address=setup.mac, mtu=setup.mtu, txqlen=tap_txqueuelen(setup.mtu)
        )
        try:
            # One RTM_NEWLINK: the device leaves here and appears there already named.
            ipr.link("set", index=idx, net_ns_fd=target_netns_fd, ifname=setup.ifname)
        except NetlinkError as exc:
            # EEXIST: the target has an interface of that name already.
            raise OSError(exc.code, os.strerror(exc.code)) from None


def configure_interface(setup: TapSetup) -> None:
    """In the current network namespace, with ``configure``: lo up, address, link up, route."""
    if not setup.configure:
        return
    from pyroute2 import IPRoute, NetlinkError

    _quiet_pyroute2()
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=setup.ifname)
        for lo in ipr.link_lookup(ifname="lo"):
            ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=idx, address=setup.address, prefixlen=setup.prefixlen)
        if setup.address6 is not None:
            # No duplicate address detection: guestnet hands the address out and answers for
            # nobody else's, and CMD may use it the moment it starts.
            ipr.addr(
                "add",
                index=idx,
                address=setup.address6,
                prefixlen=setup.prefixlen6,
                flags=IFA_F_NODAD,
            )
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=setup.gateway, oif=idx)
        if setup.gateway6 is not None:
            try:
                ipr.route(
                    "add", dst="::/0", gateway=setup.gateway6, oif=idx, family=socket.AF_INET6
                )
            except NetlinkError as exc:
                # EEXIST: the default route from guestnet's own advertisement came first.
                if exc.code != errno.EEXIST:
                    raise


def open_tap_here(setup: TapSetup) -> int:
    """The TAP for the caller's own network namespace, made as :func:`make_tap_hidden` does."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = make_tap_hidden(setup, own)
    finally:
        os.close(own)
    try:
        configure_interface(setup)
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolv_conf_text(config: Config) -> str:
    """The resolv.conf ``run`` shows CMD: guestnet's DNS (IPv4, then IPv6 unless
    ``--no-ipv6``), and the search domains if any."""
    lines = [f"# written by guestnet run\nnameserver {config.dns_ip}"]
    if config.ipv6:
        lines.append(f"nameserver {config.dns_ip6}")
    if config.dns_search:
        lines.append("search " + " ".join(config.dns_search))
    return "\n".join(lines) + "\n"


def bind_resolv_conf(text: str) -> None:
    """Bind a file holding ``text`` over /etc/resolv.conf (private mount namespace only)."""
    fd, tmp = tempfile.mkstemp(prefix="guestnet-resolv-", suffix=".conf")
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o644)
        os.close(fd)
        mount(tmp, "/etc/resolv.conf", None, MS_BIND)
    finally:
        # The mount keeps the inode; the name is not needed once bound (or on failure).
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# -- the helper child ----------------------------------------------------------------------------


class HelperError(Exception):
    """The helper child could not set up the namespace or the TAP (message is one line)."""


def _child_main(sock: socket.socket, body: Callable[[], int]) -> NoReturn:
    """Run ``body`` in the forked child: send the TAP fd, or the error, then exit."""
    code = 0
    try:
        fd = body()
        socket.send_fds(sock, [b"ok"], [fd])
        os.close(fd)
    except BaseException as exc:
        code = EXIT_FAILURE
        with contextlib.suppress(OSError):
            sock.sendall(f"error: {_describe(exc)}".encode()[:4000])
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    os._exit(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" ({exc.filename})" if exc.filename else "")
    return str(exc) or type(exc).__name__


def _receive_fd(sock: socket.socket, pid: int) -> int:
    """The TAP fd from the child, or HelperError with the child's message."""
    sock.settimeout(HELPER_TIMEOUT_S)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise HelperError("namespace helper did not answer in time") from None
    for extra in fds[1:]:
        os.close(extra)
    if msg == b"ok" and fds:
        return fds[0]
    for fd in fds:
        os.close(fd)
    text = msg.decode(errors="replace").removeprefix("error: ")
    raise HelperError(text or "namespace helper exited without a word")


def _link_exists(ifname: str) -> bool:
    """Whether ``ifname`` exists in the caller's network namespace (its socket's)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def reap(pid: int) -> int:
    """Wait for child ``pid``; its exit code as ``subprocess`` gives it (-N: killed by N)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def open_tap_in(
    netns_path: str,
    userns_path: str | None,
    setup: TapSetup,
    *,
    userns_optional: bool = False,
    adopt_existing: bool = False,
) -> int:
    """Create TAP ``setup.ifname`` inside the namespace at ``netns_path``; return its fd.

    A forked child joins ``userns_path`` (if given) and the network namespace, makes the TAP
    out of sight and moves it in (:func:`make_tap_hidden`), sets it up, and passes the fd back;
    the caller stays where it is. ``userns_optional``: a failure to join the user namespace is
    ignored (slirp4netns does so: the caller may already be in it, or privileged enough).
    ``adopt_existing``: when the interface already exists (rootlesskit creates and configures
    ``tap0`` itself), open it and leave its settings alone.
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        parent_sock.close()

        def body() -> int:
            if userns_path is not None:
                try:
                    setns_path(userns_path, CLONE_NEWUSER)
                except OSError:
                    if not userns_optional:
                        raise
            setns_path(netns_path, CLONE_NEWNET)
            if adopt_existing and _link_exists(setup.ifname):
                return open_tap(setup.ifname)
            return open_tap_here(setup)

        _child_main(child_sock, body)
    child_sock.close()
    try:
        return _receive_fd(parent_sock, pid)
    finally:
        parent_sock.close()
        reap(pid)


def spawn_in_new_namespaces(
    setup: TapSetup, cmd: list[str], resolv_conf: str
) -> tuple[int, int, socket.socket]:
    """Fork a child that makes new namespaces with a TAP and will exec ``cmd``.

    Returns (child pid, TAP fd, go socket). Send one byte on the go socket (and close it) to
    let the child exec ``cmd``; closing it without a byte makes the child exit with status 1.
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    uid, gid = os.geteuid(), os.getegid()
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        try:
            _run_child(setup, cmd, resolv_conf, child_sock, uid, gid, parent_pid)
        finally:
            os._exit(127)
    child_sock.close()
    try:
        fd = _receive_fd(parent_sock, pid)
    except BaseException:
        parent_sock.close()
        reap(pid)
        raise
    return pid, fd, parent_sock


def _run_child(
    setup: TapSetup,
    cmd: list[str],
    resolv_conf: str,
    sock: socket.socket,
    uid: int,
    gid: int,
    parent_pid: int,
) -> None:
    """The ``run`` child: namespaces, TAP, then (after the go-ahead) exec CMD."""
    try:
        # If guestnet dies, CMD has lost its network: let it know rather than linger.
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(EXIT_FAILURE)
        if uid == 0:
            unshare(CLONE_NEWNET | CLONE_NEWNS)
        else:
            unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
            write_id_maps(uid, gid)
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            bind_resolv_conf(resolv_conf)
        except OSError as exc:
            print(
                f"guestnet run: warning: /etc/resolv.conf left as it is: {_describe(exc)}",
                file=sys.stderr,
                flush=True,
            )
        fd = open_tap_here(setup)
        socket.send_fds(sock, [b"ok"], [fd])
        os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.sendall(f"error: {_describe(exc)}".encode()[:4000])
        os._exit(EXIT_FAILURE)
    go = b""
    with contextlib.suppress(OSError):
        go = sock.recv(1)
    sock.close()
    if not go:
        os._exit(EXIT_FAILURE)
    # CMD starts with default signal dispositions and mask, as it would from a shell.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"guestnet run: {cmd[0]}: {_describe(exc)}", file=sys.stderr, flush=True)
        os._exit(126 if isinstance(exc, PermissionError) else 127)


#: Held back from the start until the loop's handlers are in place, so that a SIGTERM during
#: set-up still ends guestnet cleanly (and removes the TAP) instead of killing it outright.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


__all__ = [
    "HelperError",
    "TapSetup",
    "open_tap_in",
    "resolve_target",
    "setns",
    "spawn_in_new_namespaces",
    "unshare",
]
