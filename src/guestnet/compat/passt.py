"""passt mode: guestnet started by libvirt, or by hand for QEMU, as ``passt``.

Theory of operation
-------------------
``passt [OPTION]...`` is parsed as passt parses it (:mod:`guestnet.compat.passt_common`) and
mapped onto :class:`~guestnet.network.Network` serving QEMU's ``-netdev stream`` on a unix
socket (``Network.listen_qemu``); nothing here moves a packet:

- ``-s/--socket PATH``: the socket (default: the first free ``/tmp/passt_N.socket``, as passt
  probes); once it listens, the QEMU arguments to use are printed (unless ``-q``), as passt
  prints them;
- addresses: ``-a/-n/-g`` when given, guestnet's defaults otherwise (passt copies the host's);
  DHCP hands out the ``-a`` address; ``-m/--mtu``; ``-4``; ``--no-map-gw``; ``--dns-forward``;
  ``-p/--pcap``;
- ``-t/-u`` specs publish host ports into the guest (``all`` is noted and forwards nothing:
  guestnet forwards the ports listed);
- not in the foreground (``-f``), the process forks and the parent exits 0 once the socket
  listens (libvirt waits for that before starting QEMU); the daemon drops the caller's
  stdin/stdout/stderr; ``-P/--pid`` gets its PID, ``-l/--log-file`` its log;
- ``-1/--one-off``: exit once the guest that connected has disconnected.

``-M/--mac-addr`` is passt's own MAC; libvirt 9 passes the guest's there (newer libvirt no
longer passes it), so guestnet accepts it and keeps its own gateway MAC, noting it. Also
accepted and noted: ``-i/--interface``, ``-D/--dns``, ``-S/--search``, ``--runas``,
``-o/--outbound*``, ``-6/--ipv6-only``, ``-F/--fd``. Unknown options: one line, status 1.
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
    build_config,
    fail,
    getopt_long,
    log_to_file,
    parse_mac_option,
    parse_port_spec,
    spec_notes,
    write_pid_file,
)
from guestnet.config import Config
from guestnet.io.netns import STOP_SIGNALS
from guestnet.network import Network, StartError

log = logging.getLogger("guestnet")

#: passt probes /tmp/passt_1.socket, _2, ... for a free path.
SOCKET_TEMPLATE = "/tmp/passt_{}.socket"
SOCKET_PROBES = 64

_LONG: dict[str, bool] = {
    **SHARED_LONG,
    "socket": True,
    "no-dhcp-dns": False,
    "no-dhcp-search": False,
    "one-off": False,
}
_SHORT: dict[str, str] = {
    **SHARED_SHORT,
    "s": "socket",
    "1": "one-off",
}
TABLE = OptionTable(_SHORT, _LONG)

_IGNORED = {
    "mac-addr": "guestnet keeps its own gateway MAC and learns the guest's from its frames",
    "interface": "guestnet does not copy a host interface",
    "dns": "guestnet hands out its own DNS address",
    "search": "guestnet hands out no search list in passt mode",
    "runas": "guestnet keeps the user it runs as",
    "outbound": "not in passt mode",
    "outbound-if4": "not in passt mode",
    "outbound-if6": "not in passt mode",
    "fd": "guestnet listens on its socket",
    "ipv6-only": "guestnet keeps IPv4 on",
}
_QUIET = {
    "debug",
    "trace",
    "stderr",
    "log-size",
    "no-dhcp-dns",
    "no-dhcp-search",
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
    """passt's command line, parsed."""

    addr: AddressOptions = field(default_factory=AddressOptions)
    socket: str | None = None
    one_off: bool = False
    quiet: bool = False
    foreground: bool = False
    pid_file: str | None = None
    log_file: str | None = None
    mac_addr: bytes | None = None
    debug: bool = False
    notes: list[str] = field(default_factory=list)


def usage(prog: str) -> str:
    return f"""Usage: {prog} [OPTION]...
guestnet {__version__} in passt mode: a QEMU guest's network over a unix stream socket.

  -q, --quiet              Don't print informational messages
  -f, --foreground         Don't run in background
  -l, --log-file PATH      Log (only) to given file
  -P, --pid FILE           Write own PID to the given file
  -s, --socket PATH        UNIX domain socket path
    default: probe free path starting from {SOCKET_TEMPLATE.format(1)}
  -p, --pcap FILE          Log tap-facing traffic to pcap file
  -m, --mtu MTU            Assign MTU via DHCP (default: 65520)
  -a, --address ADDR       Assign IPv4 or IPv6 address ADDR (default: 10.0.2.15, fd00::15)
  -n, --netmask MASK       IPv4 MASK, dot-decimal or bits (default: 24, or the address class)
  -g, --gateway ADDR       IPv4 or IPv6 gateway (default: subnet + 2)
  --dns-forward ADDR       Answer DNS queries sent to ADDR (default: subnet + 3)
  --no-map-gw              Don't map gateway address to host
  -4, --ipv4-only          Enable IPv4 operation only
  -1, --one-off            Quit after handling one single client
  -t, --tcp-ports SPEC     TCP port forwarding to guest: none, or [ADDR[%IF]/]PORTS[:PORTS],...
  -u, --udp-ports SPEC     UDP port forwarding to guest, as -t
  -h, --help               Display this help message and exit
  --version                Show version and exit
"""


def parse_args(prog: str, args: Sequence[str]) -> Options:
    """passt's argv; OptionExit for -h, --version and every error (one line)."""
    opts, operands = getopt_long(prog, args, TABLE, stop_at_operand=False)
    if operands:
        raise fail(f"{prog}: extra non-option argument '{operands[0]}'")
    o = Options()
    a = o.addr
    for name, value in opts:
        v = value or ""
        if name == "help":
            raise OptionExit(0, out=usage(prog))
        if name == "version":
            raise OptionExit(0, out=f"passt (guestnet {__version__})\n")
        if name in ("tcp-ports", "udp-ports"):
            try:
                (a.tcp if name == "tcp-ports" else a.udp).append(parse_port_spec(v))
            except ValueError as exc:
                raise fail(str(exc)) from None
        elif name in _IGNORED:
            o.notes.append(f"--{name} {v}".rstrip() + f": ignored ({_IGNORED[name]})")
            if name == "mac-addr":
                o.mac_addr = parse_mac_option(v)
        elif name in _QUIET:
            o.debug = o.debug or name in ("debug", "trace")
        else:
            _apply_value(o, name, v)
    if a.ipv4_only and "ipv6-only" in (n for n, _ in opts):
        raise fail("Options ipv4-only and ipv6-only are mutually exclusive")
    why = "guestnet forwards the ports listed only"
    o.notes += spec_notes("-t", a.tcp, why) + spec_notes("-u", a.udp, why)
    return o


def _apply_value(o: Options, name: str, v: str) -> None:
    if o.addr.apply(name, v):
        return
    if name == "quiet":
        o.quiet = True
    elif name == "foreground":
        o.foreground = True
    elif name == "log-file":
        o.log_file = os.path.abspath(v)
    elif name == "pid":
        o.pid_file = os.path.abspath(v)
    elif name == "socket":
        o.socket = os.path.abspath(v)
    elif name == "one-off":
        o.one_off = True


def free_socket_path() -> str:
    """passt's default: the first ``/tmp/passt_N.socket`` that does not exist."""
    for n in range(1, SOCKET_PROBES + 1):
        path = SOCKET_TEMPLATE.format(n)
        if not os.path.lexists(path):
            return path
    raise fail("No free socket path found under /tmp")


def qemu_hint(qemu_args: str) -> str:
    """What passt prints once the socket listens: the QEMU command line to use."""
    return (
        f"\nYou can now start qemu (>= 7.2, with commit 13c6be96618c):\n    kvm ... {qemu_args}\n"
    )


# -- running -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``guestnet-passt``, ``guestnet passt`` and a ``passt`` symlink."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = os.path.basename(sys.argv[0]) or "passt"
    try:
        o = parse_args(prog, argv)
        config = build_config(o.addr)
        if o.socket is None:
            o.socket = free_socket_path()
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
    if o.log_file is not None:
        log_to_file(o.log_file)
    if not o.quiet:
        for note in o.notes:
            _say(o, f"{prog}: {note}")
    return run(o, config)


def _say(o: Options, text: str) -> None:
    """Informational text: into the log file when there is one (passt logs only there), else
    on stderr."""
    if o.log_file is not None:
        for line in text.strip("\n").splitlines():
            log.warning("%s", line)
    else:
        print(text, file=sys.stderr, flush=True)


def run(o: Options, config: Config) -> int:
    """Listen on the socket; not in the foreground, as a daemon once it listens."""
    assert o.socket is not None
    daemon = None if o.foreground else Daemon()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    net = Network(config)
    try:
        try:
            qemu_args = net.listen_qemu(o.socket)
        except OSError as exc:
            print(f"Failed to bind UNIX domain socket {o.socket}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            net.start_services()
        except StartError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILURE
        try:
            write_pid_file(o.pid_file)
        except OSError as exc:
            print(f"{o.pid_file}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if not o.quiet:
            _say(o, qemu_hint(qemu_args))
        if daemon is not None:
            daemon.ready()
        net.loop.install_signal_handlers()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        links = net.instance.hub.links
        seen = [False]

        def guest_gone() -> bool:
            if links:
                seen[0] = True
            return o.one_off and seen[0] and not links

        net.run(until=guest_gone)
        return 0
    finally:
        net.close()


def console_main() -> int:
    """``guestnet-passt``."""
    return main()
