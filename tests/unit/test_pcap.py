"""pcap capture: file format (read back by scapy and tshark), timestamps, checksum completion,
the size bound, and the two taps (classifier and link) on a real in-process Instance."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from guestnet.assembly import Instance
from guestnet.config import Config
from guestnet.io.links import StreamLink
from guestnet.io.pcap import (
    DEFAULT_MAX_BYTES,
    LINKTYPE_ETHERNET,
    PCAP_MAGIC_NS,
    SNAPLEN,
    PcapWriter,
    complete_partial_checksum,
    recompute_checksums,
)
from guestnet.wire.checksum import pseudo_header_sum
from guestnet.wire.tcp import ACK, PSH, verify_tcp
from guestnet.wire.udp import verify_udp

T0_NS = 1_700_000_000_123_456_789


class FakeClock:
    def __init__(self, start: int = T0_NS) -> None:
        self.t = start

    def __call__(self) -> int:
        value = self.t
        self.t += 1_500_000  # 1.5 ms between records
        return value


def _tshark() -> str | None:
    return shutil.which("tshark")


def _tshark_fields(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    tshark = _tshark()
    assert tshark is not None
    return subprocess.run(
        [tshark, "-n", "-r", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_header_and_records(tmp_path: Path, frames: Any) -> None:
    path = tmp_path / "a.pcap"
    w = PcapWriter(str(path), clock_ns=FakeClock())
    a = frames.arp()
    u = frames.udp(payload=b"x" * 100)
    assert w.write(a) and w.write(memoryview(u))
    w.close()
    raw = path.read_bytes()
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (magic, major, minor, zone, sigfigs) == (PCAP_MAGIC_NS, 2, 4, 0, 0)
    assert snaplen == SNAPLEN >= 65535 + 18 and linktype == LINKTYPE_ETHERNET
    sec, nsec, caplen, origlen = struct.unpack_from("<IIII", raw, 24)
    assert (sec, nsec) == divmod(T0_NS, 10**9) and caplen == origlen == len(a)
    assert raw[40 : 40 + len(a)] == a
    second = 40 + len(a)
    sec2, nsec2, caplen2, _ = struct.unpack_from("<IIII", raw, second)
    assert (sec2, nsec2) == divmod(T0_NS + 1_500_000, 10**9) and caplen2 == len(u)
    assert len(raw) == w.bytes_written == 24 + 2 * 16 + len(a) + len(u)
    assert w.frames_written == 2

    pkts = rdpcap(str(path))
    assert len(pkts) == 2
    assert pkts[0].haslayer(ARP) and bytes(pkts[0]) == a
    assert pkts[1][UDP].load == b"x" * 100
    # scapy reads the nanosecond magic: times as written, to the nanosecond.
    assert int(pkts[0].time * 10**9) // 1000 == T0_NS // 1000
    assert abs(float(pkts[1].time - pkts[0].time) - 0.0015) < 1e-6


def _partial_udp(frames: Any) -> tuple[bytes, int, int]:
    """A UDP frame whose checksum holds only the pseudo-header sum (as NEEDS_CSUM leaves it)."""
    frame = bytearray(frames.udp(payload=b"partial checksum " * 20))
    l4 = 14 + 20
    length = len(frame) - l4
    partial = pseudo_header_sum(frames.GUEST_IP, frames.REMOTE_IP, 17, length)
    struct.pack_into("!H", frame, l4 + 6, partial)
    return bytes(frame), l4, 6


def _partial_tcp(frames: Any) -> tuple[bytes, int, int]:
    frame = bytearray(frames.tcp(flags=ACK | PSH, payload=b"p" * 1001))
    l4 = 14 + 20
    length = len(frame) - l4
    partial = pseudo_header_sum(frames.GUEST_IP, frames.REMOTE_IP, 6, length)
    struct.pack_into("!H", frame, l4 + 16, partial)
    return bytes(frame), l4, 16


def test_complete_partial_checksum(frames: Any) -> None:
    for make in (_partial_udp, _partial_tcp):
        frame, start, offset = make(frames)
        l4 = memoryview(frame)[start:]
        if offset == 6:
            assert not verify_udp(l4, frames.GUEST_IP, frames.REMOTE_IP, len(l4))
        else:
            assert not verify_tcp(l4, frames.GUEST_IP, frames.REMOTE_IP)
        buf = bytearray(frame)
        complete_partial_checksum(buf, start, offset)
        fixed = memoryview(buf)[start:]
        if offset == 6:
            assert verify_udp(fixed, frames.GUEST_IP, frames.REMOTE_IP, len(fixed))
            assert bytes(buf) == frames.udp(payload=b"partial checksum " * 20)
        else:
            assert verify_tcp(fixed, frames.GUEST_IP, frames.REMOTE_IP)
            assert bytes(buf) == frames.tcp(flags=ACK | PSH, payload=b"p" * 1001)


def test_partial_checksum_hint_out_of_range_leaves_copy(frames: Any) -> None:
    frame, _, _ = _partial_udp(frames)
    buf = bytearray(frame)
    complete_partial_checksum(buf, len(buf) - 1, 6)
    complete_partial_checksum(buf, -1, 6)
    assert bytes(buf) == frame


def test_recompute_checksums(frames: Any) -> None:
    good_udp = frames.udp(payload=b"abc")
    good_tcp = frames.tcp(flags=ACK, payload=b"xyz")
    for good, field in ((good_udp, 34 + 6), (good_tcp, 34 + 16)):
        bad = bytearray(good)
        bad[field : field + 2] = b"\x12\x34"
        bad[24:26] = b"\x00\x00"  # IPv4 header checksum too
        recompute_checksums(bad)
        assert bytes(bad) == good
        same = bytearray(good)
        recompute_checksums(same)
        assert bytes(same) == good
    # UDP checksum 0 means "none": kept. ARP and truncated frames: untouched.
    nosum = bytearray(good_udp)
    nosum[40:42] = b"\0\0"
    recompute_checksums(nosum)
    assert nosum[40:42] == b"\0\0"
    for other in (frames.arp(), good_udp[:30]):
        buf = bytearray(other)
        recompute_checksums(buf)
        assert bytes(buf) == other


def test_writer_completes_checksums_in_copy_only(tmp_path: Path, frames: Any) -> None:
    path = tmp_path / "c.pcap"
    w = PcapWriter(str(path))
    frame, start, offset = _partial_tcp(frames)
    original = bytearray(frame)
    view = memoryview(original)
    w.to_guest(view, start, offset)  # hint, as a TAP NEEDS_CSUM frame toward the guest gives it
    w.from_guest(view, csum_trusted=True)  # a frame the link vouched for (NEEDS_CSUM from guest)
    w.close()
    assert bytes(original) == frame, "the live frame must not be touched"
    pkts = rdpcap(str(path))
    want = frames.tcp(flags=ACK | PSH, payload=b"p" * 1001)
    assert [bytes(p) for p in pkts] == [want, want]
    if _tshark():
        out = _tshark_fields(
            path,
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            "tcp.checksum.status != 1 || ip.checksum.status != 1 || _ws.malformed",
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "", out.stdout


def test_max_bytes_stops(tmp_path: Path, frames: Any, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.pcap"
    frame = frames.udp(payload=b"y" * 200)
    per = 16 + len(frame)
    w = PcapWriter(str(path), max_bytes=24 + 3 * per + 10)
    results = [w.write(frame) for _ in range(6)]
    w.close()
    assert results == [True, True, True, False, False, False]
    assert w.stopped and w.frames_written == 3 and w.frames_not_written == 3
    assert path.stat().st_size == 24 + 3 * per
    assert "pcap-max-bytes" in caplog.text
    assert len(rdpcap(str(path))) == 3


def test_giant_frame_kept_whole(tmp_path: Path) -> None:
    path = tmp_path / "g.pcap"
    w = PcapWriter(str(path))
    frame = bytes(14 + 65535)
    w.write(frame)
    w.close()
    _, _, caplen, origlen = struct.unpack_from("<IIII", path.read_bytes(), 24)
    assert caplen == origlen == len(frame)


def _pump(inst: Instance, turns: int = 20) -> None:
    for _ in range(turns):
        inst.loop.run_once(0.01)


def test_install_taps_both_directions(tmp_path: Path, frames: Any) -> None:
    """ARP over a real QEMU stream link: the request and guestnet's reply, in order."""
    path = tmp_path / "i.pcap"
    inst = Instance(Config())
    guest, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        StreamLink(inst.hub, ours, "qemu0")
        writer = inst.start_capture(str(path), DEFAULT_MAX_BYTES)
        request = frames.arp()
        guest.sendall(struct.pack("!I", len(request)) + request)
        _pump(inst)
        inst.close()
        assert writer.closed and writer.frames_written == 2
    finally:
        inst.close()
        guest.close()
    pkts = rdpcap(str(path))
    assert bytes(pkts[0]) == request
    reply = pkts[1]
    assert reply[Ether].dst == "52:54:00:12:34:56" and reply[ARP].op == 2
    assert reply[ARP].psrc == "10.0.2.2" and reply[ARP].hwsrc == "52:55:0a:00:02:02"
    assert inst.classifier.capture is None and inst.hub.capture_to_guest is None
    if _tshark():
        out = _tshark_fields(path, "-T", "fields", "-e", "frame.protocols")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["eth:ethertype:arp", "eth:ethertype:arp"]


def test_tshark_reads_udp_and_tcp(tmp_path: Path, frames: Any) -> None:
    if not _tshark():
        pytest.skip("tshark not installed")
    path = tmp_path / "t.pcap"
    w = PcapWriter(str(path))
    w.write(frames.udp(dport=9999, payload=b"hello"))
    w.write(frames.tcp(dport=80))
    w.close()
    out = _tshark_fields(
        path,
        "-o",
        "udp.check_checksum:TRUE",
        "-o",
        "tcp.check_checksum:TRUE",
        "-o",
        "ip.check_checksum:TRUE",
        "-T",
        "fields",
        "-e",
        "ip.proto",
        "-e",
        "udp.checksum.status",
        "-e",
        "tcp.checksum.status",
        "-e",
        "ip.checksum.status",
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    # checksum.status: 0 bad, 1 good, 2 unverified (wireshark proto_checksum_enum_e).
    assert rows == [["17", "1", "", "1"], ["6", "", "1", "1"]]
    assert IP(bytes(rdpcap(str(path))[1])[14:])[TCP].dport == 80
