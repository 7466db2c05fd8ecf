"""``--tap IFNAME[:no-offloads]``: repeatable on every datapath command (issue 15)."""

from __future__ import annotations

import pytest

from guestnet.cli import build_parser, main


@pytest.mark.parametrize(
    "command",
    [["netns"], ["qemu", "--socket", "/tmp/q"], ["dgram", "--socket", "/tmp/d"], ["run"],
     ["vhost-user", "--socket", "/tmp/v"]],
)  # fmt: skip
def test_every_datapath_command_takes_several_taps(command: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args([*command, "--tap", "gt0", "--tap", "gt1:no-offloads"])
    assert args.tap == [("gt0", None), ("gt1", False)]
    assert parser.parse_args(command).tap == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [("gt0:offloads", "expected IFNAME or IFNAME:no-offloads"),
     ("a/b", "not a valid interface name"),
     ("", "not a valid interface name"),
     ("sixteen-chars-xx", "not a valid interface name")],
)  # fmt: skip
def test_bad_tap_is_a_usage_error(
    spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["qemu", "--socket", "/tmp/q", "--tap", spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--tap" in err and message in err


def test_netns_needs_a_target_or_a_tap(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netns"]) == 2
    assert "give a TARGET namespace or --tap" in capsys.readouterr().err
