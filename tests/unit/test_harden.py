"""``--runas``, ``--sandbox``, ``--seccomp``: what is decided before anything is dropped.

The drops themselves need root and a process to spend (tests/integration/test_harden.py); here:
the ``USER[:GROUP]`` syntax as passt reads it, the options on every datapath command, ``run``
refusing ``--runas``, the allow-list resolving on this machine and leaving out what a
compromised guestnet would want, and :func:`preload` importing what the loop can reach.
"""

from __future__ import annotations

import grp
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from guestnet.cli import build_parser, hardening_from_args, main
from guestnet.io.harden import ALLOWED_SYSCALLS, Hardening, parse_runas


def test_runas_names_and_numbers() -> None:
    nobody = pwd.getpwnam("nobody")
    assert parse_runas("nobody") == (nobody.pw_uid, nobody.pw_gid)
    assert parse_runas(str(nobody.pw_uid)) == (nobody.pw_uid, nobody.pw_gid)
    root_group = grp.getgrgid(0).gr_name
    assert parse_runas(f"nobody:{root_group}") == (nobody.pw_uid, 0)
    assert parse_runas("nobody:1234") == (nobody.pw_uid, 1234)
    # A uid without a passwd entry: its group is the same number (passt does the same).
    assert parse_runas("54321") == (54321, 54321)
    assert parse_runas("54321:7") == (54321, 7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no-such-user-here", "no such user: no-such-user-here"),
        ("nobody:no-such-group-here", "no such group: no-such-group-here"),
        ("", "expected USER[:GROUP]"),
        ("nobody:", "expected USER[:GROUP]"),
        ("-1", "out of range"),
        ("4294967296", "out of range"),
    ],
)
def test_runas_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_runas(text)


@pytest.mark.parametrize("command", [["netns", "x"], ["qemu", "--socket", "/tmp/q"], ["run"]])
def test_every_datapath_command_takes_the_options(command: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args([command[0], "--runas", "nobody", "--sandbox", "--seccomp",
                              *command[1:]])  # fmt: skip
    h = hardening_from_args(args)
    assert h == Hardening(runas=parse_runas("nobody"), sandbox=True, seccomp=True)
    assert not hardening_from_args(parser.parse_args(command))


def test_bad_runas_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["netns", "--runas", "no-such-user-here", "x"])
    assert exc.value.code == 2
    assert "--runas: no such user: no-such-user-here" in capsys.readouterr().err


def test_run_refuses_runas(capsys: pytest.CaptureFixture[str]) -> None:
    """CMD keeps the caller's user: guestnet as another could not forward SIGTERM to it."""
    assert main(["run", "--runas", "nobody", "--", "true"]) == 2
    assert "--runas: not with run" in capsys.readouterr().err


def test_allow_list_resolves_here_and_leaves_out_what_an_attacker_wants() -> None:
    pyseccomp = pytest.importorskip("pyseccomp")
    native = pyseccomp.Arch.NATIVE
    missing = [n for n in ALLOWED_SYSCALLS if pyseccomp.resolve_syscall(native, n) < 0]
    assert missing == []
    assert len(set(ALLOWED_SYSCALLS)) == len(ALLOWED_SYSCALLS) <= 48
    for refused in (
        "execve",
        "execveat",
        "fork",
        "vfork",
        "clone",
        "clone3",
        "open",
        "openat",
        "mount",
        "umount2",
        "unshare",
        "setns",
        "ptrace",
        "setuid",
        "chroot",
        "pivot_root",
        "init_module",
        "bpf",
        "io_uring_setup",
        "process_vm_writev",
    ):
        assert refused not in ALLOWED_SYSCALLS, refused  # fmt: skip


def test_preload_imports_every_module_the_datapath_can_reach() -> None:
    """In a fresh interpreter: after preload, every guestnet module (but the client's) is
    loaded, and dnspython/numpy/pyroute2 are not dragged in."""
    code = (
        "import sys, pkgutil, guestnet\n"
        "from guestnet.io.harden import preload\n"
        "names = preload()\n"
        "mods = [i.name for i in pkgutil.walk_packages(guestnet.__path__, 'guestnet.')\n"
        "        if not i.name.startswith(('guestnet.client', 'guestnet.__main__'))]\n"
        "print(sorted(set(mods) - set(sys.modules)))\n"
        "print('dns' in sys.modules, 'dns.rdata' in sys.modules)\n"
        "print('numpy' in sys.modules, 'pyroute2' in sys.modules, 'pyseccomp' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out == ["[]", "False False", "False False False"]


def test_seccomp_without_libseccomp_is_a_clear_start_error(tmp_path: Path) -> None:
    """No binding (a None in sys.modules makes its import fail as a missing one would): guestnet
    says what to install and exits 1 before serving, instead of serving unfiltered."""
    code = (
        "import sys\n"
        "sys.modules['pyseccomp'] = None\n"
        "from guestnet.cli import main\n"
        f"sys.exit(main(['qemu', '--socket', {str(tmp_path / 'q.sock')!r}, '--seccomp']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1, proc.stderr
    assert "cannot drop privileges" in proc.stderr
    assert "libseccomp (Debian: libseccomp2) and pyseccomp (PyPI)" in proc.stderr
    assert not (tmp_path / "q.sock").exists()  # closed and removed on the way out
