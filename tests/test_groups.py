"""Groups against a real broker: real captures and generated traffic fanned
out to several groups and balanced within each, members in threads of
their own (each its own ZeroMQ socket), joining and leaving during traffic
(the generated traffic served from its file, and sent on a veth to a broker
capturing through AF_XDP); status, dump --group and refused modes through
the command line."""

from __future__ import annotations

import ipaddress
import json
import os
import struct
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import BrokerProc, Netns, all_captures, pktipc_cmd, run_pktipc
from pcapref import read_pcap
from pktipc._shm import ffi, lib

import pktipc
from pktipc import _protocol as proto
from pktipc._broker.broker import Broker, ServeOptions
from pktipc._tools.synth import write_pcap

Got = dict[int, tuple[int, int, bytes]]     # seq -> (iface, hash, bytes)


class Member(threading.Thread):
    """One client consuming until end-of-stream (or `stop_after` packets),
    recording what it released: seq -> (iface, descriptor hash, bytes); the
    hash of the bytes where the descriptor has none (NO_HASH)."""

    def __init__(self, server: str, name: str, group: str | None = None,
                 balance: str | None = None, stop_after: int | None = None,
                 credit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.group, self.balance, self.credit = group, balance, credit
        self.server, self.client_name, self.stop_after = server, name, stop_after
        self.got: Got = {}
        self.batches: list[tuple[int, int, int]] = []   # (seq, n, own packets)
        self.error: BaseException | None = None
        self.attached = threading.Event()
        self.slot = -1                  # the broker's, from WELCOME

    def run(self) -> None:
        try:
            with pktipc.connect(self.server, self.client_name, group=self.group,
                                balance=self.balance, credit=self.credit) as c:
                self.slot = c.welcome.slot
                self.attached.set()
                for batch in c:
                    with batch:
                        d = batch.descriptors
                        mine = batch.mine
                        assert len(batch) == len(mine) > 0
                        self.batches.append((batch.seq, batch.n, len(mine)))
                        hashes = d["hash"][mine].tolist()
                        for p, h in zip(batch, hashes, strict=True):
                            assert p.seq not in self.got, f"{self.client_name}: {p.seq} twice"
                            if p.flags & lib.PKTIPC_F_NO_HASH:     # no group needed one
                                h = lib.pkb_flow_hash(bytes(p.data), p.caplen, p.linktype, 0)
                            self.got[p.seq] = (p.iface, h, bytes(p.data))
                    if self.stop_after is not None and len(self.got) >= self.stop_after:
                        return
        except BaseException as e:  # reported by finish()
            self.error = e
            self.attached.set()

    def finish(self, timeout: float = 60) -> Got:
        self.join(timeout)
        assert not self.is_alive(), f"{self.client_name} did not finish"
        if self.error is not None:
            raise self.error
        return self.got


def start(*members: Member) -> None:
    for m in members:
        m.start()
        assert m.attached.wait(15), f"{m.client_name} did not attach"
        if m.error is not None:
            raise m.error


def union_exactly_once(*gots: Got) -> Got:
    out: Got = {}
    for g in gots:
        assert out.keys().isdisjoint(g), "a packet reached two members of one group"
        out.update(g)
    return out


def one_member_per_hash(gots: list[Got]) -> dict[int, int]:
    owner: dict[int, int] = {}
    for i, g in enumerate(gots):
        for _, h, _ in g.values():
            assert owner.setdefault(h, i) == i, f"flow hash {h:#x} reached two members"
    return owner


# --- real captures ------------------------------------------------------------------------


def test_every_capture_to_two_groups(broker) -> None:
    """All the tcpdump captures to group ids (two members, by flow) and rec
    (one member): each group gets every packet exactly once, byte for byte;
    within ids, every flow hash goes to one member."""
    files = all_captures()
    want = [(i, d.data) for i, f in enumerate(files) for d in read_pcap(str(f)).packets]
    args = [a for f in files for a in ("-r", str(f))]
    b = broker(*args, "--wait-clients", "3", "--slab-size", "256k", "--slabs", "8")
    ids1, ids2 = Member(b.name, "ids-1", "ids"), Member(b.name, "ids-2", "ids")
    rec = Member(b.name, "rec")
    start(ids1, ids2, rec)
    got1, got2, got_rec = ids1.finish(), ids2.finish(), rec.finish()
    assert b.wait() == 0

    assert [(i, data) for _, (i, _, data) in sorted(got_rec.items())] == want
    ids = union_exactly_once(got1, got2)
    assert ids == got_rec
    owners = one_member_per_hash([got1, got2])
    assert set(owners.values()) == {0, 1}
    assert min(len(got1), len(got2)) > len(want) // 5
    # The descriptor's hash is the flow hash of the packet's bytes.
    linktypes = [read_pcap(str(f)).linktype for f in files]
    assert all(h == lib.pkb_flow_hash(d, len(d), linktypes[i], 0)
               for i, h, d in got_rec.values())


@pytest.mark.parametrize("name", ["vxlan.pcap", "bigtcp-ipv4-vxlan-ipv6.pcap"])
def test_tunnel_hash_balances_on_the_inner_flow(broker, name: str) -> None:
    f = next(p for p in all_captures() if p.name == name)
    b = broker("-r", str(f), "--tunnel-hash", "--wait-clients", "2")
    m1, m2 = Member(b.name, "m1", "g"), Member(b.name, "m2", "g")
    start(m1, m2)
    got = union_exactly_once(m1.finish(), m2.finish())
    assert len(got) == len(read_pcap(str(f)).packets)
    assert all(h == lib.pkb_flow_hash(d, len(d), 1, lib.PKB_HASH_TUNNELS)
               for _, h, d in got.values())
    one_member_per_hash([m1.got, m2.got])


# --- generated traffic ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 packets of 300 flows, both directions, some VLAN-tagged."""
    f = tmp_path_factory.mktemp("synth") / "flows.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 20_000, flows=300, seed=7, sizes=(64, 128, 256))
    return f


class Served:
    """The generated traffic served `loops` times: from its file (at `speed`
    times real time: a pass in about 0.5 s at 20), or sent on a veth (a pass
    in 0.5 s) to a broker capturing through AF_XDP, once every member is
    there."""

    def __init__(self, kind: str, broker: Any, synth: Path, loops: int, speed: float | None,
                 args: list[str], netns: Netns | None, tmp: Path) -> None:
        self.kind, self.loops, self.speed, self.tmp = kind, loops, speed, tmp
        self.frames = [p.data for p in read_pcap(str(synth)).packets]
        self.sender: subprocess.Popen[str] | None = None
        if kind == "file":
            pace = ["--speed", str(speed)] if speed else []
            self.b: BrokerProc = broker("-r", str(synth), "--loop", str(loops), *pace, *args)
        else:
            assert netns is not None
            self.ns = netns
            netns.veth("va", "vb")
            # Room for a second of the members' lag: live, the kernel drops
            # what finds none (a file waits).
            self.b = broker("-i", "va", "--xdp", *args, "--slabs", "1024", netns=netns)
        self.name = self.b.name

    def go(self) -> None:
        """Every member that should be there is: the traffic starts (live, at
        a rate the broker keeps up with on a busy machine)."""
        if self.kind == "xdp":
            self.sender = self.ns.sender("vb", self.frames * self.loops, self.tmp, 40_000)

    def end(self) -> None:
        """The stream is over once every packet was captured and every client
        gave back all it was handed (a live broker is then stopped)."""
        if self.kind == "file":
            assert self.b.wait() == 0
            return
        assert self.sender is not None
        total = len(self.frames) * self.loops
        assert int(self.sender.communicate(timeout=60)[0]) == total
        deadline = time.monotonic() + 30
        while True:
            st = pktipc.broker_stats(self.name)
            if st.counters.packets == total and not any(
                    c.lag_packets or c.queued for c in st.clients):
                break
            src = st.sources[0]
            assert time.monotonic() < deadline, (
                (src.kernel_packets, src.kernel_drops, src.kernel_freezes, src.xdp),
                [(c.name, c.packets, c.lag_packets, c.queued) for c in st.clients])
            time.sleep(0.05)
        assert st.sources[0].kernel_drops == 0
        self.b.stop()
        assert self.b.proc.returncode == 0


@pytest.fixture(params=["file", "xdp"])
def serve(request: pytest.FixtureRequest, broker: Any, synth: Path,
          tmp_path: Path) -> Any:
    def start(*args: str, loops: int = 1, speed: float | None = None) -> Served:
        ns = request.getfixturevalue("netns") if request.param == "xdp" else None
        return Served(request.param, broker, synth, loops, speed, list(args), ns, tmp_path)
    return start


def flow_of(frame: bytes) -> tuple[Any, ...]:
    """Both directions of a flow give the same key: read from the bytes,
    independently of the C."""
    off = 12
    etype = struct.unpack_from("!H", frame, off)[0]
    while etype == 0x8100:
        off += 4
        etype = struct.unpack_from("!H", frame, off)[0]
    ip = frame[off + 2:]
    if etype == 0x0800:
        proto, src, dst, l4 = ip[9], ip[12:16], ip[16:20], ip[(ip[0] & 15) * 4:]
    else:
        assert etype == 0x86DD
        proto, src, dst, l4 = ip[6], ip[8:24], ip[24:40], ip[40:]
    sport, dport = struct.unpack_from("!HH", l4)
    a = (ipaddress.ip_address(src), sport)
    z = (ipaddress.ip_address(dst), dport)
    return (proto, *sorted([a, z], key=lambda e: (e[0].version, int(e[0]), e[1])))


def test_every_flow_both_ways_to_one_member(serve, synth: Path) -> None:
    want = read_pcap(str(synth)).packets
    b = serve("--wait-clients", "4", "--slab-size", "64k")
    members = [Member(b.name, f"w{i}", "ids") for i in range(3)]
    rec = Member(b.name, "rec", "rec")
    start(*members, rec)
    b.go()
    b.end()
    gots = [m.finish() for m in members]
    assert len(rec.finish()) == len(want)
    ids = union_exactly_once(*gots)
    assert [d for _, (_, _, d) in sorted(ids.items())] == [p.data for p in want]
    owner: dict[tuple[Any, ...], int] = {}
    directions: dict[tuple[Any, ...], set[bytes]] = defaultdict(set)
    for i, g in enumerate(gots):
        for _, _, data in g.values():
            key = flow_of(data)
            assert owner.setdefault(key, i) == i, f"flow {key} reached two members"
            directions[key].add(data[6:12])          # the source MAC: which way
    assert sum(len(d) == 2 for d in directions.values()) > 50    # both ways seen
    assert set(owner.values()) == {0, 1, 2}
    # Flows, not packets, are spread: each member has some.
    per_member = [list(owner.values()).count(i) for i in range(3)]
    assert min(per_member) > len(owner) // 6


def test_round_robin_gives_whole_batches_in_turn(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--wait-clients", "2", "--slab-size", "16k")
    a = Member(b.name, "a", "rr", balance="round-robin")
    z = Member(b.name, "z", "rr")
    start(a, z)
    got = union_exactly_once(a.finish(), z.finish())
    assert sorted(got) == list(range(20_000))
    for m in (a, z):
        assert all(n == own for _, n, own in m.batches)      # whole batches
    turns = sorted([(seq, m.client_name) for m in (a, z) for seq, _, _ in m.batches])
    assert len(turns) > 20
    assert all(x[1] != y[1] for x, y in zip(turns, turns[1:], strict=False))


def test_join_and_leave_during_traffic(serve, synth: Path) -> None:
    """A joins, B leaves mid-stream and C joins late: the group still gets
    every packet exactly once, counting what each member released."""
    b = serve("--wait-clients", "2", "--slab-size", "8k", "--credit", "2",
              loops=3, speed=20)                                        # c comes in time
    total = 3 * 20_000
    a = Member(b.name, "a", "ids")
    leaver = Member(b.name, "b", "ids", stop_after=8_000)
    start(a, leaver)
    b.go()
    got_b = leaver.finish()
    assert len(got_b) >= 8_000
    late = Member(b.name, "c", "ids")
    start(late)
    b.end()
    got = union_exactly_once(a.finish(), got_b, late.finish())
    assert sorted(got) == list(range(total))
    assert len(late.got) > 0 and max(got_b) < max(late.got)


def test_member_back_under_its_name_gets_its_flows_back(serve, synth: Path) -> None:
    """Every pass over the capture has the same flows: b, gone for a while
    and back under its name, is given exactly the flows it had."""
    # Paced (a pass in 0.5 s), so that b, back, sees whole passes again
    # however fast a alone would have read the rest.
    b = serve("--wait-clients", "2", "--slab-size", "8k", "--credit", "2", loops=4, speed=20)
    a = Member(b.name, "a", "ids")
    first = Member(b.name, "b", "ids", stop_after=5_000)
    start(a, first)
    b.go()
    flows_before = {h for _, h, _ in first.finish().values()}
    time.sleep(0.2)                     # a has the group to itself for a while
    again = Member(b.name, "b", "ids")
    start(again)
    b.end()
    got = union_exactly_once(a.finish(), first.got, again.finish())
    assert sorted(got) == list(range(4 * 20_000))
    flows_after = {h for _, h, _ in again.got.values()}
    assert again.slot == first.slot != a.slot     # a slot is a hash of the member's name
    slots = ffi.new("uint32_t[]", [a.slot, first.slot])
    owned_by_b = {h for _, h, _ in got.values() if lib.pktipc_flow_owner(h, slots, 2) == 1}
    assert flows_before <= flows_after == owned_by_b   # its place, and its flows, back
    assert {h for _, h, _ in a.got.values()} > owned_by_b.symmetric_difference(
        {h for _, h, _ in got.values()})                # a had them all meanwhile


def test_status_shows_groups_and_members(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--wait-clients", "3", "--linger")
    with pktipc.connect(b.name, "w1", group="ids") as w1, \
            pktipc.connect(b.name, "w2", group="ids") as w2, \
            pktipc.connect(b.name, "rec", balance="round-robin") as rec:
        assert (w1.group, w1.balance, rec.group, rec.balance) == \
            ("ids", "flow", "rec", "round-robin")
        counts = {}
        for c in (w1, w2, rec):       # the whole capture fits the ring: one at a time
            counts[c.name] = sum(len(batch) for batch in c if batch.release() is None)
        assert counts["rec"] == 20_000 and counts["w1"] + counts["w2"] == 20_000
        r = run_pktipc("status", "--json", b.name)
        assert r.returncode == 0, r.stderr
        [st] = json.loads(r.stdout)
        groups = {g["name"]: g for g in st["groups"]}
        assert sorted(groups["ids"]["members"]) == ["w1", "w2"]
        assert groups["ids"]["balance"] == "flow"
        assert groups["ids"]["packets"] == 20_000
        assert groups["rec"] == {"name": "rec", "balance": "round-robin", "members": ["rec"],
                                 "shared": False, "changes": 1, "packets": 20_000}
        assert (groups["ids"]["shared"], groups["ids"]["changes"]) == (True, 2)
        per = {c["name"]: c["packets"] for c in st["clients"]}
        assert per == counts
        text = run_pktipc("status", b.name).stdout
        assert "group ids  flow  2 member(s)  shared  joined or left 2  packets 20000" in text
        assert (f"client w1  slot {w1.welcome.slot}  block  pid {os.getpid()}  "
                f"packets {counts['w1']}") in text


def test_another_mode_is_refused(broker, synth: Path) -> None:
    b = broker("-r", str(synth), "--wait-clients", "2")
    with pktipc.connect(b.name, "w1", group="ids"):
        with pytest.raises(pktipc.Refused) as e:
            pktipc.connect(b.name, "w2", group="ids", balance="round-robin")
        assert e.value.code == "balance-mismatch"
        r = run_pktipc("dump", "--server", b.name, "--client", "w3", "--group", "ids",
                       "--balance", "round-robin", "-w", "/dev/null")
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "group 'ids' balances by flow, not round-robin" in r.stderr
        r = run_pktipc("dump", "--server", b.name, "--group", "no spaces", "-w", "/dev/null")
        assert r.returncode == 1 and "group" in r.stderr and r.stderr.count("\n") == 1


def test_dump_group_members_write_their_shares(broker, synth: Path, tmp_path: Path) -> None:
    """Two `pktipc dump --group` processes: tcpdump reads each file, and
    together they hold the capture."""
    b = broker("-r", str(synth), "--wait-clients", "2")
    outs = [tmp_path / f"{i}.pcap" for i in range(2)]
    procs = [subprocess.Popen(pktipc_cmd("dump", "--server", b.name, "--client", f"d{i}",
                                         "--group", "dumpers", "-w", str(o)),
                              stderr=subprocess.PIPE, text=True)
             for i, o in enumerate(outs)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
        if p.stderr:
            p.stderr.close()
    assert b.wait() == 0
    shares = [read_pcap(str(o)).packets for o in outs]
    assert all(shares)
    assert sorted(p.data for s in shares for p in s) == sorted(p.data for p in
                                                               read_pcap(str(synth)).packets)
    for o, s in zip(outs, shares, strict=True):
        r = subprocess.run(["tcpdump", "-nn", "-r", str(o)], capture_output=True, text=True)
        assert r.returncode == 0 and len(r.stdout.splitlines()) == len(s)


def test_a_member_that_released_and_left_is_not_taken_for_lost(synth: Path) -> None:
    """A member releases a batch, says BYE and closes its connection; the
    broker, before it has read those, has something to send it: ZeroMQ
    finds the member unreachable while its RELEASE and BYE still wait, unread.
    They are read first: the batch it released is not passed on to the
    group's other member (it would have its packets twice)."""
    brk = Broker(ServeOptions(name=f"gone{os.getpid()}", files=[str(synth)], wait_clients=2))
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    try:
        brk._start()
        brk.poller = zmq.Poller()     # the loop's: it watches each client's pidfd

        def edge() -> None:         # admissions (ZAP) and connections counted
            brk.control.handle_zap(time.monotonic())
            brk.control.handle_monitor()

        def receive() -> None:      # what has come, as the loop reads it
            deadline = time.monotonic() + 5
            while not brk.control.sock.poll(20):
                edge()
                assert time.monotonic() < deadline, "nothing came"
            brk._receive_all()
            brk._flush()

        def attach(name: str) -> tuple[zmq.Socket[bytes], proto.ClientConnection]:
            sock = ctx.socket(zmq.DEALER)
            sock.connect(brk.endpoint)
            conn = proto.ClientConnection()
            conn.hello(time.monotonic(), name=name, group="ids", balance="round-robin",
                       pid=os.getpid())
            for f in conn.frames_to_send():
                sock.send(f)
            receive()
            assert sock.poll(5000)
            [ev] = conn.receive(sock.recv(), time.monotonic())
            assert isinstance(ev, proto.Welcomed)
            conn.mapped(time.monotonic())
            for f in conn.frames_to_send():
                sock.send(f)
            receive()
            return sock, conn

        a, _ = attach("a")
        b, bconn = attach("b")
        assert {c.name: brk.conn.heard(c.peer) for c in brk.disp.clients.values()} == \
            {"a": True, "b": True}
        # One batch, whole (round-robin), to b.
        seq = -1
        while not brk.disp.clients["b"].held:
            slab = brk.pool.take()
            assert slab is not None
            seq, _ = brk.disp.publish(slab, 1, time.monotonic())
            brk._flush()
        assert brk.disp.clients["b"].held == {seq}
        bconn.release(time.monotonic(), [seq])
        bconn.bye(time.monotonic())
        for f in bconn.frames_to_send():
            b.send(f)
        b.close(linger=5000)
        # The broker sees the connection go; it has not read what b sent.
        deadline = time.monotonic() + 5
        while brk.control.connections > 1:
            edge()
            time.sleep(0.01)
            assert time.monotonic() < deadline, "the broker did not see b's connection go"
        # A heartbeat falls due for b before the loop reads what it sent.
        brk.conn.handle_timer(time.monotonic() + 1.5)
        brk._flush()
        while brk.control.sock.poll(100):
            brk._receive_all()
            brk._flush()
        assert list(brk.disp.clients) == ["a"]
        got = brk.disp.clients["a"]
        assert seq not in got.held and seq not in got.queue, "b's batch passed on to a"
        assert brk.evictions == 0          # b said BYE: it was not lost
    finally:
        ctx.destroy(linger=0)
        brk.close()
