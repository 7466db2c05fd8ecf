"""What the pasta and passt modes share: their getopt, port specs, addresses and daemon life.

Theory of operation
-------------------
pasta and passt are one program with one option parser (passt's ``conf.c``); guestnet's two
modes (:mod:`guestnet.compat.pasta`, :mod:`guestnet.compat.passt`) share the pieces here:

- :func:`getopt_long`: glibc's getopt_long as passt calls it (long options as ``--opt=value``
  or ``--opt value``, unambiguous abbreviations, clustered short options). pasta stops at the
  first operand (its optstring starts with ``+``: what follows is a PID or a command and its
  own arguments); passt permutes. A bad option is one line on stderr and exit status 1.
- :func:`parse_port_spec`: ``-t/-u/-T/-U`` specs: ``none``, ``auto``, ``all``, or a
  comma-separated list of ``[~]FIRST[-LAST][:TO_FIRST[-TO_LAST]]`` behind an optional
  ``ADDR[%IFNAME]/`` prefix (``~`` excludes ports from the ranges given). Each port becomes one
  of guestnet's ``-p`` forwards (:attr:`guestnet.config.Config.publish`): the host port is bound
  on ADDR (on 0.0.0.0, and :: with IPv6, as pasta binds every address, when there is none) and
  connects to the guest's port.
- :func:`build_config`: ``-a/-n/-g/-m/--dns-forward/-4/--no-map-gw`` onto a
  :class:`~guestnet.config.Config`. pasta and passt copy the host's addresses, routes and MTU
  by default; guestnet keeps its own defaults (10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3,
  fd00::/64) and uses what ``-a/-n/-g`` give instead. A ``--dns-forward`` address is where
  guestnet answers DNS (it may lie outside the guest's subnet, as podman's 169.254.1.1 does).
- :class:`Daemon`: not in the foreground, the process forks; the parent waits (bounded) for
  the child's word and exits 0 once the child serves the link, or with the child's status when
  it fails. The child (the daemon) starts a session of its own and, before saying so, reopens
  0/1/2 on ``/dev/null``, so nothing the caller reads to end-of-file (podman and rootlesskit
  read both stdout and stderr) stays open after the parent exits. Messages written before that
  reach the caller's stderr; later ones go to ``--log-file`` when given.
- :func:`watch_netns`: the daemon exits when the namespace goes away: for a PID, when the
  process exits (its pidfd turns readable); for a path, when the file disappears or is no
  longer the namespace it was (a bind mount unmounted), checked twice a second. The TAP's fd
  keeps the namespace itself alive, so its going away would never be seen on the link.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guestnet.config import MAX_MTU, MIN_MTU, Config, parse_mac
from guestnet.io.loop import EPOLLIN
from guestnet.io.netns import resolve_target
from guestnet.network import Network

log = logging.getLogger("guestnet")

EXIT_FAILURE = 1
#: Longest the parent waits for the daemon to serve the link (the namespace helper's own bound
#: is 30 s).
DAEMON_START_TIMEOUT_S = 60.0
#: How often a path-named namespace is checked for having gone away.
NETNS_POLL_S = 0.5
#: Upper bound on ports one spec may forward (each is a host socket per address family).
MAX_SPEC_PORTS = 1024
PORT_MAX = 65535


class OptionExit(Exception):
    """Leave with ``status``, after ``out`` on stdout and ``err`` on stderr."""

    def __init__(self, status: int, out: str = "", err: str = "") -> None:
        super().__init__(err or out)
        self.status = status
        self.out = out
        self.err = err


def fail(message: str) -> OptionExit:
    """A one-line error, exit status 1."""
    return OptionExit(EXIT_FAILURE, err=message.rstrip("\n") + "\n")


# -- getopt_long ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionTable:
    """Short options (``{char: long name}``) and long options (``{name: takes an argument}``)."""

    short: dict[str, str]
    long: dict[str, bool]


def getopt_long(
    prog: str, args: Sequence[str], table: OptionTable, *, stop_at_operand: bool
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split ``args`` into ([(long name, value)], operands); OptionExit on a bad option."""
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if arg.startswith("--"):
            i = _long_option(prog, arg, args, i, table, opts)
        elif arg.startswith("-") and arg != "-":
            i = _short_options(prog, arg, args, i, table, opts)
        elif stop_at_operand:
            operands.extend(args[i - 1 :])
            break
        else:
            operands.append(arg)
    return opts, operands


def _long_option(
    prog: str,
    arg: str,
    args: Sequence[str],
    i: int,
    table: OptionTable,
    opts: list[tuple[str, str | None]],
) -> int:
    name, eq, value = arg[2:].partition("=")
    full = _long_name(prog, name, arg[2:], table)
    if table.long[full]:
        if not eq:
            if i >= len(args):
                raise fail(f"{prog}: option '--{full}' requires an argument")
            value = args[i]
            i += 1
        opts.append((full, value))
    else:
        if eq:
            raise fail(f"{prog}: option '--{full}' doesn't allow an argument")
        opts.append((full, None))
    return i


def _short_options(
    prog: str,
    arg: str,
    args: Sequence[str],
    i: int,
    table: OptionTable,
    opts: list[tuple[str, str | None]],
) -> int:
    j = 1
    while j < len(arg):
        ch = arg[j]
        j += 1
        full = table.short.get(ch)
        if full is None:
            raise fail(f"{prog}: invalid option -- '{ch}'")
        if not table.long[full]:
            opts.append((full, None))
            continue
        if j < len(arg):
            value = arg[j:]
        elif i < len(args):
            value = args[i]
            i += 1
        else:
            raise fail(f"{prog}: option requires an argument -- '{ch}'")
        opts.append((full, value))
        break
    return i


def _long_name(prog: str, name: str, text: str, table: OptionTable) -> str:
    """The long option ``name`` stands for (exact, or an unambiguous prefix)."""
    if name in table.long:
        return name
    matches = [n for n in table.long if n.startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = " ".join(f"'--{m}'" for m in matches)
        raise fail(f"{prog}: option '--{name}' is ambiguous; possibilities: {listed}")
    raise fail(f"{prog}: unrecognized option '--{text}'")


# -- port specs ----------------------------------------------------------------------------------


@dataclass
class PortSpec:
    """One ``-t/-u/-T/-U`` value: ``mode`` none, auto, all or ports; the ports as
    (host address or None for every address, host port, guest port)."""

    mode: str
    ports: list[tuple[str | None, int, int]] = field(default_factory=list)
    #: ``%IFNAME`` of the address prefix (guestnet cannot bind to a device: noted, ignored).
    ifname: str | None = None
    #: Only exclusions (``~25``): every port but those, which guestnet cannot do.
    exclusions_only: bool = False


_ITEM = re.compile(r"(~?)(\d+)(?:-(\d+))?(?::(\d+)(?:-(\d+))?)?")


def parse_port_spec(text: str) -> PortSpec:
    """Parse one spec as passt's ``conf_ports`` reads it; ValueError with passt's message."""
    if text in ("none", "auto", "all"):
        return PortSpec(text)
    bad = ValueError(f"Invalid port specifier {text}")
    addr: str | None = None
    ifname: str | None = None
    body = text
    if "/" in text:
        prefix, _, body = text.rpartition("/")
        prefix, pct, ifname_part = prefix.partition("%")
        ifname = ifname_part if pct else None
        if pct and not ifname_part:
            raise bad
        if prefix:
            try:
                addr = str(ipaddress.ip_address(prefix.strip("[]")))
            except ValueError:
                raise bad from None
    included: list[tuple[int, int]] = []
    excluded: set[int] = set()
    for item in body.split(","):
        m = _ITEM.fullmatch(item)
        if m is None:
            raise bad
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) else first
        if not 0 < first <= last <= PORT_MAX:
            raise bad
        if m.group(1):
            if m.group(4):
                raise bad
            excluded.update(range(first, last + 1))
            continue
        to_first = int(m.group(4)) if m.group(4) else first
        to_last = int(m.group(5)) if m.group(5) else to_first + (last - first)
        if to_last - to_first != last - first or not 0 < to_first <= to_last <= PORT_MAX:
            raise bad
        included.extend((p, to_first + (p - first)) for p in range(first, last + 1))
    spec = PortSpec("ports", ifname=ifname)
    if not included:
        spec.exclusions_only = True
        return spec
    ports = [(addr, h, g) for h, g in included if h not in excluded]
    if len(ports) > MAX_SPEC_PORTS:
        raise ValueError(f"{text}: more than {MAX_SPEC_PORTS} ports in one spec")
    spec.ports = ports
    return spec


def publish_entries(
    proto: str, specs: Sequence[PortSpec], ipv6: bool
) -> list[tuple[str, str, int, int]]:
    """The ``Config.publish`` entries for ``-t`` (proto tcp) or ``-u`` (udp) specs."""
    out: list[tuple[str, str, int, int]] = []
    seen: set[tuple[str, int]] = set()
    for spec in specs:
        for addr, host_port, guest_port in spec.ports:
            hosts = [addr] if addr is not None else (["0.0.0.0", "::"] if ipv6 else ["0.0.0.0"])
            for host in hosts:
                if (host, host_port) not in seen:
                    seen.add((host, host_port))
                    out.append((proto, host, host_port, guest_port))
    return out


def spec_notes(option: str, specs: Sequence[PortSpec], auto_meaning: str) -> list[str]:
    """Notes for what a spec asks and guestnet does not do."""
    notes: list[str] = []
    for spec in specs:
        if spec.mode == "auto":
            notes.append(f"{option} auto: {auto_meaning}")
        elif spec.mode == "all":
            notes.append(f"{option} all: guestnet forwards only the ports listed; ignored")
        if spec.ifname is not None:
            notes.append(f"{option}: binding to interface {spec.ifname} is not supported; ignored")
        if spec.exclusions_only:
            notes.append(f"{option}: a spec of exclusions only forwards nothing in guestnet")
    return notes


# -- addresses -----------------------------------------------------------------------------------


@dataclass
class AddressOptions:
    """``-a/-n/-g/-m/--dns-forward/-4/-6/--no-map-gw/-M``, as given."""

    addresses: list[str] = field(default_factory=list)
    netmask: str | None = None
    gateways: list[str] = field(default_factory=list)
    mtu: int | None = None
    dns_forward: list[str] = field(default_factory=list)
    ipv4_only: bool = False
    ipv6_only: bool = False
    no_map_gw: bool = False
    pcap: str | None = None
    tcp: list[PortSpec] = field(default_factory=list)
    udp: list[PortSpec] = field(default_factory=list)

    def apply(self, name: str, value: str) -> bool:
        """Take option ``--name value`` if it is one of these; False when it is not."""
        if name == "mtu":
            self.mtu = parse_mtu(value)
        elif name in ("address", "gateway", "dns-forward"):
            {"address": self.addresses, "gateway": self.gateways,
             "dns-forward": self.dns_forward}[name].append(value)  # fmt: skip
        elif name == "netmask":
            self.netmask = value
        elif name == "pcap":
            self.pcap = value
        elif name == "no-map-gw":
            self.no_map_gw = True
        elif name == "ipv4-only":
            self.ipv4_only = True
        else:
            return False
        return True


def parse_mtu(text: str) -> int:
    """``-m``: 0 leaves guestnet's default (passt: no MTU assigned); else 576 to 65520."""
    if re.fullmatch(r"\d+", text) is None:
        raise fail(f"Invalid MTU: {text}")
    value = int(text)
    if value != 0 and not MIN_MTU <= value <= MAX_MTU:
        raise fail(f"Invalid MTU: {text} (guestnet takes {MIN_MTU} to {MAX_MTU})")
    return value


def parse_address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise fail(f"Invalid {what}: {text}") from None


def parse_netmask(text: str) -> int:
    """``-n``: a prefix length or a dot-decimal mask."""
    if re.fullmatch(r"\d{1,2}", text) and 0 < int(text) <= 32:
        return int(text)
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise fail(f"Invalid netmask: {text}") from None


def _classful_prefix(addr: ipaddress.IPv4Address) -> int:
    """passt's default netmask when the host has none to copy: the address's class."""
    first = addr.packed[0]
    return 8 if first < 128 else 16 if first < 192 else 24


def _pick(net: ipaddress.IPv4Network, offsets: Sequence[int], taken: set[object]) -> object:
    for off in offsets:
        candidate = net.network_address + off
        if candidate not in taken and candidate < net.broadcast_address:
            return candidate
    raise fail(f"no room for guestnet's addresses in {net}")


def build_config(o: AddressOptions, **extra: object) -> Config:
    """The :class:`Config` the options ask for; OptionExit with a one-line message."""
    d = Config()
    v4 = [a for a in (parse_address(t, "address") for t in o.addresses) if a.version == 4]
    v6 = [a for a in (parse_address(t, "address") for t in o.addresses) if a.version == 6]
    gw4 = [a for a in (parse_address(t, "gateway") for t in o.gateways) if a.version == 4]
    gw6 = [a for a in (parse_address(t, "gateway") for t in o.gateways) if a.version == 6]
    dns4 = [a for a in (parse_address(t, "DNS address") for t in o.dns_forward) if a.version == 4]
    dns6 = [a for a in (parse_address(t, "DNS address") for t in o.dns_forward) if a.version == 6]
    kw: dict[str, object] = {}
    if v4 or o.netmask is not None or gw4 or dns4:
        guest = ipaddress.IPv4Address(v4[0]) if v4 else d.guest_ip
        if o.netmask is not None:
            prefix = parse_netmask(o.netmask)
        else:
            prefix = _classful_prefix(guest) if v4 else d.subnet.prefixlen
        net = ipaddress.IPv4Network(f"{guest}/{prefix}", strict=False)
        gateway = ipaddress.IPv4Address(gw4[0]) if gw4 else _pick(net, (2, 1), {guest})
        dns = ipaddress.IPv4Address(dns4[0]) if dns4 else _pick(net, (3, 4, 5), {guest, gateway})
        kw.update(subnet=net, guest_ip=guest, gateway=gateway, dns_ip=dns)
        kw["mac"] = b"\x52\x55" + ipaddress.IPv4Address(gateway).packed
    if v6 or gw6 or dns6:
        guest6 = ipaddress.IPv6Address(v6[0]) if v6 else d.guest_ip6
        prefix6 = ipaddress.IPv6Network(f"{guest6}/64", strict=False)
        base = prefix6.network_address
        gateway6 = ipaddress.IPv6Address(gw6[0]) if gw6 else base + 2
        if gateway6 == guest6:
            gateway6 = base + 1
        dns_ip6 = ipaddress.IPv6Address(dns6[0]) if dns6 else base + 3
        kw.update(ipv6_prefix=prefix6, guest_ip6=guest6, gateway6=gateway6, dns_ip6=dns_ip6)
    if o.mtu:
        kw["mtu"] = o.mtu
    ipv6 = not o.ipv4_only
    kw["ipv6"] = ipv6
    if o.no_map_gw:
        kw["no_host_loopback"] = True
    if o.pcap is not None:
        kw["pcap"] = os.path.abspath(o.pcap)
    kw["publish"] = tuple(
        publish_entries("tcp", o.tcp, ipv6 and _host_has_ipv6())
        + publish_entries("udp", o.udp, ipv6 and _host_has_ipv6())
    )
    kw.update(extra)
    try:
        return Config(**kw)  # type: ignore[arg-type]
    except ValueError as exc:
        raise fail(str(exc)) from None


def _host_has_ipv6() -> bool:
    """Whether this host's kernel speaks IPv6 (a ``::`` listener would fail otherwise)."""
    return os.path.exists("/proc/net/if_inet6")


def parse_mac_option(text: str) -> bytes:
    try:
        return parse_mac(text)
    except ValueError:
        raise fail(f"Invalid MAC address: {text}") from None


# -- running as a daemon ----------------------------------------------------------------------


class Daemon:
    """Fork now; the parent waits for :meth:`ready` (exit 0) or the child's end (its status).

    Only the child returns from the constructor; the parent leaves with ``os._exit``.
    """

    def __init__(self, timeout: float = DAEMON_START_TIMEOUT_S) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid:
            os.close(w)
            os._exit(parent_wait(pid, r, timeout))
        os.close(r)
        os.setsid()
        self._w = w

    def ready(self) -> None:
        """Let go of the caller's stdin, stdout and stderr, then tell the parent to exit 0."""
        sys.stdout.flush()
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        with contextlib.suppress(OSError):
            os.write(self._w, b"1")
        os.close(self._w)
        self._w = -1


def parent_wait(pid: int, r: int, timeout: float) -> int:
    """The parent's side: 0 once the child says ready; its status (or 1) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print("guestnet: the daemon did not start in time", file=sys.stderr, flush=True)
            return EXIT_FAILURE
        readable, _, _ = select.select([r], [], [], min(left, 1.0))
        if not readable:
            continue
        data = os.read(r, 1)
        if data == b"1":
            return 0
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return code if code > 0 else EXIT_FAILURE


def write_pid_file(path: str | None) -> None:
    """``-P/--pid``: this process's PID, as pasta and passt write it."""
    if path is not None:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")


def log_to_file(path: str) -> None:
    """``--log-file``: guestnet's log lines (and the modes' notes) go to ``path``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s guestnet: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# -- the namespace going away -----------------------------------------------------------------


def watch_netns(net: Network, target: str, gone: Callable[[], None]) -> None:
    """Call ``gone`` once the namespace ``target`` (a PID or a path or name) goes away."""
    loop = net.loop
    if target.isdigit():
        pidfd = os.pidfd_open(int(target))

        def on_exit(_events: int) -> None:
            loop.remove_fd(pidfd)
            gone()

        loop.add_fd(pidfd, EPOLLIN, on_exit)

        def close_pidfd() -> None:
            with contextlib.suppress(KeyError, OSError, ValueError):
                loop.remove_fd(pidfd)
            with contextlib.suppress(OSError):
                os.close(pidfd)

        net.instance.on_close(close_pidfd)
        return
    path, _ = resolve_target(target)
    st = os.stat(path)
    identity = (st.st_dev, st.st_ino)

    def check(_now: float) -> None:
        try:
            now_st = os.stat(path)
        except OSError:
            gone()
            return
        if (now_st.st_dev, now_st.st_ino) != identity:
            gone()
            return
        loop.call_later(NETNS_POLL_S, check)

    loop.call_later(NETNS_POLL_S, check)


#: Long options pasta and passt both take (the same program upstream): name -> takes an argument.
SHARED_LONG: dict[str, bool] = {
    "debug": False,
    "trace": False,
    "quiet": False,
    "foreground": False,
    "stderr": False,
    "log-file": True,
    "log-size": True,
    "runas": True,
    "help": False,
    "version": False,
    "fd": True,
    "pcap": True,
    "pid": True,
    "mtu": True,
    "address": True,
    "netmask": True,
    "mac-addr": True,
    "gateway": True,
    "interface": True,
    "outbound": True,
    "outbound-if4": True,
    "outbound-if6": True,
    "dns": True,
    "search": True,
    "dns-forward": True,
    "no-tcp": False,
    "no-udp": False,
    "no-icmp": False,
    "no-dhcp": False,
    "no-ndp": False,
    "no-dhcpv6": False,
    "no-ra": False,
    "no-map-gw": False,
    "ipv4-only": False,
    "ipv6-only": False,
    "tcp-ports": True,
    "udp-ports": True,
}
#: Short options both take, with their long names.
SHARED_SHORT: dict[str, str] = {
    "d": "debug",
    "q": "quiet",
    "f": "foreground",
    "e": "stderr",
    "l": "log-file",
    "h": "help",
    "F": "fd",
    "p": "pcap",
    "P": "pid",
    "m": "mtu",
    "a": "address",
    "n": "netmask",
    "M": "mac-addr",
    "g": "gateway",
    "i": "interface",
    "o": "outbound",
    "D": "dns",
    "S": "search",
    "4": "ipv4-only",
    "6": "ipv6-only",
    "t": "tcp-ports",
    "u": "udp-ports",
}
