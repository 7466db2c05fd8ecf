"""pasta mode: guestnet started by podman 5 or rootlesskit 2 as ``pasta``.

Theory of operation
-------------------
``pasta [OPTION]... [PID | --netns PATH|NAME | COMMAND [ARG]...]`` is parsed as pasta parses
it (:mod:`guestnet.compat.passt_common`: getopt_long stopping at the first operand) and mapped
onto :class:`~guestnet.network.Network`; nothing here moves a packet:

- the target: ``--netns PATH|NAME`` (with ``--userns PATH`` when given), or a PID (its user
  namespace is joined first when it differs from ours, a failure ignored), or a command, run in
  new namespaces (``Network.spawn``) in the foreground, pasta's status being the command's;
  with nothing, ``$SHELL``;
- ``--config-net``: the interface (``-I/--ns-ifname``, default ``eth0``; pasta copies the
  host's interface name) comes up with its address, default routes and MTU; without it, it is
  left down for the namespace's own DHCP client;
- addresses: ``-a/-n/-g`` when given, guestnet's own defaults otherwise (pasta copies the
  host's); ``--dns-forward ADDR`` is where guestnet answers DNS; ``-m/--mtu``; ``-4`` turns
  IPv6 off; ``--no-map-gw``: the gateway does not stand for the host's loopback
  (``no_host_loopback``);
- ``-t/-u`` specs publish host ports into the namespace (guestnet's forwards). ``auto`` (pasta
  follows the ports bound in the namespace) forwards nothing: guestnet does not scan; the ports
  have to be listed. ``-T/-U`` (namespace to host) have no equivalent in guestnet: ``none`` is
  what guestnet does anyway; anything else is accepted and ignored with a note;
- not in the foreground (``-f``, or a command), the process forks: the parent exits 0 once the
  namespace is configured and served, the daemon drops the caller's stdin/stdout/stderr and
  exits when the namespace goes away (``--no-netns-quit`` keeps it); ``-P/--pid`` names the
  file the daemon's PID goes to; ``--log-file`` gets the daemon's log.

Accepted and noted on stderr (unless ``--quiet``): ``-6/--ipv6-only`` (guestnet keeps IPv4),
``--map-guest-addr`` (no address stands for the host but the gateway), ``--host-lo-to-ns-lo``,
``-T/-U`` specs other than ``none``, ``--netns-only``, ``--runas``, ``-D/--dns``,
``-S/--search``, ``-M/--mac-addr``, ``--outbound*``, ``-i/--interface``. Unknown options: one
line on stderr and status 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from guestnet import __version__
from guestnet.compat.passt_common import (
    EXIT_FAILURE,
    SHARED_LONG,
    SHARED_SHORT,
    AddressOptions,
    Daemon,
    OptionExit,
    OptionTable,
    PortSpec,
    build_config,
    fail,
    getopt_long,
    log_to_file,
    parse_mac_option,
    parse_port_spec,
    spec_notes,
    watch_netns,
    write_pid_file,
)
from guestnet.config import Config
from guestnet.io.netns import STOP_SIGNALS, HelperError
from guestnet.io.tap import check_ifname
from guestnet.network import Network, StartError

log = logging.getLogger("guestnet")

DEFAULT_IFNAME = "eth0"

_LONG: dict[str, bool] = {
    **SHARED_LONG,
    "ns-ifname": True,
    "ns-mac-addr": True,
    "dhcp-dns": False,
    "dhcp-search": False,
    "map-guest-addr": True,
    "map-host-loopback": True,
    "host-lo-to-ns-lo": False,
    "tcp-ns": True,
    "udp-ns": True,
    "userns": True,
    "netns": True,
    "netns-only": False,
    "no-netns-quit": False,
    "config-net": False,
    "no-copy-routes": False,
    "no-copy-addrs": False,
}
_SHORT: dict[str, str] = {
    **SHARED_SHORT,
    "I": "ns-ifname",
    "T": "tcp-ns",
    "U": "udp-ns",
}
TABLE = OptionTable(_SHORT, _LONG)

#: Accepted, no effect in guestnet: option -> why.
_IGNORED = {
    "map-guest-addr": "no address but the gateway stands for the host in guestnet",
    "map-host-loopback": "the gateway stands for the host's loopback in guestnet",
    "host-lo-to-ns-lo": "guestnet does not forward into the namespace's loopback",
    "netns-only": "a PID's user namespace is joined when it differs from ours",
    "runas": "guestnet keeps the user it runs as",
    "dns": "the namespace's resolver is its own to configure",
    "search": "the namespace's resolver is its own to configure",
    "mac-addr": "guestnet keeps its own gateway MAC",
    "outbound": "not in pasta mode",
    "outbound-if4": "not in pasta mode",
    "outbound-if6": "not in pasta mode",
    "interface": "guestnet does not copy a host interface",
    "fd": "guestnet makes its own TAP",
    "ipv6-only": "guestnet keeps IPv4 on",
}
#: Accepted silently: logging detail, and what guestnet does (or leaves) anyway.
_QUIET = {
    "debug",
    "trace",
    "log-size",
    "dhcp-dns",
    "dhcp-search",
    "no-copy-routes",
    "no-copy-addrs",
    "no-tcp",
    "no-udp",
    "no-icmp",
    "no-dhcp",
    "no-ndp",
    "no-dhcpv6",
    "no-ra",
}


@dataclass
class Options:
    """pasta's command line, parsed."""

    addr: AddressOptions = field(default_factory=AddressOptions)
    config_net: bool = False
    netns: str | None = None
    userns: str | None = None
    target_pid: int | None = None
    command: list[str] = field(default_factory=list)
    ifname: str = DEFAULT_IFNAME
    ns_mac: bytes | None = None
    quiet: bool = False
    stderr: bool = False
    foreground: bool = False
    pid_file: str | None = None
    log_file: str | None = None
    no_netns_quit: bool = False
    tcp_ns: list[PortSpec] = field(default_factory=list)
    udp_ns: list[PortSpec] = field(default_factory=list)
    debug: bool = False
    #: Notes on what was accepted and has no effect (printed unless --quiet).
    notes: list[str] = field(default_factory=list)

    @property
    def target(self) -> str | None:
        """What :meth:`Network.attach_netns` takes; None in command mode."""
        if self.netns is not None:
            return self.netns
        return str(self.target_pid) if self.target_pid is not None else None


def usage(prog: str) -> str:
    return f"""Usage: {prog} [OPTION]... [COMMAND] [ARGS]...
       {prog} [OPTION]... PID
       {prog} [OPTION]... --netns [PATH|NAME]
guestnet {__version__} in pasta mode: connect a network namespace to the host's network.

  -q, --quiet              Don't print informational messages
  -f, --foreground         Don't run in background
  -e, --stderr             Log to stderr too (until the daemon detaches)
  -l, --log-file PATH      Log (only) to given file
  -P, --pid FILE           Write own PID to the given file
  -I, --ns-ifname NAME     namespace interface name (default: {DEFAULT_IFNAME})
  -p, --pcap FILE          Log tap-facing traffic to pcap file
  -m, --mtu MTU            MTU of the interface (default: 65520)
  -a, --address ADDR       Assign IPv4 or IPv6 address ADDR (default: 10.0.2.15, fd00::15)
  -n, --netmask MASK       IPv4 MASK, dot-decimal or bits (default: 24, or the address class)
  -g, --gateway ADDR       IPv4 or IPv6 gateway (default: subnet + 2)
  --dns-forward ADDR       Answer DNS queries sent to ADDR (default: subnet + 3)
  --no-map-gw              Don't map gateway address to host
  -4, --ipv4-only          Enable IPv4 operation only
  -t, --tcp-ports SPEC     TCP port forwarding to namespace: none, auto (forwards
                           nothing in guestnet), or [ADDR[%IF]/]PORTS[:PORTS],...
  -u, --udp-ports SPEC     UDP port forwarding to namespace, as -t
  -T, --tcp-ns SPEC        accepted, no effect (no namespace-to-host forwarding)
  -U, --udp-ns SPEC        accepted, no effect
  --userns NSPATH          Target user namespace to join
  --netns PATH|NAME        Target network namespace to join
  --no-netns-quit          Don't quit if the target network namespace is deleted
  --config-net             Configure tap interface in namespace
  --ns-mac-addr ADDR       Set MAC address on tap interface
  -h, --help               Display this help message and exit
  --version                Show version and exit
"""


def parse_args(prog: str, args: Sequence[str]) -> Options:
    """pasta's argv; OptionExit for -h, --version and every error (one line)."""
    opts, operands = getopt_long(prog, args, TABLE, stop_at_operand=True)
    o = Options()
    for name, value in opts:
        _apply(prog, o, name, value or "")
    if o.addr.ipv4_only and o.addr.ipv6_only:
        raise fail("Options ipv4-only and ipv6-only are mutually exclusive")
    if o.netns is not None and operands:
        raise fail("Both --netns and PID or command given")
    if len(operands) == 1 and operands[0].isdigit() and o.netns is None:
        if int(operands[0]) <= 0:
            raise fail(f"Invalid PID {operands[0]}")
        o.target_pid = int(operands[0])
    elif operands:
        o.command = list(operands)
    elif o.netns is None:
        o.command = [os.environ.get("SHELL") or "/bin/sh"]
    if o.command:
        o.foreground = True
    _note_specs(o)
    return o


def _apply(prog: str, o: Options, name: str, v: str) -> None:
    """One option onto ``o``."""
    a = o.addr
    if name == "help":
        raise OptionExit(0, out=usage(prog))
    if name == "version":
        raise OptionExit(0, out=f"pasta (guestnet {__version__})\n")
    if name in ("tcp-ports", "udp-ports", "tcp-ns", "udp-ns"):
        try:
            spec = parse_port_spec(v)
        except ValueError as exc:
            raise fail(str(exc)) from None
        {"tcp-ports": a.tcp, "udp-ports": a.udp, "tcp-ns": o.tcp_ns, "udp-ns": o.udp_ns}[
            name
        ].append(spec)
    elif name in _IGNORED:
        o.notes.append(f"--{name} {v}".rstrip() + f": ignored ({_IGNORED[name]})")
        if name == "ipv6-only":
            a.ipv6_only = True
    elif name in _QUIET:
        o.debug = o.debug or name in ("debug", "trace")
    else:
        _apply_value(o, name, v)


def _apply_value(o: Options, name: str, v: str) -> None:
    if o.addr.apply(name, v):
        return
    if name == "quiet":
        o.quiet = True
    elif name == "foreground":
        o.foreground = True
    elif name == "stderr":
        o.stderr = True
    elif name == "log-file":
        o.log_file = os.path.abspath(v)
    elif name == "pid":
        o.pid_file = os.path.abspath(v)
    elif name == "ns-ifname":
        try:
            o.ifname = check_ifname(v)
        except ValueError:
            raise fail(f"Invalid interface name: {v}") from None
    elif name == "ns-mac-addr":
        o.ns_mac = parse_mac_option(v)
    elif name == "userns":
        o.userns = v
    elif name == "netns":
        o.netns = v
    elif name == "no-netns-quit":
        o.no_netns_quit = True
    elif name == "config-net":
        o.config_net = True


def _note_specs(o: Options) -> None:
    auto = "guestnet does not follow the namespace's bound ports; list them instead"
    o.notes += spec_notes("-t", o.addr.tcp, auto) + spec_notes("-u", o.addr.udp, auto)
    for option, specs in (("-T", o.tcp_ns), ("-U", o.udp_ns)):
        if any(s.mode != "none" for s in specs):
            o.notes.append(f"{option}: ignored (guestnet has no namespace-to-host forwarding)")


def config_from_options(o: Options) -> Config:
    """The :class:`Config` the options ask for; OptionExit with a one-line message."""
    extra: dict[str, object] = {}
    if o.ns_mac is not None:
        extra["guest_mac"] = o.ns_mac
    return build_config(o.addr, **extra)


def banner(o: Options, config: Config) -> str:
    """What guestnet tells the caller (unless --quiet) once the namespace is served."""
    lines = [
        f"guestnet {__version__} (pasta mode): {o.ifname} in {o.target or 'a new namespace'}",
        f"    address {config.guest_ip}/{config.subnet.prefixlen}, gateway {config.gateway}, "
        f"DNS {config.dns_ip}, MTU {config.mtu}",
    ]
    if config.ipv6:
        lines.append(
            f"    IPv6 {config.guest_ip6}/{config.ipv6_prefix.prefixlen}, "
            f"gateway {config.gateway6}, DNS {config.dns_ip6}"
        )
    for proto, host, host_port, guest_port, *_guest in config.publish:
        lines.append(f"    {proto} {host}:{host_port} -> {guest_port}")
    return "\n".join(lines) + "\n"


# -- running -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``guestnet-pasta``, ``guestnet pasta`` and a ``pasta`` symlink."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = os.path.basename(sys.argv[0]) or "pasta"
    try:
        o = parse_args(prog, argv)
        config = config_from_options(o)
    except OptionExit as exc:
        sys.stderr.write(exc.err)
        sys.stdout.write(exc.out)
        sys.stdout.flush()
        return exc.status
    logging.basicConfig(
        level=logging.DEBUG if o.debug else logging.WARNING,
        stream=sys.stderr,
        format="guestnet: %(levelname)s: %(message)s",
    )
    if not o.quiet:
        for note in o.notes:
            print(f"{prog}: {note}", file=sys.stderr)
    if o.command:
        return run_command(o, config)
    return run(o, config)


def run(o: Options, config: Config) -> int:
    """Serve the namespace; not in the foreground, as a daemon once it is configured."""
    target = o.target
    assert target is not None
    daemon = None if o.foreground else Daemon()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    net = Network(config)
    try:
        try:
            link = net.attach_netns(
                target, ifname=o.ifname, configure=o.config_net, userns=o.userns,
                userns_optional=True,
            )  # fmt: skip
        except (ValueError, HelperError, OSError) as exc:
            print(f"Couldn't set up {o.ifname} in {target}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            net.start_services()
        except StartError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILURE
        gone = [False]
        try:
            if not o.no_netns_quit:
                watch_netns(net, target, lambda: _stop(net, gone))
            write_pid_file(o.pid_file)
        except (ValueError, OSError) as exc:
            print(f"{target}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if not o.quiet:
            sys.stderr.write(banner(o, config))
        if o.log_file is not None:
            log_to_file(o.log_file)
        if daemon is not None:
            daemon.ready()
        net.loop.install_signal_handlers()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        net.run(until=lambda: link.closed or gone[0])
        if gone[0]:
            log.info("the namespace went away: exiting")
        return 0
    finally:
        net.close()


def _stop(net: Network, gone: list[bool]) -> None:
    gone[0] = True
    net.loop.stop()


def run_command(o: Options, config: Config) -> int:
    """pasta COMMAND: run it in new namespaces served by guestnet; its status is ours."""
    net = Network(config)
    try:
        try:
            child = net.spawn(o.command, ifname=o.ifname)
            net.start_services()
        except (ValueError, HelperError, OSError) as exc:
            print(f"Couldn't run {o.command[0]}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except StartError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILURE
        try:
            write_pid_file(o.pid_file)
        except OSError as exc:
            print(f"{o.pid_file}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        net.loop.install_signal_handlers()
        net.run(until=lambda: child.returncode is not None)
        code = child.returncode
        if code is None:
            child.send_signal(signal.SIGTERM)
            return EXIT_FAILURE
        return code if code >= 0 else 128 - code
    finally:
        net.close()


def console_main() -> int:
    """``guestnet-pasta``."""
    return main()
