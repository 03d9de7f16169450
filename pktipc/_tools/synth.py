"""Synthetic Ethernet traffic written as a nanosecond pcap file.

Used for the demo capture shipped with the package and for benchmarks:
TCP and UDP flows over IPv4 and IPv6, both directions, a few VLAN-tagged,
with deterministic contents for a given seed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from itertools import islice
from typing import BinaryIO

from .._client.writer import PCAP_NS_MAGIC


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)


def frame(rng: random.Random, flow: tuple[int, ...], reply: bool, size: int) -> bytes:
    """One Ethernet frame of a flow, `size` bytes long (at least 64)."""
    v6, proto, a, b, sport, dport, vlan = flow
    mac_a = bytes([2, 0, 0, 0, a >> 8 & 0xFF, a & 0xFF])
    mac_b = bytes([2, 0, 1, 0, b >> 8 & 0xFF, b & 0xFF])
    if v6:
        ip_a = b"\x20\x01\x0d\xb8" + bytes(10) + struct.pack("!H", a)
        ip_b = b"\x20\x01\x0d\xb8\x00\x01" + bytes(8) + struct.pack("!H", b)
    else:
        ip_a = bytes([10, 0, a >> 8 & 0xFF, a & 0xFF])
        ip_b = bytes([10, 1, b >> 8 & 0xFF, b & 0xFF])
    if reply:
        mac_a, mac_b, ip_a, ip_b, sport, dport = mac_b, mac_a, ip_b, ip_a, dport, sport
    l4_len = 20 if proto == 6 else 8
    l3_len = 40 if v6 else 20
    tag = struct.pack("!HH", 0x8100, vlan) if vlan else b""
    pay_len = max(0, size - 14 - len(tag) - l3_len - l4_len)
    payload = (b"pktipc synthetic payload " * (pay_len // 25 + 1))[:pay_len]
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, rng.getrandbits(32), 0, 5 << 4, 0x18,
                         65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + pay_len, 0)
    if v6:
        l3 = struct.pack("!IHBB", 6 << 28, l4_len + pay_len, proto, 64) + ip_a + ip_b
        ethertype = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_len + pay_len, 0, 0x4000, 64,
                          proto, 0, ip_a, ip_b)
        l3 = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        ethertype = 0x0800
    return mac_b + mac_a + tag + struct.pack("!H", ethertype) + l3 + l4 + payload


SIZES = (64, 64, 128, 576, 1400, 1514)


def frames(rng: random.Random, flows: int = 64, sizes: tuple[int, ...] = SIZES,
           skew: float | None = 1.2) -> Iterator[bytes]:
    """Endless frames of `flows` flows, picked with a Pareto law of index
    `skew` (a few carry most packets, as on a real link), or evenly with
    `skew` None."""
    table = []
    for _ in range(flows):
        v6 = rng.random() < 0.25
        proto = 6 if rng.random() < 0.7 else 17
        vlan = rng.choice((0, 0, 0, 100))
        table.append((v6, proto, rng.randrange(1, 60000), rng.randrange(1, 60000),
                      rng.randrange(1024, 65535), rng.choice((80, 443, 53, 8080)), vlan))
    while True:
        pick = int(rng.paretovariate(skew)) if skew is not None else rng.randrange(flows)
        flow = table[pick % flows]
        yield frame(rng, flow, rng.random() < 0.4, rng.choice(sizes))


def write_pcap(out: BinaryIO, packets: int, *, flows: int = 64, seed: int = 1,
               sizes: tuple[int, ...] = SIZES,
               rate_pps: float = 2000.0, start_ns: int = 1_700_000_000_000_000_000,
               skew: float | None = 1.2) -> None:
    """`packets` frames of `flows` flows (see frames()), timestamps `rate_pps`
    apart on average."""
    rng = random.Random(seed)
    out.write(struct.pack("<IHHiIII", PCAP_NS_MAGIC, 2, 4, 0, 0, 65535, 1))
    ts = start_ns
    gap = 1e9 / rate_pps
    for data in islice(frames(rng, flows, sizes, skew), packets):
        ts += int(rng.expovariate(1.0) * gap) + 1
        out.write(struct.pack("<IIII", ts // 1_000_000_000, ts % 1_000_000_000,
                              len(data), len(data)))
        out.write(data)


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="write synthetic traffic as a pcap file")
    ap.add_argument("-w", required=True, help="output file")
    ap.add_argument("-c", type=int, default=10000, help="packets")
    ap.add_argument("--flows", type=int, default=64)
    ap.add_argument("--size", type=int, action="append", help="frame size (repeatable)")
    ap.add_argument("--rate", type=float, default=2000.0, help="mean packets per second")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    with open(a.w, "wb") if a.w != "-" else sys.stdout.buffer as f:
        write_pcap(f, a.c, flows=a.flows, seed=a.seed, rate_pps=a.rate,
                   sizes=tuple(a.size) if a.size else SIZES)
