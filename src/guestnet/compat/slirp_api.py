"""slirp4netns's API socket (``--api-socket``), served on guestnet's loop.

Theory of operation
-------------------
Tools that publish ports through slirp4netns (podman's ``port_handler=slirp4netns``, rootlesskit's
``--port-driver=slirp4netns``) speak a tiny protocol on a unix socket: one JSON request per
connection, one JSON object back with no newline, then the server closes. Two layers:

- :class:`SlirpApi` (sans-I/O): request bytes in, response bytes out. ``add_hostfwd``,
  ``list_hostfwd`` and ``remove_hostfwd`` with slirp4netns's shapes, defaults (``host_addr`` ""
  or absent: 0.0.0.0; ``guest_addr`` "" or absent: CIDR+100) and error strings, byte for byte.
  Forwards are guestnet's own (:class:`~guestnet.io.forwards.Forwards`): the same registry the
  JSON control API and ``guestnet forward ls`` read, so a port published here shows there too,
  and the ids are the registry's (from 1, never reused while the process lives).
- :class:`SlirpApiServer` (I/O): the listening socket (an existing file at the path is replaced,
  as slirp4netns does), accepting through :class:`~guestnet.io.listener.Listener`. A connection
  is read, without blocking the loop, until the buffer holds one whole JSON value, the client
  half-closes, the request reaches :data:`MAX_REQUEST` bytes (refused: "too large message") or
  :data:`REQUEST_TIMEOUT_S` passes. slirp4netns reads once; waiting for a whole value instead
  answers the same for every client that sends its request in one write, and also for one whose
  request arrives in pieces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
from typing import Any

from guestnet.core.timers import Timer
from guestnet.counters import Counters
from guestnet.io.forwards import ForwardError, Forwards
from guestnet.io.listener import UnixServer
from guestnet.io.loop import EPOLLIN, EPOLLOUT, Loop

log = logging.getLogger(__name__)

#: slirp4netns reads into a 4,096-byte buffer; a request that fills it is refused.
MAX_REQUEST = 4096
#: A connection that has not sent a whole request by then is answered (or closed) and closed.
REQUEST_TIMEOUT_S = 10.0
#: Reads (of 64 KiB) that discard what a client sent past its request before we close.
DRAIN_READS = 16
#: Connections served at once; more are closed at once (counted).
MAX_CONNECTIONS = 16


def _error(desc: str) -> bytes:
    return json.dumps({"error": {"desc": desc}}, separators=(",", ":")).encode()


ERR_PARSE = _error("bad request: cannot parse JSON")
ERR_NOT_OBJECT = _error("bad request: json_object() failed")
ERR_NO_EXECUTE = _error("bad request: no execute found")
ERR_UNKNOWN = _error("bad request: unknown execute")
ERR_TOO_LARGE = _error("bad request: too large message")
ERR_ADD_FAILED = _error("bad request: add_hostfwd: slirp_add_hostfwd failed")
ERR_REMOVE_ID = _error("bad request: remove_hostfwd: bad arguments.id")


def _bad_argument(name: str) -> bytes:
    return _error(f"bad request: add_hostfwd: bad arguments.{name}")


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


#: What :func:`decode_request` returns for bytes that are not (yet) one JSON value.
NOT_JSON = object()


def decode_request(data: bytes) -> tuple[Any, bool]:
    """(value, complete) for the request bytes so far.

    ``complete`` False means "a prefix of valid JSON: more may come". Bytes that can never
    become valid JSON come back as (:data:`NOT_JSON`, True). Whatever follows the first value
    is ignored, as slirp4netns's parser does (clients send a trailing newline).
    """
    text = data.decode("utf-8", errors="replace").lstrip()
    if not text:
        return NOT_JSON, False
    try:
        value, _end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        return NOT_JSON, not (exc.pos >= len(text) or _truncated(exc))
    return value, True


def _truncated(exc: json.JSONDecodeError) -> bool:
    """Whether the decoder stopped inside an unterminated string or value: more may come."""
    return exc.msg.startswith("Unterminated")


class SlirpApi:
    """slirp4netns's ``add_hostfwd``/``list_hostfwd``/``remove_hostfwd`` on a forward registry.

    ``default_guest``: where a forward without ``guest_addr`` goes (slirp4netns: CIDR+100).
    """

    def __init__(self, forwards: Forwards, default_guest: str) -> None:
        self.forwards = forwards
        self.default_guest = default_guest

    def handle(self, data: bytes) -> bytes:
        """The response to one whole request (never raises for bad input)."""
        if len(data) >= MAX_REQUEST:
            return ERR_TOO_LARGE
        value, _complete = decode_request(data)
        if value is NOT_JSON:
            return ERR_PARSE
        if not isinstance(value, dict):
            return ERR_NOT_OBJECT
        execute = value.get("execute")
        if not isinstance(execute, str):
            return ERR_NO_EXECUTE
        args = value.get("arguments")
        if not isinstance(args, dict):
            args = {}
        if execute == "add_hostfwd":
            return self.add_hostfwd(args)
        if execute == "list_hostfwd":
            return self.list_hostfwd()
        if execute == "remove_hostfwd":
            return self.remove_hostfwd(args)
        return ERR_UNKNOWN

    def add_hostfwd(self, args: dict[str, Any]) -> bytes:
        """Publish ``host_addr:host_port`` to ``guest_addr:guest_port``; ``{"return":{"id":N}}``."""
        proto = args.get("proto")
        if proto not in ("tcp", "udp"):
            return _bad_argument("proto")
        host_addr = _ipv4_or_default(args.get("host_addr"), "0.0.0.0")
        if host_addr is None:
            return _bad_argument("host_addr")
        host_port = _port(args.get("host_port"))
        if host_port is None:
            return _bad_argument("host_port")
        guest_addr = _ipv4_or_default(args.get("guest_addr"), self.default_guest)
        if guest_addr is None or ipaddress.IPv4Address(guest_addr) not in self.forwards.subnets[0]:
            return _bad_argument("guest_addr")
        guest_port = _port(args.get("guest_port"))
        if guest_port is None:
            return _bad_argument("guest_port")
        try:
            fwd = self.forwards.add(proto, host_port, guest_port, host_addr, guest_addr)
        except ForwardError as exc:
            log.info("add_hostfwd: %s", exc.message)
            return ERR_ADD_FAILED
        return _dump({"return": {"id": int(fwd.id)}})

    def list_hostfwd(self) -> bytes:
        """Every IPv4 forward of the registry, as slirp4netns lists them (no ``return``)."""
        entries = []
        for fwd in self.forwards:
            if ":" in fwd.host_ip:
                continue
            entries.append(
                {
                    "id": int(fwd.id),
                    "proto": fwd.proto,
                    "host_addr": fwd.host_ip,
                    "host_port": fwd.host_port,
                    "guest_addr": self.forwards.guest_ip_for(fwd),
                    "guest_port": fwd.guest_port,
                }
            )
        return _dump({"entries": entries})

    def remove_hostfwd(self, args: dict[str, Any]) -> bytes:
        """Remove forward ``id``; ``{"return":{}}``."""
        fid = args.get("id")
        if isinstance(fid, bool) or not isinstance(fid, int | float) or fid != int(fid):
            return ERR_REMOVE_ID
        try:
            self.forwards.remove(str(int(fid)))
        except ForwardError:
            return ERR_REMOVE_ID
        return b'{"return":{}}'


def _ipv4_or_default(value: object, default: str) -> str | None:
    """A dotted IPv4 address ("" or absent: ``default``), or None when it is not one."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def _port(value: object) -> int | None:
    """A port number 1..65535 (a JSON number, as slirp4netns reads it), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != int(value) or not 1 <= value <= 65535:
        return None
    return int(value)


# -- I/O -----------------------------------------------------------------------------------------


class SlirpApiServer(UnixServer):
    """Serves :class:`SlirpApi` on a unix socket from the datapath's loop."""

    def __init__(self, loop: Loop, counters: Counters, path: str, api: SlirpApi) -> None:
        super().__init__(loop, counters, path, "slirp_api", MAX_CONNECTIONS)
        self.api = api

    def connection(self, sock: socket.socket) -> None:
        """An accepted request connection."""
        _Conn(self, sock)


class _Conn:
    """One request: read until whole (bounded), answer once, close."""

    def __init__(self, server: SlirpApiServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.answered = False
        self.closed = False
        server.conns[self.fd] = self
        server.loop.add_fd(self.fd, EPOLLIN, self._on_events)
        self.timer: Timer | None = server.loop.call_later(REQUEST_TIMEOUT_S, self._timeout)

    def _timeout(self, _now: float) -> None:
        self.timer = None
        self.server.counters.inc("slirp_api.request.timeout")
        if self.buf and not self.answered:
            self._answer()
        else:
            self.close()

    def _on_events(self, events: int) -> None:
        if self.answered:
            self._flush()
            return
        try:
            data = self.sock.recv(MAX_REQUEST - len(self.buf))
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.buf += data
        if not data or len(self.buf) >= MAX_REQUEST:
            self._answer()
            return
        _value, complete = decode_request(bytes(self.buf))
        if complete:
            self._answer()

    def _answer(self) -> None:
        self.answered = True
        if not self.buf:  # connected and hung up without a word
            self.close()
            return
        response = self.server.api.handle(bytes(self.buf))
        self.server.counters.inc("slirp_api.request")
        log.info("slirp4netns API: %s -> %s", bytes(self.buf).strip()[:200], response[:200])
        self.out = memoryview(response)
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                self.server.loop.modify_fd(self.fd, EPOLLOUT)
                return
            except OSError:
                break
            self.out = self.out[sent:]
        # Unread input would make closing reset the connection, and the client lose the answer.
        with contextlib.suppress(OSError):
            for _ in range(DRAIN_READS):
                if not self.sock.recv(65536):
                    break
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.conns.pop(self.fd, None)
        self.server.loop.remove_fd(self.fd)
        self.sock.close()
