"""A seconds-long smoke of bench/compare.py, so the side-by-side harness keeps working in CI.

It runs the harness as a user would (``--quick`` against guestnet and a veth pair, MTU 1500,
1-second runs) and checks the shape of what comes out, never the speed: veth (the kernel's own
path, which needs nothing of ours) has a number in every traffic column, guestnet has a row
whose every column holds a number or an ``error: ...``, and no namespace of the harness is left.
Both address families are measured by default (issue 10): each backend has an IPv4 and an IPv6
cell that hold up to the same checks, and the report has the IPv6/IPv4 ratio table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
COMPARE = REPO / "bench" / "compare.py"
TRAFFIC = ("tcp_up", "tcp_down", "rr_median", "rr_p99", "conn_per_s", "udp_gbps", "udp_loss")
ALL = (*TRAFFIC, "cpu_s_per_gb", "rss_mb")


def _harness_namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [
        line.split()[0] for line in out.splitlines() if line.startswith("gnb") and f"{pid}_" in line
    ]


def test_compare_quick_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "cells.json"
    out_md = tmp_path / "section.md"
    argv = [
        sys.executable, str(COMPARE), "--quick", "--backends", "guestnet,veth", "--mtus", "1500",
        "--duration", "1", "--budget", "60", "--json", str(out_json), "--markdown", str(out_md),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert not _harness_namespaces(proc.pid % 100000)

    raw_cells = json.loads(out_json.read_text())["cells"]
    cells = {c["backend"]: c for c in raw_cells}
    assert set(cells) == {"guestnet", "veth"}
    veth = cells["veth"]
    for key in TRAFFIC:
        assert isinstance(veth["values"].get(key), float), (key, veth["errors"])
    assert veth["values"]["tcp_up"] > 0 and veth["values"]["conn_per_s"] > 0
    gn = cells["guestnet"]
    for key in ALL:
        assert key in gn["values"] or gn["errors"].get(key), key

    table = stdout.splitlines()
    assert table[0].startswith("backend") and "TCP g→h Gbit/s" in table[0]
    assert any(line.startswith("guestnet  1500") for line in table)
    assert any(line.startswith("veth") for line in table)
    md = out_md.read_text()
    assert "Command: `" in md and "guestnet / veth" in md and os.uname().release in md

    by_family = {(c["backend"], c["family"]): c for c in raw_cells}
    assert set(by_family) == {(b, f) for b in ("guestnet", "veth") for f in (4, 6)}
    for family in (4, 6):
        veth, gn = by_family[("veth", family)], by_family[("guestnet", family)]
        for key in TRAFFIC:
            assert isinstance(veth["values"].get(key), float), (family, key, veth["errors"])
        for key in ALL:
            assert key in gn["values"] or gn["errors"].get(key), (family, key)
    assert any(line.startswith("guestnet  1500  IPv6") for line in table)
    assert "Ratios IPv6 / IPv4 per backend" in md
