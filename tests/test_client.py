"""The Python client against a real broker: batches, views, credit, end of
stream, pacing, loops, several files, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PCAPS, BrokerProc, run_pktipc
from opshelp import wait_for
from pcapref import read_pcap
from test_hostile import FakeBroker

import pktipc
from pktipc._tools.synth import write_pcap

DNS = PCAPS / "dns_udp.pcap"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5000 packets over 0.5 s of capture time."""
    f = tmp_path_factory.mktemp("synth") / "synth.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 5000, rate_pps=10_000)
    return f


def test_batches_views_and_release(broker, synth: Path) -> None:
    want = read_pcap(str(synth)).packets
    b = broker("-r", str(synth), "--slab-size", "64k")
    with pktipc.connect(b.name, "c") as c:
        seen = []
        kept_view = kept_batch = None
        for batch in c:
            with batch:
                d = batch.descriptors
                assert d.dtype == pktipc.PKT_DTYPE and len(d) == len(batch)
                assert not d.flags.writeable
                pkts = list(batch)
                assert [p.seq for p in pkts] == list(range(batch.seq, batch.seq + len(batch)))
                assert np.array_equal(d["caplen"], [p.caplen for p in pkts])
                for p in pkts:
                    assert p.data.readonly and p.iface == 0 and p.linktype == 1
                    seen.append((p.ts_ns, p.caplen, p.wirelen, bytes(p.data)))
                kept_view, kept_batch = pkts[0].data, batch
        assert seen == want
        assert kept_batch is not None and kept_view is not None
        with pytest.raises(ValueError):
            bytes(kept_view)        # released with its batch
        with pytest.raises(pktipc.ClosedError):
            _ = kept_batch.descriptors
        with pytest.raises(pktipc.EndOfStream):
            c.next_batch(timeout=1)
        with pytest.raises(pktipc.EndOfStream):   # and again: it stays ended
            c.next_batch(timeout=1)
    with pytest.raises(pktipc.ClosedError):
        c.next_batch()
    c.close()   # idempotent


def test_timeout_is_not_end_of_stream(broker) -> None:
    b = broker("-r", str(DNS), "--wait-clients", "2")
    with pktipc.connect(b.name, "early") as c:
        t = time.monotonic()
        assert c.next_batch(timeout=0.3) is None      # waiting for a second client
        assert time.monotonic() - t >= 0.29
        with pktipc.connect(b.name, "second") as c2:
            assert len(list(c.packets(timeout=10))) == len(read_pcap(str(DNS)).packets)
            assert list(c2.packets(timeout=10))


def test_credit_bounds_held_batches(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--slab-size", "16k")
    with pktipc.connect(b.name, "c", credit=2) as c:
        first, second = c.next_batch(timeout=5), c.next_batch(timeout=5)
        assert first is not None and second is not None
        assert c.next_batch(timeout=0.5) is None      # credit exhausted
        st = c.stats().clients[0]
        assert st.held == 2 and st.credit == 2
        first.release()
        third = c.next_batch(timeout=5)
        assert third is not None and third.seq == second.seq + len(second)
        second.release()
        third.release()
        total = sum(len(x) for x in (first, second, third))
        total += sum(1 for _ in c.packets(timeout=10))
    assert total == len(read_pcap(str(synth)).packets)


def test_loop_and_several_files(broker, synth: Path) -> None:
    dns = read_pcap(str(DNS)).packets
    syn = read_pcap(str(synth)).packets
    b = broker("-r", str(DNS), "-r", str(synth), "--loop", "2")
    with pktipc.connect(b.name, "c") as c:
        assert [(i.name, i.linktype) for i in c.ifaces] == [(DNS.name, 1), (synth.name, 1)]
        got = [(p.iface, p.seq, p.ts_ns, bytes(p.data)) for p in c.packets(timeout=10)]
    want = [(0, p) for p in dns] + [(1, p) for p in syn]
    want = want + want
    assert [(i, ts, d) for i, _, ts, d in got] == [(i, p[0], p[3]) for i, p in want]
    assert [s for _, s, _, _ in got] == list(range(len(got)))


def test_paced_replay_takes_capture_time(broker, synth: Path) -> None:
    """At --speed 2 a capture spanning 0.5 s cannot finish in less than 0.25 s,
    and arrives complete."""
    ref = read_pcap(str(synth)).packets
    span = (ref[-1][0] - ref[0][0]) / 1e9
    b = broker("-r", str(synth), "--speed", "2")
    with pktipc.connect(b.name, "c") as c:
        t0 = time.monotonic()
        n = sum(1 for _ in c.packets(timeout=10))
        elapsed = time.monotonic() - t0
    assert n == len(ref)
    assert elapsed >= span / 2 * 0.9


def test_status_lists_broker_and_clients(broker) -> None:
    b = broker("-r", str(DNS), "--wait-clients", "2")
    with pktipc.connect(b.name, "watcher", credit=3):
        r = run_pktipc("status", "--json")
        assert r.returncode == 0, r.stderr
        [st] = json.loads(r.stdout)
        assert st["name"] == b.name and st["pid"] == b.pid
        assert [(c["name"], c["credit"], c["policy"]) for c in st["clients"]] == \
            [("watcher", 3, "block")]
        assert st["sources"][0]["name"] == DNS.name
        text = run_pktipc("status", b.name)
        assert text.returncode == 0 and "client watcher" in text.stdout
    assert b.name in pktipc.brokers()


def test_broker_killed_is_noticed(broker) -> None:
    b = broker("-r", str(DNS), "--wait-clients", "2", "--heartbeat", "0.1")
    with pktipc.connect(b.name, "c", reconnect=0) as c:
        os.kill(b.pid, signal.SIGKILL)
        b.wait()
        t = time.monotonic()
        with pytest.raises(pktipc.BrokerGone, match="stopped answering"):
            c.next_batch(timeout=10)
        assert time.monotonic() - t < 5


def test_client_follows_a_restarted_broker(broker, synth: Path, runtime_dir: Path) -> None:
    """kill -9 of the broker, then a new one of the same name: the client
    attaches to it by itself and receives its packets; no stale segment."""
    want = read_pcap(str(synth)).packets
    first = broker("-r", str(DNS), "--wait-clients", "2")
    with pktipc.connect(first.name, "c") as c:
        old_epoch = c.epoch
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert c.next_batch(timeout=0.3) is None          # nothing yet, and no error
        second = BrokerProc(first.name, ["-r", str(synth)], runtime_dir)
        try:
            got = [(p.seq, bytes(p.data)) for p in c.packets(timeout=15)]
            assert second.wait() == 0
        finally:
            second.stop()
        assert c.reconnects == 1 and c.epoch != old_epoch
    assert got == [(i, p.data) for i, p in enumerate(want)]
    assert not list(Path("/dev/shm").glob(f"pktipc.{first.name}.*"))


def test_stale_messages_refused_by_a_restarted_broker(broker, synth: Path,
                                                      runtime_dir: Path) -> None:
    """Messages sent before the client knew its broker had been replaced are
    each refused by the new one (not-attached): the first refusal says the
    connection is lost, those after it are void, and the client attaches to
    the new broker as when it finds out by itself."""
    want = read_pcap(str(synth)).packets
    first = broker("-r", str(DNS), "--wait-clients", "2")
    with pktipc.connect(first.name, "c") as c:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = BrokerProc(first.name, ["-r", str(synth), "--wait-clients", "1"], runtime_dir)
        try:
            second.wait_ready()
            for _ in range(3):          # three messages the new broker does not expect
                c._conn._send("heartbeat", time.monotonic())
            c._flush()
            deadline = time.monotonic() + 30
            while pktipc.broker_stats(second.name, timeout=10).counters.protocol_errors < 3:
                assert time.monotonic() < deadline, "the new broker did not refuse them"
                time.sleep(0.01)
            got = [(p.seq, bytes(p.data)) for p in c.packets(timeout=15)]
            assert second.wait() == 0
        finally:
            second.stop()
        assert c.reconnects == 1
    assert got == [(i, p.data) for i, p in enumerate(want)]


def test_a_lost_connection_is_not_read_on(broker, synth: Path, runtime_dir: Path,
                                          tmp_path: Path) -> None:
    """kill -9 of the broker while the client holds two batches, and a new
    one of the same name at once: the client's connection reaches the new
    broker before the client misses the old one, and the new broker answers
    both RELEASEs `not-attached`. The first answer ends that connection; the
    second is never read; the client attaches to the new broker and gets
    all of its stream (after what the old one had announced)."""
    paced = tmp_path / "paced.pcap"
    with open(paced, "wb") as out:
        write_pcap(out, 3000, rate_pps=1000)
    want = [(i, p.data) for i, p in enumerate(read_pcap(str(synth)).packets)]
    first = broker("-r", str(paced), "--realtime")

    def stats() -> pktipc.BrokerStats | None:
        try:
            return pktipc.broker_stats(first.name)
        except pktipc.BrokerNotRunning:       # a loaded machine: ask again
            return None

    with pktipc.connect(first.name, "c") as c:
        held = []
        while len(held) < 2:
            if (b := c.next_batch(timeout=10)) is not None:
                held.append(b)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = BrokerProc(first.name, ["-r", str(synth)], runtime_dir)
        try:
            second.wait_ready()
            wait_for("the client's connection to reach the new broker",
                     lambda: (s := stats()) and s.control.connections >= 2)
            for b in held:
                b.release()
            wait_for("both answers", lambda: (s := stats()) and
                     s.counters.protocol_errors >= 2)
            got = [(p.seq, bytes(p.data)) for p in c.packets(timeout=15)]
            assert second.wait() == 0
        finally:
            second.stop()
        assert c.reconnects == 1
    assert got[-len(want):] == want


def test_restart_after_kill_cleans_stale_files(broker) -> None:
    first = broker("-r", str(DNS), "--wait-clients", "2")
    name = first.name
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert list(Path("/dev/shm").glob(f"pktipc.{name}.*"))
    r = run_pktipc("serve", "--name", name, "-r", str(DNS), "--wait-clients", "0")
    assert r.returncode == 0, r.stderr
    assert not list(Path("/dev/shm").glob(f"pktipc.{name}.*"))
    assert not first.socket.exists()


def test_zero_timeout_polls(broker, synth: Path) -> None:
    b = broker("-r", str(synth))
    with pktipc.connect(b.name, "c") as c:
        got = None
        for _ in range(500):
            got = c.next_batch(timeout=0)
            if got is not None:
                break
            time.sleep(0.01)
        assert got is not None
        got.release()


def test_silent_client_is_evicted_and_told(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--wait-clients", "2", "--slab-size", "16k",
               "--liveness", "1", "--heartbeat", "0.2")
    with pktipc.connect(b.name, "sleepy") as sleepy, pktipc.connect(b.name, "busy") as busy:
        held = sleepy.next_batch(timeout=5)
        assert held is not None
        # "busy" receives everything although "sleepy" holds a slab and is silent.
        assert sum(1 for _ in busy.packets(timeout=10)) == len(read_pcap(str(synth)).packets)
        with pytest.raises(pktipc.BrokerGone, match="evicted"):
            sleepy.next_batch(timeout=5)
        with pytest.raises((pktipc.BrokerGone, pktipc.ClosedError)):
            _ = held.descriptors


def test_batches_do_not_outlive_their_client(broker, synth: Path) -> None:
    b = broker("-r", str(synth))
    c = pktipc.connect(b.name, "c")
    batch = c.next_batch(timeout=5)
    assert batch is not None
    view = batch.packets()[0].data
    c.close()
    with pytest.raises(pktipc.ClosedError):
        _ = batch.descriptors
    with pytest.raises(ValueError):
        bytes(view)


HOLDER = """
import sys, time, pktipc
c = pktipc.connect(sys.argv[1], "holder", credit=2)
b = c.next_batch(timeout=10)
print("holding", b.seq, flush=True)
time.sleep(60)
"""


def test_killed_client_is_dropped_at_once(broker, synth: Path) -> None:
    """kill -9 of a client holding a batch: its slabs come back through its
    pidfd long before any heartbeat timeout, and the other client gets all."""
    b = broker("-r", str(synth), "--wait-clients", "2", "--slab-size", "16k", "--slabs", "8")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, b.name], stdout=subprocess.PIPE,
                              text=True)
    try:
        with pktipc.connect(b.name, "survivor") as c:
            assert holder.stdout is not None and holder.stdout.readline().startswith("holding")
            t = time.monotonic()
            holder.kill()
            holder.wait()
            n = sum(1 for _ in c.packets(timeout=10))
            assert n == len(read_pcap(str(synth)).packets)
            assert time.monotonic() - t < 5        # liveness is 30 s
    finally:
        holder.kill()
        holder.wait()
    assert "holder' dropped: its process exited" in (b.wait() == 0 and b.stderr())


def test_lease_evicts_a_holder(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--lease", "0.5", "--slab-size", "16k")
    with pktipc.connect(b.name, "c", credit=2) as c:
        kept = c.next_batch(timeout=5)
        assert kept is not None
        with pytest.raises(pktipc.BrokerGone, match="held a batch"):
            while True:                 # keeps talking to the broker, never releases
                c.next_batch(timeout=0.2)


RECORDER = """
import sys, pktipc
with pktipc.connect(sys.argv[1], "rec", policy="block", credit=2) as c, \\
        open(sys.argv[2], "a") as out:
    for batch in c:
        with batch:
            out.write("".join(f"{p.seq} {bytes(p.data).hex()}\\n" for p in batch))
            out.flush()
        print("batch", flush=True)
"""


def test_block_client_restarted_under_its_name_loses_nothing(broker, synth: Path,
                                                             tmp_path: Path) -> None:
    """kill -9 of a `block` client mid-stream, then the same name again within
    --grace: what it recorded before and after covers every packet."""
    want = read_pcap(str(synth)).packets
    b = broker("-r", str(synth), "--slab-size", "16k", "--grace", "20")
    out = tmp_path / "seen.txt"
    first = subprocess.Popen([sys.executable, "-c", RECORDER, b.name, str(out)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        for _ in range(5):
            assert first.stdout.readline() == "batch\n"
    finally:
        first.kill()
        first.wait()
    again = tmp_path / "seen-again.txt"
    second = subprocess.run([sys.executable, "-c", RECORDER, b.name, str(again)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    seen = {}
    # The first was killed, perhaps in the middle of writing a line: its
    # last line counts only if it is whole.
    first_lines = out.read_text().split("\n")[:-1]
    for line in first_lines + again.read_text().splitlines():
        seq, data = line.split()
        seen[int(seq)] = bytes.fromhex(data)
    assert sorted(seen) == list(range(len(want)))
    assert all(seen[i] == p.data for i, p in enumerate(want))
    assert b.wait() == 0
    assert "'rec' detached, its place kept for 20 s" in b.stderr()


DROPPER = """
import json, sys, pktipc
seqs = []
with pktipc.connect(sys.argv[1], "dropper", policy="drop", credit=1) as c:
    for batch in c:
        with batch:
            seqs += [p.seq for p in batch]
        if len(seqs) == len(batch):
            print("got", flush=True)        # after the first batch
    print(json.dumps({"seqs": seqs, "gaps": c.gaps}), flush=True)
"""


def test_stopped_drop_client_hurts_nobody(broker, synth: Path) -> None:
    """SIGSTOP of a `drop` client under load: the other client receives
    everything; the stopped one is skipped ahead, its losses counted against
    it alone, and after SIGCONT it hears of them by GAP and carries on."""
    want = read_pcap(str(synth)).packets
    b = broker("-r", str(synth), "--wait-clients", "2", "--slab-size", "16k", "--slabs", "8")
    dropper = subprocess.Popen([sys.executable, "-c", DROPPER, b.name],
                               stdout=subprocess.PIPE, text=True)
    try:
        with pktipc.connect(b.name, "steady", policy="block") as steady:
            assert dropper.stdout is not None and dropper.stdout.readline() == "got\n"
            dropper.send_signal(signal.SIGSTOP)
            got = [(p.seq, bytes(p.data)) for p in steady.packets(timeout=15)]
            drops = next(c for c in steady.stats().clients if c.name == "dropper")
        assert got == [(i, p.data) for i, p in enumerate(want)]
    finally:
        dropper.send_signal(signal.SIGCONT)
    out, _ = dropper.communicate(timeout=30)
    assert dropper.returncode == 0
    result = json.loads(out.splitlines()[-1])
    seqs, gaps = result["seqs"], [tuple(g) for g in result["gaps"]]
    skipped = [s for a, e in gaps for s in range(a, e)]
    assert gaps and drops.drops == len(skipped) > 0
    assert sorted(seqs + skipped) == list(range(len(want)))      # nothing lost unannounced
    assert seqs == sorted(seqs)
    assert b.wait() == 0


WRITER = """
import ctypes, sys, numpy, pktipc
c = pktipc.connect(sys.argv[1], "scribbler")
b = c.next_batch(timeout=10)
first = numpy.frombuffer(b.views()[0], dtype=numpy.uint8)   # a packet, in the mapping
print("writing", flush=True)
ctypes.memset(first.ctypes.data, 0xFF, 32)                  # into the read-only mapping
print("wrote", flush=True)
"""


def test_client_writing_into_the_segment_hurts_only_itself(broker, synth: Path) -> None:
    want = read_pcap(str(synth)).packets
    b = broker("-r", str(synth), "--wait-clients", "2")
    with pktipc.connect(b.name, "bystander") as c:
        r = subprocess.run([sys.executable, "-c", WRITER, b.name], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == -signal.SIGSEGV and r.stdout == "writing\n"
        got = [(p.ts_ns, bytes(p.data)) for p in c.packets(timeout=10)]
    assert got == [(p.ts_ns, p.data) for p in want]
    assert b.wait() == 0


# --- the welcome race ------------------------------------------------------------------


def _slow_member(b: BrokerProc, name: str, group: str) -> tuple[object, object, str]:
    """A raw client, welcomed into a group: (context, socket, the segment's name)."""
    import zmq

    from pktipc import _protocol as proto
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{b.socket}")
    s.send(proto.encode("hello", name=name, group=group, policy=None, credit=None, pid=0,
                        balance=None))
    assert s.poll(5000)
    kind, w = proto.decode(s.recv(), proto.MAX_BROKER_FRAME)
    assert kind == "welcome", w
    return ctx, s, w["shm"]


@pytest.mark.parametrize("how", ["ends", "is stopped"])
def test_a_welcomed_client_can_always_map_the_segment(broker, how: str) -> None:
    """A member that is given nothing (its group's other member owns every
    flow of a two-packet stream), slow to map the segment WELCOME named: the
    broker, whose stream ends at once (or which is stopped), keeps its
    segment until the member says it has mapped it; the member then reads
    end-of-stream."""
    import posix_ipc

    from pktipc import _protocol as proto
    f = PCAPS / "dns_udp.pcap"                  # a query and its answer: one flow
    b = broker("-r", str(f), "--wait-clients", "2")
    ctx, slow, shm = _slow_member(b, "slow", "g")
    try:
        with pktipc.connect(b.name, "fast", group="g") as fast:
            assert sum(len(batch) for batch in fast if batch.release() is None) in (0, 2)
        if how == "is stopped":
            b.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)                         # the broker is done with everything else
        assert b.proc.poll() is None
        seg = posix_ipc.SharedMemory(shm, read_only=True)    # still there
        seg.close_fd()
        slow.send(proto.encode("heartbeat"))    # mapped
        assert b.wait(timeout=10) == 0
        kinds = []
        while slow.poll(1000):
            kinds.append(proto.decode(slow.recv(), proto.MAX_BROKER_FRAME)[0])
        assert "eos" in kinds
    finally:
        slow.close()
        ctx.term()


def test_members_of_a_short_stream_never_find_the_segment_gone(broker) -> None:
    """What a user met: two `pktipc dump` members of a flow group and an
    8-packet capture, again and again: every one of them ends cleanly."""
    f = PCAPS / "vxlan.pcap"
    for i in range(6):
        b = broker("-r", str(f), "--wait-clients", "2")
        dumps = [subprocess.Popen([sys.executable, "-m", "pktipc", "dump", "--server", b.name,
                                   "--client", f"m{k}", "--group", "ids", "-w", "/dev/null"],
                                  stderr=subprocess.PIPE, text=True) for k in range(2)]
        for d in dumps:
            _, err = d.communicate(timeout=30)
            assert d.returncode == 0, (i, err)
        assert b.wait() == 0


def test_an_eviction_on_its_way_is_waited_for(runtime_dir: Path) -> None:
    """A BATCH whose slab the broker reused since: if its EVICT is on its
    way, the client says it was evicted, not that the broker broke the
    protocol."""
    fake = FakeBroker(runtime_dir, "fake")
    fake.seg.batch_rec(0).gen = 2               # slab 0 was published again since
    evict = threading.Timer(0.15, fake.send, ("evict",),
                            {"code": "timeout", "text": "nothing heard for 30 s"})
    t = fake.welcome()
    try:
        with pktipc.connect("fake", "c", reconnect=0) as c:
            t.join()
            fake.batch(0, 3)                        # gen 1: the slab's record says 2
            evict.start()
            with pytest.raises(pktipc.BrokerGone) as e:
                c.next_batch(timeout=5)
        assert str(e.value) == "broker 'fake' evicted 'c': nothing heard for 30 s"
    finally:
        t.join()
        if evict.is_alive():
            evict.join()
        fake.close()


def test_a_broker_that_no_longer_knows_the_client_is_left_once(runtime_dir: Path) -> None:
    """A broker in a lost one's place answers each HEARTBEAT that was queued
    for its predecessor with ERROR not-attached: the first one tells the
    client it is lost; the others, on the same connection, are the lost
    broker's too and must not end the client (it looks for a broker anew)."""
    fake = FakeBroker(runtime_dir, "fake2")
    t = fake.welcome()
    try:
        with pktipc.connect("fake2", "c", reconnect=10) as c:
            t.join()
            assert fake.router.poll(5000)
            fake.router.recv_multipart()                  # HEARTBEAT: mapped
            for _ in range(3):
                fake.send("error", code="not-attached",
                          text="heartbeat not allowed from a new peer")
            time.sleep(0.3)                               # all three are there to read
            assert c.next_batch(timeout=0.5) is None      # lost, and looking: no error
            assert c._conn.retrying
    finally:
        t.join()
        fake.close()


def test_each_packet_skipped_is_counted_once_across_a_lost_connection(
        runtime_dir: Path) -> None:
    """A drop client loses its connection with a batch come but not handed
    out, and its place is resumed: the broker, not knowing what arrived, tells
    the GAP before that batch again, and a GAP for the batch (skipped while
    the client was away). The client counts the first once, and the second
    in full: it never had those packets."""
    fake = FakeBroker(runtime_dir, "fake3")
    t = fake.welcome()
    try:
        with pktipc.connect("fake3", "c", policy="drop", reconnect=10) as c:
            t.join()
            fake.publish(0, 3, seq=0)
            fake.batch(0, 3, seq=0)
            b = c.next_batch(timeout=5)
            assert b is not None and b.seq == 0
            b.release()
            fake.publish(1, 2, seq=5)
            fake.send("gap", **{"from": 3, "to": 5})
            fake.batch(1, 2, seq=5)
            fake.send("error", code="not-attached", text="release not allowed from a new peer")
            time.sleep(0.3)                 # all three are there to read at once

            def resumed() -> None:
                fake.send("gap", **{"from": 3, "to": 5})        # told again
                fake.send("gap", **{"from": 5, "to": 7})        # the batch it lost
                fake.publish(2, 1, seq=7)
                fake.batch(2, 1, seq=7)
            t = fake.welcome(policy="drop", after=resumed)
            b = c.next_batch(timeout=10)
            assert b is not None and b.seq == 7
            b.release()
            assert c.reconnects == 1
            assert c.gaps == [(3, 5), (5, 7)]
            assert c.counters.drops == 4
    finally:
        t.join()
        fake.close()


def test_a_batch_sent_again_on_resuming_is_not_handed_out_twice(runtime_dir: Path) -> None:
    """The connection is lost while the client holds one batch and has
    released another (its RELEASE lost with the connection): on resuming,
    the broker sends both again. Neither is handed out again; the one
    released goes back at once, the one held when the user releases it."""
    from pktipc import _protocol as proto

    fake = FakeBroker(runtime_dir, "fake4")
    t = fake.welcome()
    releases: list[int] = []
    try:
        with pktipc.connect("fake4", "c", reconnect=10) as c:
            t.join()
            fake.publish(0, 3, seq=0)
            fake.batch(0, 3, seq=0)
            fake.publish(1, 2, seq=3)
            fake.batch(1, 2, seq=3)
            held = c.next_batch(timeout=5)
            assert held is not None and held.seq == 0
            b = c.next_batch(timeout=5)
            assert b is not None and b.seq == 3
            b.release()
            fake.send("error", code="not-attached", text="release not allowed from a new peer")

            def resumed() -> None:
                fake.batch(0, 3, seq=0)          # sent again: still held
                fake.batch(1, 2, seq=3)          # sent again: its RELEASE was lost
                fake.publish(2, 1, seq=5)
                fake.batch(2, 1, seq=5)
            t = fake.welcome(after=resumed)
            b = c.next_batch(timeout=10)
            assert b is not None and b.seq == 5
            assert c.reconnects == 1
            held.release()
            b.release()
            t.join()
            end = time.monotonic() + 5
            while len(releases) < 3 and time.monotonic() < end:
                if fake.router.poll(100):
                    mtype, f = proto.decode(fake.router.recv_multipart()[1])
                    if mtype == "release":
                        releases += f["seqs"]
            assert sorted(releases) == [0, 3, 5]    # each seq the broker holds, once
            assert c.counters.batches == 3
    finally:
        t.join()
        fake.close()


def test_a_client_at_the_end_of_the_stream_is_kept_alive(broker) -> None:
    """After end-of-stream a client goes on heartbeating (whenever it is
    called) until it closes: a lingering broker keeps it past its liveness."""
    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--linger", "--heartbeat", "0.2",
               "--liveness", "1")
    with pktipc.connect(b.name, "late-reader") as c:
        assert sum(len(batch) for batch in c if batch.release() is None) == 2
        end = time.monotonic() + 2.5            # well past the liveness
        while time.monotonic() < end:
            with pytest.raises(pktipc.EndOfStream):
                c.next_batch(timeout=0)
            time.sleep(0.05)
        [me] = c.stats().clients
        assert (me.name, me.attached) == ("late-reader", True)
    b.stop()
    assert "late-reader' dropped" not in b.stderr()
