"""The library face: :class:`Network`, a user-mode network that guests attach to.

Theory of operation
-------------------
A :class:`Network` is one assembled datapath (:class:`guestnet.assembly.Instance`) behind a small,
documented API: attach guests (a QEMU stream or datagram socket, a TAP fd, an existing network
namespace, a command in new namespaces), run the loop (blocking, until a condition, or in a
thread of its own), read stats, flows and leases, add and remove forwards, and close. The
command line is written on top of it and uses nothing else.

The loop is single-threaded and owns every fd, pool and flow. When :meth:`Network.start` runs it
in a thread of its own, every call from another thread is handed to the loop's thread
(``Loop.call_soon_threadsafe``) and its result waited for, so callers never touch datapath state
concurrently; no lock guards the datapath. Without :meth:`start`, calls run in the caller's
thread, which is then the loop's.

What the configuration asks for at start (``--pcap``, ``-p`` forwards, the API socket) is set up
once, on the first :meth:`run` or :meth:`start` (or :meth:`start_services`): the API socket
last, so a client that finds it finds the rest in place. A command made by :meth:`spawn` is let
go (it execs) only then, so it never sends a packet before guestnet serves its link.
:meth:`close` (or leaving the ``with`` block) stops the thread and removes everything the
network made: sockets, TAP devices, socket files, the capture file's descriptor, timers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from guestnet.api import Api, ApiServer, StartError, control_view, start_control
from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.harden import Hardening
from guestnet.io.harden import apply as apply_hardening
from guestnet.io.links import DgramLink, StreamServer
from guestnet.io.loop import EPOLLIN, Loop
from guestnet.io.netns import (
    TapSetup,
    open_tap_in,
    reap,
    resolv_conf_text,
    resolve_target,
    spawn_in_new_namespaces,
)
from guestnet.io.tap import DEFAULT_OFFLOADS, TapLink, check_ifname, open_tap
from guestnet.io.vhost_user import VhostUserServer
from guestnet.io.vhost_user import qemu_args as vhost_qemu_args

T = TypeVar("T")

__all__ = ["Child", "Network", "StartError"]


class Child:
    """A command :meth:`Network.spawn` runs in new namespaces; ``returncode`` once it exits.

    ``returncode`` is as :mod:`subprocess` gives it: the exit status, or -N when signal N
    killed it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the command (nothing if it has exited)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class Network:
    """A user-mode network: guests attach, the loop runs, the operator reads and commands.

    ``loop``: a :class:`~guestnet.io.loop.Loop` of the caller's (tests pass one with a scripted
    clock); ``echo_mode``: see :class:`~guestnet.assembly.Instance`.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        loop: Loop | None = None,
        echo_mode: str | None = "probe",
    ) -> None:
        self.config = config if config is not None else Config()
        self._inst = Instance(self.config, loop, echo_mode)
        self._api = Api(control_view(self._inst))
        self._services: ApiServer | None = None
        self._services_started = False
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._go: list[socket.socket] = []
        self.closed = False

    @property
    def loop(self) -> Loop:
        """The datapath's loop, for code that runs on it (its own fds and timers)."""
        return self._inst.loop

    @property
    def instance(self) -> Instance:
        """The assembled datapath underneath (for tests and benchmarks that reach inside)."""
        return self._inst

    # -- attaching guests -------------------------------------------------------------------------

    def listen_qemu(
        self, path: str | None = None, *, host: str | None = None, port: int = 0
    ) -> str:
        """Serve QEMU's ``-netdev stream`` on a unix socket ``path`` (mode 0600) or on TCP.

        Returns the QEMU arguments that connect to it. Every connection is a guest link.
        """
        mac = self.config.guest_mac.hex(":")
        if path is not None:
            path = os.path.abspath(path)
            server = self._call(lambda: StreamServer.listen_unix(self._inst.hub, path))
            addr = f"addr.type=unix,addr.path={path}"
        else:
            where = host or "127.0.0.1"
            server = self._call(lambda: StreamServer.listen_tcp(self._inst.hub, where, port))
            addr = f"addr.type=inet,addr.host={where},addr.port={server.sock.getsockname()[1]}"
        self._inst.on_close(server.close)
        device = f"-device virtio-net-pci,netdev=net0,mac={mac}"
        return f"-netdev stream,id=net0,server=off,{addr} {device}"

    def listen_vhost_user(self, path: str, *, memory: str = "1G", host_mtu: int = 0) -> str:
        """Serve vhost-user-net on a unix socket ``path`` (mode 0600); x86-64 only.

        Returns the QEMU 7.2 arguments that connect to it (shared memfd memory of ``memory``,
        which must equal ``-m``). One front-end at a time; a reconnecting QEMU gets a new link.
        """
        path = os.path.abspath(path)
        offloads = self.config.offloads
        server = self._call(lambda: VhostUserServer(self._inst.hub, path, offloads))
        self._inst.on_close(server.close)
        mac = self.config.guest_mac.hex(":")
        return vhost_qemu_args(path, mac, memory, host_mtu)

    def attach_dgram(self, path: str) -> str:
        """Bind a unix datagram socket at ``path`` (QEMU ``-netdev dgram``, vfkit).

        Returns the QEMU arguments (the guest's own socket path is QEMU's to choose).
        """
        path = os.path.abspath(path)
        self._call(lambda: DgramLink.bind_unix(self._inst.hub, path))
        mac = self.config.guest_mac.hex(":")
        return (
            f"-netdev dgram,id=net0,local.type=unix,local.path=GUEST_SOCKET,remote.type=unix,"
            f"remote.path={path} -device virtio-net-pci,netdev=net0,mac={mac}"
        )

    def attach_tap(
        self,
        fd: int,
        ifname: str | None = None,
        name: str = "tap0",
        offloads: bool | None = None,
    ) -> TapLink:
        """Serve an open TAP fd (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``); the network owns it.

        ``offloads``: ask the kernel for checksum and segmentation offloads on this TAP
        (None: as ``config.offloads`` says).
        """
        if offloads is None:
            offloads = self.config.offloads
        flags = DEFAULT_OFFLOADS if offloads else 0
        return self._call(lambda: TapLink(self._inst.hub, fd, name, ifname, flags))

    def open_tap(self, ifname: str, *, offloads: bool | None = None) -> TapLink:
        """Serve TAP interface ``ifname`` of guestnet's own network namespace (``--tap``): made
        here if it does not exist (it goes away with guestnet), opened as it is if it does
        (``ip tuntap add IFNAME mode tap``). Its port is named ``ifname``. The interface's
        address, MTU and state are the guest's business; moved into another namespace (``ip
        link set IFNAME netns NS``) it stays served. ``offloads`` as for :meth:`attach_tap`.
        ValueError for a bad name; OSError when the kernel refuses (no CAP_NET_ADMIN, a TUN
        device of that name, one already open elsewhere).
        """
        check_ifname(ifname)
        fd = open_tap(ifname)
        try:
            return self.attach_tap(fd, ifname, name=ifname, offloads=offloads)
        except BaseException:
            os.close(fd)
            raise

    def attach_netns(
        self,
        target: str,
        *,
        ifname: str = "eth0",
        configure: bool = False,
        userns: str | None = None,
        userns_optional: bool = False,
        adopt_existing: bool = False,
        index: int = 0,
    ) -> TapLink:
        """Create a TAP ``ifname`` in an existing network namespace and serve it.

        ``target``: a PID, ``/proc/PID/ns/net``, a path under ``/run/netns`` or a name there.
        ``configure``: bring ``lo`` and the interface up with address, route and MTU (else it
        is left down for the guest's own DHCP client). ``userns``: the user namespace owning the
        target (a PID's own is found by itself); ``userns_optional``: go on when joining it
        fails. ``adopt_existing``: an interface ``ifname`` that already exists is opened and
        served as it is, not configured. ``index``: the namespace's rank among those this
        network serves: guest N gets the guest MAC and addresses plus N, and its port is named
        ``tapN`` (``TapSetup.from_config``). ValueError for a bad name or target; OSError or
        :class:`~guestnet.io.netns.HelperError` when the namespace work fails.
        """
        check_ifname(ifname)
        netns_path, pid_userns = resolve_target(target)
        if userns is not None and not os.path.exists(userns):
            raise ValueError(f"no such user namespace: {userns}")
        setup = TapSetup.from_config(self.config, ifname, configure, index)
        fd = open_tap_in(
            netns_path,
            userns or pid_userns,
            setup,
            userns_optional=userns_optional,
            adopt_existing=adopt_existing,
        )
        if configure:
            self._call(lambda: self._configured(setup))
        if configure and self.config.ipv6:
            self._inst.guest_ip6_configured = True
        return self.attach_tap(fd, ifname, name=f"tap{index}")

    def _configured(self, setup: TapSetup) -> None:
        """A guest guestnet gave its address: DHCP holds that address for its MAC, and the
        switch knows where it is before the guest has said a word (published ports find it)."""
        mac = bytes.fromhex(setup.mac.replace(":", ""))
        ip = ipaddress.IPv4Address(setup.address)
        self._inst.dhcp.reserve(mac, ip)
        self._inst.switch.learn_ip4(ip.packed, mac)

    def spawn(self, cmd: Sequence[str], *, ifname: str = "eth0") -> Child:
        """Run ``cmd`` in new network and mount namespaces (and a user namespace when not root)
        whose interface this network serves, configured, with guestnet's DNS in resolv.conf.

        The command starts (execs) once the network serves: on the first :meth:`run`,
        :meth:`start` or :meth:`start_services`. ``Child.returncode`` is set when it exits.
        """
        check_ifname(ifname)
        setup = TapSetup.from_config(self.config, ifname, configure=True)
        pid, fd, go = spawn_in_new_namespaces(setup, list(cmd), resolv_conf_text(self.config))
        self._inst.guest_ip6_configured = self.config.ipv6
        child = Child(pid)
        try:
            self.attach_tap(fd, ifname)
            self._call(lambda: self._watch_child(child))
        except BaseException:
            go.close()
            os.kill(pid, signal.SIGKILL)
            reap(pid)
            raise
        self._go.append(go)
        if self._services_started:
            self._let_go()
        return child

    def _watch_child(self, child: Child) -> None:
        loop = self._inst.loop
        pidfd = os.pidfd_open(child.pid)

        def on_exit(_events: int) -> None:
            done, wstatus = os.waitpid(child.pid, os.WNOHANG)
            if done:
                child.returncode = os.waitstatus_to_exitcode(wstatus)
                loop.remove_fd(pidfd)
                os.close(pidfd)

        def on_close() -> None:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.returncode = reap(child.pid)
                loop.remove_fd(pidfd)
                os.close(pidfd)

        loop.add_fd(pidfd, EPOLLIN, on_exit)
        self._inst.on_close(on_close)

    def _let_go(self) -> None:
        while self._go:
            go = self._go.pop()
            with contextlib.suppress(OSError):
                go.sendall(b"g")
            go.close()

    # -- running ----------------------------------------------------------------------------------

    def start_services(self) -> None:
        """Open the capture, bind the ``-p`` forwards, then the API socket; let spawned
        commands go. Once; :meth:`run` and :meth:`start` call it. Raises :class:`StartError`."""
        if self._services_started:
            return
        self._services_started = True
        self._services = self._call(lambda: start_control(self._inst))
        self._let_go()

    def harden(self, hardening: Hardening) -> None:
        """Start the services, then drop what the loop does not need (``--runas``,
        ``--sandbox``, ``--seccomp``; :mod:`guestnet.io.harden`), for good, in this process.

        Call it once everything is attached and before :meth:`run` (not with :meth:`start`:
        a user namespace needs a single-threaded process). Raises :class:`StartError` like
        :meth:`start_services`, OSError when a step fails (or libseccomp is missing).
        """
        if self._thread is not None:
            raise RuntimeError("harden() before start(): the loop's thread already runs")
        self.start_services()
        apply_hardening(hardening)

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> None:
        """Run the loop in this thread until :meth:`stop`, a signal the loop handles,
        ``until()`` turning true (checked after each turn) or ``timeout`` seconds."""
        if self._thread is not None:
            raise RuntimeError("the network already runs in a thread of its own")
        self.start_services()
        loop = self._inst.loop
        if timeout is None:
            loop.run(until)
            return
        deadline = time.monotonic() + timeout

        def done() -> bool:
            return (until is not None and until()) or time.monotonic() >= deadline

        loop.call_later(timeout, lambda _now: None)  # wakes the wait at the deadline
        loop.run(done)

    def start(self) -> None:
        """Run the loop in a thread of its own (daemon); calls from other threads are handed
        to it. :meth:`stop` or :meth:`close` end it."""
        if self._thread is not None:
            return
        self.start_services()
        loop = self._inst.loop
        loop.enable_threadsafe()

        def main() -> None:
            try:
                loop.run()
            except BaseException as exc:  # reported by stop()/close()
                self._thread_error = exc

        self._thread = threading.Thread(target=main, name="guestnet-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End :meth:`run` after its current turn, or stop and join the loop's thread."""
        loop = self._inst.loop
        thread = self._thread
        if thread is None:
            loop.stop()
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(lambda _now: loop.stop())
            thread.join()
        self._thread = None
        error, self._thread_error = self._thread_error, None
        if error is not None:
            raise RuntimeError("the network's loop thread failed") from error

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop's thread (here, unless the loop runs in a thread of its own)."""
        thread = self._thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return fn()
        future: Future[T] = Future()

        def run(_now: float) -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._inst.loop.call_soon_threadsafe(run)
        return future.result()

    # -- reading and commanding -------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """What ``GET /stats`` answers: links, drops by reason, flows, pools, forwards (and
        ``policy``, the egress rules with their hits, when there are any)."""
        return self._call(lambda: self._api.stats(self._inst.loop.now()))

    def policy(self) -> list[dict[str, object]]:
        """What ``GET /policy`` answers: the egress rules in order, each with its hits."""
        return self._call(lambda: self._api.policy(self._inst.loop.now()))

    def flows(self) -> list[dict[str, object]]:
        """What ``GET /flows`` answers: every live TCP, UDP and ICMP flow."""
        return self._call(lambda: self._api.flows(self._inst.loop.now()))

    def leases(self) -> list[object]:
        """What ``GET /leases`` answers: the DHCP leases."""
        return self._call(lambda: self._api.leases(self._inst.loop.now()))

    def forwards(self) -> list[dict[str, object]]:
        """What ``GET /forwards`` answers."""
        return self._call(lambda: self._inst.forwards.to_json(self._inst.loop.now()))

    def add_forward(
        self,
        proto: str,
        host_port: int,
        guest_port: int,
        host_ip: str = "127.0.0.1",
        guest_ip: str | None = None,
    ) -> dict[str, object]:
        """Publish a host port into the guest; returns it as ``/forwards`` shows it (with the
        port the kernel chose when ``host_port`` is 0). Raises
        :class:`~guestnet.io.forwards.ForwardError` (with an HTTP-like ``status``)."""

        def add() -> dict[str, object]:
            fwd = self._inst.forwards.add(proto, host_port, guest_port, host_ip, guest_ip)
            return fwd.to_json(self._inst.forwards.guest_ip_for(fwd), self._inst.loop.now())

        return self._call(add)

    def remove_forward(self, forward_id: str) -> None:
        """Remove a forward by id; its established connections keep running."""
        self._call(lambda: self._inst.forwards.remove(forward_id))

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the loop's thread if any, then close every link, socket and file (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._thread is not None:
                self.stop()
        finally:
            for go in self._go:
                go.close()
            self._go.clear()
            self._inst.close()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
