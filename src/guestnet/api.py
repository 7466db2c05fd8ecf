"""The control API: HTTP/1.1 + JSON on a unix socket, served by the datapath's own loop.

Theory of operation
-------------------
Three layers, each testable alone:

- :func:`parse_request` (sans-I/O): bytes in, one :class:`Request` out (or None: need more), or
  an :class:`HttpError`. A small, strict subset of HTTP/1.1 (RFC 9112): a request line, header
  fields, and a body only by ``Content-Length`` (``Transfer-Encoding`` gets 501). The head is
  bounded by :data:`MAX_HEAD` (431 beyond) and the body by :data:`MAX_BODY` (413).
- :class:`Api` (sans-I/O): routes ``(method, path, body, now)`` to a status and a JSON value,
  reading and commanding the datapath only through a :class:`ControlView` (what it may see and
  change: links, counters, pools, flow listings, leases, the capture, the forward registry).
  Routes: ``GET /stats``, ``GET /flows``, ``GET /leases``, ``GET /policy``,
  ``GET /forwards``, ``POST /forwards``, ``DELETE /forwards/ID``. Errors are
  ``{"error": "..."}`` with 400, 404, 405, 409.
- :class:`ApiServer` (I/O): a listening unix socket (mode 0600 from birth, accepting through
  :class:`~guestnet.io.listener.Listener`, which pauses while descriptors run out) and at most
  :data:`MAX_CONNECTIONS` connections, all non-blocking and registered with the datapath's loop.
  Each wake-up reads at most :data:`READ_CHUNK` bytes; one request is answered at a time, and
  a connection whose response has not drained is not read further (pipelined requests wait in
  the kernel). Idle connections close after :data:`IDLE_TIMEOUT_S`. A bad request is answered
  and its connection closed; it touches nothing else.

The API never blocks the datapath: every call is bounded work on the loop thread. Building
``/flows`` is linear in the number of flows (bounded by ``max_flows``). The socket is on the host
file system: nothing of it is reachable from the guest.

Flow sources: the view lists one ``source(now) -> Iterable[Mapping[str, object]]`` per NAT
protocol (the TCP, UDP and ICMP drivers' own tables). Each flow is a mapping with at least
``state``, and by convention ``guest``, ``dst``, ``host``, ``age_s``; ``proto`` is filled in from
the source when missing; it is passed through as given.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from guestnet.assembly import FlowSource, Instance
from guestnet.core.timers import Timer
from guestnet.counters import Counters
from guestnet.io.forwards import DEFAULT_HOST_IP, ForwardError, Forwards
from guestnet.io.listener import UnixServer
from guestnet.io.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop

log = logging.getLogger(__name__)

#: Largest request head (request line and header fields).
MAX_HEAD = 16 * 1024
#: Largest request body.
MAX_BODY = 64 * 1024
MAX_HEADERS = 64
#: Bytes read per wake-up of one connection.
READ_CHUNK = 16 * 1024
#: Connections served at once; more are accepted and closed at once (counted).
MAX_CONNECTIONS = 32
#: A connection with nothing happening for this long is closed.
IDLE_TIMEOUT_S = 30.0
#: Pipelined requests answered per turn on one connection.
PIPELINE_BUDGET = 8
#: Accepts per wake-up of the listening socket.
ACCEPT_BUDGET = 16


@dataclass(frozen=True)
class ControlView:
    """What the API may read and command of one datapath, and nothing more."""

    #: Per-link counters.
    links: Callable[[], list[dict[str, object]]]
    #: Every named counter (reason -> count), sorted.
    drops: Callable[[], dict[str, int]]
    #: Both frame pools' counters.
    pools: Callable[[], dict[str, object]]
    #: (protocol, flow listing) for each NAT service.
    flow_sources: Callable[[], Sequence[tuple[str, FlowSource]]]
    #: DHCP leases at ``now``.
    leases: Callable[[float], list[object]]
    #: The forward registry (listed, added to and removed from by the API).
    forwards: Forwards
    #: The pcap writer's counters while a capture runs, else None.
    capture: Callable[[], dict[str, object] | None] = lambda: None
    #: The egress rules (``--allow``/``--deny``) in order, each with its hits.
    policy: Callable[[], list[dict[str, object]]] = lambda: []


def control_view(inst: Instance) -> ControlView:
    """The API's view of an assembled datapath."""
    return ControlView(
        links=inst.link_stats,
        drops=inst.counters.snapshot,
        pools=inst.pool_stats,
        flow_sources=inst.flow_sources,
        leases=lambda now: _leases_with_port(inst, now),
        forwards=inst.forwards,
        capture=inst.capture_stats,
        policy=inst.policy.rules,
    )


def _leases_with_port(inst: Instance, now: float) -> list[object]:
    """DHCP and DHCPv6 leases, each with the switch port its MAC was last seen on (None: not
    seen since guestnet started, or its link went away)."""
    out: list[object] = []
    six = inst.dhcp6.leases(now) if inst.dhcp6 is not None else ()
    for lease in (*inst.dhcp.leases(now), *six):
        mac = lease.get("mac")
        port = None
        if isinstance(mac, str):
            try:
                port = inst.switch.port_for(bytes.fromhex(mac.replace(":", "")))
            except ValueError:
                port = None
        out.append({**lease, "port": None if port is None else port.name})
    return out


_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class HttpError(Exception):
    """A request we answer with an error status (and, for parse errors, close)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    """One parsed request."""

    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the response (RFC 9112 section 9.3)."""
        conn = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse one request from the start of ``buf``: (request, bytes used), or None for "more".

    Raises :class:`HttpError` for a request that can never be valid.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError(431, "request head too large")
        return None
    if end > MAX_HEAD:
        raise HttpError(431, "request head too large")
    head = bytes(buf[:end])
    lines = head.split(b"\r\n")
    # RFC 9112 section 2.2: ignore empty lines before the request line.
    while lines and lines[0] == b"":
        lines.pop(0)
    if not lines:
        raise HttpError(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method_b, target_b, version_b = parts
    if not method_b or not all(c in _TOKEN_CHARS for c in method_b):
        raise HttpError(400, "malformed method")
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version_b.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed request line")
    if not target_b.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in target_b):
        raise HttpError(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not all(c in _TOKEN_CHARS for c in name):
            raise HttpError(400, "malformed header field")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise HttpError(400, "malformed header value")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host"):
                if headers[key] != text:
                    raise HttpError(400, f"conflicting {key} fields")
                continue
            text = f"{headers[key]}, {text}"
        headers[key] = text
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
    length = 0
    if "content-length" in headers:
        raw = headers["content-length"]
        if not raw.isdigit() or len(raw) > 10:
            raise HttpError(400, "malformed Content-Length")
        length = int(raw)
        if length > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
    body_at = end + 4
    if len(buf) - body_at < length:
        return None
    req = Request(
        method=method_b.decode("ascii"),
        target=target_b.decode("ascii"),
        version=version_b.decode("ascii"),
        headers=headers,
        body=bytes(buf[body_at : body_at + length]),
    )
    return req, body_at + length


def render_response(
    status: int,
    payload: object = None,
    keep_alive: bool = True,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """A whole HTTP/1.1 response; a JSON body unless ``payload`` is None or status is 204."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    body = b""
    if status != 204 and payload is not None:
        body = json.dumps(payload, indent=1, sort_keys=False).encode() + b"\n"
        lines.append("Content-Type: application/json")
    if status != 204:
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- routes -----------------------------------------------------------------------------------

_FORWARD_FIELDS = frozenset(("proto", "host_ip", "host_port", "guest_port", "guest_ip"))


class Api:
    """Routes requests to a datapath's view. ``handle`` returns (status, JSON value)."""

    def __init__(self, view: ControlView) -> None:
        self.view = view
        self.forwards = view.forwards

    def handle(self, method: str, path: str, body: bytes, now: float) -> tuple[int, object]:
        """Answer one request; never raises for bad input (404/405/400...)."""
        try:
            return self._route(method, path, body, now)
        except HttpError as exc:
            return exc.status, {"error": exc.message}
        except ForwardError as exc:
            return exc.status, {"error": exc.message}

    @staticmethod
    def allowed_methods(path: str) -> str:
        """The methods a path takes, for a 405's ``Allow`` field."""
        path = path.rstrip("/") or "/"
        if path == "/forwards":
            return "GET, POST"
        if path.startswith("/forwards/"):
            return "GET, DELETE"
        return "GET"

    def _route(self, method: str, path: str, body: bytes, now: float) -> tuple[int, object]:
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        if path == "/forwards":
            if method == "GET":
                return 200, self.forwards.to_json(now)
            if method == "POST":
                return self._add_forward(body, now)
            raise _not_allowed(path)
        if path.startswith("/forwards/"):
            fid = path[len("/forwards/") :]
            if method == "GET":
                fwd = self.forwards.get(fid)
                if fwd is None:
                    raise HttpError(404, f"no forward with id {fid!r}")
                return 200, fwd.to_json(self.forwards.guest_ip_for(fwd), now)
            if method == "DELETE":
                self.forwards.remove(fid)
                return 204, None
            raise _not_allowed(path)
        getter = {
            "/stats": self.stats,
            "/flows": self.flows,
            "/leases": self.leases,
            "/policy": self.policy,
        }.get(path)
        if getter is None:
            raise HttpError(404, f"no such resource: {path}")
        if method != "GET":
            raise _not_allowed(path)
        return 200, getter(now)

    # -- GET --------------------------------------------------------------------------------------

    def flows(self, now: float) -> list[dict[str, object]]:
        """Every live flow of every NAT service."""
        out: list[dict[str, object]] = []
        for proto, source in self.view.flow_sources():
            for flow in source(now):
                item = dict(flow)
                item.setdefault("proto", proto)
                out.append(item)
        return out

    def flow_counts(self, now: float) -> dict[str, object]:
        """Flows counted by protocol and state."""
        by_proto: dict[str, dict[str, Any]] = {}
        total = 0
        for flow in self.flows(now):
            proto = str(flow.get("proto"))
            state = str(flow.get("state", "unknown"))
            entry = by_proto.setdefault(proto, {"total": 0, "by_state": {}})
            entry["total"] += 1
            entry["by_state"][state] = entry["by_state"].get(state, 0) + 1
            total += 1
        return {"total": total, "by_proto": by_proto}

    def stats(self, now: float) -> dict[str, object]:
        """Links, drops (reason -> count), flows by protocol and state, both pools, forwards;
        the capture's counters while one runs; the egress rules with their hits when any."""
        view = self.view
        out: dict[str, object] = {
            "links": view.links(),
            "drops": view.drops(),
            "flows": self.flow_counts(now),
            "pool": view.pools(),
            "forwards": len(self.forwards),
        }
        capture = view.capture()
        if capture is not None:
            out["capture"] = capture
        rules = view.policy()
        if rules:
            out["policy"] = rules
        return out

    def policy(self, now: float) -> list[dict[str, object]]:
        """The egress rules in command-line order: action, CIDR, hits (verdicts given)."""
        return self.view.policy()

    def leases(self, now: float) -> list[object]:
        """The DHCP server's leases."""
        return self.view.leases(now)

    # -- forwards -------------------------------------------------------------------------------

    def _add_forward(self, body: bytes, now: float) -> tuple[int, object]:
        try:
            spec = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise HttpError(400, "body must be a JSON object")
        unknown = sorted(set(spec) - _FORWARD_FIELDS)
        if unknown:
            raise HttpError(400, f"unknown fields: {', '.join(unknown)}")
        for name in ("proto", "host_port", "guest_port"):
            if name not in spec:
                raise HttpError(400, f"missing field: {name}")
        host_ip = spec.get("host_ip", DEFAULT_HOST_IP)
        guest_ip = spec.get("guest_ip")
        for name, value in (("proto", spec["proto"]), ("host_ip", host_ip)):
            if not isinstance(value, str):
                raise HttpError(400, f"{name} must be a string")
        if guest_ip is not None and not isinstance(guest_ip, str):
            raise HttpError(400, "guest_ip must be a string")
        fwd = self.forwards.add(
            spec["proto"], spec["host_port"], spec["guest_port"], host_ip, guest_ip
        )
        return 201, fwd.to_json(self.forwards.guest_ip_for(fwd), now)


def _not_allowed(path: str) -> HttpError:
    return HttpError(405, f"method not allowed; {path} takes {Api.allowed_methods(path)}")


# -- I/O --------------------------------------------------------------------------------------


class ApiServer(UnixServer):
    """Serves :class:`Api` on a unix socket from the datapath's loop."""

    def __init__(self, loop: Loop, counters: Counters, path: str, api: Api) -> None:
        super().__init__(loop, counters, path, "api", MAX_CONNECTIONS, ACCEPT_BUDGET)
        self.api = api

    def connection(self, sock: socket.socket) -> None:
        """An accepted API connection."""
        _Conn(self, sock)


class _Conn:
    """One API connection: a bounded input buffer, one response at a time."""

    def __init__(self, server: ApiServer, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.closing = False
        self.closed = False
        self.timer: Timer | None = None
        server.conns[self.fd] = self
        server.loop.add_fd(self.fd, EPOLLIN, self._on_events)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(IDLE_TIMEOUT_S, self._idle)

    def _idle(self, _now: float) -> None:
        self.server.counters.inc("api.conn.idle_timeout")
        self.close()

    def _on_events(self, events: int) -> None:
        if events & EPOLLOUT:
            self._flush()
        if self.closed:
            return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP) and not self.out and not self.closing:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self._arm()
        self.inbuf += data
        self._pump()

    def _pump(self, _now: float = 0.0) -> None:
        """Answer complete requests from the buffer while responses drain at once (bounded)."""
        for _ in range(PIPELINE_BUDGET):
            if self.closed or self.closing or self.out or not self.inbuf:
                return
            if not self._process():
                return
        if self.inbuf and not self.out and not self.closed:
            # More pipelined requests than one turn's budget: continue on the next turn.
            self.server.loop.call_later(0, self._pump)

    def _process(self) -> bool:
        """Answer the next complete request in the buffer; False when there is none yet."""
        server = self.server
        counters = server.counters
        try:
            parsed = parse_request(self.inbuf)
        except HttpError as exc:
            counters.inc("api.request.bad")
            self.inbuf.clear()
            self.closing = True
            self._respond(render_response(exc.status, {"error": exc.message}, keep_alive=False))
            return True
        if parsed is None:
            return False
        req, used = parsed
        del self.inbuf[:used]
        status, payload = server.api.handle(req.method, req.path, req.body, server.loop.now())
        extra = {"Allow": Api.allowed_methods(req.path)} if status == 405 else None
        keep = req.keep_alive
        if not keep:
            self.closing = True
        self._respond(render_response(status, payload, keep_alive=keep, extra=extra))
        return True

    def _respond(self, data: bytes) -> None:
        self.out = memoryview(data)
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                self.server.loop.modify_fd(self.fd, EPOLLIN | EPOLLOUT)
                return
            except OSError:
                self.close()
                return
            self.out = self.out[sent:]
        if self.closing:
            self.close()
            return
        self.server.loop.modify_fd(self.fd, EPOLLIN)
        if self.inbuf:
            self.server.loop.call_later(0, self._pump)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.server.conns.pop(self.fd, None)
        self.server.loop.remove_fd(self.fd)
        self.sock.close()


class StartError(Exception):
    """The pcap file, a -p forward or the API socket could not be set up (one-line message)."""


def start_control(inst: Instance) -> ApiServer | None:
    """Set up what the config asks: pcap capture, -p forwards, then the API socket.

    The API socket comes last, so a client that finds it can rely on the rest being in place.
    The server is closed with the instance.
    """
    cfg = inst.config
    if cfg.pcap:
        try:
            inst.start_capture(cfg.pcap, cfg.pcap_max_bytes)
        except OSError as exc:
            raise StartError(f"--pcap {cfg.pcap}: {exc.strerror or exc}") from None
    try:
        inst.publish(cfg.publish)
    except ForwardError as exc:
        raise StartError(f"--publish: {exc.message}") from None
    if not cfg.api_socket:
        return None
    try:
        server = ApiServer(inst.loop, inst.counters, cfg.api_socket, Api(control_view(inst)))
    except OSError as exc:
        raise StartError(f"--api-socket {cfg.api_socket}: {exc.strerror or exc}") from None
    inst.on_close(server.close)
    return server
