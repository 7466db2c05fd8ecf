"""A small, bounded TCP latency and connection-rate tool: the echo server and the two clients.

bench/compare.py runs the server in a backend's sandbox namespace (beside iperf3 -s) and the
clients in the guest namespace, so every round trip crosses the backend under test. Standard
library only: it starts in a few tens of milliseconds in any namespace.

- ``serve --bind ADDR --port P --max-seconds S``: a single-threaded echo server (selectors,
  non-blocking) on ADDR, an IPv4 or IPv6 address. Every byte a connection sends comes back; the
  connection is closed at EOF. It exits by itself after ``S`` seconds, so a harness that dies
  cannot leave it running forever.
- ``rr --host H --port P --count N --timeout T``: one connection, ``TCP_NODELAY``, N 1-byte
  ping-pongs after a short warm-up; prints JSON ``{"count", "median_ms", "p99_ms"}``.
- ``connrate --host H --port P --seconds S --max N --timeout T``: connect, send 1 byte, read the
  echo, close, as fast as one thread can, until S seconds or N connections; prints JSON
  ``{"count", "per_s", "connect_median_ms"}``. The connect time runs from the ``connect()`` call
  to its return (the handshake is complete: SYN out, SYN-ACK in, ACK queued); the socket is made
  before the clock starts.
- ``dns --server ADDR --port 53 --name NAME --count N --timeout T``: N A queries for NAME, one at
  a time on one connected UDP socket, after a short warm-up; prints JSON ``{"count", "median_ms",
  "p99_ms", "lost"}``. A query is built by hand (a 12-byte header and one question) and an
  answer counts when its id and question match and it carries at least one answer record; a
  query with no answer in ``--query-timeout`` seconds is counted lost and the next one goes out.
  A resolver in-process, not ``dig`` per query: a process start costs more than the query.

The clients take an IPv4 or IPv6 ``--host`` alike (the family follows the address), so the same
tool measures both families. Every loop is bounded by count and by a deadline; a client that
cannot finish prints ``{"error": "..."}`` and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import statistics
import struct
import sys
import time

WARMUP_ROUND_TRIPS = 20
#: The server keeps at most this many connections; beyond it new ones are closed at once.
MAX_SERVER_CONNECTIONS = 4096


def family_of(address: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, AF_INET otherwise (the harness passes literals only)."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def serve(bind: str, port: int, max_seconds: float) -> int:
    """Echo every byte back until EOF, for at most ``max_seconds``."""
    sel = selectors.DefaultSelector()
    lsock = socket.socket(family_of(bind), socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((bind, port))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    conns: set[socket.socket] = set()
    deadline = time.monotonic() + max_seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=min(left, 1.0)):
                if key.data is None:
                    _accept_all(lsock, sel, conns)
                    continue
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                _echo(conn, sel, conns)
    finally:
        for conn in conns:
            conn.close()
        lsock.close()
        sel.close()
    return 0


def _accept_all(
    lsock: socket.socket, sel: selectors.BaseSelector, conns: set[socket.socket]
) -> None:
    for _ in range(256):  # bounded per wake; the rest wait for the next select
        try:
            conn, _addr = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if len(conns) >= MAX_SERVER_CONNECTIONS:
            conn.close()
            continue
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.add(conn)
        sel.register(conn, selectors.EVENT_READ, True)


def _echo(conn: socket.socket, sel: selectors.BaseSelector, conns: set[socket.socket]) -> None:
    try:
        data = conn.recv(65536)
        if data:
            # Echoes are tiny; a short write would need buffering, which 1-byte tests never hit.
            conn.send(data)
            return
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        pass
    sel.unregister(conn)
    conns.discard(conn)
    conn.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def rr(host: str, port: int, count: int, timeout: float) -> dict[str, float | int | str]:
    """``count`` 1-byte ping-pongs on one connection; median and p99 in milliseconds."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=min(timeout, 5.0))
    samples: list[float] = []
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(min(timeout, 5.0))
        for i in range(WARMUP_ROUND_TRIPS + count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter_ns()
            sock.sendall(b"x")
            if not sock.recv(1):
                return {"error": "server closed the connection"}
            if i >= WARMUP_ROUND_TRIPS:
                samples.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        sock.close()
    if not samples:
        return {"error": f"no round trip within {timeout} s"}
    samples.sort()
    return {
        "count": len(samples),
        "median_ms": statistics.median(samples),
        "p99_ms": _percentile(samples, 0.99),
    }


def connrate(
    host: str, port: int, seconds: float, max_conns: int, timeout: float
) -> dict[str, float | int | str]:
    """Connect + 1 byte + echo + close, until ``seconds`` or ``max_conns``; the rate per second."""
    connect_ms: list[float] = []
    family = family_of(host)
    start = time.monotonic()
    end = start + seconds
    hard_end = start + timeout
    while len(connect_ms) < max_conns and time.monotonic() < end:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, min(2.0, hard_end - time.monotonic())))
            t0 = time.perf_counter_ns()
            sock.connect((host, port))
            t1 = time.perf_counter_ns()
            sock.sendall(b"x")
            if not sock.recv(1):
                return {"error": "server closed the connection"}
        except OSError as exc:
            return {"error": f"connection {len(connect_ms) + 1}: {exc}"}
        finally:
            sock.close()
        connect_ms.append((t1 - t0) / 1e6)
    elapsed = time.monotonic() - start
    if not connect_ms:
        return {"error": "no connection completed"}
    return {
        "count": len(connect_ms),
        "per_s": len(connect_ms) / elapsed,
        "connect_median_ms": statistics.median(connect_ms),
    }


def dns_query(qid: int, name: str) -> bytes:
    """A recursion-desired A/IN query for ``name`` with id ``qid`` (RFC 1035 4.1)."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(
        bytes([len(part)]) + part.encode("ascii") for part in name.rstrip(".").split(".") if part
    )
    return header + labels + b"\x00" + struct.pack("!HH", 1, 1)


def dns_answer_ok(answer: bytes, query: bytes) -> bool:
    """The answer matches ``query`` (id, and the question echoed) and holds an answer record."""
    if len(answer) < len(query) or answer[:2] != query[:2]:
        return False
    flags, qdcount, ancount = struct.unpack("!HHH", answer[2:8])
    question = query[12:]
    return (
        bool(flags & 0x8000)
        and qdcount == 1
        and ancount >= 1
        and (answer[12 : 12 + len(question)].lower() == question.lower())
    )


def dns(
    server: str, port: int, name: str, count: int, timeout: float, query_timeout: float
) -> dict[str, float | int | str]:
    """``count`` A queries one at a time; median and p99 in milliseconds, and how many got no
    answer within ``query_timeout``."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(family_of(server), socket.SOCK_DGRAM)
    samples: list[float] = []
    lost = 0
    try:
        sock.connect((server, port))
        for i in range(WARMUP_ROUND_TRIPS + count):
            if time.monotonic() > deadline:
                break
            query = dns_query((i * 7919 + 1) & 0xFFFF, name)
            t0 = time.perf_counter_ns()
            sock.send(query)
            if _await_dns(sock, query, min(query_timeout, max(0.01, deadline - time.monotonic()))):
                if i >= WARMUP_ROUND_TRIPS:
                    samples.append((time.perf_counter_ns() - t0) / 1e6)
            elif i >= WARMUP_ROUND_TRIPS:
                lost += 1
    finally:
        sock.close()
    if not samples:
        return {"error": f"no DNS answer from {server}:{port} for {name} ({lost} lost)"}
    samples.sort()
    return {
        "count": len(samples),
        "median_ms": statistics.median(samples),
        "p99_ms": _percentile(samples, 0.99),
        "lost": lost,
    }


def _await_dns(sock: socket.socket, query: bytes, timeout: float) -> bool:
    """Read until the answer to ``query`` arrives (True) or ``timeout`` passes (False); a stale
    answer to an earlier, lost query is skipped (at most 64 of them)."""
    end = time.monotonic() + timeout
    for _ in range(64):
        left = end - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            return False
        except ConnectionRefusedError:
            return False
        if dns_answer_ok(answer, query):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--max-seconds", type=float, default=600.0)
    r = sub.add_parser("rr")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--count", type=int, default=2000)
    r.add_argument("--timeout", type=float, default=20.0)
    c = sub.add_parser("connrate")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, default=3.0)
    c.add_argument("--max", type=int, default=5000)
    c.add_argument("--timeout", type=float, default=20.0)
    d = sub.add_parser("dns")
    d.add_argument("--server", required=True)
    d.add_argument("--port", type=int, default=53)
    d.add_argument("--name", required=True)
    d.add_argument("--count", type=int, default=1000)
    d.add_argument("--timeout", type=float, default=20.0)
    d.add_argument("--query-timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.bind, args.port, args.max_seconds)
    result: dict[str, float | int | str]
    try:
        if args.cmd == "rr":
            result = rr(args.host, args.port, args.count, args.timeout)
        elif args.cmd == "dns":
            result = dns(
                args.server, args.port, args.name, args.count, args.timeout, args.query_timeout
            )
        else:
            result = connrate(args.host, args.port, args.seconds, args.max, args.timeout)
    except OSError as exc:
        result = {"error": str(exc) or type(exc).__name__}
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
