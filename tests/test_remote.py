"""Remote clients: real brokers, a real gateway, ZeroMQ TCP with CURVE, and
namespaces joined by veth pairs for the network in between."""

from __future__ import annotations

import io
import os
import random
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import BrokerProc, Netns, all_captures, run_pktipc, segments
from opshelp import synth_file, wait_for
from pcapref import read_pcap
from pktipc._shm import lib
from remotehelp import (
    Keys,
    client_script,
    curve,
    curve_args,
    digest,
    gateway,
    make_keys,
    procs,
    script_result,
    start,
    two_hosts,
)
from test_cclient import BIN
from test_live import BCAST, frame, receive, serve_live, udp4
from test_replay import collect, reference

import pktipc
from pktipc._layout import u32s
from pktipc._stats import GatewayStats
from pktipc._tools.synth import write_pcap


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


def test_every_capture_to_a_remote_client(broker: Any, keys: Keys) -> None:
    """Over loopback TCP with CURVE: every packet of every capture, as libpcap
    reads it (bytes, lengths, link type, ns times), in order."""
    files = all_captures()
    expected = {i: reference(f) for i, f in enumerate(files)}
    b = broker(*[a for f in files for a in ("-r", str(f))], "--slab-size", "256k")
    with procs() as started:
        _, where = gateway(started, b.name, keys)
        with pktipc.connect(f"tcp://{where}/{b.name}", "far", **curve(keys)) as client:
            assert [i.name for i in client.ifaces] == [f.name for f in files]
            per_iface, seqs = collect(client)
    assert seqs == list(range(len(seqs)))
    for i, f in enumerate(files):
        assert per_iface.get(i, []) == expected[i], f.name
    assert b.wait() == 0


def test_asyncio_client_filter_and_no_sending_over_tcp(broker: Any, keys: Keys) -> None:
    """pktipc.aio over tcp:// gets every packet as the blocking client does;
    a filter over tcp:// keeps what it keeps locally; tx() over tcp:// is
    refused in one line."""
    import asyncio

    import pktipc.aio

    f = all_captures()[0]
    b = broker("-r", str(f), "--loop", "3", "--wait-clients", "4")
    with procs() as started:
        _, where = gateway(started, b.name, keys)
        url = f"tcp://{where}/{b.name}"
        with pktipc.connect(url, "far", **curve(keys)) as blocking, \
                pktipc.connect(url, "udp", filter="udp", **curve(keys)) as filtered, \
                pktipc.connect(b.name, "near-udp", filter="udp") as local:
            with pytest.raises(pktipc.PktipcError, match="tcp://") as e:
                blocking.tx()
            assert "\n" not in str(e.value)

            async def run() -> list[tuple[int, bytes]]:
                got: list[tuple[int, bytes]] = []
                async with pktipc.aio.connect(url, "aio", **curve(keys)) as c:
                    assert [i.name for i in c.ifaces] == [f.name]
                    async for batch in c:
                        with batch:
                            got.extend((p.seq, bytes(p.data)) for p in batch)
                return got

            got = asyncio.run(run())
            want = [(p.seq, bytes(p.data)) for p in blocking.packets()]
            kept = [(p.seq, bytes(p.data)) for p in filtered.packets()]
            assert filtered.counters.filtered == len(want) - len(kept)
            assert kept == [(p.seq, bytes(p.data)) for p in local.packets()]
    assert got == want and len(want) > 0
    assert b.wait() == 0


def test_remote_client_of_a_live_broker(netns: Netns, broker: Any, keys: Keys) -> None:
    """A live broker on a veth, a remote client through the gateway: the
    frames as they were sent, in order."""
    netns.veth("va", "vb")
    b = serve_live(broker, netns, "-i", "vb", "--heartbeat", "0.2")
    rng = random.Random(7)
    frames = [frame(BCAST, udp4(1000 + i % 50, 53, rng.randrange(18, 1400)))
              for i in range(300)]
    with procs() as started:
        _, where = gateway(started, b.name, keys)
        with pktipc.connect(f"tcp://{where}/{b.name}", "far", **curve(keys)) as client:
            assert [i.name for i in client.ifaces] == ["vb"]
            assert netns.send("va", frames, Path("/tmp")) == len(frames)
            got = receive(client, len(frames), timeout=30)
    assert [bytes(p.data) for p in got] == frames
    assert [p.seq for p in got] == sorted(p.seq for p in got)
    assert all(p.wirelen == p.caplen == len(f) for p, f in zip(got, frames, strict=True))


def _owner(h: int, members: list[int]) -> int:
    """The slot among `members` that owns flow hash `h`."""
    return members[lib.pktipc_flow_owner(h, u32s(members), len(members))]


def test_group_of_a_local_and_a_remote_member(broker: Any, keys: Keys, tmp_path: Path) -> None:
    """One flow group, a local member and a remote one: together every packet
    exactly once, each flow to one member; the remote member leaves mid-stream
    and comes back under its name: its slot, and so its flows, are its own
    again."""
    path = synth_file(tmp_path / "flows.pcap", 20000, 1e6)
    b = broker("-r", str(path), "--wait-clients", "2", "--slab-size", "64k")
    local_got: list[tuple[int, int]] = []
    with procs() as started:
        _, where = gateway(started, b.name, keys)
        url = f"tcp://{where}/{b.name}"
        remote = pktipc.connect(url, "far", group="ids", **curve(keys))
        local = pktipc.connect(b.name, "near", group="ids")

        def read_local() -> None:
            for batch in local:
                with batch:
                    d = batch.descriptors[batch.mine]
                    local_got.extend(zip((batch.mine.astype(np.int64) + batch.seq).tolist(),
                                         d["hash"].tolist(), strict=True))
        reader = threading.Thread(target=read_local)
        reader.start()
        try:
            remote_got: list[tuple[int, int]] = []
            slots = [remote.welcome.slot]
            for _ in range(3):
                batch = remote.next_batch(timeout=30)
                assert batch is not None
                with batch:
                    remote_got += [(p.seq, int(h)) for p, h in
                                   zip(batch, batch.descriptors["hash"], strict=True)]
            phase1 = len(remote_got)
            remote.close()
            remote = pktipc.connect(url, "far", group="ids", **curve(keys))
            slots.append(remote.welcome.slot)
            for batch in remote:
                with batch:
                    remote_got += [(p.seq, int(h)) for p, h in
                                   zip(batch, batch.descriptors["hash"], strict=True)]
        finally:
            remote.close()
            reader.join(timeout=60)
            local.close()
    assert slots[0] == slots[1]
    assert phase1 < len(remote_got)                        # it had flows after returning
    seqs = sorted(s for s, _ in local_got + remote_got)
    assert seqs == list(range(20000))                     # exactly once
    members = [slots[0], local.welcome.slot]
    assert all(_owner(h, members) == slots[0] for _, h in remote_got)
    assert {h for _, h in remote_got} and {h for _, h in local_got}


def test_keys_and_insecure(broker: Any, keys: Keys, tmp_path: Path) -> None:
    """A key not admitted, a wrong server key: refused, with a clear line on
    the client's side, counted on the gateway's; plain TCP only when both
    ends say --insecure."""
    path = synth_file(tmp_path / "x.pcap", 10, 1e3)
    b = broker("-r", str(path), "--wait-clients", "2")
    with procs() as started:
        g, where = gateway(started, b.name, keys)
        url = f"tcp://{where}/{b.name}"
        with pytest.raises(pktipc.PermissionDenied, match="does not admit this client's key"):
            pktipc.connect(url, "x", key=keys.other_secret, server_key=keys.server_public)
        g.wait_line(r"refused a client whose key \S+ is not in .* \(1 refused\)")
        other_pub = str(Path(keys.other_secret).with_suffix(".key"))
        with pytest.raises(pktipc.UntrustedBroker, match="CURVE handshake"):
            pktipc.connect(url, "x", key=keys.client_secret, server_key=other_pub)
        with pytest.raises(pktipc.PermissionDenied, match="wants CURVE"):
            pktipc.connect(url, "x", insecure=True)
        with pytest.raises(ValueError, match="insecure"):
            pktipc.connect(url, "x")
        r = run_pktipc("dump", "--server", url, "--client", "x", "-w", "-",
                       *curve_args(keys, keys.other_secret))
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("pktipc: error: the gateway at ") and "Traceback" not in r.stderr
        with pktipc.connect(url, "x", **curve(keys)) as c:
            stats = c.stats()
            r = run_pktipc("dump", "--server", url, "--client", "d", "-w",
                           str(tmp_path / "d.pcap"), *curve_args(keys))   # the second client
            assert r.returncode == 0, r.stderr
            assert read_pcap(str(tmp_path / "d.pcap")).packets == read_pcap(str(path)).packets
            assert sum(len(batch) for batch in c) == 10
        assert stats.gateway is not None
        assert stats.gateway.keys_refused == 2      # connect() and dump
        assert stats.gateway.handshakes_failed >= 2
    r = run_pktipc("gateway", "--server", b.name, "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "--insecure" in r.stderr and r.stderr.count("\n") == 1


MARKER = b"PKTIPC-MARKER-0123456789-in-every-frame"


def _marked(path: Path, n: int) -> list[bytes]:
    frames = [frame(BCAST, udp4(2000 + i, 53, 0) + MARKER + bytes([i % 256]) * 40)
              for i in range(n)]
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(fr), len(fr)) + fr)
    return frames


def test_nothing_in_clear_between_hosts(broker: Any, keys: Keys, tmp_path: Path) -> None:
    """Two hosts: what crosses the veth between them, captured by tcpdump,
    holds none of the packets' bytes with CURVE; with --insecure it does (so
    the capture would have seen them)."""
    frames = _marked(tmp_path / "marked.pcap", 200)
    with two_hosts("10.78") as (a, bns, addr_a, _), procs() as started:
        for secure in (True, False):
            k = keys if secure else None
            bk = broker("-r", str(tmp_path / "marked.pcap"), netns=a)
            _, where = gateway(started, bk.name, k, listen=f"{addr_a}:0", netns=a)
            wire = tmp_path / f"wire-{secure}.pcap"
            tcpdump = subprocess.Popen(bns.cmd("tcpdump", "-i", "eb", "--immediate-mode", "-U",
                                               "-w", str(wire), "tcp"),
                                       stderr=subprocess.PIPE, text=True)
            try:
                assert tcpdump.stderr is not None
                assert "listening" in tcpdump.stderr.readline()
                out = tmp_path / f"got-{secure}.json"
                c = client_script(started, f"tcp://{where}/{bk.name}", "far", "block", k, out,
                                  netns=bns)
                got = script_result(c, out)
                # what tcpdump saw, written out before it is stopped
                wait_for("the stream in the capture",
                         lambda w=wire: w.stat().st_size > 200 * 100)  # type: ignore[misc]
            finally:
                tcpdump.terminate()
                tcpdump.wait(timeout=10)
                tcpdump.stderr.close()  # type: ignore[union-attr]
            assert len(got["got"]) == len(frames)
            assert bk.wait() == 0
            seen = wire.read_bytes()
            assert len(seen) > 200 * 100            # the stream crossed the veth
            assert (MARKER in seen) is not secure


def _cut_and_back(a: Netns, b_name: str, client: str, until: Any) -> None:
    """The link down until the gateway lost the client and the broker keeps
    its place (`until`), then up again."""
    a.ip("link", "set", "ea", "down")
    try:
        wait_for("the client detached", lambda: next(
            (c for c in pktipc.broker_stats(b_name).clients
             if c.name == client and not c.attached), None), timeout=60)
        until()
    finally:
        a.ip("link", "set", "ea", "up")


def test_link_cut_mid_stream(broker: Any, keys: Keys, tmp_path: Path) -> None:
    """The link between the hosts cut mid-stream: a block remote client with
    --grace loses nothing; a drop remote client gets gaps that are exactly
    what it missed; the broker's local client loses nothing meanwhile."""
    total = 30000
    path = synth_file(tmp_path / "long.pcap", total, 1e6)
    expected = [digest(d, ts, cap, wire) for ts, cap, wire, d in read_pcap(str(path)).packets]
    with two_hosts("10.79") as hosts, procs() as started:
        for policy in ("block", "drop"):
            _cut_phase(broker, keys, tmp_path, hosts, started, path, policy, expected)


def _cut_phase(broker: Any, keys: Keys, tmp_path: Path, hosts: tuple[Netns, Netns, str, str],
               started: list[Any], path: Path, policy: str, expected: list[str]) -> None:
    a, bns, addr_a, _ = hosts
    total = len(expected)
    bk = broker("-r", str(path), "--wait-clients", "2", "--grace", "120",
                "--slab-size", "64k", "--slabs", "8", "--heartbeat", "0.2")
    _, where = gateway(started, bk.name, keys, "--heartbeat", "0.2", "--liveness", "1",
                       listen=f"{addr_a}:0", netns=a)
    out = tmp_path / f"{policy}.json"
    far = client_script(started, f"tcp://{where}/{bk.name}", "far", policy, keys, out,
                        netns=bns)
    far.wait_line("attached")
    local = pktipc.connect(bk.name, "near", policy="block", credit=1)
    seqs: list[int] = []

    def take(n: int) -> None:
        for _ in range(n):
            batch = local.next_batch(timeout=60)
            assert batch is not None
            with batch:
                seqs.extend(p.seq for p in batch)
    take(2)
    wait_for("packets to the remote client", lambda: next(
        c.packets for c in pktipc.broker_stats(bk.name).clients if c.name == "far"))
    # While it is away: a block client holds the replay back; a drop client
    # is skipped as the local one goes on.
    _cut_and_back(a, bk.name, "far", lambda: take(40 if policy == "drop" else 1))
    for batch in local:
        with batch:
            seqs.extend(p.seq for p in batch)
    local.close()
    got = script_result(far, out)
    assert seqs == list(range(total))
    assert got["reconnects"] >= 1
    received = {s: d for s, d in got["got"]}
    assert all(expected[s] == d for s, d in received.items())
    skipped = [s for lo, hi in got["gaps"] for s in range(lo, hi)]
    if policy == "block":
        assert sorted(received) == list(range(total)) and not skipped
    else:
        assert skipped, "the drop client was never skipped"
        assert not set(skipped) & set(received)
        assert sorted([*received, *skipped]) == list(range(total))
    assert bk.wait() == 0


@pytest.mark.parametrize("gateway_too", [False, True],
                         ids=["gateway-stays", "gateway-restarts"])
def test_remote_client_follows_a_restarted_broker(broker: Any, keys: Keys, tmp_path: Path,
                                                  runtime_dir: Path, gateway_too: bool) -> None:
    """Two hosts: kill -9 of the broker mid-stream (and, with `gateway_too`,
    its gateway restarted on the same address), then a new broker of the
    same name: the remote client attaches to it by itself, as a local client
    does (one reconnection, a new epoch, seqs anew), and receives the new
    broker's whole stream in order, bytes and all, with no gap."""
    paced = tmp_path / "paced.pcap"
    with open(paced, "wb") as f:
        write_pcap(f, 60000, rate_pps=1000)         # --realtime: a minute at most
    second_path = tmp_path / "second.pcap"
    with open(second_path, "wb") as f:
        write_pcap(f, 5000, rate_pps=1e6, seed=2)
    first_stream = [digest(d, ts, cap, wire) for ts, cap, wire, d in
                    read_pcap(str(paced)).packets]
    second_stream = [digest(d, ts, cap, wire) for ts, cap, wire, d in
                     read_pcap(str(second_path)).packets]
    assert first_stream[:5000] != second_stream
    with two_hosts("10.81" if gateway_too else "10.82") as (a, bns, addr_a, _), \
            procs() as started:
        first = broker("-r", str(paced), "--realtime", "--heartbeat", "0.2")
        g_args = ("--heartbeat", "0.2", "--liveness", "1")
        g, where = gateway(started, first.name, keys, *g_args, listen=f"{addr_a}:57010",
                           netns=a)
        out = tmp_path / "got.json"
        far = client_script(started, f"tcp://{where}/{first.name}", "far", "block", keys,
                            out, netns=bns)
        far.wait_line("attached")
        wait_for("packets to the remote client", lambda: next(
            (c.packets for c in pktipc.broker_stats(first.name).clients if c.name == "far"),
            0) >= 200)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        if gateway_too:
            g.stop()
        second = BrokerProc(first.name, ["-r", str(second_path)], runtime_dir)
        try:
            second.wait_ready()
            if gateway_too:
                gateway(started, first.name, keys, *g_args, listen=where, netns=a)
            try:
                got = script_result(far, out)
            except (AssertionError, subprocess.TimeoutExpired) as e:
                raise AssertionError(f"{e}\nclient: {far.text()}\ngateway: {g.text()}\n"
                                     f"broker: {second.stderr()}") from None
            assert second.wait() == 0, second.stderr()
        finally:
            second.stop()
    assert got["reconnects"] == 1 and got["end_error"] is None and not got["gaps"]
    [(zero, old_epoch), (cut, new_epoch)] = got["epochs"]
    assert zero == 0 and cut >= 200 and new_epoch != old_epoch
    before, after = got["got"][:cut], got["got"][cut:]
    assert before == [[i, d] for i, d in enumerate(first_stream[:cut])]
    assert after == [[i, d] for i, d in enumerate(second_stream)]


def _stepped_gateway(server: str) -> tuple[Any, io.StringIO, zmq.Context[zmq.Socket[bytes]]]:
    """A gateway of broker `server` in this process, stepped by the test
    (`_turn()`), --insecure, its lines in a buffer; and a ZeroMQ context for
    remote clients driven by hand."""
    from pktipc._net.gateway import Gateway, GatewayOptions

    log = io.StringIO()
    gw = Gateway(GatewayOptions(server=server, listen="tcp://127.0.0.1:0", insecure=True,
                                heartbeat=0.2, liveness=5), log=log)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    return gw, log, ctx


def _raw_attempt(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, server: str,
                 **hello: Any) -> tuple[zmq.Socket[bytes], Any]:
    """A remote client's attempt as the sans-IO machine makes it: a new
    connection and its HELLO, as `far`, `block`."""
    from pktipc import _protocol as proto

    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    conn = proto.ClientConnection(server=server)
    conn.hello(time.monotonic(), name="far", policy="block", **hello)
    for f in conn.frames_to_send():
        sock.send(f)
    return sock, conn


def _take(sock: zmq.Socket[bytes], conn: Any, release: bool,
          log: io.StringIO) -> tuple[list[Any], bool]:
    """What a hand-driven remote client has been sent: its batches (released
    at once with `release`), and whether END-OF-STREAM came; anything else
    fails the test."""
    from pktipc import _protocol as proto

    got: list[Any] = []
    ended = False
    while sock.poll(0):
        head, *more = sock.recv_multipart()
        now = time.monotonic()
        for ev in conn.receive(head, now, tuple(more)):
            if isinstance(ev, proto.Welcomed):
                conn.mapped(now)
            elif isinstance(ev, proto.BatchReceived):
                got.append(ev)
                if release:
                    conn.release(now, [ev.seq])
            elif isinstance(ev, proto.StreamEnded):
                ended = True
            else:
                raise AssertionError(f"{ev!r}: {log.getvalue()}")
    for f in conn.frames_to_send():
        sock.send(f)
    return got, ended


def test_gateway_keeps_an_attachment_its_client_gave_up_before_welcome(
        broker: Any, tmp_path: Path) -> None:
    """A remote client's attempt given up (its connection closed) before the
    broker's WELCOME came through the gateway, as a client under load does
    when its attempt times out: the broker, which waited for that one client,
    sends it its whole stream at once. The attachment waits for the client's
    next attempt, which gets WELCOME and the whole stream; it is not left
    (with --grace 0, the stream would be gone, and the broker with it)."""
    from pktipc import _protocol as proto

    b = broker("-r", str(synth_file(tmp_path / "x.pcap", 3000, 1e6)))
    gw, log, ctx = _stepped_gateway(b.name)

    def attempt() -> tuple[zmq.Socket[bytes], proto.ClientConnection]:
        return _raw_attempt(ctx, gw.listening, b.name)

    def step_until(what: str, done: Any) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, f"{what}: {log.getvalue()}"
            gw._turn()

    try:
        first, _ = attempt()
        step_until("the HELLO taken", lambda: "far" in gw.sessions)
        first.close(linger=0)          # the attempt given up: its connection is gone
        time.sleep(0.5)                 # for the gateway's ZeroMQ to see it
        step_until("the connection seen gone", lambda: "far" not in gw.sessions
                   or gw.sessions["far"].peer is None)
        sock, conn = attempt()
        packets, ended = 0, False
        deadline = time.monotonic() + 30
        while not ended:
            assert time.monotonic() < deadline, log.getvalue()
            gw._turn()
            got, ended = _take(sock, conn, True, log)
            packets += sum(b.count for b in got)
        assert packets == 3000, log.getvalue()
        assert "its attachment waits" in log.getvalue() and "is back" in log.getvalue()
        conn.bye(time.monotonic())
        for f in conn.frames_to_send():
            sock.send(f)
        step_until("the client's BYE", lambda: not gw.sessions)
    finally:
        gw.close()
        ctx.destroy()
    assert b.wait() == 0, b.stderr()


def test_gateway_takes_over_with_the_old_attachments_messages_on_their_way(
        broker: Any, tmp_path: Path) -> None:
    """A remote client heard after its WELCOME comes back on a new connection
    while its old one seems alive: the gateway hands the attachment over
    (DETACH, HELLO). What the broker sent the old attachment before it read
    the DETACH (here the batches a RELEASE read just before let it send)
    comes while the new attachment waits for its WELCOME: dropped, not taken
    for the broker breaking the protocol. The new connection gets the rest
    of the stream, the batches the old one held again, and END-OF-STREAM:
    nothing lost, nothing twice."""
    from pktipc import _protocol as proto

    total = 20000
    b = broker("-r", str(synth_file(tmp_path / "x.pcap", total, 1e6)), "--slab-size", "64k",
               "--grace", "10")
    gw, log, ctx = _stepped_gateway(b.name)

    def attempt() -> tuple[zmq.Socket[bytes], proto.ClientConnection]:
        return _raw_attempt(ctx, gw.listening, b.name, credit=2)

    seqs: list[int] = []
    counts: dict[int, int] = {}

    def take(sock: zmq.Socket[bytes], conn: proto.ClientConnection,
             release: bool) -> tuple[list[int], bool]:
        got, ended = _take(sock, conn, release, log)
        for b in got:
            seqs.append(b.seq)
            counts[b.seq] = b.count
        return [b.seq for b in got], ended

    try:
        first, old = attempt()
        held: list[int] = []
        deadline = time.monotonic() + 30
        while len(held) < 2:        # its credit: the broker waits for a RELEASE
            assert time.monotonic() < deadline, log.getvalue()
            gw._turn()
            held += take(first, old, release=False)[0]
        while not gw.conn.heard(gw.sessions["far"].peer):      # what it said since WELCOME
            assert time.monotonic() < deadline, log.getvalue()
            gw._turn()
        # Its RELEASE and the new connection's HELLO, read in one turn: the
        # broker reads the RELEASE, sends the next batches to the old
        # attachment, and only then reads the DETACH.
        old.release(time.monotonic(), held[:1])
        for f in old.frames_to_send():
            first.send(f)
        sock, conn = attempt()
        time.sleep(0.5)
        ended = False
        deadline = time.monotonic() + 60
        while not ended:
            assert time.monotonic() < deadline, log.getvalue()
            gw._turn()
            ended = take(sock, conn, release=True)[1]
        assert "broke the protocol" not in log.getvalue(), log.getvalue()
        assert "is back on a new connection" in log.getvalue(), log.getvalue()
        assert gw.counters["stale_dropped"] > 0, log.getvalue()
        assert GatewayStats.from_reply(gw.stats()).stale_dropped > 0
        # The batch held and not released is sent again; no other twice.
        assert sorted(seqs) == sorted([*set(seqs), held[1]]), (seqs, held)
        assert sum(counts.values()) == total
        conn.bye(time.monotonic())
        for f in conn.frames_to_send():
            sock.send(f)
        deadline = time.monotonic() + 30
        while gw.sessions:
            assert time.monotonic() < deadline, log.getvalue()
            gw._turn()
    finally:
        gw.close()
        ctx.destroy()
    assert b.wait() == 0, b.stderr()


def test_bad_input_is_one_line(broker: Any, keys: Keys, tmp_path: Path) -> None:
    path = synth_file(tmp_path / "x.pcap", 10, 1e3)
    b = broker("-r", str(path))

    def one_line(*args: str, want: str) -> None:
        r = run_pktipc(*args)
        assert r.returncode != 0
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert want in r.stderr, r.stderr

    for bad, want in (("tcp://127.0.0.1/x", "tcp://"), ("tcp://127.0.0.1:99999/x", "tcp://"),
                      ("tcp://127.0.0.1:1/a/b", "tcp://"),
                      ("tcp://127.0.0.1:1/bad name", "broker name 'bad name'")):
        one_line("dump", "--server", bad, "-w", "-", *curve_args(keys), want=want)
    with procs() as started:
        _, where = gateway(started, b.name, keys)
        one_line("dump", "--server", f"tcp://{where}/nosuch", "-w", "-", *curve_args(keys),
                 want=f"serves broker {b.name!r}, not 'nosuch'")
        one_line("gateway", "--server", b.name, "--listen", where, "--key", keys.server_secret,
                 "--keys", keys.admitted, want="Address already in use")
        _, lone = gateway(started, "nobroker", keys)
        one_line("dump", "--server", f"tcp://{lone}/nobroker", "-w", "-", *curve_args(keys),
                 want="broker 'nobroker' is not running")
    one_line("dump", "--server", "tcp://127.0.0.1:1/x", "-w", "-", *curve_args(keys),
             want="no gateway answers at tcp://127.0.0.1:1")
    one_line("dump", "--server", "tcp://127.0.0.1:1/x", "-w", "-", "--key", "/nonexistent",
             "--server-key", keys.server_public, want="/nonexistent")


def test_relay_between_two_hosts(broker: Any, keys: Keys, tmp_path: Path,
                                 runtime_dir: Path) -> None:
    """Two hosts: a file broker and its gateway on one, `pktipc relay` on the
    other; there, a C client (pktipc-pcap) and a Python one (pktipc dump) of
    the relay each write exactly what the broker served: times in ns,
    lengths, link type, bytes, in order."""
    subprocess.run(["make", "-s", "-C", str(BIN.parent.parent), "all"], check=True,
                   capture_output=True)
    path = synth_file(tmp_path / "src.pcap", 20000, 1e6)
    expected = read_pcap(str(path))
    local = f"relay{os.getpid()}-{time.monotonic_ns() % 100000}"
    with two_hosts("10.80") as (a, bns, addr_a, _), procs() as started:
        bk = broker("-r", str(path), "--slab-size", "64k", netns=a)
        _, where = gateway(started, bk.name, keys, listen=f"{addr_a}:0", netns=a)
        relay = start(started, "relay", "--from", f"tcp://{where}/{bk.name}", "--name", local,
                      "--wait-clients", "2", "--slab-size", "64k", *curve_args(keys),
                      netns=bns)
        wait_for("the relay's control socket", lambda: (runtime_dir / f"{local}.ctl").exists()
                 or relay.p.poll() is not None)
        c_out, py_out = tmp_path / "c.pcap", tmp_path / "py.pcap"
        with open(c_out, "wb") as f:
            cproc = subprocess.Popen(bns.cmd(str(BIN / "pktipc-pcap"), "-n", "c", local),
                                     stdout=f, stderr=subprocess.PIPE)
        py = start(started, "dump", "--server", local, "--client", "py", "-w", str(py_out),
                   netns=bns)
        _, cerr = cproc.communicate(timeout=120)
        assert cproc.returncode == 0, cerr
        assert py.wait(120) == 0, py.text()
        assert relay.wait(120) == 0, relay.text()
        assert bk.wait() == 0
    for out in (c_out, py_out):
        got = read_pcap(str(out))
        assert got.error is None and got.linktype == expected.linktype, out.name
        assert got.packets == expected.packets, out.name
    assert segments(local) == [] and not (runtime_dir / f"{local}.ctl").exists()
