"""Live capture through AF_PACKET TPACKET_V3, on veth pairs in namespaces of
the tests' own: what clients receive is checked against what was sent."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BrokerProc, Netns, pktipc_cmd, run_pktipc
from pktipc._shm import lib

import pktipc

BCAST = b"\xff" * 6
SRC = b"\x02\x00\x00\x00\x00\x02"
OTHER = b"\x02\x00\x00\x00\x00\x99"
MCAST = b"\x01\x00\x5e\x00\x00\x01"


def frame(dst: bytes, payload: bytes, *tags: tuple[int, int], ethertype: int = 0x0800,
          src: bytes = SRC) -> bytes:
    """An Ethernet frame with VLAN tags (tpid, tci), outermost first."""
    t = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags)
    return dst + src + t + struct.pack("!H", ethertype) + payload


def udp4(sport: int, dport: int, n: int, a: int = 1, b: int = 2) -> bytes:
    """An IPv4 UDP datagram with an n-byte payload (checksums left at 0)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + n, 0, 0, 64, 17, 0,
                     bytes([10, 0, a >> 8, a & 0xFF]), bytes([10, 0, 0, b]))
    return ip + struct.pack("!HHHH", sport, dport, 8 + n, 0) + bytes(i & 0xFF for i in range(n))


def serve_live(broker: Any, ns: Netns, *args: str) -> BrokerProc:
    b: BrokerProc = broker(*args, "--block-timeout", "2", netns=ns)
    return b


def receive(client: pktipc.Client, count: int, timeout: float = 10) -> list[pktipc.Packet]:
    got: list[pktipc.Packet] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        b = client.next_batch(timeout=0.2)
        if b is not None:
            with b:
                got += [p._replace(data=bytes(p.data)) for p in b]
    return got


def assert_nothing_more(client: pktipc.Client) -> None:
    b = client.next_batch(timeout=0.3)
    assert b is None, f"unexpected batch of {len(b) if b else 0} packets"


def live_stats(name: str) -> pktipc.BrokerStats:
    return pktipc.broker_stats(name)


@pytest.fixture
def ns(netns: Netns) -> Netns:
    netns.veth("va", "vb")
    return netns


def test_two_clients_get_the_wire_bytes(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """Byte-exact delivery to two clients, tags the kernel stripped put back
    as they were on the wire (802.1Q and 802.1ad+802.1Q), with direction,
    VLAN flags and nanosecond timestamps taken while the frames were sent."""
    va = ns.mac("va")
    frames = [
        frame(va, udp4(1000, 53, 20)),                                    # to the host
        frame(BCAST, udp4(1001, 53, 40), (0x8100, 100)),                 # 802.1Q, broadcast
        frame(MCAST, udp4(1002, 53, 10), (0x88A8, 0x2000 | 200), (0x8100, 300)),  # QinQ
        frame(OTHER, udp4(1003, 80, 1400), (0x8100, 0xE000 | 4094)),     # PCP 7, VID 4094
        frame(OTHER, b"\x00" * 46, ethertype=0x88B5),                    # not IP
    ] * 20
    b = serve_live(broker, ns, "-i", "va")
    with pktipc.connect(b.name, "one") as c1, pktipc.connect(b.name, "two") as c2:
        assert c1.welcome.policy == "drop"          # a live broker never waits by default
        assert [(i.name, i.linktype, i.kind) for i in c1.ifaces] == [
            ("va", 1, lib.PKTIPC_IFACE_LIVE)]
        t0 = time.time_ns()
        assert ns.send("vb", frames, tmp_path) == len(frames)
        t1 = time.time_ns()
        got1, got2 = receive(c1, len(frames)), receive(c2, len(frames))
        assert_nothing_more(c1)
    assert [p.data for p in got1] == frames
    assert got1 == got2
    assert [p.seq for p in got1] == list(range(len(frames)))
    ts = [p.ts_ns for p in got1]
    assert ts == sorted(ts) and t0 <= ts[0] and ts[-1] <= t1
    for p, f in zip(got1, frames, strict=True):
        assert (p.caplen, p.wirelen, p.linktype, p.iface) == (len(f), len(f), 1, 0)
    shift, mask = lib.PKTIPC_F_DIR_SHIFT, lib.PKTIPC_F_DIR_MASK
    dirs = [(p.flags & mask) >> shift for p in got1[:5]]
    assert dirs == [lib.PKTIPC_DIR_HOST, lib.PKTIPC_DIR_BROADCAST, lib.PKTIPC_DIR_MULTICAST,
                    lib.PKTIPC_DIR_OTHERHOST, lib.PKTIPC_DIR_OTHERHOST]
    vlan = lib.PKTIPC_F_VLAN_VALID | lib.PKTIPC_F_VLAN_REINSERTED
    assert [p.flags & (vlan | lib.PKTIPC_F_QINQ) for p in got1[:5]] == [
        0, vlan, vlan | lib.PKTIPC_F_QINQ, vlan, 0]


def test_outgoing_frames_are_marked(ns: Netns, broker: Any, tmp_path: Path) -> None:
    b = serve_live(broker, ns, "-i", "va")
    frames = [frame(OTHER, udp4(7, 7, 30, a=i)) for i in range(10)]
    with pktipc.connect(b.name, "c") as c:
        ns.send("va", frames, tmp_path)          # sent by the captured interface itself
        got = receive(c, 10)
    assert [p.data for p in got] == frames
    assert {(p.flags & lib.PKTIPC_F_DIR_MASK) >> lib.PKTIPC_F_DIR_SHIFT for p in got} == {
        lib.PKTIPC_DIR_OUTGOING}


def test_tags_kept_in_the_descriptor_only(ns: Netns, broker: Any, tmp_path: Path) -> None:
    tagged = frame(OTHER, udp4(1, 2, 50), (0x8100, 0x2000 | 42))
    qinq = frame(OTHER, udp4(1, 2, 50), (0x88A8, 7), (0x8100, 8))
    b = serve_live(broker, ns, "-i", "va", "--no-vlan-reinsert")
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", [tagged, qinq], tmp_path)
        got = receive(c, 2)
    assert got[0].data == tagged[:12] + tagged[16:]
    assert got[1].data == qinq[:12] + qinq[16:]         # the inner tag stays in the bytes
    assert [p.flags & 0x7 for p in got] == [lib.PKTIPC_F_VLAN_VALID,
                                            lib.PKTIPC_F_VLAN_VALID | lib.PKTIPC_F_QINQ]
    assert [p.wirelen for p in got] == [len(tagged) - 4, len(qinq) - 4]


def test_vlan_tci_in_descriptors(ns: Netns, broker: Any, tmp_path: Path) -> None:
    frames = [frame(OTHER, udp4(1, 2, 20), (0x8100, tci)) for tci in (1, 0x2000 | 100, 0xF00F)]
    b = serve_live(broker, ns, "-i", "va")
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", frames, tmp_path)
        tcis, data = [], []
        while len(tcis) < 3:
            batch = c.next_batch(timeout=5)
            assert batch is not None
            with batch:
                tcis += batch.descriptors["vlan_tci"].tolist()
                data += [bytes(v) for v in batch.views()]
    assert tcis == [1, 0x2000 | 100, 0xF00F]
    assert data == frames


def test_snaplen_truncates(ns: Netns, broker: Any, tmp_path: Path) -> None:
    frames = [frame(OTHER, udp4(5, 6, 500)), frame(OTHER, udp4(5, 6, 500), (0x8100, 5)),
              frame(OTHER, udp4(5, 6, 2)), frame(OTHER, b"\x00" * 50, (0x88A8, 1), (0x8100, 2))]
    b = serve_live(broker, ns, "-i", "va", "-s", "64")
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", frames, tmp_path)
        got = receive(c, len(frames))
    for p, f in zip(got, frames, strict=True):
        assert p.data == f[: min(64, len(f))]
        assert (p.caplen, p.wirelen) == (min(64, len(f)), len(f))
        assert bool(p.flags & lib.PKTIPC_F_TRUNCATED) == (len(f) > 64)


def test_filter(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """Only what the filter matches arrives; `vlan` matches the tag the
    kernel stripped, as it does in tcpdump."""
    rng = random.Random(3)
    frames = []
    for i in range(300):
        tags = [(0x8100, rng.choice((100, 200)))] if rng.random() < 0.5 else []
        frames.append(frame(OTHER, udp4(2000 + i, rng.choice((53, 80, 123)), 30), *tags))
    b = serve_live(broker, ns, "-i", "va", "udp", "port", "53")
    b2 = serve_live(broker, ns, "-i", "va", "--filter", "vlan 100 and udp port 80")
    with pktipc.connect(b.name, "c") as c, pktipc.connect(b2.name, "c") as c2:
        ns.send("vb", frames, tmp_path)
        want = [f for f in frames if f[-36:-34] == b"\x00\x35"]
        want2 = [f for f in frames if f[12:16] == b"\x81\x00\x00\x64" and f[-36:-34] == b"\x00\x50"]
        got, got2 = receive(c, len(want)), receive(c2, len(want2))
        assert_nothing_more(c)
        assert_nothing_more(c2)
    assert 50 < len(want) < 250 and 10 < len(want2) < 100
    assert [p.data for p in got] == want
    assert [p.data for p in got2] == want2
    src = live_stats(b.name).sources[0]
    assert src.kernel_packets == len(want)        # the kernel counts what passed


def test_two_interfaces_aggregated(ns: Netns, broker: Any, tmp_path: Path) -> None:
    ns.veth("wa", "wb")
    fa = [frame(OTHER, udp4(1, 1, 10, a=i)) for i in range(200)]
    fb = [frame(OTHER, udp4(2, 2, 20, a=i)) for i in range(300)]
    b = serve_live(broker, ns, "-i", "va", "-i", "wa")
    with pktipc.connect(b.name, "c") as c:
        assert [i.name for i in c.ifaces] == ["va", "wa"]
        ns.send("vb", fa, tmp_path)
        ns.send("wb", fb, tmp_path)
        got = receive(c, 500)
        assert_nothing_more(c)
    assert [p.data for p in got if p.iface == 0] == fa
    assert [p.data for p in got if p.iface == 1] == fb
    assert [p.seq for p in got] == list(range(500))
    st = live_stats(b.name).sources
    assert [(s.name, s.packets, s.kernel_packets) for s in st] == [
        ("va", 200, 200), ("wa", 300, 300)]


def test_fanout_splits_an_interface_across_brokers(ns: Netns, broker: Any,
                                                  tmp_path: Path) -> None:
    """The first broker asks the kernel for a group id of its own; the second
    joins it: every packet reaches exactly one of them, flows kept whole."""
    b1 = serve_live(broker, ns, "-i", "va", "--fanout")
    gid = live_stats(b1.name).sources[0].fanout_id
    b2 = serve_live(broker, ns, "-i", "va", "--fanout", str(gid))
    assert live_stats(b2.name).sources[0].fanout_id == gid
    frames = [frame(OTHER, udp4(3000 + flow, 53, 12 + n, a=flow))
              for n in range(10) for flow in range(64)]
    with pktipc.connect(b1.name, "c") as c1, pktipc.connect(b2.name, "c") as c2:
        ns.send("vb", frames, tmp_path)
        deadline = time.monotonic() + 10
        got1: list[pktipc.Packet] = []
        got2: list[pktipc.Packet] = []
        while len(got1) + len(got2) < len(frames) and time.monotonic() < deadline:
            got1 += receive(c1, 1, timeout=0.1)
            got2 += receive(c2, 1, timeout=0.1)
        assert_nothing_more(c1)
        assert_nothing_more(c2)
    d1, d2 = [p.data for p in got1], [p.data for p in got2]
    assert sorted(d1 + d2) == sorted(frames)
    assert got1 and got2
    flows1 = {f[26 + 3] for f in d1}                  # the flow's source address
    flows2 = {f[26 + 3] for f in d2}
    assert not flows1 & flows2
    # Each broker keeps the order of what it was given.
    assert d1 == [f for f in frames if f in set(d1)]


def test_kernel_statistics_add_up(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """A lossless client that holds every slab stops the broker; the kernel's
    small ring overflows. Kernel packets = sent, and what reached the slabs
    plus the kernel's drops = sent: every loss is counted at its stage."""
    b = serve_live(broker, ns, "-i", "va", "--block-size", "4096", "--blocks", "2",
                   "--slab-size", "4096", "--slabs", "2", "--allow-block", "c")
    frames = [frame(OTHER, udp4(1, 2, 100, a=i % 250)) for i in range(3000)]
    with pktipc.connect(b.name, "c", policy="block", credit=2) as c:
        assert ns.send("vb", frames, tmp_path) == len(frames)
        deadline = time.monotonic() + 10
        while live_stats(b.name).sources[0].kernel_packets < len(frames):
            assert time.monotonic() < deadline, live_stats(b.name)
            time.sleep(0.05)
        got, batch_drops = [], 0
        while (batch := c.next_batch(timeout=0.5)) is not None:
            with batch:
                got += [p._replace(data=bytes(p.data)) for p in batch]
                batch_drops += c._map.seg.batch_rec(batch.slab).kernel_drops  # type: ignore
        st = live_stats(b.name)
    src = st.sources[0]
    assert src.kernel_packets == len(frames)
    assert src.kernel_drops > 0 and src.kernel_freezes > 0
    assert src.packets + src.kernel_drops == len(frames)
    assert len(got) == src.packets == st.counters.packets
    assert batch_drops == src.kernel_drops      # each drop told with the next batch
    assert st.counters.broker_drops == 0 and st.counters.client_drops == 0
    # What arrived is what was sent, in order, with the drops as holes.
    it = iter(frames)
    assert all(any(p.data == f for f in it) for p in got)


@pytest.mark.parametrize("args, message", [
    (["-i", "nosuch0"], "nosuch0: no such interface"),
    (["-i", "down0"], "down0: the interface is down"),
    (["-i", "va", "tcp", "port", "eighty"], "bad filter 'tcp port eighty'"),
    (["-i", "va", "--filter", "vlan and", "--fanout"], "bad filter 'vlan and'"),
    (["-i", "va", "--hw-timestamps"], "va does not support hardware timestamps"),
    (["-i", "va", "--fanout", "x"], "--fanout 'x': not a group id"),
    (["-i", "va", "--fanout", "70000"], "--fanout ID must be between 0 and 65535"),
    (["-i", "va", "--fanout", "-2"], "--fanout '-2': not a group id"),
    (["-i", "va", "-i", "down0", "--fanout", "65535"], "--fanout ID must be between 0"),
    (["-i", "va", "-i", "down0", "--fanout"], "--fanout without an ID takes one interface"),
    (["-i", "va", "--block-size", "5000"], "--block-size must be a power of two"),
    (["-i", "va", "--block-size", "2M"], "--slab-size must be at least --block-size"),
    (["-i", "va", "-s", "0"], "-s SNAPLEN must be between"),
    (["-i", "va", "-i", "va"], "an interface is given twice"),
    (["-i", "va", "--user", "nosuchuser"], "--user nosuchuser: no such user"),
    (["-r", "x.pcap", "tcp"], "a capture filter applies to interfaces"),
])
def test_bad_live_options(ns: Netns, runtime_dir: Path, args: list[str], message: str) -> None:
    ns.veth("down0", "down1", up=False)
    r = subprocess.run(ns.cmd(*pktipc_cmd("serve", "--name", "bad", *args)),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list(runtime_dir.iterdir())          # refused before anything started


def test_capture_without_cap_net_raw(ns: Netns) -> None:
    r = subprocess.run(["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw",
                        *ns.cmd(*pktipc_cmd("serve", "--name", "nocap", "-i", "va"))],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert r.stderr.strip() == ("pktipc: error: capturing on va needs CAP_NET_RAW: run as "
                                "root, or give the capability to the broker"), r.stderr


def test_user_drops_privileges(ns: Netns, broker: Any, tmp_path: Path,
                               request: pytest.FixtureRequest,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    rdir = Path(tempfile.mkdtemp(prefix="pktipc-nobody-"))    # a path nobody can reach
    request.addfinalizer(lambda: rdir.rmdir())
    os.chown(rdir, 65534, -1)
    monkeypatch.setenv("PKTIPC_RUNTIME_DIR", str(rdir))
    b: BrokerProc = broker("-i", "va", "--user", "nobody", "--block-timeout", "2",
                           ready=False, netns=ns)
    b.socket = rdir / f"{b.name}.ctl"
    b.wait_ready()
    status = Path(f"/proc/{b.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    caps = next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
    assert set(uids) == {str(65534)} and int(caps, 16) == 0
    frames = [frame(OTHER, udp4(9, 9, 64, a=i)) for i in range(50)]
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", frames, tmp_path)
        assert [p.data for p in receive(c, 50)] == frames
    b.stop()
    assert b.proc.returncode == 0
    assert not list(rdir.iterdir())                 # the user could remove what it made


def test_status_shows_kernel_counters(ns: Netns, broker: Any, tmp_path: Path) -> None:
    b = serve_live(broker, ns, "-i", "va", "--fanout", "4242", "--fanout-mode", "lb")
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", [frame(OTHER, udp4(1, 2, 3))] * 7, tmp_path)
        assert len(receive(c, 7)) == 7
        r = run_pktipc("status", b.name)
        j = json.loads(run_pktipc("status", "--json", b.name).stdout)
    assert r.returncode == 0
    assert "source va  linktype 1  packets 7" in r.stdout
    assert "kernel: packets 7 drops 0 freezes 0  fanout 4242 (lb)" in r.stdout
    s = j[0]["sources"][0]
    assert (s["kind"], s["kernel_packets"], s["kernel_drops"], s["fanout_id"]) == (
        "interface", 7, 0, 4242)


def test_interface_going_down_and_up(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """The broker says so and keeps running; capture resumes when it is back."""
    b = serve_live(broker, ns, "-i", "va")
    with pktipc.connect(b.name, "c") as c:
        ns.send("vb", [frame(OTHER, udp4(1, 1, 1))], tmp_path)
        assert len(receive(c, 1)) == 1
        ns.ip("link", "set", "va", "down")
        time.sleep(0.5)
        ns.ip("link", "set", "va", "up")
        time.sleep(0.2)
        frames = [frame(OTHER, udp4(2, 2, 2, a=i)) for i in range(5)]
        ns.send("vb", frames, tmp_path)
        assert [p.data for p in receive(c, 5)] == frames
    b.proc.terminate()
    assert b.wait() == 0
    assert "pktipc: va: the interface went down" in b.stderr()


def test_live_flow_group(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """Live packets carry the flow hash (tags put back or not, both directions
    alike), and a flow group of two splits them by flow, each exactly once,
    beside a client of its own that gets them all."""
    frames = []
    for i in range(40):
        a, b = udp4(4000 + i, 53, 20, a=i), udp4(53, 4000 + i, 20, a=i)
        b = b[:12] + a[16:20] + a[12:16] + b[20:]      # the reply: addresses swapped
        tags = [(0x8100, 10)] if i % 3 == 0 else []
        frames += [frame(OTHER, a, *tags), frame(SRC, b, *tags, src=OTHER)]
    b = serve_live(broker, ns, "-i", "va")
    with pktipc.connect(b.name, "m1", group="ids") as m1, \
            pktipc.connect(b.name, "m2", group="ids") as m2, \
            pktipc.connect(b.name, "all") as everyone:
        ns.send("vb", frames, tmp_path)
        got_all, hashes = [], []
        while len(got_all) < len(frames):
            batch = everyone.next_batch(timeout=5)
            assert batch is not None
            with batch:
                got_all += [p._replace(data=bytes(p.data)) for p in batch]
                hashes += batch.descriptors["hash"].tolist()
        got1: list[pktipc.Packet] = []
        got2: list[pktipc.Packet] = []
        deadline = time.monotonic() + 10
        while len(got1) + len(got2) < len(frames) and time.monotonic() < deadline:
            got1 += receive(m1, 1, timeout=0.1)
            got2 += receive(m2, 1, timeout=0.1)
        assert_nothing_more(m1)
        assert_nothing_more(m2)
    assert [p.data for p in got_all] == frames
    assert sorted(p.seq for p in got1 + got2) == [p.seq for p in got_all]
    assert got1 and got2
    assert all(hashes) and hashes[0::2] == hashes[1::2]     # a reply hashes as its request
    assert len(set(hashes)) == 40
    flow_of = {p.seq: p.seq // 2 for p in got_all}        # request and reply: one flow
    assert not {flow_of[p.seq] for p in got1} & {flow_of[p.seq] for p in got2}


# --hw-timestamps on an interface that has them. veth has none, and no NIC
# is here: the kernel's answer to SIOCGHWTSTAMP and SIOCSHWTSTAMP for one
# interface is played by a library preloaded into the broker, which keeps
# that interface's configuration in a file. Everything else is real.
HWTS_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/net_tstamp.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    const char *path = getenv("PKTIPC_TEST_HWTS"), *name = getenv("PKTIPC_TEST_HWTS_IF");
    struct ifreq *ifr = arg;
    if (path && name && (req == SIOCGHWTSTAMP || req == SIOCSHWTSTAMP) &&
        !strcmp(ifr->ifr_name, name)) {
        struct hwtstamp_config *c = (void *)ifr->ifr_data;
        FILE *f = fopen(path, req == SIOCGHWTSTAMP ? "r" : "w");
        if (!f)
            return -1;
        if (req == SIOCGHWTSTAMP)
            fscanf(f, "%d %d", &c->tx_type, &c->rx_filter);
        else
            fprintf(f, "%d %d\n", c->tx_type, c->rx_filter);
        fclose(f);
        return 0;
    }
    int (*real)(int, unsigned long, ...) = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT,
                                                                                   "ioctl");
    return real(fd, req, arg);
}
"""


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_hw_timestamps_put_back_what_was_there(ns: Netns, broker: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """--hw-timestamps sets the interface to timestamp every packet; once
    the broker is gone (stopped, or killed), the interface has again the
    configuration it had (here a PTP daemon's: tx on, PTPv2 event packets)."""
    src, shim, state = tmp_path / "shim.c", tmp_path / "shim.so", tmp_path / "hwts"
    src.write_text(HWTS_SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(src), "-ldl"], check=True)
    state.write_text("1 12\n")      # HWTSTAMP_TX_ON, HWTSTAMP_FILTER_PTP_V2_EVENT
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("PKTIPC_TEST_HWTS", str(state))
    monkeypatch.setenv("PKTIPC_TEST_HWTS_IF", "va")
    b = serve_live(broker, ns, "-i", "va", "--hw-timestamps")
    assert state.read_text() == "0 1\n"         # HWTSTAMP_TX_OFF, HWTSTAMP_FILTER_ALL
    if how == "killed":
        b.proc.kill()
        b.wait()
        b.remove_leftovers()
    else:
        b.stop()
    deadline = time.monotonic() + 5
    while state.read_text() != "1 12\n":
        assert time.monotonic() < deadline, state.read_text()
        time.sleep(0.02)
