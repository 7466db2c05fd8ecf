"""Types of the C extension guestnet.wire._native; guestnet/wire/pure.py documents each function."""

from collections.abc import Container

from guestnet.wire.pure import (
    Buffer,
    DnsQuestion,
    FastFrame,
    FastTcp,
    FastUdp,
    Ipv4Fields,
    TcpOptionFields,
)

def ones_sum(data: Buffer, initial: int = 0, /) -> int: ...
def checksum(data: Buffer, initial: int = 0, /) -> int: ...
def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int, /) -> int: ...
def tcp_fast4(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    dns_dsts: Container[bytes],
    verify: bool,
    /,
) -> FastTcp | None: ...
def tcp_fast6(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    dns6_dsts: Container[bytes],
    verify: bool,
    /,
) -> FastTcp | None: ...
def udp_fast4(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    verify: bool,
    /,
) -> FastUdp | None: ...
def udp_fast6(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    verify: bool,
    /,
) -> FastUdp | None: ...
def fast_parse(
    frame: memoryview,
    our_mac: bytes,
    guest_mac: bytes | None,
    broadcast: bytes,
    dns_dsts: Container[bytes],
    dns6_dsts: Container[bytes],
    verify: bool,
    /,
) -> FastFrame | None: ...
def dns_question(data: Buffer, /) -> DnsQuestion | None: ...
def parse_ipv4(data: Buffer, verify: bool, /) -> Ipv4Fields: ...
def tcp_options(data: Buffer, header_len: int, /) -> TcpOptionFields: ...
def build_tcp_frame(
    buf: memoryview | bytearray,
    start: int,
    version: int,
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    ident: int,
    plen: int,
    options: bytes,
    partial: bool,
    /,
) -> int: ...
def build_udp_frame(
    buf: memoryview | bytearray,
    start: int,
    version: int,
    dst_mac: bytes,
    src_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload_len: int,
    ident: int,
    dont_fragment: bool,
    /,
) -> int: ...
