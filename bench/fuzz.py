"""Coverage-guided fuzzing of the wire parsers and of every service behind the classifier.

Run (any user; needs ``.venv/bin/pip install -e '.[fuzz]'``, i.e. atheris and coverage)::

    .venv/bin/python bench/fuzz.py run [--targets wire,services] [--runs 1000000]
        [--max-time 600] [--keep] [--markdown OUT]
    .venv/bin/python bench/fuzz.py seed PCAP... [--max-scripts 200]
    .venv/bin/python bench/fuzz.py record [--out DIR]   # as root: the integration tests' captures

Theory of operation. The targets are tests/fuzz/targets.py's byte-level functions (``wire``: one
parser picked by the first byte; ``services``: a script of guest frames and host events through
every service, with the Rig's invariants checked after each step). ``run`` starts one worker
process per target: atheris instruments the ``guestnet`` package as it is imported and hands
the target to libFuzzer, which mutates inputs from the target's corpus (tests/fuzz/corpus/TARGET)
toward new branches, for ``--runs`` inputs or ``--max-time`` seconds, whichever comes first.
New inputs go to a scratch corpus; a crash (any exception the target does not allow, or an
invariant that breaks) is saved under tests/fuzz/crashes/TARGET/ — the corpus replay in CI
(tests/fuzz/test_corpus.py) then runs it for ever after, so each finding becomes a regression
test once fixed — and the worker goes on with the rest of its budget. At the end the kept corpus
(the old one plus the new inputs) is replayed under coverage.py for line coverage of
``guestnet.wire`` and ``guestnet.core``, and a table gives inputs, executions per second,
libFuzzer's edge coverage (``cov``) and features (``ft``), corpus size, crashes and line
coverage per target. ``--keep`` merges the new inputs into tests/fuzz/corpus, minimised by
libFuzzer (``-merge=1`` keeps only inputs that add coverage).

Seeding. ``record`` runs the integration tests that drive real clients (udhcpc, dhclient,
dhcpcd, ping, nslookup/dig, curl, nc, SLAAC, published ports) with GUESTNET_TEST_PCAP_DIR set:
tests/integration/nsutil.py then makes every guestnet it starts write a capture there. ``seed``
reads captures, keeps the frames the guest sent (source MAC not guestnet's), and writes: for
``wire``, for each distinct kind of frame (protocol, ports, flags, size class) its Ethernet,
IP and L4 bytes with the selector of the parser for that layer; for ``services``, one script
per capture (its first guest frames in order, as :func:`script_frames` picks them, host connects
accepted) and one single-frame script per distinct frame shape. Both then go through
``-merge=1`` into the corpus, so only what adds coverage stays.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
CORPUS = TESTS / "fuzz" / "corpus"
CRASHES = TESTS / "fuzz" / "crashes"
TARGET_NAMES = ("wire", "services")
OUR_MAC = bytes.fromhex("52550a000202")
SCRIPT_FRAMES = 48
SCRIPT_BYTES = 48 * 1024
#: Integration tests whose guests are real clients; ``record`` runs these with captures on.
RECORD_TESTS = (
    "tests/integration/test_real_clients.py",
    "tests/integration/test_dhcp_clients.py",
    "tests/integration/test_dhcpv6_clients.py",
    "tests/integration/test_ipv6_ndp.py",
    "tests/integration/test_dns.py",
    "tests/integration/test_icmp_echo.py",
    "tests/integration/test_udp_nat.py",
    "tests/integration/test_forward_tcp.py",
)
_STATS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)/")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


# -- the worker: one target under libFuzzer ------------------------------------------------------


def worker(target: str, libfuzzer_argv: list[str]) -> None:
    """Instrument guestnet, import the targets and hand one to libFuzzer (does not return)."""
    import atheris

    sys.path.insert(0, str(TESTS))
    with atheris.instrument_imports(include=["guestnet"]):
        from fuzz import targets

        import guestnet.core.classifier  # noqa: F401  (instrumented before the targets load it)

    fn = targets.TARGETS[target]
    atheris.Setup([str(_launcher(target)), *libfuzzer_argv], fn)
    atheris.Fuzz()


def _launcher(target: str) -> Path:
    """An executable that starts this worker: libFuzzer re-runs its argv[0] for -merge=1."""
    path = Path(tempfile.gettempdir()) / f"guestnet-fuzz-{target}-{os.getuid()}.sh"
    me = Path(__file__).resolve()
    text = f'#!/bin/sh\nexec "{sys.executable}" "{me}" _worker {target} "$@"\n'
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)
    return path


# -- seeding from captures -----------------------------------------------------------------------


def read_pcap(path: Path) -> Iterator[bytes]:
    """The frames of a pcap file (either timestamp resolution, either byte order)."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    off = 24
    rec = struct.Struct(order + "IIII")
    while off + 16 <= len(data):
        _, _, incl, _ = rec.unpack_from(data, off)
        off += 16
        if off + incl > len(data):
            return
        yield data[off : off + incl]
        off += incl


def guest_frames(path: Path) -> list[bytes]:
    """Frames the guest sent (the capture has both directions)."""
    return [f for f in read_pcap(path) if len(f) >= 14 and f[6:12] != OUR_MAC]


def layers(frame: bytes) -> list[tuple[int, bytes]]:
    """(parser selector, bytes) for each layer of a frame that targets.PARSERS reads."""
    out = [(0, frame)]
    ethertype = int.from_bytes(frame[12:14], "big")
    l3 = frame[14:]
    if ethertype == 0x0806:
        return [*out, (1, l3)]
    if ethertype == 0x0800 and len(l3) >= 20:
        ihl = (l3[0] & 0x0F) * 4
        proto, l4 = l3[9], l3[ihl:]
        out += [(2, l3)]
        if proto == 6:
            out += [(5, l4), (6, l4)]
        elif proto == 17:
            out += [(7, l4)]
            if l4[2:4] in (b"\x00\x43", b"\x00\x44"):
                out += [(13, l4[8:])]
        elif proto == 1:
            out += [(8, l4)]
    elif ethertype == 0x86DD and len(l3) >= 40:
        proto, l4 = l3[6], l3[40:]
        out += [(4, l3)]
        if proto == 6:
            out += [(5, l4), (6, l4)]
        elif proto == 17:
            out += [(7, l4)]
            if l4[2:4] in (b"\x02\x22", b"\x02\x23"):
                out += [(14, l4[8:])]
        elif proto == 58:
            out += [(11, l4)]
            if len(l4) > 8 and l4[0] in (133, 134, 135, 136):
                out += [(12, l4[8 if l4[0] in (133, 134) else 24 :])]
    return out


def shape(frame: bytes) -> tuple[object, ...]:
    """What makes two guest frames alike for the single-frame scripts: protocol, ports, flags."""
    ethertype = frame[12:14]
    l3 = frame[14:]
    if ethertype == b"\x08\x00" and len(l3) >= 20:
        ihl = (l3[0] & 0x0F) * 4
        l4 = l3[ihl:]
        return (4, l3[9], l4[2:4], l4[13:14] if l3[9] == 6 else l4[:1], len(frame) > 200)
    if ethertype == b"\x86\xdd" and len(l3) >= 40:
        l4 = l3[40:]
        return (6, l3[6], l4[2:4], l4[13:14] if l3[6] == 6 else l4[:1], len(frame) > 200)
    return (ethertype, frame[:6], l3[:8])


def script_frames(frames: list[bytes]) -> list[bytes]:
    """A capture's first guest frames for one script: at most :data:`SCRIPT_FRAMES` and
    :data:`SCRIPT_BYTES` in all, and at most two large ones (a bulk transfer repeats itself)."""
    out: list[bytes] = []
    total = large = 0
    for f in frames:
        if len(out) == SCRIPT_FRAMES or total + len(f) > SCRIPT_BYTES:
            break
        if len(f) > 4096:
            if large == 2:
                continue
            large += 1
        out.append(f)
        total += len(f)
    return out


def write_inputs(directory: Path, inputs: Iterator[bytes]) -> int:
    """Inputs as files named by content, as libFuzzer names its own; how many were new."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for data in inputs:
        path = directory / hashlib.sha1(data).hexdigest()
        if not path.exists():
            path.write_bytes(data)
            n += 1
    return n


def seed(pcaps: list[Path], max_scripts: int) -> None:
    sys.path.insert(0, str(TESTS))
    from fuzz.targets import AUTO_CONNECT, frame_step, script

    scratch = Path(tempfile.mkdtemp(prefix="guestnet-seed-"))
    try:
        wire_in, services_in = scratch / "wire", scratch / "services"
        seen: set[tuple[object, ...]] = set()
        shapes: set[tuple[object, ...]] = set()
        scripts: list[bytes] = []
        for pcap in pcaps:
            frames = guest_frames(pcap)
            if not frames:
                continue
            if len(scripts) < max_scripts:
                scripts.append(script(AUTO_CONNECT, [frame_step(f) for f in script_frames(frames)]))
            for f in frames:
                key = (*shape(f), len(f) // 512)
                if key in seen:
                    continue
                seen.add(key)
                write_inputs(wire_in, (bytes([sel]) + b for sel, b in layers(f)))
                if shape(f) not in shapes:
                    shapes.add(shape(f))
                    scripts.append(script(AUTO_CONNECT, [frame_step(f)]))
        write_inputs(services_in, iter(scripts))
        print(f"seed: {len(pcaps)} captures, {len(seen)} distinct kinds of guest frame, "
              f"{len(shapes)} shapes, {len(scripts)} scripts")  # fmt: skip
        for target, inputs in (("wire", wire_in), ("services", services_in)):
            merge(target, inputs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def merge(target: str, *sources: Path) -> None:
    """Merge inputs into the target's corpus, keeping only those that add coverage."""
    corpus = CORPUS / target
    corpus.mkdir(parents=True, exist_ok=True)
    before = len(list(corpus.iterdir()))
    argv = ["-merge=1", str(corpus), *(str(s) for s in sources)]
    proc = subprocess.run(
        [sys.executable, __file__, "_worker", target, *argv],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    after = len(list(corpus.iterdir()))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"merge into {target} failed ({proc.returncode})")
    print(f"{target}: corpus {before} -> {after} inputs")


# -- recording captures --------------------------------------------------------------------------


def record(out: Path) -> None:
    """Run the real-client integration tests with every guestnet writing a capture to ``out``."""
    if os.geteuid() != 0:
        raise SystemExit("record: the integration tests need root")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GUESTNET_TEST_PCAP_DIR=str(out))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *RECORD_TESTS]
    subprocess.run(cmd, cwd=ROOT, env=env, timeout=1800, check=False)
    print(f"record: {len(list(out.glob('*.pcap')))} captures in {out}")


# -- a fuzzing run -------------------------------------------------------------------------------


class Result:
    def __init__(self, target: str) -> None:
        self.target = target
        self.runs = 0
        self.seconds = 0.0
        self.cov = self.ft = self.corp = 0
        self.crashes: list[Path] = []
        self.line_coverage: dict[str, float] = {}


def fuzz_target(target: str, runs: int, max_time: int, scratch: Path) -> Result:
    """Fuzz one target for its budget, going on after each crash (saved under crashes/)."""
    res = Result(target)
    new = scratch / target
    new.mkdir(parents=True, exist_ok=True)
    artifacts = scratch / f"{target}-artifacts"
    artifacts.mkdir(exist_ok=True)
    deadline = time.monotonic() + max_time
    while res.runs < runs and time.monotonic() < deadline - 1:
        left = int(deadline - time.monotonic())
        argv = [f"-runs={runs - res.runs}", f"-max_total_time={max(left, 1)}",
                f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-timeout=20",
                "-rss_limit_mb=2048", str(new), str(CORPUS / target)]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, "_worker", target, *argv],
            capture_output=True,
            text=True,
            timeout=max_time + 120,
        )
        res.seconds += time.monotonic() - t0
        log = proc.stderr
        stats = _STATS.findall(log)
        if stats:
            res.cov, res.ft, res.corp = (int(x) for x in stats[-1])
        done = _DONE.search(log)
        executed = re.findall(r"stat::number_of_executed_units: (\d+)", log)
        res.runs += int(done.group(1)) if done else int(executed[-1]) if executed else 0
        found = sorted(artifacts.glob("crash-*")) + sorted(artifacts.glob("timeout-*"))
        for path in found:
            dest = CRASHES / target / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), dest)
            res.crashes.append(dest)
            tail = "\n".join(log.splitlines()[-40:])
            print(f"{target}: finding saved as {dest}\n{tail}", file=sys.stderr)
        if proc.returncode == 0 or not found:
            break
    return res


def line_coverage(target: str, corpora: list[Path]) -> dict[str, float]:
    """Line coverage of guestnet.wire and guestnet.core when the corpora are replayed."""
    data = Path(tempfile.mkdtemp(prefix="guestnet-cov-")) / ".coverage"
    files = [str(p) for c in corpora if c.is_dir() for p in c.iterdir() if p.is_file()]
    listing = data.parent / "inputs"
    listing.write_text("\n".join(files))
    run = [sys.executable, "-m", "coverage", "run", f"--data-file={data}", "--source=guestnet",
           __file__, "_replay", target, str(listing)]  # fmt: skip
    subprocess.run(run, cwd=ROOT, check=True, timeout=1800, capture_output=True)
    out: dict[str, float] = {}
    for pkg in ("wire", "core"):
        rep = subprocess.run(
            [sys.executable, "-m", "coverage", "report", f"--data-file={data}",
             f"--include=*/guestnet/{pkg}/*", "--format=total"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        with contextlib.suppress(ValueError):
            out[pkg] = float(rep.stdout.strip())
    shutil.rmtree(data.parent, ignore_errors=True)
    return out


def replay(target: str, listing: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from fuzz import targets

    fn = targets.TARGETS[target]
    for name in listing.read_text().splitlines():
        with contextlib.suppress(Exception):
            fn(Path(name).read_bytes())


def render(results: list[Result], command: str) -> str:
    lines = [
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "| target | inputs run | seconds | exec/s | cov (edges) | ft | corpus | crashes | "
        "lines covered: wire | core |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r.runs / r.seconds if r.seconds else 0.0
        lc = r.line_coverage
        lines.append(
            f"| {r.target} | {r.runs:,} | {r.seconds:.0f} | {rate:,.0f} | {r.cov} | {r.ft} | "
            f"{r.corp} | {len(r.crashes)} | {lc.get('wire', 0):.1f} % | {lc.get('core', 0):.1f} % |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="guestnet-fuzz-"))
    results = []
    try:
        for target in args.targets.split(","):
            res = fuzz_target(target, args.runs, args.max_time, scratch)
            res.line_coverage = line_coverage(target, [CORPUS / target, scratch / target])
            results.append(res)
            print(f"{target}: {res.runs:,} inputs, cov {res.cov}, ft {res.ft}, "
                  f"{len(res.crashes)} crash(es)", flush=True)  # fmt: skip
            if args.keep:
                merge(target, scratch / target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = render(results, " ".join([".venv/bin/python bench/fuzz.py", *sys.argv[1:]]))
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 1 if any(r.crashes for r in results) else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3:])
        return 0
    if len(sys.argv) > 3 and sys.argv[1] == "_replay":
        replay(sys.argv[2], Path(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fuzz each target for a budget; report coverage and crashes")
    r.add_argument("--targets", default=",".join(TARGET_NAMES))
    r.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    r.add_argument("--max-time", type=int, default=600, help="seconds per target at most")
    r.add_argument("--keep", action="store_true", help="merge new inputs into tests/fuzz/corpus")
    r.add_argument("--markdown", help="write the table here too")
    s = sub.add_parser("seed", help="seed the corpus from pcap captures")
    s.add_argument("pcaps", nargs="+", type=Path)
    s.add_argument("--max-scripts", type=int, default=200)
    rec = sub.add_parser("record", help="capture the real-client integration tests (root)")
    rec.add_argument("--out", type=Path, default=Path("/tmp/guestnet-captures"))
    args = p.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "seed":
        seed(args.pcaps, args.max_scripts)
    else:
        record(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
