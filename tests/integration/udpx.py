"""A bounded, windowed UDP transfer whose every datagram is checked: for the offload tests.

Run as a program (``python udpx.py ROLE JSON``) in a guest or sandbox namespace:

- ``recv``: binds ``bind``:``port``; with ``hello`` it first sends ``HELLO`` to ``peer`` (through
  a NAT this opens the flow the data comes back on) and repeats it every 0.2 s until data
  arrives. Each datagram must be ``seq`` (4 bytes, big-endian), then ``size - 4`` bytes of a
  pattern that depends on ``seq`` and be exactly ``size`` long; it counts good, bad and
  duplicate ones and acknowledges the count received (``ACK`` + 8 bytes) every 16 datagrams and
  when idle, to the sender's address. Prints JSON ``{"got", "bad", "dup"}`` when ``count``
  datagrams arrived or the deadline passed.
- ``send``: binds ``bind``:``port``; with ``hello`` it waits for ``HELLO`` and sends to whoever
  sent it, else to ``peer``. Sends ``count`` datagrams of ``size`` bytes, ``batch`` at a time
  (``gso``: one ``sendmsg`` with ``UDP_SEGMENT`` per batch; else one ``sendto`` each), never more
  than ``window`` beyond the last acknowledgement, so no buffer on the path can overflow: any
  loss is a bug. Prints JSON ``{"sent", "acked"}``.

Every wait has a deadline (``seconds``); nothing loops without one.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from typing import Any

SOL_UDP, UDP_SEGMENT = 17, 103
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
PATTERN = bytes((i * 131 + 7) & 0xFF for i in range(65536 + 256))


def body(seq: int, size: int) -> bytes:
    off = seq % 251
    return struct.pack("!I", seq) + PATTERN[off : off + size - 4]


def make(req: dict[str, Any]) -> socket.socket:
    v6 = ":" in req["bind"]
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, 16 << 20)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
    s.bind((req["bind"], req.get("port", 0)))
    return s


def recv(req: dict[str, Any]) -> dict[str, int]:
    s = make(req)
    count, size = req["count"], req["size"]
    deadline = time.monotonic() + req["seconds"]
    peer = tuple(req["peer"]) if req.get("peer") else None
    seen = bytearray(count)
    got = bad = dup = 0
    sender = None
    s.settimeout(0.2)
    if req.get("hello"):
        s.sendto(b"HELLO", peer)
    since_ack = 0
    while got < count and time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(65536)
        except TimeoutError:
            if sender is None and req.get("hello"):
                s.sendto(b"HELLO", peer)
            elif sender is not None:
                s.sendto(b"ACK" + struct.pack("!Q", got), sender)
            continue
        sender = addr
        seq = struct.unpack_from("!I", data)[0] if len(data) >= 4 else -1
        if not 0 <= seq < count or len(data) != size or data != body(seq, size):
            bad += 1
        elif seen[seq]:
            dup += 1
        else:
            seen[seq] = 1
            got += 1
        since_ack += 1
        if since_ack >= 16:
            since_ack = 0
            s.sendto(b"ACK" + struct.pack("!Q", got), sender)
    if sender is not None:
        for _ in range(3):
            s.sendto(b"ACK" + struct.pack("!Q", got), sender)
    return {"got": got, "bad": bad, "dup": dup}


def send(req: dict[str, Any]) -> dict[str, int]:
    s = make(req)
    count, size, batch = req["count"], req["size"], req.get("batch", 1)
    window, gso = req.get("window", 256), req.get("gso", False)
    deadline = time.monotonic() + req["seconds"]
    s.settimeout(0.5)
    if req.get("hello"):
        while True:
            data, peer = s.recvfrom(65536)
            if data == b"HELLO":
                break
    else:
        peer = tuple(req["peer"])
    sent = acked = 0
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
    while acked < count and time.monotonic() < deadline:
        while sent < count and sent - acked < window:
            k = min(batch, count - sent, window - (sent - acked))
            if gso and k > 1:
                s.sendmsg([b"".join(body(i, size) for i in range(sent, sent + k))], cmsg, 0, peer)
            else:
                for i in range(sent, sent + k):
                    s.sendto(body(i, size), peer)
            sent += k
        s.settimeout(0.5 if sent < count else 1.0)
        try:
            data, _addr = s.recvfrom(65536)
        except TimeoutError:
            if sent >= count:
                break
            continue
        if data[:3] == b"ACK":
            acked = max(acked, struct.unpack_from("!Q", data, 3)[0])
    return {"sent": sent, "acked": acked}


if __name__ == "__main__":
    role, request = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(recv(request) if role == "recv" else send(request)), flush=True)
