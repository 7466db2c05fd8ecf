"""``guestnet netns`` and ``guestnet run`` against the kernel's own stack as the guest.

guestnet runs in a loopback-only sandbox namespace; the guest is a namespace of the test's own
(``guest_ns``) or the one ``guestnet run`` makes. The kernel resolving the gateway by ARP through
the TAP proves the whole path: TAP creation in the right namespace, the helper's configuration,
the virtio-net framing both ways, and guestnet's ARP responder.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nsutil import (
    Guestnet,
    Netns,
    addresses,
    guestnet_argv,
    is_up,
    link_info,
    neighbour_mac,
    poke_cmd,
    wait_for,
)

import guestnet

pytestmark = pytest.mark.root

GATEWAY = "10.0.2.2"
GATEWAY_MAC = "52:55:0a:00:02:02"
GUEST_MAC = "52:54:00:12:34:56"


def _resolve_gateway(guest: Netns, gateway: str = GATEWAY, ifname: str = "eth0") -> str | None:
    """Make the guest kernel ARP for the gateway (bounded retries); the MAC it learned."""
    found: list[str] = []

    def resolved() -> bool:
        mac = neighbour_mac(guest, gateway, ifname)
        if mac:
            found.append(mac)
            return True
        guest.run(poke_cmd(gateway), check=False)
        return False

    wait_for(resolved, 5.0, "the guest to resolve the gateway", step=0.2)
    return found[0] if found else None


# -- guestnet netns ------------------------------------------------------------------------------


def test_netns_configure_resolves_gateway(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest("--mtu", "1500")
    guest = gn.guest
    assert guest is not None
    info = link_info(guest)
    assert info is not None
    assert info["address"] == GUEST_MAC
    assert info["mtu"] == 1500
    # A longer transmit queue than the kernel's 1000 at MTU 1500 (issue 12): 8 MiB of frames.
    assert info["txqlen"] == 5592
    assert info["linkinfo"]["info_kind"] == "tun"
    assert addresses(guest) == ["10.0.2.15/24"]
    assert is_up(guest, "lo")
    routes = guest.run(["ip", "route", "show", "default"]).stdout
    assert f"via {GATEWAY} dev eth0" in routes
    assert _resolve_gateway(guest) == GATEWAY_MAC
    assert gn.alive(), gn.stderr_text()


def test_netns_other_addresses(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest(
        "--subnet", "192.168.77.0/24", "--gateway", "192.168.77.1", "--dns-ip", "192.168.77.53",
        "--guest-ip", "192.168.77.9", "--guest-mac", "52:54:00:aa:bb:cc", "--ifname", "gn0",
    )  # fmt: skip
    guest = gn.guest
    assert guest is not None
    assert addresses(guest, "gn0") == ["192.168.77.9/24"]
    info = link_info(guest, "gn0")
    assert info is not None and info["address"] == "52:54:00:aa:bb:cc"
    assert _resolve_gateway(guest, "192.168.77.1", "gn0") == GATEWAY_MAC


def test_netns_without_configure_leaves_interface_down(
    attach_guest: Callable[..., Guestnet],
) -> None:
    gn = attach_guest(configure=False)
    guest = gn.guest
    assert guest is not None
    info = link_info(guest)
    assert info is not None
    assert "UP" not in info["flags"]
    assert info["address"] == GUEST_MAC  # MAC and MTU are set either way
    assert info["mtu"] == 65520
    assert info["txqlen"] == 1000  # 8 MiB of 64 KiB frames is fewer: the kernel's default
    assert addresses(guest) == []
    assert gn.alive()


def test_sigterm_removes_tap(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest()
    guest = gn.guest
    assert guest is not None
    assert gn.stop() == 0, gn.stderr_text()
    wait_for(lambda: link_info(guest) is None, 5.0, "the TAP to disappear")
    assert "Traceback" not in gn.stderr_text()


def test_second_tap_with_same_name_fails_cleanly(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, guest_ns: Netns
) -> None:
    attach_guest()
    proc = sandbox.run(guestnet_argv(["netns", guest_ns.name]), check=False, timeout=30)
    assert proc.returncode == 1
    assert "cannot create eth0" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("form", ["name", "path", "pid"])
def test_target_forms(form: str, start_gn: Callable[..., Guestnet], guest_ns: Netns) -> None:
    holder = None
    if form == "name":
        target = guest_ns.name
    elif form == "path":
        target = guest_ns.path
    else:
        holder = guest_ns.popen(["sleep", "60"])
        target = str(holder.pid)
    try:
        gn = start_gn(
            ["netns", target, "--configure"],
            ready=lambda: bool(addresses(guest_ns)),
        )
        assert _resolve_gateway(guest_ns) == GATEWAY_MAC
        assert gn.stop() == 0
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(timeout=5)


def test_missing_target_is_a_usage_error(sandbox: Netns) -> None:
    proc = sandbox.run(guestnet_argv(["netns", "no-such-ns-here"]), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-ns-here" in lines[0]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["netns", "x", "--mtu", "100"], "--mtu"),
        (["netns", "x", "--guest-ip", "10.0.3.1"], "--guest-ip"),
        (["netns", "x", "--ifname", "a-very-long-interface-name"], "--ifname"),
        (["run", "--subnet", "nonsense", "--", "true"], "--subnet"),
        (["run", "--ifname", "bad/name", "--", "true"], "--ifname"),
        (["run", "--guest-mac", "01:00:5e:00:00:01", "--", "true"], "--guest-mac"),
    ],
)
def test_invalid_options_exit_2(sandbox: Netns, args: list[str], option: str) -> None:
    proc = sandbox.run(guestnet_argv(args), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert option in lines[0]


# -- guestnet run --------------------------------------------------------------------------------

#: What CMD does inside ``guestnet run``: resolve the gateway, show it and resolv.conf, exit 3.
_RUN_SCRIPT = f"""
for i in $(seq 25); do
  {shlex.join(poke_cmd(GATEWAY))}
  ip neigh show {GATEWAY} | grep -q lladdr && break
  sleep 0.2
done
echo "neigh: $(ip neigh show {GATEWAY})"
echo "id: $(id -u)"
cat /etc/resolv.conf
exit 3
"""


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def _python_for_nobody() -> tuple[str, dict[str, str]] | None:
    """An interpreter uid 65534 may run, with the environment that finds guestnet and its deps.

    The venv's interpreter may live under a directory only root can enter (pyenv under /root);
    then the system python3 of the same version runs with the venv's site-packages on its path.
    """
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    src = os.path.dirname(os.path.dirname(os.path.abspath(guestnet.__file__)))
    paths = [src, *(p for p in sys.path if p.endswith("site-packages"))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    probe = (
        "import sys, guestnet.cli, guestnet.io.netns, pyroute2;"
        " print('%d.%d' % sys.version_info[:2])"
    )
    for exe in (sys.executable, "/usr/bin/python3"):
        # Through a shell, as CMD will run it: a direct exec from setpriv may succeed where
        # any later one is refused (seen here with pyenv under a 0700 /root).
        cmd = f"exec {shlex.quote(exe)} -c {shlex.quote(probe)}"
        proc = subprocess.run(
            [*NOBODY, "sh", "-c", cmd], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode == 0 and proc.stdout.strip() == want:
            return exe, env
    return None


def _check_run_output(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 3, proc.stderr
    assert f"lladdr {GATEWAY_MAC}" in proc.stdout, proc.stdout + proc.stderr
    assert "nameserver 10.0.2.3" in proc.stdout
    assert "id: 0" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_run_as_root(sandbox: Netns) -> None:
    proc = sandbox.run(guestnet_argv(["run", "--", "sh", "-c", _RUN_SCRIPT]), check=False)
    _check_run_output(proc)


def test_run_unprivileged(sandbox: Netns) -> None:
    found = _python_for_nobody()
    if found is None:
        pytest.skip(f"no Python {sys.version_info[:2]} with guestnet that uid 65534 may run")
    exe, env = found
    script = _RUN_SCRIPT.replace(shlex.quote(sys.executable), shlex.quote(exe))
    argv = [*NOBODY, exe, "-m", "guestnet", "run", "--", "sh", "-c", script]
    proc = sandbox.run(argv, check=False, cwd="/", env=env)
    _check_run_output(proc)


def test_run_config_shown_inside(sandbox: Netns) -> None:
    script = "ip -o -4 addr show dev eth0; ip -o link show dev eth0; ip route show default"
    argv = guestnet_argv(["run", "--mtu", "9000", "--", "sh", "-c", script])
    proc = sandbox.run(argv, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "inet 10.0.2.15/24" in proc.stdout
    assert "mtu 9000" in proc.stdout
    assert "default via 10.0.2.2 dev eth0" in proc.stdout


@pytest.mark.parametrize(
    ("script", "status"), [("exit 0", 0), ("exit 42", 42), ("kill -9 $$", 137), ("kill $$", 143)]
)
def test_run_passes_exit_status(sandbox: Netns, script: str, status: int) -> None:
    proc = sandbox.run(guestnet_argv(["run", "--", "sh", "-c", script]), check=False)
    assert proc.returncode == status, proc.stderr


def test_run_missing_command_is_127(sandbox: Netns) -> None:
    proc = sandbox.run(guestnet_argv(["run", "--", "/no/such/command"]), check=False)
    assert proc.returncode == 127
    assert "/no/such/command" in proc.stderr


def test_run_sigterm_is_forwarded(sandbox: Netns) -> None:
    proc = sandbox.popen(
        guestnet_argv(["run", "--", "sh", "-c", "echo started; exec sleep 60"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.terminate()
        assert proc.wait(timeout=10) == 128 + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


_INSIDE_SERVER = (
    "import socket; s = socket.socket(); s.bind(('10.0.2.15', 8000)); s.listen(1);"
    " print('ready', flush=True); c, _ = s.accept(); c.sendall(b'hello from inside'); c.close()"
)
_HOST_CLIENT = (
    "import socket; c = socket.create_connection(('127.0.0.1', 18081), timeout=10);"
    " print(c.recv(100).decode())"
)


def test_run_publishes_ports_and_serves_the_api(sandbox: Netns, tmp_path: Path) -> None:
    """``run`` starts -p forwards and the API before CMD: CMD finds the API socket, and a host
    client reaches CMD's server through the published port."""
    api = tmp_path / "gn.api"
    py = shlex.quote(sys.executable)
    script = f"test -S {api} && echo api-ready; exec {py} -c {shlex.quote(_INSIDE_SERVER)}"
    argv = ["run", "-p", "18081:8000", "--api-socket", str(api), "--", "sh", "-c", script]
    proc = sandbox.popen(guestnet_argv(argv), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "api-ready"
        assert proc.stdout.readline().strip() == "ready"
        got = sandbox.run([sys.executable, "-c", _HOST_CLIENT], timeout=20)
        assert got.stdout.strip() == "hello from inside"
        assert proc.wait(timeout=10) == 0
        assert not api.exists()  # removed at exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_netns_rootless_pid_target(sandbox: Netns) -> None:
    """Unprivileged guestnet attaches a rootless namespace by PID (joining its user namespace)."""
    found = _python_for_nobody()
    if found is None:
        pytest.skip(f"no Python {sys.version_info[:2]} with guestnet that uid 65534 may run")
    exe, env = found
    gn = shlex.join([exe, "-m", "guestnet", "netns", "--configure"])
    script = f"""
unshare -Urn sleep 30 & holder=$!
sleep 0.3
{gn} "$holder" & gn=$!
for i in $(seq 50); do
  nsenter -t "$holder" -U -n --preserve-credentials ip -o -4 addr show dev eth0 2>/dev/null \\
    | grep -q 10.0.2.15 && break
  sleep 0.1
done
nsenter -t "$holder" -U -n --preserve-credentials ip -o -4 addr show dev eth0
kill "$gn"; wait "$gn"; echo "gn_status=$?"
nsenter -t "$holder" -U -n --preserve-credentials ip -o link show dev eth0 || echo "eth0 gone"
kill "$holder"
"""
    proc = sandbox.run([*NOBODY, "sh", "-c", script], check=False, cwd="/", env=env)
    assert "inet 10.0.2.15/24" in proc.stdout, proc.stdout + proc.stderr
    assert "gn_status=0" in proc.stdout, proc.stderr
    assert "eth0 gone" in proc.stdout


def test_netns_rootless_tap_moved_in_serves_traffic(sandbox: Netns) -> None:
    """Unprivileged, the TAP is made in a private namespace of the target's user namespace and
    moved in finished (issue 9): it shows the guest MAC and MTU, and frames cross it both ways
    (the guest kernel resolves the gateway through guestnet's ARP responder)."""
    found = _python_for_nobody()
    if found is None:
        pytest.skip(f"no Python {sys.version_info[:2]} with guestnet that uid 65534 may run")
    exe, env = found
    gn = shlex.join([exe, "-m", "guestnet", "netns", "--configure"])
    poke = shlex.join([exe, *poke_cmd(GATEWAY)[1:]])
    script = f"""
unshare -Urn sleep 30 & holder=$!
sleep 0.3
{gn} "$holder" & gn=$!
ns="nsenter -t $holder -U -n --preserve-credentials"
for i in $(seq 50); do
  $ns ip -o -4 addr show dev eth0 2>/dev/null | grep -q 10.0.2.15 && break
  sleep 0.1
done
for i in $(seq 25); do
  $ns {poke}
  $ns ip neigh show {GATEWAY} | grep -q lladdr && break
  sleep 0.2
done
echo "neigh: $($ns ip neigh show {GATEWAY})"
$ns ip -o link show dev eth0
kill "$gn"; wait "$gn"; echo "gn_status=$?"
kill "$holder"
"""
    proc = sandbox.run([*NOBODY, "sh", "-c", script], check=False, cwd="/", env=env)
    assert f"lladdr {GATEWAY_MAC}" in proc.stdout, proc.stdout + proc.stderr
    assert f"link/ether {GUEST_MAC}" in proc.stdout
    assert "mtu 65520" in proc.stdout
    assert "gn_status=0" in proc.stdout, proc.stderr
