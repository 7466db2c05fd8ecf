"""ArpResponder: answers the guest's ARP requests for guestnet's own addresses.

guestnet owns the gateway and DNS addresses on the guest link and answers for them with its own
MAC. Requests for other addresses get no answer (the guest would otherwise think guestnet is
every host on its subnet), nor do gratuitous announcements. A request whose sender address is
0.0.0.0 is an RFC 5227 probe; when it asks for one of our addresses we answer, so the guest sees
the conflict. Replies are written into a pooled frame: in steady state an ARP reply allocates
nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from guestnet.config import Config
from guestnet.core.port import Port
from guestnet.counters import Counters
from guestnet.pool import FramePool
from guestnet.wire.arp import ARP_REPLY, ARP_REQUEST, build_arp, parse_arp
from guestnet.wire.ethernet import ETH_ZLEN, ETHERTYPE_ARP, build_ethernet

_ZEROS = memoryview(bytes(ETH_ZLEN))
_ANY4 = bytes(4)


class ArpResponder:
    """Answers ARP requests for the addresses guestnet owns."""

    __slots__ = ("config", "counters", "learn_ip4", "pool")

    def __init__(self, config: Config, pool: FramePool, counters: Counters) -> None:
        self.config = config
        self.pool = pool
        self.counters = counters
        #: Told every guest's (IPv4 address, MAC) as its ARP packets show them (the classifier
        #: points it at ``Switch.learn_ip4``: forwards find their guest by address).
        self.learn_ip4: Callable[[bytes, bytes], None] | None = None

    def handle_arp(self, data: memoryview, port: Port) -> None:
        """Handle one ARP packet (the Ethernet payload). Raises WireError on bad input."""
        pkt = parse_arp(data)
        learn = self.learn_ip4
        if learn is not None and pkt.spa != _ANY4:
            learn(pkt.spa, pkt.sha)
        if pkt.op != ARP_REQUEST:
            self.counters.inc("arp.reply.ignored" if pkt.op == ARP_REPLY else "arp.op.unknown")
            return
        if pkt.spa == pkt.tpa:
            self.counters.inc("arp.request.gratuitous")
            return
        if pkt.tpa not in self.config.owned_b:
            self.counters.inc("arp.request.not_ours")
            return
        frame = self.pool.acquire()
        buf = frame.view
        off = build_ethernet(buf, frame.start, pkt.sha, self.config.mac, ETHERTYPE_ARP)
        end = build_arp(buf, off, ARP_REPLY, self.config.mac, pkt.tpa, pkt.sha, pkt.spa)
        # Pad to the Ethernet minimum: a TAP or QEMU passes runts on, but real NICs would not.
        pad_end = frame.start + ETH_ZLEN
        buf[end:pad_end] = _ZEROS[: pad_end - end]
        frame.length = ETH_ZLEN
        self.counters.inc("arp.reply.sent")
        port.send(frame)
