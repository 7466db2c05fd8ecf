"""The control API of a real guestnet serving a namespace guest (``--api-socket``, ``-p``).

guestnet runs in the loopback-only sandbox and serves a TAP in the guest namespace. The API socket
lives on the file system, so the test talks to it directly; forwards bind in the sandbox, so host
clients of forwarded ports run in the sandbox.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsutil import Guestnet, Netns, poke_cmd, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

BUSYBOX = shutil.which("busybox")

#: Connect to 127.0.0.1:PORT in the sandbox and report how the connection ended, bounded.
CONNECT = r"""
import socket, sys, time
t0 = time.monotonic()
try:
    # A reset may come before connect() has reported success: inside the try.
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    data = s.recv(100)
    print("eof" if data == b"" else "data", round(time.monotonic() - t0, 3))
except ConnectionResetError:
    print("reset", round(time.monotonic() - t0, 3))
except socket.timeout:
    print("timeout", 5)
"""


def _attach(
    attach_guest: Callable[..., Guestnet], tmp_path: Path, *extra: str, configure: bool = True
) -> tuple[Guestnet, str]:
    api = str(tmp_path / "api.sock")
    gn = attach_guest("--api-socket", api, *extra, configure=configure)
    wait_for(lambda: os.path.exists(api), 10, "the API socket")
    return gn, api


def _get(api: str, target: str) -> Any:
    status, body = request(api, "GET", target)
    assert status == 200, body
    return body


def test_stats_after_guest_traffic(attach_guest: Callable[..., Guestnet], tmp_path: Path) -> None:
    gn, api = _attach(attach_guest, tmp_path)
    assert stat.S_IMODE(os.stat(api).st_mode) == 0o600
    assert gn.guest is not None
    gn.guest.run(poke_cmd("10.0.2.2"))
    gn.guest.run(poke_cmd("10.0.2.77"))  # nobody: guestnet does not answer, counted
    stats = _get(api, "/stats")
    (link,) = stats["links"]
    assert link["kind"] == "tap" or link["kind"]
    assert link["frames_in"] >= 2 and link["bytes_in"] > 0
    assert link["frames_out"] >= 1 and link["bytes_out"] >= 42
    assert link["guest_mac"] == "52:54:00:12:34:56"
    assert stats["drops"].get("arp.request.not_ours", 0) >= 1
    for name in ("from_guest", "to_guest"):
        pool = stats["pool"][name]
        assert set(pool) == {
            "capacity", "mtu", "free_count", "in_use", "hits", "misses", "high_water"
        }  # fmt: skip
        assert pool["capacity"] == 256 and pool["mtu"] == 65520
    assert stats["pool"]["to_guest"]["high_water"] >= 1
    assert isinstance(stats["flows"]["total"], int)
    assert _get(api, "/flows") == [] or all("proto" in f for f in _get(api, "/flows"))

    # The CLI client prints the pool counters.
    out = subprocess.run(
        [sys.executable, "-m", "guestnet", "stats", "--api-socket", api],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "to_guest: capacity=256 mtu=65520" in out and "high_water=" in out
    top = subprocess.run(
        [
            sys.executable,
            "-m",
            "guestnet",
            "top",
            "--once",
            "--interval",
            "0.2",
            "--api-socket",
            api,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "frame pools" in top and "tap0" in top
    assert gn.alive(), gn.stderr_text()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed (busybox-static)")
def test_leases(attach_guest: Callable[..., Guestnet], tmp_path: Path) -> None:
    gn, api = _attach(attach_guest, tmp_path, configure=False)
    assert gn.guest is not None and BUSYBOX is not None
    assert _get(api, "/leases") == []
    gn.guest.run(["ip", "link", "set", "eth0", "up"])
    proc = gn.guest.run(
        [
            BUSYBOX,
            "udhcpc",
            "-i",
            "eth0",
            "-f",
            "-q",
            "-n",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            "/bin/true",
        ],
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    (lease,) = _get(api, "/leases")
    assert lease["mac"] == "52:54:00:12:34:56" and lease["ip"] == "10.0.2.15"
    assert 3500 < lease["expires_in_s"] <= 3600


def _connect(sandbox: Netns, port: int) -> str:
    return sandbox.run([sys.executable, "-c", CONNECT, str(port)], timeout=20).stdout.strip()


def test_forwards_through_the_api(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path
) -> None:
    gn, api = _attach(attach_guest, tmp_path, "-p", "18080:80", "-p", "[::1]:18053:53/udp")
    listed = _get(api, "/forwards")
    assert [
        (f["id"], f["proto"], f["host_ip"], f["host_port"], f["guest_port"]) for f in listed
    ] == [
        ("1", "tcp", "127.0.0.1", 18080, 80),
        ("2", "udp", "::1", 18053, 53),
    ]
    # Each forward reaches the guest address of its host address's family.
    assert [f["guest_ip"] for f in listed] == ["10.0.2.15", "fd00::15"]

    status, fwd = request(
        api, "POST", "/forwards", {"proto": "tcp", "host_port": 18081, "guest_port": 81}
    )
    assert status == 201 and fwd["id"] == "3" and fwd["host_ip"] == "127.0.0.1"
    # Nobody listens in the guest (and, until the TCP NAT serves forwards, no datapath): the
    # host client's connection is accepted and closed promptly, never left hanging.
    how, secs = _connect(sandbox, 18081).split()
    assert how in ("eof", "reset") and float(secs) < 2.0

    # Errors, field by field; none disturbs the forwards in place.
    status, err = request(
        api, "POST", "/forwards", {"proto": "tcp", "host_port": 18080, "guest_port": 1}
    )
    assert status == 409 and "in use" in err["error"]
    status, err = request(
        api, "POST", "/forwards", {"proto": "icmp", "host_port": 1, "guest_port": 1}
    )
    assert status == 400 and "proto" in err["error"]
    assert request(api, "DELETE", "/forwards/99")[0] == 404
    assert request(api, "GET", "/nothing")[0] == 404
    if shutil.which("curl"):
        with_raw = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", api,
             "-X", "POST", "-d", "{bad json", "http://guestnet/forwards"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert with_raw.stdout == "400"
    assert [f["id"] for f in _get(api, "/forwards")] == ["1", "2", "3"]

    assert request(api, "DELETE", "/forwards/3") == (204, None)
    refused = sandbox.run([sys.executable, "-c", CONNECT, "18081"], check=False, timeout=20)
    assert "ConnectionRefusedError" in refused.stderr
    assert [f["id"] for f in _get(api, "/forwards")] == ["1", "2"]
    assert gn.alive(), gn.stderr_text()


def test_publish_port_in_use_fails_start(sandbox: Netns, start_gn: Callable[..., Guestnet]) -> None:
    holder = sandbox.popen(
        [sys.executable, "-c",
         "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 18090)); s.listen(); "
         "print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        gn = start_gn(["qemu", "--socket", f"/tmp/unused-gn-{os.getpid()}.sock", "-p", "18090:80"])
        assert gn.wait(10) == 1
        assert "--publish: tcp 127.0.0.1:18090 is in use" in gn.stderr_text()
        assert "Traceback" not in gn.stderr_text()
    finally:
        holder.kill()
        holder.wait()
