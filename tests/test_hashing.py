"""Flow hashes only while a group balances by flow among two or more
members: a broker with fan-out clients alone hashes nothing (descriptors
say NO_HASH); a flow group joining mid-stream, or inheriting batches filled
without hashes, still gets every packet exactly once, each flow to one
member; live (AF_XDP and TPACKET_V3) as from a file."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Netns
from pktipc._shm import lib
from test_live import OTHER, frame, receive, udp4

import pktipc
from pktipc._tools.synth import write_pcap

NO_HASH = lib.PKTIPC_F_NO_HASH
Got = dict[int, tuple[int, bytes]]      # seq -> (descriptor flags, bytes)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 packets of 300 flows, both directions, some VLAN-tagged."""
    f = tmp_path_factory.mktemp("hashing") / "flows.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 20_000, flows=300, seed=5, sizes=(64, 128, 256))
    return f


def flow(data: bytes) -> int:
    return int(lib.pkb_flow_hash(data, len(data), 1, 0))


def drain(c: pktipc.Client, got: Got, until: int | None = None) -> None:
    """Records what `c` is given until end-of-stream (or `until` packets)."""
    for batch in c:
        with batch:
            flags = batch.descriptors["flags"][batch.mine].tolist()
            for p, f in zip(batch, flags, strict=True):
                assert p.seq not in got, f"{c.name}: packet {p.seq} twice"
                got[p.seq] = (f, bytes(p.data))
        if until is not None and len(got) >= until:
            return


def by_flow(*members: Got) -> None:
    """Each flow (its hash, computed here from the bytes) to one member."""
    owner: dict[int, int] = {}
    for i, got in enumerate(members):
        for _, data in got.values():
            assert owner.setdefault(flow(data), i) == i, "a flow reached two members"
    assert set(owner.values()) == set(range(len(members)))


def test_fan_out_alone_computes_no_hash(broker: Any, synth: Path) -> None:
    """Clients of their own groups, a named group of one and a round-robin
    group of two: nobody balances by flow, so no descriptor has a hash."""
    b = broker("-r", str(synth), "--wait-clients", "5", "--slab-size", "64k")
    gots: list[Got] = [{} for _ in range(5)]
    with pktipc.connect(b.name, "a") as a, pktipc.connect(b.name, "b") as c2, \
            pktipc.connect(b.name, "one", group="solo") as one, \
            pktipc.connect(b.name, "r1", group="rr", balance="round-robin") as r1, \
            pktipc.connect(b.name, "r2", group="rr") as r2:
        threads = [threading.Thread(target=drain, args=(c, g))
                   for c, g in zip((a, c2, one, r1, r2), gots, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert b.wait() == 0
    assert len(gots[0]) == len(gots[1]) == len(gots[2]) == len(gots[3]) + len(gots[4]) == 20_000
    for got in gots:
        assert all(f & NO_HASH for f, _ in got.values())


def test_a_flow_group_joining_mid_stream(broker: Any, synth: Path) -> None:
    """A fan-out client from the start; then g1, then g2 join group ids: from
    the batch g2 first shares, every batch either gets has its hashes, and
    the group gets each packet once, each flow to one member."""
    b = broker("-r", str(synth), "--loop", "2", "--speed", "10", "--wait-clients", "1",
               "--slab-size", "16k")
    rec: Got = {}
    g1: Got = {}
    g2: Got = {}
    with pktipc.connect(b.name, "rec") as r:
        t = threading.Thread(target=drain, args=(r, rec))
        t.start()
        time.sleep(0.4)
        with pktipc.connect(b.name, "g1", group="ids") as m1:
            t1 = threading.Thread(target=drain, args=(m1, g1))
            t1.start()
            time.sleep(0.4)
            with pktipc.connect(b.name, "g2", group="ids") as m2:
                drain(m2, g2)
            t1.join(60)
        t.join(60)
    assert b.wait() == 0
    assert sorted(rec) == list(range(40_000))
    first1, first2 = min(g1), min(g2)
    assert 0 < first1 < first2 < 40_000
    assert g1.keys().isdisjoint(g2) and sorted({**g1, **g2}) == list(range(first1, 40_000))
    shared = {s: v for s, v in g1.items() if s >= first2}
    assert shared and not any(f & NO_HASH for f, _ in (*shared.values(), *g2.values()))
    by_flow(shared, g2)
    # Alone, g1 needed no hash, and so neither did rec; with g2, both have it.
    assert rec[first1][0] & NO_HASH and not rec[first2][0] & NO_HASH
    assert {rec[s][1] for s in g2} == {d for _, d in g2.values()}


def test_batches_without_hashes_passed_on_are_shared_by_flow(broker: Any,
                                                            synth: Path) -> None:
    """a, alone in its group, holds every slab (filled without hashes) and
    leaves as b and c arrive: they share what a held by flow (the broker
    hashes it for them), then the rest, each packet once."""
    b = broker("-r", str(synth), "--wait-clients", "1", "--slab-size", "16k", "--slabs", "8",
               "--credit", "8")
    got_b: Got = {}
    got_c: Got = {}
    a = pktipc.connect(b.name, "a", group="g")
    deadline = time.monotonic() + 10
    while pktipc.broker_stats(b.name).slabs.free and time.monotonic() < deadline:
        time.sleep(0.05)             # a holds every slab, reading none
    held = [c.held for c in pktipc.broker_stats(b.name).clients]
    assert held == [8]
    with pktipc.connect(b.name, "b", group="g") as mb, \
            pktipc.connect(b.name, "c", group="g") as mc:
        a.close()                   # what it held goes to b and c
        t = threading.Thread(target=drain, args=(mb, got_b))
        t.start()
        drain(mc, got_c)
        t.join(60)
    assert b.wait() == 0
    assert got_b.keys().isdisjoint(got_c) and sorted({**got_b, **got_c}) == list(range(20_000))
    # a's slabs, filled without hashes, were divided between b and c.
    passed = [sum(f & NO_HASH != 0 for f, _ in got.values()) for got in (got_b, got_c)]
    assert min(passed) > 0
    by_flow(got_b, got_c)


@pytest.mark.parametrize("how", [["--xdp"], ["--xdp", "--xdp-mode", "skb"], []],
                         ids=["xdp-native", "xdp-skb", "tpacket"])
def test_live_a_flow_group_joining_later(netns: Netns, broker: Any, tmp_path: Path,
                                         how: list[str]) -> None:
    """Live, through AF_XDP or TPACKET_V3: a fan-out client alone gets no
    hashes; g1 and g2 join group ids, and from the first batch they are
    given on, every packet has its hash (the fan-out client's too), each
    reaches one of them once, and each flow the same member."""
    netns.veth("va", "vb")
    b = broker("-i", "va", *how, "--block-timeout", "2", netns=netns)
    before = [frame(OTHER, udp4(1000 + i % 50, 53, 60, a=i % 7)) for i in range(500)]
    after = [frame(OTHER, udp4(2000 + i % 80, 80, 60, a=i % 9, b=3)) for i in range(1000)]
    with pktipc.connect(b.name, "rec") as rec:
        assert netns.send("vb", before, tmp_path) == len(before)
        got_before = receive(rec, len(before))
        assert [p.data for p in got_before] == before
        assert all(p.flags & NO_HASH for p in got_before)
        with pktipc.connect(b.name, "g1", group="ids") as m1, \
                pktipc.connect(b.name, "g2", group="ids") as m2:
            assert netns.send("vb", after, tmp_path) == len(after)
            got: list[Got] = [{}, {}, {}]
            done = threading.Event()

            def members() -> None:
                while sum(map(len, got[1:])) < len(after) and not done.is_set():
                    for m, g in ((m1, got[1]), (m2, got[2])):
                        if (batch := m.next_batch(timeout=0.05)) is not None:
                            with batch:
                                flags = batch.descriptors["flags"][batch.mine].tolist()
                                for p, f in zip(batch, flags, strict=True):
                                    assert p.seq not in g
                                    g[p.seq] = (f, bytes(p.data))

            t = threading.Thread(target=members)
            t.start()
            try:
                for p in receive(rec, len(after)):
                    got[0][p.seq] = (p.flags, p.data)
            finally:
                t.join(30)
                done.set()
                t.join()
    rec_after, g1, g2 = got
    assert [d for _, d in rec_after.values()] == after
    assert g1 and g2 and g1.keys().isdisjoint(g2)
    assert sorted({**g1, **g2}) == sorted(rec_after)
    assert not any(f & NO_HASH for f, _ in (*rec_after.values(), *g1.values(), *g2.values()))
    by_flow(g1, g2)
    assert {s: d for s, (_, d) in {**g1, **g2}.items()} == {s: d for s, (_, d) in
                                                          rec_after.items()}
