"""Guest-to-guest switching throughput: guestnet's switch beside a Linux bridge, in one run.

Two namespaces on one ``guestnet netns A B --configure`` (guestnet runs in a third, loopback-only
namespace), then two namespaces joined by veths to a Linux bridge in a third namespace, same
addresses and MTU. Between the two guests, for each: iperf3 TCP (Gbit/s) and iperf3 UDP with
64-byte payloads at full rate (frames/s received, loss %); ``--rounds`` runs of ``--seconds``
each, medians printed. guestnet's CPU time over the TCP runs is read from /proc (user+system).

``--core``: instead, the core's CPU per frame (no root, no I/O): a guest frame fed to the
classifier on one port and switched to another guest's port (unicast to its MAC), or routed
(sent to guestnet's MAC for the other guest's address), the port releasing the copy at once;
7 runs of 20,000 frames, median µs/frame of process time.

``--core`` also times a TCP super-frame (64 KiB, 45 segments of 1448 bytes, as a TAP guest
with TSO sends) switched to a port without offloads (cut into segments in software, each with
its checksums) and to one with them (one copy, offloads carried over): µs per super-frame.

``--mixed``: guestnet with ``--tap A --tap B:no-offloads`` (each TAP moved into its guest's
namespace, addresses set by hand): iperf3 TCP A -> B (A's super-frames segmented by the switch)
and B -> A, with guestnet's CPU seconds per second of TCP.

Root only (namespaces, TAP) without ``--core``. Every process is bounded in time and every
namespace is removed on the way out, whatever happens. Usage:
``python3 bench/bench_switch.py [--seconds 5] [--rounds 3] [--core | --mixed]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

MTU = 1500


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr}")
    return proc.stdout


def ns_exec(ns: str, *cmd: str, **kw: object) -> str:
    return sh("ip", "netns", "exec", ns, *cmd, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def namespaces(*tags: str) -> Iterator[list[str]]:
    names = [f"bs{tag}{uuid.uuid4().hex[:6]}" for tag in tags]
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            ns_exec(name, "ip", "link", "set", "lo", "up")
        yield names
    finally:
        for name in names:
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", name, check=False)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(client: str, server: str, addr: str, seconds: float, udp: bool) -> dict[str, float]:
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server, "iperf3", "-s", "-1", "-B", addr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        args = ["iperf3", "-c", addr, "-t", str(seconds), "-J"]
        if udp:
            args += ["-u", "-l", "64", "-b", "0"]
        out = json.loads(ns_exec(client, *args, timeout=seconds + 30))
        end = out["end"]
        if udp:
            s = end["sum"]
            received = s["packets"] - s["lost_packets"]
            return {"pps": received / s["seconds"], "loss_pct": s["lost_percent"]}
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9}
    finally:
        srv.wait(timeout=seconds + 30) if srv.poll() is None else None
        if srv.poll() is None:
            srv.kill()


def measure(a: str, b: str, addr_b: str, seconds: float, rounds: int, pid: int | None) -> dict:
    tcp, pps, loss = [], [], []
    cpu = 0.0
    for _ in range(rounds):
        before = cpu_s(pid) if pid else 0.0
        tcp.append(iperf(a, b, addr_b, seconds, udp=False)["gbps"])
        cpu += (cpu_s(pid) - before) if pid else 0.0
        udp = iperf(a, b, addr_b, seconds, udp=True)
        pps.append(udp["pps"])
        loss.append(udp["loss_pct"])
    result = {
        "tcp_gbps": round(statistics.median(tcp), 3),
        "udp64_frames_per_s": round(statistics.median(pps)),
        "udp64_loss_pct": round(statistics.median(loss), 2),
    }
    if pid:
        result["guestnet_cpu_s_per_tcp_s"] = round(cpu / (rounds * seconds), 3)
    return result


def bench_guestnet(seconds: float, rounds: int) -> dict:
    with namespaces("s", "a", "b") as (sb, a, b):
        gn = subprocess.Popen(
            ["ip", "netns", "exec", sb, sys.executable, "-m", "guestnet", "netns",
             f"/run/netns/{a}", f"/run/netns/{b}", "--configure", "--mtu", str(MTU)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while "10.0.2.16" not in ns_exec(b, "ip", "-4", "addr", check=False):
                if time.monotonic() > deadline or gn.poll() is not None:
                    raise RuntimeError("guestnet did not come up")
                time.sleep(0.2)
            ns_exec(a, "ping", "-c", "1", "-W", "2", "10.0.2.16")
            return measure(a, b, "10.0.2.16", seconds, rounds, gn.pid)
        finally:
            gn.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                gn.wait(timeout=5)
            if gn.poll() is None:
                gn.kill()


def bench_bridge(seconds: float, rounds: int) -> dict:
    with namespaces("r", "a", "b") as (br, a, b):
        ns_exec(br, "ip", "link", "add", "br0", "type", "bridge")
        ns_exec(br, "ip", "link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(((a, "10.0.2.15"), (b, "10.0.2.16"))):
            sh("ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "eth0",
               "netns", ns)  # fmt: skip
            ns_exec(br, "ip", "link", "set", f"v{i}", "master", "br0", "up")
            ns_exec(ns, "ip", "link", "set", "eth0", "mtu", str(MTU), "up")
            ns_exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ns_exec(a, "ping", "-c", "1", "-W", "2", "10.0.2.16")
        return measure(a, b, "10.0.2.16", seconds, rounds, None)


def bench_mixed(seconds: float, rounds: int) -> dict:
    """Two --tap guests, B without offloads: TCP both ways through the switch."""
    tag = uuid.uuid4().hex[:6]
    taps = [f"bmA{tag}", f"bmB{tag}"]
    with namespaces("s", "a", "b") as (sb, a, b):
        gn = subprocess.Popen(
            ["ip", "netns", "exec", sb, sys.executable, "-m", "guestnet", "netns",
             "--tap", taps[0], "--tap", f"{taps[1]}:no-offloads", "--mtu", str(MTU)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not all(t in ns_exec(sb, "ip", "link", check=False) for t in taps):
                if time.monotonic() > deadline or gn.poll() is not None:
                    raise RuntimeError("guestnet did not come up")
                time.sleep(0.2)
            for tap, ns, ip in ((taps[0], a, "10.0.2.15"), (taps[1], b, "10.0.2.16")):
                ns_exec(sb, "ip", "link", "set", tap, "netns", ns)
                ns_exec(ns, "ip", "link", "set", tap, "up")
                ns_exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", tap)
            ns_exec(a, "ping", "-c", "1", "-W", "2", "10.0.2.16")
            out = {}
            for name, (c, srv, addr) in (("a_to_b", (a, b, "10.0.2.16")),
                                         ("b_to_a", (b, a, "10.0.2.15"))):  # fmt: skip
                runs, cpu = [], 0.0
                for _ in range(rounds):
                    before = cpu_s(gn.pid)
                    runs.append(iperf(c, srv, addr, seconds, udp=False)["gbps"])
                    cpu += cpu_s(gn.pid) - before
                out[f"{name}_tcp_gbps"] = round(statistics.median(runs), 3)
                out[f"{name}_guestnet_cpu_s_per_tcp_s"] = round(cpu / (rounds * seconds), 3)
            return out
        finally:
            gn.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                gn.wait(timeout=5)
            if gn.poll() is None:
                gn.kill()


def super_frame_costs() -> dict[str, float]:
    """Process time per 64 KiB TCP super-frame switched to a port without offloads (segmented)
    and to one with them (one copy)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    from conftest import GUEST_IP, GUEST_MAC, CoreHarness, ipv4_frame, tcp_segment

    from guestnet.core.port import Port
    from guestnet.wire.checksum import pseudo_header_sum
    from guestnet.wire.ipv4 import PROTO_TCP
    from guestnet.wire.tcp import ACK

    h = CoreHarness(mtu=MTU)
    a, b = Port("a", h.pool.release), Port("b", h.pool.release)
    h.switch.detach(h.port)
    h.switch.attach(a)
    h.switch.attach(b)
    mac_b, ip_b = bytes.fromhex("5254000000bb"), bytes([10, 0, 2, 16])
    h.switch.learn(a, GUEST_MAC)
    h.switch.learn(b, mac_b)
    mss = MTU - 52
    payload = bytes(range(256)) * (45 * mss // 256)
    l4 = tcp_segment(40000, 5001, ACK, payload, bytes(12), GUEST_IP, ip_b)
    frame = bytearray(ipv4_frame(PROTO_TCP, l4, GUEST_IP, ip_b, eth_dst=mac_b))
    frame[50:52] = pseudo_header_sum(GUEST_IP, ip_b, PROTO_TCP, len(l4)).to_bytes(2, "big")
    a.rx_vnet = memoryview(bytes([1, 1, 0, 0]) + mss.to_bytes(2, "little") + bytes([34, 0, 16, 0]))
    view = memoryview(frame)
    out = {}
    for name, offload_max in (("segmented", 0), ("whole", 65535)):
        b.offload_max = offload_max
        runs = []
        for _ in range(7):
            t = time.process_time()
            for _ in range(500):
                h.classifier.handle_frame(view, a, 1000.0, True)
            runs.append((time.process_time() - t) / 500 * 1e6)
        out[f"tcp_super_{len(frame)}B_{name}_us"] = round(statistics.median(runs), 1)
    out["segments_per_super_frame"] = -(-len(payload) // mss)
    return out


def core_costs() -> dict[str, float]:
    """Per-frame process time of switching and routing in the core (see the module docstring)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    from conftest import GUEST_MAC, OUR_MAC, CoreHarness, udp_frame

    from guestnet.core.port import Port

    h = CoreHarness()
    a, b = Port("a", h.pool.release), Port("b", h.pool.release)
    h.switch.detach(h.port)
    h.switch.attach(a)
    h.switch.attach(b)
    mac_b, ip_b = bytes.fromhex("5254000000bb"), bytes([10, 0, 2, 16])
    h.switch.learn(a, GUEST_MAC)
    h.switch.learn(b, mac_b)
    h.switch.learn_ip4(ip_b, mac_b)
    out = {}
    for size in (64, 1458):
        for name, eth_dst in (("switched", mac_b), ("routed", OUR_MAC)):
            frame = memoryview(udp_frame(40000, 5000, b"x" * size, dst=ip_b, eth_dst=eth_dst))
            runs = []
            for _ in range(7):
                t = time.process_time()
                for _ in range(20000):
                    h.classifier.handle_frame(frame, a, 1000.0)
                runs.append((time.process_time() - t) / 20000 * 1e6)
            out[f"{name}_{len(frame)}B_us"] = round(statistics.median(runs), 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--core", action="store_true", help="the core's CPU per frame only")
    p.add_argument("--mixed", action="store_true", help="two --tap guests, one without offloads")
    args = p.parse_args()
    if args.core:
        print(json.dumps({**core_costs(), **super_frame_costs()}, indent=2))
        return 0
    if args.mixed:
        print(json.dumps(bench_mixed(args.seconds, args.rounds), indent=2))
        return 0
    out = {
        "guestnet": bench_guestnet(args.seconds, args.rounds),
        "linux_bridge": bench_bridge(args.seconds, args.rounds),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
