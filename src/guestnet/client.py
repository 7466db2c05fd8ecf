"""Command-line clients of the control API: ``guestnet stats|flows|forward|top``.

Each talks HTTP/1.1 to a running guestnet's ``--api-socket`` with the standard library's
``http.client`` over a unix socket, prints what it got (``--json`` for the raw answer), and exits
0, or 1 with a one-line error (the API's own ``{"error": ...}`` message when it gave one).

``guestnet top`` is a live view drawn with rich: per-link throughput computed from the link byte
and frame counters of two samples, flows by protocol and state and the busiest flows, pool use,
and the drop counters that moved. It refreshes every ``--interval`` seconds (1 by default);
``--once`` draws one frame from two samples ``--interval`` apart and exits (for scripts and tests).

``http.client`` (with ``email`` and ``ssl`` behind it) is imported by the first request, not with
this module: ``cli`` imports this module for its parsers, and a serving guestnet never makes a
request (about 1.3 MB of resident memory, issue 12).
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import http.client

#: Seconds a client waits for the API before giving up.
CLIENT_TIMEOUT_S = 10.0


class ApiError(Exception):
    """The API could not be reached or answered with an error."""


@functools.cache
def _unix_connection_class() -> Callable[[str, float], http.client.HTTPConnection]:
    """``HTTPConnection`` over a unix socket; made on first use (see the module docstring)."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def __init__(self, path: str, timeout: float) -> None:
            super().__init__("localhost", timeout=timeout)
            self.unix_path = path

        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.unix_path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection


def request(
    path: str, method: str, target: str, body: object = None, timeout: float = CLIENT_TIMEOUT_S
) -> tuple[int, Any]:
    """One request to the API at unix socket ``path``: (status, decoded JSON or None)."""
    import http.client

    conn = _unix_connection_class()(path, timeout)
    try:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        status = resp.status
    except OSError as exc:
        raise ApiError(f"cannot reach the API at {path}: {exc.strerror or exc}") from None
    except http.client.HTTPException as exc:
        raise ApiError(f"bad answer from the API at {path}: {exc!r}") from None
    finally:
        conn.close()
    payload = json.loads(raw) if raw else None
    return status, payload


def _call(args: argparse.Namespace, method: str, target: str, body: object = None) -> Any:
    status, payload = request(args.api_socket, method, target, body)
    if status >= 400:
        msg = payload.get("error") if isinstance(payload, dict) else None
        raise ApiError(f"{status}: {msg or 'error'}")
    return payload


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _show(args: argparse.Namespace, value: Any, fmt: Callable[[Any], str]) -> int:
    """Print an API answer: as JSON with ``--json``, else as ``fmt`` writes it for people."""
    if args.json:
        _print_json(value)
    else:
        print(fmt(value))
    return 0


# -- stats / flows / forward -------------------------------------------------------------------


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as plain text, one fact per line."""
    out: list[str] = ["links:"]
    for link in stats.get("links", []):
        out.append(
            f"  {link.get('name')} ({link.get('kind', '?')}, guest {link.get('guest_mac')}): "
            f"in {link.get('frames_in')} frames {link.get('bytes_in')} bytes, "
            f"out {link.get('frames_out')} frames {link.get('bytes_out')} bytes"
        )
        if len(link.get("macs") or ()) > 1:
            out.append(f"    MACs: {', '.join(link['macs'])}")
        if link.get("guest_ip4"):
            out.append(f"    guest IPv4: {', '.join(link['guest_ip4'])}")
        if link.get("guest_ip6"):
            out.append(f"    guest IPv6: {', '.join(link['guest_ip6'])}")
    if not stats.get("links"):
        out.append("  (none)")
    out.append("pool:")
    for direction, pool in stats.get("pool", {}).items():
        fields = " ".join(f"{k}={v}" for k, v in pool.items())
        out.append(f"  {direction}: {fields}")
    flows = stats.get("flows", {})
    out.append(f"flows: {flows.get('total', 0)}")
    for proto, entry in flows.get("by_proto", {}).items():
        states = " ".join(f"{k}={v}" for k, v in entry.get("by_state", {}).items())
        out.append(f"  {proto}: {entry.get('total')} ({states})")
    out.append(f"forwards: {stats.get('forwards', 0)}")
    out.append("drops:")
    drops = stats.get("drops", {})
    for reason, count in drops.items():
        out.append(f"  {reason} {count}")
    if not drops:
        out.append("  (none)")
    return "\n".join(out)


def _endpoint(value: object) -> str:
    if isinstance(value, list):  # UDP and ICMP flows: the host peers they have spoken with
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        ip, port = value.get("ip"), value.get("port")
        if port is None:
            return str(ip)
        return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    return "-" if value is None else str(value)


def _up(flow: dict[str, Any]) -> int:
    """Bytes the guest sent on a flow (TCP calls it ``bytes_to_host``)."""
    return int(flow.get("bytes_from_guest", flow.get("bytes_to_host", 0)))


def format_flows(flows: list[dict[str, Any]]) -> str:
    """One line per flow."""
    if not flows:
        return "(no flows)"
    lines = [f"{'proto':5} {'guest':21} {'host':27} {'state':12} {'up':>10} {'down':>10} age_s"]
    for f in flows:
        lines.append(
            f"{f.get('proto', '?'):5} {_endpoint(f.get('guest')):21} {_endpoint(f.get('host')):27} "
            f"{f.get('state', '?')!s:12} {_up(f):>10} "
            f"{f.get('bytes_to_guest', 0):>10} {f.get('age_s', '')}"
        )
    return "\n".join(lines)


def format_forwards(forwards: list[dict[str, Any]]) -> str:
    """One line per forward."""
    if not forwards:
        return "(no forwards)"
    lines = []
    for f in forwards:
        host = _endpoint({"ip": f["host_ip"], "port": f["host_port"]})
        lines.append(
            f"{f['id']:>4} {f['proto']} {host} -> {f['guest_ip']}:{f['guest_port']} "
            f"(accepted {f.get('accepted', 0)}, datagrams {f.get('datagrams', 0)})"
        )
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    """``guestnet stats``."""
    return _show(args, _call(args, "GET", "/stats"), format_stats)


def cmd_flows(args: argparse.Namespace) -> int:
    """``guestnet flows``."""
    return _show(args, _call(args, "GET", "/flows"), format_flows)


def cmd_forward(args: argparse.Namespace) -> int:
    """``guestnet forward ls|rm|add``: ``add`` posts one forward per port of each spec."""
    if args.action == "ls":
        return _show(args, _call(args, "GET", "/forwards"), format_forwards)
    if args.action == "rm":
        for fid in args.ids:
            _call(args, "DELETE", f"/forwards/{fid}")
        return 0
    from guestnet.io.forwards import parse_publish

    created = []
    for text in args.specs:
        try:
            specs = parse_publish(text)
        except ValueError as exc:
            raise ApiError(str(exc)) from None
        for proto, host_ip, host_port, guest_port, *guest in specs:
            body: dict[str, object] = {
                "proto": proto,
                "host_ip": host_ip,
                "host_port": host_port,
                "guest_port": guest_port,
            }
            if guest:
                body["guest_ip"] = guest[0]
            if args.guest_ip:
                body["guest_ip"] = args.guest_ip
            created.append(_call(args, "POST", "/forwards", body))
    return _show(args, created, format_forwards)


# -- top -----------------------------------------------------------------------------------------


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str, dt: float) -> float:
    if before is None or dt <= 0:
        return 0.0
    return max(0.0, (float(now.get(key, 0)) - float(before.get(key, 0))) / dt)


def _bits(rate_bytes: float) -> str:
    bits = rate_bytes * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.2f} {unit}"
    return f"{bits:.0f} bit/s"


def _guests(link: dict[str, Any]) -> str:
    """A port's guests for ``top``: its MACs, then the addresses seen on it, one per line."""
    macs = link.get("macs") or ([link["guest_mac"]] if link.get("guest_mac") else [])
    return "\n".join([*macs, *(link.get("guest_ip4") or ()), *(link.get("guest_ip6") or ())])


def render_top(
    stats: dict[str, Any],
    flows: list[dict[str, Any]],
    before: dict[str, Any] | None,
    dt: float,
    max_flows: int = 10,
) -> Any:
    """One frame of ``guestnet top`` as a rich renderable."""
    from rich.console import Group
    from rich.table import Table

    old_links = {link.get("name"): link for link in (before or {}).get("links", [])}
    links = Table(title="links", expand=True)
    left = ("link", "kind", "guests")
    for col in ("link", "kind", "guests", "in", "in frames/s", "out", "out frames/s", "tx drops"):
        links.add_column(col, justify="left" if col in left else "right")
    for link in stats.get("links", []):
        prev = old_links.get(link.get("name")) if before is not None else None
        links.add_row(
            str(link.get("name")),
            str(link.get("kind", "")),
            _guests(link),
            _bits(_rate(link, prev, "bytes_in", dt)),
            f"{_rate(link, prev, 'frames_in', dt):.0f}",
            _bits(_rate(link, prev, "bytes_out", dt)),
            f"{_rate(link, prev, 'frames_out', dt):.0f}",
            str(link.get("frames_out_dropped", 0)),
        )

    pools = Table(title="frame pools", expand=True)
    keys = ("capacity", "in_use", "high_water", "free_count", "hits", "misses", "mtu")
    pools.add_column("pool")
    for k in keys:
        pools.add_column(k, justify="right")
    for name, pool in stats.get("pool", {}).items():
        pools.add_row(name, *(str(pool.get(k, "")) for k in keys))

    counts = stats.get("flows", {})
    summary = ", ".join(
        f"{proto} {entry.get('total', 0)} ("
        + ", ".join(f"{s} {n}" for s, n in entry.get("by_state", {}).items())
        + ")"
        for proto, entry in counts.get("by_proto", {}).items()
    )
    flow_table = Table(title=f"flows: {counts.get('total', 0)}  {summary}", expand=True)
    for col in ("proto", "guest", "host", "state", "up bytes", "down bytes", "age s"):
        flow_table.add_column(col, justify="right" if "bytes" in col or col == "age s" else "left")
    busiest = sorted(
        flows,
        key=lambda f: _up(f) + int(f.get("bytes_to_guest", 0)),
        reverse=True,
    )[:max_flows]
    for f in busiest:
        flow_table.add_row(
            str(f.get("proto", "")),
            _endpoint(f.get("guest")),
            _endpoint(f.get("host")),
            str(f.get("state", "")),
            str(_up(f)),
            str(f.get("bytes_to_guest", 0)),
            str(f.get("age_s", "")),
        )

    drops = Table(title="counters", expand=True)
    drops.add_column("reason")
    drops.add_column("count", justify="right")
    drops.add_column("per s", justify="right")
    old_drops = (before or {}).get("drops", {})
    items = sorted(
        stats.get("drops", {}).items(),
        key=lambda kv: (kv[1] - old_drops.get(kv[0], 0), kv[1]),
        reverse=True,
    )
    for reason, count in items[:15]:
        delta = (count - old_drops.get(reason, 0)) / dt if before is not None and dt > 0 else 0
        drops.add_row(reason, str(count), f"{delta:.0f}")
    return Group(links, pools, flow_table, drops)


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    def sample() -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        stats = _call(args, "GET", "/stats")
        flows = _call(args, "GET", "/flows")
        return stats, flows, time.monotonic()

    console = Console()
    before, _, t0 = sample()
    if args.once:
        time.sleep(args.interval)
        stats, flows, t1 = sample()
        console.print(render_top(stats, flows, before, t1 - t0))
        return 0
    stats, flows, t1 = before, [], t0
    try:
        with Live(
            render_top(stats, flows, None, 0), console=console, auto_refresh=False, screen=False
        ) as live:
            while True:
                time.sleep(args.interval)
                stats, flows, t1 = sample()
                live.update(render_top(stats, flows, before, t1 - t0), refresh=True)
                before, t0 = stats, t1
    except KeyboardInterrupt:
        return 0


# -- parsers ---------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{value} is outside 0.05..3600")
    return value


def _api_options(p: argparse.ArgumentParser, json: bool = True) -> None:
    """``--api-socket`` (required), and ``--json`` for the commands that print an answer."""
    p.add_argument(
        "--api-socket", required=True, metavar="PATH", help="the running guestnet's --api-socket"
    )
    if json:
        p.add_argument("--json", action="store_true", help="print the API's JSON as is")


def add_client_parsers(sub: Any) -> None:
    """Add ``stats``, ``flows``, ``forward`` and ``top`` to the top-level subparsers."""
    stats = sub.add_parser("stats", help="print a running guestnet's counters (control API)")
    _api_options(stats)
    stats.set_defaults(client=cmd_stats)

    flows = sub.add_parser("flows", help="list a running guestnet's NAT flows (control API)")
    _api_options(flows)
    flows.set_defaults(client=cmd_flows)

    fwd = sub.add_parser("forward", help="list, add or remove port forwards (control API)")
    fsub = fwd.add_subparsers(dest="action", required=True, parser_class=type(fwd))
    add = fsub.add_parser(
        "add",
        help="publish host ports to the guest",
        description="Publish [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (ranges A-B:C-D; IPv6 "
        "host as [::1]:8080:80). HOST_IP defaults to 127.0.0.1, not 0.0.0.0.",
    )
    add.add_argument("specs", nargs="+", metavar="SPEC")
    add.add_argument("--guest-ip", help="fixed guest address (default: the guest's own)")
    ls = fsub.add_parser("ls", help="list forwards")
    rm = fsub.add_parser("rm", help="remove forwards by id")
    rm.add_argument("ids", nargs="+", metavar="ID")
    for p in (add, ls, rm):
        _api_options(p)
        p.set_defaults(client=cmd_forward)

    top = sub.add_parser("top", help="live view of throughput, flows, drops and pool use")
    _api_options(top, json=False)
    top.add_argument(
        "--interval", type=_positive, default=1.0, help="seconds between refreshes (%(default)s)"
    )
    top.add_argument(
        "--once", action="store_true", help="draw one frame (two samples --interval apart), exit"
    )
    top.set_defaults(client=cmd_top)


def run_client(args: argparse.Namespace) -> int:
    """Run the client command chosen on the command line; 1 with a message on API errors."""
    func: Callable[[argparse.Namespace], int] = args.client
    try:
        return func(args)
    except ApiError as exc:
        print(f"guestnet {args.command}: error: {exc}", file=sys.stderr)
        return 1
