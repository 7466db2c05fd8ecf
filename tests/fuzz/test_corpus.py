"""Replay the coverage-guided fuzzer's corpus and every past crash through the byte targets.

``tests/fuzz/corpus/TARGET/`` holds the inputs libFuzzer kept for new coverage (seeded from the
frames real clients sent in the integration tests, then grown by ``bench/fuzz.py run``);
``tests/fuzz/crashes/TARGET/`` the inputs that once broke something, each fixed since. Each must
run through its target (tests/fuzz/targets.py) without an exception other than those the target
allows, so a regression of any past finding fails here, in CI, without the fuzzer installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guestnet.wire.ipv4 import PROTO_TCP
from guestnet.wire.tcp import ACK, PSH, SYN

from .targets import AUTO_CONNECT, FRAMES, TARGETS, frame_step, run_services, script

HERE = Path(__file__).resolve().parent
INPUTS = sorted(
    (kind, target.name, path)
    for kind in ("corpus", "crashes")
    for target in sorted((HERE / kind).glob("*"))
    if target.is_dir()
    for path in sorted(target.iterdir())
    if path.is_file() and not path.name.startswith(".")
)


def test_corpus_is_there() -> None:
    """Both targets have a corpus (a checkout without it would replay nothing)."""
    names = {target for kind, target, _ in INPUTS if kind == "corpus"}
    assert names >= set(TARGETS), names
    per_target = {t: sum(1 for k, n, _ in INPUTS if k == "corpus" and n == t) for t in TARGETS}
    assert all(n >= 20 for n in per_target.values()), per_target


@pytest.mark.parametrize(
    ("target", "path"),
    [pytest.param(t, p, id=f"{k}/{t}/{p.name[:16]}") for k, t, p in INPUTS],
)
def test_replay(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_a_capture_script_reaches_the_nat() -> None:
    """A script as ``bench/fuzz.py seed`` writes it: the guest's frames, connects accepted."""
    f = FRAMES

    def seg(flags: int, payload: bytes = b"") -> bytes:
        return f.ipv4(PROTO_TCP, f.tcp_segment(40000, 80, flags, payload, seq=1001, ack=900001))

    steps = [
        frame_step(f.tcp(40000, 80, SYN)),
        frame_step(seg(ACK)),
        frame_step(seg(ACK | PSH, b"GET /")),
    ]
    rig = run_services(script(AUTO_CONNECT, steps))
    assert bytes(rig.tcp_io.socks[0].written) == b"GET /"
