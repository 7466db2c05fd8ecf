"""A real Linux guest (Debian kernel, busybox) under QEMU TCG, attached to guestnet.

Each test starts guestnet in a loopback-only sandbox namespace, boots the guest over one QEMU
netdev (stream or dgram), lets the guest's script run, and asserts on what the guest printed on its
console. Host-side servers (dnsmasq, an HTTP server) run beside guestnet in the sandbox, on its
127.0.0.1, which the guest reaches as the gateway 10.0.2.2.

A boot costs about 6 s under TCG, so one boot checks several things: ARP; DHCP, the routes and
resolver it sets, ICMP echo to the gateway and DNS (forwarded and built-in); a TCP download from,
and upload to, a host server, then SLAAC from guestnet's router advertisement and the same download
over IPv6 through fd00::2 (the host's ::1); and a published port (host -> guest TCP) served by the
guest's httpd.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nsutil import DNSMASQ, dnsmasq_argv
from vm.fixtures import VmImage, vm_image, vm_sock_dir  # noqa: F401
from vm.qemu import (
    BackgroundProcess,
    VmResult,
    background_process,
    guestnet_argv,
    guestnet_vm,
    in_netns,
    parse_sections,
    sandbox_netns,
    start_vm,
    vhost_user_netdev,
)
from vm.qemu import wait_listening as _wait_listening

pytestmark = [pytest.mark.root, pytest.mark.vm]

HTTP_SERVER = Path(__file__).parent / "vm" / "http_server.py"

MODES = pytest.mark.parametrize(
    "mode", ["qemu", "dgram", "vhost-user"], ids=["stream", "dgram", "vhost-user"]
)

GATEWAY_MAC = "52:55:0a:00:02:02"
GATEWAY6 = "fd00::2"
#: What SLAAC makes of fd00::/64 and the guest's MAC 52:54:00:12:34:56 (modified EUI-64).
GUEST_SLAAC6 = "fd00::5054:ff:fe12:3456"
VM_TIMEOUT_S = 60.0
#: Ports inside the sandbox: a fresh namespace, so nothing else listens there.
DNSMASQ_PORT = 5353
HTTP_PORT = 8000
#: Random bytes behind the guest's upload (about 3 bytes of hex text each).
UPLOAD_RANDOM_KIB = 384
PUBLISHED_PORT = 18080
GUEST_HTTPD_PORT = 8080
#: guestnet's default link MTU, which its DHCP server offers (option 26).
DEFAULT_MTU = 65520

# Static address, one ping to make the guest ARP for the gateway (the echo itself may go
# unanswered), then the neighbour table.
ARP_SCRIPT = """
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
ping -c 1 -W 1 10.0.2.2
section neigh ip neigh show
"""

# The lease is applied by /etc/udhcpc/default.script, which prints it as @@GUESTNET-DHCP ...@@.
DHCP = "udhcpc -i eth0 -n -q -t 3 -T 1"

DHCP_DNS_SCRIPT = f"""
section dhcp {DHCP}
section addr ip -4 addr show dev eth0
section link ip link show dev eth0
section route ip -4 route show
section resolv cat /etc/resolv.conf
section ping ping -c 1 -W 3 10.0.2.2
section ns_forwarded nslookup www.test.internal
section ns_builtin nslookup host.guestnet.internal
"""

# Issue 10, folded into the download boot (no extra VM boot): eth0 has been up since /init, so the
# guest kernel has done SLAAC on guestnet's RA (fd00::/64) meanwhile; wait (bounded, 10 s) until it
# has a global fd00:: address that finished DAD, then fetch the same file over IPv6 through the
# gateway fd00::2, which guestnet maps to the sandbox's ::1 where the HTTP server also listens.
SLAAC_FETCH6 = f"""
slaac_ready() {{
    ip -6 addr show dev eth0 scope global | grep -q 'inet6 fd00::' &&
        ! ip -6 addr show dev eth0 | grep -q tentative
}}
i=0
while [ $i -lt 100 ] && ! slaac_ready; do usleep 100000; i=$((i + 1)); done
section slaac slaac_ready
section addr6 ip -6 addr show dev eth0
section route6 ip -6 route show
section fetch6 timeout 30 wget -q -O /tmp/file6 http://[{GATEWAY6}]:{HTTP_PORT}/file
section sha6 sha256sum /tmp/file6
"""

# The guest downloads a file from the host's HTTP server (through the TCP NAT) and hashes it, then
# uploads about 1.2 MB of its own and prints the digest the server computed beside its own. The
# upload is random bytes written out as hex text: busybox wget sends a --post-file up to its first
# NUL byte. Bounded by `timeout`: Debian's busybox 1.35 wget has no -T and crashes (SIGSEGV) when
# given it.
FETCH_SCRIPT = f"""
section dhcp {DHCP}
section features cat /sys/class/net/eth0/device/features
section fetch timeout 30 wget -q -O /tmp/file http://10.0.2.2:{HTTP_PORT}/file
section sha sha256sum /tmp/file
dd if=/dev/urandom bs=1024 count={UPLOAD_RANDOM_KIB} 2>/dev/null | od -An -vtx1 >/tmp/up
section up_sha sha256sum /tmp/up
section up_len wc -c /tmp/up
section upload timeout 30 wget -q -O - --post-file=/tmp/up http://10.0.2.2:{HTTP_PORT}/upload
{SLAAC_FETCH6}"""

# The guest serves a random file with busybox httpd, announces its digest, and idles until the test
# has fetched it through the published port and stops QEMU.
PUBLISH_SCRIPT = f"""
section dhcp {DHCP}
mkdir -p /www
dd if=/dev/urandom of=/www/file bs=1024 count=512 2>/dev/null
section httpd httpd -p {GUEST_HTTPD_PORT} -h /www
echo "@@GUESTNET-HTTPD-UP $(sha256sum /www/file | cut -d' ' -f1)@@"
sleep 120
"""


def _rc(result: VmResult, name: str) -> int:
    """Exit status of the guest's `section NAME` (AssertionError if the section never ended)."""
    result.section(name)
    return parse_sections(result.console)[name][1]


def _assert_lease(result: VmResult, mtu: int) -> None:
    """The guest bound 10.0.2.15/24 with guestnet's router, resolver and MTU, and applied them."""
    assert _rc(result, "dhcp") == 0, result.describe()
    bound = re.search(r"^@@GUESTNET-DHCP bound (.*)@@$", result.console, re.M)
    assert bound, result.describe()
    lease = dict(kv.split("=", 1) for kv in bound[1].split() if "=" in kv)
    assert lease["ip"] == "10.0.2.15", lease
    assert lease["subnet"] == "255.255.255.0", lease
    assert lease["router"] == "10.0.2.2", lease
    assert lease["dns"] == "10.0.2.3", lease
    assert lease["serverid"] == "10.0.2.2", lease
    assert lease["mtu"] == str(mtu), lease


@MODES
def test_guest_learns_gateway_mac(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    with guestnet_vm(vm_image, mode, tmp_path, vm_sock_dir) as gv:
        result = gv.boot(ARP_SCRIPT, timeout_s=VM_TIMEOUT_S)
    neigh = result.section("neigh")
    assert re.search(rf"^10\.0\.2\.2 dev eth0 lladdr {GATEWAY_MAC}\b", neigh, re.MULTILINE), (
        result.describe()
    )


@MODES
def test_dhcp_ping_and_dns(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    """Issue 3: DHCP configures the guest; the gateway answers ping; names resolve through
    guestnet (forwarded to dnsmasq in the sandbox, and guestnet's built-in host name)."""
    if not os.path.exists(DNSMASQ):
        pytest.skip("dnsmasq not installed (apt-get install dnsmasq-base)")
    args = ["--dns-upstream", f"127.0.0.1:{DNSMASQ_PORT}"]
    with (
        guestnet_vm(vm_image, mode, tmp_path, vm_sock_dir, guestnet_args=args) as gv,
        background_process(
            dnsmasq_argv(DNSMASQ_PORT), tmp_path / "dnsmasq.log", netns=gv.netns
        ) as dnsmasq,
    ):
        _wait_listening(gv.netns, DNSMASQ_PORT, "u", "dnsmasq")
        result = gv.boot(DHCP_DNS_SCRIPT, timeout_s=VM_TIMEOUT_S)
        assert dnsmasq.proc.poll() is None, dnsmasq.log()

    _assert_lease(result, DEFAULT_MTU)
    assert re.search(r"inet 10\.0\.2\.15/24 ", result.section("addr")), result.describe()
    assert f"mtu {DEFAULT_MTU} " in result.section("link"), result.describe()
    assert re.search(r"^default via 10\.0\.2\.2 dev eth0", result.section("route"), re.M), (
        result.describe()
    )
    assert re.search(r"^nameserver 10\.0\.2\.3$", result.section("resolv"), re.M), result.describe()

    assert _rc(result, "ping") == 0, result.describe()
    assert re.search(r"\b1 packets received\b", result.section("ping")), result.describe()

    # Only the address: busybox nslookup also asks for AAAA, which dnsmasq (--local zone, no IPv6
    # address given) answers NXDOMAIN, so its exit status is 1 whatever guestnet does.
    forwarded = result.section("ns_forwarded")
    assert re.search(r"^Address:?\s+198\.18\.0\.10$", forwarded, re.M), result.describe()
    builtin = result.section("ns_builtin")
    assert _rc(result, "ns_builtin") == 0, result.describe()
    assert re.search(r"^Address:?\s+10\.0\.2\.2$", builtin, re.M), result.describe()


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A directory holding `file`: 1 MiB of random bytes; and its sha256."""
    root = tmp_path_factory.mktemp("www")
    data = os.urandom(1 << 20)
    (root / "file").write_bytes(data)
    return root, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("mode", "mtu"),
    [
        ("qemu", DEFAULT_MTU),
        ("dgram", DEFAULT_MTU),
        ("qemu", 1500),
        ("vhost-user", DEFAULT_MTU),
        ("vhost-user", 1500),
    ],
    ids=["stream", "dgram", "stream-mtu1500", "vhost-user", "vhost-user-mtu1500"],
)
def test_guest_tcp_download_and_upload(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
    http_root: tuple[Path, str],
    mode: str,
    mtu: int,
) -> None:
    """Issue 4: the guest fetches 1 MiB over TCP from an HTTP server on the sandbox's loopback
    (10.0.2.2 from the guest) and posts 1 MiB back, and the bytes arrive intact both ways: at
    guestnet's default MTU (large segments) and at 1500. Issue 10, in the same boot: the guest
    gets its IPv6 address by SLAAC and fetches the file again over IPv6 from [fd00::2]."""
    root, digest = http_root
    api_socket = vm_sock_dir / "api.sock"
    args = ["--mtu", str(mtu), "--api-socket", str(api_socket)]
    server = [sys.executable, str(HTTP_SERVER), str(HTTP_PORT), str(root)]
    with (
        guestnet_vm(vm_image, mode, tmp_path, vm_sock_dir, guestnet_args=args) as gv,
        background_process(server, tmp_path / "http.log", netns=gv.netns),
    ):
        _wait_listening(gv.netns, HTTP_PORT, "t", "http.server")
        result = gv.boot(FETCH_SCRIPT, timeout_s=VM_TIMEOUT_S)
        report = _guestnet_report(gv.guestnet, api_socket)
        stats = _stats_json(api_socket) if mode == "vhost-user" else {}

    _assert_lease(result, mtu)
    assert _rc(result, "fetch") == 0, result.describe() + report
    assert result.section("sha").split()[:1] == [digest], result.describe()
    assert _rc(result, "upload") == 0, result.describe() + report
    sent_sha = result.section("up_sha").split()[0]
    sent_len = result.section("up_len").split()[0]
    assert int(sent_len) > UPLOAD_RANDOM_KIB * 1024 * 3, result.describe()
    assert result.section("upload").split() == [sent_sha, sent_len], result.describe() + report
    _assert_slaac_and_fetch6(result, digest, report)
    if mode == "vhost-user":
        # Issue 14: the guest negotiated mergeable buffers and TSO both ways with guestnet, and
        # TCP crossed the rings as super-frames in both directions, at either MTU.
        bits = result.section("features").strip()
        for bit in (15, 0, 1, 7, 8, 11, 12):  # MRG_RXBUF, CSUM, GUEST_CSUM, GUEST/HOST_TSO4/6
            assert bits[bit] == "1", (bit, bits)
        # The guest has powered off: its connection's totals are in the counters. Big frames
        # spread over several mergeable RX buffers; at MTU 1500 TCP moves as super-frames both
        # ways (GUEST_TSO / HOST_TSO); at 65520 the segments fit the MTU and need no GSO.
        counters = stats["drops"]
        assert counters["link.vhost.buffers_to_guest"] > counters["link.vhost.frames_to_guest"]
        if mtu == 1500:
            assert counters.get("link.vhost.gso_to_guest", 0) > 0, counters
            assert counters.get("link.vhost.gso_from_guest", 0) > 0, counters


def _stats_json(api_socket: Path) -> dict[str, Any]:
    """guestnet's /stats through its control API (guestnet still running)."""
    out = subprocess.run(
        [sys.executable, "-m", "guestnet", "stats", "--json", "--api-socket", str(api_socket)],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    ).stdout
    stats: dict[str, Any] = json.loads(out)
    return stats


def _assert_slaac_and_fetch6(result: VmResult, digest: str, report: str) -> None:
    """Issue 10: the guest configured its SLAAC address from guestnet's RA (prefix fd00::/64, the
    router's link-local address as default route) and fetched the file intact from the host's
    ::1 through [fd00::2]."""
    assert _rc(result, "slaac") == 0, result.describe() + report
    addr6 = result.section("addr6")
    assert re.search(rf"inet6 {re.escape(GUEST_SLAAC6)}/64 ", addr6), result.describe()
    assert re.search(r"^default via fe80::\S+ dev eth0", result.section("route6"), re.M), (
        result.describe()
    )
    assert _rc(result, "fetch6") == 0, result.describe() + report
    assert result.section("sha6").split()[:1] == [digest], result.describe()


def _guestnet_report(guestnet: BackgroundProcess, api_socket: Path) -> str:
    """guestnet's log and counters (from its control API), for failure messages: taken while
    guestnet still runs."""
    try:
        stats = subprocess.run(
            [sys.executable, "-m", "guestnet", "stats", "--api-socket", str(api_socket)],
            capture_output=True,
            text=True,
            timeout=15,
        )
        counters = stats.stdout + stats.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        counters = f"(guestnet stats failed: {exc})"
    return f"\n--- guestnet ---\n{guestnet.log()}\n--- guestnet stats ---\n{counters}"


@MODES
def test_published_port_reaches_guest_server(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
    mode: str,
) -> None:
    """Issue 5: `-p 127.0.0.1:HOSTPORT:8080` publishes the guest's httpd on the sandbox's loopback;
    a client there downloads the guest's 512 KiB file through it intact."""
    api_socket = vm_sock_dir / "api.sock"
    args = ["-p", f"127.0.0.1:{PUBLISHED_PORT}:{GUEST_HTTPD_PORT}", "--api-socket", str(api_socket)]
    with (
        guestnet_vm(vm_image, mode, tmp_path, vm_sock_dir, guestnet_args=args) as gv,
        gv.start(PUBLISH_SCRIPT) as vm,
    ):
        up = vm.wait_for(r"^@@GUESTNET-HTTPD-UP ([0-9a-f]{64})@@$", timeout_s=VM_TIMEOUT_S)
        fetch = subprocess.run(
            in_netns(
                gv.netns,
                ["curl", "-sSf", "--max-time", "20", f"http://127.0.0.1:{PUBLISHED_PORT}/file"],
            ),
            capture_output=True,
            timeout=30,
        )
        report = _guestnet_report(gv.guestnet, api_socket)
        result = vm.stop()
        gv.assert_alive(result)

    assert _rc(result, "dhcp") == 0, result.describe()
    assert _rc(result, "httpd") == 0, result.describe()
    assert fetch.returncode == 0, f"curl: {fetch.stderr.decode(errors='replace')}" + report
    assert len(fetch.stdout) == 512 * 1024, report
    assert hashlib.sha256(fetch.stdout).hexdigest() == up[1], result.describe() + report


#: guestnet's start-up (imports, socket) on a loaded shared machine.
GUESTNET_START_S = 30.0

# Pings every 0.2 s for 16 s; the test restarts guestnet in the middle.
RESTART_PING_SCRIPT = f"""
section dhcp {DHCP}
echo "@@GUESTNET-PINGING@@"
section ping ping -c 80 -i 0.2 -W 1 10.0.2.2
"""


def test_vhost_user_backend_restart_mid_ping(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Issue 14: with QEMU's reconnect=1, guestnet killed and started again under a running guest
    serves it again: QEMU replays the handshake, the rings resume at the indices it sends, and
    the guest's pings are answered again after the outage."""
    sock = vm_sock_dir / "guestnet.sock"
    argv = guestnet_argv("vhost-user", sock)
    netdev = vhost_user_netdev(sock, reconnect=True)
    initrd = vm_image.initrd_with_script(RESTART_PING_SCRIPT, tmp_path / "initrd.img")
    with (
        sandbox_netns() as netns,
        background_process(
            argv, tmp_path / "g1.log", netns=netns, wait_for_path=sock, timeout_s=GUESTNET_START_S
        ) as first,
        start_vm(vm_image.kernel, initrd, netdev, tmp_path, netns=netns) as vm,
    ):
        vm.wait_for(r"^@@GUESTNET-PINGING@@$", timeout_s=VM_TIMEOUT_S)
        vm.wait_for(r"seq=5 ", timeout_s=20)
        first.proc.terminate()
        first.proc.wait(timeout=10)
        assert not sock.exists(), first.log()
        with background_process(
            argv, tmp_path / "g2.log", netns=netns, wait_for_path=sock, timeout_s=GUESTNET_START_S
        ):
            result = vm.wait(timeout_s=VM_TIMEOUT_S)
            assert not result.timed_out, result.describe()
    ping = result.section("ping")
    seqs = [int(m) for m in re.findall(r"seq=(\d+) ", ping)]
    # Answered before the restart, and again after it (the outage is about 1-2 s of 16).
    assert min(seqs) <= 5, result.describe()
    assert max(seqs) >= 70, result.describe()
    assert len(seqs) >= 40, result.describe()


ECHO_SERVER = Path(__file__).parent / "vm" / "echo_server.py"
ECHO_PORT = 9000

# Issue 14's reconnect case, with a TCP connection open through the process that dies. The guest
# opens a connection to the host's echo server (busybox nc fed from a fifo it holds open) and
# checks it works; the test then kills guestnet (SIGKILL: no chance to say goodbye). The guest
# notices the outage (a ping fails), then waits for service to resume (the test has started a new
# guestnet on the same socket path meanwhile; QEMU reconnects within a second); all loops bounded.
# Then: ping, DNS (built-in and forwarded), a new TCP download; and one more line on the old
# connection, whose segment reaches a guestnet that has no flow for it and must answer RST: the
# guest's nc then ends (bounded wait) and the kernel counts an established connection reset.
RESTART_TCP_SCRIPT = f"""
section dhcp {DHCP}
mkfifo /tmp/in
nc 10.0.2.2 {ECHO_PORT} </tmp/in >/tmp/out &
NC=$!
exec 3>/tmp/in
echo before >&3
i=0
while [ $i -lt 100 ] && ! grep -q before /tmp/out; do usleep 100000; i=$((i + 1)); done
section old_before cat /tmp/out
section snmp_before grep '^Tcp:' /proc/net/snmp
echo "@@GUESTNET-OLD-CONN-UP@@"
i=0
while [ $i -lt 300 ] && ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; do
    usleep 100000
    i=$((i + 1))
done
echo "@@GUESTNET-OUTAGE@@"
i=0
while [ $i -lt 120 ] && ! ping -c 1 -W 1 10.0.2.2 >/dev/null 2>&1; do i=$((i + 1)); done
echo "@@GUESTNET-RESUMED@@"
section ping ping -c 3 -W 2 10.0.2.2
section ns_builtin nslookup host.guestnet.internal
section ns_forwarded nslookup www.test.internal
section fetch timeout 30 wget -q -O /tmp/file http://10.0.2.2:{HTTP_PORT}/file
section sha sha256sum /tmp/file
echo after >&3
i=0
while [ $i -lt 100 ] && kill -0 $NC 2>/dev/null; do usleep 100000; i=$((i + 1)); done
nc_gone() {{ ! kill -0 $NC 2>/dev/null; }}
section old_gone nc_gone
section old_after cat /tmp/out
section snmp_after grep '^Tcp:' /proc/net/snmp
section sockets netstat -tn
echo "@@GUESTNET-DONE@@"
sleep 120
"""


def _estab_resets(snmp: str) -> int:
    """EstabResets from the two `Tcp:` lines of /proc/net/snmp (names, then values): connections
    that went from ESTABLISHED or CLOSE_WAIT straight to CLOSED, as an RST received does."""
    names, values = (line.split() for line in snmp.strip().splitlines()[:2])
    return int(dict(zip(names, values, strict=True))["EstabResets"])


def _tcp_sockets(pid: int) -> list[str]:
    """The TCP sockets process ``pid`` holds: its lines of /proc/PID/net/tcp and tcp6 (its
    namespace's tables, matched on the socket inodes among its descriptors)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    lines = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            if line.split()[9] in inodes:
                lines.append(line)
    return lines


def _wait_for_log(bg: BackgroundProcess, pattern: str, timeout_s: float) -> re.Match[str]:
    """Poll a background process's log until ``pattern`` (MULTILINE) appears."""
    deadline = time.monotonic() + timeout_s
    while True:
        match = re.search(pattern, bg.log(), re.M)
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in {timeout_s} s:\n{bg.log()}")
        time.sleep(0.05)


def test_vhost_user_backend_killed_resets_old_tcp_and_serves_new(
    vm_image: VmImage,  # noqa: F811
    vm_sock_dir: Path,  # noqa: F811
    tmp_path: Path,
    http_root: tuple[Path, str],
) -> None:
    """Issue 14: guestnet killed under a running guest (reconnect=1) and started again on the
    same socket: pings resume, DNS answers, a new TCP connection works, and the connection that
    was open through the dead process is reset cleanly: its host end saw the peer close when
    the process died, and the guest's next segment on it gets an RST from the new process (the
    guest's socket fails within seconds instead of hanging). The new process holds no TCP socket
    for it: at the end it holds none at all."""
    if not os.path.exists(DNSMASQ):
        pytest.skip("dnsmasq not installed (apt-get install dnsmasq-base)")
    root, digest = http_root
    sock = vm_sock_dir / "guestnet.sock"
    api_socket = vm_sock_dir / "api.sock"
    argv = guestnet_argv(
        "vhost-user", sock, "--dns-upstream", f"127.0.0.1:{DNSMASQ_PORT}",
        "--api-socket", str(api_socket),
    )  # fmt: skip
    netdev = vhost_user_netdev(sock, reconnect=True)
    initrd = vm_image.initrd_with_script(RESTART_TCP_SCRIPT, tmp_path / "initrd.img")
    http = [sys.executable, str(HTTP_SERVER), str(HTTP_PORT), str(root)]
    echo = [sys.executable, "-u", str(ECHO_SERVER), str(ECHO_PORT)]
    with (
        sandbox_netns() as netns,
        background_process(dnsmasq_argv(DNSMASQ_PORT), tmp_path / "dnsmasq.log", netns=netns),
        background_process(http, tmp_path / "http.log", netns=netns),
        background_process(echo, tmp_path / "echo.log", netns=netns) as echo_server,
        background_process(
            argv, tmp_path / "g1.log", netns=netns, wait_for_path=sock, timeout_s=GUESTNET_START_S
        ) as first,
    ):
        for port, proto, what in (
            (DNSMASQ_PORT, "u", "dnsmasq"),
            (HTTP_PORT, "t", "http.server"),
            (ECHO_PORT, "t", "echo server"),
        ):
            _wait_listening(netns, port, proto, what)
        with start_vm(vm_image.kernel, initrd, netdev, tmp_path, netns=netns) as vm:
            vm.wait_for(r"^@@GUESTNET-OLD-CONN-UP@@$", timeout_s=VM_TIMEOUT_S)
            assert re.search(r"^open 1$", echo_server.log(), re.M), echo_server.log()
            first.proc.kill()
            first.proc.wait(timeout=10)
            # The kernel closed the dead process's host sockets: the server saw its peer go.
            _wait_for_log(echo_server, r"^(eof|reset) 1\b", timeout_s=10)
            assert sock.exists()  # SIGKILL: the socket file stays behind, stale
            vm.wait_for(r"^@@GUESTNET-OUTAGE@@$", timeout_s=30)
            with background_process(argv, tmp_path / "g2.log", netns=netns) as second:
                # It prints QEMU's arguments once it listens: it replaced the stale file (same
                # path; tmpfs may even hand out the same inode number again).
                _wait_for_log(second, r"-netdev vhost-user", GUESTNET_START_S)
                assert second.proc.poll() is None, second.log()
                vm.wait_for(r"^@@GUESTNET-DONE@@$", timeout_s=VM_TIMEOUT_S)
                tcp_sockets = _tcp_sockets(second.proc.pid)
                stats = _stats_json(api_socket)
                report = _guestnet_report(second, api_socket)
                result = vm.stop()
                assert second.proc.poll() is None, second.log()

    assert _rc(result, "old_before") == 0 and "before" in result.section("old_before"), (
        result.describe()
    )
    assert "@@GUESTNET-RESUMED@@" in result.console, result.describe()
    assert _rc(result, "ping") == 0, result.describe() + report
    assert re.search(r"^Address:?\s+10\.0\.2\.2$", result.section("ns_builtin"), re.M), (
        result.describe() + report
    )
    assert re.search(r"^Address:?\s+198\.18\.0\.10$", result.section("ns_forwarded"), re.M), (
        result.describe() + report
    )
    assert _rc(result, "fetch") == 0, result.describe() + report
    assert result.section("sha").split()[:1] == [digest], result.describe()
    # The old connection: nc ended on its own (no hang), by an RST (EstabResets went up), and
    # nothing came back on it after the restart; the guest holds no socket for it any more.
    assert _rc(result, "old_gone") == 0, result.describe() + report
    assert result.section("old_after").split() == ["before"], result.describe()
    resets = _estab_resets(result.section("snmp_after")) - _estab_resets(
        result.section("snmp_before")
    )
    assert resets >= 1, result.describe() + report
    assert f":{ECHO_PORT} " not in result.section("sockets"), result.describe()
    counters = stats["drops"]
    assert counters.get("tcp.segment.unknown_flow", 0) >= 1, counters
    assert counters.get("tcp.rst.sent", 0) >= 1, counters
    # The echo server got one connection only: the new process opened none for the stray
    # segment; and guestnet holds no TCP socket once the guest's connections are over.
    assert re.findall(r"^open \d+$", echo_server.log(), re.M) == ["open 1"], echo_server.log()
    assert tcp_sockets == [], tcp_sockets
    # Flows may linger CLOSED for a second (no socket, answering a retransmitted FIN).
    tcp_flows = stats["flows"]["by_proto"].get("tcp", {"by_state": {}})
    assert set(tcp_flows["by_state"]) <= {"CLOSED"}, stats["flows"]
