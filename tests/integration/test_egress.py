"""Egress rules end to end: a namespace guest whose connects and sends to a denied address fail
at once with the errno an ICMP "administratively prohibited" gives (EHOSTUNREACH over IPv4,
EACCES over IPv6), not a timeout, while allowed destinations work; rules in command-line order.

The ``outside`` namespace (198.18.0.2, 2001:db8:18::2) stands for the internet; a server there
accepts TCP and echoes UDP on both addresses. The guest's probes have 5 s timeouts: a probe
that times out reports "timeout", which no assertion accepts for a denied destination.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nsutil import OUTSIDE_IP, OUTSIDE_IP6, Guestnet, Netns, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

PORT = 8555

#: Accepts TCP (closing at once) and echoes UDP on each address given, for at most 60 s.
SERVER = r"""
import select, socket, sys, time
socks = []
for addr in sys.argv[2:]:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((addr, int(sys.argv[1]))); t.listen(16)
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((addr, int(sys.argv[1])))
    socks += [t, u]
print("ready", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    for s in select.select(socks, [], [], 1)[0]:
        if s.type == socket.SOCK_STREAM:
            s.accept()[0].close()
        else:
            data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""

#: For each "proto,addr,port": "ok", the errno number, or "timeout"; as a JSON list.
PROBE = r"""
import json, socket, sys
out = []
for spec in sys.argv[1:]:
    proto, addr, port = spec.split(",")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind); s.settimeout(5)
    try:
        s.connect((addr, int(port)))
        if proto == "udp":
            s.send(b"hello"); s.recv(64)
        out.append("ok")
    except socket.timeout:
        out.append("timeout")
    except OSError as exc:
        out.append(exc.errno)
    finally:
        s.close()
print(json.dumps(out))
"""


@pytest.fixture
def servers(outside: Netns, sandbox: Netns) -> Iterator[None]:
    """The outside server on both addresses, and one on the sandbox's loopback (the host the
    gateway stands for)."""
    procs = [
        ns.popen([sys.executable, "-c", SERVER, str(PORT), *addrs], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
        for ns, addrs in ((outside, (OUTSIDE_IP, OUTSIDE_IP6)), (sandbox, ("127.0.0.1",)))
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def probe(gn: Guestnet, *specs: str) -> list[Any]:
    assert gn.guest is not None
    result: list[Any] = json.loads(
        gn.guest.run([sys.executable, "-c", PROBE, *specs], timeout=60).stdout
    )
    return result


def _attach(attach: Callable[..., Guestnet], tmp_path: Path, *rules: str) -> tuple[Guestnet, str]:
    api = str(tmp_path / "api.sock")
    gn = attach("--api-socket", api, *rules)
    wait_for(lambda: os.path.exists(api), 10, "the API socket")
    return gn, api


def _policy(api: str) -> Any:
    status, body = request(api, "GET", "/policy")
    assert status == 200, body
    return body


def test_denied_addresses_fail_at_once_allowed_ones_work(
    attach_guest: Callable[..., Guestnet], servers: None, tmp_path: Path
) -> None:
    gn, api = _attach(attach_guest, tmp_path, "--deny", OUTSIDE_IP, "--deny", "2001:db8:18::/64")
    got = probe(
        gn,
        f"tcp,{OUTSIDE_IP},{PORT}",
        f"udp,{OUTSIDE_IP},{PORT}",
        f"tcp,{OUTSIDE_IP6},{PORT}",
        f"udp,{OUTSIDE_IP6},{PORT}",
        f"tcp,10.0.2.2,{PORT}",
        f"udp,10.0.2.2,{PORT}",
    )
    # ICMP code 13 is EHOSTUNREACH to Linux; ICMPv6 code 1 (administratively prohibited) EACCES.
    assert got == [
        errno.EHOSTUNREACH,
        errno.EHOSTUNREACH,
        errno.EACCES,
        errno.EACCES,
        "ok",
        "ok",
    ]
    rules = _policy(api)
    assert [(r["action"], r["cidr"]) for r in rules] == [
        ("deny", "198.18.0.2/32"),
        ("deny", "2001:db8:18::/64"),
    ]
    # One SYN and at least one datagram each (a retransmitted SYN would be absorbed).
    assert rules[0]["hits"] >= 2 and rules[1]["hits"] >= 2
    status, stats = request(api, "GET", "/stats")
    assert status == 200 and isinstance(stats, dict) and stats["policy"] == _policy(api)
    assert stats["drops"]["tcp.policy.deny"] >= 2
    assert stats["drops"]["nat.udp.policy.deny"] >= 2
    assert gn.alive(), gn.stderr_text()


def test_rules_apply_in_command_line_order(
    attach_guest: Callable[..., Guestnet], servers: None, tmp_path: Path
) -> None:
    """Allow the outside host, then deny all of IPv4: the outside host works, and the gateway
    (matched as 10.0.2.2, as the guest sent it) is closed with the rest."""
    gn, api = _attach(attach_guest, tmp_path, "--allow", f"{OUTSIDE_IP}/32", "--deny", "0.0.0.0/0")
    got = probe(gn, f"tcp,{OUTSIDE_IP},{PORT}", f"tcp,10.0.2.2,{PORT}", f"udp,10.0.2.2,{PORT}")
    assert got == ["ok", errno.EHOSTUNREACH, errno.EHOSTUNREACH]
    # IPv6 has no rule: allowed, as by default.
    assert probe(gn, f"tcp,{OUTSIDE_IP6},{PORT}") == ["ok"]
    allow, deny = _policy(api)
    assert allow["hits"] >= 1 and deny["hits"] >= 2
    gn.stop()


def test_deny_all_first_shadows_a_later_allow(
    attach_guest: Callable[..., Guestnet], servers: None, tmp_path: Path
) -> None:
    gn, api = _attach(attach_guest, tmp_path, "--deny", "0.0.0.0/0", "--allow", f"{OUTSIDE_IP}/32")
    assert probe(gn, f"tcp,{OUTSIDE_IP},{PORT}") == [errno.EHOSTUNREACH]
    deny, allow = _policy(api)
    assert deny["hits"] >= 1 and allow["hits"] == 0
