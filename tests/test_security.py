"""A broker trusts nothing it did not make: its runtime directory, /dev/shm,
its clients' word and their pace. The hostile side runs as `nobody`
(setpriv), in the test's own directories and segments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PCAPS, ROOT, BrokerProc, pktipc_cmd, run_pktipc

import pktipc
from pktipc import _protocol as proto
from pktipc._layout import LAYOUT_VERSION, Geometry, Iface, Segment

DNS = PCAPS / "dns_udp.pcap"
NOBODY = 65534


def as_nobody(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *cmd], capture_output=True, text=True,
                          timeout=30, **kw)  # type: ignore[call-overload]


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory of the test's own, reachable by other users (as /tmp is),
    removed with everything in it afterwards."""
    d = Path(tempfile.mkdtemp(prefix="pktipc-sec-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def victim(top: Path) -> Path:
    """A file of root's that no broker may touch."""
    f = top / "victim"
    f.write_text("root's own\n")
    os.chmod(f, 0o600)
    return f


def serve(run: Path, *args: str, name: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PKTIPC_RUNTIME_DIR=str(run))
    return run_pktipc("serve", "--name", name or f"sec{os.getpid()}", "-r", str(DNS),
                      "--wait-clients", "0", *args, env=env, timeout=30)


# --- 1. the runtime directory ---------------------------------------------------------


def test_a_runtime_directory_of_another_user_is_refused(top: Path, victim: Path) -> None:
    """`nobody` made the directory first (as it could /tmp/pktipc-0) and
    planted the lock file as a link to root's file: the root broker refuses
    the directory and touches nothing in it."""
    run = top / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    name = f"sec{os.getpid()}"
    r = as_nobody("ln", "-s", str(victim), str(run / f"{name}.lock"))
    assert r.returncode == 0, r.stderr
    r = serve(run, name=name)
    assert r.returncode == 1
    assert r.stderr == (f"pktipc: error: runtime directory {run} belongs to user nobody, not "
                        "to root: remove it, or set PKTIPC_RUNTIME_DIR to a directory of your "
                        "own\n")
    assert victim.read_text() == "root's own\n"
    assert sorted(p.name for p in run.iterdir()) == [f"{name}.lock"]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_runtime_directory_others_can_write_is_refused(top: Path, mode: int) -> None:
    run = top / "run"
    run.mkdir()
    os.chmod(run, mode)
    r = serve(run)
    assert r.returncode == 1
    assert r.stderr == (f"pktipc: error: runtime directory {run} can be written by other "
                        f"users (mode {mode:04o}): chmod go-w it, or set PKTIPC_RUNTIME_DIR "
                        "to a directory of your own\n")
    assert list(run.iterdir()) == []


def test_a_path_another_user_controls_is_refused(top: Path) -> None:
    """Above the runtime directory, a directory `nobody` owns could swap it
    for another one at any time."""
    theirs = top / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    r = serve(theirs / "run")
    assert r.returncode == 1
    assert r.stderr == (f"pktipc: error: {theirs}, above the runtime directory, can be changed "
                        "by user nobody: use a runtime directory whose path only root or you "
                        "can change (PKTIPC_RUNTIME_DIR)\n")
    assert not (theirs / "run").exists()


def test_a_runtime_directory_that_is_a_link_is_refused(top: Path) -> None:
    real = top / "real"
    real.mkdir(mode=0o700)
    (top / "run").symlink_to(real)
    r = serve(top / "run")
    assert r.returncode == 1
    assert r.stderr.startswith(f"pktipc: error: runtime directory {top / 'run'}: a symbolic "
                               "link; remove it")
    assert list(real.iterdir()) == []


def test_a_lock_file_that_is_a_link_is_not_followed(top: Path, victim: Path) -> None:
    run = top / "run"
    run.mkdir(mode=0o700)
    name = f"sec{os.getpid()}"
    (run / f"{name}.lock").symlink_to(victim)
    r = serve(run, name=name)
    assert r.returncode == 1
    assert r.stderr.startswith(f"pktipc: error: lock file {name}.lock: ")
    assert "symbolic link" in r.stderr and r.stderr.count("\n") == 1
    assert victim.read_text() == "root's own\n"


def test_no_world_writable_fallback() -> None:
    """Without XDG_RUNTIME_DIR a user has no runtime directory: never
    /tmp/pktipc-<uid>, which anyone could have made first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PKTIPC_RUNTIME_DIR", "XDG_RUNTIME_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    r = as_nobody(*pktipc_cmd("status"), env=env, cwd="/")
    assert r.returncode == 1
    assert r.stderr == ("pktipc: error: no runtime directory: XDG_RUNTIME_DIR is not set; "
                        "set PKTIPC_RUNTIME_DIR to a directory of your own\n")


def _bind_as_nobody(path: Path) -> subprocess.Popen[str]:
    """A ZeroMQ ROUTER of `nobody`'s at `path`, posing as a broker."""
    script = ("import sys, time, zmq\n"
              "s = zmq.Context().socket(zmq.ROUTER)\n"
              f"s.bind('ipc://{path}')\n"
              "print('up', flush=True)\n"
              "time.sleep(60)\n")
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", sys.executable, "-c", script],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "up\n"
    return p


def test_a_client_refuses_a_socket_of_another_user(top: Path, runtime_dir: Path) -> None:
    """A socket in the runtime directory that is not its owner's (or
    root's): the client refuses it before saying anything to it."""
    theirs = top / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    impostor = _bind_as_nobody(theirs / "s.ctl")
    try:
        (theirs / "s.ctl").rename(runtime_dir / "tap.ctl")    # still nobody's
        with pytest.raises(pktipc.UntrustedBroker) as e:
            pktipc.connect("tap", "c", timeout=2)
        assert str(e.value) == (f"{runtime_dir / 'tap.ctl'} belongs to user nobody, its "
                                "directory to user root: another user may be posing as "
                                "broker 'tap'")
        r = subprocess.run([str(ROOT / "clients/c/build/bin/pktipc-pcap"), "tap"],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PKTIPC_RUNTIME_DIR=str(runtime_dir)))
        assert r.returncode == 1 and r.stderr == f"pktipc-pcap: {e.value}\n"
    finally:
        impostor.kill()
        impostor.wait()
        (runtime_dir / "tap.ctl").unlink()


def _fake_segment(name: str) -> Path:
    """A valid segment of one empty source, made by `nobody` in /dev/shm."""
    g = Geometry(4096, 2, 1)
    buf = bytearray(g.total_size)
    Segment(buf, writable=True).init(g, name="tap", epoch=7,
                                     ifaces=[Iface("eth0", 1, 65535)])
    path = Path("/dev/shm") / name
    r = as_nobody("sh", "-c", f"cat > {path}", input=buf.decode("latin-1"),
                  encoding="latin-1")
    assert r.returncode == 0, r.stderr
    assert path.stat().st_uid == NOBODY
    return path


def test_a_client_refuses_a_segment_of_another_user(runtime_dir: Path) -> None:
    """The broker's socket is root's, but the segment its WELCOME names is
    `nobody`'s: the client refuses to read it."""
    import zmq

    seg = _fake_segment(f"pktipc.tap.{os.getpid():016x}")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{runtime_dir}/tap.ctl")
    welcome = proto.encode("welcome", shm="/" + seg.name, epoch=7, layout=LAYOUT_VERSION, slot=0,
                           credit=1, policy="block", heartbeat_ms=1000, liveness_ms=30000,
                           group="c", balance="flow")

    done = threading.Event()

    def answer() -> None:               # every HELLO, until the test is done
        while not done.is_set():
            if router.poll(100):
                peer, frame = router.recv_multipart()
                if proto.decode(frame)[0] == "hello":
                    router.send_multipart([peer, welcome])
    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(pktipc.UntrustedBroker) as e:
            pktipc.connect("tap", "c", timeout=5)
        assert str(e.value) == (f"segment /{seg.name} belongs to user nobody, broker 'tap' "
                                "to user root: another user may be posing as the broker")
        r = subprocess.run([str(ROOT / "clients/c/build/bin/pktipc-pcap"), "-n", "c", "tap"],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PKTIPC_RUNTIME_DIR=str(runtime_dir)))
        assert r.returncode == 1 and r.stderr == f"pktipc-pcap: {e.value}\n"
    finally:
        done.set()
        t.join()
        router.close(linger=0)
        ctx.term()
        seg.unlink()


# --- 2. the stale-segment sweep -------------------------------------------------------


def test_the_sweep_skips_what_it_did_not_make(runtime_dir: Path) -> None:
    """A FIFO and a file of `nobody`'s named as a broker's segments: the
    root broker neither blocks on them nor removes them, and says so; its
    own segment left by a dead broker goes."""
    name = f"t{os.getpid()}-sweep"
    fifo = Path("/dev/shm") / f"pktipc.{name}.{1:016x}"
    theirs = Path("/dev/shm") / f"pktipc.{name}.{2:016x}"
    ours = Path("/dev/shm") / f"pktipc.{name}.{3:016x}"
    assert as_nobody("mkfifo", str(fifo)).returncode == 0
    assert as_nobody("sh", "-c", f"head -c 4096 /dev/zero > {theirs}").returncode == 0
    ours.write_bytes(bytes(4096))               # pid 0 in its header: no broker
    try:
        b = BrokerProc(name, ["-r", str(DNS), "--wait-clients", "0", "--linger"], runtime_dir)
        b.wait_ready(timeout=10)
        b.stop()
        err = b.stderr()
        assert f"pktipc: skipped {fifo}: not a segment of user root (it belongs to user " \
            "nobody); remove it by hand if it is stale" in err
        assert f"pktipc: skipped {theirs}: not a segment of user root" in err
        assert f"pktipc: removed {ours}, left by a broker that is gone (pid 0)" in err
        assert fifo.exists() and theirs.exists() and not ours.exists()
    finally:
        for p in (fifo, theirs, ours):
            p.unlink(missing_ok=True)


def test_a_user_broker_skips_root_s_segments(top: Path) -> None:
    """A broker of `nobody`'s does not die on a root segment of its name."""
    run = top / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    name = f"t{os.getpid()}-user"
    root_seg = Path("/dev/shm") / f"pktipc.{name}.{1:016x}"
    root_seg.write_bytes(bytes(4096))
    os.chmod(root_seg, 0o600)
    env = dict(os.environ, PKTIPC_RUNTIME_DIR=str(run), PYTHONPATH=str(ROOT))
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", *pktipc_cmd("serve", "--name", name, "-r", str(DNS),
                                                        "--wait-clients", "0", "--linger")],
                         env=env, cwd="/", stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (run / f"{name}.ctl").exists():
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        p.terminate()
        assert p.wait(timeout=10) == 0
        err = p.stderr.read() if p.stderr else ""
        root_seg.unlink()
    assert f"pktipc: skipped {root_seg}: " in err
    assert not any(Path("/dev/shm").glob(f"pktipc.{name}.*"))


def test_an_aborted_broker_s_segment_is_removed_by_the_next(broker, runtime_dir: Path) -> None:
    """A broker killed by SIGABRT (as a libzmq assertion would) leaves its
    segment; the next broker of the name removes it and says so."""
    b = broker("-r", str(DNS), "--wait-clients", "1")
    left = list(Path("/dev/shm").glob(f"pktipc.{b.name}.*"))
    assert len(left) == 1
    b.proc.send_signal(6)
    b.wait()
    assert left[0].exists()
    (runtime_dir / f"{b.name}.ctl").unlink()
    b2 = BrokerProc(b.name, ["-r", str(DNS), "--wait-clients", "0", "--linger"], runtime_dir)
    b2.wait_ready()
    b2.stop()
    assert b2.proc.returncode == 0
    err = b2.stderr()
    assert f"pktipc: removed {left[0]}, left by a broker that is gone (pid {b.pid})" in err
    assert not left[0].exists()
    assert not (runtime_dir / f"{b.name}.lock").exists()


# --- 3. a stalled drop client costs only itself ------------------------------------------


@pytest.fixture
def ns(netns: Any) -> Any:
    netns.veth("va", "vb")
    return netns


@pytest.mark.parametrize("stalled", [1, 4, 32])
def test_stalled_drop_clients_cost_only_themselves(ns: Any, broker: Any, tmp_path: Path,
                                                   stalled: int) -> None:
    """Clients that ask for all the credit they can and never read: another
    `drop` client, which keeps up with the traffic, still gets every frame
    sent, with no gap; each stalled one holds at most its part of the ring
    (WELCOME says how much) and is skipped once the ring is short."""
    from test_live import OTHER, frame, serve_live, udp4

    b = serve_live(broker, ns, "-i", "va", "--max-clients", "40", "--slabs", "161",
                   "--slab-size", "16k", "--block-size", "16k", "--blocks", "256")
    idle = [pktipc.connect(b.name, f"stalled{i}", credit=4096) for i in range(stalled)]
    try:
        assert {c.welcome.credit for c in idle} == {4}          # (161 - 1) / 40
        with pktipc.connect(b.name, "good") as good:
            got = [0]
            done = threading.Event()

            def read() -> None:
                while not done.is_set():
                    batch = good.next_batch(timeout=0.1)
                    if batch is not None:
                        got[0] += len(batch)
                        batch.release()
            reader = threading.Thread(target=read)
            reader.start()
            try:
                sent = 0
                for k in range(10):         # 20,000 frames in ten bursts, 400 batches or so
                    sent += ns.send("vb", [frame(OTHER, udp4(1, 2, 100, a=k * 20 + i % 20))
                                           for i in range(2000)], tmp_path)
                    time.sleep(0.05)
                deadline = time.monotonic() + 20
                while got[0] < sent and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                done.set()
                reader.join()
            assert (got[0], good.gaps) == (sent, [])
            st = pktipc.broker_stats(b.name)
        per = {c.name: c for c in st.clients}
        assert per["good"].drops == 0 and st.sources[0].kernel_drops == 0
        assert all(per[c.name].held == 4 for c in idle)
        assert all(per[c.name].drops > 0 for c in idle)
    finally:
        for c in idle:
            c.close()


# --- 4. block is the operator's to give; an evicted client waits -----------------------------


def test_block_on_a_live_broker_is_the_operators_choice(ns: Any, broker: Any) -> None:
    from test_live import serve_live

    b = serve_live(broker, ns, "-i", "va", "--allow-block", "rec,ids-*")
    with pytest.raises(pktipc.Refused) as e:
        pktipc.connect(b.name, "evil", policy="block")
    assert e.value.code == "block-refused"
    assert str(e.value).endswith("block would let one client stall the capture for every "
                                 "client; the broker's operator allows it per client (serve "
                                 "--allow-block)")
    with pktipc.connect(b.name, "rec", policy="block") as rec, \
            pktipc.connect(b.name, "ids-1", policy="block") as ids, \
            pktipc.connect(b.name, "evil") as evil:
        assert (rec.welcome.policy, ids.welcome.policy, evil.welcome.policy) == \
            ("block", "block", "drop")
        assert rec.stats().refused == {"block-refused": 1}
    r = run_pktipc("serve", "--name", "x", "-i", "lo", "--allow-block", "user:no-such-user-x")
    assert (r.returncode, r.stderr) == (1, "pktipc: error: --allow-block user:no-such-user-x: "
                                           "no such user\n")


def test_an_evicted_client_is_refused_for_a_while(broker: Any) -> None:
    """A client evicted for holding a batch past its lease, back at once,
    is refused until its back-off is over, and that is counted."""
    b = broker("-r", str(PCAPS / "DECnet_Phone.pcap"), "--loop", "0", "--slab-size", "4k",
               "--lease", "0.3", "--evict-backoff", "2")
    with pktipc.connect(b.name, "greedy", credit=1, reconnect=0) as c:
        held = c.next_batch(timeout=5)
        assert held is not None
        with pytest.raises(pktipc.BrokerGone, match="evicted 'greedy'"):
            while True:
                c.next_batch(timeout=0.1)
    with pytest.raises(pktipc.Refused) as e:
        pktipc.connect(b.name, "greedy")
    assert e.value.code == "backoff"
    time.sleep(2)
    with pktipc.connect(b.name, "greedy") as again:
        assert again.stats().refused == {"backoff": 1}


# --- 5. groups and kept places are their owners' -------------------------------------------


CLIENT_AS_NOBODY = """
import sys, pktipc
name, group = sys.argv[1], sys.argv[2] or None
try:
    with pktipc.connect(sys.argv[3], name, group=group, timeout=5) as c:
        print("welcome", c.group)
except pktipc.Refused as e:
    print(e.code)
"""


def test_groups_and_kept_places_are_their_owners(top: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`nobody`, admitted by --allow-group, may join neither the group a
    client has of its own nor the place the broker keeps for a client of
    root's that died; root's client comes back to it."""
    run = top / "run"
    name = f"sec{os.getpid()}g"
    monkeypatch.setenv("PKTIPC_RUNTIME_DIR", str(run))
    env = dict(os.environ)
    b = BrokerProc(name, ["-r", str(DNS), "--wait-clients", "2", "--grace", "30",
                          "--allow-group", "nogroup"], run)
    nobody_env = dict(env, PYTHONPATH=str(ROOT))

    def nobody(client: str, group: str = "") -> str:
        r = as_nobody(sys.executable, "-c", CLIENT_AS_NOBODY, client, group, name,
                      env=nobody_env, cwd="/")
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()
    holder: subprocess.Popen[str] | None = None
    try:
        b.wait_ready()
        holder = subprocess.Popen([sys.executable, "-c", f"""
import pktipc, time
c = pktipc.connect({name!r}, "rec")
print("up", flush=True)
time.sleep(60)
"""], env=env, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        assert nobody("evil", "rec") == "group-private"
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 10
        while [c.attached for c in pktipc.broker_stats(name).clients] != [False]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert nobody("rec") == "name-taken"
        with pktipc.connect(name, "rec", timeout=5) as back:    # its owner resumes
            assert back.group == "rec"
            assert back.stats().refused == {"group-private": 1, "name-taken": 1}
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        b.stop()


# --- 8. who a client is, the kernel says ----------------------------------------------------


def test_a_claimed_pid_is_not_believed(broker: Any) -> None:
    """A client that says it is another process: the broker watches the
    process that is really at the other end of the socket."""
    import zmq

    b = broker("-r", str(DNS), "--wait-clients", "2", "--linger")
    other = subprocess.Popen(["sleep", "60"])
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.connect(f"ipc://{b.socket}")
        s.send(proto.encode("hello", name="liar", group=None, policy=None, credit=None,
                            pid=other.pid, balance=None))
        assert s.poll(5000)
        assert proto.decode(s.recv(), proto.MAX_BROKER_FRAME)[0] == "welcome"
        other.kill()
        other.wait()
        time.sleep(0.5)
        [c] = pktipc.broker_stats(b.name).clients
        assert (c.name, c.attached, c.pid) == ("liar", True, os.getpid())
    finally:
        other.kill()
        other.wait()
        s.close(linger=0)
        ctx.term()


# --- 6. the control plane: budgets, bounded queues, the data path first -----------------------

FLOOD = """
import sys, time, zmq
from pktipc import _protocol as proto
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
kind = sys.argv[2]
if kind == "heartbeat":
    s.send(proto.encode("hello", name="flooder", group=None, policy=None, credit=None, pid=0,
                        balance=None))
    assert s.poll(5000) and proto.decode(s.recv(), proto.MAX_BROKER_FRAME)[0] == "welcome"
    frame = proto.encode("heartbeat")
else:
    frame = proto.encode("stats")
end = time.monotonic() + float(sys.argv[3])
sent = 0
while time.monotonic() < end:
    try:
        s.send(frame, zmq.NOBLOCK)
        sent += 1
    except zmq.Again:
        time.sleep(0.001)
    if kind == "heartbeat" and sent % 1000 == 0:
        while s.poll(0):
            s.recv()
print(sent)
"""


def _flood(b: BrokerProc, kind: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", FLOOD, f"ipc://{b.socket}", kind,
                             str(seconds)], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["stats", "heartbeat"])
def test_a_flood_is_cut_off_and_the_stream_goes_on(broker: Any, kind: str) -> None:
    """A process sending STATS (not attached) or HEARTBEAT (attached) as fast
    as it can: what is beyond its budget is dropped unread and counted, its
    connection is cut, its client evicted, its process refused for the
    back-off; the good client's replay goes on meanwhile, without a gap.
    (How fast, against no flood: bench/README.md, "Hostile load".)"""
    b = broker("-r", str(PCAPS / "resp_1_benchmark.pcap"), "--loop", "0", "--slab-size", "16k",
               "--evict-backoff", "30")
    with pktipc.connect(b.name, "good") as good:
        seqs: list[int] = []

        def read(seconds: float) -> int:
            n, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                batch = good.next_batch(timeout=0.1)
                if batch is not None:
                    seqs.extend(batch.seq + int(i) for i in batch.mine[[0, -1]])
                    n += len(batch)
                    batch.release()
            return n
        alone = read(0.5)
        flood = _flood(b, kind, 2.0)
        during = read(2.5)
        assert flood.wait(timeout=30) == 0
        st = good.stats()
    assert during > 0.2 * alone * 5             # the replay went on, unstarved
    assert good.gaps == [] and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    c = st.control
    assert c.messages_over_budget > 0 and c.connections_cut >= 1
    assert c.connections_refused >= 1        # it came back, banned
    if kind == "heartbeat":
        assert st.counters.evictions == 1
        b.stop()
        assert "client 'flooder' dropped: it sent more messages than it may" in b.stderr()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_peer_that_never_reads_is_cut_off(broker: Any) -> None:
    """STATS requests within the budget, the replies never read: the queue
    toward it is bounded, and once full the connection is cut; the broker's
    memory stays where it was."""
    import zmq

    b = broker("-r", str(DNS), "--wait-clients", "2", "--linger", "--control-rate", "20000")
    before = _rss_kib(b.pid)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVHWM, 1)                 # as little as it can take in
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(f"ipc://{b.socket}")
    try:
        frame, deadline = proto.encode("stats"), time.monotonic() + 20
        while pktipc.broker_stats(b.name).control.connections_cut < 1:
            assert time.monotonic() < deadline
            try:
                for _ in range(500):
                    s.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.05)
        assert _rss_kib(b.pid) - before < 20 * 1024
    finally:
        s.close(linger=0)
        ctx.term()
    b.stop()
    assert "a connection cut off: it does not read its messages" in b.stderr()


# --- 7. file descriptors ------------------------------------------------------------------


_HOLDER = """
import resource, sys, time
from pktipc._broker.control import ControlSocket
resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
c = ControlSocket("ipc://" + sys.argv[1], group_access=False, max_connections=8, send_hwm=64)
print("listening", flush=True)
sys.stdin.readline()             # every connection has been made; none refused yet
end = time.monotonic() + 5
while time.monotonic() < end:
    c.handle_zap(time.monotonic())
    c.handle_monitor()
    time.sleep(0.01)
print(c.refused, c.accepts_deferred, flush=True)
c.close()
"""


def test_a_full_file_table_makes_connections_wait_not_the_broker_die(top: Path) -> None:
    """The control socket of a process allowed 96 files, not answering its
    ZAP requests while 150 connections come: libzmq's I/O thread accepts
    them until accept() fails with EMFILE, which libzmq's ipc listener
    takes for a reason to abort. It lives, counts the accepts that found no
    room, and refuses the connections past its bound once it answers."""
    import zmq

    path = top / "ctl"
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ctx = zmq.Context()
    socks = []
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == "listening\n", p.stderr.read() if p.stderr else ""
        for _ in range(150):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{path}")
            socks.append(s)
        deadline = time.monotonic() + 20      # until the holder's table is full
        while len(os.listdir(f"/proc/{p.pid}/fd")) < 96 - 2:
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        p.stdin.write("\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=30)
    finally:
        for s in socks:
            s.close()
        ctx.term()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    refused, deferred = map(int, out.split())
    assert deferred >= 1
    assert refused >= 150 - 96


def test_connections_beyond_the_limit_are_refused_not_fatal(top: Path) -> None:
    """1,100 connections against a broker of `nobody`'s whose limit on open
    files is 1,024 (so that it cannot raise it): it stays up, caps what it
    admits below the limit, refuses and counts the rest, and serves."""
    import zmq

    run = top / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    name = f"sec{os.getpid()}fd"
    env = dict(os.environ, PKTIPC_RUNTIME_DIR=str(run), PYTHONPATH=str(ROOT))
    p = subprocess.Popen(["prlimit", "--nofile=1024:1024", "setpriv", f"--reuid={NOBODY}",
                          f"--regid={NOBODY}", "--clear-groups",
                          *pktipc_cmd("serve", "--name", name, "-r", str(DNS), "--wait-clients",
                                      "0", "--linger", "--max-clients", "1000",
                                      "--max-connections", "5000")],
                         env=env, cwd="/", stderr=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = 4000
    socks = []
    try:
        sock_path = run / f"{name}.ctl"
        deadline = time.monotonic() + 15
        while not sock_path.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(1100):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{sock_path}")
            socks.append(s)
        time.sleep(3)
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        for s in socks:                         # (while they are there, so is STATS's)
            s.close()
        socks.clear()
        time.sleep(1)
        os.environ["PKTIPC_RUNTIME_DIR"] = str(run)
        try:
            st = pktipc.broker_stats(name, timeout=10)
        finally:
            os.environ["PKTIPC_RUNTIME_DIR"] = env["PKTIPC_RUNTIME_DIR"]
        c = st.control
        assert c.max_connections < 1024 - 64
        assert c.connections_refused >= 1100 - c.max_connections - 1
    finally:
        for s in socks:
            s.close()
        ctx.term()
        p.terminate()
        rc = p.wait(timeout=15)
        err = p.stderr.read() if p.stderr else ""
        left = list(Path("/dev/shm").glob(f"pktipc.{name}.*"))
        if rc != 0:                 # a broker that died cannot remove its segment
            for f in left:
                f.unlink()
    assert rc == 0, err
    assert "at most 319 clients: the limit on open files is 1024" in err    # (1024-65)/3
    assert not left
