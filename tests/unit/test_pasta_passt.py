"""pasta and passt modes: their argv (as podman 5, rootlesskit 2 and libvirt 9 pass it), port
specs, the Config they map to, and their messages and exit statuses."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest

from guestnet import cli
from guestnet.compat import passt, pasta
from guestnet.compat.passt_common import (
    MAX_SPEC_PORTS,
    AddressOptions,
    OptionExit,
    build_config,
    parent_wait,
    parse_port_spec,
    publish_entries,
)
from guestnet.config import Config


def pasta_parse(*args: str) -> pasta.Options:
    return pasta.parse_args("pasta", list(args))


def passt_parse(*args: str) -> passt.Options:
    return passt.parse_args("passt", list(args))


def pasta_fails(*args: str) -> OptionExit:
    with pytest.raises(OptionExit) as info:
        pasta_parse(*args)
    return info.value


# -- port specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        ("22", [(None, 22, 22)]),
        ("22:23", [(None, 22, 23)]),
        ("22,25", [(None, 22, 22), (None, 25, 25)]),
        ("8080-8080:80-80", [(None, 8080, 80)]),
        ("22-24:32-34", [(None, 22, 32), (None, 23, 33), (None, 24, 34)]),
        ("22-24:32", [(None, 22, 32), (None, 23, 33), (None, 24, 34)]),
        ("127.0.0.1/5", [("127.0.0.1", 5, 5)]),
        ("::1/8080:80", [("::1", 8080, 80)]),
        ("[::1]/8080:80", [("::1", 8080, 80)]),
        ("5-9,~6-8", [(None, 5, 5), (None, 9, 9)]),
        ("192.0.2.1%lo/7", [("192.0.2.1", 7, 7)]),
    ],
)
def test_port_specs(spec: str, ports: list[tuple[str | None, int, int]]) -> None:
    parsed = parse_port_spec(spec)
    assert parsed.mode == "ports"
    assert parsed.ports == ports


def test_port_spec_keywords_interface_and_exclusions() -> None:
    assert parse_port_spec("none").mode == "none" and not parse_port_spec("none").ports
    assert parse_port_spec("auto").mode == "auto"
    assert parse_port_spec("all").mode == "all"
    assert parse_port_spec("%eth0/22").ifname == "eth0"
    only = parse_port_spec("~25")
    assert only.exclusions_only and only.ports == []


@pytest.mark.parametrize(
    "spec",
    ["", "0", "65536", "80-70", "22-24:32-33", "x", "22:", "1.2.3.999/22", "~22:23", "%/22",
     "22,,23", "-5"],
)  # fmt: skip
def test_port_spec_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="Invalid port specifier"):
        parse_port_spec(spec)


def test_port_spec_bounded() -> None:
    with pytest.raises(ValueError, match=f"more than {MAX_SPEC_PORTS} ports"):
        parse_port_spec("1-65535")


def test_publish_entries_bind_every_address_without_one() -> None:
    specs = [parse_port_spec("8080:80"), parse_port_spec("127.0.0.1/9000"), parse_port_spec("8080")]
    assert publish_entries("tcp", specs, ipv6=True) == [
        ("tcp", "0.0.0.0", 8080, 80),
        ("tcp", "::", 8080, 80),
        ("tcp", "127.0.0.1", 9000, 9000),
    ]
    assert publish_entries("udp", specs[:1], ipv6=False) == [("udp", "0.0.0.0", 8080, 80)]


# -- pasta argv ----------------------------------------------------------------------------------


def test_podman5_argv() -> None:
    o = pasta_parse(
        "--config-net", "-t", "8080-8080:80-80", "--dns-forward", "169.254.1.1", "-u", "none",
        "-T", "none", "-U", "none", "--no-map-gw", "--quiet", "--netns", "/run/netns/x",
        "--map-guest-addr", "169.254.1.2",
    )  # fmt: skip
    assert o.config_net and o.quiet and not o.foreground
    assert (o.netns, o.target_pid, o.command, o.target) == (
        "/run/netns/x",
        None,
        [],
        "/run/netns/x",
    )
    assert o.ifname == "eth0"
    # -T/-U none: nothing to say; --map-guest-addr: said (unless --quiet).
    assert [n for n in o.notes if "map-guest-addr" in n]
    assert not [n for n in o.notes if n.startswith(("-T", "-U"))]
    c = pasta.config_from_options(o)
    assert c.dns_ip == ipaddress.IPv4Address("169.254.1.1")
    assert c.no_host_loopback and not c.host_loopback_unreachable
    assert (c.guest_ip, c.gateway, c.subnet) == (
        ipaddress.IPv4Address("10.0.2.15"),
        ipaddress.IPv4Address("10.0.2.2"),
        ipaddress.IPv4Network("10.0.2.0/24"),
    )
    tcp = [p for p in c.publish if p[0] == "tcp"]
    assert ("tcp", "0.0.0.0", 8080, 80) in tcp
    assert not [p for p in c.publish if p[0] == "udp"]


def test_rootlesskit2_argv() -> None:
    o = pasta_parse(
        "--stderr", "--ns-ifname=tap0", "--mtu=65520", "--config-net", "--address=10.0.2.100",
        "--netmask=24", "--gateway=10.0.2.2", "--dns-forward=10.0.2.3", "--no-map-gw",
        "--ipv4-only", "--tcp-ports=none", "--udp-ports=auto", "--host-lo-to-ns-lo", "4242",
    )  # fmt: skip
    assert (o.target_pid, o.target, o.ifname, o.stderr) == (4242, "4242", "tap0", True)
    assert [n for n in o.notes if n.startswith("-u auto")]
    assert [n for n in o.notes if "host-lo-to-ns-lo" in n]
    c = pasta.config_from_options(o)
    assert str(c.guest_ip) == "10.0.2.100" and str(c.subnet) == "10.0.2.0/24"
    assert str(c.gateway) == "10.0.2.2" and str(c.dns_ip) == "10.0.2.3"
    assert c.mtu == 65520 and not c.ipv6 and c.publish == ()
    # The gateway's MAC follows slirp's pattern on the gateway given.
    assert c.mac == bytes.fromhex("52550a000202")


def test_pasta_options_stop_at_the_command() -> None:
    o = pasta_parse("-f", "--config-net", "ip", "-br", "addr")
    assert o.command == ["ip", "-br", "addr"] and o.target is None and o.foreground
    o = pasta_parse("--", "-x")
    assert o.command == ["-x"]


def test_pasta_without_target_runs_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHELL", "/bin/zsh")
    assert pasta_parse("--config-net").command == ["/bin/zsh"]


def test_pasta_getopt_forms(tmp_path: Path) -> None:
    o = pasta_parse("-qft22:23", "-I", "veth9", "-m1400", "-P", str(tmp_path / "pid"), "--netns=x")
    assert o.quiet and o.foreground and o.ifname == "veth9" and o.addr.mtu == 1400
    assert o.addr.tcp[0].ports == [(None, 22, 23)]
    assert o.pid_file == str(tmp_path / "pid")
    # Unambiguous abbreviations, as getopt_long takes them.
    assert pasta_parse("--config", "--netns", "y").config_net


@pytest.mark.parametrize(
    ("args", "err"),
    [
        (["--bogus"], "pasta: unrecognized option '--bogus'\n"),
        (["-z"], "pasta: invalid option -- 'z'\n"),
        (["--netns"], "pasta: option '--netns' requires an argument\n"),
        (["--config-net=1"], "pasta: option '--config-net' doesn't allow an argument\n"),
        (["--no", "1"], "pasta: option '--no' is ambiguous;"),
        (["-t", "80-70"], "Invalid port specifier 80-70\n"),
        (["-m", "100"], "Invalid MTU: 100"),
        (["-m", "x"], "Invalid MTU: x\n"),
        (["-4", "-6"], "Options ipv4-only and ipv6-only are mutually exclusive\n"),
        (["--netns", "x", "1234"], "Both --netns and PID or command given\n"),
        (["-I", "a/b"], "Invalid interface name: a/b\n"),
    ],
)
def test_pasta_bad_command_lines(args: list[str], err: str) -> None:
    exc = pasta_fails(*args)
    assert exc.status == 1
    assert exc.err.startswith(err)
    assert exc.err.count("\n") == 1  # one line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-a", "10.0.2.x"], "Invalid address: 10.0.2.x"),
        (["-n", "33"], "Invalid netmask: 33"),
        (["-g", "192.168.9.1"], "outside --subnet"),
    ],
)
def test_pasta_bad_addresses(args: list[str], message: str) -> None:
    o = pasta_parse(*args, "--netns", "x")
    with pytest.raises(OptionExit) as info:
        pasta.config_from_options(o)
    assert message in info.value.err and info.value.status == 1


def test_pasta_main_unknown_option_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert pasta.main(["--frobnicate", "--netns", "x"], prog="pasta") == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "pasta: unrecognized option '--frobnicate'\n"


def test_pasta_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert pasta.main(["--help"], prog="pasta") == 0
    out, _ = capsys.readouterr()
    for option in ("--config-net", "--netns", "--ns-ifname", "--dns-forward", "--tcp-ports",
                   "--no-map-gw", "--pid"):  # fmt: skip
        assert option in out
    assert pasta.main(["--version"], prog="pasta") == 0
    assert capsys.readouterr().out.startswith("pasta (guestnet ")


# -- addressing ----------------------------------------------------------------------------------


def test_defaults_are_guestnets_own() -> None:
    c = build_config(AddressOptions())
    d = Config()
    assert (c.subnet, c.guest_ip, c.gateway, c.dns_ip, c.mtu, c.ipv6) == (
        d.subnet, d.guest_ip, d.gateway, d.dns_ip, d.mtu, True
    )  # fmt: skip


def test_address_alone_takes_its_class_and_picks_gateway_and_dns() -> None:
    c = build_config(AddressOptions(addresses=["192.168.7.20"]))
    assert str(c.subnet) == "192.168.7.0/24"
    assert (str(c.gateway), str(c.dns_ip)) == ("192.168.7.2", "192.168.7.3")
    c = build_config(AddressOptions(addresses=["10.1.2.2"], netmask="255.255.255.0"))
    # +2 is the guest's own: the gateway moves to +1.
    assert (str(c.subnet), str(c.gateway), str(c.dns_ip)) == ("10.1.2.0/24", "10.1.2.1", "10.1.2.3")


def test_ipv6_address_and_gateway() -> None:
    c = build_config(AddressOptions(addresses=["fd42::7", "10.0.2.15"], gateways=["fd42::1"]))
    assert str(c.guest_ip6) == "fd42::7" and str(c.ipv6_prefix) == "fd42::/64"
    assert str(c.gateway6) == "fd42::1" and str(c.dns_ip6) == "fd42::3"
    assert str(c.guest_ip) == "10.0.2.15"


def test_mtu_zero_keeps_the_default() -> None:
    assert build_config(AddressOptions(mtu=0)).mtu == Config().mtu


# -- passt argv ----------------------------------------------------------------------------------


def test_libvirt9_argv(tmp_path: Path) -> None:
    sock = str(tmp_path / "dom-net0.socket")
    o = passt_parse(
        "--one-off", "--socket", sock, "--mac-addr", "52:54:00:aa:bb:cc", "--mtu", "1500",
        "--interface", "eth0", "--log-file", str(tmp_path / "log"), "--address", "10.0.2.15",
        "--netmask", "24", "--tcp-ports", "18080:8080", "--udp-ports", "127.0.0.1/5353:53",
    )  # fmt: skip
    assert o.one_off and o.socket == sock and o.log_file == str(tmp_path / "log")
    assert o.mac_addr == bytes.fromhex("525400aabbcc")
    assert [n for n in o.notes if n.startswith("--mac-addr")]
    assert [n for n in o.notes if n.startswith("--interface")]
    c = build_config(o.addr)
    assert c.mtu == 1500 and str(c.guest_ip) == "10.0.2.15"
    assert c.mac == Config().mac  # guestnet's own gateway MAC, not the guest's
    assert ("tcp", "0.0.0.0", 18080, 8080) in c.publish
    assert ("udp", "127.0.0.1", 5353, 53) in c.publish


def test_passt_short_options_and_operands() -> None:
    o = passt_parse("-1fq", "-s", "/tmp/x.sock", "-P", "/tmp/x.pid", "-t", "22")
    assert o.one_off and o.foreground and o.quiet and o.pid_file == "/tmp/x.pid"
    with pytest.raises(OptionExit) as info:
        passt_parse("-f", "stray")
    assert info.value.err == "passt: extra non-option argument 'stray'\n"
    with pytest.raises(OptionExit) as info:
        passt_parse("--netns", "x")  # a pasta option
    assert info.value.err == "passt: unrecognized option '--netns'\n"


def test_passt_default_socket_is_the_first_free(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = {"/tmp/passt_1.socket", "/tmp/passt_2.socket"}
    monkeypatch.setattr(os.path, "lexists", lambda p: p in taken)
    assert passt.free_socket_path() == "/tmp/passt_3.socket"


def test_passt_qemu_hint_names_the_socket() -> None:
    hint = passt.qemu_hint("-netdev stream,id=net0,server=off,addr.type=unix,addr.path=/s")
    assert "You can now start qemu" in hint and "addr.path=/s" in hint


# -- three ways in -------------------------------------------------------------------------------


def test_cli_reaches_the_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pasta", "--bogus"]) == 1
    assert capsys.readouterr().err == "guestnet pasta: unrecognized option '--bogus'\n"
    assert cli.main(["passt", "--bogus"]) == 1
    assert capsys.readouterr().err == "guestnet passt: unrecognized option '--bogus'\n"
    assert cli.main(["passt", "--version"]) == 0
    assert capsys.readouterr().out.startswith("passt (guestnet ")


@pytest.mark.parametrize("name", ["pasta", "passt"])
def test_program_name_selects_the_mode(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", [f"/usr/local/bin/{name}", "--bogus"])
    assert cli.main() == 1
    assert capsys.readouterr().err == f"{name}: unrecognized option '--bogus'\n"


# -- the parent's wait for its daemon ------------------------------------------------------------


def _child(body: str) -> tuple[int, int]:
    """A real child process: ``body`` is "ready", "exit N" or "hang"; (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        if body == "ready":
            os.write(w, b"1")
            time.sleep(0.2)
            os._exit(0)
        if body.startswith("exit"):
            os._exit(int(body.split()[1]))
        time.sleep(30)
        os._exit(0)
    os.close(w)
    return pid, r


def test_parent_exits_0_once_the_daemon_is_ready() -> None:
    pid, r = _child("ready")
    try:
        assert parent_wait(pid, r, 10.0) == 0
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_parent_exits_with_the_failed_daemons_status() -> None:
    pid, r = _child("exit 3")
    try:
        assert parent_wait(pid, r, 10.0) == 3
    finally:
        os.close(r)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)  # reaped already


def test_parent_kills_a_daemon_that_never_gets_ready(capsys: pytest.CaptureFixture[str]) -> None:
    pid, r = _child("hang")
    start = time.monotonic()
    try:
        assert parent_wait(pid, r, 0.3) == 1
    finally:
        os.close(r)
    assert time.monotonic() - start < 5
    assert "did not start in time" in capsys.readouterr().err
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)  # killed and reaped: nothing left behind
