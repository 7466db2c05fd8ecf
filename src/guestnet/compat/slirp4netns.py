"""slirp4netns mode: guestnet started by podman, rootlesskit or a script as ``slirp4netns``.

Theory of operation
-------------------
``slirp4netns [OPTION]... PID|PATH [TAPNAME]`` is parsed as slirp4netns 1.2/1.3 parses it:
getopt_long with the short options ``ce:r:m:a:6hv``, long options as ``--opt=value`` or
``--opt value`` and unambiguous abbreviations, options and operands in any order (GNU
permutation; ``--`` ends the options), glibc's messages for bad options, and slirp4netns's own
messages, its usage text on stdout and exit status 1 for bad values. Warnings go to stdout, as
slirp4netns prints them.

The options map onto guestnet's :class:`~guestnet.config.Config` and
:class:`~guestnet.network.Network`; nothing here moves a packet:

- ``--cidr`` (default 10.0.2.0/24): gateway CIDR+2 (guestnet's MAC 52:55 + that address, as
  slirp's), DNS CIDR+3, guest CIDR+100 (``--configure`` sets it, with a default route via
  the gateway; DHCP hands it out first too);
- PID mode joins ``/proc/PID/ns/user`` when it differs from ours (a failure is ignored, as
  slirp4netns ignores it) and ``/proc/PID/ns/net``; ``--netns-type=path`` joins the path and
  ``--userns-path`` when given. A TAP that already exists (rootlesskit made ``tap0``) is opened
  and served as it is, unless ``-c`` asks to configure it;
- ``--disable-host-loopback``: guestnet's ``no_host_loopback``, with a TCP connect to the
  gateway answered by ICMP network unreachable (``host_loopback_unreachable``); ``--disable-dns``:
  nothing answers DNS; ``--outbound-addr``: NAT host sockets bind to that address (or the
  interface's); ``--macaddress``: the TAP's MAC with ``-c``;
- ``-a/--api-socket``: slirp4netns's JSON protocol (:mod:`guestnet.compat.slirp_api`) on
  guestnet's forward registry; guestnet's own control API can be served beside it with
  ``--guestnet-api-socket PATH`` (or ``GUESTNET_API_SOCKET``), where ``guestnet forward ls``
  sees the same forwards;
- ``-r/--ready-fd``: ``1`` is written and the fd closed once the TAP is served and the API
  socket bound; ``-e/--exit-fd``: the loop ends when the fd reports POLLHUP; SIGTERM and SIGINT
  end it too, and everything is closed on the way out. guestnet keeps no child process, so
  SIGKILL leaves none behind either.

``-6/--enable-ipv6`` turns on guestnet's IPv6 on slirp4netns's addresses (router
advertisements for fd00::/64, gateway fd00::2, DNS fd00::3); without it the guest link is
IPv4 only, as with slirp4netns. ``--enable-sandbox`` is guestnet's ``--sandbox`` and
``--enable-seccomp`` its ``--seccomp`` (:mod:`guestnet.io.harden`), applied as slirp4netns
applies them: after the TAP, the API socket and the exit fd are set up, before ``1`` is written
on the ready fd; not root, guestnet first joins the target's user namespace (``--userns-path``,
or the PID's), as slirp4netns does. Both are listed in ``--help``. Not available yet, accepted
with a warning on stdout: ``--outbound-addr6``.
Refused: ``--target-type=bess`` and ``--netns-type=tapfd``, and an MTU below 576.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from guestnet import __version__
from guestnet.compat.passt_common import OptionExit, OptionTable
from guestnet.compat.passt_common import getopt_long as shared_getopt_long
from guestnet.compat.slirp_api import SlirpApi, SlirpApiServer
from guestnet.config import MIN_MTU, Config, parse_mac
from guestnet.io.harden import Hardening
from guestnet.io.host import interface_ipv4
from guestnet.io.loop import EPOLLHUP
from guestnet.io.netns import STOP_SIGNALS, HelperError
from guestnet.network import Network, StartError

log = logging.getLogger("guestnet")

EXIT_FAILURE = 1
DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_MTU = 1500
#: slirp4netns's largest MTU.
MAX_MTU = 65521
GATEWAY_OFFSET = 2
DNS_OFFSET = 3
GUEST_OFFSET = 100
PREFIX_MIN = 1
PREFIX_MAX = 25
#: The slirp4netns release whose interface this mode follows.
SLIRP4NETNS_VERSION = "1.2.0"
#: libslirp configuration levels whose features guestnet has: 1 (base), 2 (outbound address;
#: IPv4 only until IPv6 lands), 3 (disable DNS). Tools gate --outbound-addr (>= 2) and
#: --disable-dns (>= 3) on it.
SLIRP_CONFIG_VERSION_MAX = 3

#: Long options: name -> takes an argument.
_LONG: dict[str, bool] = {
    "configure": False,
    "exit-fd": True,
    "ready-fd": True,
    "mtu": True,
    "cidr": True,
    "disable-host-loopback": False,
    "no-host-loopback": False,
    "netns-type": True,
    "userns-path": True,
    "api-socket": True,
    "enable-ipv6": False,
    "enable-sandbox": False,
    "create-sandbox": False,
    "enable-seccomp": False,
    "help": False,
    "version": False,
    "outbound-addr": True,
    "outbound-addr6": True,
    "disable-dns": False,
    "macaddress": True,
    "target-type": True,
    # guestnet's own: its control API (HTTP + JSON) beside slirp4netns's.
    "guestnet-api-socket": True,
}
#: Short option -> the long option it stands for.
_SHORT_LONG = {
    "c": "configure",
    "e": "exit-fd",
    "r": "ready-fd",
    "m": "mtu",
    "a": "api-socket",
    "6": "enable-ipv6",
    "h": "help",
    "v": "version",
}


#: Leave with ``status``, after ``out`` on stdout and ``err`` on stderr (the compat modes'
#: one exit exception).
SlirpExit = OptionExit

TABLE = OptionTable(_SHORT_LONG, _LONG)


def getopt_long(prog: str, args: Sequence[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split ``args`` into ([(long name, value)], operands) as glibc's getopt_long does (options
    and operands in any order); SlirpExit with glibc's message for a bad option."""
    return shared_getopt_long(prog, args, TABLE, stop_at_operand=False)


# -- options -------------------------------------------------------------------------------------


@dataclass
class Options:
    """slirp4netns's command line, parsed."""

    configure: bool = False
    exit_fd: int = -1
    ready_fd: int = -1
    mtu: int = DEFAULT_MTU
    cidr: str | None = None
    disable_host_loopback: bool = False
    netns_type: str | None = None
    userns_path: str | None = None
    api_socket: str | None = None
    enable_ipv6: bool = False
    enable_sandbox: bool = False
    enable_seccomp: bool = False
    outbound_addr: str | None = None
    outbound_addr6: str | None = None
    disable_dns: bool = False
    macaddress: str | None = None
    target_type: str | None = None
    guestnet_api_socket: str | None = None
    #: PID mode: the target process.
    target_pid: int | None = None
    #: Path mode: the network namespace.
    netns_path: str | None = None
    tapname: str = "tap0"
    #: What slirp4netns prints on stdout while parsing (warnings).
    warnings: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        """What :meth:`guestnet.network.Network.attach_netns` takes."""
        return self.netns_path if self.netns_path is not None else str(self.target_pid)

    def hardening(self) -> Hardening:
        """``--enable-sandbox`` and ``--enable-seccomp`` as guestnet's ``--sandbox`` and
        ``--seccomp``; the user namespace a non-root sandbox joins is the target's."""
        userns = self.userns_path
        if userns is None and self.target_pid is not None:
            userns = f"/proc/{self.target_pid}/ns/user"
        return Hardening(sandbox=self.enable_sandbox, seccomp=self.enable_seccomp, userns=userns)


#: slirp4netns's own line, one line as it prints it.
_SANDBOX_HELP = (
    "--enable-sandbox         create a new mount namespace (and drop all caps except "
    "CAP_NET_BIND_SERVICE if running as the root)"
)


def usage(prog: str) -> str:
    """``--help``: what tools look for, and no option that is not real yet."""
    return f"""Usage: {prog} [OPTION]... PID|PATH [TAPNAME]
User-mode networking for unprivileged network namespaces (guestnet {__version__}, slirp4netns mode).

-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating slirp4netns
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default={DEFAULT_MTU}, max={MAX_MTU})
-6, --enable-ipv6        enable IPv6 (router advertisements for fd00::/64)
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default={DEFAULT_CIDR})
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
{_SANDBOX_HELP}
--enable-seccomp         enable seccomp to limit syscalls
--outbound-addr=IPv4     sets outbound ipv4 address to bound to
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
--target-type=TYPE       specify the target type ([netns], default=netns)
--guestnet-api-socket=PATH  also serve guestnet's control API (HTTP + JSON) on PATH
-h, --help               show this help and exit
-v, --version            show version and exit
"""


def version_text() -> str:
    """``--version``, in slirp4netns's machine-readable shape."""
    return (
        f"slirp4netns version {SLIRP4NETNS_VERSION}+guestnet-{__version__}\n"
        f"commit: guestnet {__version__}\n"
        f"libslirp: guestnet {__version__}\n"
        f"SLIRP_CONFIG_VERSION_MAX: {SLIRP_CONFIG_VERSION_MAX}\n"
    )


def _fd(value: str, what: str) -> int:
    if re.fullmatch(r"[ \t]*[+-]?\d+", value) is None or int(value) < 0:
        raise SlirpExit(EXIT_FAILURE, err=f"{what} must be a non-negative integer\n")
    return int(value)


def parse_args(prog: str, args: Sequence[str]) -> Options:
    """slirp4netns's argv; SlirpExit for -h, -v and every error (with usage on stdout)."""
    try:
        return _parse(prog, args)
    except SlirpExit as exc:
        if exc.status != 0:
            exc.out = exc.out + usage(prog)
        raise


def _parse(prog: str, args: Sequence[str]) -> Options:
    opts, operands = getopt_long(prog, args)
    o = Options()
    for name, value in opts:
        v = value or ""
        if name == "configure":
            o.configure = True
        elif name == "exit-fd":
            o.exit_fd = _fd(v, "exit-fd")
        elif name == "ready-fd":
            o.ready_fd = _fd(v, "ready-fd")
        elif name == "mtu":
            if re.fullmatch(r"[ \t]*[+-]?\d+", v) is None or not 0 < int(v) <= MAX_MTU:
                raise SlirpExit(
                    EXIT_FAILURE, err=f"MTU must be a positive integer (< {MAX_MTU + 1})\n"
                )
            o.mtu = int(v)
        elif name == "cidr":
            o.cidr = v
        elif name in ("disable-host-loopback", "no-host-loopback"):
            if name == "no-host-loopback":
                o.warnings.append(
                    "WARNING: --no-host-loopback is deprecated and will be removed in future "
                    "releases, please use --disable-host-loopback instead."
                )
            o.disable_host_loopback = True
        elif name in ("enable-sandbox", "create-sandbox"):
            if name == "create-sandbox":
                o.warnings.append(
                    "WARNING: --create-sandbox is deprecated and will be removed in future "
                    "releases, please use --enable-sandbox instead."
                )
            o.enable_sandbox = True
        elif name == "enable-seccomp":
            o.enable_seccomp = True
        elif name == "netns-type":
            o.netns_type = v
        elif name == "userns-path":
            if not os.path.exists(v):
                raise SlirpExit(EXIT_FAILURE, err=f"userns path doesn't exist: {v}\n")
            o.userns_path = v
        elif name == "api-socket":
            o.api_socket = v
        elif name == "enable-ipv6":
            o.enable_ipv6 = True
        elif name == "help":
            raise SlirpExit(0, out=usage(prog))
        elif name == "version":
            raise SlirpExit(0, out=version_text())
        elif name == "outbound-addr":
            o.outbound_addr = v
        elif name == "outbound-addr6":
            o.warnings.append(
                "WARNING: --outbound-addr6 is not available in guestnet yet: it is ignored"
            )
            o.outbound_addr6 = v
        elif name == "disable-dns":
            o.disable_dns = True
        elif name == "macaddress":
            o.macaddress = v
        elif name == "target-type":
            o.target_type = v
        elif name == "guestnet-api-socket":
            o.guestnet_api_socket = v
    if o.macaddress is not None and not o.configure:
        raise SlirpExit(
            EXIT_FAILURE,
            err="--macaddr cannot be specified when --configure or -c is not specified\n",
        )
    if o.target_type == "bess":
        raise SlirpExit(EXIT_FAILURE, err="--target-type=bess is not supported by guestnet\n")
    if o.target_type is not None and o.target_type != "netns":
        raise SlirpExit(EXIT_FAILURE, err='--target-type must be either "netns" or "bess"\n')
    if not operands:
        raise SlirpExit(EXIT_FAILURE)
    if o.netns_type is None or o.netns_type == "pid":
        pid = operands[0]
        if re.fullmatch(r"[ \t]*[+-]?\d+", pid) is None or int(pid) <= 0:
            raise SlirpExit(EXIT_FAILURE, err="PID must be a positive integer\n")
        o.target_pid = int(pid)
    elif o.netns_type == "tapfd":
        raise SlirpExit(EXIT_FAILURE, err="--netns-type=tapfd is not supported by guestnet\n")
    else:
        o.netns_path = operands[0]
        if not os.path.exists(o.netns_path):
            raise SlirpExit(
                EXIT_FAILURE,
                err="existing path expected when --netns-type=path: No such file or directory\n",
            )
    if len(operands) < 2:
        raise SlirpExit(EXIT_FAILURE)
    if len(operands) > 2:
        o.warnings.append("WARNING: too many arguments")
    o.tapname = operands[1]
    return o


# -- configuration -------------------------------------------------------------------------------


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """``--cidr``: a network address with a prefix of 1 to 25; ValueError with slirp's message."""
    m = re.fullmatch(r"((?:[0-9]{1,3}\.){3}[0-9]{1,3})/([0-9]{1,2})", text)
    if m is None:
        raise ValueError(f"invalid CIDR: {text}")
    try:
        address = ipaddress.IPv4Address(m.group(1))
    except ValueError:
        raise ValueError(f"invalid network address: {m.group(1)}") from None
    prefix = int(m.group(2))
    if not PREFIX_MIN <= prefix <= PREFIX_MAX:
        raise ValueError(f"prefix length needs to be {PREFIX_MIN}-{PREFIX_MAX}")
    network = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
    if network.network_address != address:
        raise ValueError(
            "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"
        )
    return network


def config_from_options(o: Options) -> Config:
    """The :class:`Config` the options ask for; ValueError with slirp4netns's message."""
    net = parse_cidr(o.cidr if o.cidr is not None else DEFAULT_CIDR)
    base = net.network_address
    gateway = base + GATEWAY_OFFSET
    outbound: str | None = None
    if o.outbound_addr is not None:
        try:
            outbound = str(ipaddress.IPv4Address(o.outbound_addr))
        except ValueError:
            outbound = interface_ipv4(o.outbound_addr)
        if outbound is None:
            raise ValueError("outbound-addr has to be valid ipv4 address or interface name.")
    guest_mac = Config().guest_mac
    if o.macaddress is not None:
        try:
            guest_mac = parse_mac(o.macaddress)
        except ValueError:
            raise ValueError(
                f'"{o.macaddress}" is an invalid MAC address.\n'
                "macaddress has to be a valid MAC address (hex string, 6 bytes, each byte "
                "separated by a ':')."
            ) from None
    if o.mtu < MIN_MTU:
        raise ValueError(f"MTU must be at least {MIN_MTU} with guestnet")
    return Config(
        subnet=net,
        gateway=gateway,
        dns_ip=base + DNS_OFFSET,
        guest_ip=base + GUEST_OFFSET,
        mtu=o.mtu,
        mac=b"\x52\x55" + gateway.packed,
        guest_mac=guest_mac,
        no_host_loopback=o.disable_host_loopback,
        host_loopback_unreachable=o.disable_host_loopback,
        dns=not o.disable_dns,
        outbound_addr=outbound,
        api_socket=_abspath(o.guestnet_api_socket or os.environ.get("GUESTNET_API_SOCKET")),
        # slirp4netns speaks IPv6 only with --enable-ipv6 (fd00::/64, ::2, ::3: our defaults).
        ipv6=o.enable_ipv6,
    )


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def banner(o: Options, config: Config) -> str:
    """What slirp4netns prints once it runs: the addresses the guest should use."""
    net = config.subnet
    lines = [
        "Starting slirp (guestnet)",
        f"* MTU:             {config.mtu}",
        f"* Network:         {net.network_address}",
        f"* Netmask:         {net.netmask}",
        f"* Gateway:         {config.gateway}",
        f"* DNS:             {config.dns_ip}" + (" (disabled)" if not config.dns else ""),
        f"* Recommended IP:  {config.guest_ip}",
    ]
    if o.api_socket is not None:
        lines.append(f"* API Socket:      {o.api_socket}")
    if config.outbound_addr is not None:
        lines.append(f"* Outbound IPv4:    {config.outbound_addr}")
    if o.macaddress is not None:
        lines.append(f"* MAC address:     {config.guest_mac.hex(':')}")
    if not o.disable_host_loopback:
        lines.append(
            f"WARNING: 127.0.0.1:* on the host is accessible as {config.gateway} (set "
            "--disable-host-loopback to prohibit connecting to 127.0.0.1:*)"
        )
    return "\n".join(lines) + "\n"


# -- running -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``guestnet-slirp4netns``, ``guestnet slirp4netns`` and a ``slirp4netns``
    symlink."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = sys.argv[0] or "slirp4netns"
    try:
        o = parse_args(prog, argv)
        for line in o.warnings:
            print(line, flush=True)
        config = config_from_options(o)
    except SlirpExit as exc:
        sys.stderr.write(exc.err)
        sys.stdout.write(exc.out)
        sys.stdout.flush()
        return exc.status
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="guestnet: %(levelname)s: %(message)s"
    )
    return run(o, config)


def run(o: Options, config: Config) -> int:
    """Attach the TAP, bind the API socket(s), say ready, serve until told to stop."""
    # Held back until the loop handles them: a SIGTERM during set-up still closes cleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    net = Network(config)
    try:
        try:
            link = net.attach_netns(
                o.target,
                ifname=o.tapname,
                configure=o.configure,
                userns=o.userns_path,
                userns_optional=True,
                adopt_existing=not o.configure,
            )
        except (ValueError, HelperError, OSError) as exc:
            print(f"cannot open {o.tapname} in {o.target}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            net.start_services()
        except StartError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILURE
        if o.api_socket is not None:
            try:
                server = _serve_api(net, config, o.api_socket)
            except OSError as exc:
                print(f"api_bindlisten: {o.api_socket}: {exc.strerror or exc}", file=sys.stderr)
                return EXIT_FAILURE
            net.instance.on_close(server.close)
        hup = [False]
        if o.exit_fd >= 0:
            try:
                _watch_exit_fd(net, o.exit_fd, hup)
            except OSError as exc:
                print(f"exit-fd {o.exit_fd}: {exc.strerror or exc}", file=sys.stderr)
                return EXIT_FAILURE
        net.loop.install_signal_handlers()  # its wake-up pipe is made before seccomp
        hardening = o.hardening()
        if hardening:
            try:
                net.harden(hardening)
            except OSError as exc:
                what = "create_sandbox" if o.enable_sandbox else "enable_seccomp"
                print(f"{what} failed: {exc}", file=sys.stderr)
                return EXIT_FAILURE
        if o.ready_fd >= 0:
            _say_ready(o.ready_fd)
        sys.stdout.write(banner(o, config))
        sys.stdout.flush()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        net.run(until=lambda: link.closed or hup[0])
        return 0
    finally:
        net.close()


def _serve_api(net: Network, config: Config, path: str) -> SlirpApiServer:
    inst = net.instance
    api = SlirpApi(inst.forwards, str(config.guest_ip))
    return SlirpApiServer(net.loop, inst.counters, os.path.abspath(path), api)


def _watch_exit_fd(net: Network, fd: int, hup: list[bool]) -> None:
    """End the loop when ``fd`` hangs up (its writer closed); data on it is not read."""
    loop = net.loop

    def on_events(events: int) -> None:
        if events & EPOLLHUP:
            hup[0] = True
            loop.remove_fd(fd, closing=False)
            loop.stop()

    loop.add_fd(fd, 0, on_events)  # no EPOLLIN: a writer's byte must not wake us for ever
    net.instance.on_close(lambda: loop.remove_fd(fd, closing=False))


def _say_ready(fd: int) -> None:
    """Write ``1`` to the ready fd and close it (a reader gone is not our failure)."""
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
    with contextlib.suppress(OSError):
        os.close(fd)


def console_main() -> int:
    """``guestnet-slirp4netns``."""
    return main()
