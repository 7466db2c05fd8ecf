"""Drive the test VM: a sandbox namespace, the guestnet process, QEMU, and the serial console.

Theory of operation: a test makes a loopback-only network namespace (`sandbox_netns`), starts
guestnet inside it (`background_process` with `guestnet_argv`) and waits for guestnet's unix socket
to appear, then boots QEMU (`run_vm`, or `start_vm` to act while the guest runs) in the same
namespace with the matching netdev arguments (`stream_netdev` or `dgram_netdev`); `guestnet_vm`
does all of that in one block. QEMU runs under TCG with the kernel's console on ttyS0 written to a
file; the guest's /init runs the test's script and powers off, QEMU exits, and the console text
comes back in a VmResult. `parse_sections` extracts the output of each `section NAME CMD` the
script ran.

Every process is killed and every namespace deleted on the way out, also when the test fails.
Unix sockets bound to a path are reachable from any network namespace; running guestnet and QEMU in
the sandbox keeps everything either of them might send confined to its loopback. Note that QEMU 7.2
does not fail when the stream socket is missing: the guest boots with a dead link, so wait for the
socket before booting (as `guestnet_vm` does).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .initramfs import GuestKernel, VmImage

QEMU_BINARY = "qemu-system-x86_64"
GUEST_MAC = "52:54:00:12:34:56"
BOOT_TIMEOUT_S = 90.0
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3 tsc=unstable"

_netns_counter = itertools.count()


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


@contextmanager
def sandbox_netns(prefix: str = "gnvm") -> Iterator[str]:
    """A fresh network namespace whose only interface is lo (up); deleted on exit."""
    name = f"{prefix}{os.getpid()}_{next(_netns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """argv run inside netns (`ip netns exec` execs it, so the pid stays that of argv[0])."""
    return [*(["ip", "netns", "exec", netns] if netns else []), *argv]


def guestnet_argv(mode: str, socket_path: Path, *extra: str) -> list[str]:
    """The command line of guestnet serving one QEMU link: mode is "qemu" (stream) or "dgram".

    The interpreter running the tests runs guestnet too, so the checkout under test is the one
    that answers.
    """
    return [sys.executable, "-m", "guestnet", mode, "--socket", str(socket_path), *extra]


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


@dataclass
class BackgroundProcess:
    """A process started for a test, with its combined output going to `log_path`."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def background_process(
    argv: Sequence[str],
    log_path: Path,
    *,
    netns: str | None = None,
    wait_for_path: Path | None = None,
    timeout_s: float = 10.0,
) -> Iterator[BackgroundProcess]:
    """Run argv (in netns) until the block ends; first wait for `wait_for_path` to exist.

    Raises RuntimeError with the process's output if it exits before the path appears or the
    timeout passes. The process gets SIGTERM, then SIGKILL, on exit.
    """
    with log_path.open("wb") as log:
        proc = subprocess.Popen(in_netns(netns, argv), stdout=log, stderr=subprocess.STDOUT)
    bg = BackgroundProcess(proc, log_path)
    try:
        if wait_for_path is not None:
            deadline = time.monotonic() + timeout_s
            while not wait_for_path.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode}:\n{bg.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{wait_for_path} did not appear in {timeout_s} s:\n{bg.log()}"
                    )
                time.sleep(0.02)
        yield bg
    finally:
        _stop(proc)


def wait_listening(netns: str, port: int, proto: str, what: str, timeout_s: float = 10.0) -> None:
    """Poll `ss` in the sandbox until something listens on `port` (proto "t" or "u")."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            in_netns(netns, ["ss", "-Hnl" + proto, f"sport = :{port}"]),
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        if out.strip():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not listening on port {port} after {timeout_s} s")
        time.sleep(0.05)


def stream_netdev(socket_path: Path) -> list[str]:
    """QEMU connects to a stream socket that guestnet listens on (4-byte length framing)."""
    return ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={socket_path}"]


def vhost_user_netdev(
    socket_path: Path, memory_mb: int = 256, reconnect: bool = False
) -> list[str]:
    """QEMU connects to guestnet's vhost-user socket; guest memory must be a shared memfd of the
    guest's size. ``vectors=0`` (INTx): QEMU 7.2 crashes with MSI-X vhost notifiers under TCG.
    ``reconnect``: QEMU retries the socket every second after losing guestnet."""
    chardev = f"socket,id=chr0,path={socket_path}" + (",reconnect=1" if reconnect else "")
    return [
        "-object", f"memory-backend-memfd,id=mem0,size={memory_mb}M,share=on",
        "-numa", "node,memdev=mem0",
        "-chardev", chardev,
        "-netdev", "vhost-user,id=n0,chardev=chr0",
        "-global", "virtio-net-pci.vectors=0",
    ]  # fmt: skip


def dgram_netdev(local_path: Path, remote_path: Path) -> list[str]:
    """QEMU binds local_path and sends one frame per datagram to guestnet's remote_path."""
    return [
        "-netdev",
        f"dgram,id=n0,local.type=unix,local.path={local_path},"
        f"remote.type=unix,remote.path={remote_path}",
    ]


@dataclass
class VmResult:
    console: str  # the serial console, \r\n turned into \n
    returncode: int | None  # None when the boot timed out and QEMU was killed
    timed_out: bool
    qemu_log: str  # QEMU's own stdout/stderr

    def section(self, name: str) -> str:
        """The output of the guest's `section NAME ...`; AssertionError (showing the console) when
        the guest never finished that section."""
        sections = parse_sections(self.console)
        if name not in sections:
            raise AssertionError(f"no section {name!r} in the guest console:\n{self.describe()}")
        return sections[name][0]

    def describe(self) -> str:
        state = "timed out" if self.timed_out else f"exit {self.returncode}"
        return f"QEMU {state}\n--- console ---\n{self.console}\n--- qemu ---\n{self.qemu_log}"


_SECTION_RE = re.compile(
    r"^@@GUESTNET-BEGIN (?P<name>\S+)@@\n(?P<body>.*?)^@@GUESTNET-END (?P=name) rc=(?P<rc>\d+)@@$",
    re.MULTILINE | re.DOTALL,
)


def parse_sections(console: str) -> dict[str, tuple[str, int]]:
    """{name: (output, exit status)} for every `section` the guest script completed."""
    return {m["name"]: (m["body"], int(m["rc"])) for m in _SECTION_RE.finditer(console)}


def qemu_argv(
    kernel: GuestKernel,
    initrd: Path,
    console_path: Path,
    netdev: Sequence[str],
    *,
    mac: str = GUEST_MAC,
    memory_mb: int = 256,
    cmdline: str = KERNEL_CMDLINE,
) -> list[str]:
    binary = qemu_binary() or QEMU_BINARY
    return [
        binary,
        "-nodefaults",
        "-no-user-config",
        "-machine", "q35",
        "-accel", "tcg",
        "-m", str(memory_mb),
        "-smp", "1",
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{console_path}",
        "-no-reboot",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        "-append", cmdline,
        *netdev,
        # romfile= skips the iPXE option ROM: we boot the kernel directly, never from the network.
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
    ]  # fmt: skip


class RunningVm:
    """A booted QEMU whose console a test can watch while the guest runs (for a guest-side server
    that the host must reach before the guest's script ends)."""

    def __init__(self, proc: subprocess.Popen[bytes], console_path: Path, qemu_log_path: Path):
        self.proc = proc
        self.console_path = console_path
        self.qemu_log_path = qemu_log_path
        self._result: VmResult | None = None

    def console(self) -> str:
        if not self.console_path.exists():
            return ""
        return self.console_path.read_bytes().decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout_s: float = BOOT_TIMEOUT_S) -> re.Match[str]:
        """Poll the console until `pattern` (a regex, MULTILINE) appears.

        AssertionError, with the console, if QEMU exits first or the timeout passes.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(self.console())
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited before {pattern!r}:\n{self.stop().describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {timeout_s} s:\n{self.stop().describe()}")
            time.sleep(0.05)

    def wait(self, timeout_s: float = BOOT_TIMEOUT_S) -> VmResult:
        """Wait for the guest to power off; kill QEMU if it has not after `timeout_s`."""
        timed_out = False
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        return self._finish(timed_out)

    def stop(self) -> VmResult:
        """Kill QEMU now (if it still runs) and return what the guest printed."""
        return self._finish(self.proc.poll() is None)

    def _finish(self, timed_out: bool) -> VmResult:
        if self._result is None:
            _stop(self.proc, grace_s=2.0)
            self._result = VmResult(
                console=self.console(),
                returncode=None if timed_out else self.proc.returncode,
                timed_out=timed_out,
                qemu_log=self.qemu_log_path.read_text(errors="replace"),
            )
        return self._result


@contextmanager
def start_vm(
    kernel: GuestKernel,
    initrd: Path,
    netdev: Sequence[str],
    workdir: Path,
    *,
    netns: str | None = None,
    mac: str = GUEST_MAC,
) -> Iterator[RunningVm]:
    """Start QEMU and return at once; QEMU is killed when the block ends."""
    console_path = workdir / "console.log"
    qemu_log_path = workdir / "qemu.log"
    console_path.unlink(missing_ok=True)
    argv = qemu_argv(kernel, initrd, console_path, netdev, mac=mac)
    with qemu_log_path.open("wb") as log:
        proc = subprocess.Popen(in_netns(netns, argv), stdout=log, stderr=subprocess.STDOUT)
    vm = RunningVm(proc, console_path, qemu_log_path)
    try:
        yield vm
    finally:
        vm.stop()


def run_vm(
    kernel: GuestKernel,
    initrd: Path,
    netdev: Sequence[str],
    workdir: Path,
    *,
    netns: str | None = None,
    timeout_s: float = BOOT_TIMEOUT_S,
    mac: str = GUEST_MAC,
) -> VmResult:
    """Boot the guest, wait until it powers off (or the timeout passes: then kill it), and return
    the console. Never raises for the guest's failures: assert on the result."""
    with start_vm(kernel, initrd, netdev, workdir, netns=netns, mac=mac) as vm:
        return vm.wait(timeout_s)


@dataclass
class GuestnetVm:
    """guestnet running in a sandbox namespace, ready for guests to be booted against it.

    Host-side servers for the guest to reach belong in `netns` too (start them with
    `background_process(..., netns=gv.netns)`): guestnet's host sockets live there.
    """

    image: VmImage
    netns: str
    guestnet: BackgroundProcess
    netdev: list[str]
    workdir: Path

    def start(
        self, script: str, *, mac: str = GUEST_MAC, name: str = ""
    ) -> AbstractContextManager[RunningVm]:
        """Boot a guest running `script` and return at once (see RunningVm).

        Several guests at once (issue 15: one switch) each need a `name` (their initrd, console
        and QEMU log go in a subdirectory of that name) and a MAC of their own.
        """
        workdir = self.workdir / name if name else self.workdir
        workdir.mkdir(exist_ok=True)
        initrd = self.image.initrd_with_script(script, workdir / "initrd.img")
        return start_vm(self.image.kernel, initrd, self.netdev, workdir, netns=self.netns, mac=mac)

    def boot(self, script: str, timeout_s: float = BOOT_TIMEOUT_S) -> VmResult:
        """Boot a guest running `script` until it powers off. Fails the test if the guest does not
        power off in time or guestnet died meanwhile."""
        with self.start(script) as vm:
            result = vm.wait(timeout_s)
        self.assert_alive(result)
        assert not result.timed_out, result.describe()
        return result

    def assert_alive(self, result: VmResult | None = None) -> None:
        if self.guestnet.proc.poll() is not None:
            extra = result.describe() if result else ""
            raise AssertionError(
                f"guestnet exited with {self.guestnet.proc.returncode}:\n{self.guestnet.log()}\n"
                + extra
            )


@contextmanager
def guestnet_vm(
    image: VmImage,
    mode: str,
    workdir: Path,
    sock_dir: Path,
    *,
    guestnet_args: Sequence[str] = (),
) -> Iterator[GuestnetVm]:
    """A sandbox namespace with guestnet in it serving one QEMU link.

    mode: "qemu" (QEMU -netdev stream to guestnet's listening unix socket), "dgram" (QEMU
    -netdev dgram to guestnet's bound unixgram socket) or "vhost-user" (QEMU -netdev vhost-user
    to guestnet's listening unix socket, guest memory shared). guestnet_args go after the
    subcommand.
    """
    guestnet_sock = sock_dir / "guestnet.sock"
    if mode == "qemu":
        netdev = stream_netdev(guestnet_sock)
    elif mode == "dgram":
        netdev = dgram_netdev(sock_dir / "qemu.sock", guestnet_sock)
    elif mode == "vhost-user":
        netdev = vhost_user_netdev(guestnet_sock)
    else:
        raise ValueError(f"unknown guestnet mode {mode!r}")
    argv = guestnet_argv(mode, guestnet_sock, *guestnet_args)
    with (
        sandbox_netns() as netns,
        background_process(
            argv, workdir / "guestnet.log", netns=netns, wait_for_path=guestnet_sock
        ) as guestnet,
    ):
        yield GuestnetVm(image, netns, guestnet, netdev, workdir)
