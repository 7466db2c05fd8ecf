"""A seconds-long smoke of bench/compare.py, so the side-by-side harness keeps working in CI.

It runs the harness as a user would (``--quick`` against guestnet and a veth pair, MTU 1500,
1-second runs) and checks the shape of what comes out, never the speed: veth (the kernel's own
path, which needs nothing of ours) has a number in every traffic column, guestnet has a row
whose every column holds a number or an ``error: ...``, and no namespace of the harness is left.
Both address families are measured (issue 10): each backend has an IPv4 and an IPv6 cell that
hold up to the same checks, and the report has the IPv6/IPv4 ratio table.

Issue 12's cells are exercised too, briefly (one-second probes, no bisection steps): the TCP
connect median, connections through the published port, UDP loss both ways, the UDP rate search
both ways, and DNS (forwarded through dnsmasq; guestnet's built-in name). The target table is
checked for shape here and for its arithmetic in
:func:`test_target_rows_judge_against_the_best_peer`, which needs no root and no network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPARE = REPO / "bench" / "compare.py"
TRAFFIC = ("tcp_up", "tcp_down", "rr_median", "rr_p99", "conn_per_s", "udp_gbps", "udp_loss")
ALL = (*TRAFFIC, "cpu_s_per_gb", "rss_mb")
#: Issue 12's cells, in every cell of both backends (a number, or an error saying why).
ISSUE12 = ("connect_ms", "fwd_conn_per_s", "udp_loss_down", "udp_max_up", "udp_max_down")


def _harness_namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [
        line.split()[0] for line in out.splitlines() if line.startswith("gnb") and f"{pid}_" in line
    ]


@pytest.mark.root
def test_compare_quick_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "cells.json"
    out_md = tmp_path / "section.md"
    argv = [
        sys.executable, str(COMPARE), "--quick", "--backends", "guestnet,veth", "--mtus", "1500",
        "--families", "4,6", "--duration", "1", "--udp-probe", "1", "--udp-steps", "0",
        "--budget", "150", "--json", str(out_json), "--markdown", str(out_md),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=200)
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

    # Issue 12's cells: present in every cell, as a number or a reason.
    for (backend, family), cell in by_family.items():
        for key in ISSUE12:
            assert key in cell["values"] or cell["errors"].get(key), (backend, family, key)
    veth4, gn4 = by_family[("veth", 4)], by_family[("guestnet", 4)]
    # The kernel's own path connects, and the harness's dnsmasq answers, on every try.
    assert veth4["values"]["connect_ms"] > 0 and veth4["values"]["fwd_conn_per_s"] > 0
    assert veth4["values"]["dns_forward_ms"] > 0
    # guestnet: the built-in name and the forwarded one are measured (or the reason is given);
    # a peer-less built-in cell stays empty for veth, and IPv6 cells carry no DNS at all.
    for key in ("dns_builtin_ms", "dns_forward_ms"):
        assert key in gn4["values"] or gn4["errors"].get(key), key
    assert "dns_builtin_ms" not in veth4["values"] and "dns_builtin_ms" not in veth4["errors"]
    for backend in ("guestnet", "veth"):
        six = by_family[(backend, 6)]
        assert "dns_forward_ms" not in six["values"] and "dns_forward_ms" not in six["errors"]
    assert "Issue 12's targets" in md
    assert "| connect ms (lower is better) | 1500 |" in md
    assert "≥ pasta's -t" in md and "MTU 1500, IPv6:" in md


def _compare_module() -> object:
    spec = importlib.util.spec_from_file_location("bench_compare", COMPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_target_rows_judge_against_the_best_peer() -> None:
    """The target table picks the best peer per metric (the highest rate, the lowest latency)
    and reads the target off the ratio, the absolute bound and the veth fraction."""
    cmp: Any = _compare_module()
    cells = [
        cmp.Cell("guestnet", 1500, values={"conn_per_s": 2500.0, "connect_ms": 0.2,
                 "tcp_up": 10.0, "udp_max_up": 1.0, "udp_loss": 0.05, "rss_mb": 41.0}),
        cmp.Cell("pasta", 1500, values={"conn_per_s": 3000.0, "connect_ms": 0.15,
                 "tcp_up": 2.0, "udp_max_up": 0.6}),
        cmp.Cell("slirp4netns", 1500, values={"conn_per_s": 2000.0, "connect_ms": 0.1,
                 "tcp_up": 1.0, "udp_max_up": 0.4}),
        cmp.Cell("veth", 1500, values={"tcp_up": 20.0}),
    ]  # fmt: skip
    rows = {r.target.key: r for r in cmp.target_rows(cells)}
    conn = rows["conn_per_s"]
    assert (conn.best_peer, conn.best_value, conn.passed) == ("pasta", 3000.0, False)
    connect = rows["connect_ms"]
    assert (connect.best_peer, connect.best_value, connect.passed) == ("slirp4netns", 0.1, False)
    # 10 Gbit/s beats every peer but is half of veth: the 0.85 x veth clause fails it.
    assert rows["tcp_up"].best_peer == "pasta" and rows["tcp_up"].passed is False
    # 1.0 is not twice pasta's 0.6.
    assert rows["udp_max_up"].passed is False and rows["udp_max_up"].ratio == pytest.approx(1 / 0.6)
    assert rows["udp_loss"].passed is True and rows["rss_mb"].passed is False
    # No value for guestnet: cannot tell.
    assert rows["rr_median"].passed is None and rows["fwd_conn_per_s"].passed is None
    cells[0].values["tcp_up"] = 18.0
    cells[0].values["udp_max_up"] = 1.3
    rows = {r.target.key: r for r in cmp.target_rows(cells)}
    assert rows["tcp_up"].passed is True and rows["udp_max_up"].passed is True
    md = cmp.render_targets(list(rows.values()))
    assert "| conn/s | 1500 | 2500 | pasta 3000 | 0.83 |" in md and "**FAIL**" in md
