"""The assembly: the one place that builds a datapath and connects its parts.

Theory of operation
-------------------
Dependencies point one way: ``wire <- core <- io <- assembly <- api, network, cli``. The sans-I/O
core (classifier, services, NAT state machines) knows nothing of sockets; the drivers in ``io/``
know the loop, the counters, the pools and the collaborators they are handed, never the whole
datapath. Only :class:`Instance` sees everything: it makes the loop, both frame pools, the
counters, the switch and the classifier, builds each service and its driver with exactly what
they use, and is the only code that plugs services into the classifier's slots and the forward
registry's hooks. Nothing below it imports it.

IPv6 (``config.ipv6``): the NDP service answers neighbour and router solicitations and echo to
guestnet's IPv6 addresses; its periodic router advertisements run on a loop timer re-armed from
:meth:`~guestnet.core.ndp.NdpService.next_deadline`; the first goes out at start, and one more
to each port whose guest starts speaking IPv6 (the classifier calls ``port_up``). DNS over UDP
takes IPv6 queries, IPv6 fragments are reassembled, the DHCPv6 server (``core/dhcpv6.py``)
takes the ``dhcp6`` slot, and the family-neutral NAT services take ``icmp6``, ``dns6_tcp``,
``udp_nat6`` and ``tcp_nat6``.

Shutdown runs the ``on_close`` registry last-registered first (the TCP NAT, then UDP, ICMP, DNS,
forwards), then closes the links and the loop: :meth:`Instance.close` leaves no descriptor, file
or timer behind.

What an operator sees (stats, flows, leases, forwards) is read through the small methods at the
end, which the control API and the library face (``guestnet.network``) use.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
from collections.abc import Callable, Iterable, Mapping

from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.dhcp import DhcpServer
from guestnet.core.dhcpv6 import Dhcpv6Server
from guestnet.core.fragments import Reassembler
from guestnet.core.ndp import NdpService
from guestnet.core.policy import Policy
from guestnet.core.switch import Switch
from guestnet.core.tcp import TcpNat
from guestnet.core.timers import Timer
from guestnet.counters import Counters
from guestnet.io.dns_upstream import DnsUpstreamIO, upstream_servers
from guestnet.io.forwards import Forwards, PublishSpec, add_published
from guestnet.io.host import host_addrs
from guestnet.io.icmp_sock import IcmpDriver, no_echo_warning, probe_echo_mode
from guestnet.io.links import Link, LinkHub
from guestnet.io.loop import Loop
from guestnet.io.pcap import PcapWriter, open_capture
from guestnet.io.tcp_nat import TcpNatDriver
from guestnet.io.udp_nat import UdpNatDriver
from guestnet.pool import FramePool
from guestnet.wire.l3 import IPV6

log = logging.getLogger(__name__)

#: A flow listing: ``source(now)`` gives one mapping per live flow.
FlowSource = Callable[[float], Iterable[Mapping[str, object]]]


class Instance:
    """One datapath, assembled: loop, pools, switch, classifier, services and their drivers.

    ``echo_mode``: how ICMP echo reaches outside addresses: ``"probe"`` (try ping sockets, then
    raw, once), ``"ping"``, ``"raw"`` or None (only guestnet's own addresses answer).
    """

    def __init__(
        self, config: Config, loop: Loop | None = None, echo_mode: str | None = "probe"
    ) -> None:
        self.config = config
        self.loop = loop if loop is not None else Loop()
        self.counters = Counters()
        self.pool_from_guest = FramePool(config.mtu, config.pool_slots)
        self.pool_to_guest = FramePool(config.mtu, config.pool_slots)
        self.switch = Switch(self.pool_to_guest, self.counters, config.isolate)
        self.classifier = FrameClassifier(config, self.pool_to_guest, self.counters, self.switch)
        self.hub = LinkHub(
            self.loop,
            self.counters,
            self.pool_from_guest,
            self.pool_to_guest,
            self.switch,
            self.classifier.handle_frame,
        )
        self._closers: list[Callable[[], None]] = []
        self.closed = False
        #: The running capture (``--pcap``), if any.
        self.capture: PcapWriter | None = None
        #: A guest was given ``guest_ip6`` by guestnet itself (``--configure``, ``run``).
        self.guest_ip6_configured = False
        self._build_services(echo_mode)

    # -- building ---------------------------------------------------------------------------------

    def _build_services(self, echo_mode: str | None) -> None:
        """Make every service and driver and connect them: the classifier's slots, the hooks."""
        cfg, loop, pool, counters = self.config, self.loop, self.pool_to_guest, self.counters
        c = self.classifier
        self.dhcp = DhcpServer(cfg, pool, counters)
        #: The guest's IPv4 address last asked for, and its text (see ``guest_address``).
        self._guest_ip: object = None
        self._guest_ip_text = ""
        self.forwards = Forwards(
            loop,
            counters,
            cfg.subnet,
            self.guest_address,
            cfg.ipv6_prefix if cfg.ipv6 else None,
            self.guest_address6 if cfg.ipv6 else None,
        )
        self.on_close(self.forwards.close)
        self.dns = DnsUpstreamIO(cfg, loop, pool, counters, upstream_servers(cfg))
        self.on_close(self.dns.close)
        self.policy = Policy(cfg, host_addrs() if cfg.no_host_loopback else frozenset())
        self.icmp = IcmpDriver(
            cfg, loop, pool, counters, self.switch, self.policy, _echo_mode(echo_mode)
        )
        self.on_close(self.icmp.close)
        self.udp_nat = UdpNatDriver(
            cfg, loop, pool, counters, self.switch, self.policy, self.icmp.icmp
        )
        self.udp_nat.attach_forwards(self.forwards)
        # Guest datagrams of one flow are sent in UDP_SEGMENT batches at the end of each burst.
        self.udp_nat.nat.gather_sends = True
        self.hub.burst_end.append(self.udp_nat.nat.flush_sends)
        self.on_close(self.udp_nat.close)
        # DNS over TCP connects where UDP queries go now (the first upstream believed up) and
        # fails over as UDP does: an upstream it cannot reach is held down for both.
        nat = TcpNat(
            cfg,
            pool,
            counters,
            self.policy,
            dns_upstream=self.dns.tcp_upstream,
            dns_failed=self.dns.tcp_upstream_failed,
            unreachable=self.icmp.icmp.send_unreachable,
        )
        self.tcp_nat = TcpNatDriver(loop, counters, self.switch, nat, cfg.outbound_addr)
        self.tcp_nat.attach_forwards(self.forwards)
        self.on_close(self.tcp_nat.close_all)
        self.reassembly = Reassembler(counters, c.route_ipv4)
        c.dhcp = self.dhcp
        if cfg.dns:  # else (--disable-dns) queries to the DNS address are dropped, unanswered
            c.dns_udp = self.dns
            c.dns_fast = self.dns.handle_fast
            c.dns_tcp = nat.dns_handler
        c.icmp = self.icmp.icmp
        c.udp_nat = self.udp_nat.nat
        c.tcp_nat = nat
        self.switch.on_return = nat.move_guest  # a guest that comes back gets its flows
        self.switch.on_depart = self.tcp_nat.guest_departed  # reset later if it does not
        c.tcp_fast = nat.handle_fast
        c.udp_fast = self.udp_nat.nat.handle_fast
        c.reassembly = self.reassembly
        self.ndp: NdpService | None = None
        self.dhcp6: Dhcpv6Server | None = None
        if cfg.ipv6:
            self._build_ipv6()

    def _build_ipv6(self) -> None:
        """NDP and router advertisements, and the IPv6 slots whose services take IPv6."""
        c = self.classifier
        ndp = NdpService(self.config, self.pool_to_guest, self.counters, self.switch)
        self.ndp = ndp
        c.ndp = ndp
        c.dns6_udp = self.dns
        c.dns_fast6 = self.dns.handle_fast6
        self.dhcp6 = Dhcpv6Server(self.config, self.pool_to_guest, self.counters)
        c.dhcp6 = self.dhcp6
        self.reassembly6 = Reassembler(self.counters, c.route_ipv6, family=IPV6)
        c.reassembly6 = self.reassembly6
        # The NAT services are family-neutral: the same objects take IPv6.
        c.dns6_tcp = c.dns_tcp
        c.udp_nat6 = c.udp_nat
        c.tcp_nat6 = c.tcp_nat
        c.icmp6 = self.icmp.icmp
        timer: list[Timer] = []

        def arm() -> None:
            when = ndp.next_deadline()
            if when is not None:
                timer[:] = [self.loop.call_at(when, fire)]

        def fire(now: float) -> None:
            ndp.handle_timeout(now)
            arm()

        def stop() -> None:
            for t in timer:
                t.cancel()

        ndp.start(self.loop.now())
        arm()
        self.on_close(stop)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` at shutdown (sockets, files, devices), last registered first."""
        self._closers.append(closer)

    def guest_address(self) -> str:
        """Where traffic for "the guest" goes now: its latest DHCP lease, else ``--guest-ip``.

        Asked once per forwarded connection: the text is kept while the address object is the
        same one (``str`` of an address costs more than the rest of the question)."""
        ip = self.dhcp.guest_address()
        if ip is not self._guest_ip:
            self._guest_ip_text = str(ip)
            self._guest_ip = ip
        return self._guest_ip_text

    def guest_address6(self) -> str:
        """Where IPv6 traffic for "the guest" goes now: ``--guest-ip6`` when guestnet gave it
        (``--configure``, ``run``), else the latest DHCPv6 lease, else ``--guest-ip6`` if the
        guest uses it, else the global address in the prefix it used last (SLAAC, a privacy
        address), else ``--guest-ip6``."""
        cfg = self.config
        if self.guest_ip6_configured:
            return str(cfg.guest_ip6)
        if self.dhcp6 is not None and self.dhcp6.has_bound():
            return str(self.dhcp6.guest_address())
        wanted = cfg.guest_ip6.packed
        latest = None
        for port in self.switch.ports:
            for addr in port.guest_ip6:
                if addr == wanted:
                    return str(cfg.guest_ip6)
                if ipaddress.IPv6Address(addr) in cfg.ipv6_prefix:
                    latest = addr
        return str(ipaddress.IPv6Address(latest)) if latest is not None else str(cfg.guest_ip6)

    # -- what the operator asked for at start -----------------------------------------------------

    def start_capture(self, path: str, max_bytes: int) -> PcapWriter:
        """Record every frame both ways to ``path`` (pcap) until close; OSError if it can't."""
        writer = open_capture(self.loop, path, max_bytes)
        self.capture = writer
        self.classifier.capture = writer.from_guest
        self.hub.capture_to_guest = writer.to_guest

        def stop() -> None:
            if self.classifier.capture == writer.from_guest:
                self.classifier.capture = None
            if self.hub.capture_to_guest == writer.to_guest:
                self.hub.capture_to_guest = None
            writer.close()

        self.on_close(stop)
        return writer

    def publish(self, specs: Iterable[PublishSpec]) -> None:
        """Create the forwards of ``-p``; ForwardError on the first that fails."""
        add_published(self.forwards, tuple(specs))

    # -- what the API and the library read ---------------------------------------------------------

    @property
    def links(self) -> list[Link]:
        """The guest links alive."""
        return self.hub.links

    def link_stats(self) -> list[dict[str, object]]:
        """Per-link counters, with the IPv4 addresses of the guests on each (issue 15)."""
        out = []
        for link in self.hub.links:
            stats = link.stats()
            stats["guest_ip4"] = self.switch.ip4_on(link.port)
            out.append(stats)
        return out

    def pool_stats(self) -> dict[str, object]:
        """Both frame pools' counters."""
        return {"from_guest": self.pool_from_guest.stats(), "to_guest": self.pool_to_guest.stats()}

    def flow_sources(self) -> list[tuple[str, FlowSource]]:
        """Every NAT service's flow listing, by protocol: the real tables, not a cache."""
        return [("tcp", self.tcp_nat.flows), ("udp", self.udp_nat.flows), ("icmp", self.icmp.flows)]

    def capture_stats(self) -> dict[str, object] | None:
        """The pcap writer's counters while a capture runs."""
        return None if self.capture is None else self.capture.stats()

    # -- shutdown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every link and host socket and remove what the instance created."""
        if self.closed:
            return
        self.closed = True
        self.hub.close_all()
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # one failing cleanup must not stop the rest
                log.exception("cleanup failed")
        self.loop.close()


def _echo_mode(mode: str | None) -> str | None:
    """Resolve ``"probe"`` to the best echo socket this process may open (once, at start)."""
    if mode != "probe":
        return mode
    found = probe_echo_mode()
    if found is None:
        log.warning("%s", no_echo_warning())
    else:
        log.info("ICMP echo to outside addresses through %s sockets", found)
    return found


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", hard, exc)
    return soft
