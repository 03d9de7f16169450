"""The pcap-style API against a real broker: dispatch, loop and next give
exactly libpcap's packets of the shared captures; counts and end-of-stream
as documented; datalink; interpret=True hands over dpkt's decoding."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import dpkt
import pytest
from conftest import PCAPS, all_captures
from pcapref import Packet, PcapError, read_pcap

import pktipc
import pktipc.aio

DNS = PCAPS / "dns_udp.pcap"            # Ethernet, 2 packets
RESP = PCAPS / "resp_1_benchmark.pcap"  # Linux cooked, 150 packets
RAW6 = PCAPS / "ipv6hdr-heapoverflow.pcap"      # LINKTYPE_IPV6 (229)


@pytest.fixture(scope="module")
def captures() -> list[Path]:
    """The shared captures libpcap reads whole."""
    out = []
    for p in all_captures():
        try:
            if read_pcap(str(p)).error is None:
                out.append(p)
        except PcapError:
            pass
    return out


def as_ref(p: pktipc.Packet) -> Packet:
    return Packet(p.ts_ns, p.caplen, p.wirelen, bytes(p.data))


def test_loop_gives_libpcaps_packets(broker, captures: list[Path]) -> None:
    b = broker(*(a for f in captures for a in ("-r", str(f))))
    got: dict[int, list[Packet]] = defaultdict(list)
    plain: list[tuple[bytes, float, int]] = []
    with pktipc.connect(b.name, "c") as c:
        n = c.loop(-1, lambda p: got[p.iface].append(as_ref(p)), packets=True)
    want = {i: read_pcap(str(f)).packets for i, f in enumerate(captures)}
    assert n == sum(map(len, want.values())) > 500
    assert dict(got) == {i: w for i, w in want.items() if w}
    b2 = broker("-r", str(DNS), "-r", str(RESP))
    with pktipc.connect(b2.name, "c") as c:
        n = c.loop(0, lambda data, ts, wirelen: plain.append((bytes(data), ts, wirelen)))
    ref = read_pcap(str(DNS)).packets + read_pcap(str(RESP)).packets
    assert n == len(ref) == len(plain)
    assert plain == [(p.data, p.ts_ns / 1e9, p.wirelen) for p in ref]


def test_counts_and_end_of_stream(broker) -> None:
    """loop(cnt) handles cnt and returns cnt, fewer only at the end;
    dispatch(cnt) handles at most cnt of the batch at hand, and after the
    last packet raises EndOfStream; next() takes one at a time, where
    dispatch left off; a callback's exception stops it after its packet."""
    want = read_pcap(str(RESP)).packets
    b = broker("-r", str(RESP), "--wait-clients", "2")
    with pktipc.connect(b.name, "c") as c:
        got: list[Packet] = []
        keep = lambda p: got.append(as_ref(p))     # noqa: E731
        assert c.dispatch(5, keep, timeout=0.2, packets=True) == 0   # none yet: a timeout
        assert c.next(timeout=0.2) is None
        with pktipc.connect(b.name, "other") as other:
            assert c.loop(10, keep, packets=True) == 10
            assert c.dispatch(3, keep, packets=True) == 3
            p = c.next(timeout=10)
            assert p is not None and isinstance(p.data, bytes) and p.seq == 13
            got.append(as_ref(p))

            def stop_at_20(p: pktipc.Packet) -> None:
                keep(p)
                if p.seq == 20:
                    raise KeyboardInterrupt
            with pytest.raises(KeyboardInterrupt):
                c.loop(-1, stop_at_20, packets=True)
            assert c.loop(200, keep, packets=True) == len(want) - 21     # the end came first
            with pytest.raises(pktipc.EndOfStream):
                c.dispatch(1, keep)
            with pytest.raises(pktipc.EndOfStream):
                c.next()
            assert c.loop(5, keep) == 0
            assert sum(1 for _ in other.packets()) == len(want)
    assert got == want


def test_datalink(broker) -> None:
    """datalink() is libpcap's DLT_* value; several link types are refused."""
    b = broker("-r", str(DNS), "-r", str(RAW6), "--wait-clients", "3", "--linger")
    with pktipc.connect(b.name, "c") as c:
        with pytest.raises(ValueError, match="link types 1, 229"):
            c.datalink()
        assert [i.linktype for i in c.ifaces] == [1, 229]
    raw = PCAPS / "LINKTYPE_IPV4_invalid.pcap"
    for f, dlt in ((DNS, 1), (RESP, 113), (raw, 228)):
        b = broker("-r", str(f), "--wait-clients", "2", "--linger")
        with pktipc.connect(b.name, "c") as c:
            assert c.datalink() == dlt


def test_interpret_hands_over_dpkt_objects(broker, captures: list[Path]) -> None:
    """Each packet decoded by dpkt for its link type, or its bytes where
    dpkt cannot decode it; ts and wirelen as without interpret."""
    layers = {0: dpkt.loopback.Loopback, 1: dpkt.ethernet.Ethernet, 113: dpkt.sll.SLL,
              127: dpkt.radiotap.Radiotap, 228: dpkt.ip.IP, 229: dpkt.ip6.IP6}
    b = broker(*(a for f in captures for a in ("-r", str(f))))
    seen: list[tuple[object, float, int]] = []
    with pktipc.connect(b.name, "c") as c:
        kinds = [i.linktype for i in c.ifaces]
        c.loop(-1, lambda obj, ts, wirelen: seen.append((obj, ts, wirelen)), interpret=True)
    want = [(lt, p) for f, lt in zip(captures, kinds, strict=True)
            for p in read_pcap(str(f)).packets]
    assert len(seen) == len(want)
    decoded = 0
    for (obj, ts, wirelen), (lt, p) in zip(seen, want, strict=True):
        assert (ts, wirelen) == (p.ts_ns / 1e9, p.wirelen)
        cls = layers.get(lt)
        if cls is not None and isinstance(obj, cls):
            decoded += 1
            if lt == 1:
                assert (obj.dst, obj.src) == (p.data[:6], p.data[6:12])
        else:
            assert obj == p.data
    ethernet = sum(1 for lt, _ in want if lt == 1)
    assert decoded >= 0.9 * ethernet > 300


def test_async_dispatch_loop_next(broker) -> None:
    want = read_pcap(str(RESP)).packets
    b = broker("-r", str(RESP), "--slab-size", "16k")     # several batches

    async def main() -> list[Packet]:
        got: list[Packet] = []
        async with pktipc.aio.connect(b.name, "c") as c:
            assert c.datalink() == 113
            p = await c.next(timeout=10)
            assert p is not None
            got.append(as_ref(p))
            assert await c.dispatch(2, lambda p: got.append(as_ref(p)), packets=True) == 2
            assert await c.loop(500, lambda p: got.append(as_ref(p)), packets=True) == \
                len(want) - 3
            with pytest.raises(pktipc.EndOfStream):
                await c.next()
        return got

    assert asyncio.run(main()) == want
