"""Real clients of slirp4netns mode: podman 4.3.1 and rootlesskit 1.1.0 (Debian) running
``guestnet-slirp4netns`` as their slirp4netns, inside the tests' loopback-only sandbox.

podman runs rootful with its state in a temp dir (``--root/--runroot``, vfs storage, runc,
cgroupfs, file events: COMPAT.md's recipe) on an image imported from a directory holding
busybox-static. It is entered into the sandbox with ``nsenter --net`` in a private mount
namespace (``ip netns exec`` remounts /sys and runc then finds no cgroup mount), where
``/etc/resolv.conf`` names a dnsmasq on the sandbox's 127.0.0.1: guestnet, started by podman,
forwards the container's DNS there. rootlesskit runs as root with a ``root:100000:65536``
subordinate id file bound over /etc/subuid and /etc/subgid in a private mount namespace.
Skipped where the tools are not installed (scripts/setup installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nsutil import DNSMASQ, Netns, wait_for

pytestmark = pytest.mark.root

SCRIPT = Path(sys.executable).parent / "guestnet-slirp4netns"
BUSYBOX = "/bin/busybox"
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None and not os.path.exists(tool):
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    if not SCRIPT.exists():
        pytest.skip("guestnet-slirp4netns is not installed (pip install -e .)")


def _busybox_rootfs(root: Path) -> None:
    """A container root: busybox-static and the applets the test runs, and a web page."""
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "httpd", "nc", "nslookup", "cat", "sleep", "printf", "tail", "ip"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("www", "etc", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir()
    (root / "www" / "index.html").write_text("hello-from-podman\n")


def _in_sandbox(sandbox: Netns, script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``sh -c SCRIPT`` in the sandbox's network namespace and a private mount namespace."""
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "nsenter", f"--net={sandbox.path}",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_podman_run_with_both_port_handlers(sandbox: Netns, tmp_path: Path) -> None:
    _need("podman", "runc", "conmon", BUSYBOX, DNSMASQ, "nsenter")
    rootfs = tmp_path / "rootfs"
    _busybox_rootfs(rootfs)
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF)
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "host.txt").write_text("host-loopback-ok\n")
    # podman refuses a runroot longer than 50 characters: its state goes to a short temp dir.
    state = Path(tempfile.mkdtemp(prefix="gnpm-"))
    podman = (
        f"podman --root {state}/root --runroot {state}/runroot --tmpdir {state}/tmp "
        "--storage-driver vfs "
        f"--network-cmd-path {SCRIPT}"
    )
    script = f"""
set -e
export CONTAINERS_CONF={tmp_path}/containers.conf
mount --bind {tmp_path}/resolv.conf /etc/resolv.conf
{DNSMASQ} --no-resolv --no-hosts --keep-in-foreground --conf-file=/dev/null --pid-file= \\
  --user=root --local=/test.internal/ --address=/www.test.internal/198.18.0.10 --port=53 \\
  --listen-address=127.0.0.1 --bind-interfaces &
{sys.executable} -m http.server 18081 --bind 127.0.0.1 --directory {tmp_path}/web \\
  >/dev/null 2>&1 &
trap '{podman} rm -af -t 0 >/dev/null 2>&1 || true; kill $(jobs -p) 2>/dev/null || true' EXIT
tar -C {rootfs} -c . | {podman} import - localhost/gnbusybox >/dev/null
# 1: the default port handler (rootlessport), which needs the container at 10.0.2.100.
{podman} run -d --name web1 --network slirp4netns -p 127.0.0.1:18080:80 \\
  localhost/gnbusybox httpd -f -p 80 -h /www >/dev/null
sleep 1
echo "web1: $(busybox wget -q -O - http://127.0.0.1:18080/)"
echo "web1 ip: $({podman} exec web1 ip -4 addr show tap0 | grep -o 10.0.2.100/24)"
echo "web1 loopback: $({podman} exec web1 sh -c 'nc -w 3 10.0.2.2 18081 </dev/null; echo rc=$?')"
{podman} rm -f -t 0 web1 >/dev/null
# 2: port_handler=slirp4netns: the port goes through our API socket; host loopback allowed.
{podman} run -d --name web2 \\
  --network slirp4netns:port_handler=slirp4netns,allow_host_loopback=true \\
  -p 127.0.0.1:18082:80 localhost/gnbusybox httpd -f -p 80 -h /www >/dev/null
sleep 1
echo "web2: $(busybox wget -q -O - http://127.0.0.1:18082/)"
echo "web2 loopback: $({podman} exec web2 sh -c \\
  'printf "GET /host.txt HTTP/1.0\\r\\n\\r\\n" | nc 10.0.2.2 18081 | tail -1')"
echo "web2 dns: $({podman} exec web2 nslookup www.test.internal 10.0.2.3 | grep 198.18.0.10)"
echo "web2 resolv: $({podman} exec web2 cat /etc/resolv.conf | head -1)"
{podman} rm -f -t 0 web2 >/dev/null
echo done
"""
    try:
        proc = _in_sandbox(sandbox, script, timeout=120)
        out = proc.stdout
        assert proc.returncode == 0 and "done" in out, out + proc.stderr
        assert "web1: hello-from-podman" in out
        assert "web1 ip: 10.0.2.100/24" in out
        # podman's default: --disable-host-loopback, so the gateway refuses the host's loopback.
        assert "web1 loopback: rc=1" in out
        assert "web2: hello-from-podman" in out
        assert "web2 loopback: host-loopback-ok" in out
        assert "web2 dns: Address: 198.18.0.10" in out
        assert "web2 resolv: nameserver 10.0.2.3" in out
        wait_for(lambda: not _helpers_running(), 10, "no guestnet-slirp4netns left")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _helpers_running() -> bool:
    out = subprocess.run(["pgrep", "-f", str(SCRIPT)], capture_output=True, text=True, check=False)
    return bool(out.stdout.strip())


FETCH = """
import socket, sys
try:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    print(c.recv(100).decode())
except OSError as e:
    print(type(e).__name__)
"""

CHILD = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(8)
open("READY", "w").close()
while True:
    c, _ = s.accept()
    c.sendall(b"hello-from-rootlesskit")
    c.close()
"""


def test_rootlesskit_with_slirp4netns_port_driver(sandbox: Netns, tmp_path: Path) -> None:
    _need("rootlesskit", "rootlessctl", "newuidmap", "nsenter")
    (tmp_path / "subid").write_text("root:100000:65536\n")
    (tmp_path / "child.py").write_text(CHILD.replace("READY", str(tmp_path / "ready")))
    state = tmp_path / "state"
    script = f"""
mount --bind {tmp_path}/subid /etc/subuid && mount --bind {tmp_path}/subid /etc/subgid &&
exec rootlesskit --net=slirp4netns --slirp4netns-binary={SCRIPT} --port-driver=slirp4netns \\
  --disable-host-loopback --state-dir={state} {sys.executable} {tmp_path}/child.py
"""
    kit = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "nsenter", f"--net={sandbox.path}",
         "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def ready() -> bool:
            if kit.poll() is not None:
                raise AssertionError(
                    f"rootlesskit exited: {kit.stdout.read() if kit.stdout else ''}"
                )
            return (tmp_path / "ready").exists() and (state / "api.sock").exists()

        wait_for(ready, 20, "rootlesskit's child to listen")
        ctl = ["rootlessctl", "--socket", str(state / "api.sock")]
        added = sandbox.run([*ctl, "add-ports", "127.0.0.1:18090:80/tcp"]).stdout.strip()
        assert added == "1"
        fetch = [sys.executable, "-c", FETCH, "18090"]
        assert sandbox.run(fetch).stdout.strip() == "hello-from-rootlesskit"
        listed = sandbox.run([*ctl, "list-ports"]).stdout
        assert "127.0.0.1" in listed and "18090" in listed and "80" in listed
        sandbox.run([*ctl, "remove-ports", "1"])
        assert sandbox.run(fetch).stdout.strip() == "ConnectionRefusedError"
        assert sandbox.run([*ctl, "list-ports"]).stdout.count("\n") == 1  # the header alone
    finally:
        kit.terminate()
        try:
            kit.wait(10)
        except subprocess.TimeoutExpired:
            kit.kill()
            kit.wait(5)
    # rootlesskit kills its slirp4netns with SIGKILL: nothing of guestnet stays behind.
    wait_for(lambda: not _helpers_running(), 10, "no guestnet-slirp4netns left")
