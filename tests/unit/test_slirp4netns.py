"""slirp4netns mode: its argv (as podman and rootlesskit pass it), messages, --cidr, -h, -v,
the Config it maps to, and its API socket protocol byte for byte (on guestnet's own forward
registry, with real loopback sockets)."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestnet.compat import slirp4netns as s4
from guestnet.compat.slirp_api import MAX_REQUEST, SlirpApi, SlirpApiServer
from guestnet.counters import Counters
from guestnet.io.forwards import Forward, ForwardError, Forwards
from guestnet.io.loop import Loop

PROG = "slirp4netns"


def parse(*args: str) -> s4.Options:
    return s4.parse_args(PROG, list(args))


def fails(*args: str) -> s4.SlirpExit:
    with pytest.raises(s4.SlirpExit) as info:
        parse(*args)
    return info.value


# -- argv --------------------------------------------------------------------------------------


def test_podman_431_argv_path_mode(tmp_path: Path) -> None:
    netns = tmp_path / "netns-uuid"
    netns.touch()
    o = parse(
        "--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
        "--enable-ipv6", "-c", "-e", "3", "-r", "4", "--netns-type=path", str(netns), "tap0",
    )  # fmt: skip
    assert o.disable_host_loopback and o.configure and o.enable_ipv6
    assert (o.mtu, o.exit_fd, o.ready_fd) == (65520, 3, 4)
    assert (o.netns_path, o.target_pid, o.tapname, o.target) == (
        str(netns), None, "tap0", str(netns)
    )  # fmt: skip
    assert o.enable_sandbox and o.enable_seccomp
    # Sandbox, seccomp and IPv6 are all there: no warning on stdout.
    assert o.warnings == []
    h = o.hardening()
    assert h.sandbox and h.seccomp and h.runas is None


def test_podman_pid_mode_and_api_socket() -> None:
    o = parse("--api-socket", "/run/libpod/x.net", "-c", "-e", "3", "-r", "4", "4242", "tap0")
    assert (o.target_pid, o.target, o.api_socket, o.tapname) == (
        4242, "4242", "/run/libpod/x.net", "tap0"
    )  # fmt: skip


def test_rootlesskit_110_argv() -> None:
    o = parse(
        "--mtu", "65520", "-r", "3", "--disable-host-loopback",
        "--api-socket", "/tmp/rootlesskit1/.s4nn.sock", "1234", "tap0",
    )  # fmt: skip
    assert (o.mtu, o.ready_fd, o.exit_fd, o.configure) == (65520, 3, -1, False)
    assert (o.target_pid, o.api_socket) == (1234, "/tmp/rootlesskit1/.s4nn.sock")


def test_podman5_and_rootlesskit2_userns_path(tmp_path: Path) -> None:
    ns = tmp_path / "ns"
    ns.touch()
    o = parse("-c", "-r", "3", "-e", "4", f"--userns-path={ns}", "--netns-type=path", str(ns), "t")
    assert (o.ready_fd, o.exit_fd, o.userns_path, o.netns_path) == (3, 4, str(ns), str(ns))


def test_getopt_forms() -> None:
    # Clustered short options, attached argument, permuted operands, abbreviations, "--".
    o = parse("-ce3", "77", "--mt", "9000", "-r4", "tapx", "--disable-h", "--cidr=10.9.0.0/16")
    assert (o.configure, o.exit_fd, o.ready_fd, o.mtu) == (True, 3, 4, 9000)
    assert (o.target_pid, o.tapname, o.disable_host_loopback, o.cidr) == (
        77, "tapx", True, "10.9.0.0/16"
    )  # fmt: skip
    assert parse("-c", "--", "5", "-tap").tapname == "-tap"


@pytest.mark.parametrize(
    ("args", "err"),
    [
        (["--foo", "1", "t"], "slirp4netns: unrecognized option '--foo'\n"),
        (["--foo=x", "1", "t"], "slirp4netns: unrecognized option '--foo=x'\n"),
        (["-x", "1", "t"], "slirp4netns: invalid option -- 'x'\n"),
        (["1", "t", "-e"], "slirp4netns: option requires an argument -- 'e'\n"),
        (["1", "t", "--mtu"], "slirp4netns: option '--mtu' requires an argument\n"),
        (
            ["--configure=1", "1", "t"],
            "slirp4netns: option '--configure' doesn't allow an argument\n",
        ),
        (
            ["--disable", "1", "t"],
            "slirp4netns: option '--disable' is ambiguous; possibilities: "
            "'--disable-host-loopback' '--disable-dns'\n",
        ),
        (["-e", "x", "1", "t"], "exit-fd must be a non-negative integer\n"),
        (["-r", "-1", "1", "t"], "ready-fd must be a non-negative integer\n"),
        (["-m", "65522", "1", "t"], "MTU must be a positive integer (< 65522)\n"),
        (["-m", "0", "1", "t"], "MTU must be a positive integer (< 65522)\n"),
        (["--userns-path=/nonexistent/x", "1", "t"], "userns path doesn't exist: /nonexistent/x\n"),
        (
            ["--macaddress=52:54:00:00:00:01", "1", "t"],
            "--macaddr cannot be specified when --configure or -c is not specified\n",
        ),
        (["--target-type=vde", "1", "t"], '--target-type must be either "netns" or "bess"\n'),
        (["abc", "tap0"], "PID must be a positive integer\n"),
        (["0", "tap0"], "PID must be a positive integer\n"),
        (
            ["--netns-type=path", "/nonexistent/ns", "tap0"],
            "existing path expected when --netns-type=path: No such file or directory\n",
        ),
        ([], ""),
        (["1"], ""),
    ],
)
def test_bad_command_lines(args: list[str], err: str) -> None:
    exc = fails(*args)
    assert exc.status == 1
    assert exc.err == err
    assert exc.out.startswith(f"Usage: {PROG} [OPTION]... PID|PATH [TAPNAME]\n")


def test_too_many_operands_is_a_warning() -> None:
    o = parse("1", "tap0", "extra")
    assert o.tapname == "tap0" and o.warnings == ["WARNING: too many arguments"]


def test_help_lists_what_tools_look_for_and_nothing_unreal() -> None:
    exc = fails("-h")
    assert exc.status == 0 and exc.err == ""
    text = exc.out
    for option in (
        "--netns-type", "--userns-path", "--disable-host-loopback", "--mtu", "--cidr",
        "--enable-ipv6", "--api-socket", "--outbound-addr", "--disable-dns", "--configure",
        "--exit-fd", "--ready-fd", "--macaddress", "--target-type",
    ):  # fmt: skip
        assert option in text, option
    # Sandbox and seccomp are real now: listed (podman reads --help to decide what to pass).
    assert "--enable-sandbox " in text and "--enable-seccomp " in text
    assert "--create-sandbox" not in text
    # -h wins wherever it stands, once the options before it parsed.
    assert fails("1", "tap0", "--help").out == text


def test_version_block() -> None:
    exc = fails("-v")
    assert exc.status == 0
    lines = exc.out.splitlines()
    assert lines[0].startswith("slirp4netns version 1.2.0")
    assert "SLIRP_CONFIG_VERSION_MAX: 3" in lines
    assert any(line.startswith("libslirp: ") for line in lines)


def test_deprecated_aliases() -> None:
    o = parse("--no-host-loopback", "--create-sandbox", "1", "t")
    assert o.disable_host_loopback and o.enable_sandbox
    assert o.warnings[0].startswith("WARNING: --no-host-loopback is deprecated")
    assert o.warnings[1].startswith("WARNING: --create-sandbox is deprecated")
    # Not root, the sandbox is made in the target's user namespace, as slirp4netns makes it.
    assert o.hardening().userns == "/proc/1/ns/user"
    assert not o.hardening().seccomp


# -- --cidr and the Config -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.2.0", "invalid CIDR: 10.0.2.0"),
        ("10.0.2.0/", "invalid CIDR: 10.0.2.0/"),
        ("foo/24", "invalid CIDR: foo/24"),
        ("10.0.2.0/24 ", "invalid CIDR: 10.0.2.0/24 "),
        ("10.0.2.0/100", "invalid CIDR: 10.0.2.0/100"),
        ("300.0.2.0/24", "invalid network address: 300.0.2.0"),
        ("10.0.2.0/0", "prefix length needs to be 1-25"),
        ("10.0.2.0/26", "prefix length needs to be 1-25"),
        ("10.0.2.0/32", "prefix length needs to be 1-25"),
        (
            "10.0.2.100/24",
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24",
        ),
    ],
)
def test_cidr_refused(cidr: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        s4.parse_cidr(cidr)
    assert str(info.value) == message


@pytest.mark.parametrize("cidr", ["10.0.2.0/24", "192.168.0.0/25", "10.0.0.0/8", "0.0.0.0/1"])
def test_cidr_accepted(cidr: str) -> None:
    assert s4.parse_cidr(cidr) == ipaddress.IPv4Network(cidr)


def test_config_from_slirp_options() -> None:
    o = parse(
        "--cidr=10.8.0.0/16", "-m", "65521", "--disable-host-loopback", "--disable-dns", "-c",
        "--macaddress=02:00:00:aa:bb:cc", "--outbound-addr=lo", "1", "tap0",
    )  # fmt: skip
    cfg = s4.config_from_options(o)
    assert str(cfg.subnet) == "10.8.0.0/16"
    assert (str(cfg.gateway), str(cfg.dns_ip), str(cfg.guest_ip)) == (
        "10.8.0.2", "10.8.0.3", "10.8.0.100"
    )  # fmt: skip
    assert cfg.mac == bytes.fromhex("52550a080002")  # slirp's: 52:55 + the gateway address
    assert cfg.guest_mac == bytes.fromhex("020000aabbcc")
    assert cfg.mtu == 65521
    assert cfg.no_host_loopback and cfg.host_loopback_unreachable and not cfg.dns
    assert cfg.outbound_addr == "127.0.0.1"  # the interface's address
    default = s4.config_from_options(parse("1", "tap0"))
    assert (str(default.subnet), default.mtu, default.dns, default.no_host_loopback) == (
        "10.0.2.0/24", 1500, True, False
    )  # fmt: skip
    assert default.mac == bytes.fromhex("52550a000202") and default.outbound_addr is None


@pytest.mark.parametrize(("extra", "ipv6"), [((), False), (("--enable-ipv6",), True)])
def test_slirp_mode_ipv6_only_with_enable_ipv6(extra: tuple[str, ...], ipv6: bool) -> None:
    """As slirp4netns: IPv6 (fd00::/64, gateway ::2, DNS ::3) only with --enable-ipv6."""
    config = s4.config_from_options(parse(*extra, "1", "tap0"))
    assert config.ipv6 is ipv6
    assert (str(config.ipv6_prefix), str(config.gateway6), str(config.dns_ip6)) == (
        "fd00::/64", "fd00::2", "fd00::3"
    )  # fmt: skip


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"^outbound-addr has to be valid ipv4 address"):
        s4.config_from_options(parse("--outbound-addr=nosuchif0", "1", "t"))
    with pytest.raises(ValueError, match=r'^"zz" is an invalid MAC address\.\nmacaddress has'):
        s4.config_from_options(parse("-c", "--macaddress=zz", "1", "t"))


def test_main_exit_status_and_streams(capsys: pytest.CaptureFixture[str]) -> None:
    assert s4.main(["--cidr=10.0.2.1/24", "1", "tap0"], prog=PROG) == 1
    out, err = capsys.readouterr()
    assert err == ("CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24\n")
    assert out == ""
    assert s4.main(["--bogus"], prog=PROG) == 1
    out, err = capsys.readouterr()
    assert err == "slirp4netns: unrecognized option '--bogus'\n" and out.startswith("Usage:")
    assert s4.main(["-v"], prog=PROG) == 0
    assert "SLIRP_CONFIG_VERSION_MAX" in capsys.readouterr().out


def test_cli_reaches_the_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from guestnet.cli import main

    assert main(["slirp4netns", "--help"]) == 0
    assert capsys.readouterr().out.startswith("Usage: guestnet slirp4netns [OPTION]...")


# -- the API socket protocol ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry() -> Iterator[Forwards]:
    loop = Loop()
    forwards = Forwards(loop, Counters(), ipaddress.IPv4Network("10.0.2.0/24"), lambda: "10.0.2.15")
    yield forwards
    forwards.close()
    loop.close()


def test_api_golden_exchange(registry: Forwards) -> None:
    api = SlirpApi(registry, "10.0.2.100")
    p1, p2 = _free_port(), _free_port()
    add1 = (
        b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1",'
        b'"host_port":%d,"guest_addr":"","guest_port":80}}\n' % p1
    )
    assert api.handle(add1) == b'{"return":{"id":1}}'
    add2 = b'{"execute": "add_hostfwd", "arguments": {"proto": "udp", "host_port": %d,' % p2
    add2 += b' "guest_addr": "10.0.2.7", "guest_port": 53}}'
    assert api.handle(add2) == b'{"return":{"id":2}}'
    assert api.handle(b'{"execute":"list_hostfwd"}') == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":%d,'
        b'"guest_addr":"10.0.2.100","guest_port":80},{"id":2,"proto":"udp",'
        b'"host_addr":"0.0.0.0","host_port":%d,"guest_addr":"10.0.2.7","guest_port":53}]}'
        % (p1, p2)
    )
    assert api.handle(b'{"execute":"remove_hostfwd","arguments":{"id":1}}') == b'{"return":{}}'
    assert api.handle(b'{"execute":"remove_hostfwd","arguments":{"id":1}}') == (
        b'{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}'
    )
    # Ids are never reused; the registry (what `guestnet forward ls` reads) has the forward.
    assert api.handle(add1) == b'{"return":{"id":3}}'
    assert [(f.id, f.host_port, f.guest_ip) for f in registry] == [
        ("2", p2, "10.0.2.7"),
        ("3", p1, "10.0.2.100"),
    ]
    # The same port again: the kernel says it is in use.
    assert api.handle(add1) == (
        b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'
    )


@pytest.mark.parametrize(
    ("request_", "desc"),
    [
        (b"", "bad request: cannot parse JSON"),
        (b"{nope", "bad request: cannot parse JSON"),
        (b"[1,2]", "bad request: json_object() failed"),
        (b"null", "bad request: json_object() failed"),
        (b"{}", "bad request: no execute found"),
        (b'{"execute":5}', "bad request: no execute found"),
        (b'{"execute":"reboot"}', "bad request: unknown execute"),
        (b'{"execute":"add_hostfwd"}', "bad request: add_hostfwd: bad arguments.proto"),
        (
            b'{"execute":"add_hostfwd","arguments":{"proto":"sctp"}}',
            "bad request: add_hostfwd: bad arguments.proto",
        ),
        (
            b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"::1"}}',
            "bad request: add_hostfwd: bad arguments.host_addr",
        ),
        (
            b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":0}}',
            "bad request: add_hostfwd: bad arguments.host_port",
        ),
        (
            b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":"80"}}',
            "bad request: add_hostfwd: bad arguments.host_port",
        ),
        (
            b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":8080,'
            b'"guest_addr":"x"}}',
            "bad request: add_hostfwd: bad arguments.guest_addr",
        ),
        (
            b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":8080,'
            b'"guest_addr":"10.0.2.100"}}',
            "bad request: add_hostfwd: bad arguments.guest_port",
        ),
        (b'{"execute":"remove_hostfwd"}', "bad request: remove_hostfwd: bad arguments.id"),
        (
            b'{"execute":"remove_hostfwd","arguments":{"id":"1"}}',
            "bad request: remove_hostfwd: bad arguments.id",
        ),
        (b"{" + b" " * MAX_REQUEST + b"}", "bad request: too large message"),
    ],
)
def test_api_errors(registry: Forwards, request_: bytes, desc: str) -> None:
    answer = SlirpApi(registry, "10.0.2.100").handle(request_)
    assert answer == json.dumps({"error": {"desc": desc}}, separators=(",", ":")).encode()
    assert len(registry) == 0


def _exchange(loop: Loop, path: str, data: bytes, half_close: bool = True) -> bytes:
    """One client connection, in a thread, while this thread turns the loop (bounded)."""
    result: dict[str, Any] = {}

    def client() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(path)
            c.sendall(data)
            if half_close:
                c.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := c.recv(65536):
                chunks.append(chunk)
            result["answer"] = b"".join(chunks)

    thread = threading.Thread(target=client)
    thread.start()
    for _ in range(200):
        if not thread.is_alive():
            break
        loop.run_once(0.02)
    thread.join(5)
    return bytes(result["answer"])


def test_api_server_one_request_per_connection(tmp_path: Path) -> None:
    loop = Loop()
    counters = Counters()
    forwards = Forwards(loop, counters, ipaddress.IPv4Network("10.0.2.0/24"), lambda: "x")
    path = str(tmp_path / "api.sock")
    (tmp_path / "api.sock").write_text("not a socket")  # never unlinked: not ours to remove
    with pytest.raises(FileExistsError):
        SlirpApiServer(loop, counters, path, SlirpApi(forwards, "10.0.2.100"))
    (tmp_path / "api.sock").unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # a stale socket file is replaced, as slirp4netns unlinks first
    server = SlirpApiServer(loop, counters, path, SlirpApi(forwards, "10.0.2.100"))
    try:
        port = _free_port()
        add = (
            b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1",'
            b'"host_port":%d,"guest_addr":"10.0.2.100","guest_port":80}}\n' % port
        )
        # podman and rootlesskit half-close; a client that does not is answered all the same.
        assert _exchange(loop, path, add) == b'{"return":{"id":1}}'
        assert _exchange(loop, path, b'{"execute":"list_hostfwd"}', half_close=False).startswith(
            b'{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1"'
        )
        big = b'{"execute":"list_hostfwd","pad":"' + b"x" * 5000 + b'"}'
        assert _exchange(loop, path, big) == b'{"error":{"desc":"bad request: too large message"}}'
        assert server.conns == {}
    finally:
        server.close()
        forwards.close()
        loop.close()
    assert not (tmp_path / "api.sock").exists()


def test_api_answers_anything_with_one_json_object() -> None:
    """Whatever a client sends, the answer is one JSON object slirp4netns could have sent."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    class LoopbackOnly(Forwards):
        """The registry, refusing (as a port in use would be) anything but loopback."""

        def add(self, proto: str, host_port: int, guest_port: int, host_ip: str = "",
                guest_ip: str | None = None) -> Forward:  # fmt: skip
            if host_ip != "127.0.0.1":
                raise ForwardError(409, "this test binds loopback only")
            return super().add(proto, host_port, guest_port, host_ip, guest_ip)

    loop = Loop()
    forwards = LoopbackOnly(loop, Counters(), ipaddress.IPv4Network("10.0.2.0/24"), lambda: "x")
    api = SlirpApi(forwards, "10.0.2.100")
    scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12)
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
            st.sampled_from(["execute", "arguments", "proto", "host_port", "guest_port", "id",
                             "host_addr", "guest_addr"]), inner, max_size=6),
        max_leaves=12,
    )  # fmt: skip
    requests = st.binary(max_size=200) | values.map(lambda v: json.dumps(v).encode())
    executes = st.sampled_from(["add_hostfwd", "list_hostfwd", "remove_hostfwd", "x"])
    structured = st.builds(
        lambda e, a: json.dumps({"execute": e, "arguments": a}).encode(), executes, values
    )

    @settings(max_examples=150, deadline=None)
    @given(requests | structured)
    def check(data: bytes) -> None:
        answer = json.loads(api.handle(data))
        assert isinstance(answer, dict) and len(answer) == 1
        assert next(iter(answer)) in ("return", "entries", "error")

    try:
        check()
    finally:
        forwards.close()
        loop.close()
