"""BOOTP/DHCPv4 messages (RFC 951, RFC 2131, RFC 2132): parse requests, build replies.

A DHCP message is a fixed 236-byte BOOTP header, the 4-byte magic cookie 99.130.83.99, then
options as code/length/value triples (0 is a one-byte pad, 255 ends the list). Two corners of the
format matter to a server:

- Option overload (option 52) moves more options into the ``file`` and ``sname`` fields; they are
  read in the order RFC 2131 §4.1 gives (options field, then ``file``, then ``sname``).
- An option longer than 255 bytes is sent as several instances of the same code which the reader
  concatenates (RFC 3396); :func:`parse_dhcp` joins them and :func:`encode_options` splits long
  values the same way. The search list (option 119) is where this happens in practice.

Everything a guest sends is bounds-checked: a short message, a wrong cookie, an option running
past the end, or an absurd number of options raises :class:`WireError` with a dotted reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from guestnet.wire import WireError

#: UDP ports: servers listen on 67, clients on 68 (RFC 2131 §4.1).
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
#: The fixed BOOTP header: op .. file, before the magic cookie.
BOOTP_HLEN = 236
MAGIC_COOKIE = b"\x63\x82\x53\x63"
#: Fixed header plus cookie: where the options start.
OPTIONS_OFFSET = BOOTP_HLEN + 4
#: BOOTP relays and old clients expect at least a 300-byte message (RFC 951 had 64 vendor bytes).
BOOTP_MIN_LEN = 300
#: Every client must accept an IP datagram of 576 bytes, so a DHCP message of 548 (RFC 2131 §2).
DHCP_MIN_MAX_MESSAGE = 576
#: Broadcast bit in the ``flags`` field (RFC 2131 §2, figure 2).
FLAG_BROADCAST = 0x8000
#: More distinct option instances than any real client sends; a bound on the parser's work.
MAX_OPTIONS = 256

SNAME_OFFSET = 44
SNAME_LEN = 64
FILE_OFFSET = 108
FILE_LEN = 128

# Message types (option 53).
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# Option codes used here.
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOST_NAME = 12
OPT_DOMAIN_NAME = 15
OPT_INTERFACE_MTU = 26
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
OPT_END = 255

# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr(16)
_HDR = struct.Struct("!BBBBIHH4s4s4s4s16s")


class DhcpMessage(NamedTuple):
    """A parsed BOOTP/DHCP message. Addresses are 4 packed bytes; ``chaddr`` is the 6-byte MAC."""

    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes
    #: Option code -> value, repeated instances concatenated (RFC 3396); pad and end left out.
    options: dict[int, bytes]

    @property
    def message_type(self) -> int | None:
        """Option 53, or None for a plain BOOTP message (or a malformed one)."""
        value = self.options.get(OPT_MESSAGE_TYPE)
        if value is None or len(value) != 1:
            return None
        return value[0]


def _parse_options(
    data: memoryview | bytes, start: int, end: int, options: dict[int, bytes], seen: list[int]
) -> bool:
    """Read options from ``data[start:end]`` into ``options``; True if an end option was met.

    ``seen`` is a one-element counter of instances shared across the overloaded fields, so the
    bound on the parser's work holds for the whole message.
    """
    i = start
    while i < end:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return True
        if i + 1 >= end:
            raise WireError("dhcp.options.truncated")
        length = data[i + 1]
        value_end = i + 2 + length
        if value_end > end:
            raise WireError("dhcp.options.truncated")
        seen[0] += 1
        if seen[0] > MAX_OPTIONS:
            raise WireError("dhcp.options.too_many")
        value = bytes(data[i + 2 : value_end])
        old = options.get(code)
        options[code] = value if old is None else old + value
        i = value_end
    return False


def parse_dhcp(data: memoryview | bytes) -> DhcpMessage:
    """Parse a BOOTP/DHCP message (the UDP payload).

    Only what any message needs is checked here (length, cookie, option framing); whether it is a
    request from an Ethernet client is the server's business, so it can count that separately.
    """
    if len(data) < OPTIONS_OFFSET:
        raise WireError("dhcp.truncated")
    if bytes(data[BOOTP_HLEN:OPTIONS_OFFSET]) != MAGIC_COOKIE:
        raise WireError("dhcp.bad_cookie")
    op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr = (
        _HDR.unpack_from(data, 0)
    )
    options: dict[int, bytes] = {}
    seen = [0]
    # A message without an end option is tolerated: some clients stop at the datagram's end.
    _parse_options(data, OPTIONS_OFFSET, len(data), options, seen)
    overload = options.get(OPT_OVERLOAD)
    if overload is not None and len(overload) == 1:
        if overload[0] & 1:
            _parse_options(data, FILE_OFFSET, FILE_OFFSET + FILE_LEN, options, seen)
        if overload[0] & 2:
            _parse_options(data, SNAME_OFFSET, SNAME_OFFSET + SNAME_LEN, options, seen)
    return DhcpMessage(
        op,
        htype,
        hlen,
        hops,
        xid,
        secs,
        flags,
        ciaddr,
        yiaddr,
        siaddr,
        giaddr,
        chaddr[: min(hlen, 16)],
        options,
    )


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode (code, value) pairs, splitting values over 255 bytes into instances (RFC 3396).

    No end option is added; :func:`build_dhcp` writes it.
    """
    out = bytearray()
    for code, value in options:
        if not value:
            out += bytes((code, 0))
            continue
        for i in range(0, len(value), 255):
            chunk = value[i : i + 255]
            out += bytes((code, len(chunk)))
            out += chunk
    return bytes(out)


def encode_search_list(domains: Iterable[str]) -> bytes:
    """Encode a DNS search list for option 119 (RFC 3397): DNS names with compression.

    Pointers are offsets into the concatenated option data, so a suffix shared by several domains
    is written once. Raises ValueError for a name that is not a valid DNS name.
    """
    out = bytearray()
    #: Suffix (as a tuple of lowercased labels) -> offset where it was written.
    written: dict[tuple[str, ...], int] = {}
    for domain in domains:
        name = domain.strip().rstrip(".")
        if not name:
            raise ValueError(f"empty DNS search domain: {domain!r}")
        labels = name.split(".")
        if len(name) > 253:
            raise ValueError(f"DNS search domain too long: {domain!r}")
        for label in labels:
            if not 1 <= len(label) <= 63 or not label.isascii():
                raise ValueError(f"bad label in DNS search domain: {domain!r}")
        for i in range(len(labels)):
            suffix = tuple(label.lower() for label in labels[i:])
            pointer = written.get(suffix)
            if pointer is not None:
                out += struct.pack("!H", 0xC000 | pointer)
                break
            if len(out) < 0x3FFF:
                written[suffix] = len(out)
            raw = labels[i].encode("ascii")
            out.append(len(raw))
            out += raw
        else:
            out.append(0)
    return bytes(out)


def build_dhcp(
    buf: memoryview | bytearray,
    off: int,
    op: int,
    xid: int,
    flags: int,
    ciaddr: bytes,
    yiaddr: bytes,
    siaddr: bytes,
    giaddr: bytes,
    chaddr: bytes,
    options: bytes,
    min_len: int = BOOTP_MIN_LEN,
) -> int:
    """Write a BOOTP/DHCP message at ``off`` with already-encoded ``options``; return its end.

    An end option follows the options, and the message is zero-padded to ``min_len`` bytes. The
    caller makes sure ``buf`` has room and that the result fits the client's maximum size.
    """
    _HDR.pack_into(
        buf, off, op, HTYPE_ETHERNET, len(chaddr), 0, xid, 0, flags, ciaddr, yiaddr, siaddr,
        giaddr, chaddr.ljust(16, b"\0"),
    )  # fmt: skip
    sname = off + SNAME_OFFSET
    buf[sname : off + BOOTP_HLEN] = bytes(SNAME_LEN + FILE_LEN)
    buf[off + BOOTP_HLEN : off + OPTIONS_OFFSET] = MAGIC_COOKIE
    i = off + OPTIONS_OFFSET
    buf[i : i + len(options)] = options
    i += len(options)
    buf[i] = OPT_END
    i += 1
    end = off + min_len
    if i < end:
        buf[i:end] = bytes(end - i)
        i = end
    return i


def message_length(options_len: int, min_len: int = BOOTP_MIN_LEN) -> int:
    """Length of the message :func:`build_dhcp` writes for ``options_len`` bytes of options."""
    return max(OPTIONS_OFFSET + options_len + 1, min_len)
