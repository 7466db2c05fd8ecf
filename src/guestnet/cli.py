"""The command line: ``guestnet run|netns|qemu|vhost-user|dgram`` and the options they share;
``guestnet slirp4netns``, ``guestnet pasta`` and ``guestnet passt`` hand their arguments to
:mod:`guestnet.compat.slirp4netns`, :mod:`guestnet.compat.pasta` and :mod:`guestnet.compat.passt`.

Every datapath subcommand takes the same options (:func:`add_datapath_options`), after the
subcommand name; later features add theirs there, so all four stay in step. Invalid values get a
one-line error naming the option and exit status 2. The commands are written on the library
face (:class:`guestnet.network.Network`) and nothing below it, but for the namespace helper's
errors and the loop's signal handling, which are the process's.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import operator
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from guestnet import __version__
from guestnet.assembly import raise_nofile_limit
from guestnet.client import add_client_parsers, run_client
from guestnet.config import MAX_MTU, MIN_MTU, Config, parse_mac
from guestnet.core.dhcp import check_config as check_dhcp_config
from guestnet.io.forwards import PublishSpec, parse_publish
from guestnet.io.harden import Hardening, parse_runas
from guestnet.io.netns import STOP_SIGNALS, HelperError
from guestnet.io.tap import TapLink, check_ifname
from guestnet.network import Child, Network, StartError

log = logging.getLogger("guestnet")

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: ``run``: after forwarding SIGTERM to CMD, how long before it gets SIGKILL.
RUN_KILL_GRACE_S = 5.0


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# -- option types: each raises ArgumentTypeError, which argparse prefixes with the option name --


def _mac(text: str) -> bytes:
    try:
        mac = parse_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address")
    return mac


def _ipv4(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from exc


def _subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv4 subnet: {text!r}") from exc


def _ipv6(text: str) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv6 address: {text!r}") from exc


def _prefix6(text: str) -> ipaddress.IPv6Network:
    try:
        return ipaddress.IPv6Network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv6 prefix: {text!r}") from exc


def _egress_rule(
    allow: bool,
) -> Callable[[str], tuple[bool, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """The type of ``--allow``/``--deny``: a CIDR (host bits must be zero; a bare address is
    its /32 or /128), tagged with the verdict it gives."""

    def parse(text: str) -> tuple[bool, ipaddress.IPv4Network | ipaddress.IPv6Network]:
        try:
            return allow, ipaddress.ip_network(text.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a CIDR: {text!r} ({exc})") from exc

    return parse


def _int_range(lo: int, hi: int) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value

    return parse  # type: ignore[return-value]


#: ``--tap IFNAME:no-offloads``: this TAP without checksum/segmentation offloads.
_TAP_NO_OFFLOADS = "no-offloads"


def _tap(text: str) -> tuple[str, bool | None]:
    """``IFNAME`` or ``IFNAME:no-offloads`` (a colon is never part of an interface name):
    the name, and False when that TAP runs without offloads (None: as ``--no-offloads`` says)."""
    name, sep, flag = text.partition(":")
    if sep and flag != _TAP_NO_OFFLOADS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected IFNAME or IFNAME:{_TAP_NO_OFFLOADS}")
    try:
        check_ifname(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return name, (False if sep else None)


def _host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (host 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        number = int(port, 10)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from exc
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is outside 0..65535")
    return host, number


def _static_lease(text: str) -> tuple[bytes, ipaddress.IPv4Address]:
    """``MAC=IP`` for --dhcp-static."""
    mac, sep, ip = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected MAC=IP, got {text!r}")
    return _mac(mac.strip()), _ipv4(ip.strip())


def _dns_upstream(text: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``V6``, ``[V6]`` or ``[V6]:PORT``; the port defaults to 53."""
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"expected ADDR[:PORT] or [V6]:PORT, got {text!r}")
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host.partition("%")[0])
        number = int(port, 10)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected ADDR[:PORT] or [V6]:PORT, got {text!r}"
        ) from exc
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is outside 1..65535")
    return host, number


def _publish(text: str) -> list[PublishSpec]:
    try:
        return parse_publish(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _runas(text: str) -> tuple[int, int]:
    try:
        return parse_runas(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_hardening_options(p: argparse.ArgumentParser) -> None:
    """``--runas``, ``--sandbox``, ``--seccomp``: applied once everything is set up."""
    g = p.add_argument_group(
        "least privilege (applied once the link, forwards, API socket and capture are set up)"
    )
    g.add_argument(
        "--runas",
        type=_runas,
        metavar="USER[:GROUP]",
        help="then run as USER (name or uid) and GROUP (default: USER's group), with no "
        "supplementary groups and no capabilities (with --sandbox: CAP_NET_BIND_SERVICE only)",
    )
    g.add_argument(
        "--sandbox",
        action="store_true",
        help="then move into a private mount namespace holding only /etc and /run (read-only) "
        "and drop every capability but CAP_NET_BIND_SERVICE (slirp4netns --enable-sandbox)",
    )
    g.add_argument(
        "--seccomp",
        action="store_true",
        help="then allow only the system calls serving needs (libseccomp); others fail: EPERM",
    )


def hardening_from_args(args: argparse.Namespace) -> Hardening:
    """The :class:`Hardening` the options ask for."""
    return Hardening(
        runas=args.runas,
        sandbox=args.sandbox,
        seccomp=args.seccomp,
        userns=getattr(args, "userns", None),
    )


def add_datapath_options(p: argparse.ArgumentParser) -> None:
    """Options every datapath subcommand (run, netns, qemu, dgram) accepts."""
    d = Config()
    g = p.add_argument_group("guest network")
    g.add_argument("--subnet", type=_subnet, default=d.subnet, help="guest subnet (%(default)s)")
    g.add_argument(
        "--gateway",
        type=_ipv4,
        default=d.gateway,
        help="guestnet's address, stands for the host (%(default)s)",
    )
    g.add_argument(
        "--dns-ip", type=_ipv4, default=d.dns_ip, help="built-in DNS address (%(default)s)"
    )
    g.add_argument(
        "--guest-ip", type=_ipv4, default=d.guest_ip, help="the guest's address (%(default)s)"
    )
    g.add_argument(
        "--mtu",
        type=_int_range(MIN_MTU, MAX_MTU),
        default=d.mtu,
        help="guest link MTU (%(default)s)",
    )
    g.add_argument("--mac", type=_mac, default=d.mac, help="guestnet's own MAC (52:55:0a:00:02:02)")
    g.add_argument(
        "--guest-mac",
        type=_mac,
        default=d.guest_mac,
        help="MAC of an interface guestnet creates (52:54:00:12:34:56)",
    )
    g.add_argument(
        "--pool-slots",
        type=_int_range(1, 65536),
        default=d.pool_slots,
        help="pooled frame buffers per direction (%(default)s)",
    )
    g.add_argument(
        "--tap",
        action="append",
        type=_tap,
        default=[],
        metavar="IFNAME[:no-offloads]",
        help="also serve TAP interface IFNAME of guestnet's own network namespace, made if "
        "it does not exist (an existing one, from ip tuntap add, is opened as it is); move it "
        "into another namespace (ip link set IFNAME netns NS) and it stays served. Repeatable: "
        "each TAP is a guest on the switch. :no-offloads: this TAP without offloads",
    )
    g.add_argument(
        "--no-offloads",
        dest="offloads",
        action="store_false",
        help="TAP links: no checksum/segmentation offloads (plain MTU-sized frames)",
    )
    v6 = p.add_argument_group("IPv6")
    v6.add_argument(
        "--no-ipv6",
        dest="ipv6",
        action="store_false",
        help="no IPv6 on the guest link (IPv6 frames are counted and dropped)",
    )
    v6.add_argument(
        "--ipv6-prefix",
        type=_prefix6,
        default=d.ipv6_prefix,
        help="the guest link's IPv6 prefix, advertised for SLAAC (%(default)s)",
    )
    v6.add_argument(
        "--gateway6",
        type=_ipv6,
        default=d.gateway6,
        help="guestnet's IPv6 address, stands for the host's ::1 (%(default)s)",
    )
    v6.add_argument(
        "--dns-ip6", type=_ipv6, default=d.dns_ip6, help="built-in DNS over IPv6 (%(default)s)"
    )
    v6.add_argument(
        "--guest-ip6",
        type=_ipv6,
        default=d.guest_ip6,
        help="the first guest's IPv6 address (DHCPv6; --configure) (%(default)s)",
    )
    h = p.add_argument_group("DHCP")
    h.add_argument(
        "--lease-time",
        type=_int_range(1, 0xFFFFFFFE),
        default=d.lease_time,
        help="DHCP lease time in seconds (%(default)s)",
    )
    h.add_argument(
        "--dns-search",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="DNS search domain handed out by DHCP (repeatable; the first is the domain name)",
    )
    h.add_argument(
        "--dhcp-static",
        action="append",
        type=_static_lease,
        default=[],
        metavar="MAC=IP",
        help="a fixed DHCP address for a MAC (repeatable)",
    )
    n = p.add_argument_group("DNS")
    n.add_argument(
        "--dns-upstream",
        action="append",
        type=_dns_upstream,
        default=[],
        metavar="ADDR[:PORT]",
        help="resolver guest DNS is forwarded to (repeatable, in order; [V6]:PORT for IPv6); "
        "default: the nameservers of /etc/resolv.conf",
    )
    nat = p.add_argument_group("NAT")
    nat.add_argument(
        "--udp-timeout",
        type=_int_range(120, 86400),
        default=int(d.udp_timeout),
        metavar="SECONDS",
        help="close a UDP flow after this long without traffic (%(default)s; RFC 4787: >= 120)",
    )
    nat.add_argument(
        "--guest-return-timeout",
        type=_int_range(1, 86400),
        default=int(d.guest_return_timeout),
        metavar="SECONDS",
        help="reset the TCP flows of a guest whose link went away unless it comes back within "
        "this long (a QEMU reconnecting to --socket), and those of a guest that came back with "
        "its MAC but does not know them within this long (a restarted VM) (%(default)s)",
    )
    nat.add_argument(
        "--forward-silent-timeout",
        type=_int_range(1, 86400),
        default=int(d.forward_silent_timeout),
        metavar="SECONDS",
        help="reset a published port's connection whose client has sent nothing for this long "
        "(slowloris; %(default)s)",
    )
    nat.add_argument(
        "--max-silent-forwards",
        type=_int_range(1, 1 << 20),
        default=d.max_silent_forwards,
        metavar="N",
        help="at most N such silent connections at once, the oldest reset first (%(default)s)",
    )
    nat.add_argument(
        "--no-host-loopback",
        action="store_true",
        help="refuse the guest the host's loopback and own addresses (the gateway included)",
    )
    nat.add_argument(
        "--allow-link-local",
        action="store_true",
        help="allow destinations in 169.254.0.0/16 (cloud metadata), refused by default",
    )
    nat.add_argument(
        "--isolate",
        action="store_true",
        help="guests on this guestnet (several QEMUs, namespaces) may not reach each other, "
        "only the gateway and the outside; frames between them are dropped and counted",
    )
    for flag, allow in (("--allow", True), ("--deny", False)):
        nat.add_argument(
            flag,
            dest="egress",
            action="append",
            type=_egress_rule(allow),
            default=[],
            metavar="CIDR",
            help=f"{flag[2:]} guest destinations in CIDR (IPv4 or IPv6; repeatable): --allow and "
            "--deny rules are tried in command-line order, the first match wins, none: allowed",
        )
    nat.add_argument(
        "--max-flows",
        type=_int_range(1, 1 << 20),
        default=d.max_flows,
        metavar="N",
        help="most NAT flows at once; a TCP SYN beyond it gets RST (%(default)s)",
    )
    nat.add_argument(
        "--max-half-open",
        type=_int_range(1, 1 << 20),
        default=d.max_half_open,
        metavar="N",
        help="most TCP flows with an unfinished handshake; beyond it the oldest is dropped "
        "(a SYN flood's bound; %(default)s)",
    )
    ctl = p.add_argument_group("forwards, control API and capture")
    ctl.add_argument(
        "-p",
        "--publish",
        action="append",
        type=_publish,
        default=[],
        metavar="SPEC",
        help="forward a host port to the guest; SPEC is "
        "[HOST_IP:]HOST_PORT:[GUEST_IP:]GUEST_PORT[/tcp|/udp] (repeatable; ranges "
        "8000-8010:8000-8010; IPv6 host as [::1]:8080:80; tcp unless /udp). GUEST_IP chooses "
        "the guest when several share this guestnet (8080:10.0.2.16:80); without it, the "
        "guest's latest DHCP lease or --guest-ip. HOST_IP defaults to 127.0.0.1, "
        "not 0.0.0.0: give 0.0.0.0 to publish on every interface",
    )
    ctl.add_argument(
        "--api-socket",
        metavar="PATH",
        help="serve the control API (HTTP/1.1 + JSON) on this unix socket (mode 0600)",
    )
    ctl.add_argument(
        "--pcap", metavar="FILE", help="write every frame, both directions, to FILE (pcap)"
    )
    ctl.add_argument(
        "--pcap-max-bytes",
        type=_int_range(0, 1 << 62),
        default=Config().pcap_max_bytes,
        metavar="N",
        help="stop capturing (it does not rotate; a log line says so) once the file would "
        "exceed N bytes; 0: no limit (%(default)s)",
    )
    add_hardening_options(p)
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="log verbosity (%(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the Config from parsed options; raises ValueError naming the option."""
    config = Config(
        subnet=args.subnet,
        gateway=args.gateway,
        dns_ip=args.dns_ip,
        guest_ip=args.guest_ip,
        mtu=args.mtu,
        mac=args.mac,
        guest_mac=args.guest_mac,
        pool_slots=args.pool_slots,
        offloads=args.offloads,
        lease_time=args.lease_time,
        dns_search=tuple(args.dns_search),
        dns_upstreams=tuple(args.dns_upstream),
        dhcp_static=tuple(args.dhcp_static),
        udp_timeout=float(args.udp_timeout),
        guest_return_timeout=float(args.guest_return_timeout),
        forward_silent_timeout=float(args.forward_silent_timeout),
        max_silent_forwards=args.max_silent_forwards,
        no_host_loopback=args.no_host_loopback,
        allow_link_local=args.allow_link_local,
        isolate=args.isolate,
        egress=tuple(args.egress),
        max_flows=args.max_flows,
        max_half_open=args.max_half_open,
        api_socket=os.path.abspath(args.api_socket) if args.api_socket else None,
        pcap=args.pcap,
        pcap_max_bytes=args.pcap_max_bytes,
        publish=tuple(spec for specs in args.publish for spec in specs),
        ipv6=args.ipv6,
        ipv6_prefix=args.ipv6_prefix,
        gateway6=args.gateway6,
        dns_ip6=args.dns_ip6,
        guest_ip6=args.guest_ip6,
    )
    check_dhcp_config(config)
    return config


def build_parser() -> argparse.ArgumentParser:
    """The full command line."""
    parser = _Parser(
        prog="guestnet", description="User-mode networking for VMs and network namespaces."
    )
    parser.add_argument("--version", action="version", version=f"guestnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a command in a new network namespace served by guestnet",
        description="Run CMD in new network (and, when not root, user) and mount "
        "namespaces whose interface guestnet serves; exit with CMD's status.",
    )
    add_datapath_options(run)
    run.add_argument("--ifname", default="eth0", help="interface name inside (%(default)s)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...] (default: a shell)")

    netns = sub.add_parser(
        "netns",
        help="attach an existing network namespace",
        description="Create a TAP interface in an existing network namespace and serve it.",
    )
    add_datapath_options(netns)
    netns.add_argument(
        "target",
        nargs="*",
        help="PID, /proc/PID/ns/net, /run/netns/NAME path, or a NAME under /run/netns (none "
        "with --tap); several "
        "targets are guests on one switch: the Nth (from 0) gets --guest-mac, --guest-ip and "
        "--guest-ip6 plus N (with --configure; a DHCP client gets its own lease anyway)",
    )
    netns.add_argument("--userns", help="user namespace owning the target (e.g. /proc/PID/ns/user)")
    netns.add_argument("--ifname", default="eth0", help="interface name (%(default)s)")
    netns.add_argument(
        "--configure",
        action="store_true",
        help="bring lo and the interface up and set address, route and MTU "
        "(otherwise left down for the guest's own DHCP client)",
    )

    qemu = sub.add_parser("qemu", help="serve QEMU's -netdev stream (or legacy socket) protocol")
    add_datapath_options(qemu)
    where = qemu.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="unix socket path to listen on (mode 0600)")
    where.add_argument(
        "--listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="TCP address to listen on (host defaults to 127.0.0.1)",
    )

    vhost = sub.add_parser(
        "vhost-user", help="serve QEMU's -netdev vhost-user (guest memory shared; x86-64 only)"
    )
    add_datapath_options(vhost)
    vhost.add_argument("--socket", required=True, help="unix socket path to listen on (mode 0600)")
    vhost.add_argument(
        "--memory",
        default="1G",
        help="guest memory size for the printed QEMU arguments (must equal QEMU's -m)",
    )
    vhost.add_argument(
        "--host-mtu",
        type=int,
        default=0,
        help="host_mtu= for the printed virtio-net-pci device (e.g. 65520; 0: omitted)",
    )

    dgram = sub.add_parser("dgram", help="serve a unix datagram link (QEMU -netdev dgram, vfkit)")
    add_datapath_options(dgram)
    dgram.add_argument(
        "--socket", required=True, help="unix datagram socket path to bind (mode 0600)"
    )
    sub.add_parser(
        "slirp4netns",
        help="slirp4netns's command line (guestnet slirp4netns --help), for podman and rootlesskit",
        add_help=False,
    )
    sub.add_parser(
        "pasta",
        help="pasta's command line (guestnet pasta --help), for podman 5 and rootlesskit 2",
        add_help=False,
    )
    sub.add_parser(
        "passt",
        help="passt's command line (guestnet passt --help), for libvirt and QEMU",
        add_help=False,
    )
    add_client_parsers(sub)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="guestnet: %(levelname)s: %(message)s",
    )


def _harden(net: Network, hardening: Hardening) -> None:
    """Start the services and apply ``hardening``; StartError says why it failed."""
    try:
        net.harden(hardening)
    except OSError as exc:  # a step refused, or no libseccomp for --seccomp
        raise StartError(f"cannot drop privileges: {exc}") from exc


def _serve(
    net: Network,
    prog: str,
    until: Callable[[], bool] | None = None,
    hardening: Hardening | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or ``until``); 1 when the start-up services fail."""
    net.loop.install_signal_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        if hardening:
            _harden(net, hardening)
        net.run(until)
    except StartError as exc:  # --pcap, -p or --api-socket could not be set up
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        net.close()
    return 0


def _open_taps(net: Network, args: argparse.Namespace, prog: str) -> list[TapLink] | None:
    """Serve every ``--tap``; None (the error printed, the network closed) when one fails."""
    links = []
    for ifname, offloads in args.tap:
        try:
            links.append(net.open_tap(ifname, offloads=offloads))
        except OSError as exc:
            net.close()
            print(f"{prog}: error: --tap {ifname}: {exc}", file=sys.stderr)
            return None
    return links


def _serve_vm(net: Network, args: argparse.Namespace, prog: str, qemu_args: str) -> int:
    """The VM commands once their socket is there: serve every ``--tap`` beside it, print
    QEMU's arguments and serve until a signal."""
    if _open_taps(net, args, prog) is None:
        return EXIT_FAILURE
    print(qemu_args, flush=True)
    return _serve(net, "guestnet", hardening=hardening_from_args(args))


def cmd_qemu(args: argparse.Namespace, config: Config) -> int:
    """Serve QEMU stream connections until a signal."""
    net = Network(config)
    try:
        if args.socket:
            qemu_args = net.listen_qemu(args.socket)
        else:
            host, port = args.listen
            qemu_args = net.listen_qemu(host=host, port=port)
    except OSError as exc:
        net.close()
        print(f"guestnet qemu: error: cannot listen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return _serve_vm(net, args, "guestnet qemu", qemu_args)


def cmd_vhost_user(args: argparse.Namespace, config: Config) -> int:
    """Serve vhost-user-net on a unix socket until a signal."""
    net = Network(config)
    try:
        qemu_args = net.listen_vhost_user(args.socket, memory=args.memory, host_mtu=args.host_mtu)
    except (OSError, RuntimeError) as exc:
        net.close()
        print(f"guestnet vhost-user: error: cannot listen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return _serve_vm(net, args, "guestnet vhost-user", qemu_args)


def cmd_dgram(args: argparse.Namespace, config: Config) -> int:
    """Serve one unix datagram link until a signal."""
    net = Network(config)
    path = os.path.abspath(args.socket)
    try:
        qemu_args = net.attach_dgram(path)
    except OSError as exc:
        net.close()
        print(f"guestnet dgram: error: cannot bind {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return _serve_vm(net, args, "guestnet dgram", qemu_args)


#: ``link.closed``, for the per-turn test of ``guestnet netns`` (every link gone: stop).
_CLOSED = operator.attrgetter("closed")


def cmd_netns(args: argparse.Namespace, config: Config) -> int:
    """``guestnet netns TARGET...``: serve a TAP in each existing namespace (guests on one
    switch) until SIGINT/SIGTERM, or until every namespace is gone."""
    try:
        check_ifname(args.ifname)
    except ValueError as exc:
        print(f"guestnet netns: error: --ifname: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.target and not args.tap:
        print("guestnet netns: error: give a TARGET namespace or --tap", file=sys.stderr)
        return EXIT_USAGE
    if args.userns and not os.path.exists(args.userns):
        print(f"guestnet netns: error: --userns: no such namespace: {args.userns}", file=sys.stderr)
        return EXIT_USAGE
    # Held back until the loop handles them, so that a SIGTERM during set-up still ends
    # guestnet cleanly (and removes the TAP) instead of killing it outright.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    net = Network(config)
    target = ""
    links = []
    try:
        for index, target in enumerate(args.target):
            links.append(
                net.attach_netns(
                    target,
                    ifname=args.ifname,
                    configure=args.configure,
                    userns=args.userns,
                    index=index,
                )
            )
    except ValueError as exc:
        net.close()
        print(f"guestnet netns: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (HelperError, OSError) as exc:
        net.close()
        print(
            f"guestnet netns: error: cannot create {args.ifname} in {target}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    taps = _open_taps(net, args, "guestnet netns")
    if taps is None:
        return EXIT_FAILURE
    links.extend(taps)
    log.info("serving %s in %s", args.ifname, " ".join(args.target))
    return _serve(
        net,
        "guestnet netns",
        # Asked after every loop turn: a map over an attrgetter, no generator per turn.
        until=lambda: all(map(_CLOSED, links)),
        hardening=hardening_from_args(args),
    )


def _command_of(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        cmd = [os.environ.get("SHELL") or "/bin/sh"]
    return cmd


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """``guestnet run -- CMD``: CMD in new namespaces served by guestnet; CMD's exit status."""
    try:
        check_ifname(args.ifname)
    except ValueError as exc:
        print(f"guestnet run: error: --ifname: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.runas is not None:
        # CMD keeps the caller's user: guestnet, as another, could not forward signals to it.
        print(
            "guestnet run: error: --runas: not with run (CMD runs as the caller, whom guestnet "
            "could no longer signal); use guestnet netns",
            file=sys.stderr,
        )
        return EXIT_USAGE
    hardening = hardening_from_args(args)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    net = Network(config)
    if _open_taps(net, args, "guestnet run") is None:
        return EXIT_FAILURE
    try:
        child = net.spawn(_command_of(args), ifname=args.ifname)
    except (HelperError, OSError) as exc:
        net.close()
        print(f"guestnet run: error: cannot set up the namespace: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        _forward_stop_signals(net, child)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if hardening:
            _harden(net, hardening)
        # Published ports, the API socket and the capture exist before CMD starts (run()
        # starts them, then lets CMD go), so CMD finds them ready; a StartError kills CMD.
        while child.returncode is None:
            net.run(until=lambda: child.returncode is not None)
    except StartError as exc:
        print(f"guestnet run: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        net.close()
    code = child.returncode
    assert code is not None
    return 128 - code if code < 0 else code


def _forward_stop_signals(net: Network, child: Child) -> None:
    """SIGTERM/SIGHUP go to CMD (SIGKILL if it lingers); SIGINT is CMD's (a terminal sends it
    to both)."""
    loop = net.loop
    loop.install_signal_handlers()

    def on_term(signum: int, _frame: object) -> None:
        child.send_signal(signum)
        loop.call_later(RUN_KILL_GRACE_S, lambda _now: child.send_signal(signal.SIGKILL))

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGINT, lambda _s, _f: None)


# The compat modes are imported by the command that runs them: the others do not carry their
# option tables and API servers (~0.8 MB of RSS, issue 12).


def _slirp4netns_main(argv: Sequence[str], prog: str) -> int:
    from guestnet.compat import slirp4netns

    return slirp4netns.main(argv, prog=prog)


def _pasta_main(argv: Sequence[str], prog: str) -> int:
    from guestnet.compat import pasta

    return pasta.main(argv, prog=prog)


def _passt_main(argv: Sequence[str], prog: str) -> int:
    from guestnet.compat import passt

    return passt.main(argv, prog=prog)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guestnet`` command.

    ``guestnet slirp4netns ARGS``, and ``guestnet`` run through a link named ``slirp4netns``,
    are slirp4netns's command line (:mod:`guestnet.compat.slirp4netns`), not argparse's; the
    same goes for ``pasta`` and ``passt``.
    """
    modes: dict[str, Callable[[Sequence[str], str], int]] = {
        "slirp4netns": _slirp4netns_main,
        "pasta": _pasta_main,
        "passt": _passt_main,
    }
    if argv is None:
        argv = sys.argv[1:]
        name = os.path.basename(sys.argv[0])
        if name in modes:
            return modes[name](argv, sys.argv[0] if name == "slirp4netns" else name)
    if argv and argv[0] in modes:
        return modes[argv[0]](argv[1:], f"guestnet {argv[0]}")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "client", None) is not None:
        return run_client(args)
    _setup_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"guestnet {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise_nofile_limit()
    command = {
        "qemu": cmd_qemu,
        "vhost-user": cmd_vhost_user,
        "dgram": cmd_dgram,
        "netns": cmd_netns,
        "run": cmd_run,
    }
    return command[args.command](args, config)
