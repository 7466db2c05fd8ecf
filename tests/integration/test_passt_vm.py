"""passt mode, run with libvirt 9's argv (COMPAT.md) through a ``passt`` symlink, then the QEMU
test VM booted on its socket as libvirt boots it (``-netdev stream,...,server=off``).

One boot (TCG, about 6 s): libvirt waits for the parent's exit 0 before starting QEMU, so the
socket must listen by then; the guest's DHCP lease carries ``--address`` and ``--mtu``; the
gateway answers ping; ``--tcp-ports 18080:8080`` reaches the guest's httpd from the sandbox's
loopback; the QEMU line is in ``--log-file``; ``--one-off`` ends the daemon once QEMU is gone,
and the socket file goes with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nsutil import wait_for
from vm.fixtures import VmImage, vm_image, vm_sock_dir  # noqa: F401
from vm.qemu import GUEST_MAC, in_netns, parse_sections, sandbox_netns, start_vm, stream_netdev

pytestmark = [pytest.mark.root, pytest.mark.vm]

VM_TIMEOUT_S = 60.0
MARKER = "@@GUESTNET-HTTPD-UP@@"

SCRIPT = f"""
section dhcp udhcpc -i eth0 -n -q -t 3 -T 1
section ping ping -c 1 -W 3 10.0.2.2
mkdir -p /www
echo passt-mode-ok > /www/index.html
section httpd httpd -p 8080 -h /www
echo "{MARKER}"
sleep 60
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_libvirt_argv_then_qemu_boots_on_the_socket(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    guestnet = Path(sys.executable).parent / "guestnet"
    if not guestnet.exists():
        pytest.skip("guestnet is not installed (pip install -e .)")
    passt = tmp_path / "passt"
    passt.symlink_to(guestnet)
    sock = vm_sock_dir / "dom-net0.socket"
    log = tmp_path / "passt.log"
    pid_file = tmp_path / "passt.pid"
    with sandbox_netns() as netns:
        try:
            # libvirt 9.0 (qemu_passt.c), plus --pid as newer libvirt passes it.
            done = subprocess.run(
                in_netns(netns, [str(passt), "--one-off", "--socket", str(sock),
                                 "--mac-addr", GUEST_MAC, "--mtu", "65520",
                                 "--log-file", str(log), "--address", "10.0.2.15",
                                 "--netmask", "24", "--tcp-ports", "18080:8080",
                                 "--pid", str(pid_file)]),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert sock.exists()  # listening before the parent's exit
            daemon = int(pid_file.read_text())
            assert _alive(daemon)
            hint = log.read_text()
            assert "You can now start qemu" in hint
            assert f"addr.path={sock}" in hint

            initrd = vm_image.initrd_with_script(SCRIPT, tmp_path / "initrd.img")
            with start_vm(
                vm_image.kernel, initrd, stream_netdev(sock), tmp_path, netns=netns
            ) as vm:
                vm.wait_for(rf"^{MARKER}$", timeout_s=VM_TIMEOUT_S)
                fetch = subprocess.run(
                    in_netns(netns, ["curl", "-sSf", "--max-time", "10",
                                     "http://127.0.0.1:18080/index.html"]),
                    capture_output=True, text=True, timeout=20,
                )  # fmt: skip
                result = vm.stop()
            sections = parse_sections(result.console)
            assert sections["dhcp"][1] == 0, result.describe()
            bound = re.search(r"^@@GUESTNET-DHCP bound (.*)@@$", result.console, re.M)
            assert bound, result.describe()
            lease = dict(kv.split("=", 1) for kv in bound[1].split() if "=" in kv)
            assert (lease["ip"], lease["router"], lease["mtu"]) == (
                "10.0.2.15",
                "10.0.2.2",
                "65520",
            )
            assert sections["ping"][1] == 0, result.describe()
            assert fetch.stdout.strip() == "passt-mode-ok", fetch.stderr + log.read_text()
            # --one-off: QEMU is gone, so is the daemon, and its socket file.
            wait_for(lambda: not _alive(daemon), 10, "the passt-mode daemon to exit")
            assert not sock.exists()
        finally:
            if pid_file.exists():
                pid = int(pid_file.read_text())
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
