"""Sending through the broker (serve -i IFACE --tx): frames from Python and C
clients, replies of a host that exists only as a client, capture files
replayed, bad input, and clients that die or scribble, on veth pairs in
namespaces of the tests' own; what the peer receives is captured there by
libpcap (tcpdump) and compared byte for byte."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PCAPS, ROOT, BrokerProc, Netns, pktipc_cmd, run_pktipc
from pcapref import read_pcap
from pktipc._shm import ffi, lib
from txhelp import Peer, build_sender, eth, records

import pktipc

A = b"\x02\x00\x00\x00\x00\x0a"
B = b"\x02\x00\x00\x00\x00\x0b"
NOBODY = 65534


@pytest.fixture
def ns(netns: Netns) -> Netns:
    netns.veth("va", "vb")
    return netns


@pytest.fixture(scope="module")
def sender(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pktipc-sender-"))
    try:
        os.chmod(d, 0o755)
        yield build_sender(d)
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def serve_tx(broker: Any, ns: Netns, *args: str) -> BrokerProc:
    b: BrokerProc = broker("-i", "va", "--tx", "--block-timeout", "2", *args, netns=ns)
    return b


def frames_of(seed: int, n: int) -> list[bytes]:
    """Frames of every length a 1500-byte MTU lets out, untagged, 802.1Q
    (which may be 4 bytes longer) and QinQ, each numbered."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        tags = [(), ((0x8100, 0x2000 | i % 4095),), ((0x88A8, 7), (0x8100, i % 4095)),
                ()][kind]
        room = 1514 - 14 - 4 * len(tags) + (4 if kind == 1 else 0)
        size = [rnd.randint(2, 100), rnd.randint(2, room), rnd.randint(2, room), room][kind]
        payload = i.to_bytes(2, "big") + bytes(rnd.getrandbits(8) for _ in range(size - 2))
        out.append(eth(B, A, payload, *tags))
    return out


def tx_stats(name: str, client: str) -> dict[str, Any]:
    tx = pktipc.broker_stats(name).client(client).tx
    assert tx is not None
    return dataclasses.asdict(tx)


def test_python_and_c_frames_arrive_exact(ns: Netns, broker: Any, tmp_path: Path,
                                          sender: Path) -> None:
    """Frames of both clients reach the peer as sent, in order, tags kept:
    the Python client's (send(), then the tx() buffers), then the C
    client's; each counted as sent, and seen by the broker's own capture."""
    b = serve_tx(broker, ns)
    py1, py2, cf = frames_of(1, 120), frames_of(2, 80), frames_of(3, 200)
    peer = Peer(ns, "vb", tmp_path / "peer.pcap")
    with pktipc.connect(b.name, "py") as c:
        assert c.send(py1, iface="va") == len(py1)
        with c.tx() as tx:
            for f in py2:
                buf = tx.allocate(min(len(f) + 10, 1518), iface=0)
                buf[: len(f)] = f
                tx.send(buf, len(f))
        assert (tx.sent, tx.refused) == (200, 0)
        assert tx_stats(b.name, "py") == {"frames": 1024, "submitted": 200, "sent": 200,
                                          "refused": {}, "in_ring": 0, "waiting": 0}
    (tmp_path / "c.frames").write_bytes(records(cf))
    out = subprocess.run([str(sender), b.name, "csend", str(tmp_path / "c.frames"), "0", "64"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "flush 0 submitted 200 sent 200 refused 0"
    got = peer.frames(400)
    assert got == py1 + py2 + cf
    tx = pktipc.broker_stats(b.name).sources[0].tx
    assert tx is not None and tx.sent == 400 and tx.kernel_errors == {}


def test_a_full_area_waits_or_says_busy(ns: Netns, broker: Any, tmp_path: Path,
                                        sender: Path) -> None:
    """Many more frames than a TX area holds: a client that waits gets them
    all out, in order; with the broker stopped, one that does not wait is
    told busy once every slot waits for it (Python: Busy; C:
    -PKTIPC_EAGAIN), and nothing is lost once the broker goes on."""
    b = serve_tx(broker, ns)
    many, py, cf = frames_of(7, 600), frames_of(8, 40), frames_of(9, 1100)
    peer = Peer(ns, "vb", tmp_path / "peer.pcap")
    with pktipc.connect(b.name, "waits") as c:
        with c.tx(frames=16, batch=4) as tx:
            for f in many:
                buf = tx.allocate(len(f))
                buf[:] = f
                tx.send(buf)
        assert (tx.sent, tx.refused) == (600, 0)
    (tmp_path / "c.frames").write_bytes(records(cf))
    with pktipc.connect(b.name, "busy") as c:
        tx = c.tx(wait=False, frames=16)
        cs = subprocess.Popen([str(sender), b.name, "cbusy", str(tmp_path / "c.frames"), "0",
                               "0", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
        assert cs.stdin is not None and cs.stdout is not None
        try:
            assert cs.stdout.readline() == "open\n"
            os.kill(b.pid, signal.SIGSTOP)
            try:
                for f in py[:16]:
                    buf = tx.allocate(len(f))
                    buf[:] = f
                    tx.send(buf)
                with pytest.raises(pktipc.Busy, match="all 16 slots of the TX area wait"):
                    tx.allocate(60)
                cs.stdin.write("go\n")
                cs.stdin.flush()
                assert cs.stdout.readline() == "busy after 1024\n"
            finally:
                os.kill(b.pid, signal.SIGCONT)
            cs.stdin.write("go\n")
            cs.stdin.flush()
            assert cs.stdout.readline() == "flush 0 submitted 1100 sent 1100 refused 0\n"
        finally:
            cs.stdin.close()
            assert cs.wait(timeout=60) == 0
        tx.flush()
        for f in py[16:]:
            buf = tx.allocate(len(f))
            buf[:] = f
            tx.send(buf)
            tx.flush()
        assert (tx.sent, tx.refused) == (40, 0)
    got = peer.frames(600 + 40 + 1100)
    assert got[:600] == many
    # The two clients' frames interleave; each client's keep their order.
    rest = got[600:]
    assert [f for f in rest if f in set(py)] == py
    assert [f for f in rest if f in set(cf)] == cf and len(rest) == 1140


def test_a_host_that_is_only_a_client_answers_ping(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """ping -c 20 from the peer to an address nobody has but pktipc-pong
    and examples/pong.py: 20 replies each, ARP resolved through them,
    every checksum good by tshark's reckoning."""
    ns.ip("addr", "add", "10.77.0.1/24", "dev", "vb")
    b = serve_tx(broker, ns, "--block-timeout", "1")
    pongs = {"c": [str(ROOT / "clients/c/build/bin/pktipc-pong"), "-n", "pong-c"],
             "python": [sys.executable, str(ROOT / "examples/pong.py"), "--name", "pong-py"]}
    subprocess.run(["make", "-s", "-C", str(ROOT / "clients/c"), "examples"], check=True,
                   capture_output=True)
    for kind, cmd in pongs.items():
        addr = f"10.77.0.{2 if kind == 'c' else 3}"
        p = subprocess.Popen([*cmd, b.name, addr], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while cmd[-1] not in [c.name for c in pktipc.broker_stats(b.name).clients]:
                assert p.poll() is None and time.monotonic() < deadline, p.stderr
                time.sleep(0.05)
            cap = tmp_path / f"{kind}.pcap"
            peer = Peer(ns, "vb", cap)
            out = ns.exec("ping", "-c", "20", "-i", "0.05", "-W", "10", addr)
            peer.stop()
        finally:
            os.kill(p.pid, signal.SIGTERM)
            said, err = p.communicate(timeout=30)
        assert "20 packets transmitted, 20 received" in out, out
        assert p.returncode == 0, err
        assert "20 echo requests" in said, said
        fields = subprocess.run(
            ["tshark", "-r", str(cap), "-o", "ip.check_checksum:TRUE", "-T", "fields",
             "-e", "ip.checksum.status", "-e", "icmp.checksum.status", "-e", "icmp.type",
             "-e", "arp.opcode"], capture_output=True, text=True, check=True).stdout
        rows = sorted(line.split("\t") for line in fields.splitlines())
        # Checksum status 1: good (0 bad, 2 not checked); ARP opcode 2: a reply.
        assert rows == [["", "", "", "2"]] + [["1", "1", "0", ""]] * 20, rows
        ns.exec("ip", "neigh", "flush", "dev", "vb")


def test_replay_of_a_shared_capture(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """pktipc replay: the peer captures exactly the file's frames, at top
    speed and paced by a rate; a capture of another link type is refused
    with one line."""
    b = serve_tx(broker, ns)
    for name, pace in (("DECnet_Phone.pcap", ["--topspeed"]),
                       ("bgp-4byte-asn.pcap", ["--pps", "2000"])):
        ref = [p.data for p in read_pcap(str(PCAPS / name)).packets]
        peer = Peer(ns, "vb", tmp_path / f"{name}.peer")
        r = run_pktipc("replay", "--server", b.name, "-i", "va", "-r", str(PCAPS / name), *pace)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"sent {len(ref)} frames ({sum(map(len, ref))} bytes) out "
                                   "of va in "), r.stdout
        assert peer.frames(len(ref)) == ref
    r = run_pktipc("replay", "--server", b.name, "-i", "va", "-r",
                   str(PCAPS / "resp_1_benchmark.pcap"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "link type 113, the interface's is 1" in r.stderr
    r = run_pktipc("replay", "--server", b.name, "-i", "vz", "-r", str(PCAPS / "dns_udp.pcap"))
    assert r.returncode == 1 and "has no interface 'vz' (va)" in r.stderr, r.stderr


def test_bad_frames_are_refused_and_counted(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """The client says what is wrong before anything is sent; what gets past
    it (written straight into the area) is refused by the broker, counted
    by reason and told to the client; the good frames around it go out."""
    ns.veth("vc", "vd")
    b: BrokerProc = broker("-i", "va", "-i", "vc", "--tx", "va", "--block-timeout", "2",
                           netns=ns)
    good = frames_of(4, 6)
    peer = Peer(ns, "vb", tmp_path / "peer.pcap")
    with pktipc.connect(b.name, "bad") as c:
        tx = c.tx()
        assert tx.max_len == (1518, 0)
        for length, iface, what in ((0, 0, "1 to 1518 bytes, not 0"),
                                    (1519, 0, "1 to 1518 bytes, not 1519"),
                                    (60, "vc", "does not send on vc"),
                                    (60, 2, "interface 2: the broker has 2"),
                                    (60, "eth9", "no interface 'eth9'")):
            with pytest.raises(ValueError, match=what):
                tx.allocate(length, iface)
        # Past the client's checks: the descriptors as a client of its own
        # making might write them.
        bad = [(1516, 0), (0, 0), (60, 9), (60, 1), (10, 0)]     # good[0] is not tagged
        for i, f in enumerate(good):
            buf = tx.allocate(len(f))
            buf[:] = f
            if i < len(bad):
                d = tx._area.desc[tx._next % tx._area.frames]
                tx.send(buf)
                d.len, d.iface = bad[i]
            else:
                tx.send(buf)
            buf = tx.allocate(len(f))
            buf[:] = f
            tx.send(buf)
        with pytest.raises(pktipc.Refused, match="refused 5 frame") as e:
            tx.flush()
        assert e.value.code == "frame-refused"
        assert "frame 0 of the batch has 1516 bytes; va sends at most 1518 (on Ethernet, 4 " \
               "fewer unless 802.1Q-tagged)" in e.value.text
        assert (tx.sent, tx.refused) == (7, 5)
        assert tx_stats(b.name, "bad")["refused"] == {
            "empty": 1, "too-long": 1, "no-such-iface": 1, "not-sending": 1, "too-short": 1}
        tx.flush()      # reported once
        status = run_pktipc("status", b.name)
        assert status.returncode == 0, status.stderr
        assert ("      sends: submitted 12  sent 7  refused 5 (empty 1 no-such-iface 1 "
                "not-sending 1 too-long 1 too-short 1)  in ring 0  waiting 0") in status.stdout
        assert "    sends: frames 7  pending 0  longest 1518  kernel errors 0" in status.stdout
    assert peer.frames(7) == [good[0], good[1], good[2], good[3], good[4], *good[5:] * 2]


def test_who_may_not_send_is_refused(ns: Netns, broker: Any, tmp_path: Path, sender: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Sending is for the broker's user and root, and the users --allow-tx
    names, by the uid the kernel gives: another user's client is refused
    with a clear message and counted; named, it sends."""
    top = Path(tempfile.mkdtemp(prefix="pktipc-txrt-"))
    os.chmod(top, 0o711)
    run = top / "run"
    monkeypatch.setenv("PKTIPC_RUNTIME_DIR", str(run))
    frames = frames_of(5, 10)
    (top / "f").write_bytes(records(frames))
    os.chmod(top / "f", 0o644)
    started = []
    try:
        for allow in ([], ["--allow-tx", "nobody"]):
            name = f"txperm{os.getpid()}-{len(started)}"
            b = BrokerProc(name, ["-i", "va", "--tx", "--allow-group", "nogroup", *allow], run,
                           ns)
            started.append(b)
            b.wait_ready()
            peer = Peer(ns, "vb", tmp_path / f"peer{len(started)}.pcap")
            out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                  "--clear-groups", str(sender), name, "nobody", str(top / "f"),
                                  "0"], capture_output=True, text=True, timeout=60)
            if not allow:
                assert out.returncode == 3, out.stdout + out.stderr
                assert out.stdout.startswith(f"alloc -{5}: broker "), out.stdout
                assert "sending is for the broker's own user, root and the users serve " \
                       f"--allow-tx names; this client's is uid {NOBODY}" in out.stdout
                assert pktipc.broker_stats(name).tx_refused == {"tx-refused": 1}
                assert peer.stop() == []
            else:
                assert out.returncode == 0, out.stdout + out.stderr
                assert peer.frames(10) == frames
            b.stop()
    finally:
        for b in started:
            b.stop()
        for p in (*run.glob("*"), top / "f"):
            p.unlink()
        if run.exists():
            run.rmdir()
        top.rmdir()


def test_brokers_that_do_not_send_say_so(ns: Netns, broker: Any) -> None:
    """A broker of files has nothing to send on; one without --tx refuses
    TX_OPEN; --tx names an interface it captures on."""
    r = run_pktipc("serve", "-r", str(PCAPS / "dns_udp.pcap"), "--tx")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "--tx sends on the interfaces the broker captures on (-i)" in r.stderr
    plain = broker("-i", "va", netns=ns)
    with pktipc.connect(plain.name, "c") as c, pytest.raises(pktipc.Refused) as e:
        c.tx()
    assert e.value.code == "tx-refused" and "does not send" in e.value.text
    r = subprocess.run(ns.cmd(*pktipc_cmd("serve", "-i", "va", "--tx", "vb")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--tx vb: not an interface this broker captures on (va)" in r.stderr


DIES = r"""
import os, signal, sys
import pktipc
c = pktipc.connect(sys.argv[1], "dies")
tx = c.tx(batch=100000)
for i in range(400):
    buf = tx.allocate(60)
    buf[:] = bytes([0xDD]) * 60
    tx.send(buf)
tx._submit()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_client_that_dies_or_shrinks_its_area_hurts_only_itself(
        ns: Netns, broker: Any, tmp_path: Path) -> None:
    """A client killed right after it submits a batch (which goes out whole,
    or not at all if the broker saw it die first), and one that cuts its
    TX area short under the broker's copy (SIGBUS in the broker, caught):
    the broker goes on, drops them, and another client's frames go out
    whole and in order."""
    b = serve_tx(broker, ns)
    ok = frames_of(6, 100)
    peer = Peer(ns, "vb", tmp_path / "peer.pcap")
    r = subprocess.run([sys.executable, "-c", DIES, b.name], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    with pktipc.connect(b.name, "shrinks") as s:
        tx = s.tx()
        for _ in range(50):
            buf = tx.allocate(1000)
            buf[:] = b"\xee" * 1000
            tx.send(buf)
        shrink_own_area(tx)
        with pytest.raises(pktipc.BrokerGone, match="its TX area shrank"):
            tx.flush()
    with pktipc.connect(b.name, "ok") as c:
        assert c.send(ok) == 100
    got = peer.frames_until(lambda fs: fs[-100:] == ok)
    assert got[-100:] == ok
    assert got[:-100] in ([], [b"\xdd" * 60] * 400)           # what the dead one got out
    st = pktipc.broker_stats(b.name)
    assert [c.name for c in st.clients] == []
    assert st.counters.evictions >= 2


def shrink_own_area(tx: pktipc.Tx) -> None:
    """Cuts the TX area (its name is gone once the broker maps it) to its
    header page, through the descriptor this process's mapping keeps."""
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/dev/shm{tx._area.name}"):
            os.ftruncate(fd, 4096)
            return
    raise AssertionError("the TX area's file was not found")


def test_a_scribbler_sends_only_its_own_bytes(ns: Netns, broker: Any, tmp_path: Path) -> None:
    """A client that writes garbage over its whole TX area (header and
    descriptors too) and submits it: whatever goes out is its own bytes;
    another client's frames, sent meanwhile, go out whole and in order; a
    capturing client receives from the segment exactly what went out."""
    b = serve_tx(broker, ns, "--allow-block", "rx")
    ok = frames_of(7, 200)
    rnd = random.Random(8)
    peer = Peer(ns, "vb", tmp_path / "peer.pcap")
    with pktipc.connect(b.name, "scribbler") as s, pktipc.connect(b.name, "good") as g, \
            pktipc.connect(b.name, "rx", policy="block") as rx:
        stx = s.tx(frames=256)
        area = stx._area
        for k in range(4):
            view = area.view
            view[:] = b"\xa5" * len(view)
            for i in range(area.frames):           # descriptors of every kind
                d = area.desc[i]
                d.len, d.iface = rnd.choice((0, 13, 14, 60, 1514, 1519, 3000, 70000)), \
                    rnd.choice((0, 0, 0, 1, 500))
            view[0:64] = bytes(rnd.getrandbits(8) for _ in range(64))   # the header too
            stx._next += area.frames
            stx._submit()
            g.send(ok[50 * k : 50 * (k + 1)])
            try:
                stx.flush()
            except pktipc.Refused:
                pass
        scribbled = stx.sent
        assert scribbled + stx.refused == 4 * area.frames and scribbled > 0
        got = peer.frames(200 + scribbled)
        assert [f for f in got if f[:1] != b"\xa5"] == ok
        assert all(set(f) == {0xA5} for f in got if f[:1] == b"\xa5")
        assert len(got) == 200 + scribbled
        seen: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(seen) < len(got) and time.monotonic() < deadline:
            batch = rx.next_batch(timeout=0.5)
            if batch is not None:
                with batch:
                    seen += [bytes(p.data) for p in batch]
        assert seen == got


def test_tx_layout_is_pinned() -> None:
    assert ffi.sizeof("struct pktipc_tx_header") == lib.PKTIPC_TX_HEADER_SIZE == 64
    assert ffi.sizeof("struct pktipc_tx_desc") == lib.PKTIPC_TX_DESC_SIZE == 16
    g = ffi.new("struct pktipc_tx_geometry *")
    assert lib.pktipc_tx_geometry(1024, 2048, g) == 0
    assert (g.desc_off, g.frames_off, g.total_size) == (4096, 4096 + 16384,
                                                        4096 + 16384 + 1024 * 2048)
    for frames, size in ((0, 2048), (1000, 2048), (1 << 17, 2048), (1024, 100), (1024, 1 << 17)):
        assert lib.pktipc_tx_geometry(frames, size, g) == -1
