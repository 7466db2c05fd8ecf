"""DHCPv6 server: client messages built by scapy in, replies out, checked as golden bytes and
parsed field by field by scapy (``scapy.layers.dhcp6``)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import Any

import pytest
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_LL,
    DUID_LLT,
    DHCP6_Advertise,
    DHCP6_Confirm,
    DHCP6_Decline,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptDNSDomains,
    DHCP6OptDNSServers,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptPref,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

import guestnet.core.dhcpv6 as dhcpv6_core
from guestnet.config import Config
from guestnet.core.classifier import FrameClassifier
from guestnet.core.dhcpv6 import DECLINE_HOLD_S, OFFER_HOLD_S, Dhcpv6Server, check_config
from guestnet.core.packet import IpPacket
from guestnet.core.port import Port
from guestnet.core.switch import Switch
from guestnet.counters import Counters
from guestnet.pool import Frame, FramePool
from guestnet.wire import WireError
from guestnet.wire.dhcpv6 import (
    OPT_CLIENTID,
    OPT_IA_NA,
    duid_ll,
    duid_mac,
    encode_domain_list,
    encode_ia_address,
    encode_ia_na,
    encode_status,
    parse_dhcpv6,
    parse_ia_na,
    parse_oro,
    parse_status,
)
from guestnet.wire.l3 import IPV6

MAC1 = "52:54:00:12:34:56"
MAC2 = "52:54:00:00:00:02"
MAC3 = "52:54:00:00:00:03"
OUR_MAC = "52:55:0a:00:02:02"
OUR_LL = "fe80::5055:aff:fe00:202"
XID = 0x0A0B0C


def ll_of(mac: str) -> str:
    """A client's EUI-64 link-local address."""
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes((b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]))
    return str(IPv6Address(b"\xfe\x80" + bytes(6) + iid))


@dataclass
class Rig:
    config: Config
    pool: FramePool
    counters: Counters
    server: Dhcpv6Server
    classifier: FrameClassifier
    port: Port
    sent: list[Frame] = field(default_factory=list)

    def send(self, msg: Any, mac: str = MAC1, now: float = 0.0, **kw: Any) -> list[Any]:
        """Feed one client message in (Ethernet/IPv6/UDP around it); return scapy replies."""
        kw.setdefault("src", ll_of(mac))
        frame = (
            Ether(src=mac, dst="33:33:00:01:00:02")
            / IPv6(src=kw.pop("src"), dst=kw.pop("dst", "ff02::1:2"))
            / UDP(sport=546, dport=547)
            / msg
        )
        self.sent.clear()
        self.classifier.handle_frame(memoryview(bytes(frame)), self.port, now)
        out = [Ether(bytes(f.data)) for f in self.sent]
        for f in self.sent:
            self.pool.release(f)
        self.sent.clear()
        return out


def make_rig(**kw: Any) -> Rig:
    config = Config(**kw)
    pool = FramePool(config.mtu, 8)
    counters = Counters()
    switch = Switch(pool, counters)
    classifier = FrameClassifier(config, pool, counters, switch)
    server = Dhcpv6Server(config, pool, counters)
    classifier.dhcp6 = server
    sent: list[Frame] = []
    port = Port("test", sent.append)
    switch.attach(port)
    return Rig(config, pool, counters, server, classifier, port, sent)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = make_rig()
    yield r
    assert r.pool.in_use == 0


def cid(mac: str = MAC1) -> Any:
    return DHCP6OptClientId(duid=DUID_LL(lladdr=mac))


def sid(rig: Rig) -> Any:
    return DHCP6OptServerId(duid=DUID_LL(lladdr=OUR_MAC))


def ia(iaid: int = 1, *addrs: str) -> Any:
    return DHCP6OptIA_NA(
        iaid=iaid, ianaopts=[DHCP6OptIAAddress(addr=a, preflft=0, validlft=0) for a in addrs]
    )


def check_reply(reply: Any, kind: type, mac: str = MAC1) -> Any:
    """The headers every reply shares (addressing, checksum, IDs); return the DHCPv6 layer."""
    assert reply[Ether].src == OUR_MAC
    assert reply[Ether].dst == mac
    assert reply[IPv6].src == OUR_LL
    assert reply[IPv6].dst == ll_of(mac)
    assert reply[IPv6].nh == 17
    assert (reply[UDP].sport, reply[UDP].dport) == (547, 546)
    again = IPv6(bytes(reply[IPv6]))
    del again[UDP].chksum
    assert IPv6(bytes(again))[UDP].chksum == reply[UDP].chksum
    assert reply[IPv6].plen == len(bytes(reply[UDP]))
    msg = reply[kind]
    assert msg.trid == XID
    assert bytes(reply[DHCP6OptServerId].duid) == duid_ll(bytes.fromhex(OUR_MAC.replace(":", "")))
    assert reply[DHCP6OptClientId].duid.lladdr == mac
    return msg


def granted(reply: Any, iaid: int = 1) -> tuple[str, Any]:
    """The address granted in IA ``iaid`` and its IA option."""
    opt = reply[DHCP6OptIA_NA]
    while opt.iaid != iaid:
        opt = opt.payload[DHCP6OptIA_NA]
    addrs = [o for o in opt.ianaopts if isinstance(o, DHCP6OptIAAddress) and o.validlft]
    assert len(addrs) == 1
    return str(addrs[0].addr), opt


def status(layer: Any) -> int:
    return int(layer[DHCP6OptStatusCode].statuscode)


def bind(rig: Rig, mac: str = MAC1, iaid: int = 1, now: float = 0.0) -> str:
    """Solicit/Advertise/Request/Reply; return the address."""
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(mac) / ia(iaid), mac, now)
    addr, _ = granted(adv, iaid)
    (rep,) = rig.send(DHCP6_Request(trid=XID) / cid(mac) / sid(rig) / ia(iaid, addr), mac, now)
    assert granted(rep, iaid)[0] == addr
    return addr


# ------------------------------------------------------------------------------ golden bytes

ADVERTISE_GOLDEN = bytes.fromhex(
    "020a0b0c"
    "0002000a0003000152550a000202"  # Server ID: DUID-LL of --mac
    "0001000a00030001525400123456"  # Client ID echoed
    "00070001ff"  # Preference 255
    "00030028" "00000001" "00000708" "00000b40"  # IA_NA 1, T1 1800, T2 2880
    "00050018" "fd000000000000000000000000000015" "00000e10" "00000e10"  # fd00::15, 3600 s
    "00170010" "fd000000000000000000000000000003"  # DNS servers fd00::3
    "0018000d" "076578616d706c6503636f6d00"  # Domain list example.com
)  # fmt: skip


def test_advertise_golden_bytes() -> None:
    r = make_rig(dns_search=("example.com",))
    (adv,) = r.send(
        DHCP6_Solicit(trid=XID) / cid() / DHCP6OptElapsedTime() / ia(1)
        / DHCP6OptOptReq(reqopts=[23, 24])
    )  # fmt: skip
    assert bytes(adv[UDP].payload) == ADVERTISE_GOLDEN
    assert r.pool.in_use == 0


def test_builders_golden_bytes() -> None:
    addr = IPv6Address("fd00::15").packed
    assert encode_ia_address(addr, 1, 2) == bytes.fromhex(
        "00050018" + addr.hex() + "00000001" + "00000002"
    )
    assert encode_ia_na(7, 3, 4) == bytes.fromhex("0003000c000000070000000300000004")
    assert encode_status(4, "no") == bytes.fromhex("000d0004" "0004" "6e6f")  # fmt: skip
    assert duid_ll(bytes.fromhex("020000000001")) == bytes.fromhex("00030001020000000001")
    assert encode_domain_list(["a.b", "c."]) == b"\x01a\x01b\x00\x01c\x00"
    # scapy reads our domain list as the same names.
    opt = DHCP6OptDNSDomains(b"\x00\x18\x00\x07" + encode_domain_list(["a.b", "c."]))
    assert opt.dnsdomains == ["a.b.", "c."]


def test_parse_scapy_messages() -> None:
    raw = bytes(
        DHCP6_Request(trid=0x123456) / cid() / DHCP6OptServerId(duid=DUID_LL(lladdr=OUR_MAC))
        / DHCP6OptIA_NA(iaid=9, T1=10, T2=20, ianaopts=[DHCP6OptIAAddress(addr="fd00::99")])
        / DHCP6OptOptReq(reqopts=[23, 24]) / DHCP6OptElapsedTime(elapsedtime=5)
        / DHCP6OptRapidCommit()
    )  # fmt: skip
    msg = parse_dhcpv6(raw)
    assert (msg.msg_type, msg.xid) == (3, 0x123456)
    assert msg.get(OPT_CLIENTID) == duid_ll(bytes.fromhex("525400123456"))
    assert duid_mac(msg.get(OPT_CLIENTID) or b"") == bytes.fromhex("525400123456")
    (value,) = msg.all(OPT_IA_NA)
    ia_na = parse_ia_na(value)
    assert (ia_na.iaid, ia_na.t1, ia_na.t2) == (9, 10, 20)
    assert [IPv6Address(a.address) for a in ia_na.addresses()] == [IPv6Address("fd00::99")]
    assert parse_oro(msg.get(6) or b"") == (23, 24)
    assert msg.get(8) == b"\x00\x05"
    assert msg.get(14) == b""
    llt = bytes(DUID_LLT(lladdr=MAC2, timeval=1))
    assert duid_mac(llt) == bytes.fromhex("525400000002")
    assert parse_status(encode_status(3, "x")[4:]) == (3, "x")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x01\x00\x00", "dhcp6.truncated"),
        (b"\x01\x00\x00\x01\x00\x01\x00", "dhcp6.options.truncated"),
        (b"\x01\x00\x00\x01\x00\x01\x00\x05abc", "dhcp6.options.truncated"),
        (b"\x01\x00\x00\x01" + b"\x00\x63\x00\x00" * 65, "dhcp6.options.too_many"),
        (b"\x01\x00\x00\x01\x00\x01\x00\x02ab", "dhcp6.duid.bad_length"),
        (
            b"\x01\x00\x00\x01\x00\x02" + struct.pack("!H", 131) + bytes(131),
            "dhcp6.duid.bad_length",
        ),
        (b"\x01\x00\x00\x01\x00\x08\x00\x01a", "dhcp6.elapsed_time.bad_length"),
        (b"\x01\x00\x00\x01\x00\x0e\x00\x01a", "dhcp6.rapid_commit.bad_length"),
        (b"\x01\x00\x00\x01\x00\x06\x00\x03abc", "dhcp6.oro.bad_length"),
    ],
)
def test_parse_malformed(raw: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        parse_dhcpv6(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("ia_value", "reason"),
    [
        (bytes(11), "dhcp6.ia_na.truncated"),
        (bytes(12) + b"\x00\x05\x00\x04abcd", "dhcp6.iaaddr.truncated"),
        (bytes(12) + b"\x00\x05\x00\x20" + bytes(10), "dhcp6.ia_na.truncated"),
        (bytes(12) + b"\x00\x05\x00\x1b" + bytes(24) + b"\x00\x0d\x00", "dhcp6.iaaddr.truncated"),
    ],
)
def test_malformed_ia_counted_and_stateless(rig: Rig, ia_value: bytes, reason: str) -> None:
    """A malformed IA is counted by its reason (the classifier counts WireError), no lease."""
    raw = bytes(DHCP6_Solicit(trid=XID) / cid()) + b"\x00\x03" + struct.pack("!H", len(ia_value))
    assert rig.send(DHCP6(raw + ia_value)) == []
    assert rig.counters[reason] == 1
    assert rig.server._by_key == {}


def test_malformed_options_counted(rig: Rig) -> None:
    """Through the classifier: a parser error is a counted drop, and the next message works."""
    good = bytes(DHCP6_Solicit(trid=XID) / cid() / ia(1))
    assert rig.send(DHCP6(good[:-3])) == []
    assert rig.send(DHCP6(good + b"\x00\x08\x00\x01\x00")) == []
    assert rig.counters["dhcp6.options.truncated"] == 1
    assert rig.counters["dhcp6.elapsed_time.bad_length"] == 1
    assert len(rig.send(DHCP6(good))) == 1


def test_check_config() -> None:
    with pytest.raises(ValueError, match="--dns-search"):
        check_config(Config(dns_search=("a" * 64 + ".com",)))
    check_config(Config(dns_search=("example.com", "corp.example")))


# --------------------------------------------------------------------------------- exchanges


def test_solicit_advertise(rig: Rig) -> None:
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid() / DHCP6OptElapsedTime() / ia(1))
    check_reply(adv, DHCP6_Advertise)
    assert adv[DHCP6OptPref].prefval == 255
    addr, opt = granted(adv)
    assert addr == "fd00::15"
    assert (opt.iaid, opt.T1, opt.T2) == (1, 1800, 2880)
    iaaddr = opt.ianaopts[0]
    assert (iaaddr.preflft, iaaddr.validlft) == (3600, 3600)
    assert adv[DHCP6OptDNSServers].dnsservers == ["fd00::3"]
    assert DHCP6OptRapidCommit not in adv
    assert rig.counters["dhcp6.solicit"] == 1
    assert rig.counters["dhcp6.advertise.sent"] == 1
    # Advertised, not bound.
    assert rig.server.leases(0.0) == []


def test_request_reply_and_leases(rig: Rig) -> None:
    rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(5), now=10.0)
    (rep,) = rig.send(DHCP6_Request(trid=XID) / cid() / sid(rig) / ia(5, "fd00::15"), now=20.0)
    check_reply(rep, DHCP6_Reply)
    assert granted(rep, 5)[0] == "fd00::15"
    assert rep[DHCP6OptDNSServers].dnsservers == ["fd00::3"]
    assert rig.server.leases(30.0) == [
        {
            "mac": MAC1,
            "ip": "fd00::15",
            "hostname": None,
            "expires_in_s": 3590.0,
            "static": False,
            "duid": "00:03:00:01:52:54:00:12:34:56",
            "iaid": 5,
        }
    ]
    assert rig.server.guest_address() == IPv6Address("fd00::15")
    assert rig.server.leases(3620.0) == []


def test_rapid_commit(rig: Rig) -> None:
    (rep,) = rig.send(DHCP6_Solicit(trid=XID) / cid() / DHCP6OptRapidCommit() / ia(1))
    check_reply(rep, DHCP6_Reply)
    assert DHCP6OptRapidCommit in rep
    assert granted(rep)[0] == "fd00::15"
    assert [lease["ip"] for lease in rig.server.leases(0.0)] == ["fd00::15"]
    assert rig.counters["dhcp6.rapid_commit"] == 1


def test_second_client_gets_next_address(rig: Rig) -> None:
    assert bind(rig, MAC1) == "fd00::15"
    assert bind(rig, MAC2) == "fd00::16"
    # A third client's Advertise holds fd00::17 from a fourth one.
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(MAC3) / ia(1), MAC3)
    assert granted(adv)[0] == "fd00::17"
    assert bind(rig, "52:54:00:00:00:04") == "fd00::18"
    # Two IAs of one client are two leases.
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(MAC1) / ia(1) / ia(2))
    assert granted(adv, 1)[0] == "fd00::15"
    assert granted(adv, 2)[0] == "fd00::19"
    # The first client soliciting again keeps its bound lease.
    assert [lease["ip"] for lease in rig.server.leases(1.0)] == [
        "fd00::15", "fd00::16", "fd00::18",
    ]  # fmt: skip


def test_advertise_hold_expires(rig: Rig) -> None:
    rig.send(DHCP6_Solicit(trid=XID) / cid(MAC1) / ia(1), MAC1, now=0.0)
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(MAC2) / ia(1), MAC2, now=OFFER_HOLD_S - 1)
    assert granted(adv)[0] == "fd00::16"
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(MAC3) / ia(1), MAC3, now=OFFER_HOLD_S + 1)
    assert granted(adv)[0] == "fd00::15"


def test_renew_and_rebind_extend(rig: Rig) -> None:
    addr = bind(rig)
    (rep,) = rig.send(DHCP6_Renew(trid=XID) / cid() / sid(rig) / ia(1, addr), now=1800.0)
    check_reply(rep, DHCP6_Reply)
    assert granted(rep)[0] == addr
    assert rig.server.leases(1800.0)[0]["expires_in_s"] == 3600.0
    (rep,) = rig.send(DHCP6_Rebind(trid=XID) / cid() / ia(1, addr), now=3000.0)
    check_reply(rep, DHCP6_Reply)
    assert granted(rep)[0] == addr
    assert rig.server.leases(3000.0)[0]["expires_in_s"] == 3600.0
    assert rig.counters["dhcp6.renew"] == 1
    assert rig.counters["dhcp6.rebind"] == 1


def test_renew_after_restart_keeps_address() -> None:
    """A server that lost its table grants a renewing client its address if it is free."""
    r = make_rig()
    (rep,) = r.send(DHCP6_Renew(trid=XID) / cid(MAC2) / sid(r) / ia(3, "fd00::42"), MAC2)
    assert granted(rep, 3)[0] == "fd00::42"
    # An address off the link is not granted: it comes back with lifetimes 0, a new one beside.
    (rep,) = r.send(DHCP6_Rebind(trid=XID) / cid(MAC3) / ia(1, "2001:db8::1"), MAC3)
    addr, opt = granted(rep)
    assert addr == "fd00::15"
    dead = [o for o in opt.ianaopts if isinstance(o, DHCP6OptIAAddress) and not o.validlft]
    assert [str(o.addr) for o in dead] == ["2001:db8::1"]
    assert dead[0].preflft == 0
    assert r.pool.in_use == 0


def test_server_id_mismatch_ignored(rig: Rig) -> None:
    rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(1))
    other = DHCP6OptServerId(duid=DUID_LL(lladdr="02:00:00:00:00:99"))
    assert rig.send(DHCP6_Request(trid=XID) / cid() / other / ia(1, "fd00::15")) == []
    assert rig.send(DHCP6_Renew(trid=XID) / cid() / other / ia(1, "fd00::15")) == []
    assert rig.send(DHCP6_InfoRequest(trid=XID) / cid() / other) == []
    assert rig.counters["dhcp6.other_server"] == 3
    assert rig.server.leases(0.0) == []


def test_rule_violations_dropped(rig: Rig) -> None:
    # A Solicit with a Server ID, a Request without one, a Renew without a Client ID.
    assert rig.send(DHCP6_Solicit(trid=XID) / cid() / sid(rig) / ia(1)) == []
    assert rig.send(DHCP6_Request(trid=XID) / cid() / ia(1)) == []
    assert rig.send(DHCP6_Renew(trid=XID) / sid(rig) / ia(1)) == []
    assert rig.send(DHCP6_InfoRequest(trid=XID) / cid() / ia(1)) == []
    assert rig.counters["dhcp6.solicit.invalid"] == 1
    assert rig.counters["dhcp6.request.invalid"] == 1
    assert rig.counters["dhcp6.renew.invalid"] == 1
    assert rig.counters["dhcp6.information_request.invalid"] == 1


def test_other_messages_counted(rig: Rig) -> None:
    assert rig.send(DHCP6_Reply(trid=XID) / cid()) == []
    assert rig.send(DHCP6(b"\x0c\x00" + bytes(32))) == []
    assert rig.send(DHCP6(b"\x63\x00\x00\x01")) == []
    assert rig.counters["dhcp6.message_type.server_only"] == 1
    assert rig.counters["dhcp6.relay.unsupported"] == 1
    assert rig.counters["dhcp6.message_type.unknown"] == 1
    # Not to us: another unicast address, or a multicast group that is not the servers'. The
    # classifier routes neither here; the server's own check stands behind it.
    assert rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(1), dst="fd00::99") == []
    assert rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(1), dst="ff02::1") == []
    assert rig.counters["dhcp6.solicit"] == 0
    pkt = IpPacket(rig.port, b"\x02" * 6, None, memoryview(b""), False, IPV6,  # type: ignore[arg-type]
                   bytes(16), bytes.fromhex("fd00" + "00" * 13 + "99"), 17, 1)  # fmt: skip
    rig.server.handle_udp(pkt, 546, 547, memoryview(b"\x01\x00\x00\x01"), 0.0)
    assert rig.counters["dhcp6.dst.not_ours"] == 1
    # To guestnet's link-local address directly: answered.
    assert len(rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(1), dst=OUR_LL)) == 1


def test_release(rig: Rig) -> None:
    addr = bind(rig)
    (rep,) = rig.send(DHCP6_Release(trid=XID) / cid() / sid(rig) / ia(1, addr), now=5.0)
    check_reply(rep, DHCP6_Reply)
    assert status(rep) == 0
    assert DHCP6OptIA_NA not in rep
    assert rig.server.leases(5.0) == []
    assert rig.counters["dhcp6.release.done"] == 1
    # Released, the address is the client's preference still.
    assert bind(rig, now=6.0) == addr
    # An IA with no binding says NoBinding.
    (rep,) = rig.send(DHCP6_Release(trid=XID) / cid(MAC2) / sid(rig) / ia(7, "fd00::15"), MAC2)
    assert status(rep) == 0
    assert status(rep[DHCP6OptIA_NA]) == 3
    assert rep[DHCP6OptIA_NA].iaid == 7
    assert [lease["ip"] for lease in rig.server.leases(6.0)] == [addr]


def test_decline(rig: Rig) -> None:
    addr = bind(rig, MAC1)
    (rep,) = rig.send(DHCP6_Decline(trid=XID) / cid() / sid(rig) / ia(1, addr), now=1.0)
    check_reply(rep, DHCP6_Reply)
    assert status(rep) == 0
    assert rig.server.leases(1.0) == []
    assert rig.counters["dhcp6.decline.done"] == 1
    # The declined address is unusable for a while: the client (and others) get another one.
    assert bind(rig, MAC1, now=2.0) == "fd00::16"
    assert bind(rig, MAC2, now=3.0) == "fd00::17"
    # ... and usable again after DECLINE_HOLD_S.
    assert bind(rig, MAC3, now=1.0 + DECLINE_HOLD_S + 1) == "fd00::15"


def test_confirm(rig: Rig) -> None:
    (rep,) = rig.send(DHCP6_Confirm(trid=XID) / cid() / ia(1, "fd00::15", "fd00::1:2"))
    check_reply(rep, DHCP6_Reply)
    assert status(rep) == 0
    (rep,) = rig.send(DHCP6_Confirm(trid=XID) / cid() / ia(1, "fd00::15") / ia(2, "fd01::1"))
    assert status(rep) == 4  # NotOnLink
    assert rig.counters["dhcp6.confirm.not_on_link"] == 1
    # No address to confirm: no reply (RFC 8415 §18.3.3).
    assert rig.send(DHCP6_Confirm(trid=XID) / cid() / ia(1)) == []
    assert rig.counters["dhcp6.confirm.no_addresses"] == 1
    # The confirmed address (free here: a restarted server) is recorded as the client's, so
    # another client does not get it.
    assert [(lease["ip"], lease["iaid"]) for lease in rig.server.leases(0.0)] == [("fd00::15", 1)]
    assert rig.counters["dhcp6.confirm.recorded"] == 1
    assert bind(rig, MAC2) == "fd00::16"
    # Confirming an address another client holds is answered (on link) but changes no lease.
    (rep,) = rig.send(DHCP6_Confirm(trid=XID) / cid(MAC3) / ia(1, "fd00::16"), MAC3)
    assert status(rep) == 0
    assert rig.counters["dhcp6.confirm.recorded"] == 1
    assert [lease["mac"] for lease in rig.server.leases(0.0)] == [MAC1, MAC2]


def test_information_request() -> None:
    r = make_rig(dns_search=("example.com", "corp.example"))
    (rep,) = r.send(DHCP6_InfoRequest(trid=XID) / cid() / DHCP6OptOptReq(reqopts=[23, 24]))
    check_reply(rep, DHCP6_Reply)
    assert rep[DHCP6OptDNSServers].dnsservers == ["fd00::3"]
    assert rep[DHCP6OptDNSDomains].dnsdomains == ["example.com.", "corp.example."]
    assert DHCP6OptIA_NA not in rep
    assert r.server.leases(0.0) == []
    # Without a Client ID it is answered too (RFC 8415 §18.2.6 lets the client leave it out).
    (rep,) = r.send(DHCP6_InfoRequest(trid=XID))
    assert rep[DHCP6OptDNSServers].dnsservers == ["fd00::3"]
    assert DHCP6OptClientId not in rep
    assert r.pool.in_use == 0


def test_ia_pd_no_prefix(rig: Rig) -> None:
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(1) / DHCP6OptIA_PD(iaid=4))
    assert granted(adv)[0] == "fd00::15"
    assert adv[DHCP6OptIA_PD].iaid == 4
    assert status(adv[DHCP6OptIA_PD]) == 6
    # A Solicit with nothing to give: only NoAddrsAvail.
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(MAC2) / DHCP6OptIA_PD(iaid=4), MAC2)
    assert status(adv) == 2


def test_lease_table_bound(monkeypatch: pytest.MonkeyPatch, rig: Rig) -> None:
    monkeypatch.setattr(dhcpv6_core, "MAX_LEASES", 3)
    macs = [f"52:54:00:00:01:{i:02x}" for i in range(6)]
    for mac in macs[:3]:
        bind(rig, mac, now=0.0)
    # Full of live bound leases: a fourth client is refused, nothing is evicted.
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(macs[3]) / ia(1), macs[3], now=1.0)
    assert status(adv) == 2
    assert status(adv[DHCP6OptIA_NA]) == 2
    assert rig.counters["dhcp6.lease_table.full"] == 1
    assert len(rig.server.leases(1.0)) == 3
    # One released and expired: purged, room for the new client.
    rig.send(DHCP6_Release(trid=XID) / cid(macs[0]) / sid(rig) / ia(1, "fd00::15"), macs[0])
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(macs[3]) / ia(1), macs[3], now=2.0)
    assert granted(adv)[0] == "fd00::15"
    # The table holds one offer now: the next client evicts it.
    (adv,) = rig.send(DHCP6_Solicit(trid=XID) / cid(macs[4]) / ia(1), macs[4], now=3.0)
    assert granted(adv)[0] == "fd00::19"
    assert rig.counters["dhcp6.lease_table.evicted"] == 1
    assert len(rig.server._by_key) == 3
    assert (duid_ll(bytes.fromhex(macs[3].replace(":", ""))), 1) not in rig.server._by_key
    # The evicted offer's address is free again.
    assert bind(rig, macs[5], now=4.0) == "fd00::15"


def test_not_ipv6_and_bad_source(rig: Rig) -> None:
    assert rig.send(DHCP6_Solicit(trid=XID) / cid() / ia(1), src="::") == []
    assert rig.counters["dhcp6.src.unusable"] == 1


def test_reply_within_mtu() -> None:
    """A domain list that would not fit the link MTU is left out; the address still goes."""
    long_names = tuple(f"{'a' * 60}.{'b' * 60}.{'c' * 60}.{i}.example" for i in range(8))
    r = make_rig(mtu=1280, dns_search=long_names)
    (adv,) = r.send(DHCP6_Solicit(trid=XID) / cid() / ia(1))
    assert granted(adv)[0] == "fd00::15"
    assert DHCP6OptDNSDomains not in adv
    assert len(bytes(adv[IPv6])) <= 1280
    assert r.counters["dhcp6.reply.option_dropped"] == 1
    # Short enough: included.
    r = make_rig(mtu=1280, dns_search=long_names[:2])
    (adv,) = r.send(DHCP6_Solicit(trid=XID) / cid() / ia(1))
    assert len(adv[DHCP6OptDNSDomains].dnsdomains) == 2
    assert r.pool.in_use == 0


def test_renew_of_address_taken_meanwhile(rig: Rig) -> None:
    """A client whose lease ran out and whose address went to another gets a new address, and
    its old one back at lifetime 0 so it stops using it."""
    assert bind(rig, MAC1, now=0.0) == "fd00::15"
    later = 3600.0 + 10
    assert bind(rig, MAC2, now=later) == "fd00::15"
    (rep,) = rig.send(DHCP6_Renew(trid=XID) / cid() / sid(rig) / ia(1, "fd00::15"), now=later)
    addr, opt = granted(rep)
    assert addr == "fd00::16"
    dead = [o for o in opt.ianaopts if isinstance(o, DHCP6OptIAAddress) and not o.validlft]
    assert [str(o.addr) for o in dead] == ["fd00::15"]
    assert [lease["mac"] for lease in rig.server.leases(later)] == [MAC2, MAC1]


def test_leases_api_and_forwards_follow_dhcpv6(frames: Any) -> None:
    """A lease bound through an assembled datapath shows in the API's /leases beside the DHCPv4
    ones, and an IPv6 published port reaches the leased address."""
    from guestnet.api import Api, control_view
    from guestnet.assembly import Instance
    from guestnet.io.loop import Loop

    inst = Instance(Config(), loop=Loop(), echo_mode=None)
    try:
        assert inst.dhcp6 is not None
        rig = Rig(
            inst.config, inst.pool_to_guest, inst.counters, inst.dhcp6, inst.classifier,
            Port("guest", lambda f: None),
        )  # fmt: skip
        sent: list[Frame] = rig.sent
        rig.port.send = sent.append
        rig.port.ip6_seen = True  # NDP has greeted it: only DHCPv6 answers come back
        inst.switch.attach(rig.port)
        fwd = inst.forwards.add("tcp", 0, 80, "::1")
        assert inst.forwards.guest_ip_for(fwd) == "fd00::15"  # nothing leased yet: the default
        bind(rig, MAC2)  # another client first would get fd00::15; this one does
        addr = bind(rig, MAC1, iaid=7)
        status, leases = Api(control_view(inst)).handle("GET", "/leases", b"", 1.0)
        assert status == 200 and isinstance(leases, list)
        ips = {str(lease["ip"]) for lease in leases}  # type: ignore[index]
        assert {"fd00::15", addr} <= ips
        assert inst.forwards.guest_ip_for(fwd) == addr, "the latest lease"
    finally:
        inst.close()
