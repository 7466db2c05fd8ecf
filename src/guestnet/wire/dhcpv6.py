"""DHCPv6 messages and options (RFC 8415, RFC 3646): parse client messages, build replies.

A client/server message is a one-byte message type, a three-byte transaction id, then options
as code (2 bytes) / length (2 bytes) / value. Some options hold options of their own: an IA_NA
(3) is an IAID, T1 and T2 followed by IA Address options (5), and an IA Address is an address,
two lifetimes and options (a Status Code, 13). :func:`parse_dhcpv6` reads the top level;
:func:`parse_ia_na` and :func:`parse_ia_address` read the nested ones when the server gets to
them, with the same framing rules.

Relay messages (Relay-Forward 12, Relay-Reply 13) have a different header (hop count and two
addresses); no relay sits between a guest and guestnet, so :func:`parse_dhcpv6` reads only their
type, and the server counts and drops them.

Everything a guest sends is bounds-checked: a short message, an option running past the end,
more options than any client sends, a DUID of the wrong length, an option Request list of odd
length, an IA or IA Address too short: each raises :class:`WireError` with a dotted reason that
the caller counts. Builders write into a caller's buffer (the reply's pooled frame) or return
small ``bytes`` for the options a server prepares once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from guestnet.wire import WireError

#: UDP ports: clients listen on 546, servers and relays on 547 (RFC 8415 §7.2).
DHCPV6_CLIENT_PORT = 546
DHCPV6_SERVER_PORT = 547
#: All_DHCP_Relay_Agents_and_Servers, where clients send (RFC 8415 §7.1).
ALL_DHCP_SERVERS = bytes.fromhex("ff020000000000000000000000010002")

# Message types (RFC 8415 §7.3).
SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
RECONFIGURE = 10
INFORMATION_REQUEST = 11
RELAY_FORW = 12
RELAY_REPL = 13

# Option codes (RFC 8415 §21, RFC 3646).
OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25

# Status codes (RFC 8415 §21.13).
STATUS_SUCCESS = 0
STATUS_UNSPEC_FAIL = 1
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NO_BINDING = 3
STATUS_NOT_ON_LINK = 4
STATUS_USE_MULTICAST = 5
STATUS_NO_PREFIX_AVAIL = 6

# DUID types (RFC 8415 §11).
DUID_LLT = 1
DUID_EN = 2
DUID_LL = 3
DUID_UUID = 4
HWTYPE_ETHERNET = 1

#: The message header: type and transaction id.
DHCPV6_HLEN = 4
#: An option's code and length.
OPTION_HLEN = 4
#: A DUID is a 2-byte type and at most 128 bytes (RFC 8415 §11.1); at least a type and a byte.
DUID_MIN_LEN = 3
DUID_MAX_LEN = 130
#: IA_NA fixed part (IAID, T1, T2) and IA Address fixed part (address, preferred, valid).
IA_NA_LEN = 12
IAADDR_LEN = 24
#: Lifetime meaning "forever" (RFC 8415 §7.7).
INFINITY = 0xFFFFFFFF
#: More options in one list than any real client sends; a bound on the parser's work.
MAX_OPTIONS = 64

_OPT = struct.Struct("!HH")
_IA = struct.Struct("!III")
_IAADDR = struct.Struct("!16sII")

#: An option: code and value.
Option = tuple[int, bytes]


class Dhcpv6Message(NamedTuple):
    """A parsed client/server message (for relay messages, only the type)."""

    msg_type: int
    #: The 24-bit transaction id.
    xid: int
    #: The top-level options in the order sent, repeats kept (a client sends one IA_NA per IA).
    options: tuple[Option, ...]

    def get(self, code: int) -> bytes | None:
        """The first option ``code``, or None."""
        for c, value in self.options:
            if c == code:
                return value
        return None

    def all(self, code: int) -> list[bytes]:
        """Every option ``code``, in order."""
        return [value for c, value in self.options if c == code]


class IaNa(NamedTuple):
    """An Identity Association for Non-temporary Addresses (RFC 8415 §21.4)."""

    iaid: int
    t1: int
    t2: int
    options: tuple[Option, ...]

    def addresses(self) -> list[IaAddress]:
        """The IA Address options inside, parsed (WireError on a malformed one)."""
        return [parse_ia_address(value) for code, value in self.options if code == OPT_IAADDR]


class IaAddress(NamedTuple):
    """An IA Address option (RFC 8415 §21.6)."""

    address: bytes
    preferred: int
    valid: int
    options: tuple[Option, ...]


def parse_options(data: memoryview | bytes, start: int, end: int, what: str) -> tuple[Option, ...]:
    """Read option TLVs from ``data[start:end]``; ``what`` names the list in error reasons."""
    out: list[Option] = []
    i = start
    while i < end:
        if i + OPTION_HLEN > end:
            raise WireError(f"dhcp6.{what}.truncated")
        code, length = _OPT.unpack_from(data, i)
        value_end = i + OPTION_HLEN + length
        if value_end > end:
            raise WireError(f"dhcp6.{what}.truncated")
        if len(out) >= MAX_OPTIONS:
            raise WireError(f"dhcp6.{what}.too_many")
        out.append((code, bytes(data[i + OPTION_HLEN : value_end])))
        i = value_end
    return tuple(out)


def parse_dhcpv6(data: memoryview | bytes) -> Dhcpv6Message:
    """Parse a DHCPv6 message (the UDP payload).

    The framing is checked here, and the options the server relies on whatever the message:
    the Client and Server IDs must be DUIDs of a plausible length, the Elapsed Time two bytes,
    Rapid Commit empty. Which options a message type needs is the server's business.
    """
    if len(data) < DHCPV6_HLEN:
        raise WireError("dhcp6.truncated")
    msg_type = data[0]
    xid = int.from_bytes(data[1:4], "big")
    if msg_type in (RELAY_FORW, RELAY_REPL):
        return Dhcpv6Message(msg_type, xid, ())
    options = parse_options(data, DHCPV6_HLEN, len(data), "options")
    for code, value in options:
        length = len(value)
        if code in (OPT_CLIENTID, OPT_SERVERID) and not DUID_MIN_LEN <= length <= DUID_MAX_LEN:
            raise WireError("dhcp6.duid.bad_length")
        if code == OPT_ELAPSED_TIME and length != 2:
            raise WireError("dhcp6.elapsed_time.bad_length")
        if code == OPT_RAPID_COMMIT and length:
            raise WireError("dhcp6.rapid_commit.bad_length")
        if code == OPT_ORO and length % 2:
            raise WireError("dhcp6.oro.bad_length")
    return Dhcpv6Message(msg_type, xid, options)


def parse_ia_na(value: bytes) -> IaNa:
    """Parse an IA_NA option's value."""
    if len(value) < IA_NA_LEN:
        raise WireError("dhcp6.ia_na.truncated")
    iaid, t1, t2 = _IA.unpack_from(value, 0)
    return IaNa(iaid, t1, t2, parse_options(value, IA_NA_LEN, len(value), "ia_na"))


def parse_ia_address(value: bytes) -> IaAddress:
    """Parse an IA Address option's value."""
    if len(value) < IAADDR_LEN:
        raise WireError("dhcp6.iaaddr.truncated")
    address, preferred, valid = _IAADDR.unpack_from(value, 0)
    return IaAddress(
        address, preferred, valid, parse_options(value, IAADDR_LEN, len(value), "iaaddr")
    )


def parse_oro(value: bytes) -> tuple[int, ...]:
    """The option codes an Option Request option asks for."""
    if len(value) % 2:
        raise WireError("dhcp6.oro.bad_length")
    return struct.unpack(f"!{len(value) // 2}H", value)


def parse_status(value: bytes) -> tuple[int, str]:
    """A Status Code option's code and message (UTF-8, undecodable bytes replaced)."""
    if len(value) < 2:
        raise WireError("dhcp6.status.truncated")
    return int.from_bytes(value[:2], "big"), value[2:].decode("utf-8", "replace")


def duid_mac(duid: bytes) -> bytes | None:
    """The Ethernet address in a DUID-LLT or DUID-LL, or None for other DUIDs."""
    if len(duid) == 10 and duid[:4] == struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET):
        return duid[4:]
    if len(duid) == 14 and duid[:4] == struct.pack("!HH", DUID_LLT, HWTYPE_ETHERNET):
        return duid[8:]
    return None


# ------------------------------------------------------------------------------------- builders


def duid_ll(mac: bytes) -> bytes:
    """A DUID-LL (RFC 8415 §11.4) for an Ethernet address: stable, and needs no clock."""
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + mac


def encode_option(code: int, value: bytes) -> bytes:
    """One option; ValueError when the value does not fit the 16-bit length."""
    if len(value) > 0xFFFF:
        raise ValueError(f"DHCPv6 option {code} too long")
    return _OPT.pack(code, len(value)) + value


def encode_options(options: Iterable[Option]) -> bytes:
    """Options in the given order."""
    return b"".join(encode_option(code, value) for code, value in options)


def encode_status(code: int, message: str = "") -> bytes:
    """A Status Code option."""
    return encode_option(OPT_STATUS_CODE, struct.pack("!H", code) + message.encode("utf-8"))


def encode_ia_address(address: bytes, preferred: int, valid: int, options: bytes = b"") -> bytes:
    """An IA Address option; ``options`` already encoded."""
    return encode_option(OPT_IAADDR, _IAADDR.pack(address, preferred, valid) + options)


def encode_ia_na(iaid: int, t1: int, t2: int, options: bytes = b"") -> bytes:
    """An IA_NA option; ``options`` (IA Addresses, a Status Code) already encoded."""
    return encode_option(OPT_IA_NA, _IA.pack(iaid, t1, t2) + options)


def encode_domain_list(domains: Iterable[str]) -> bytes:
    """The value of a Domain Search List option (24): DNS names in wire format, uncompressed.

    RFC 3646 §4 says the list is encoded as in RFC 1035 §3.1, and RFC 8415 §10 forbids
    compression in DHCPv6. Raises ValueError for a name that is not a valid DNS name.
    """
    out = bytearray()
    for domain in domains:
        name = domain.strip().rstrip(".")
        if not name:
            raise ValueError(f"empty DNS search domain: {domain!r}")
        if len(name) > 253:
            raise ValueError(f"DNS search domain too long: {domain!r}")
        for label in name.split("."):
            if not 1 <= len(label) <= 63 or not label.isascii():
                raise ValueError(f"bad label in DNS search domain: {domain!r}")
            raw = label.encode("ascii")
            out.append(len(raw))
            out += raw
        out.append(0)
    return bytes(out)


def build_dhcpv6(
    buf: memoryview | bytearray, off: int, msg_type: int, xid: int, options: bytes
) -> int:
    """Write a message (header, then ``options`` already encoded) at ``off``; return its end."""
    buf[off] = msg_type
    buf[off + 1 : off + 4] = (xid & 0xFFFFFF).to_bytes(3, "big")
    end = off + DHCPV6_HLEN + len(options)
    buf[off + DHCPV6_HLEN : end] = options
    return end
