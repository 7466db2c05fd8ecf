"""IPv6 settings: slirp4netns's defaults, validation with one-line errors, the EUI-64 link-local."""

from __future__ import annotations

import ipaddress

import pytest

from guestnet.cli import main
from guestnet.config import Config, eui64_address


def test_defaults_are_slirp4netns_s() -> None:
    c = Config()
    assert c.ipv6 and str(c.ipv6_prefix) == "fd00::/64"
    assert (str(c.gateway6), str(c.dns_ip6), str(c.guest_ip6)) == ("fd00::2", "fd00::3", "fd00::15")
    # 52:55:0a:00:02:02 -> U/L bit flipped, ff:fe in the middle (RFC 4291 appendix A).
    assert str(c.link_local6) == "fe80::5055:aff:fe00:202"
    assert c.owned6_b == {c.gateway6.packed, c.dns_ip6.packed, c.link_local6.packed}


def test_eui64() -> None:
    net = ipaddress.IPv6Network("2001:db8:1:2::/64")
    assert (
        str(eui64_address(net, bytes.fromhex("525400123456"))) == "2001:db8:1:2:5054:ff:fe12:3456"
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--ipv6-prefix", "fd00::/96"], "/64 or shorter"),
        (["--ipv6-prefix", "ff02::/64"], "not a unicast"),
        (["--gateway6", "fd01::2"], "outside --ipv6-prefix"),
        (["--dns-ip6", "fd00::2"], "must differ"),
        (["--guest-ip6", "fd00::"], "anycast"),
        (["--gateway6", "nope"], "not an IPv6 address"),
    ],
)
def test_bad_options_one_line_status_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        code = main(["qemu", "--socket", "/nonexistent/x.sock", *argv])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
