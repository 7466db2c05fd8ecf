"""DNS through guestnet: a namespace guest asks 10.0.2.3, guestnet answers or forwards.

The upstream resolver is a dnsmasq in the loopback-only sandbox, authoritative for
``test.internal`` and forwarding nowhere (``--no-resolv``): no query leaves the sandbox's
loopback. Dead upstreams are a port nobody listens on (the kernel answers ICMP port unreachable)
and a bound UDP socket that never answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nsutil import DNSMASQ, Guestnet, Netns, dnsmasq_argv, wait_for

pytestmark = pytest.mark.root

#: Ports inside the sandbox (a fresh namespace: nothing else listens there).
DNSMASQ_PORT = 5353
SILENT_PORT = 5454
DEAD_PORT = 5555


def _need(binary: str) -> None:
    if shutil.which(binary) is None and not os.path.exists(binary):
        pytest.skip(f"{binary} is not installed")


def dig(ns: Netns, *args: str, server: str = "10.0.2.3", timeout: int = 5) -> str:
    """``dig @SERVER ARGS`` in ``ns``, one try, bounded; its full output."""
    _need("dig")
    proc = ns.run(
        ["dig", f"+time={timeout}", "+tries=1", "+nocookie", f"@{server}", *args],
        check=False,
        timeout=timeout + 10,
    )
    return proc.stdout + proc.stderr


def status(out: str) -> str:
    """The status dig printed (NOERROR, NXDOMAIN, SERVFAIL...), or '' when no answer came."""
    for line in out.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return ""


def answers(out: str) -> list[str]:
    """The data of the ANSWER section's records."""
    lines = out.splitlines()
    try:
        start = lines.index(";; ANSWER SECTION:") + 1
    except ValueError:
        return []
    got = []
    for line in lines[start:]:
        if not line.strip():
            break
        got.append(line.split()[-1])
    return got


def _resolves(ns: Netns, port: int) -> bool:
    out = subprocess.run(
        ns.argv(["dig", "+time=1", "+tries=1", "-p", str(port), "@127.0.0.1", "www.test.internal"]),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    return "198.18.0.10" in out


def _start_dnsmasq(sandbox: Netns, port: int) -> subprocess.Popen[bytes]:
    proc = sandbox.popen(
        dnsmasq_argv(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: proc.poll() is not None or _resolves(sandbox, port), 10, "dnsmasq")
        assert proc.poll() is None, "dnsmasq exited"
    except BaseException:
        _stop(proc)
        raise
    return proc


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def dnsmasq(sandbox: Netns) -> Iterator[int]:
    """dnsmasq on 127.0.0.1:DNSMASQ_PORT in the sandbox, authoritative for test.internal."""
    _need(DNSMASQ)
    _need("dig")
    proc = _start_dnsmasq(sandbox, DNSMASQ_PORT)
    try:
        yield DNSMASQ_PORT
    finally:
        _stop(proc)


@pytest.fixture
def silent_upstream(sandbox: Netns) -> Iterator[int]:
    """A UDP socket bound on 127.0.0.1:SILENT_PORT in the sandbox that reads and never answers."""
    code = (
        "import socket,sys,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(('127.0.0.1',{SILENT_PORT}))\n"
        "print('ready',flush=True)\n"
        "s.settimeout(1)\n"
        "end=time.monotonic()+120\n"
        "while time.monotonic()<end:\n"
        " try: s.recv(65535)\n"
        " except OSError: pass\n"
    )
    proc = sandbox.popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield SILENT_PORT
    finally:
        _stop(proc)


def test_forwarded_name_resolves(attach_guest: Callable[..., Guestnet], dnsmasq: int) -> None:
    gn = attach_guest("--dns-upstream", f"127.0.0.1:{dnsmasq}")
    assert gn.guest is not None
    out = dig(gn.guest, "www.test.internal", "A")
    assert status(out) == "NOERROR" and answers(out) == ["198.18.0.10"], out
    # The gateway answers DNS too.
    out = dig(gn.guest, "www.test.internal", "A", server="10.0.2.2")
    assert answers(out) == ["198.18.0.10"], out


def test_nslookup_in_the_guest(attach_guest: Callable[..., Guestnet], dnsmasq: int) -> None:
    _need("nslookup")
    gn = attach_guest("--dns-upstream", f"127.0.0.1:{dnsmasq}")
    assert gn.guest is not None
    proc = gn.guest.run(["nslookup", "-timeout=5", "www.test.internal", "10.0.2.3"], check=False)
    assert "198.18.0.10" in proc.stdout, proc.stdout + proc.stderr


def test_nxdomain_passes_through(attach_guest: Callable[..., Guestnet], dnsmasq: int) -> None:
    gn = attach_guest("--dns-upstream", f"127.0.0.1:{dnsmasq}")
    assert gn.guest is not None
    out = dig(gn.guest, "nosuch.test.internal", "A")
    assert status(out) == "NXDOMAIN", out


def test_builtin_names(attach_guest: Callable[..., Guestnet], dnsmasq: int) -> None:
    gn = attach_guest("--dns-upstream", f"127.0.0.1:{dnsmasq}")
    assert gn.guest is not None
    for name in ("host.guestnet.internal", "GATEWAY.guestnet.internal.", "host.docker.internal"):
        out = dig(gn.guest, name, "A")
        assert status(out) == "NOERROR" and answers(out) == ["10.0.2.2"], out
    out = dig(gn.guest, "host.containers.internal", "AAAA")
    assert status(out) == "NOERROR" and answers(out) == ["fd00::2"], out
    out = dig(gn.guest, "host.containers.internal", "MX")
    assert status(out) == "NOERROR" and answers(out) == [], out


def test_refused_upstream_servfail_at_once(attach_guest: Callable[..., Guestnet]) -> None:
    gn = attach_guest("--dns-upstream", f"127.0.0.1:{DEAD_PORT}")
    assert gn.guest is not None
    t0 = time.monotonic()
    out = dig(gn.guest, "www.test.internal", "A")
    assert status(out) == "SERVFAIL", out
    assert time.monotonic() - t0 < 1.5, "an ICMP-refused upstream fails over at once"


def test_silent_upstream_servfail_within_bound(
    attach_guest: Callable[..., Guestnet], silent_upstream: int
) -> None:
    gn = attach_guest("--dns-upstream", f"127.0.0.1:{silent_upstream}")
    assert gn.guest is not None
    t0 = time.monotonic()
    out = dig(gn.guest, "www.test.internal", "A", timeout=6)
    elapsed = time.monotonic() - t0
    assert status(out) == "SERVFAIL", out
    assert 1.5 <= elapsed < 4.5, elapsed


def test_failover_to_next_upstream(
    attach_guest: Callable[..., Guestnet], silent_upstream: int, dnsmasq: int
) -> None:
    gn = attach_guest(
        "--dns-upstream",
        f"127.0.0.1:{silent_upstream}",
        "--dns-upstream",
        f"127.0.0.1:{dnsmasq}",
    )
    assert gn.guest is not None
    out = dig(gn.guest, "www.test.internal", "A", timeout=6)
    assert answers(out) == ["198.18.0.10"], out
    # The silent upstream is now held down: the next query goes straight to dnsmasq.
    t0 = time.monotonic()
    out = dig(gn.guest, "nosuch.test.internal", "A")
    assert status(out) == "NXDOMAIN" and time.monotonic() - t0 < 1.5, out


@contextlib.contextmanager
def _netns_resolv_conf(ns: Netns, text: str) -> Iterator[None]:
    """``ip netns exec`` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf."""
    folder = f"/etc/netns/{ns.name}"
    os.makedirs(folder)
    try:
        with open(f"{folder}/resolv.conf", "w") as f:
            f.write(text)
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_upstreams_from_resolv_conf(sandbox: Netns, attach_guest: Callable[..., Guestnet]) -> None:
    _need(DNSMASQ)
    _need("dig")
    with _netns_resolv_conf(sandbox, "# test\nnameserver 127.0.0.1\n"):
        proc = _start_dnsmasq(sandbox, 53)
        try:
            gn = attach_guest()
            assert gn.guest is not None
            out = dig(gn.guest, "www.test.internal", "A")
            assert answers(out) == ["198.18.0.10"], out
        finally:
            _stop(proc)


@pytest.mark.parametrize("first", ["refused", "silent"])
def test_tcp_fails_over_like_udp(
    sandbox: Netns, attach_guest: Callable[..., Guestnet], dnsmasq: int, first: str
) -> None:
    """DNS over TCP with a dead first upstream and a live second: answered, within the bound a
    UDP query gets (the silent case waits out one connect timeout, as UDP waits one answer
    timeout). It used to connect to the first upstream only."""
    if first == "silent":  # SYNs to this port vanish: the connect can only time out
        sandbox.run(["nft", "add", "table", "inet", "blackhole"])
        sandbox.run(
            ["nft", "add", "chain", "inet", "blackhole", "out",
             "{ type filter hook output priority 0 ; }"]
        )  # fmt: skip
        sandbox.run(
            ["nft", "add", "rule", "inet", "blackhole", "out", "tcp", "dport",
             str(SILENT_PORT), "drop"]
        )  # fmt: skip
        dead = SILENT_PORT
    else:
        dead = DEAD_PORT
    gn = attach_guest(
        "--dns-upstream", f"127.0.0.1:{dead}", "--dns-upstream", f"127.0.0.1:{dnsmasq}"
    )
    assert gn.guest is not None
    t0 = time.monotonic()
    out = dig(gn.guest, "+tcp", "www.test.internal", "A", timeout=6)
    elapsed = time.monotonic() - t0
    assert answers(out) == ["198.18.0.10"], out
    assert elapsed < (1.5 if first == "refused" else 4.5), elapsed
    # The dead upstream is now held down for both transports: the next queries go straight on.
    t0 = time.monotonic()
    assert status(dig(gn.guest, "+tcp", "nosuch.test.internal", "A")) == "NXDOMAIN"
    assert status(dig(gn.guest, "nosuch.test.internal", "A")) == "NXDOMAIN"
    assert time.monotonic() - t0 < 1.5


def test_ipv6_service_upstream_and_aaaa(
    attach_guest: Callable[..., Guestnet], dnsmasq: int
) -> None:
    """DNS over IPv6 end to end: the guest asks fd00::3 (UDP and TCP), guestnet forwards to an
    upstream on the host's ::1, AAAA records come back."""
    gn = attach_guest("--dns-upstream", f"[::1]:{dnsmasq}")
    assert gn.guest is not None
    for transport in ((), ("+tcp",)):
        out = dig(gn.guest, *transport, "www.test.internal", "AAAA", server="fd00::3")
        assert answers(out) == ["2001:db8::10"], out
        out = dig(gn.guest, *transport, "www.test.internal", "A", server="fd00::3")
        assert answers(out) == ["198.18.0.10"], out
    out = dig(gn.guest, "host.guestnet.internal", "AAAA", server="fd00::3")
    assert answers(out) == ["fd00::2"], out
