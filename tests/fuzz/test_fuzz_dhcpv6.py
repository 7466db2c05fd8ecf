"""Fuzz the DHCPv6 parser and server: random bytes, and scripts of mutated client messages.

Seeds are valid messages of every type a client sends (built by scapy) from three clients,
each maybe mutated (flip, overwrite, truncate, extend, splice) before it reaches the server, on
a clock that moves forward by random steps. After every step: nothing but WireError (with a
``dhcp6.`` reason) was raised, counters only grew, every reply is a well-formed Ethernet/IPv6/
UDP frame from port 547 to 546 with a correct checksum holding a DHCPv6 Advertise or Reply that
our parser reads back, the lease table is within its bound and its two indexes agree, and no
pooled frame is left checked out.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import (
    DUID_LL,
    DHCP6_Confirm,
    DHCP6_Decline,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
)

import guestnet.core.dhcpv6 as dhcpv6_core
from guestnet.config import Config
from guestnet.core.dhcpv6 import Dhcpv6Server
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.checksum import checksum, pseudo_header_sum
from guestnet.wire.dhcpv6 import ADVERTISE, REPLY, parse_dhcpv6
from guestnet.wire.l3 import IPV6

FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MACS = [bytes.fromhex(m) for m in ("525400123456", "525400000002", "525400000003")]
OUR_MAC = bytes.fromhex("52550a000202")
ALL_SERVERS = bytes.fromhex("ff020000000000000000000000010002")


FAMILY = IPV6  # the server builds its replies through the packet's family


def ll(mac: bytes) -> bytes:
    return b"\xfe\x80" + bytes(6) + bytes((mac[0] ^ 2, mac[1], mac[2], 0xFF, 0xFE, *mac[3:]))


def _seeds() -> list[tuple[int, bytes]]:
    """(client index, DHCPv6 payload) for every message type, from each client."""
    sid = DHCP6OptServerId(duid=DUID_LL(lladdr=OUR_MAC.hex(":")))
    out: list[tuple[int, bytes]] = []
    for i, mac in enumerate(MACS):
        cid = DHCP6OptClientId(duid=DUID_LL(lladdr=mac.hex(":")))
        addr = f"fd00::{0x15 + i:x}"

        def ia(iaid: int = 1, *addrs: str) -> Any:
            return DHCP6OptIA_NA(iaid=iaid, ianaopts=[DHCP6OptIAAddress(addr=a) for a in addrs])

        msgs = [
            DHCP6_Solicit(trid=i) / cid / DHCP6OptElapsedTime() / ia()
            / DHCP6OptOptReq(reqopts=[23, 24]),
            DHCP6_Solicit(trid=i) / cid / DHCP6OptRapidCommit() / ia(2) / DHCP6OptIA_PD(iaid=3),
            DHCP6_Request(trid=i) / cid / sid / ia(1, addr),
            DHCP6_Renew(trid=i) / cid / sid / ia(1, addr, "fd00::99"),
            DHCP6_Rebind(trid=i) / cid / ia(1, addr),
            DHCP6_Release(trid=i) / cid / sid / ia(1, addr),
            DHCP6_Decline(trid=i) / cid / sid / ia(1, addr),
            DHCP6_Confirm(trid=i) / cid / ia(1, addr, "2001:db8::1"),
            DHCP6_InfoRequest(trid=i) / cid,
        ]  # fmt: skip
        out.extend((i, bytes(m)) for m in msgs)
    return out


SEEDS = _seeds()

step = st.tuples(
    st.integers(0, len(SEEDS) - 1),
    st.sampled_from(["none", "flip", "overwrite", "truncate", "extend", "splice"]),
    st.integers(0, 400),
    st.binary(min_size=1, max_size=24),
    st.floats(0, 2000, allow_nan=False),
)


def _mutate(data: bytes, op: str, pos: int, blob: bytes) -> bytes:
    pos %= len(data) + 1
    if op == "flip" and pos < len(data):
        return data[:pos] + bytes((data[pos] ^ blob[0],)) + data[pos + 1 :]
    if op == "overwrite":
        return data[:pos] + blob + data[pos + len(blob) :]
    if op == "truncate":
        return data[:pos]
    if op == "extend":
        return data + blob
    if op == "splice":
        other = SEEDS[blob[0] % len(SEEDS)][1]
        return data[:pos] + other[pos % len(other) :]
    return data


def _check_reply(frame: bytes, mac: bytes) -> None:
    assert frame[:6] == mac and frame[6:12] == OUR_MAC
    assert frame[12:14] == b"\x86\xdd"
    vtc, plen, nh, _, src, dst = struct.unpack_from("!IHBB16s16s", frame, 14)
    assert vtc >> 28 == 6 and nh == 17
    assert len(frame) == 54 + plen
    assert dst == ll(mac)
    udp = frame[54:]
    sport, dport, ulen, _ = struct.unpack_from("!HHHH", udp)
    assert (sport, dport, ulen) == (547, 546, plen)
    assert checksum(udp, pseudo_header_sum(src, dst, 17, ulen)) == 0
    msg = parse_dhcpv6(udp[8:])
    assert msg.msg_type in (ADVERTISE, REPLY)


@FUZZ_SETTINGS
@given(st.binary(max_size=600))
def test_parser_raises_only_wire_error(data: bytes) -> None:
    try:
        msg = parse_dhcpv6(data)
    except WireError as exc:
        assert exc.reason.startswith("dhcp6.")
        return
    assert 0 <= msg.xid < 1 << 24


@FUZZ_SETTINGS
@given(st.lists(step, min_size=1, max_size=30))
def test_server_scripts(steps: list[tuple[int, str, int, bytes, float]]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dhcpv6_core, "MAX_LEASES", 4)
        config = Config()
        pool = FramePool(config.mtu, 4)
        counters = Counters()
        server = Dhcpv6Server(config, pool, counters)
        sent: list[Frame] = []
        port = Port("fuzz", sent.append)
        now = 0.0
        for index, op, pos, blob, dt in steps:
            now += dt
            client, seed = SEEDS[index]
            payload = _mutate(seed, op, pos, blob)
            mac = MACS[client]
            before = counters.snapshot()
            pkt = IpPacket(
                port,
                mac,
                None,
                memoryview(b""),
                False,
                FAMILY,
                ll(mac),
                ALL_SERVERS,
                17,
                1,  # type: ignore[arg-type]
            )
            try:
                server.handle_udp(pkt, 546, 547, memoryview(payload), now)
            except WireError as exc:
                assert exc.reason.startswith("dhcp6.")
            for frame in sent:
                _check_reply(bytes(frame.data), mac)
                pool.release(frame)
            sent.clear()
            assert pool.in_use == 0
            for name, value in before.items():
                assert counters[name] >= value
            by_key, by_addr = server._by_key, server._by_addr
            assert len(by_key) <= 4
            assert all(by_key.get(lease.key) is lease for lease in by_addr.values())
            assert all(by_addr.get(lease.addr) is lease for lease in by_key.values())
            assert len(server.leases(now)) <= 4
