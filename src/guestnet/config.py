"""Start-up configuration: one frozen object shared by every service.

What can change while guestnet runs (forwards added through the API, leases) lives with the
service that owns it, not here. Addresses are kept both as ``ipaddress`` objects (for people and
validation) and packed as ``bytes`` (for the datapath, which compares raw header fields): 4 bytes
for IPv4, 16 for IPv6. IPv6 defaults are slirp4netns's (fd00::/64, gateway ::2, DNS ::3), so
podman and rootlesskit users see what they expect; ``ipv6=False`` (``--no-ipv6``) turns it off.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network
IPv6Address = ipaddress.IPv6Address
IPv6Network = ipaddress.IPv6Network

#: Largest IPv4 datagram; with TAP offloads a super-frame may carry this much at any MTU.
MAX_IP_PACKET = 65535
#: Largest MTU we accept: passt's default, so a 65535-byte IP packet plus headers fits a frame.
MAX_MTU = 65520
#: Largest MTU a link may have: slirp4netns's limit (its IP packet plus the Ethernet header is
#: 65,535 bytes). The command line's ``--mtu`` stops at :data:`MAX_MTU`.
MTU_LIMIT = 65521
#: Smallest MTU IPv4 allows (RFC 791).
MIN_MTU = 576
#: Default of ``Config.guest_return_timeout`` (``--guest-return-timeout``).
GUEST_RETURN_TIMEOUT_S = 30.0


def parse_mac(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` into six bytes; raise ValueError on anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError as exc:
        raise ValueError(f"not a MAC address: {text!r}") from exc


def format_mac(mac: bytes) -> str:
    """Format six bytes as ``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class Config:
    """Everything guestnet needs to know at start-up. Defaults match slirp/QEMU user networking."""

    #: The guest's subnet; the gateway, DNS and guest addresses all lie inside it.
    subnet: IPv4Network = field(default_factory=lambda: IPv4Network("10.0.2.0/24"))
    #: guestnet's own address on the guest link; stands for the host (slirp's 10.0.2.2).
    gateway: IPv4Address = field(default_factory=lambda: IPv4Address("10.0.2.2"))
    #: Address of the built-in DNS service (slirp's 10.0.2.3); it may lie outside ``subnet``.
    dns_ip: IPv4Address = field(default_factory=lambda: IPv4Address("10.0.2.3"))
    #: Address the first guest is given (by DHCP, or directly with --configure).
    guest_ip: IPv4Address = field(default_factory=lambda: IPv4Address("10.0.2.15"))
    #: MTU of the guest link (65520 as passt: few, large frames are what makes Python fast).
    mtu: int = MAX_MTU
    #: guestnet's own MAC, the gateway's and the DNS address's (slirp's 52:55:0a:00:02:02).
    mac: bytes = bytes.fromhex("52550a000202")
    #: MAC of the interface guestnet creates itself (``run`` and ``netns``).
    guest_mac: bytes = bytes.fromhex("525400123456")
    #: Pooled frame buffers per direction.
    pool_slots: int = 256
    #: TAP links (``run``, ``netns``): checksum and TCP segmentation offloads both ways, so
    #: TCP moves in 64 KiB super-frames at any MTU (``--no-offloads`` for plain frames).
    offloads: bool = True
    #: Upstream DNS servers as (address, port); empty means the host's /etc/resolv.conf.
    dns_upstreams: tuple[tuple[str, int], ...] = ()
    #: DNS search domains handed out by DHCP (option 119) and written to resolv.conf.
    dns_search: tuple[str, ...] = ()
    #: DHCP lease time in seconds.
    lease_time: int = 3600
    #: Static DHCP leases: (MAC, address).
    dhcp_static: tuple[tuple[bytes, IPv4Address], ...] = ()
    #: Refuse the guest access to the host's loopback and own addresses.
    no_host_loopback: bool = False
    #: With ``no_host_loopback``: a guest's TCP connect so refused gets an ICMP network
    #: unreachable ("Network is unreachable" at once, as slirp4netns answers) instead of RST.
    host_loopback_unreachable: bool = False
    #: Serve DNS on ``dns_ip`` (and the gateway's port 53); False (slirp4netns
    #: ``--disable-dns``): queries there go unanswered.
    dns: bool = True
    #: IPv4 source address every NAT host socket (TCP, UDP) binds to; None: the kernel picks.
    outbound_addr: str | None = None
    #: Allow destinations in 169.254.0.0/16 (cloud metadata), refused by default.
    allow_link_local: bool = False
    #: Guests on the switch may not reach each other, only guestnet and the outside
    #: (``--isolate``; see guestnet.core.switch).
    isolate: bool = False
    #: Egress rules from ``--allow``/``--deny`` in command-line order: (allow, network). The
    #: first rule whose network holds the guest's destination decides; none: allowed.
    egress: tuple[tuple[bool, IPv4Network | IPv6Network], ...] = ()
    #: Upper bound on NAT flows (TCP and UDP together).
    max_flows: int = 16384
    #: Upper bound on TCP flows whose handshake is not complete (connecting on the host, or
    #: waiting for the guest); beyond it the oldest is evicted (a SYN flood's bound).
    max_half_open: int = 1024
    #: A connection accepted on a published port whose client has sent nothing for this long is
    #: reset (slowloris); and at most ``max_silent_forwards`` such connections at once, the
    #: oldest reset first.
    forward_silent_timeout: float = 300.0
    max_silent_forwards: int = 1024
    #: UDP flow idle timeout in seconds (RFC 4787 asks at least 120).
    udp_timeout: float = 180.0
    #: Seconds the TCP flows of a guest whose link went away wait for it to come back (a QEMU
    #: reconnecting to the socket) before they are reset; and, once a guest with its MAC is
    #: back, seconds it has to show it knows them (a restarted guest does not) before they
    #: are reset (``--guest-return-timeout``; issue 15).
    guest_return_timeout: float = GUEST_RETURN_TIMEOUT_S
    #: Unix socket path of the control API (HTTP/1.1 + JSON, mode 0600); None: no API.
    api_socket: str | None = None
    #: pcap file every frame is written to (both directions); None: no capture.
    pcap: str | None = None
    #: Capture stops (with a log line) once the pcap file would exceed this; 0: no bound.
    pcap_max_bytes: int = 1 << 30
    #: Forwards from -p/--publish: (proto, host_ip, host_port, guest_port[, guest_ip]), created
    #: at start (guestnet.io.forwards.PublishSpec).
    publish: tuple[tuple[str, str, int, int] | tuple[str, str, int, int, str], ...] = ()
    #: IPv6 on the guest link (NDP, router advertisements, DHCPv6, the NAT); False: IPv6
    #: frames are counted and dropped.
    ipv6: bool = True
    #: The guest link's IPv6 prefix (a /64, so kernels do SLAAC from our advertisements).
    ipv6_prefix: IPv6Network = field(default_factory=lambda: IPv6Network("fd00::/64"))
    #: guestnet's IPv6 address standing for the host (TCP/UDP to it reach the host's ::1).
    gateway6: IPv6Address = field(default_factory=lambda: IPv6Address("fd00::2"))
    #: Address of the built-in DNS service over IPv6.
    dns_ip6: IPv6Address = field(default_factory=lambda: IPv6Address("fd00::3"))
    #: The first guest's IPv6 address (DHCPv6 lease; what --configure and run set).
    guest_ip6: IPv6Address = field(default_factory=lambda: IPv6Address("fd00::15"))

    def __post_init__(self) -> None:
        if self.max_half_open < 1:
            raise ValueError("--max-half-open must be at least 1")
        if not MIN_MTU <= self.mtu <= MTU_LIMIT:
            raise ValueError(f"--mtu must be between {MIN_MTU} and {MTU_LIMIT}")
        # The DNS address may lie outside the subnet (pasta's --dns-forward 169.254.1.1, as
        # podman passes it): the guest reaches it through the gateway, and guestnet answers it.
        for name in ("gateway", "guest_ip"):
            addr = getattr(self, name)
            if addr not in self.subnet:
                raise ValueError(
                    f"--{name.replace('_', '-')} {addr} is outside --subnet {self.subnet}"
                )
        if self.subnet.prefixlen > 30:
            raise ValueError("--subnet must leave room for a guest (prefix /30 or shorter)")
        if len({self.gateway, self.dns_ip, self.guest_ip}) != 3:
            raise ValueError("--gateway, --dns-ip and --guest-ip must differ")
        if len(self.mac) != 6 or len(self.guest_mac) != 6:
            raise ValueError("--mac and --guest-mac must be six bytes")
        if self.mac[0] & 1 or self.guest_mac[0] & 1:
            raise ValueError("--mac and --guest-mac must be unicast addresses")
        if not self.guest_return_timeout > 0:
            raise ValueError("--guest-return-timeout must be positive")
        if not 1 <= self.pool_slots <= 65536:
            raise ValueError("--pool-slots must be between 1 and 65536")
        if self.outbound_addr is not None:
            try:
                IPv4Address(self.outbound_addr)
            except ValueError:
                raise ValueError(f"not an IPv4 address: {self.outbound_addr!r}") from None
        self._check_ipv6()

    def _check_ipv6(self) -> None:
        prefix = self.ipv6_prefix
        if prefix.prefixlen > 64:
            raise ValueError("--ipv6-prefix must be /64 or shorter (SLAAC needs 64 bits)")
        if prefix.is_multicast or prefix.is_link_local or prefix.is_loopback:
            raise ValueError(f"--ipv6-prefix {prefix} is not a unicast global or ULA prefix")
        for name in ("gateway6", "dns_ip6", "guest_ip6"):
            addr = getattr(self, name)
            if addr not in prefix:
                raise ValueError(
                    f"--{name.replace('_', '-')} {addr} is outside --ipv6-prefix {prefix}"
                )
            if addr == prefix.network_address:
                raise ValueError(f"--{name.replace('_', '-')} {addr} is the subnet-router anycast")
        if len({self.gateway6, self.dns_ip6, self.guest_ip6}) != 3:
            raise ValueError("--gateway6, --dns-ip6 and --guest-ip6 must differ")

    @cached_property
    def gateway_b(self) -> bytes:
        """The gateway address packed, for comparing with header fields."""
        return self.gateway.packed

    @cached_property
    def dns_ip_b(self) -> bytes:
        """The DNS address packed."""
        return self.dns_ip.packed

    @cached_property
    def owned_b(self) -> frozenset[bytes]:
        """Every address guestnet answers for on the guest link (ARP, ICMP echo)."""
        return frozenset((self.gateway_b, self.dns_ip_b))

    @cached_property
    def netmask_b(self) -> bytes:
        """The subnet mask packed."""
        return self.subnet.netmask.packed

    @cached_property
    def broadcast_b(self) -> bytes:
        """The subnet's directed broadcast address packed."""
        return self.subnet.broadcast_address.packed

    @cached_property
    def link_local6(self) -> IPv6Address:
        """guestnet's IPv6 link-local address (modified EUI-64 of ``mac``, RFC 4291 2.5.1): the
        router's address, source of its advertisements."""
        return eui64_address(IPv6Network("fe80::/64"), self.mac)

    @cached_property
    def gateway6_b(self) -> bytes:
        """The IPv6 gateway address packed."""
        return self.gateway6.packed

    @cached_property
    def dns_ip6_b(self) -> bytes:
        """The IPv6 DNS address packed."""
        return self.dns_ip6.packed

    @cached_property
    def owned6_b(self) -> frozenset[bytes]:
        """Every IPv6 address guestnet answers for on the guest link (NDP, ICMPv6 echo)."""
        return frozenset((self.gateway6_b, self.dns_ip6_b, self.link_local6.packed))


def eui64_address(prefix: IPv6Network, mac: bytes) -> IPv6Address:
    """The address in ``prefix`` (/64) whose interface identifier is ``mac``'s modified EUI-64."""
    iid = bytes((mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]))
    return IPv6Address(prefix.network_address.packed[:8] + iid)
