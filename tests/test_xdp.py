"""Live capture through AF_XDP (serve --xdp), on veth pairs in namespaces of
the tests' own, in native and in skb mode: what clients receive against what
was sent, frames the kernel wrote where clients read them, several queues,
a lossless client holding everything, and the refusals."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BrokerProc, Netns, pktipc_cmd, run_pktipc
from pktipc._shm import lib
from test_live import BCAST, MCAST, OTHER, assert_nothing_more, frame, receive, udp4

import pktipc

MODES = ["native", "skb"]
VLAN = lib.PKTIPC_F_VLAN_VALID | lib.PKTIPC_F_VLAN_REINSERTED


def serve_xdp(broker: Any, ns: Netns, *args: str, iface: str = "va") -> BrokerProc:
    b: BrokerProc = broker("-i", iface, "--xdp", "--block-timeout", "2", *args, netns=ns)
    return b


def source(name: str) -> pktipc.SourceStats:
    return pktipc.broker_stats(name).sources[0]


@pytest.fixture
def ns(netns: Netns) -> Netns:
    netns.veth("va", "vb")
    return netns


@pytest.mark.parametrize("mode", MODES)
def test_two_clients_get_the_wire_bytes(ns: Netns, broker: Any, tmp_path: Path,
                                        mode: str) -> None:
    """Byte-exact and in order to two clients, tags in the bytes as they
    were on the wire (802.1Q, 802.1ad + 802.1Q), flags read from the bytes,
    nanosecond times taken while the frames were sent; the frames where the
    kernel wrote them, in the segment's frame area; every one counted."""
    va = ns.mac("va")
    frames = [
        frame(va, udp4(1000, 53, 20)),                                    # to the host
        frame(BCAST, udp4(1001, 53, 40), (0x8100, 100)),                 # 802.1Q, broadcast
        frame(MCAST, udp4(1002, 53, 10), (0x88A8, 0x2000 | 200), (0x8100, 300)),  # QinQ
        frame(OTHER, udp4(1003, 80, 1400), (0x8100, 0xE000 | 4094)),     # PCP 7, VID 4094
        frame(OTHER, b"\x00" * 46, ethertype=0x88B5),                    # not IP
    ] * 40
    b = serve_xdp(broker, ns, "--xdp-mode", mode)
    with pktipc.connect(b.name, "one") as c1, pktipc.connect(b.name, "two") as c2:
        assert c1.welcome.policy == "drop" and c1.welcome.layout == 2
        assert [(i.name, i.linktype, i.kind) for i in c1.ifaces] == [
            ("va", 1, lib.PKTIPC_IFACE_LIVE)]
        t0 = time.time_ns()
        assert ns.send("vb", frames, tmp_path) == len(frames)
        t1 = time.time_ns()
        got1, offs = [], []
        while len(got1) < len(frames):
            batch = c1.next_batch(timeout=5)
            assert batch is not None
            with batch:
                got1 += [p._replace(data=bytes(p.data)) for p in batch]
                offs += batch.descriptors["data_off"].tolist()
                g = c1._map.seg.geometry        # type: ignore[attr-defined]
                area = g.frames_off - g.slab_off(batch.slab)
        got2 = receive(c2, len(frames))
        assert_nothing_more(c1)
        st = pktipc.broker_stats(b.name)
    assert [p.data for p in got1] == frames
    assert got1 == got2
    assert [p.seq for p in got1] == list(range(len(frames)))
    assert all(area <= off < area + g.frame_size * g.frame_count for off in offs)
    ts = [p.ts_ns for p in got1]
    assert ts == sorted(ts) and t0 <= ts[0] and ts[-1] <= t1
    for p, f in zip(got1, frames, strict=True):
        assert (p.caplen, p.wirelen, p.linktype, p.iface) == (len(f), len(f), 1, 0)
    shift, mask = lib.PKTIPC_F_DIR_SHIFT, lib.PKTIPC_F_DIR_MASK
    assert [(p.flags & mask) >> shift for p in got1[:5]] == [
        lib.PKTIPC_DIR_HOST, lib.PKTIPC_DIR_BROADCAST, lib.PKTIPC_DIR_MULTICAST,
        lib.PKTIPC_DIR_OTHERHOST, lib.PKTIPC_DIR_OTHERHOST]
    assert [p.flags & (VLAN | lib.PKTIPC_F_QINQ) for p in got1[:5]] == [
        0, VLAN, VLAN | lib.PKTIPC_F_QINQ, VLAN, 0]
    # Two clients of their own: nobody balances by flow, nothing is hashed.
    assert all(p.flags & lib.PKTIPC_F_NO_HASH for p in got1)
    src = st.sources[0]
    assert (src.packets, src.kernel_packets, src.kernel_drops) == (200, 200, 0)
    assert src.xdp is not None and src.xdp.mode == mode and src.xdp.zero_copy is False
    assert st.counters.broker_drops == st.counters.client_drops == 0


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_dump_writes_frames_from_the_frame_area(ns: Netns, broker: Any, tmp_path: Path,
                                                fmt: str) -> None:
    """`pktipc dump -w` of an --xdp broker, whose frames are in the
    segment's frame area, not in the slabs: the file holds every frame
    sent, byte for byte, in order."""
    from pcapref import read_pcap

    va = ns.mac("va")
    frames = [frame(va if i % 2 else OTHER, udp4(2000 + i % 50, 53, 20 + i % 1400))
              for i in range(300)]
    b = serve_xdp(broker, ns)
    out = tmp_path / f"out.{fmt}"
    dump = subprocess.Popen(pktipc_cmd("dump", "--server", b.name, "--format", fmt,
                                       "-c", str(len(frames)), "-w", str(out)),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not pktipc.broker_stats(b.name).clients:
            assert dump.poll() is None, dump.stderr.read() if dump.stderr else ""
            assert time.monotonic() < deadline, "dump did not attach"
            time.sleep(0.05)
        assert ns.send("vb", frames, tmp_path) == len(frames)
        _, err = dump.communicate(timeout=60)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    assert dump.returncode == 0, err
    assert [p.data for p in read_pcap(str(out)).packets] == frames


def test_vlan_tci_filter_and_snaplen(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """The filter runs in the broker over the bytes, as tcpdump's on a file:
    `vlan 100` matches the tag in the frame; -s truncates what is described,
    the frame's length kept; what the filter refused goes back to the kernel."""
    rng = random.Random(5)
    frames = []
    for i in range(400):
        tags = [(0x8100, rng.choice((100, 200)))] if rng.random() < 0.5 else []
        frames.append(frame(OTHER, udp4(2000 + i, rng.choice((53, 80)), 200), *tags))
    b = serve_xdp(broker, ns, "-s", "64", "--frames", "1024", "--slab-size", "4k",
                  "vlan", "100", "and", "udp", "port", "80")
    want = [f for f in frames if f[12:16] == b"\x81\x00\x00\x64" and f[-206:-204] == b"\x00\x50"]
    got, tcis = [], []
    with pktipc.connect(b.name, "c") as c:
        for _ in range(3):          # more than the frames of the area, passed or not
            ns.send("vb", frames, tmp_path)
        while len(got) < 3 * len(want) and (batch := c.next_batch(timeout=5)) is not None:
            with batch:
                got += [p._replace(data=bytes(p.data)) for p in batch]
                tcis += batch.descriptors["vlan_tci"].tolist()
        assert_nothing_more(c)
        src = source(b.name)
    assert 50 < len(want) < 150
    assert [p.data for p in got] == [f[:64] for f in want * 3]
    assert all((p.caplen, p.wirelen) == (64, len(want[0])) for p in got)
    assert all(p.flags & lib.PKTIPC_F_TRUNCATED and p.flags & VLAN for p in got)
    assert set(tcis) == {100}
    assert src.kernel_packets == src.packets == len(got) and src.kernel_drops == 0
    assert src.xdp is not None and src.xdp.filtered == 3 * (len(frames) - len(want))


def test_several_queues(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """A socket per receive queue: the sender's queue is chosen by its flow,
    so the flows spread over the four; all queues see every frame, two of
    them some (the rest go on to the kernel's stack), each flow in order."""
    ns.ip("link", "add", "qa", "numrxqueues", "4", "numtxqueues", "4", "type", "veth", "peer",
          "name", "qb", "numrxqueues", "4", "numtxqueues", "4")
    for i in ("qa", "qb"):
        ns.ip("link", "set", i, "up")
    frames = [frame(OTHER, udp4(3000 + i % 50, 53, 30, a=i % 50)) for i in range(400)]
    every = serve_xdp(broker, ns, iface="qa")
    with pktipc.connect(every.name, "c") as c:
        ns.send("qb", frames, tmp_path)
        got = receive(c, len(frames))
        assert_nothing_more(c)
        assert source(every.name).xdp.queues == (0, 1, 2, 3)  # type: ignore[union-attr]
    every.stop()
    assert sorted(p.data for p in got) == sorted(frames)
    two = serve_xdp(broker, ns, "--queues", "1,3", iface="qa")
    with pktipc.connect(two.name, "c") as c:
        ns.send("qb", frames, tmp_path)
        some = receive(c, len(frames), timeout=1)
        assert source(two.name).xdp.queues == (1, 3)  # type: ignore[union-attr]
    assert 0 < len(some) < len(frames)
    for packets in (got, some):                 # each flow on one queue: in order
        for flow in {p.data[29] for p in packets}:
            assert [p.data for p in packets if p.data[29] == flow] == [
                f for f in frames if f[29] == flow]


@pytest.mark.parametrize("mode", MODES)
def test_a_lossless_client_holding_everything(ns: Netns, broker: Any, tmp_path: Path,
                                              mode: str) -> None:
    """A block client holding every batch keeps every frame from the kernel:
    the kernel drops (and counts it), nothing is lost inside pktipc, and
    capture resumes once it gives them back."""
    b = serve_xdp(broker, ns, "--xdp-mode", mode, "--frames", "512", "--slab-size", "4k",
                  "--slabs", "4", "--allow-block", "c")
    frames = [frame(OTHER, udp4(1, 2, 100, a=i % 250)) for i in range(3000)]
    with pktipc.connect(b.name, "c", policy="block", credit=4) as c:
        held = []
        ns.send("vb", frames, tmp_path)
        while len(held) < 4 and (batch := c.next_batch(timeout=2)) is not None:
            held.append(batch)
        src = source(b.name)
        assert len(held) == 4 and src.kernel_drops and src.kernel_freezes
        assert src.xdp is not None and src.xdp.frames_free == 0
        got = [p._replace(data=bytes(p.data)) for batch in held for p in batch]
        for batch in held:
            batch.release()
        while (batch := c.next_batch(timeout=1)) is not None:
            with batch:
                got += [p._replace(data=bytes(p.data)) for p in batch]
        later = [frame(OTHER, udp4(3, 4, 100, a=i)) for i in range(100)]
        ns.send("vb", later, tmp_path)
        assert [p.data for p in receive(c, 100)] == later
        st = pktipc.broker_stats(b.name)
    src = st.sources[0]
    assert len(got) + 100 == src.packets == st.counters.packets
    assert src.packets + (src.kernel_drops or 0) == src.kernel_packets == len(frames) + 100
    assert st.counters.broker_drops == st.counters.client_drops == 0
    it = iter(frames)           # what arrived is what was sent, the drops as holes
    assert all(any(p.data == f for f in it) for p in got)


def test_a_stalled_drop_client_costs_only_itself(ns: Netns, broker: Any,
                                                 tmp_path: Path) -> None:
    """A drop client that reads nothing is skipped: its batches, and their
    frames, are taken back, and the other client gets every frame."""
    b = serve_xdp(broker, ns, "--frames", "512", "--slab-size", "4k", "--slabs", "8")
    frames = [frame(OTHER, udp4(5, 6, 100, a=i % 250)) for i in range(2000)]
    with pktipc.connect(b.name, "stalled"), pktipc.connect(b.name, "busy") as busy:
        got = []
        for i in range(0, len(frames), 100):        # paced: the kernel keeps up
            ns.send("vb", frames[i:i + 100], tmp_path)
            got += receive(busy, 100)
        st = pktipc.broker_stats(b.name)
    assert [p.data for p in got] == frames
    assert st.client("stalled").drops > 0 and st.client("busy").drops == 0
    assert st.sources[0].kernel_drops == 0


def test_status_says_how_it_captures(ns: Netns, broker: Any, tmp_path: Path) -> None:
    b = serve_xdp(broker, ns, "--xdp-mode", "skb")
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", [frame(OTHER, udp4(1, 2, 3))] * 7, tmp_path)
        assert len(receive(c, 7)) == 7
        r = run_pktipc("status", b.name)
        j = json.loads(run_pktipc("status", "--json", b.name).stdout)
    assert "source va  linktype 1  packets 7  bytes" in r.stdout
    assert "kernel: packets 7 drops 0 freezes 0  AF_XDP skb mode, copy, queue 0" in r.stdout
    x = j[0]["sources"][0]["xdp"]
    assert (x["mode"], x["queues"], x["frame_size"], x["frames"]) == ("skb", [0], 2048, 32768)
    b.stop()
    assert "through AF_XDP (skb mode, copy, queue 0)" in b.stderr()
    assert "prog/xdp" not in subprocess.run(["ip", "-n", ns.name, "link", "show", "va"],
                                            capture_output=True, text=True).stdout


@pytest.mark.parametrize("args, message", [
    (["-i", "nosuch0", "--xdp"], "nosuch0: no such interface"),
    (["-i", "down0", "--xdp"], "down0: the interface is down"),
    (["-i", "lo", "--xdp"], "lo: link type ARPHRD 772: --xdp captures Ethernet interfaces only"),
    (["-i", "va", "--xdp", "--zero-copy"], "va: its driver cannot do zero-copy AF_XDP (leave "
                                           "--zero-copy out: copy mode works)"),
    (["-i", "br0", "--xdp"], "br0: its driver has no native XDP (--xdp-mode skb works with any "
                             "driver)"),
    (["-i", "big", "--xdp"], "big: its MTU of 4000 bytes does not fit AF_XDP frames of 4096 "
                             "bytes (an MTU of at most 3810 does)"),
    (["-i", "va", "--xdp", "--queues", "2"], "va has 1 receive queue (0 to 0): there is no "
                                             "queue 2"),
    (["-i", "va", "--xdp", "--queues", "0,x"], "--queues 0,x: 'all', or queue numbers"),
    (["-i", "va", "--xdp", "tcp", "port", "eighty"], "bad filter 'tcp port eighty'"),
    (["-i", "va", "-i", "vb", "--xdp"], "--xdp captures one interface: give -i once"),
    (["-i", "va", "--xdp", "--fanout"], "--fanout: not with --xdp"),
    (["-i", "va", "--xdp", "--user", "nobody"], "--user: --xdp binds its sockets"),
    (["-i", "va", "--queues", "1"], "--queues: AF_XDP options, for --xdp"),
    (["-i", "va", "--xdp", "--frames", "100"], "--frames must be between 256 and 1048576"),
    (["-i", "va", "--xdp", "--tx"], "one capturing with --xdp does not send"),
])
def test_refused(ns: Netns, runtime_dir: Path, args: list[str], message: str) -> None:
    """Each in one line, before anything starts, leaving nothing attached."""
    ns.veth("down0", "down1", up=False)
    ns.veth("big", "big1")
    ns.ip("link", "set", "big", "mtu", "4000")
    ns.ip("link", "add", "br0", "type", "bridge")
    for i in ("br0", "lo"):
        ns.ip("link", "set", i, "up")
    r = subprocess.run(ns.cmd(*pktipc_cmd("serve", "--name", "bad", *args)),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list(runtime_dir.iterdir())
    assert "xdp" not in subprocess.run(["ip", "-n", ns.name, "link"], capture_output=True,
                                       text=True).stdout


def test_refused_native_xdp_on_a_veth_whose_peer_mtu_is_too_large(ns: Netns) -> None:
    ns.ip("link", "set", "vb", "mtu", "4000")
    r = subprocess.run(ns.cmd(*pktipc_cmd("serve", "--name", "bad", "-i", "va", "--xdp")),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "va: the driver refuses native XDP at this MTU (on veth, the peer's MTU must be at " \
           "most 3506 for native XDP)" in r.stderr


def test_refused_a_second_broker_on_the_same_interface(ns: Netns, broker: Any) -> None:
    b = serve_xdp(broker, ns)
    r = subprocess.run(ns.cmd(*pktipc_cmd("serve", "--name", "second", "-i", "va", "--xdp")),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "va already has an XDP program (id " in r.stderr
    assert "--xdp needs the interface's XDP hook for itself" in r.stderr
    b.stop()
    assert b.proc.returncode == 0


@pytest.mark.parametrize("drop, message", [
    ("bpf,net_admin,sys_admin", "--xdp on va needs CAP_BPF and CAP_NET_ADMIN"),
    ("net_raw", "capturing on va needs CAP_NET_RAW"),
])
def test_refused_without_privileges(ns: Netns, drop: str, message: str) -> None:
    caps = ",".join(f"-{c}" for c in drop.split(","))
    r = subprocess.run(ns.cmd("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}",
                              *pktipc_cmd("serve", "--name", "nocap", "-i", "va", "--xdp")),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
