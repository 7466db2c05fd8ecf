"""Slow or hostile peers on the host side, and a guest that never reads: guestnet stays bounded.

- A host server that accepts and never reads: the guest's sender stalls once the buffers on the
  way are full (guestnet's window toward the guest closes; nothing piles up in guestnet).
- A guest server that accepts and never reads, behind a published port: the host client's sender
  stalls the same way (the guest's window closes; guestnet reads no more from the host).
- Slowloris on a published port: many clients connect and never send. They are bounded
  (``--max-silent-forwards``, the oldest reset first) and timed out
  (``--forward-silent-timeout``); a client that speaks is served throughout.

Each checks guestnet's peak RSS (less than 64 MiB of growth) and that its descriptors return to
their baseline once the peers go.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nsutil import Guestnet, Netns, wait_for

from guestnet.client import request

pytestmark = pytest.mark.root

PORT = 8620
RSS_GROWTH_LIMIT_KB = 64 * 1024
SEND_SECONDS = 4.0

#: Accepts on 127.0.0.1:argv[1] (or argv[2] as the address) and never reads; holds every
#: connection for argv[3] seconds.
NEVER_READ = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2], int(sys.argv[1]))); s.listen(64)
print("ready", flush=True)
held = []
end = time.monotonic() + float(sys.argv[3])
s.settimeout(0.5)
while time.monotonic() < end:
    try:
        held.append(s.accept()[0])
    except OSError:
        pass
"""

#: Connects to argv[1]:argv[2] and sends for argv[3] seconds without blocking; prints the bytes
#: the kernel took, then closes.
SENDER = r"""
import socket, sys, time, json
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.setblocking(False)
chunk = b"x" * 65536; sent = 0; end = time.monotonic() + float(sys.argv[3]); last = 0.0
while time.monotonic() < end:
    try:
        n = s.send(chunk); sent += n; last = time.monotonic()
    except BlockingIOError:
        time.sleep(0.01)
print(json.dumps({"sent": sent, "stalled_s": round(time.monotonic() - last, 2)}))
s.close()
"""


def start(ns: Netns, code: str, *args: str) -> subprocess.Popen[str]:
    proc = ns.popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=5)


def bounded_send(ns: Netns, host: str, port: int) -> dict[str, float]:
    out = ns.run([sys.executable, "-c", SENDER, host, str(port), str(SEND_SECONDS)], timeout=30)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def stalls_bounded(gn: Guestnet, server_ns: Netns, bind: str, client_ns: Netns, dial: str) -> None:
    """A server on ``bind`` in ``server_ns`` that never reads, a client in ``client_ns`` sending
    to ``dial`` for SEND_SECONDS: the sender stalls (the window closed) having got rid of only
    the buffers on the way (its send buffer, the window, the far end's receive buffer; not 4 s
    at gigabits per second), guestnet's peak RSS stays within the limit and its descriptors
    return to their baseline."""
    fds0, hwm0 = gn.open_fds(), gn.status_kb("VmHWM")
    server = start(server_ns, NEVER_READ, str(PORT), bind, "30")
    try:
        result = bounded_send(client_ns, dial, PORT)
    finally:
        stop(server)
    assert result["stalled_s"] > 1.0, result
    assert result["sent"] < 96 << 20, result
    assert gn.status_kb("VmHWM") - hwm0 < RSS_GROWTH_LIMIT_KB
    wait_for(lambda: gn.open_fds() <= fds0, 20, "descriptors back to the baseline")


def test_host_server_that_never_reads(
    attach_guest: Callable[..., Guestnet], sandbox: Netns
) -> None:
    gn = attach_guest()
    assert gn.guest is not None
    stalls_bounded(gn, sandbox, "127.0.0.1", gn.guest, "10.0.2.2")


def test_guest_server_that_never_reads(
    attach_guest: Callable[..., Guestnet], sandbox: Netns
) -> None:
    """Behind a published port: the guest's window closes, guestnet reads no more from the
    host client."""
    gn = attach_guest("-p", f"127.0.0.1:{PORT}:{PORT}")
    assert gn.guest is not None
    stalls_bounded(gn, gn.guest, "0.0.0.0", sandbox, "127.0.0.1")


def test_slowloris_on_a_published_port(
    attach_guest: Callable[..., Guestnet], sandbox: Netns, tmp_path: Path
) -> None:
    api = str(tmp_path / "api.sock")
    gn = attach_guest(
        "-p", f"127.0.0.1:{PORT}:{PORT}", "--api-socket", api,
        "--forward-silent-timeout", "3", "--max-silent-forwards", "50",
    )  # fmt: skip
    assert gn.guest is not None
    echo = gn.guest.popen(
        [sys.executable, "-c", ECHO_SERVER, str(PORT)], stdout=subprocess.PIPE, text=True
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    try:
        fds0 = gn.open_fds()
        # 120 clients that connect and never send (more than the bound), held 30 s at most.
        silent = start(sandbox, SILENT_CLIENTS, str(PORT), "120", "30")
        try:
            time.sleep(0.5)
            status, body = request(api, "GET", "/stats", timeout=5.0)
            assert status == 200
            drops = body["drops"]
            assert drops.get("tcp.forward.silent_evicted", 0) >= 120 - 50, drops
            # A client that speaks is served meanwhile.
            out = sandbox.run([sys.executable, "-c", ECHO_CLIENT, str(PORT)], timeout=20)
            assert out.stdout.strip() == "echo ok"

            # After the timeout the silent ones that were left are reset too.
            def timed_out() -> bool:
                counts = request(api, "GET", "/stats", timeout=5.0)[1]["drops"]
                return int(counts.get("tcp.forward.silent_timeout", 0)) >= 40

            wait_for(timed_out, 20, "silent connections timed out")
        finally:
            stop(silent)
        wait_for(lambda: gn.open_fds() <= fds0, 20, "descriptors back to the baseline")
    finally:
        echo.kill()
        echo.wait(timeout=5)


#: In the guest: an echo server (one read, echoed) on 0.0.0.0:argv[1], for 60 s.
ECHO_SERVER = r"""
import socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(512)
print("ready", flush=True)
def serve(c):
    try:
        c.settimeout(30); d = c.recv(64)
        if d: c.sendall(d)
    except OSError:
        pass
    c.close()
s.settimeout(1)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
    except OSError:
        pass
"""

#: On the host: one client that speaks.
ECHO_CLIENT = r"""
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
c.sendall(b"echo ok"); print(c.recv(64).decode())
"""

#: On the host: argv[2] clients connect to 127.0.0.1:argv[1] and never send; held argv[3] s.
SILENT_CLIENTS = r"""
import socket, sys, time
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        for _ in range(int(sys.argv[2]))]
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
"""
