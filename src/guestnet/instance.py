"""Instance: one running guestnet, assembled.

It owns the loop, both frame pools, the counters, the switch, the classifier and the services,
and every link and host socket through them. The CLI builds one, attaches links, and runs it;
tests and embedding programs can do the same in process. Services are wired to the classifier
in :meth:`Instance._setup_services`: the one place that says which service takes what.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING

from guestnet.api import start_control
from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.dhcp import DhcpServer
from guestnet.core.fragments import Reassembler
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.io.dns_upstream import DnsUpstreamIO
from guestnet.io.forwards import Forwards
from guestnet.io.icmp_sock import setup_icmp
from guestnet.io.loop import Loop
from guestnet.io.tcp_nat import setup_tcp_nat
from guestnet.io.udp_nat import setup_udp_nat
from guestnet.pool import FramePool

if TYPE_CHECKING:
    from guestnet.io.links import Link

log = logging.getLogger(__name__)


class Instance:
    """Everything one guestnet process runs, owned by one loop."""

    def __init__(self, config: Config, loop: Loop | None = None) -> None:
        self.config = config
        self.loop = loop if loop is not None else Loop()
        self.counters = Counters()
        self.pool_from_guest = FramePool(config.mtu, config.pool_slots)
        self.pool_to_guest = FramePool(config.mtu, config.pool_slots)
        self.switch = Switch(self.pool_to_guest, self.counters)
        self.classifier = FrameClassifier(config, self.pool_to_guest, self.counters, self.switch)
        self.links: list[Link] = []
        self._closers: list[Callable[[], None]] = []
        self.closed = False
        #: pcap tap on frames to the guest (links call it with the frame's partial-checksum
        #: hint, ``csum_start`` -1 for none; see io/pcap.py); None: no capture.
        self.capture_to_guest: Callable[[memoryview, int, int], None] | None = None
        #: Host -> guest port forwards; the TCP/UDP NAT set its on_accept/on_datagram hooks.
        self.forwards = Forwards(self)
        self.control_started = False
        self._setup_services()

    def _setup_services(self) -> None:
        """Attach the services to the classifier (each issue adds its own here)."""
        self.dhcp = DhcpServer(self.config, self.pool_to_guest, self.counters)
        self.classifier.dhcp = self.dhcp
        self.dns = DnsUpstreamIO(self)
        self.classifier.dns_udp = self.dns
        # ICMP (echo + errors), the NATs, and reassembly of the guest's fragments.
        self.icmp = setup_icmp(self)
        self.udp_nat = setup_udp_nat(self, self.icmp.icmp)
        self.tcp_nat = setup_tcp_nat(self)
        self.reassembly = Reassembler(self.counters, self.classifier.route_ipv4)
        self.classifier.reassembly = self.reassembly

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` at shutdown (sockets, files, devices), last registered first."""
        self._closers.append(closer)

    def stats(self) -> dict[str, object]:
        """The stats API's view: links, drops, pools."""
        return {
            "links": [link.stats() for link in self.links],
            "drops": self.counters.snapshot(),
            "pool": {
                "from_guest": self.pool_from_guest.stats(),
                "to_guest": self.pool_to_guest.stats(),
            },
        }

    def start_control(self) -> None:
        """Open the pcap file, bind the -p forwards and the API socket (once; run() calls it).

        Raises :class:`guestnet.api.StartError` (one line, for the CLI) when one cannot start.
        """
        if self.control_started:
            return
        self.control_started = True
        start_control(self)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run the loop until stopped (signal, ``until``)."""
        self.start_control()
        self.loop.run(until)

    def close(self) -> None:
        """Close every link and host socket and remove what the instance created."""
        if self.closed:
            return
        self.closed = True
        for link in list(self.links):
            link.close()
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # one failing cleanup must not stop the rest
                log.exception("cleanup failed")
        self.loop.close()


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
