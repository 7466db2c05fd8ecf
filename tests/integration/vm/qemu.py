"""Drive the test VM: a sandbox namespace, the guestnet process, QEMU, and the serial console.

Theory of operation: a test makes a loopback-only network namespace (`sandbox_netns`), starts
guestnet inside it (`background_process` with `guestnet_argv`) and waits for guestnet's unix socket
to appear, then boots QEMU (`run_vm`) in the same namespace with the matching netdev arguments
(`stream_netdev` or `dgram_netdev`). QEMU runs under TCG with the kernel's console on ttyS0 written
to a file; the guest's /init runs the test's script and powers off, QEMU exits, and `run_vm` returns
the console text. `parse_sections` extracts the output of each `section NAME CMD` the script ran.

Every process is killed and every namespace deleted on the way out, also when the test fails.
Unix sockets bound to a path are reachable from any network namespace; running guestnet and QEMU in
the sandbox keeps everything either of them might send confined to its loopback.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .initramfs import GuestKernel

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


def stream_netdev(socket_path: Path) -> list[str]:
    """QEMU connects to a stream socket that guestnet listens on (4-byte length framing)."""
    return ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={socket_path}"]


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
    console_path = workdir / "console.log"
    qemu_log_path = workdir / "qemu.log"
    argv = qemu_argv(kernel, initrd, console_path, netdev, mac=mac)
    with qemu_log_path.open("wb") as log:
        proc = subprocess.Popen(in_netns(netns, argv), stdout=log, stderr=subprocess.STDOUT)
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _stop(proc, grace_s=2.0)
    console = console_path.read_bytes().decode(errors="replace") if console_path.exists() else ""
    return VmResult(
        console=console.replace("\r\n", "\n"),
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        qemu_log=qemu_log_path.read_text(errors="replace"),
    )
