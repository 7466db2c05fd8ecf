"""Control API: the HTTP parser, every route field by field, errors, the forward registry and its
hooks, and the server on a real unix socket driven by an in-process loop (no root)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestnet.api import (
    IDLE_TIMEOUT_S,
    MAX_BODY,
    MAX_CONNECTIONS,
    MAX_HEAD,
    Api,
    ApiServer,
    HttpError,
    StartError,
    control_view,
    parse_request,
    render_response,
    start_control,
)
from guestnet.assembly import Instance
from guestnet.client import format_stats
from guestnet.config import Config
from guestnet.core.port import Port
from guestnet.io.forwards import Forward, parse_publish
from guestnet.io.links import StreamLink
from guestnet.io.loop import Loop
from guestnet.network import Network

POOL_FIELDS = {"capacity", "mtu", "free_count", "in_use", "hits", "misses", "high_water"}

# -- parser --------------------------------------------------------------------------------------


def test_parse_get() -> None:
    raw = b"GET /stats?x=1 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    parsed = parse_request(raw)
    assert parsed is not None
    req, used = parsed
    assert used == len(raw)
    assert (req.method, req.target, req.path, req.version) == (
        "GET",
        "/stats?x=1",
        "/stats",
        "HTTP/1.1",
    )
    assert req.headers == {"host": "localhost", "accept": "*/*"}
    assert req.body == b"" and req.keep_alive


def test_parse_body_incomplete_and_pipelined() -> None:
    body = b'{"a": 1}'
    one = b"POST /forwards HTTP/1.1\r\nContent-Length: 8\r\n\r\n" + body
    for cut in range(len(one)):
        assert parse_request(one[:cut]) is None
    two = one + b"GET /flows HTTP/1.1\r\n\r\n"
    parsed = parse_request(two)
    assert parsed is not None
    req, used = parsed
    assert req.body == body and used == len(one)
    nxt = parse_request(two[used:])
    assert nxt is not None and nxt[0].path == "/flows"


def test_keep_alive_rules() -> None:
    def req(text: bytes) -> Any:
        parsed = parse_request(text)
        assert parsed is not None
        return parsed[0]

    assert not req(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    assert not req(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert req(b"\r\nGET / HTTP/1.1\r\n\r\n").keep_alive  # leading empty line ignored


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /stats\r\n\r\n", 400),
        (b"GET  /stats HTTP/1.1\r\n\r\n", 400),
        (b"G(T /stats HTTP/1.1\r\n\r\n", 400),
        (b"GET stats HTTP/1.1\r\n\r\n", 400),
        (b"GET /st\x01ats HTTP/1.1\r\n\r\n", 400),
        (b"GET /stats HTTP/2.0\r\n\r\n", 505),
        (b"GET /stats FTP/1.1\r\n\r\n", 400),
        (b"GET /stats HTTP/1.1\r\nNo colon\r\n\r\n", 400),
        (b"GET /stats HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /stats HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET /stats HTTP/1.1\r\n folded\r\n\r\n", 400),
        (b"POST /forwards HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /forwards HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /forwards HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST /forwards HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
        (b"\r\n\r\n", 400),
    ],
)
def test_parse_errors(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(raw)
    assert info.value.status == status


def test_head_too_large_without_end() -> None:
    assert parse_request(b"GET / HTTP/1.1\r\nX: " + b"a" * 100) is None
    with pytest.raises(HttpError) as info:
        parse_request(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
    assert info.value.status == 431


def test_render_response() -> None:
    raw = render_response(200, {"a": 1})
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert json.loads(body) == {"a": 1}
    no_content = render_response(204, None, keep_alive=False)
    assert no_content == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"


# -- routes (Api.handle on a real Instance) ------------------------------------------------


class FakeNat:
    """Stands for a NAT service's flow listing (the real ones: test_flows_of_real_services)."""

    def __init__(self, flows: list[dict[str, object]]) -> None:
        self._flows = flows
        self.asked: list[float] = []

    def flows(self, now: float) -> list[dict[str, object]]:
        self.asked.append(now)
        return self._flows

    def handle_tcp(self, *_a: object) -> None:  # the classifier's handler shape
        pass

    def handle_udp(self, *_a: object) -> None:
        pass


@pytest.fixture
def inst() -> Iterator[Instance]:
    instance = Instance(Config(), loop=Loop())
    try:
        yield instance
    finally:
        instance.close()


def _api(inst: Instance) -> Api:
    return Api(control_view(inst))


def test_stats_fields(inst: Instance, frames: Any) -> None:
    guest, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        StreamLink(inst.hub, ours, "qemu0")
        request = frames.arp()
        guest.sendall(struct.pack("!I", len(request)) + request)
        not_ours = frames.arp(tpa=bytes([10, 0, 2, 99]))
        guest.sendall(struct.pack("!I", len(not_ours)) + not_ours)
        for _ in range(10):
            inst.loop.run_once(0.01)
        status, stats = _api(inst).handle("GET", "/stats", b"", inst.loop.now())
    finally:
        guest.close()
    assert status == 200
    assert isinstance(stats, dict)
    assert set(stats) == {"links", "drops", "flows", "pool", "forwards"}
    (link,) = stats["links"]
    assert link["name"] == "qemu0" and link["kind"] == "qemu-stream"
    assert link["guest_mac"] == "52:54:00:12:34:56"
    assert link["frames_in"] == 2 and link["bytes_in"] == len(request) + len(not_ours)
    assert link["frames_out"] == 1 and link["bytes_out"] == 60  # ARP reply padded to the minimum
    assert stats["drops"]["arp.request.not_ours"] == 1
    assert list(stats["drops"]) == sorted(stats["drops"])
    assert stats["flows"] == {"total": 0, "by_proto": {}}
    assert set(stats["pool"]) == {"from_guest", "to_guest"}
    for pool in stats["pool"].values():
        assert set(pool) == POOL_FIELDS
        assert pool["capacity"] == 256 and pool["mtu"] == 65520 and pool["in_use"] == 0
    assert stats["pool"]["to_guest"]["misses"] + stats["pool"]["to_guest"]["hits"] == 1
    assert stats["forwards"] == 0
    json.dumps(stats)  # serialisable


def _flow(proto: str, state: str, gport: int) -> dict[str, object]:
    return {
        "proto": proto,
        "guest": {"ip": "10.0.2.15", "port": gport},
        "host": {"ip": "127.0.0.1", "port": 80},
        "state": state,
        "bytes_from_guest": 10,
        "bytes_to_guest": 20,
        "age_s": 1.5,
    }


def test_flows_and_counts(inst: Instance) -> None:
    tcp = FakeNat([_flow("tcp", "established", 1), _flow("tcp", "established", 2)])
    tcp._flows.append(_flow("tcp", "fin_wait", 3))
    udp_flow = _flow("udp", "open", 4)
    del udp_flow["proto"]  # the API fills in the protocol of the service that listed it
    udp = FakeNat([udp_flow])
    sources = [("tcp", tcp.flows), ("udp", udp.flows)]
    api = Api(dataclasses.replace(control_view(inst), flow_sources=lambda: sources))
    status, flows = api.handle("GET", "/flows", b"", 5.0)
    assert status == 200 and isinstance(flows, list) and len(flows) == 4
    assert flows[0] == _flow("tcp", "established", 1)
    assert flows[3]["proto"] == "udp" and flows[3]["guest"] == {"ip": "10.0.2.15", "port": 4}
    assert tcp.asked == [5.0]
    status, stats = api.handle("GET", "/stats", b"", 5.0)
    assert isinstance(stats, dict)
    assert stats["flows"] == {
        "total": 4,
        "by_proto": {
            "tcp": {"total": 3, "by_state": {"established": 2, "fin_wait": 1}},
            "udp": {"total": 1, "by_state": {"open": 1}},
        },
    }


def test_services_without_flows_are_skipped(inst: Instance) -> None:
    assert _api(inst).handle("GET", "/flows", b"", 1.0) == (200, [])


def test_leases(inst: Instance) -> None:
    api = _api(inst)
    assert api.handle("GET", "/leases", b"", 1.0) == (200, [])  # the real DHCP server, no lease

    class FakeDhcp:
        def leases(self, now: float) -> list[dict[str, object]]:
            return [{"mac": "52:54:00:12:34:56", "ip": "10.0.2.15", "expires_in_s": now}]

        def guest_address(self) -> str:
            return "10.0.2.16"

    real = inst.dhcp
    inst.dhcp = FakeDhcp()  # type: ignore[assignment]
    # Issue 15: each lease names the switch port its MAC was last seen on (None: not seen).
    assert api.handle("GET", "/leases", b"", 7.0) == (
        200,
        [{"mac": "52:54:00:12:34:56", "ip": "10.0.2.15", "expires_in_s": 7.0, "port": None}],
    )
    port = Port("qemu7", lambda frame: None)
    inst.switch.attach(port)
    inst.switch.learn(port, bytes.fromhex("525400123456"))
    assert api.handle("GET", "/leases", b"", 7.0) == (
        200,
        [{"mac": "52:54:00:12:34:56", "ip": "10.0.2.15", "expires_in_s": 7.0, "port": "qemu7"}],
    )
    inst.switch.detach(port)
    inst.dhcp = real
    assert api.handle("GET", "/leases", b"", 1.0) == (200, [])


def test_unknown_route_and_method(inst: Instance) -> None:
    api = _api(inst)
    assert api.handle("GET", "/nope", b"", 0.0) == (404, {"error": "no such resource: /nope"})
    status, body = api.handle("POST", "/stats", b"", 0.0)
    assert status == 405 and "GET" in str(body)
    assert api.handle("PUT", "/forwards", b"", 0.0)[0] == 405
    assert api.handle("POST", "/forwards/1", b"", 0.0)[0] == 405
    assert Api.allowed_methods("/forwards/3") == "GET, DELETE"
    assert Api.allowed_methods("/forwards") == "GET, POST"
    assert Api.allowed_methods("/stats") == "GET"
    assert api.handle("GET", "/stats/", b"", 0.0)[0] == 200


def _post(api: Api, body: object) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.handle("POST", "/forwards", raw, 10.0)


def test_forward_add_list_delete(inst: Instance) -> None:
    api = _api(inst)
    status, fwd = _post(api, {"proto": "tcp", "host_port": 0, "guest_port": 80})
    assert status == 201
    assert set(fwd) == {
        "id",
        "proto",
        "host_ip",
        "host_port",
        "guest_ip",
        "guest_ip_fixed",
        "guest_port",
        "accepted",
        "datagrams",
        "age_s",
    }
    assert isinstance(fwd["id"], str)
    assert fwd["proto"] == "tcp" and fwd["host_ip"] == "127.0.0.1" and fwd["guest_port"] == 80
    assert 0 < fwd["host_port"] <= 65535  # 0 asks for any free port; the bound one is shown
    assert fwd["guest_ip"] == "10.0.2.15" and fwd["guest_ip_fixed"] is False
    assert fwd["accepted"] == 0 and fwd["datagrams"] == 0
    status, fwd2 = _post(
        api,
        {
            "proto": "udp",
            "host_ip": "::1",
            "host_port": 0,
            "guest_port": 53,
            "guest_ip": "10.0.2.20",
        },
    )
    assert status == 201 and fwd2["host_ip"] == "::1" and fwd2["guest_ip"] == "10.0.2.20"
    assert fwd2["guest_ip_fixed"] is True and fwd2["id"] != fwd["id"]
    status, listed = api.handle("GET", "/forwards", b"", 10.0)
    assert status == 200 and [f["id"] for f in listed] == [fwd["id"], fwd2["id"]]
    assert listed[0] == fwd
    assert api.handle("GET", f"/forwards/{fwd2['id']}", b"", 10.0) == (200, fwd2)
    assert api.handle("DELETE", f"/forwards/{fwd['id']}", b"", 10.0) == (204, None)
    status, err = api.handle("DELETE", f"/forwards/{fwd['id']}", b"", 10.0)
    assert status == 404 and "no forward" in err["error"]
    assert api.handle("GET", "/forwards/999", b"", 10.0)[0] == 404
    assert [f["id"] for f in api.handle("GET", "/forwards", b"", 10.0)[1]] == [fwd2["id"]]
    # The port is free again once removed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", fwd["host_port"]))


def test_forward_conflicts_409(inst: Instance) -> None:
    api = _api(inst)
    status, fwd = _post(api, {"proto": "tcp", "host_port": 0, "guest_port": 80})
    assert status == 201
    again = {"proto": "tcp", "host_port": fwd["host_port"], "guest_port": 81}
    status, err = _post(api, again)
    assert status == 409 and "in use" in err["error"]
    # A port some other program holds: the kernel's EADDRINUSE, as 409.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        status, err = _post(api, {"proto": "tcp", "host_port": port, "guest_port": 80})
        assert status == 409 and "in use" in err["error"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        status, _ = _post(api, {"proto": "udp", "host_port": port, "guest_port": 53})
        assert status == 409
    # Same port, other protocol: fine.
    status, _ = _post(api, {"proto": "udp", "host_port": fwd["host_port"], "guest_port": 80})
    assert status == 201


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        ({"host_port": 1, "guest_port": 2}, "missing field: proto"),
        ({"proto": "tcp", "guest_port": 2}, "missing field: host_port"),
        ({"proto": "tcp", "host_port": 0}, "missing field: guest_port"),
        ({"proto": "sctp", "host_port": 0, "guest_port": 2}, "proto"),
        ({"proto": 6, "host_port": 0, "guest_port": 2}, "proto must be a string"),
        ({"proto": "tcp", "host_port": "80", "guest_port": 2}, "host_port"),
        ({"proto": "tcp", "host_port": True, "guest_port": 2}, "host_port"),
        ({"proto": "tcp", "host_port": 70000, "guest_port": 2}, "host_port"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 0}, "guest_port"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2.5}, "guest_port"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2, "host_ip": "localhost"}, "host_ip"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2, "host_ip": 1}, "host_ip"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2, "guest_ip": "::1"}, "guest_ip"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2, "guest_ip": "10.9.9.9"}, "subnet"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2, "gest_port": 3}, "unknown fields"),
        ({"proto": "tcp", "host_port": 0, "guest_port": 2, "host_ip": "192.0.2.1"}, "bind"),
    ],
)
def test_forward_bad_requests_400(inst: Instance, body: object, needle: str) -> None:
    status, err = _post(_api(inst), body)
    assert status == 400, err
    assert set(err) == {"error"} and needle in err["error"]
    assert len(inst.forwards) == 0


def test_forward_tcp_without_datapath_closes(inst: Instance) -> None:
    inst.forwards.on_accept = None  # the TCP NAT sets it: this is the path without one
    fwd = inst.forwards.add("tcp", 0, 80)
    with socket.create_connection(("127.0.0.1", fwd.host_port), timeout=2) as c:
        for _ in range(10):
            inst.loop.run_once(0.01)
        assert c.recv(1) == b""
    assert inst.counters["forward.tcp.no_datapath"] == 1 and fwd.accepted == 1


def test_forward_hooks(inst: Instance) -> None:
    accepted: list[tuple[Forward, socket.socket]] = []
    got: list[tuple[str, bytes, object]] = []
    removed: list[str] = []

    def on_datagram(f: Forward, payload: memoryview, sender: tuple[object, ...]) -> None:
        got.append((f.id, bytes(payload), sender))
        f.sock.sendto(b"re:" + payload, sender)

    inst.forwards.on_accept = lambda f, conn, _peer: accepted.append((f, conn))
    inst.forwards.on_datagram = on_datagram
    inst.forwards.on_remove = lambda f: removed.append(f.id)
    tcp = inst.forwards.add("tcp", 0, 80)
    udp = inst.forwards.add("udp", 0, 53)
    with (
        socket.create_connection(("127.0.0.1", tcp.host_port), timeout=2) as c,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
    ):
        u.settimeout(2)
        u.sendto(b"ping", ("127.0.0.1", udp.host_port))
        for _ in range(10):
            inst.loop.run_once(0.01)
        assert len(accepted) == 1 and accepted[0][0] is tcp
        conn = accepted[0][1]
        assert conn.getblocking() is False and conn.getpeername() == c.getsockname()
        conn.close()
        assert got == [(udp.id, b"ping", ("127.0.0.1", u.getsockname()[1]))]
        assert u.recv(100) == b"re:ping"
    inst.forwards.remove(tcp.id)
    assert removed == [tcp.id]
    inst.close()
    assert removed == [tcp.id, udp.id]


def test_guest_ip_follows_dhcp(inst: Instance) -> None:
    fwd = inst.forwards.add("tcp", 0, 80)

    class FakeDhcp:
        def guest_address(self) -> str:
            return "10.0.2.42"

    inst.dhcp = FakeDhcp()  # type: ignore[assignment]
    assert inst.forwards.guest_ip_for(fwd) == "10.0.2.42"


def test_parse_publish() -> None:
    assert parse_publish("8080:80") == [("tcp", "127.0.0.1", 8080, 80)]
    assert parse_publish("0.0.0.0:53:53/udp") == [("udp", "0.0.0.0", 53, 53)]
    assert parse_publish("[::1]:8080:80/tcp") == [("tcp", "::1", 8080, 80)]
    assert parse_publish("8000-8002:9000-9002") == [
        ("tcp", "127.0.0.1", 8000, 9000),
        ("tcp", "127.0.0.1", 8001, 9001),
        ("tcp", "127.0.0.1", 8002, 9002),
    ]
    for bad in (
        "80",
        "a:1:2",
        "1-2:3",
        "[1.2.3.4]:1:2",
        "70000:1",
        "::1:80:80",
        "2-1:2-1",
        "1:2/sctp",
    ):
        with pytest.raises(ValueError):
            parse_publish(bad)


def test_parse_publish_naming_the_guest() -> None:
    """Issue 15: ``HOST_PORT:GUEST_IP:GUEST_PORT`` chooses the guest (a fifth item)."""
    assert parse_publish("8080:10.0.2.16:80") == [("tcp", "127.0.0.1", 8080, 80, "10.0.2.16")]
    assert parse_publish("0.0.0.0:53:10.0.2.17:53/udp") == [("udp", "0.0.0.0", 53, 53, "10.0.2.17")]
    assert parse_publish("[::1]:8080:[fd00::16]:80") == [("tcp", "::1", 8080, 80, "fd00::16")]
    assert parse_publish("8000-8001:10.0.2.16:9000-9001") == [
        ("tcp", "127.0.0.1", 8000, 9000, "10.0.2.16"),
        ("tcp", "127.0.0.1", 8001, 9001, "10.0.2.16"),
    ]
    for bad in ("8080:10.0.2:80", "8080:[10.0.2.16]:80", "8080:10.0.2.16:", "8080:5:80"):
        with pytest.raises(ValueError):
            parse_publish(bad)


def test_publish_naming_the_guest_at_start() -> None:
    inst = Instance(Config(publish=(("tcp", "127.0.0.1", 0, 80, "10.0.2.16"),)))
    try:
        inst.publish(inst.config.publish)
        (fwd,) = inst.forwards.to_json(0.0)
        assert fwd["guest_ip"] == "10.0.2.16"
    finally:
        inst.close()


def test_publish_at_start_and_start_errors(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    net = Network(Config(publish=(("tcp", "127.0.0.1", port, 80),)))
    inst = net.instance
    try:
        net.start_services()
        (fwd,) = list(inst.forwards)
        assert fwd.host_port == port and fwd.guest_port == 80
        net.start_services()  # once only
        assert len(inst.forwards) == 1
    finally:
        net.close()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        busy = holder.getsockname()[1]
        inst = Instance(Config(publish=(("tcp", "127.0.0.1", busy, 80),)))
        try:
            with pytest.raises(StartError, match="in use"):
                start_control(inst)
        finally:
            inst.close()
    inst = Instance(Config(pcap=str(tmp_path / "no" / "such" / "dir.pcap")))
    try:
        with pytest.raises(StartError, match="--pcap"):
            start_control(inst)
    finally:
        inst.close()


# -- the server on a real unix socket ---------------------------------------------------------


class Client:
    """A non-blocking client; the test pumps the instance's loop while waiting."""

    def __init__(self, inst: Instance, path: str) -> None:
        self.inst = inst
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""
        self.eof = False

    def pump(self, turns: int = 50) -> None:
        for _ in range(turns):
            self.inst.loop.run_once(0.005)
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                self.eof = True
                return
            self.buf += data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Read one whole response (Content-Length framed)."""
        for _ in range(100):
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode()
                lines = head.split("\r\n")
                status = int(lines[0].split()[1])
                headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                length = int(headers.get("content-length", "0"))
                if len(self.buf) >= end + 4 + length:
                    body = self.buf[end + 4 : end + 4 + length]
                    self.buf = self.buf[end + 4 + length :]
                    return status, headers, body
            if self.eof:
                break
            self.pump(5)
        raise AssertionError(f"no whole response; have {self.buf!r}")

    def ask(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(raw)
        return self.response()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Instance, str]]:
    clock = [1000.0]
    instance = Instance(Config(), loop=Loop(clock=lambda: clock[0]))
    path = str(tmp_path / "api.sock")
    server = ApiServer(instance.loop, instance.counters, path, Api(control_view(instance)))
    instance.on_close(server.close)
    instance.fake_clock = clock  # type: ignore[attr-defined]
    try:
        yield instance, path
    finally:
        instance.close()
    assert not os.path.exists(path), "the socket file is removed at close"


def test_socket_mode_0600(served: tuple[Instance, str]) -> None:
    _, path = served
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_keep_alive_and_pipelining(served: tuple[Instance, str]) -> None:
    inst, path = served
    c = Client(inst, path)
    status, headers, body = c.ask(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json"
    assert set(json.loads(body)["pool"]["to_guest"]) == POOL_FIELDS
    post = json.dumps({"proto": "tcp", "host_port": 0, "guest_port": 22}).encode()
    c.sock.sendall(
        b"POST /forwards HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(post)
        + post
        + b"GET /forwards HTTP/1.1\r\n\r\n"
        + b"DELETE /forwards/1 HTTP/1.1\r\n\r\n"
        + b"GET /forwards HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    status, _, body = c.response()
    assert status == 201 and json.loads(body)["id"] == "1"
    status, _, body = c.response()
    assert status == 200 and [f["guest_port"] for f in json.loads(body)] == [22]
    status, headers, body = c.response()
    assert status == 204 and body == b"" and "content-length" not in headers
    status, headers, body = c.response()
    assert status == 200 and json.loads(body) == [] and headers["connection"] == "close"
    c.pump(5)
    assert c.eof
    c.close()


def test_many_pipelined_requests_are_bounded_per_turn(served: tuple[Instance, str]) -> None:
    inst, path = served
    c = Client(inst, path)
    c.sock.sendall(b"GET /leases HTTP/1.1\r\n\r\n" * 200)
    for _ in range(200):
        status, _, body = c.response()
        assert status == 200 and body.strip() == b"[]"
    c.close()


def test_bad_request_closes_only_its_connection(served: tuple[Instance, str]) -> None:
    inst, path = served
    good = Client(inst, path)
    assert good.ask(b"GET /leases HTTP/1.1\r\n\r\n")[0] == 200
    bad = Client(inst, path)
    status, headers, body = bad.ask(b"BREW /pot HTCPCP/1.0\r\n\r\n")
    assert status == 400 and headers["connection"] == "close" and "error" in json.loads(body)
    bad.pump(5)
    assert bad.eof
    bad.close()
    huge = Client(inst, path)
    status, _, _ = huge.ask(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10))
    assert status == 431
    huge.close()
    assert inst.counters["api.request.bad"] == 2
    assert good.ask(b"GET /stats HTTP/1.1\r\n\r\n")[0] == 200
    assert Client(inst, path).ask(b"GET /flows HTTP/1.1\r\n\r\n")[0] == 200
    good.close()


def test_405_carries_allow(served: tuple[Instance, str]) -> None:
    inst, path = served
    c = Client(inst, path)
    status, headers, body = c.ask(b"DELETE /stats HTTP/1.1\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET" and "error" in json.loads(body)
    status, headers, _ = c.ask(b"PATCH /forwards/1 HTTP/1.1\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, DELETE"
    c.close()


def test_connection_limit_and_idle_timeout(served: tuple[Instance, str]) -> None:
    inst, path = served
    clients = []
    for _ in range(MAX_CONNECTIONS):  # one at a time: the listen backlog is smaller
        clients.append(Client(inst, path))
        clients[-1].pump(1)
    extra = Client(inst, path)
    extra.pump(5)
    assert extra.eof and inst.counters["api.conn.too_many"] == 1
    extra.close()
    assert clients[0].ask(b"GET /leases HTTP/1.1\r\n\r\n")[0] == 200
    inst.fake_clock[0] += IDLE_TIMEOUT_S + 1  # type: ignore[attr-defined]
    for c in clients:
        c.pump(2)
        assert c.eof
        c.close()
    assert inst.counters["api.conn.idle_timeout"] == MAX_CONNECTIONS
    after = Client(inst, path)
    assert after.ask(b"GET /leases HTTP/1.1\r\n\r\n")[0] == 200
    after.close()


def test_large_response_drains_in_pieces(served: tuple[Instance, str]) -> None:
    inst, path = served
    flows = [_flow("tcp", "established", p) for p in range(1, 20001)]
    inst.tcp_nat.flows = FakeNat(flows).flows  # type: ignore[method-assign]
    c = Client(inst, path)
    c.sock.sendall(b"GET /flows HTTP/1.1\r\n\r\n")
    status, _, body = c.response()
    assert status == 200 and len(json.loads(body)) == 20000 and len(body) > 1 << 20
    c.close()


def test_client_commands(served: tuple[Instance, str], capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI clients, with the server's loop run in a thread for the blocking client."""
    import threading

    from guestnet.cli import main

    inst, path = served
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            inst.loop.run_once(0.01)

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert main(["stats", "--api-socket", path]) == 0
        out = capsys.readouterr().out
        assert "to_guest: capacity=256 mtu=65520" in out and "from_guest:" in out
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        assert main(["forward", "add", "--api-socket", path, f"{port}:8080", "--json"]) == 0
        created = json.loads(capsys.readouterr().out)
        assert created[0]["guest_port"] == 8080 and created[0]["proto"] == "tcp"
        assert created[0]["host_port"] == port and created[0]["host_ip"] == "127.0.0.1"
        assert main(["forward", "ls", "--api-socket", path]) == 0
        assert "-> 10.0.2.15:8080" in capsys.readouterr().out
        assert main(["forward", "rm", "--api-socket", path, created[0]["id"]]) == 0
        assert main(["forward", "rm", "--api-socket", path, created[0]["id"]]) == 1
        assert "404" in capsys.readouterr().err
        assert main(["flows", "--api-socket", path]) == 0
        assert "(no flows)" in capsys.readouterr().out
        assert main(["stats", "--json", "--api-socket", path]) == 0
        assert set(json.loads(capsys.readouterr().out)) >= {"links", "drops", "flows", "pool"}
        assert main(["top", "--once", "--interval", "0.1", "--api-socket", path]) == 0
        out = capsys.readouterr().out
        assert "frame pools" in out and "to_guest" in out and "counters" in out
    finally:
        stop.set()
        t.join()
    assert main(["stats", "--api-socket", path + ".missing"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_plain_stats_show_guest_ipv6() -> None:
    link = {
        "name": "tap0",
        "kind": "tap",
        "guest_mac": "52:54:00:12:34:56",
        "guest_ip6": ["fd00::15", "fe80::1"],
    }
    text = format_stats({"links": [link], "drops": {"ndp.na.sent": 2}})
    assert "    guest IPv6: fd00::15, fe80::1" in text.splitlines()
    assert "guest IPv6" not in format_stats({"links": [dict(link, guest_ip6=[])]})


def test_top_shows_each_ports_guests() -> None:
    """Several guests on one switch: ``top`` names each port's MACs and addresses."""
    from rich.console import Console

    from guestnet.client import render_top

    links = [
        {"name": "qemu0", "kind": "qemu-stream", "macs": ["52:54:00:12:34:56"],
         "guest_ip4": ["10.0.2.15"], "guest_ip6": ["fd00::15"], "frames_in": 3},
        {"name": "qemu1", "kind": "qemu-stream", "macs": ["52:54:00:12:34:57", "02:00:00:00:00:01"],
         "guest_ip4": ["10.0.2.16"], "guest_ip6": [], "frames_in": 1},
    ]  # fmt: skip
    console = Console(width=200, record=True)
    console.print(render_top({"links": links}, [], None, 1.0))
    text = console.export_text()
    for shown in ("52:54:00:12:34:56", "10.0.2.15", "fd00::15", "52:54:00:12:34:57",
                  "02:00:00:00:00:01", "10.0.2.16"):  # fmt: skip
        assert shown in text, shown
