"""pktipc.aio against a real broker: the same packets as the blocking
client, several clients in one event loop, cancellation that loses
nothing, heartbeats kept by the event loop, the descriptor for selectors."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import time
from pathlib import Path

import pytest
from conftest import BrokerProc
from pcapref import read_pcap

import pktipc
import pktipc.aio
from pktipc._tools.synth import write_pcap


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("aio") / "synth.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 5000, flows=300, skew=None)
    return f


Got = list[tuple[int, int, int, int, bytes]]


def row(p: pktipc.Packet) -> tuple[int, int, int, int, bytes]:
    return p.seq, p.ts_ns, p.caplen, p.wirelen, bytes(p.data)


def reference(path: Path) -> Got:
    return [(i, p.ts_ns, p.caplen, p.wirelen, p.data)
            for i, p in enumerate(read_pcap(str(path)).packets)]


async def consume(c: pktipc.aio.AsyncClient) -> Got:
    got: Got = []
    async for batch in c:
        with batch:
            got += map(row, batch)
    return got


def test_every_packet_as_the_blocking_client_gets_it(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--slab-size", "16k", "--wait-clients", "2")

    async def main() -> tuple[Got, Got]:
        async with pktipc.aio.connect(b.name, "async") as c:
            with pktipc.connect(b.name, "sync") as s:
                got, sync = await asyncio.gather(
                    consume(c), asyncio.to_thread(lambda: [row(p) for p in s.packets()]))
                with pytest.raises(pktipc.EndOfStream):
                    await c.next_batch(timeout=1)
                return got, sync

    got, sync = asyncio.run(main())
    assert got == sync == reference(synth)


def test_two_clients_in_one_event_loop(broker, synth: Path) -> None:
    """Two clients read concurrently in one loop, and a third member of a
    flow group with the second: each group gets every packet once."""
    b = broker("-r", str(synth), "--slab-size", "16k", "--wait-clients", "3")

    async def main() -> list[Got]:
        async with pktipc.aio.connect(b.name, "a") as a, \
                pktipc.aio.connect(b.name, "m1", group="ids") as m1, \
                await pktipc.aio.connect(b.name, "m2", group="ids") as m2:
            assert (m1.group, m1.balance) == ("ids", "flow")
            return list(await asyncio.gather(consume(a), consume(m1), consume(m2)))

    a, m1, m2 = asyncio.run(main())
    want = reference(synth)
    assert a == want
    assert m1 and m2 and sorted(m1 + m2) == want


def test_cancelled_next_batch_loses_nothing(broker, synth: Path) -> None:
    """next_batch cancelled by wait_for, over and over while batches come:
    every batch still comes, in order, once. A call cancelled while none
    has come leaves the first one to the next call."""
    b = broker("-r", str(synth), "--slab-size", "4k", "--wait-clients", "2")

    async def main() -> tuple[Got, int, int]:
        async with pktipc.aio.connect(b.name, "c") as c:
            with pytest.raises(TimeoutError):       # nothing yet: a second client is awaited
                await asyncio.wait_for(c.next_batch(), 0.2)
            other = await pktipc.aio.connect(b.name, "other")
            first = await c.next_batch(timeout=30)
            assert first is not None and first.seq == 0
            with first:
                got = list(map(row, first))
            cancelled = 0
            drain = asyncio.create_task(consume(other))
            while True:
                try:
                    batch = await asyncio.wait_for(c.next_batch(), 0.0005)
                except TimeoutError:
                    cancelled += 1
                    continue
                except pktipc.EndOfStream:
                    break
                assert batch is not None
                with batch:
                    got += map(row, batch)
            await drain
            other.close()
            return got, cancelled, c.counters.batches

    got, cancelled, batches = asyncio.run(main())
    assert got == reference(synth)
    assert cancelled > 0 and batches > 100


def test_the_event_loop_keeps_the_client_alive(broker, synth: Path) -> None:
    """While the loop runs, a client nobody calls is kept alive (heartbeats
    on the loop's timers) for many times the broker's liveness; a loop
    blocked longer than the liveness has it evicted, and told."""
    b = broker("-r", str(synth), "--wait-clients", "2", "--liveness", "1",
               "--heartbeat", "0.1")

    async def main() -> None:
        async with pktipc.aio.connect(b.name, "idle") as c:
            await asyncio.sleep(4)                      # busy elsewhere, 4 x the liveness
            st = await c.stats()
            assert st.client("idle").attached and st.counters.evictions == 0
            time.sleep(4)                               # the loop itself blocked
            with pytest.raises(pktipc.BrokerGone, match="evicted 'idle': nothing heard"):
                await c.next_batch(timeout=5)
            with pytest.raises(pktipc.BrokerGone):      # and at every later call
                await c.next_batch(timeout=0)

    asyncio.run(main())


def test_follows_a_restarted_broker(broker, synth: Path, runtime_dir: Path) -> None:
    first = broker("-r", str(synth), "--wait-clients", "2")

    async def main() -> Got:
        async with pktipc.aio.connect(first.name, "c") as c:
            old = c.epoch
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            assert await c.next_batch(timeout=0.3) is None
            second = BrokerProc(first.name, ["-r", str(synth)], runtime_dir)
            try:
                got = await consume(c)
                assert second.wait() == 0
            finally:
                second.stop()
            assert c.reconnects == 1 and c.epoch != old
            return got

    assert asyncio.run(main()) == reference(synth)


def test_errors_as_the_blocking_client_says_them(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--linger")

    async def main() -> None:
        with pytest.raises(pktipc.BrokerNotRunning):
            await pktipc.aio.connect("nobody", "c")
        async with pktipc.aio.connect(b.name, "c") as c:
            with pytest.raises(pktipc.NameTaken):
                await pktipc.aio.connect(b.name, "c")
            with pytest.raises(pktipc.FilterError, match="syntax error"):
                await pktipc.aio.connect(b.name, "f", filter="ip and")
            got = await consume(c)
        assert got == reference(synth)
        with pytest.raises(pktipc.ClosedError):
            await c.next_batch()

    asyncio.run(main())


def test_close_under_a_waiting_coroutine(broker, synth: Path) -> None:
    """A coroutine waiting in next_batch when the client is closed gets
    ClosedError, as a later call does: it was not cancelled."""
    b = broker("-r", str(synth), "--wait-clients", "2")

    async def main() -> None:
        c = await pktipc.aio.connect(b.name, "c")
        waiting = asyncio.ensure_future(c.next_batch())
        await asyncio.sleep(0)
        c.close()
        with pytest.raises(pktipc.ClosedError):
            await waiting
        c.close()

    asyncio.run(main())


def test_fileno_in_a_selector(broker, synth: Path) -> None:
    """The blocking client's descriptor, in a selector of one's own: readable
    when something came; drained with next_batch(timeout=0)."""
    b = broker("-r", str(synth), "--slab-size", "16k")
    got: Got = []
    with pktipc.connect(b.name, "c") as c, selectors.DefaultSelector() as sel:
        sel.register(c, selectors.EVENT_READ)
        ended = False
        while not ended:
            sel.select(timeout=5)
            try:
                while (batch := c.next_batch(timeout=0)) is not None:
                    with batch:
                        got += map(row, batch)
            except pktipc.EndOfStream:
                ended = True
    assert got == reference(synth)
